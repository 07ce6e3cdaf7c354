//! Safetensors files (memory-mapped), single or sharded checkpoints, and a writer.
//!
//! Format (from the safetensors specification): an 8-byte little-endian header
//! length `N`, `N` bytes of JSON mapping tensor names to
//! `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the
//! data section that follows the header) plus an optional `__metadata__`
//! object, then the data. Every offset, size and shape is checked on open.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::Value;

use super::config::ModelConfig;
use crate::error::LoadError;

/// Element types the loader converts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorDtype {
    /// `F32`.
    F32,
    /// `F16`.
    F16,
    /// `BF16`.
    Bf16,
    /// `U8` (raw bytes: FP4 codes and scales).
    U8,
}

impl TensorDtype {
    /// The dtype string in a header.
    pub fn name(self) -> &'static str {
        match self {
            TensorDtype::F32 => "F32",
            TensorDtype::F16 => "F16",
            TensorDtype::Bf16 => "BF16",
            TensorDtype::U8 => "U8",
        }
    }
    /// Parses a header dtype string this crate reads.
    pub fn parse(s: &str) -> Option<TensorDtype> {
        match s {
            "F32" => Some(TensorDtype::F32),
            "F16" => Some(TensorDtype::F16),
            "BF16" => Some(TensorDtype::Bf16),
            "U8" => Some(TensorDtype::U8),
            _ => None,
        }
    }
}

/// Bytes per element of any dtype the format defines.
fn element_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        _ => return None,
    })
}

/// Largest header the loader reads (the specification's limit).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Dtype string as in the header.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
}

/// One memory-mapped safetensors file.
pub struct SafeTensors {
    path: String,
    map: Mmap,
    tensors: BTreeMap<String, TensorInfo>,
}

fn io(path: &Path, e: std::io::Error) -> LoadError {
    LoadError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl SafeTensors {
    /// Maps and checks a file.
    pub fn open(path: &Path) -> Result<SafeTensors, LoadError> {
        let file = File::open(path).map_err(|e| io(path, e))?;
        // SAFETY: the map is read-only; like every reader of memory-mapped model
        // files this assumes nobody truncates or rewrites the file while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io(path, e))?;
        let label = path.display().to_string();
        let tensors = parse(&label, &map)?;
        Ok(SafeTensors {
            path: label,
            map,
            tensors,
        })
    }

    /// Path of the file.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// Every tensor, by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }
    /// A tensor's raw bytes.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensors
            .get(name)
            .map(|t| &self.map[t.offset..t.offset + t.len])
    }
    /// A tensor converted to f32.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        let n = self
            .tensors
            .get(name)
            .map_or(0, |t| t.shape.iter().product());
        self.read_f32_range(name, 0, n)
    }

    /// Elements `start..start + count` of a tensor (row-major), converted to f32.
    pub fn read_f32_range(
        &self,
        name: &str,
        start: usize,
        count: usize,
    ) -> Result<Vec<f32>, LoadError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        let dtype = TensorDtype::parse(&t.dtype)
            .filter(|d| *d != TensorDtype::U8)
            .ok_or_else(|| LoadError::Dtype {
                name: name.into(),
                dtype: t.dtype.clone(),
            })?;
        let size = if dtype == TensorDtype::F32 { 4 } else { 2 };
        if start + count > t.len / size {
            return Err(LoadError::BadTensor {
                path: self.path.clone(),
                tensor: name.into(),
                reason: format!("elements {start}..{} outside the tensor", start + count),
            });
        }
        let b = &self.map[t.offset + start * size..t.offset + (start + count) * size];
        Ok(match dtype {
            TensorDtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            TensorDtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            TensorDtype::Bf16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            TensorDtype::U8 => unreachable!("U8 is rejected above"),
        })
    }

    /// The raw bytes of a `U8` tensor.
    pub fn read_bytes(&self, name: &str) -> Result<&[u8], LoadError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        if t.dtype != "U8" {
            return Err(LoadError::Dtype {
                name: name.into(),
                dtype: t.dtype.clone(),
            });
        }
        Ok(&self.map[t.offset..t.offset + t.len])
    }
}

/// Parses and checks the header of a safetensors image.
pub fn parse(path: &str, bytes: &[u8]) -> Result<BTreeMap<String, TensorInfo>, LoadError> {
    let bad = |reason: String| LoadError::BadHeader {
        path: path.into(),
        reason,
    };
    if bytes.len() < 8 {
        return Err(LoadError::Truncated {
            path: path.into(),
            needed: 8,
            actual: bytes.len() as u64,
        });
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(bad(format!("header length {n} exceeds {MAX_HEADER}")));
    }
    if 8 + n > bytes.len() as u64 {
        return Err(LoadError::Truncated {
            path: path.into(),
            needed: 8 + n,
            actual: bytes.len() as u64,
        });
    }
    let header: Value = serde_json::from_slice(&bytes[8..8 + n as usize])
        .map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let data_start = 8 + n as usize;
    let data_len = bytes.len() - data_start;
    let mut tensors = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad_t = |reason: String| LoadError::BadTensor {
            path: path.into(),
            tensor: name.clone(),
            reason,
        };
        let dtype = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_t("no dtype".into()))?;
        let size = element_size(dtype).ok_or_else(|| bad_t(format!("unknown dtype {dtype}")))?;
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad_t("shape must be a list of sizes".into()))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad_t("data_offsets must be [begin, end]".into()))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end || end > data_len as u64 {
            return Err(bad_t(format!(
                "data {begin}..{end} outside the {data_len} data bytes"
            )));
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let want = numel
            .and_then(|n| n.checked_mul(size))
            .ok_or_else(|| bad_t("shape overflows".into()))?;
        if want as u64 != end - begin {
            return Err(bad_t(format!(
                "shape {shape:?} of {dtype} needs {want} bytes, data has {}",
                end - begin
            )));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                name: name.clone(),
                dtype: dtype.into(),
                shape,
                offset: data_start + begin as usize,
                len: (end - begin) as usize,
            },
        );
    }
    Ok(tensors)
}

/// One tensor to write: name, dtype, shape and little-endian bytes.
pub type TensorData = (String, TensorDtype, Vec<usize>, Vec<u8>);

/// Writes a safetensors file.
pub fn write(path: &Path, tensors: &[TensorData]) -> Result<(), LoadError> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, data) in tensors {
        let end = offset + data.len();
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype.name(), "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut text = serde_json::to_string(&Value::Object(header)).expect("a JSON value serialises");
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let file = File::create(path).map_err(|e| io(path, e))?;
    let mut out = std::io::BufWriter::new(file);
    let mut put = |b: &[u8]| std::io::Write::write_all(&mut out, b).map_err(|e| io(path, e));
    put(&(text.len() as u64).to_le_bytes())?;
    put(text.as_bytes())?;
    for (_, _, _, data) in tensors {
        put(data)?;
    }
    std::io::Write::flush(&mut out).map_err(|e| io(path, e))
}

/// A checkpoint directory: `config.json` plus `model.safetensors`, or shards
/// listed in `model.safetensors.index.json`.
///
/// Routed experts may be stored per expert, as published checkpoints do
/// (`mlp.experts.{e}.{gate,up,down}_proj.weight`), or fused, as recent
/// `transformers` versions hold them (`mlp.experts.gate_up_proj` of shape
/// `[experts, 2 * moe_intermediate, hidden]` with the gate rows first, and
/// `mlp.experts.down_proj` of shape `[experts, hidden, moe_intermediate]`).
/// Fused tensors are served under the per-expert names.
pub struct Checkpoint {
    /// The model's configuration.
    pub config: ModelConfig,
    files: Vec<SafeTensors>,
    location: HashMap<String, usize>,
    parts: HashMap<String, Part>,
}

/// A per-expert matrix inside a fused `[experts, rows, cols]` tensor.
#[derive(Clone, Debug)]
struct Part {
    source: String,
    start: usize,
    shape: Vec<usize>,
}

/// Per-expert names for the fused expert tensors among `tensors`.
fn fused_parts<'a>(
    tensors: impl Iterator<Item = &'a TensorInfo>,
    path: &str,
) -> Result<HashMap<String, Part>, LoadError> {
    let mut parts = HashMap::new();
    for t in tensors {
        let (prefix, kinds): (&str, &[(&str, usize)]) =
            if let Some(p) = t.name.strip_suffix("gate_up_proj") {
                (p, &[("gate_proj", 0), ("up_proj", 1)])
            } else if let Some(p) = t.name.strip_suffix("down_proj") {
                (p, &[("down_proj", 0)])
            } else {
                continue;
            };
        if !prefix.ends_with(".mlp.experts.") {
            continue;
        }
        let bad = |reason: &str| LoadError::BadTensor {
            path: path.into(),
            tensor: t.name.clone(),
            reason: reason.into(),
        };
        let &[experts, rows, cols] = t.shape.as_slice() else {
            return Err(bad("a fused expert tensor must be [experts, rows, cols]"));
        };
        let rows_each = rows / kinds.len();
        if rows_each * kinds.len() != rows {
            return Err(bad("fused gate_up rows must be even"));
        }
        for e in 0..experts {
            for &(kind, k) in kinds {
                let part = Part {
                    source: t.name.clone(),
                    start: (e * rows + k * rows_each) * cols,
                    shape: vec![rows_each, cols],
                };
                parts.insert(format!("{prefix}{e}.{kind}.weight"), part);
            }
        }
    }
    Ok(parts)
}

impl Checkpoint {
    /// Opens a directory and checks every file's header (not yet the tensor set; see [`Self::validate`]).
    pub fn open(dir: &Path) -> Result<Checkpoint, LoadError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
        let config = ModelConfig::from_json(&text)?;
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| io(&index, e))?;
            let bad = |reason: &str| LoadError::BadHeader {
                path: index.display().to_string(),
                reason: reason.into(),
            };
            let v: Value = serde_json::from_str(&text).map_err(|_| bad("not valid JSON"))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| bad("no weight_map"))?;
            let mut files: Vec<String> = map
                .values()
                .map(|f| f.as_str().map(String::from))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("weight_map values must be file names"))?;
            files.sort();
            files.dedup();
            if files
                .iter()
                .any(|f| f.contains('/') || f.contains('\\') || f.starts_with('.'))
            {
                return Err(bad("shard names must be plain file names"));
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut files = Vec::new();
        let mut location = HashMap::new();
        for path in names {
            let f = SafeTensors::open(&path)?;
            for name in f.tensors().keys() {
                if location.insert(name.clone(), files.len()).is_some() {
                    return Err(LoadError::BadHeader {
                        path: path.display().to_string(),
                        reason: format!("tensor '{name}' appears in two shards"),
                    });
                }
            }
            files.push(f);
        }
        let mut parts = HashMap::new();
        for f in &files {
            parts.extend(fused_parts(f.tensors().values(), f.path())?);
        }
        Ok(Checkpoint {
            config,
            files,
            location,
            parts,
        })
    }

    /// Checks that exactly the tensors the configuration implies are present,
    /// with its shapes and a supported dtype.
    pub fn validate(&self) -> Result<(), LoadError> {
        self.validate_against(&self.config.stored_tensors())
    }

    /// Checks that exactly the tensors in `expected` are present, with those
    /// shapes and a supported dtype (for files whose tensor set the model
    /// configuration alone does not give, such as a DFlash draft's).
    pub fn validate_against(&self, expected: &[(String, Vec<usize>)]) -> Result<(), LoadError> {
        let names: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        for (name, shape) in expected {
            let t = self
                .info(name)
                .ok_or_else(|| LoadError::MissingTensor(name.clone()))?;
            if &t.shape != shape {
                return Err(LoadError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.shape.clone(),
                });
            }
            let fp4 = self.config.moe.as_ref().is_some_and(|m| m.fp4.is_some())
                && name.contains(".mlp.experts.");
            let ok = match TensorDtype::parse(&t.dtype) {
                Some(TensorDtype::U8) => fp4 && !name.ends_with("_scale_2"),
                Some(TensorDtype::F32) if fp4 => name.ends_with("_scale_2"),
                Some(_) => !fp4,
                None => false,
            };
            if !ok {
                return Err(LoadError::Dtype {
                    name: name.clone(),
                    dtype: t.dtype.clone(),
                });
            }
        }
        let sources: std::collections::HashSet<&str> =
            self.parts.values().map(|p| p.source.as_str()).collect();
        let mut extra: Vec<&String> = self
            .location
            .keys()
            .filter(|n| !names.contains(n.as_str()) && !sources.contains(n.as_str()))
            .collect();
        extra.sort();
        match extra.first() {
            Some(n) => Err(LoadError::UnexpectedTensor((*n).clone())),
            None => Ok(()),
        }
    }

    /// A tensor's entry (for a fused expert tensor's part: its place inside it).
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        if let Some(t) = self
            .location
            .get(name)
            .and_then(|&i| self.files[i].tensors().get(name))
        {
            return Some(t.clone());
        }
        let part = self.parts.get(name)?;
        let src = self.info(&part.source)?;
        let size = element_size(&src.dtype)?;
        let numel: usize = part.shape.iter().product();
        Some(TensorInfo {
            name: name.into(),
            dtype: src.dtype,
            shape: part.shape.clone(),
            offset: src.offset + part.start * size,
            len: numel * size,
        })
    }

    /// The raw bytes of a `U8` tensor (FP4 codes or scales).
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>, LoadError> {
        let &i = self
            .location
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        Ok(self.files[i].read_bytes(name)?.to_vec())
    }

    /// A tensor converted to f32.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        if let Some(&i) = self.location.get(name) {
            return self.files[i].read_f32(name);
        }
        let part = self
            .parts
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        let &i = self
            .location
            .get(&part.source)
            .ok_or_else(|| LoadError::MissingTensor(part.source.clone()))?;
        self.files[i].read_f32_range(&part.source, part.start, part.shape.iter().product())
    }

    /// Number of files.
    pub fn num_files(&self) -> usize {
        self.files.len()
    }
}
