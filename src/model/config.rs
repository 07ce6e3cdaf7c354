//! `config.json` of Qwen3 (`qwen3`) and Qwen3-MoE (`qwen3_moe`) models, the
//! presets the crate writes checkpoints for, and the tensors each model has.

use serde_json::{json, Map, Value};

use crate::error::LoadError;

/// Model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Dense Qwen3 (`model_type: qwen3`).
    Qwen3,
    /// Qwen3 with routed experts (`model_type: qwen3_moe`).
    Qwen3Moe,
}

/// Routed-expert settings of a `qwen3_moe` model.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Experts per MoE layer.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Intermediate size of one expert.
    pub moe_intermediate_size: usize,
    /// Renormalise the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is MoE (counting from 1).
    pub decoder_sparse_step: usize,
    /// Layers that stay dense regardless.
    pub mlp_only_layers: Vec<usize>,
    /// The routed experts are stored in this 4-bit format
    /// (`quantization_config.quant_method` of `config.json`); `None`: floats.
    pub fp4: Option<crate::quant::Fp4Format>,
}

/// The shape of a model, as `config.json` gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Hidden size.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Intermediate size of dense MLPs.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest context the model was configured for.
    pub max_position_embeddings: usize,
    /// Routed experts, for `qwen3_moe`.
    pub moe: Option<MoeConfig>,
}

fn cfg(msg: impl Into<String>) -> LoadError {
    LoadError::Config(msg.into())
}

fn get_usize(o: &Map<String, Value>, key: &str) -> Result<usize, LoadError> {
    match o.get(key) {
        Some(v) => v
            .as_u64()
            .filter(|&x| x > 0)
            .map(|x| x as usize)
            .ok_or_else(|| cfg(format!("'{key}' must be a positive integer, not {v}"))),
        None => Err(cfg(format!("missing '{key}'"))),
    }
}

/// The first of `keys` present (names differ between transformers versions).
fn get_usize_any(o: &Map<String, Value>, keys: &[&str]) -> Result<usize, LoadError> {
    match keys.iter().find(|k| o.contains_key(**k)) {
        Some(k) => get_usize(o, k),
        None => Err(cfg(format!("missing '{}'", keys.join("' or '")))),
    }
}

/// RoPE base frequency: top-level `rope_theta` (transformers 4) or
/// `rope_parameters.rope_theta` (transformers 5); only the default rope type.
fn rope_theta(o: &Map<String, Value>) -> Result<f64, LoadError> {
    match o.get("rope_parameters") {
        None | Some(Value::Null) => get_f64(o, "rope_theta", 1e6),
        Some(Value::Object(p)) => {
            match p.get("rope_type").and_then(Value::as_str) {
                None | Some("default") => {}
                Some(t) => return Err(cfg(format!("rope_type '{t}' is not supported"))),
            }
            get_f64(p, "rope_theta", get_f64(o, "rope_theta", 1e6)?)
        }
        Some(v) => Err(cfg(format!("'rope_parameters' must be an object, not {v}"))),
    }
}

fn get_f64(o: &Map<String, Value>, key: &str, default: f64) -> Result<f64, LoadError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| cfg(format!("'{key}' must be a positive number, not {v}"))),
    }
}

fn get_bool(o: &Map<String, Value>, key: &str, default: bool) -> Result<bool, LoadError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| cfg(format!("'{key}' must be true or false, not {v}"))),
    }
}

impl ModelConfig {
    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> Result<ModelConfig, LoadError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| cfg(format!("not valid JSON: {e}")))?;
        let o = v
            .as_object()
            .ok_or_else(|| cfg("top level must be an object"))?;
        let arch = match o.get("model_type").and_then(Value::as_str) {
            Some("qwen3") => Arch::Qwen3,
            Some("qwen3_moe") => Arch::Qwen3Moe,
            Some(other) => {
                return Err(cfg(format!(
                    "unsupported model_type '{other}' (supported: qwen3, qwen3_moe)"
                )))
            }
            None => return Err(cfg("missing 'model_type'")),
        };
        for (key, allowed) in [("attention_bias", false), ("use_sliding_window", false)] {
            if get_bool(o, key, allowed)? != allowed {
                return Err(cfg(format!("'{key}: {}' is not supported", !allowed)));
            }
        }
        if let Some(s) = o.get("rope_scaling").filter(|v| {
            let t = v.get("rope_type").or_else(|| v.get("type"));
            !v.is_null() && t.and_then(Value::as_str) != Some("default")
        }) {
            return Err(cfg(format!("rope_scaling {s} is not supported")));
        }
        if let Some(act) = o
            .get("hidden_act")
            .and_then(Value::as_str)
            .filter(|a| *a != "silu")
        {
            return Err(cfg(format!(
                "hidden_act '{act}' is not supported (silu only)"
            )));
        }
        let hidden_size = get_usize(o, "hidden_size")?;
        let num_heads = get_usize(o, "num_attention_heads")?;
        let head_dim = match o.get("head_dim") {
            Some(_) => get_usize(o, "head_dim")?,
            None => hidden_size / num_heads,
        };
        let num_layers = get_usize(o, "num_hidden_layers")?;
        let moe = match arch {
            Arch::Qwen3 => None,
            Arch::Qwen3Moe => {
                let mlp_only_layers = match o.get("mlp_only_layers") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| x.as_u64().map(|x| x as usize).filter(|&x| x < num_layers))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| cfg("'mlp_only_layers' must list layer indices"))?,
                    Some(v) => {
                        return Err(cfg(format!("'mlp_only_layers' must be a list, not {v}")))
                    }
                };
                Some(MoeConfig {
                    num_experts: get_usize_any(o, &["num_experts", "num_local_experts"])?,
                    top_k: get_usize(o, "num_experts_per_tok")?,
                    moe_intermediate_size: get_usize(o, "moe_intermediate_size")?,
                    norm_topk_prob: get_bool(o, "norm_topk_prob", false)?,
                    decoder_sparse_step: match o.get("decoder_sparse_step") {
                        None => 1,
                        Some(_) => get_usize(o, "decoder_sparse_step")?,
                    },
                    mlp_only_layers,
                    fp4: match o.get("quantization_config") {
                        None | Some(Value::Null) => None,
                        Some(q) => {
                            let method = q.get("quant_method").and_then(Value::as_str);
                            Some(method.and_then(crate::quant::Fp4Format::parse).ok_or_else(|| {
                                cfg(format!("quantization_config {q} is not supported (quant_method mxfp4 or nvfp4 on the routed experts)"))
                            })?)
                        }
                    },
                })
            }
        };
        let c = ModelConfig {
            arch,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads: get_usize(o, "num_key_value_heads")?,
            head_dim,
            intermediate_size: get_usize(o, "intermediate_size")?,
            vocab_size: get_usize(o, "vocab_size")?,
            rms_norm_eps: get_f64(o, "rms_norm_eps", 1e-6)?,
            rope_theta: rope_theta(o)?,
            tie_word_embeddings: get_bool(o, "tie_word_embeddings", false)?,
            max_position_embeddings: match o.get("max_position_embeddings") {
                None => 40960,
                Some(_) => get_usize(o, "max_position_embeddings")?,
            },
            moe,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the relations between sizes.
    pub fn validate(&self) -> Result<(), LoadError> {
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(cfg(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(cfg(format!(
                "head_dim {} must be even (RoPE pairs)",
                self.head_dim
            )));
        }
        if let Some(m) = &self.moe {
            if m.top_k > m.num_experts {
                return Err(cfg(format!(
                    "num_experts_per_tok {} exceeds num_experts {}",
                    m.top_k, m.num_experts
                )));
            }
        }
        Ok(())
    }

    /// The configuration as `config.json` text (the keys `transformers` reads).
    pub fn to_json(&self) -> String {
        let mut v = json!({
            "architectures": [match self.arch { Arch::Qwen3 => "Qwen3ForCausalLM", Arch::Qwen3Moe => "Qwen3MoeForCausalLM" }],
            "model_type": match self.arch { Arch::Qwen3 => "qwen3", Arch::Qwen3Moe => "qwen3_moe" },
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "torch_dtype": "bfloat16",
        });
        if let (Some(m), Some(o)) = (&self.moe, v.as_object_mut()) {
            o.insert("num_experts".into(), json!(m.num_experts));
            o.insert("num_experts_per_tok".into(), json!(m.top_k));
            o.insert(
                "moe_intermediate_size".into(),
                json!(m.moe_intermediate_size),
            );
            o.insert("norm_topk_prob".into(), json!(m.norm_topk_prob));
            o.insert("decoder_sparse_step".into(), json!(m.decoder_sparse_step));
            o.insert("mlp_only_layers".into(), json!(m.mlp_only_layers));
            if let Some(f) = m.fp4 {
                o.insert(
                    "quantization_config".into(),
                    json!({"quant_method": f.name(), "modules": "routed experts", "block_size": f.block()}),
                );
            }
        }
        serde_json::to_string_pretty(&v).expect("a JSON value serialises")
    }

    /// Whether layer `l` has routed experts (the rule of the reference
    /// implementation: not in `mlp_only_layers`, and `(l + 1)` a multiple of
    /// `decoder_sparse_step`).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| {
            !m.mlp_only_layers.contains(&l) && (l + 1) % m.decoder_sparse_step == 0
        })
    }

    /// Every tensor of the checkpoint with its shape, as stored, in a fixed
    /// order: with FP4 experts, each routed-expert weight `NAME` becomes
    /// `NAME_blocks` (U8 `[rows, cols / block, block / 2]`, two codes per byte,
    /// even column in the low nibble), `NAME_scales` (U8 `[rows, cols / block]`,
    /// E8M0 or E4M3 codes) and, for NVFP4, `NAME_scale_2` (F32 `[1]`, the
    /// tensor scale).
    pub fn stored_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let fp4 = self.moe.as_ref().and_then(|m| m.fp4);
        let mut out = Vec::new();
        for (name, shape) in self.tensors() {
            match fp4 {
                Some(f) if name.contains(".mlp.experts.") => {
                    let (rows, cols) = (shape[0], shape[1]);
                    let blocks = cols / f.block();
                    out.push((format!("{name}_blocks"), vec![rows, blocks, f.block() / 2]));
                    out.push((format!("{name}_scales"), vec![rows, blocks]));
                    if f == crate::quant::Fp4Format::Nvfp4 {
                        out.push((format!("{name}_scale_2"), vec![1]));
                    }
                }
                _ => out.push((name, shape)),
            }
        }
        out
    }

    /// Every tensor a checkpoint of this shape holds, as floats (routed experts
    /// by their `.weight` names even when [`stored_tensors`](Self::stored_tensors)
    /// keeps them in FP4), in a fixed order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, hd) = (self.hidden_size, self.head_dim);
        let mut t = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.num_heads * hd, h],
            ));
            t.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.num_kv_heads * hd, h],
            ));
            t.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.num_kv_heads * hd, h],
            ));
            t.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.num_heads * hd],
            ));
            t.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            t.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            match &self.moe {
                Some(m) if self.is_moe_layer(l) => {
                    t.push((format!("{p}.mlp.gate.weight"), vec![m.num_experts, h]));
                    for e in 0..m.num_experts {
                        let i = m.moe_intermediate_size;
                        t.push((format!("{p}.mlp.experts.{e}.gate_proj.weight"), vec![i, h]));
                        t.push((format!("{p}.mlp.experts.{e}.up_proj.weight"), vec![i, h]));
                        t.push((format!("{p}.mlp.experts.{e}.down_proj.weight"), vec![h, i]));
                    }
                }
                _ => {
                    let i = self.intermediate_size;
                    t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
                    t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
                    t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
                }
            }
        }
        t.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            t.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        t
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Bytes one batch-1 decode step must read at `context` positions: every
    /// weight used once (for MoE layers the router and `top_k` experts), one
    /// embedding row, the LM head, and the bf16 KV cache.
    pub fn decode_bytes(&self, context: usize) -> usize {
        self.decode_bytes_with(context, None)
    }

    /// [`decode_bytes`](Self::decode_bytes) with the routed experts stored in
    /// `experts` (codes plus block scales) instead of bf16.
    pub fn decode_bytes_with(
        &self,
        context: usize,
        experts: Option<crate::quant::Fp4Format>,
    ) -> usize {
        let (h, hd) = (self.hidden_size, self.head_dim);
        let attn = (self.num_heads + 2 * self.num_kv_heads) * hd * h
            + h * self.num_heads * hd
            + 2 * hd
            + 2 * h;
        let kv = 2 * self.num_kv_heads * hd * context;
        let mut elems = h + h + self.vocab_size * h;
        let mut expert_bytes = 0usize;
        for l in 0..self.num_layers {
            elems += attn + kv;
            elems += match &self.moe {
                Some(m) if self.is_moe_layer(l) => {
                    let e = m.top_k * 3 * m.moe_intermediate_size * h;
                    match experts {
                        // Half a byte per element, one scale byte per block.
                        Some(f) => expert_bytes += e / 2 + e / f.block(),
                        None => elems += e,
                    }
                    m.num_experts * h
                }
                _ => 3 * self.intermediate_size * h,
            };
        }
        2 * elems + expert_bytes
    }

    /// A named preset: `tiny`, `tiny-moe`, `qwen3-0.6b`, `qwen3-8b`, `qwen3-30b-a3b`.
    pub fn preset(name: &str) -> Option<ModelConfig> {
        let dense = |h, layers, heads, kv, inter, vocab, tied| ModelConfig {
            arch: Arch::Qwen3,
            hidden_size: h,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 128,
            intermediate_size: inter,
            vocab_size: vocab,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            tie_word_embeddings: tied,
            max_position_embeddings: 40960,
            moe: None,
        };
        let moe = |c: ModelConfig, experts, top_k, inter| ModelConfig {
            arch: Arch::Qwen3Moe,
            moe: Some(MoeConfig {
                num_experts: experts,
                top_k,
                moe_intermediate_size: inter,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: Vec::new(),
                fp4: None,
            }),
            ..c
        };
        Some(match name {
            // Eight query heads so that 1, 2, 4 and 8 ranks can share them.
            "tiny" => ModelConfig {
                head_dim: 32,
                ..dense(128, 2, 8, 2, 256, 512, false)
            },
            "tiny-moe" => moe(
                ModelConfig {
                    head_dim: 32,
                    ..dense(128, 2, 4, 2, 256, 512, false)
                },
                8,
                2,
                64,
            ),
            "qwen3-0.6b" => dense(1024, 28, 16, 8, 3072, 151_936, true),
            "qwen3-8b" => dense(4096, 36, 32, 8, 12288, 151_936, false),
            "qwen3-30b-a3b" => moe(dense(2048, 48, 32, 4, 6144, 151_936, false), 128, 8, 768),
            // Sizes a decode step at batch 1 cannot serve from one GPU's
            // memory: run them over a cluster (MXFP4 experts).
            "qwen3-235b-a22b" => moe(dense(4096, 94, 64, 4, 12288, 151_936, false), 128, 8, 1536),
            // The trillion-parameter MoE shape: every layer routed, 384 experts.
            "moe-1t" => moe(dense(7168, 61, 64, 8, 18432, 163_840, false), 384, 8, 2048),
            // qwen3-30b-a3b's heads and routing (32 query / 4 KV heads, 128
            // experts, top 8) at a size the CPU executor runs in tests.
            "qwen3-30b-a3b-mini" => moe(
                ModelConfig {
                    head_dim: 32,
                    ..dense(256, 2, 32, 4, 512, 1024, false)
                },
                128,
                8,
                256,
            ),
            _ => return None,
        })
    }

    /// Names of the presets.
    pub const PRESETS: [&'static str; 8] = [
        "tiny",
        "tiny-moe",
        "qwen3-30b-a3b-mini",
        "qwen3-0.6b",
        "qwen3-8b",
        "qwen3-30b-a3b",
        "qwen3-235b-a22b",
        "moe-1t",
    ];
}
