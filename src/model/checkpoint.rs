//! Random-weight checkpoints in the Hugging Face layout, for tests and benchmarks.
//!
//! Weights are drawn from seeded near-normal distributions (Irwin–Hall, see
//! [`random_value`]), one stream per tensor
//! (seeded from the checkpoint seed and the tensor's name), so any tensor can
//! be regenerated alone and a file never depends on the order of writing.
//! Scales keep activations in a realistic range: projections `N(0, 1/fan_in)`
//! (variance-preserving), RMSNorm weights `1 + N(0, 0.1²)`, embeddings `N(0, 1)`
//! and an untied LM head `N(0, 1/hidden)` (logits of unit scale); a tied
//! embedding is drawn at `N(0, 8²/hidden)` so that, used as the LM head, it
//! still gives logits of a usable scale.

use std::path::Path;

use half::bf16;

use super::config::ModelConfig;
use super::safetensors::{write, TensorData, TensorDtype};
use crate::error::LoadError;
use crate::task::fill_random::random_value;

/// How to write a checkpoint.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Seed of every weight.
    pub seed: u64,
    /// Element type of the files (BF16 as published models use, or F32/F16).
    pub dtype: TensorDtype,
    /// Split into shards of about this many bytes (with an index file), or one file.
    pub shard_bytes: Option<usize>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            seed: 0x5eed,
            dtype: TensorDtype::Bf16,
            shard_bytes: None,
        }
    }
}

/// Standard deviation and mean of the random init of tensor `name`.
pub fn tensor_init(config: &ModelConfig, name: &str, shape: &[usize]) -> (f32, f32) {
    let h = config.hidden_size as f32;
    if name.ends_with("norm.weight") {
        (0.1, 1.0)
    } else if name == "model.embed_tokens.weight" {
        (
            if config.tie_word_embeddings {
                8.0 / h.sqrt()
            } else {
                1.0
            },
            0.0,
        )
    } else {
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        (1.0 / fan_in.sqrt(), 0.0)
    }
}

/// The stream key of tensor `name` under `seed` (FNV-1a of the name).
pub fn tensor_key(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// [`tensor_values`] on the calling thread only (for callers that already
/// spread tensors over threads).
pub fn tensor_values_serial(
    config: &ModelConfig,
    seed: u64,
    name: &str,
    shape: &[usize],
) -> Vec<f32> {
    draw(config, seed, name, shape, 1)
}

/// Values of one tensor, as f32 (before conversion to the file's type).
///
/// Counter-based: element `i` is [`random_value`]`(tensor_key(seed, name), i, ..)`,
/// so any part of a tensor can be drawn independently (large tensors are drawn
/// on all cores), and the device draws the same values with the `fill_random`
/// task.
pub fn tensor_values(config: &ModelConfig, seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let threads = if n < (1 << 20) {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |t| t.get())
    };
    draw(config, seed, name, shape, threads)
}

/// The values of one tensor, drawn in `threads` contiguous parts.
fn draw(config: &ModelConfig, seed: u64, name: &str, shape: &[usize], threads: usize) -> Vec<f32> {
    let (std, mean) = tensor_init(config, name, shape);
    let key = tensor_key(seed, name);
    let n: usize = shape.iter().product();
    let mut out = vec![0f32; n];
    let fill = |start: usize, chunk: &mut [f32]| {
        for (k, v) in chunk.iter_mut().enumerate() {
            *v = random_value(key, (start + k) as u64, std, mean);
        }
    };
    let per = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (c, chunk) in out.chunks_mut(per).enumerate() {
            let fill = &fill;
            if threads > 1 {
                s.spawn(move || fill(c * per, chunk));
            } else {
                fill(c * per, chunk);
            }
        }
    });
    out
}

/// Floats as the bytes of `dtype` (bf16 for `U8`, which holds no floats).
pub(crate) fn encode(dtype: TensorDtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        TensorDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorDtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        TensorDtype::Bf16 | TensorDtype::U8 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

/// One logical tensor as stored: floats in `dtype`, or (a routed expert of a
/// model whose experts are FP4) its `_blocks`, `_scales` and `_scale_2` parts.
fn stored(
    config: &ModelConfig,
    dtype: TensorDtype,
    name: &str,
    shape: &[usize],
    values: Vec<f32>,
) -> Result<Vec<TensorData>, LoadError> {
    let fp4 = config.moe.as_ref().and_then(|m| m.fp4);
    match fp4 {
        Some(f) if name.contains(".mlp.experts.") => {
            let q = crate::quant::quantize(f, &values).map_err(|e| LoadError::BadTensor {
                path: String::new(),
                tensor: name.into(),
                reason: e.to_string(),
            })?;
            let (rows, blocks) = (shape[0], shape[1] / f.block());
            let mut out = vec![
                (
                    format!("{name}_blocks"),
                    TensorDtype::U8,
                    vec![rows, blocks, f.block() / 2],
                    q.codes,
                ),
                (
                    format!("{name}_scales"),
                    TensorDtype::U8,
                    vec![rows, blocks],
                    q.scales,
                ),
            ];
            if f == crate::quant::Fp4Format::Nvfp4 {
                let g = q.tensor_scale.to_le_bytes().to_vec();
                out.push((format!("{name}_scale_2"), TensorDtype::F32, vec![1], g));
            }
            Ok(out)
        }
        _ => Ok(vec![(
            name.to_string(),
            dtype,
            shape.to_vec(),
            encode(dtype, &values),
        )]),
    }
}

/// Writes a copy of `src` into `dir` with its routed experts quantized to
/// `format` (the other tensors as `dtype`), recording the format in
/// `config.json`: a checkpoint that loads without quantizing again.
pub fn write_quantized(
    dir: &Path,
    src: &super::Checkpoint,
    format: crate::quant::Fp4Format,
    opts: &WriteOptions,
) -> Result<(), LoadError> {
    let mut config = src.config.clone();
    match config.moe.as_mut() {
        Some(m) if m.fp4.is_none() => m.fp4 = Some(format),
        Some(_) => {
            return Err(LoadError::Config(
                "the experts are quantized already".into(),
            ))
        }
        None => {
            return Err(LoadError::Config(
                "a dense model has no routed experts to quantize".into(),
            ))
        }
    }
    write_tensors(dir, &config, opts, &|name, _| src.read_f32(name))
}

/// Writes `config.json` and random weights for `config` into `dir` (created if
/// needed); with FP4 experts in the config, the experts are written quantized.
pub fn write_random(
    dir: &Path,
    config: &ModelConfig,
    opts: &WriteOptions,
) -> Result<(), LoadError> {
    let seed = opts.seed;
    write_tensors(dir, config, opts, &|name, shape| {
        Ok(tensor_values(config, seed, name, shape))
    })
}

/// Creates `dir` (and its parents) and writes `json` as its `config.json`.
pub(crate) fn create_with_config(dir: &Path, json: &str) -> Result<(), LoadError> {
    let io = |p: &Path, e: std::io::Error| LoadError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, json).map_err(|e| io(&cfg, e))
}

type Values<'a> = dyn Fn(&str, &[usize]) -> Result<Vec<f32>, LoadError> + 'a;

fn write_tensors(
    dir: &Path,
    config: &ModelConfig,
    opts: &WriteOptions,
    values: &Values<'_>,
) -> Result<(), LoadError> {
    config.validate()?;
    create_with_config(dir, &config.to_json())?;
    let io = |p: &Path, e: std::io::Error| LoadError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    let all = config.tensors();
    let elem = match opts.dtype {
        TensorDtype::F32 => 4,
        TensorDtype::F16 | TensorDtype::Bf16 => 2,
        TensorDtype::U8 => return Err(LoadError::Config("weights are written as floats".into())),
    };
    // Group tensors into shards of at most `shard_bytes` (a larger tensor gets its own).
    let limit = opts.shard_bytes.unwrap_or(usize::MAX);
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut bytes = 0usize;
    for (name, shape) in all {
        let b = shape.iter().product::<usize>() * elem;
        if bytes > 0 && bytes.saturating_add(b) > limit {
            shards.push(Vec::new());
            bytes = 0;
        }
        bytes += b;
        shards.last_mut().expect("one shard").push((name, shape));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.into_iter().enumerate() {
        let file = if opts.shard_bytes.is_some() {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        } else {
            "model.safetensors".to_string()
        };
        let mut tensors = Vec::new();
        for (name, shape) in shard {
            for t in stored(config, opts.dtype, &name, &shape, values(&name, &shape)?)? {
                total += t.3.len();
                weight_map.insert(t.0.clone(), serde_json::Value::String(file.clone()));
                tensors.push(t);
            }
        }
        write(&dir.join(&file), &tensors)?;
    }
    if opts.shard_bytes.is_some() {
        let index =
            serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).expect("JSON"))
            .map_err(|e| io(&path, e))?;
    }
    Ok(())
}
