//! A DFlash draft's `config.json`: an ordinary Qwen3 configuration (the
//! draft's decoder layers) plus the keys of the reference implementation
//! (github.com/z-lab/dflash, `dflash/model.py`):
//!
//! | key | where | meaning |
//! | --- | --- | --- |
//! | `block_size` | top level | tokens per block: the last accepted token and `block_size − 1` masks |
//! | `num_target_layers` | top level | the target's layer count (only used to derive default ids) |
//! | `dflash_config.target_layer_ids` | nested | target layers whose outputs (Hugging Face `hidden_states[id + 1]`) feed the draft, in this order |
//! | `dflash_config.mask_token_id` | nested | the token filling the block after its first position |
//!
//! `block_size`, `target_layer_ids` and `mask_token_id` are also accepted at
//! the other level (as some serving engines do).

use serde_json::{json, Value};

use crate::error::LoadError;
use crate::model::ModelConfig;

/// The configuration of a DFlash draft model.
#[derive(Clone, Debug, PartialEq)]
pub struct DraftConfig {
    /// The draft's decoder layers (Qwen3 keys); `vocab_size` is the target's.
    pub layers: ModelConfig,
    /// Tokens per block.
    pub block_size: usize,
    /// Target layers whose outputs form the draft's context, in order.
    pub target_layer_ids: Vec<usize>,
    /// The mask token.
    pub mask_token_id: u32,
    /// Layers of the target the draft was made for.
    pub num_target_layers: usize,
}

fn cfg(msg: impl Into<String>) -> LoadError {
    LoadError::Config(msg.into())
}

/// The reference implementation's default choice of target layers for a
/// draft of `n` layers on a target of `layers` layers: the middle layer for
/// one, otherwise `n` ids spread evenly from 1 to `layers − 3`.
pub fn default_target_layers(layers: usize, n: usize) -> Vec<usize> {
    if n <= 1 || layers < 4 {
        return (0..n.max(1))
            .map(|i| (layers / 2 + i).min(layers - 1))
            .collect();
    }
    (0..n)
        .map(|i| (1.0 + i as f64 * (layers - 4) as f64 / (n - 1) as f64).round() as usize)
        .collect()
}

impl DraftConfig {
    /// Parses a draft's `config.json` text.
    pub fn from_json(text: &str) -> Result<DraftConfig, LoadError> {
        let layers = ModelConfig::from_json(text)?;
        if layers.moe.is_some() {
            return Err(cfg("a DFlash draft has dense layers (model_type qwen3)"));
        }
        let v: Value =
            serde_json::from_str(text).map_err(|e| cfg(format!("not valid JSON: {e}")))?;
        let nested = v.get("dflash_config");
        let get = |key: &str| {
            nested
                .and_then(|n| n.get(key))
                .or_else(|| v.get(key))
                .filter(|x| !x.is_null())
        };
        let num = |key: &str| -> Result<Option<usize>, LoadError> {
            get(key)
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| cfg(format!("'{key}' must be a non-negative integer")))
                })
                .transpose()
        };
        let block_size = num("block_size")?.ok_or_else(|| cfg("missing 'block_size'"))?;
        let num_target_layers = num("num_target_layers")?.unwrap_or(0);
        let target_layer_ids = match get("target_layer_ids") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| cfg("'target_layer_ids' must list layer indices"))?,
            Some(other) => {
                return Err(cfg(format!(
                    "'target_layer_ids' must be a list, not {other}"
                )))
            }
            None if num_target_layers > 0 => {
                default_target_layers(num_target_layers, layers.num_layers)
            }
            None => return Err(cfg("missing 'dflash_config.target_layer_ids'")),
        };
        let mask_token_id =
            num("mask_token_id")?.ok_or_else(|| cfg("missing 'dflash_config.mask_token_id'"))?;
        let c = DraftConfig {
            layers,
            block_size,
            target_layer_ids,
            mask_token_id: u32::try_from(mask_token_id)
                .map_err(|_| cfg("mask_token_id too large"))?,
            num_target_layers,
        };
        c.validate()?;
        Ok(c)
    }

    /// The configuration as `config.json` text, in the reference layout.
    pub fn to_json(&self) -> String {
        let mut v: Value = serde_json::from_str(&self.layers.to_json()).expect("valid JSON");
        if let Some(o) = v.as_object_mut() {
            o.insert("architectures".into(), json!(["DFlashDraftModel"]));
            o.insert("block_size".into(), json!(self.block_size));
            o.insert("num_target_layers".into(), json!(self.num_target_layers));
            o.insert(
                "dflash_config".into(),
                json!({
                    "target_layer_ids": self.target_layer_ids,
                    "mask_token_id": self.mask_token_id,
                }),
            );
        }
        serde_json::to_string_pretty(&v).expect("a JSON value serialises")
    }

    /// Checks the draft's own relations (block size, ids, mask token).
    pub fn validate(&self) -> Result<(), LoadError> {
        self.layers.validate()?;
        if !(2..=16).contains(&self.block_size) {
            return Err(cfg(format!(
                "block_size {} is not supported (2..=16)",
                self.block_size
            )));
        }
        if self.target_layer_ids.is_empty() {
            return Err(cfg("'target_layer_ids' is empty"));
        }
        if self.mask_token_id as usize >= self.layers.vocab_size {
            return Err(cfg(format!(
                "mask_token_id {} is outside the vocabulary of {}",
                self.mask_token_id, self.layers.vocab_size
            )));
        }
        Ok(())
    }

    /// Checks that the draft fits `target`: the same hidden size and
    /// vocabulary, and target layer ids that exist, each listed once.
    pub fn check_target(&self, target: &ModelConfig) -> Result<(), LoadError> {
        if self.layers.hidden_size != target.hidden_size {
            return Err(cfg(format!(
                "the draft's hidden size {} differs from the target's {}",
                self.layers.hidden_size, target.hidden_size
            )));
        }
        if self.layers.vocab_size != target.vocab_size {
            return Err(cfg(format!(
                "the draft's vocabulary {} differs from the target's {}",
                self.layers.vocab_size, target.vocab_size
            )));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(&bad) = self
            .target_layer_ids
            .iter()
            .find(|&&l| l >= target.num_layers || !seen.insert(l))
        {
            return Err(cfg(format!(
                "target layer id {bad} is repeated or outside the target's {} layers",
                target.num_layers
            )));
        }
        Ok(())
    }

    /// A draft shaped for `target` as the published ones are: `layers`
    /// decoder layers with the target's attention geometry and dense MLP
    /// width, block size `block`, the default target layer ids, and the
    /// Qwen3 mask token 151669 (the last id when the vocabulary is smaller).
    pub fn for_target(target: &ModelConfig, layers: usize, block: usize) -> DraftConfig {
        let mut base = target.clone();
        base.arch = crate::model::Arch::Qwen3;
        base.moe = None;
        base.num_layers = layers;
        base.tie_word_embeddings = false;
        DraftConfig {
            layers: base,
            block_size: block,
            target_layer_ids: default_target_layers(target.num_layers, layers),
            mask_token_id: 151_669.min(target.vocab_size as u32 - 1),
            num_target_layers: target.num_layers,
        }
    }

    /// The draft layer count published drafts use for a target of this
    /// many layers (5; fewer for very shallow targets).
    pub fn default_layers(target_layers: usize) -> usize {
        (target_layers / 2).clamp(1, 5)
    }

    /// Every tensor of a draft checkpoint with its shape (no `model.` prefix;
    /// no embedding or LM head: the target's are used).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.layers;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let mut t = vec![
            (
                "fc.weight".to_string(),
                vec![h, self.target_layer_ids.len() * h],
            ),
            ("hidden_norm.weight".to_string(), vec![h]),
        ];
        for l in 0..c.num_layers {
            let p = format!("layers.{l}");
            let q = c.num_heads * hd;
            let kv = c.num_kv_heads * hd;
            let i = c.intermediate_size;
            t.extend([
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
                (format!("{p}.self_attn.q_norm.weight"), vec![hd]),
                (format!("{p}.self_attn.k_norm.weight"), vec![hd]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            ]);
        }
        t.push(("norm.weight".to_string(), vec![h]));
        t
    }
}
