//! A DFlash draft model's weights on an executor, loaded from a checkpoint in
//! the reference layout or drawn at random, and the random-draft writer.
//!
//! Tensors of a draft checkpoint (github.com/z-lab/dflash, `dflash/model.py`;
//! no `model.` prefix, no embedding and no LM head: the target's are used):
//! `fc.weight` `[hidden, ids · hidden]` (the context projection of the
//! concatenated target hidden states), `hidden_norm.weight` `[hidden]` (its
//! RMSNorm), `layers.{i}.{input_layernorm, post_attention_layernorm}.weight`,
//! `layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
//! `layers.{i}.self_attn.{q,k}_norm.weight`,
//! `layers.{i}.mlp.{gate,up,down}_proj.weight` (Qwen3 decoder layers), and
//! `norm.weight` (the draft's final RMSNorm, applied before the target's LM
//! head). Each layer projects the context features with its own `k_proj` and
//! `v_proj` (with `k_norm` and RoPE at their positions) into keys and values
//! that its block queries attend to.

use std::path::Path;

use super::config::DraftConfig;
use crate::buffer::Buffer;
use crate::error::{Error, LoadError, Result};
use crate::exec::Executor;
use crate::model::checkpoint::{create_with_config, encode, tensor_values};
use crate::model::safetensors::{write, TensorDtype};
use crate::model::session::{layer_rope, AttnWeights, Loader, WeightSource};
use crate::model::{Checkpoint, Model};

/// One draft decoder layer (a dense Qwen3 layer).
pub(crate) struct DraftLayer {
    pub attn: AttnWeights,
    pub gate: Buffer,
    pub up: Buffer,
    pub down: Buffer,
    /// The rope table of the layer's q and k norms, for attention tasks
    /// that do the rope work themselves.
    pub rope: Buffer,
}

/// A draft model's weights; it uses its target's embedding and LM head.
pub struct DraftModel {
    config: DraftConfig,
    /// Context projection `[hidden, ids · hidden]`.
    pub(crate) fc: Buffer,
    pub(crate) hidden_norm: Buffer,
    pub(crate) layers: Vec<DraftLayer>,
    pub(crate) norm: Buffer,
    owner: u64,
}

impl DraftModel {
    /// Loads the draft checkpoint in `dir` (its `config.json` and safetensors)
    /// for `target`.
    pub fn open(ex: &dyn Executor, dir: &Path, target: &Model) -> Result<DraftModel> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| LoadError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let config = DraftConfig::from_json(&text)?;
        let ck = Checkpoint::open(dir)?;
        ck.validate_against(&config.tensors())?;
        Self::from_source(ex, config, &WeightSource::Checkpoint(&ck), target)
    }

    /// Random weights for `config` drawn on the executor: the values
    /// [`write_random_draft`] writes for `seed`.
    pub fn random(
        ex: &dyn Executor,
        config: &DraftConfig,
        seed: u64,
        target: &Model,
    ) -> Result<DraftModel> {
        config.validate()?;
        let src = WeightSource::Random {
            config: &config.layers,
            seed,
        };
        Self::from_source(ex, config.clone(), &src, target)
    }

    fn from_source(
        ex: &dyn Executor,
        config: DraftConfig,
        src: &WeightSource<'_>,
        target: &Model,
    ) -> Result<DraftModel> {
        config.check_target(target.config())?;
        if ex.id() != target.owner() {
            return Err(Error::Foreign("target model"));
        }
        let mut ld = Loader::with_shapes(ex, src, config.tensors());
        let one = |n: &str| vec![n.to_string()];
        let fc = ld.tensor(&one("fc.weight"))?;
        let hidden_norm = ld.tensor(&one("hidden_norm.weight"))?;
        let norm = ld.tensor(&one("norm.weight"))?;
        let mut loaded = Vec::new();
        for l in 0..config.layers.num_layers {
            let p = |s: &str| format!("layers.{l}.{s}");
            loaded.push((
                ld.attention(&format!("layers.{l}."))?,
                ld.tensor(&[p("mlp.gate_proj.weight")])?,
                ld.tensor(&[p("mlp.up_proj.weight")])?,
                ld.tensor(&[p("mlp.down_proj.weight")])?,
            ));
        }
        ld.flush()?;
        // The rope tables read the q and k norms the loader filled.
        let layers = loaded
            .into_iter()
            .map(|(attn, gate, up, down)| {
                let rope = layer_rope(ex, &attn.qk_norms, &config.layers)?;
                Ok(DraftLayer {
                    attn,
                    gate,
                    up,
                    down,
                    rope,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DraftModel {
            config,
            fc,
            hidden_norm,
            layers,
            norm,
            owner: ex.id(),
        })
    }

    /// The draft's configuration.
    pub fn config(&self) -> &DraftConfig {
        &self.config
    }

    /// Id of the executor holding the weights.
    pub(crate) fn owner(&self) -> u64 {
        self.owner
    }
}

/// Writes `config.json` and random bf16 weights of a draft into `dir`
/// (created if needed), drawn as the target's checkpoint writer draws them.
pub fn write_random_draft(dir: &Path, config: &DraftConfig, seed: u64) -> Result<()> {
    config.validate()?;
    create_with_config(dir, &config.to_json())?;
    let tensors: Vec<_> = config
        .tensors()
        .into_iter()
        .map(|(name, shape)| {
            let values = tensor_values(&config.layers, seed, &name, &shape);
            let bytes = encode(TensorDtype::Bf16, &values);
            (name, TensorDtype::Bf16, shape, bytes)
        })
        .collect();
    write(&dir.join("model.safetensors"), &tensors)?;
    Ok(())
}
