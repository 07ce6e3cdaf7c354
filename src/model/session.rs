//! A Qwen3 or Qwen3-MoE model as decode-step task programs: a [`Model`]
//! holds the weights, each [`Session`] its own KV cache and programs.
//!
//! One program iteration is one decode step for one token: embedding lookup,
//! every layer (RMSNorm, fused q/k/v projection, per-head norm + RoPE + KV
//! append, split-sequence attention, output projection added into the
//! residual, RMSNorm, gate and up projections, SwiGLU, down projection added
//! into the residual), the final norm, the LM head, a greedy argmax across all
//! workers, and the step's bookkeeping (the chosen token becomes the next input
//! and is emitted to the host). `n` tokens are one command of `n` iterations.
//! Activations are bf16 like the reference implementation's; matrix products
//! accumulate in f32.

use crate::buffer::{BufSlice, Buffer, DType};
use crate::cluster::shard::{HeadRange, Shard};
use crate::cluster::RankComm;
use crate::error::{Error, Result};
use crate::exec::{Executor, ExecutorExt, LoadedProgram};
use crate::program::trace::Trace;
use crate::program::{ops, EventId, ProgramBuilder};
use crate::quant::{self, Fp4Format};
use crate::task::advance::Advance;
use crate::task::argmax::Argmax;
use crate::task::attention::takes_rope_table;
use crate::task::copy::Copy;
use crate::task::emit::Emit;
use crate::task::fill_random::FillRandom;
use crate::task::gemv_bf16::{prologue_fits, GemvShape, Prologue};
use crate::task::gemv_expert::GemvExpert;
use crate::task::gemv_expert_fp4::{Fp4Experts, GemvExpertFp4};
use crate::task::moe_combine::MoeCombine;
use crate::task::moe_route::MoeRoute;
use crate::task::rope_kv::{rope_table, HeadShape};
use crate::task::sample::{Sample, Sampling};
use crate::task::split_even;

use super::checkpoint;
use super::config::ModelConfig;
use super::safetensors::Checkpoint;

/// Stacked routed-expert matrices of one kind (gate, up or down).
enum ExpertMats {
    Bf16(Buffer),
    Fp4(Fp4Experts),
}

enum Mlp {
    Dense {
        gate: Buffer,
        up: Buffer,
        down: Buffer,
    },
    /// Router `[experts, hidden]` and the experts' matrices stacked per kind.
    Moe {
        router: Buffer,
        gate: ExpertMats,
        up: ExpertMats,
        down: ExpertMats,
    },
}

/// The norms and attention weights of one decoder layer (a target's or a
/// draft's).
pub(crate) struct AttnWeights {
    pub in_norm: Buffer,
    /// `q_proj`, `k_proj`, `v_proj` stacked.
    pub qkv: Buffer,
    /// `q_norm`, `k_norm`.
    pub qk_norms: Buffer,
    pub o: Buffer,
    pub post_norm: Buffer,
}

struct Layer {
    attn: AttnWeights,
    mlp: Mlp,
    /// The rope table of the layer's q and k norms ([`rope_table`]), for
    /// attention tasks that do the rope work themselves.
    rope: Buffer,
}

/// The rope table of a layer whose `q_norm` and `k_norm` weights are
/// `qk_norms` (read back once, after the loader filled them).
pub(crate) fn layer_rope(ex: &dyn Executor, qk_norms: &Buffer, c: &ModelConfig) -> Result<Buffer> {
    let n = ex.read_f32(qk_norms)?;
    let hd = n.len() / 2;
    let t = rope_table(
        &n[..hd],
        &n[hd..2 * hd],
        c.rms_norm_eps as f32,
        c.rope_theta as f32,
    );
    let b = ex.alloc(DType::F32, t.len())?;
    ex.write_f32(&b, &t)?;
    Ok(b)
}

/// Rows of the prefill program: prompts go through in chunks of this many tokens.
pub const PREFILL_CHUNK: usize = 16;

/// A model's weights loaded on one executor; sessions share them.
pub struct Model {
    config: ModelConfig,
    weights: std::sync::Arc<Weights>,
    owner: u64,
}

/// One sequence on a [`Model`]: its own KV cache, position and decode programs.
pub struct Session {
    config: ModelConfig,
    max_seq: usize,
    pos: usize,
    /// Input id of the one-token step (the chosen token lands here too).
    step_ids: Buffer,
    /// Input ids of the prefill chunk.
    chunk_ids: Buffer,
    pos_buf: Buffer,
    logits: Buffer,
    step: LoadedProgram,
    chunk: LoadedProgram,
    /// The one-token step drawing with [`Sampling`] settings from `sampling`.
    step_sampled: LoadedProgram,
    sampling: Buffer,
    /// Per-layer KV caches of `cache_len` positions.
    caches: Vec<Buffer>,
    cache_len: usize,
    token: Buffer,
    /// Routing tallies of every program (see [`ExpertUse`]).
    tally: Buffer,
}

/// Extra work a target program does for speculative decoding.
pub(crate) struct Extras<'a> {
    /// After each listed layer its output rows are copied into the buffer,
    /// laid out `[m][layers.len() * hidden]`.
    pub capture: Option<(&'a [usize], &'a Buffer)>,
    /// The LM head runs on every row and the greedy token after each row
    /// lands in this `u32 [m]` buffer (instead of the last row's alone).
    pub row_tokens: Option<&'a Buffer>,
    /// Pushes tasks that run before the forward pass (a draft block) and
    /// returns the event the first stage waits on.
    pub head: Option<&'a Head<'a>>,
    /// Appends tasks after the token stage (whose event it gets) and returns
    /// the event they end on.
    pub tail: Option<&'a Tail<'a>>,
    /// End with the usual step bookkeeping (advance and emit); off when the
    /// tail ends the iteration itself.
    pub advance: bool,
}

/// Tasks pushed before a program's forward pass.
pub(crate) type Head<'a> = dyn Fn(&mut ProgramBuilder) -> Result<EventId> + 'a;

/// Tasks appended to a program of `m` rows after its token stage (given the
/// session's `u32` position buffer).
pub(crate) type Tail<'a> =
    dyn Fn(&mut ProgramBuilder, EventId, usize, &Buffer) -> Result<EventId> + 'a;

impl Extras<'_> {
    /// A plain program: no capture, last row's token, advance and emit.
    pub(crate) const PLAIN: Extras<'static> = Extras {
        capture: None,
        row_tokens: None,
        head: None,
        tail: None,
        advance: true,
    };
}

/// Speculative decoding's needs from every program of a session.
pub(crate) struct Hook<'a> {
    /// Positions the KV cache holds beyond the context (a verify block may
    /// run past the end before acceptance clips it).
    pub slack: usize,
    /// Capture of hidden states, as in [`Extras::capture`].
    pub capture: (&'a [usize], &'a Buffer),
    /// Tasks after each program's token stage.
    pub tail: &'a Tail<'a>,
}

struct Weights {
    embed: Buffer,
    /// The LM head's rows of this shard's vocabulary slice.
    lm_head: Buffer,
    final_norm: Buffer,
    layers: Vec<Layer>,
    /// The part of the model these weights are.
    shard: Shard,
    /// The attention heads they hold.
    heads: HeadRange,
    /// Their share of the routed experts' intermediate size
    /// ([`Shard::expert_range`]; 0 without routed experts).
    moe_inter: usize,
}

/// Buffers both programs share.
struct Shared {
    pos: Buffer,
    token: Buffer,
    step_ids: Buffer,
    logits: Buffer,
    /// Routing tallies, `u32 [layers][MAX_ROWS][2]` (see [`ExpertUse`]).
    tally: Buffer,
}

/// Most rows a program of a session takes at once (its tallies' rows).
const MAX_ROWS: usize = 16;

/// Unique experts the routing of each MoE layer chose in blocks of `rows`
/// rows, over every such block a session ran since the last
/// [`Session::reset_expert_use`]: each chosen expert's weights are read once
/// per block, so this is what a block streams.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertUse {
    /// Rows of the blocks (1: decode steps; 16: prefill chunks and 16-row
    /// verify blocks).
    pub rows: usize,
    /// Blocks counted (per layer).
    pub blocks: u64,
    /// (layer, mean unique experts per block) of each MoE layer, in order.
    pub per_layer: Vec<(usize, f64)>,
}

impl ExpertUse {
    /// Mean over the MoE layers of the unique experts per block.
    pub fn mean(&self) -> f64 {
        let n = self.per_layer.len().max(1) as f64;
        self.per_layer.iter().map(|&(_, v)| v).sum::<f64>() / n
    }
}

/// Where a decoder's tensors come from.
pub enum WeightSource<'a> {
    /// A checkpoint on disk (validated first).
    Checkpoint(&'a Checkpoint),
    /// Random weights generated straight into device memory, the same values
    /// [`write_random`](super::checkpoint::write_random) writes for this seed.
    Random {
        /// The model's shape.
        config: &'a ModelConfig,
        /// The seed.
        seed: u64,
    },
}

impl WeightSource<'_> {
    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        match self {
            WeightSource::Checkpoint(ck) => &ck.config,
            WeightSource::Random { config, .. } => config,
        }
    }
}

/// Most rows whose RMSNorm is fused into the following product.
pub(crate) const MAX_FUSED_NORM_ROWS: usize = 2;

/// Elements per `fill_random` task.
const FILL_CHUNK: usize = 1 << 22;

/// The FP4 format a checkpoint's experts are stored in, if any.
fn src_stored(src: &WeightSource<'_>) -> Option<Fp4Format> {
    src.config().moe.as_ref().and_then(|m| m.fp4)
}

/// An FP4 expert matrix stored in a checkpoint (`NAME_blocks`, `NAME_scales`,
/// for NVFP4 `NAME_scale_2`).
fn read_fp4(ck: &Checkpoint, name: &str, format: Fp4Format) -> Result<quant::Fp4Tensor> {
    let tensor_scale = match format {
        Fp4Format::Nvfp4 => ck.read_f32(&format!("{name}_scale_2"))?[0],
        Fp4Format::Mxfp4 => 1.0,
    };
    Ok(quant::Fp4Tensor {
        format,
        codes: ck.read_bytes(&format!("{name}_blocks"))?,
        scales: ck.read_bytes(&format!("{name}_scales"))?,
        tensor_scale,
    })
}

/// Puts tensors into executor buffers: uploads a checkpoint's, or queues
/// `fill_random` tasks that draw random weights on the executor itself (run
/// by [`flush`](Loader::flush)), so large random models never pass through the
/// host.
pub(crate) struct Loader<'a> {
    ex: &'a dyn Executor,
    src: &'a WeightSource<'a>,
    shapes: std::collections::HashMap<String, Vec<usize>>,
    fills: ProgramBuilder,
    experts: Option<Fp4Format>,
    /// The attention heads this loader keeps (all when `None`).
    heads: Option<HeadRange>,
}

/// The part of a 2-D `[rows, cols]` tensor a rank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    All,
    /// Rows `a..b`.
    Rows(usize, usize),
    /// Columns `a..b` of every row.
    Cols(usize, usize),
}

impl Part {
    /// The part's `[rows, cols]` within a tensor of `dims`.
    fn dims(self, dims: &[usize]) -> (usize, usize) {
        let rows = dims.first().copied().unwrap_or(1);
        let cols: usize = dims.iter().skip(1).product();
        match self {
            Part::All => (rows, cols),
            Part::Rows(a, b) => (b - a, cols),
            Part::Cols(a, b) => (rows, b - a),
        }
    }

    /// The part of row-major `data` shaped `dims`.
    fn take(self, dims: &[usize], data: Vec<f32>) -> Vec<f32> {
        let cols: usize = dims.iter().skip(1).product();
        match self {
            Part::All => data,
            Part::Rows(a, b) => data[a * cols..b * cols].to_vec(),
            Part::Cols(a, b) => data.chunks(cols).flat_map(|r| &r[a..b]).copied().collect(),
        }
    }

    /// The part of an FP4 tensor shaped `[rows, cols]` (column cuts on block bounds).
    fn take_fp4(self, rows: usize, cols: usize, t: quant::Fp4Tensor) -> quant::Fp4Tensor {
        let block = t.format.block();
        let (code_row, scale_row) = (cols / 2, cols / block);
        let cut = |v: &[u8], per_row: usize, unit: usize| -> Vec<u8> {
            match self {
                Part::All => v.to_vec(),
                Part::Rows(a, b) => v[a * per_row..b * per_row].to_vec(),
                Part::Cols(a, b) => (0..rows)
                    .flat_map(|r| &v[r * per_row + a / unit..r * per_row + b / unit])
                    .copied()
                    .collect(),
            }
        };
        quant::Fp4Tensor {
            format: t.format,
            codes: cut(&t.codes, code_row, 2),
            scales: cut(&t.scales, scale_row, block),
            tensor_scale: t.tensor_scale,
        }
    }
}

impl<'a> Loader<'a> {
    /// A loader of tensors named as in `shapes` (their shapes, for random weights).
    pub(crate) fn with_shapes(
        ex: &'a dyn Executor,
        src: &'a WeightSource<'a>,
        shapes: Vec<(String, Vec<usize>)>,
    ) -> Self {
        Loader {
            ex,
            src,
            shapes: shapes.into_iter().collect(),
            fills: ProgramBuilder::new(),
            experts: None,
            heads: None,
        }
    }

    fn new(
        ex: &'a dyn Executor,
        src: &'a WeightSource<'a>,
        experts: Option<Fp4Format>,
        heads: Option<HeadRange>,
    ) -> Self {
        Loader {
            ex,
            src,
            shapes: src.config().tensors().into_iter().collect(),
            fills: ProgramBuilder::new(),
            experts,
            heads,
        }
    }

    fn dims(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self
            .shapes
            .get(name)
            .ok_or_else(|| crate::error::LoadError::MissingTensor(name.to_string()))?
            .clone())
    }

    /// One kind of routed-expert matrix (`[rows, cols]` each): bf16, or
    /// quantized on the host to the chosen FP4 format (experts in parallel).
    /// `part` of each expert's `[rows, cols]` matrix.
    fn experts(
        &mut self,
        names: &[String],
        rows: usize,
        cols: usize,
        part: Part,
    ) -> Result<ExpertMats> {
        let Some(format) = self.experts else {
            let parts: Vec<_> = names.iter().map(|n| (n.clone(), part)).collect();
            return Ok(ExpertMats::Bf16(self.tensor_parts(&parts)?));
        };
        let full = [rows, cols];
        let (prows, pcols) = part.dims(&full);
        if let (Fp4Format::Mxfp4, None, WeightSource::Random { config, seed }) =
            (format, src_stored(self.src), self.src)
        {
            if (prows * pcols) % 128 == 0 && pcols % 32 == 0 {
                return self.random_mxfp4(names, &full, part, config, *seed);
            }
        }
        let src = self.src;
        let stored = src.config().moe.as_ref().and_then(|m| m.fp4);
        // One expert's matrix in FP4: read as stored, or drawn / read as
        // floats and quantized.
        let one = |name: &String| -> Result<quant::Fp4Tensor> {
            if let (Some(f), WeightSource::Checkpoint(ck)) = (stored, src) {
                return Ok(part.take_fp4(rows, cols, read_fp4(ck, name, f)?));
            }
            let values = match src {
                WeightSource::Checkpoint(ck) => ck.read_f32(name)?,
                WeightSource::Random { config, seed } => {
                    checkpoint::tensor_values_serial(config, *seed, name, &full)
                }
            };
            quant::quantize(format, &part.take(&full, values))
                .map_err(|e| Error::InvalidArgument(format!("{name}: {e}")))
        };
        // Experts are alike in size: contiguous runs of them per thread.
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let per = names.len().div_ceil(threads).max(1);
        let tensors = std::thread::scope(|s| {
            let runs: Vec<_> = names
                .chunks(per)
                .map(|run| s.spawn(|| run.iter().map(one).collect::<Result<Vec<_>>>()))
                .collect();
            runs.into_iter()
                .map(|h| h.join().expect("quantizer thread panicked"))
                .collect::<Result<Vec<_>>>()
        })?
        .concat();
        Ok(ExpertMats::Fp4(Fp4Experts::upload_quantized(
            self.ex, format, prows, pcols, &tensors,
        )?))
    }

    /// Random MXFP4 experts drawn and quantized on the executor (queued
    /// fills; the same bits as quantizing the host's values).
    fn random_mxfp4(
        &mut self,
        names: &[String],
        full: &[usize; 2],
        part: Part,
        config: &ModelConfig,
        seed: u64,
    ) -> Result<ExpertMats> {
        use crate::task::fill_random_fp4::{FillRandomFp4, RandomPart};
        const CHUNK_BLOCKS: usize = 1 << 15;
        let (prows, pcols) = part.dims(full);
        let origin = match part {
            Part::All => (0, 0),
            Part::Rows(a, _) => (a, 0),
            Part::Cols(a, _) => (0, a),
        };
        let format = Fp4Format::Mxfp4;
        let stride = crate::task::gemv_expert_fp4::scale_stride(format, prows, pcols);
        let blocks = prows * pcols / 32;
        let codes = self.ex.alloc(DType::U32, names.len() * blocks * 4)?;
        let scales = self.ex.alloc(DType::U32, names.len() * stride / 4)?;
        for (e, name) in names.iter().enumerate() {
            let (std, mean) = checkpoint::tensor_init(config, name, full);
            let rp = RandomPart {
                key: checkpoint::tensor_key(seed, name),
                std,
                mean,
                full_cols: full[1],
                origin,
                part_cols: pcols,
            };
            for first in (0..blocks).step_by(CHUNK_BLOCKS) {
                let nb = CHUNK_BLOCKS.min(blocks - first);
                let c0 = e * blocks * 4 + first * 4;
                let s0 = e * stride / 4 + first / 4;
                self.fills.push(FillRandomFp4::task(
                    &codes.slice(c0..c0 + nb * 4)?,
                    &scales.slice(s0..s0 + nb / 4)?,
                    &rp,
                    first,
                    nb,
                )?);
            }
        }
        Ok(ExpertMats::Fp4(Fp4Experts {
            format,
            codes,
            scales,
            experts: names.len(),
            rows: prows,
            cols: pcols,
        }))
    }

    /// The norms and attention weights of the decoder layer whose tensor
    /// names start with `prefix`.
    /// (Of the loader's heads only, when it keeps a part of them.)
    pub(crate) fn attention(&mut self, prefix: &str) -> Result<AttnWeights> {
        let p = |s: &str| format!("{prefix}{s}");
        let (q, kv, o) = match self.heads {
            None => (Part::All, Part::All, Part::All),
            Some(h) => {
                let hd = self.dims(&p("self_attn.q_norm.weight"))?[0];
                let (q0, q1) = (h.q0 * hd, (h.q0 + h.heads) * hd);
                let kv = Part::Rows(h.kv0 * hd, (h.kv0 + h.kv_heads) * hd);
                (Part::Rows(q0, q1), kv, Part::Cols(q0, q1))
            }
        };
        Ok(AttnWeights {
            in_norm: self.tensor(&[p("input_layernorm.weight")])?,
            qkv: self.tensor_parts(&[
                (p("self_attn.q_proj.weight"), q),
                (p("self_attn.k_proj.weight"), kv),
                (p("self_attn.v_proj.weight"), kv),
            ])?,
            qk_norms: self.tensor(&[p("self_attn.q_norm.weight"), p("self_attn.k_norm.weight")])?,
            o: self.tensor_parts(&[(p("self_attn.o_proj.weight"), o)])?,
            post_norm: self.tensor(&[p("post_attention_layernorm.weight")])?,
        })
    }

    /// One bf16 buffer holding `names` back to back.
    pub(crate) fn tensor(&mut self, names: &[String]) -> Result<Buffer> {
        let parts: Vec<_> = names.iter().map(|n| (n.clone(), Part::All)).collect();
        self.tensor_parts(&parts)
    }

    /// One bf16 buffer holding the given parts of tensors back to back.
    pub(crate) fn tensor_parts(&mut self, parts: &[(String, Part)]) -> Result<Buffer> {
        let mut total = 0;
        for (n, part) in parts {
            let (r, c) = part.dims(&self.dims(n)?);
            total += r * c;
        }
        let buf = self.ex.alloc(DType::Bf16, total)?;
        match self.src {
            WeightSource::Checkpoint(ck) => {
                let mut data = Vec::with_capacity(total);
                for (n, part) in parts {
                    data.extend(part.take(&self.dims(n)?, ck.read_f32(n)?));
                }
                self.ex.write_f32(&buf, &data)?;
            }
            WeightSource::Random { config, seed } => {
                let mut off = 0;
                for (n, part) in parts {
                    let dims = self.dims(n)?;
                    let (std, mean) = checkpoint::tensor_init(config, n, &dims);
                    let key = checkpoint::tensor_key(*seed, n);
                    let (rows, cols) = part.dims(&dims);
                    let stride: usize = dims.iter().skip(1).product();
                    let len = rows * cols;
                    match *part {
                        Part::Cols(a, _) => {
                            let per = (FILL_CHUNK / cols).max(1);
                            for r0 in (0..rows).step_by(per) {
                                let r1 = (r0 + per).min(rows);
                                let dst = buf.slice(off + r0 * cols..off + r1 * cols)?;
                                let first = (r0 * stride + a) as u64;
                                self.fills.push(FillRandom::strided(
                                    &dst, key, first, cols, stride, std, mean,
                                )?);
                            }
                        }
                        Part::All | Part::Rows(..) => {
                            let base = match *part {
                                Part::Rows(a, _) => a * stride,
                                _ => 0,
                            };
                            for start in (0..len).step_by(FILL_CHUNK) {
                                let end = (start + FILL_CHUNK).min(len);
                                let dst = buf.slice(off + start..off + end)?;
                                let first = (base + start) as u64;
                                self.fills
                                    .push(FillRandom::task(&dst, key, first, std, mean)?);
                            }
                        }
                    }
                    off += len;
                }
            }
        }
        Ok(buf)
    }

    /// Runs the queued fills.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.fills.is_empty() {
            return Ok(());
        }
        let program = std::mem::take(&mut self.fills).build()?;
        let loaded = self.ex.load(&program)?;
        self.ex.run(&loaded, 1, &[])
    }
}

/// Events of one stage feed the next.
struct Chain<'a> {
    b: &'a mut ProgramBuilder,
    prev: Option<EventId>,
    /// Tasks that join the next stage (they need what the previous stage made).
    join: Vec<crate::program::TaskId>,
}

impl Chain<'_> {
    /// Makes `group` wait on the previous stage and become the previous stage.
    fn stage(&mut self, mut group: ops::Group, name: &str) {
        group.0.append(&mut self.join);
        if let Some(p) = self.prev {
            group.wait(self.b, p);
        }
        let ev = self.b.event(name);
        group.signal(self.b, ev);
        self.prev = Some(ev);
    }
}

impl Model {
    /// Uploads a validated checkpoint.
    pub fn load(ex: &dyn Executor, ck: &Checkpoint) -> Result<Model> {
        Self::load_with(ex, ck, None)
    }

    /// Uploads a validated checkpoint with the routed experts quantized to
    /// `experts` (attention, router, norms, embeddings and LM head stay bf16).
    pub fn load_with(
        ex: &dyn Executor,
        ck: &Checkpoint,
        experts: Option<Fp4Format>,
    ) -> Result<Model> {
        ck.validate()?;
        Self::from_source(ex, &WeightSource::Checkpoint(ck), experts)
    }

    /// Random weights generated straight into the executor's memory (no files):
    /// the same values a checkpoint written with `seed` holds.
    pub fn random(ex: &dyn Executor, config: &ModelConfig, seed: u64) -> Result<Model> {
        Self::random_with(ex, config, seed, None)
    }

    /// [`random`](Self::random) with the routed experts quantized to
    /// `experts` (drawn and quantized on the host, experts in parallel).
    pub fn random_with(
        ex: &dyn Executor,
        config: &ModelConfig,
        seed: u64,
        experts: Option<Fp4Format>,
    ) -> Result<Model> {
        config.validate()?;
        Self::from_source(ex, &WeightSource::Random { config, seed }, experts)
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Loads weights from `src`.
    pub fn from_source(
        ex: &dyn Executor,
        src: &WeightSource<'_>,
        experts: Option<Fp4Format>,
    ) -> Result<Model> {
        Self::from_source_sharded(ex, src, experts, Shard::WHOLE)
    }

    /// Loads `shard`'s part of the weights from `src` (see [`crate::cluster::shard`]).
    pub(crate) fn from_source_sharded(
        ex: &dyn Executor,
        src: &WeightSource<'_>,
        experts: Option<Fp4Format>,
        shard: Shard,
    ) -> Result<Model> {
        let c = src.config().clone();
        let stored = c.moe.as_ref().and_then(|m| m.fp4);
        let experts = match (stored, experts) {
            (Some(f), Some(g)) if f != g => {
                return Err(Error::InvalidArgument(format!(
                    "the checkpoint's experts are {}; they cannot be loaded as {}",
                    f.name(),
                    g.name()
                )))
            }
            (s, e) => s.or(e),
        };
        Shard::check(shard.ranks, &c, experts)?;
        // This rank's share of the routed experts' intermediate size.
        let (e0, e1) = c.moe.as_ref().map_or((0, 0), |m| {
            shard.expert_range(m.moe_intermediate_size, experts.is_some())
        });
        let heads = shard.heads(&c);
        let whole = shard == Shard::WHOLE;
        let mut ld = Loader::new(ex, src, experts, (!whole).then_some(heads));
        let one = |n: &str| vec![n.to_string()];
        let embed = ld.tensor(&one("model.embed_tokens.weight"))?;
        let head_name = if c.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let (v0, v1) = shard.range(c.vocab_size);
        let lm_head = if whole && c.tie_word_embeddings {
            embed.clone()
        } else {
            ld.tensor_parts(&[(head_name.to_string(), Part::Rows(v0, v1))])?
        };
        let final_norm = ld.tensor(&one("model.norm.weight"))?;
        ld.flush()?;
        // A progress bar for loads of more than 1 GB (it draws only on a terminal).
        let bar = if c.num_params() * 2 > 1 << 30 {
            indicatif::ProgressBar::new(c.num_layers as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "loading layers {bar:40} {pos}/{len} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let mut layers = Vec::new();
        for l in 0..c.num_layers {
            bar.inc(1);
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let attn = ld.attention(&format!("model.layers.{l}."))?;
            let mlp = match &c.moe {
                Some(m) if c.is_moe_layer(l) => {
                    let experts = |kind: &str| -> Vec<String> {
                        (0..m.num_experts)
                            .map(|e| p(&format!("mlp.experts.{e}.{kind}.weight")))
                            .collect()
                    };
                    let (h, i) = (c.hidden_size, m.moe_intermediate_size);
                    let (rows, cols) = (Part::Rows(e0, e1), Part::Cols(e0, e1));
                    Mlp::Moe {
                        router: ld.tensor(&[p("mlp.gate.weight")])?,
                        gate: ld.experts(&experts("gate_proj"), i, h, rows)?,
                        up: ld.experts(&experts("up_proj"), i, h, rows)?,
                        down: ld.experts(&experts("down_proj"), h, i, cols)?,
                    }
                }
                _ => {
                    let (i0, i1) = shard.range(c.intermediate_size);
                    let (rows, cols) = (Part::Rows(i0, i1), Part::Cols(i0, i1));
                    Mlp::Dense {
                        gate: ld.tensor_parts(&[(p("mlp.gate_proj.weight"), rows)])?,
                        up: ld.tensor_parts(&[(p("mlp.up_proj.weight"), rows)])?,
                        down: ld.tensor_parts(&[(p("mlp.down_proj.weight"), cols)])?,
                    }
                }
            };
            ld.flush()?;
            let rope = layer_rope(ex, &attn.qk_norms, &c)?;
            layers.push(Layer { attn, mlp, rope });
        }
        bar.finish_and_clear();
        let weights = Weights {
            embed,
            lm_head,
            final_norm,
            layers,
            shard,
            heads,
            moe_inter: e1 - e0,
        };
        Ok(Model {
            config: c,
            weights: std::sync::Arc::new(weights),
            owner: ex.id(),
        })
    }

    /// A new session with a context of `max_seq` positions: its KV cache and
    /// decode programs (one token per step, and chunks of [`PREFILL_CHUNK`]).
    pub fn session(&self, ex: &dyn Executor, max_seq: usize) -> Result<Session> {
        self.session_with(ex, max_seq, None)
    }

    /// [`session`](Self::session) whose programs also do `hook`'s work.
    pub(crate) fn session_with(
        &self,
        ex: &dyn Executor,
        max_seq: usize,
        hook: Option<&Hook<'_>>,
    ) -> Result<Session> {
        self.session_on(ex, max_seq, hook, None)
    }

    /// [`session_with`](Self::session_with) for one rank of a cluster
    /// (`tp`), whose programs meet the other ranks' at all-reduce sites.
    pub(crate) fn session_on(
        &self,
        ex: &dyn Executor,
        max_seq: usize,
        hook: Option<&Hook<'_>>,
        tp: Option<&RankComm<'_>>,
    ) -> Result<Session> {
        let c = &self.config;
        if ex.id() != self.owner {
            return Err(Error::Foreign("model"));
        }
        if max_seq == 0 || max_seq > c.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "max_seq {max_seq} must be in 1..={}",
                c.max_position_embeddings
            )));
        }
        let cache_len = max_seq + hook.map_or(0, |h| h.slack);
        let kv_heads = self.weights.heads.kv_heads;
        let caches = (0..c.num_layers)
            .map(|_| ex.alloc(DType::Bf16, 2 * kv_heads * cache_len * c.head_dim))
            .collect::<Result<Vec<_>>>()?;
        let shared = Shared {
            pos: ex.alloc(DType::U32, 1)?,
            token: ex.alloc(DType::U32, 1)?,
            step_ids: ex.alloc(DType::U32, 1)?,
            logits: ex.alloc(DType::F32, c.vocab_size)?,
            tally: ex.alloc(DType::U32, c.num_layers * MAX_ROWS * 2)?,
        };
        ex.write_u32(&shared.tally, &vec![0; c.num_layers * MAX_ROWS * 2])?;
        let chunk_ids = ex.alloc(DType::U32, PREFILL_CHUNK)?;
        let extras = match hook {
            Some(h) => Extras {
                capture: Some(h.capture),
                row_tokens: None,
                head: None,
                tail: Some(h.tail),
                advance: true,
            },
            None => Extras::PLAIN,
        };
        let w = &self.weights;
        let ids = &shared.step_ids;
        let spec = |ids, m, sampling| Spec {
            ids,
            m,
            cache_len,
            sampling,
            extras: &extras,
            tp,
        };
        let step = build(ex, c, w, &caches, &shared, &spec(ids, 1, None))?;
        let sampling = ex.alloc(DType::U32, 5)?;
        let step_sampled = build(ex, c, w, &caches, &shared, &spec(ids, 1, Some(&sampling)))?;
        let chunk = build(
            ex,
            c,
            w,
            &caches,
            &shared,
            &spec(&chunk_ids, PREFILL_CHUNK, None),
        )?;
        Ok(Session {
            config: c.clone(),
            max_seq,
            pos: 0,
            step_ids: shared.step_ids,
            chunk_ids,
            pos_buf: shared.pos,
            logits: shared.logits,
            step,
            chunk,
            step_sampled,
            sampling,
            caches,
            cache_len,
            token: shared.token,
            tally: shared.tally,
        })
    }

    /// A program of `m` rows over `session`'s KV cache reading its inputs
    /// from `ids`, doing `extras`' work.
    /// (`tp`: this rank's collectives when the model is a cluster rank's shard.)
    pub(crate) fn program(
        &self,
        ex: &dyn Executor,
        session: &Session,
        ids: &Buffer,
        m: usize,
        extras: &Extras<'_>,
        tp: Option<&RankComm<'_>>,
    ) -> Result<LoadedProgram> {
        let shared = Shared {
            pos: session.pos_buf.clone(),
            token: session.token.clone(),
            step_ids: session.step_ids.clone(),
            logits: session.logits.clone(),
            tally: session.tally.clone(),
        };
        let spec = Spec {
            ids,
            m,
            cache_len: session.cache_len,
            sampling: None,
            extras,
            tp,
        };
        build(
            ex,
            &self.config,
            &self.weights,
            &session.caches,
            &shared,
            &spec,
        )
    }

    /// The part of the model these weights are.
    pub(crate) fn shard(&self) -> Shard {
        self.weights.shard
    }

    /// The embedding matrix and the LM head (this shard's vocabulary rows).
    pub(crate) fn embed_and_head(&self) -> (&Buffer, &Buffer) {
        (&self.weights.embed, &self.weights.lm_head)
    }

    /// Id of the executor holding the weights.
    pub(crate) fn owner(&self) -> u64 {
        self.owner
    }
}

impl Session {
    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Positions the context holds.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// The device position and the one-token step's input (the last token).
    pub(crate) fn position_and_input(&self) -> (&Buffer, &Buffer) {
        (&self.pos_buf, &self.step_ids)
    }

    /// Records positions the device consumed on its own.
    pub(crate) fn advanced(&mut self, n: usize) {
        self.pos += n;
    }

    /// Positions used so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Unique experts chosen per MoE layer, for each block size that ran
    /// (ascending rows); empty for a dense model.
    pub fn expert_use(&self, ex: &dyn Executor) -> Result<Vec<ExpertUse>> {
        let t = ex.read_u32(&self.tally)?;
        let moe_layers: Vec<usize> = (0..self.config.num_layers)
            .filter(|&l| self.config.is_moe_layer(l))
            .collect();
        let mut out = Vec::new();
        let Some(&first) = moe_layers.first() else {
            return Ok(out);
        };
        for rows in 1..=MAX_ROWS {
            let at = |l: usize| (l * MAX_ROWS + rows - 1) * 2;
            let blocks = t[at(first) + 1];
            if blocks == 0 {
                continue;
            }
            let per_layer = moe_layers
                .iter()
                .map(|&l| (l, f64::from(t[at(l)]) / f64::from(t[at(l) + 1].max(1))))
                .collect();
            out.push(ExpertUse {
                rows,
                blocks: u64::from(blocks),
                per_layer,
            });
        }
        Ok(out)
    }

    /// Starts the counts of [`expert_use`](Self::expert_use) afresh.
    pub fn reset_expert_use(&self, ex: &dyn Executor) -> Result<()> {
        ex.write_u32(&self.tally, &vec![0; self.tally.len()])
    }

    /// Forgets every position from `len` on (the KV cache keeps its first
    /// `len` entries) and makes `next` the next step's input token.
    pub fn truncate(&mut self, ex: &dyn Executor, len: usize, next: u32) -> Result<()> {
        self.check(&[next], 0)?;
        if len > self.pos {
            return Err(Error::InvalidArgument(format!(
                "cannot truncate to {len}: only {} positions are used",
                self.pos
            )));
        }
        ex.write_u32(&self.pos_buf, &[len as u32])?;
        ex.write_u32(&self.step_ids, &[next])?;
        self.pos = len;
        Ok(())
    }

    /// Checks token ids and that `steps` more positions fit the context.
    pub(crate) fn check(&self, tokens: &[u32], steps: usize) -> Result<()> {
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::InvalidArgument(format!(
                "token id {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        if self.pos + steps > self.max_seq {
            return Err(Error::InvalidArgument(format!(
                "context overflow: {} positions used, {steps} more requested, the context holds {}",
                self.pos, self.max_seq
            )));
        }
        Ok(())
    }

    /// Feeds a prompt (in chunks of [`PREFILL_CHUNK`] tokens, the rest one at a
    /// time) and returns the model's next token.
    pub fn prefill(&mut self, ex: &dyn Executor, prompt: &[u32]) -> Result<u32> {
        self.check_prompt(prompt)?;
        let mut out = Vec::new();
        ex.poll_outputs(&mut out)?;
        // Whole chunks through the chunk program, the rest one token at a time.
        let mut rest = prompt;
        while !rest.is_empty() {
            let (program, n) = self.stage_prompt(ex, rest)?;
            ex.run(program, 1, &[])?;
            self.pos += n;
            rest = &rest[n..];
        }
        // One token per command; the last one is the answer.
        let commands = prompt_commands(prompt.len());
        out.clear();
        wait_outputs(ex, &mut out, commands, "tokens from the prompt")?;
        Ok(out[commands - 1] as u32)
    }

    /// Checks a prompt before [`stage_prompt`](Self::stage_prompt).
    pub(crate) fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        self.check(prompt, prompt.len())
    }

    /// Writes the next piece of a prompt (a whole chunk, or one token) at the
    /// current position; returns the program to run once and the tokens it takes.
    pub(crate) fn stage_prompt(
        &self,
        ex: &dyn Executor,
        rest: &[u32],
    ) -> Result<(&LoadedProgram, usize)> {
        let (ids, program, n) = if rest.len() >= PREFILL_CHUNK {
            (&self.chunk_ids, &self.chunk, PREFILL_CHUNK)
        } else {
            (&self.step_ids, &self.step, 1)
        };
        ex.write_u32(ids, &rest[..n])?;
        ex.write_u32(&self.pos_buf, &[self.pos as u32])?;
        Ok((program, n))
    }

    /// The one-token program for greedy steps, or for steps drawn with
    /// `sampling` (whose settings it writes).
    pub(crate) fn stage_generate(
        &self,
        ex: &dyn Executor,
        sampling: Option<&Sampling>,
    ) -> Result<&LoadedProgram> {
        match sampling {
            Some(s) => {
                s.validate()?;
                ex.write_u32(&self.sampling, &s.words())?;
                Ok(&self.step_sampled)
            }
            None => Ok(&self.step),
        }
    }

    /// Generates `n` more tokens greedily in one command (the input is the
    /// last token returned) and returns them.
    pub fn generate(&mut self, ex: &dyn Executor, n: usize) -> Result<Vec<u32>> {
        self.generate_streaming(ex, n, |_| {})
    }

    /// Like [`generate`](Self::generate), calling `on_token` for each token as
    /// the device produces it (the host polls the output ring while the one
    /// command runs).
    pub fn generate_streaming(
        &mut self,
        ex: &dyn Executor,
        n: usize,
        on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        self.generate_with(ex, n, None, on_token)
    }

    /// Generates `n` tokens in one command, each drawn with `sampling`
    /// (temperature, top-k, top-p, seed) on the device.
    pub fn generate_sampled(
        &mut self,
        ex: &dyn Executor,
        n: usize,
        sampling: &Sampling,
    ) -> Result<Vec<u32>> {
        self.generate_with(ex, n, Some(sampling), |_| {})
    }

    /// Generates `n` tokens in one command, greedily or with `sampling`,
    /// calling `on_token` for each as it arrives.
    pub fn generate_with(
        &mut self,
        ex: &dyn Executor,
        n: usize,
        sampling: Option<&Sampling>,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        self.check(&[], n)?;
        let program = self.stage_generate(ex, sampling)?;
        let mut out = Vec::new();
        ex.poll_outputs(&mut out)?;
        out.clear();
        let t = ex.submit(program, n as u32, &[])?;
        let deadline = std::time::Instant::now() + ex.default_timeout();
        let mut seen = 0;
        // Completion and the output ring are published separately: wait for both.
        while seen < n {
            let done = ex.is_done(&t)?;
            ex.poll_outputs(&mut out)?;
            for &tok in &out[seen..] {
                on_token(tok as u32);
            }
            seen = out.len();
            if std::time::Instant::now() > deadline {
                let what = format!("{n} tokens ({seen} arrived, command done: {done})");
                return Err(Error::HostTimeout {
                    waited: ex.default_timeout(),
                    what,
                });
            }
            std::thread::yield_now();
        }
        ex.wait(&t, ex.default_timeout())?;
        self.pos += n;
        Ok(out.into_iter().map(|t| t as u32).collect())
    }

    /// Runs one greedy decode step with device timing of every task (see
    /// [`Runtime::trace`](crate::cuda::Runtime::trace); the runtime must be
    /// created with tracing on); the step counts like any other. [`step_program`](Self::step_program) names the stages.
    pub fn trace_step(&mut self, rt: &crate::cuda::Runtime) -> Result<Trace> {
        self.check(&[], 1)?;
        let trace = rt.trace(&self.step, &[])?;
        self.pos += 1;
        Ok(trace)
    }

    /// Runs the 16-row chunk program (a prefill chunk, or a speculative verify
    /// block) on `tokens` with device timing of every task; the positions
    /// count like any others. [`chunk_program`](Self::chunk_program) names the
    /// stages.
    pub fn trace_chunk(&mut self, rt: &crate::cuda::Runtime, tokens: &[u32]) -> Result<Trace> {
        if tokens.len() != PREFILL_CHUNK {
            return Err(Error::InvalidArgument(format!(
                "a chunk is {PREFILL_CHUNK} tokens, not {}",
                tokens.len()
            )));
        }
        self.check(tokens, tokens.len())?;
        rt.write_u32(&self.chunk_ids, tokens)?;
        rt.write_u32(&self.pos_buf, &[self.pos as u32])?;
        let trace = rt.trace(&self.chunk, &[])?;
        self.pos += tokens.len();
        Ok(trace)
    }

    /// The chunk program (its event names label the stages).
    pub fn chunk_program(&self) -> &crate::program::Program {
        self.chunk.program()
    }

    /// The one-token decode program (its event names label the stages).
    pub fn step_program(&self) -> &crate::program::Program {
        self.step.program()
    }

    /// Logits of the last step.
    pub fn logits(&self, ex: &dyn Executor) -> Result<Vec<f32>> {
        ex.read_f32(&self.logits)
    }
}

/// Commands a prompt of `len` tokens takes (each emits one token).
pub(crate) fn prompt_commands(len: usize) -> usize {
    len / PREFILL_CHUNK + len % PREFILL_CHUNK
}

/// Polls `ex`'s output ring until `out` holds `n` values, at most the
/// executor's default timeout.
pub(crate) fn wait_outputs(
    ex: &dyn Executor,
    out: &mut Vec<u64>,
    n: usize,
    what: &str,
) -> Result<()> {
    let deadline = std::time::Instant::now() + ex.default_timeout();
    while out.len() < n {
        ex.poll_outputs(out)?;
        if out.len() < n && std::time::Instant::now() > deadline {
            return Err(Error::HostTimeout {
                waited: ex.default_timeout(),
                what: format!("{n} {what} ({} arrived)", out.len()),
            });
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// What one program is: its rows and inputs, and its extra work.
struct Spec<'a> {
    ids: &'a Buffer,
    m: usize,
    /// Positions of the KV cache.
    cache_len: usize,
    /// Draw the token with the settings in this buffer instead of greedily.
    sampling: Option<&'a Buffer>,
    extras: &'a Extras<'a>,
    /// This rank's collectives when the weights are one rank's shard.
    tp: Option<&'a RankComm<'a>>,
}

/// The decode program for `m` token rows: it reads `m` ids from `ids`, writes
/// the KV cache at `pos .. pos + m`, and leaves the token chosen after the last
/// row in `shared.token` and `shared.step_ids`, advancing `pos` by `m`.
/// With `sampling`, the token is drawn with the settings in that buffer
/// instead of chosen greedily.
fn build(
    ex: &dyn Executor,
    c: &ModelConfig,
    wts: &Weights,
    caches: &[Buffer],
    shared: &Shared,
    spec: &Spec<'_>,
) -> Result<LoadedProgram> {
    let Spec {
        ids,
        m,
        cache_len: max_seq,
        sampling,
        extras,
        tp,
    } = *spec;
    let workers = ex.num_workers();
    let Weights {
        embed,
        lm_head,
        final_norm,
        layers,
        shard,
        heads,
        moe_inter: expert_share,
    } = wts;
    if tp.map_or(Shard::WHOLE, |t| t.shard()) != *shard {
        return Err(Error::InvalidArgument(format!(
            "weights of rank {} of {} built without their cluster rank",
            shard.rank, shard.ranks
        )));
    }
    // This rank's slices (everything when the model is whole).
    let part = |n: usize| {
        let (a, b) = shard.range(n);
        b - a
    };
    let (h, hd, vocab) = (c.hidden_size, c.head_dim, c.vocab_size);
    let (inter, v0) = (part(c.intermediate_size), shard.range(vocab).0);
    let shape = HeadShape {
        heads: heads.heads,
        kv_heads: heads.kv_heads,
        head_dim: hd,
    };
    let width = shape.qkv_width();
    let (pos_buf, token, logits) = (&shared.pos, &shared.token, &shared.logits);
    let buf = |d: DType, n: usize| ex.alloc(d, n);
    let (x, hn) = (buf(DType::Bf16, m * h)?, buf(DType::Bf16, m * h)?);
    let (qkv, attn) = (
        buf(DType::Bf16, m * width)?,
        buf(DType::Bf16, m * shape.heads * hd)?,
    );
    let (g, u) = (buf(DType::Bf16, m * inter)?, buf(DType::Bf16, m * inter)?);
    // Routed experts: one slot per expert chosen by any row (at most m * top_k).
    let (experts, top_k, moe_inter) = c
        .moe
        .as_ref()
        .map_or((1, 1, 8), |mo| (mo.num_experts, mo.top_k, *expert_share));
    let slots = experts.min(m * top_k);
    let router_logits = buf(DType::F32, m * experts)?;
    let route_weights = buf(DType::F32, m * experts)?;
    let list = buf(
        DType::U32,
        crate::task::moe_route::list_len(m, experts, top_k),
    )?;
    let (eg, eu) = (
        buf(DType::Bf16, slots * m * moe_inter)?,
        buf(DType::Bf16, slots * m * moe_inter)?,
    );
    let ey = buf(DType::F32, slots * m * h)?;
    let chunks = crate::task::attention::slices_per_head(workers, shape.kv_heads, max_seq);
    let fuse_rope = layers.first().is_some_and(|ly| {
        takes_rope_table(
            shape,
            DType::Bf16,
            caches[0].dtype(),
            ly.rope.len(),
            ex.shared_bytes(),
        )
    });
    let partial = buf(DType::F32, m * shape.heads * chunks * (hd + 2))?;
    let pairs = buf(DType::U32, 2 * workers)?;

    let eps = c.rms_norm_eps as f32;
    let mut b = ProgramBuilder::new();
    let mut ch = Chain {
        b: &mut b,
        prev: None,
        join: Vec::new(),
    };
    if let Some(head) = extras.head {
        ch.prev = Some(head(ch.b)?);
    }
    let single = |ch: &mut Chain<'_>, spec| ops::Group(vec![ch.b.push(spec).id()]);
    let gemv = |ch: &mut Chain<'_>,
                w: &Buffer,
                xin: &BufSlice,
                y: &BufSlice,
                rows: usize,
                cols: usize,
                acc: bool,
                pro: &Prologue| {
        ops::gemv_with(
            ch.b,
            &w.all(),
            xin,
            y,
            GemvShape { rows, cols, m },
            workers,
            acc,
            pro,
        )
        .map(|g| g.staged(ch.b))
    };
    // Norms and SwiGLU run inside the following product's tasks when the
    // prepared rows fit in shared memory; otherwise as stages of their own.
    let smem = ex.shared_bytes();
    let fuse = |cols: usize| prologue_fits(m, cols, smem);
    let norm = |ch: &mut Chain<'_>, w: &Buffer| {
        ops::rmsnorm(ch.b, &x.all(), &w.all(), &hn.all(), m, h, eps, workers)
    };
    // Where a product adding into the residual writes: `x` itself (one
    // device), or this rank's f32 partial of a new all-reduce site.
    type Site = Option<(Buffer, Buffer)>;
    let into_residual = || -> Result<(BufSlice, bool, Site)> {
        match tp {
            None => Ok((x.all(), true, None)),
            Some(tp) => {
                let (table, data) = tp.site(DType::F32, m * h)?;
                Ok((data.all(), false, Some((table, data))))
            }
        }
    };
    // `group` (the producers of `site`, or of `x` itself on one device) as a
    // stage, then every rank's partials added into `x`: by a task after each
    // producer on its worker (RankComm::sum_after), or by a stage of sums
    // after all of them.
    let stage_into = |ch: &mut Chain<'_>, group: ops::Group, site: Site, name: &str| {
        let (Some(tp), Some((table, data))) = (tp, site) else {
            ch.stage(group, name);
            return Ok::<_, Error>(());
        };
        let what = format!("{name} all-reduce");
        // Followers need every task of the stage to be a producer of the
        // site: a task joined to it (a copy of `x`) has to end before any sum
        // writes `x`, so a stage with one keeps the stage of sums.
        let fit = RankComm::followers_fit(group.len(), workers, !ex.is_gpu());
        if !ch.join.is_empty() || !fit {
            ch.stage(group, name);
            let sums = tp.sum(ch.b, &table, &data, &x.all(), workers)?;
            ch.stage(sums, &what);
            return Ok(());
        }
        if let Some(p) = ch.prev {
            group.wait(ch.b, p);
        }
        let sums = tp.sum_after(ch.b, &table, &data, &x.all(), &group, name)?;
        let ev = ch.b.event(&what);
        sums.signal(ch.b, ev);
        ch.prev = Some(ev);
        Ok(())
    };
    let e = ops::embed(ch.b, &x.all(), &embed.all(), &ids.all(), h)?;
    ch.stage(e, "embed");
    // `src` normalised by `w`: fused into the product (`x` and a prologue) or a
    // stage writing `hn` (and no prologue).
    // A norm repeated by every task of the product costs a block-wide sum per
    // row, so blocks of rows normalise once, in a stage of their own (with
    // the same arithmetic: a row's result does not depend on the choice).
    let norm_as =
        |ch: &mut Chain<'_>, w: &Buffer, what: &str, fused: bool| -> Result<(BufSlice, Prologue)> {
            if fused {
                return Ok((x.all(), Prologue::RmsNorm(w.all(), eps)));
            }
            let n = norm(ch, w)?;
            ch.stage(n, what);
            Ok((hn.all(), Prologue::None))
        };
    let normed = |ch: &mut Chain<'_>, w: &Buffer, what: &str| {
        norm_as(ch, w, what, m <= MAX_FUSED_NORM_ROWS && fuse(h))
    };
    // SwiGLU of the rows of `gate` and `up` (`cols` each): fused into the
    // following product (a prologue reading `up`) or a stage writing it over
    // `gate` (and no prologue).
    let swiglu_as = |ch: &mut Chain<'_>, gate: &Buffer, up: &Buffer, cols: usize, what: &str| {
        if fuse(cols) {
            return Ok(Prologue::Swiglu(up.all()));
        }
        let s = ops::swiglu(ch.b, &gate.all(), &gate.all(), &up.all(), workers)?;
        ch.stage(s, what);
        Ok::<_, Error>(Prologue::None)
    };
    for (l, ly) in layers.iter().enumerate() {
        let (src, pro) = normed(&mut ch, &ly.attn.in_norm, &format!("layer {l} input norm"))?;
        let q = gemv(
            &mut ch,
            &ly.attn.qkv,
            &src,
            &qkv.all(),
            width,
            h,
            false,
            &pro,
        )?;
        ch.stage(q, &format!("layer {l} qkv"));
        // The attention slices normalise and rotate q and k themselves where
        // the GPU's tiled path takes them; elsewhere a rope stage runs first.
        let table = if fuse_rope {
            Some(ly.rope.all())
        } else {
            let r = ops::rope_kv(
                ch.b,
                &qkv.all(),
                &ly.attn.qk_norms.all(),
                &caches[l].all(),
                &pos_buf.all(),
                shape,
                m,
                max_seq,
                eps,
                c.rope_theta as f32,
                workers,
            )?;
            ch.stage(r, &format!("layer {l} rope"));
            None
        };
        let parts = ops::combine_parts(shape.heads, m, workers);
        let (slices, combine) = ops::attention(
            ch.b,
            &qkv.all(),
            &caches[l].all(),
            &pos_buf.all(),
            &partial.all(),
            &attn.all(),
            shape,
            m,
            max_seq,
            chunks,
            parts,
            false,
            table.as_ref(),
        )?;
        if let Some(p) = ch.prev {
            slices.wait(ch.b, p);
        }
        ch.prev = None;
        ch.stage(combine, &format!("layer {l} attention"));
        let (dst, acc, site) = into_residual()?;
        let o = gemv(
            &mut ch,
            &ly.attn.o,
            &attn.all(),
            &dst,
            h,
            shape.heads * hd,
            acc,
            &Prologue::None,
        )?;
        stage_into(&mut ch, o, site, &format!("layer {l} o_proj"))?;
        match &ly.mlp {
            Mlp::Dense { gate, up, down } => {
                let (src, pro) =
                    normed(&mut ch, &ly.attn.post_norm, &format!("layer {l} post norm"))?;
                // Gate and up over half the workers each: one task of the
                // pair per SM, not two in turn.
                let half = |ch: &mut Chain<'_>, w: &Buffer, y: &Buffer| {
                    let shape = GemvShape {
                        rows: inter,
                        cols: h,
                        m,
                    };
                    let parts = ops::pair_parts(workers);
                    ops::gemv_with(ch.b, &w.all(), &src, &y.all(), shape, parts, false, &pro)
                        .map(|g| g.staged(ch.b))
                };
                let mut gu = half(&mut ch, gate, &g)?;
                gu.0.extend(half(&mut ch, up, &u)?.0);
                ch.stage(gu, &format!("layer {l} gate+up"));
                let pro = swiglu_as(&mut ch, &g, &u, inter, &format!("layer {l} swiglu"))?;
                let (dst, acc, site) = into_residual()?;
                let d = gemv(&mut ch, down, &g.all(), &dst, h, inter, acc, &pro)?;
                stage_into(&mut ch, d, site, &format!("layer {l} down"))?;
            }
            Mlp::Moe {
                router,
                gate,
                up,
                down,
            } => {
                let moe = c.moe.as_ref().expect("MoE layer of a MoE config");
                // The router and every expert normalise the rows themselves.
                let (src, pro) =
                    normed(&mut ch, &ly.attn.post_norm, &format!("layer {l} post norm"))?;
                let shape = GemvShape {
                    rows: experts,
                    cols: h,
                    m,
                };
                let mut r = ops::gemv_with(
                    ch.b,
                    &router.all(),
                    &src,
                    &router_logits.all(),
                    shape,
                    // Tensor-core products take 16-row tiles: whole tiles per task.
                    workers.min(experts.div_ceil(16)),
                    false,
                    &pro,
                )?
                .staged(ch.b);
                // The experts read the normalised rows from `hn`: where the
                // router normalises them itself, a norm task beside its
                // tasks (on another SM, the same arithmetic) writes them, so
                // that no expert task repeats the norm.
                if !matches!(pro, Prologue::None) {
                    r.0.extend(norm(&mut ch, &ly.attn.post_norm)?.0);
                }
                ch.stage(r, &format!("layer {l} router"));
                let (src, pro) = (hn.all(), Prologue::None);
                // This layer's tally for blocks of m rows.
                let at = (l * MAX_ROWS + m - 1) * 2;
                let tally = (m <= MAX_ROWS)
                    .then(|| shared.tally.slice(at..at + 2))
                    .transpose()?;
                let route = MoeRoute::task(
                    &router_logits.all(),
                    &route_weights.all(),
                    &list.all(),
                    m,
                    experts,
                    top_k,
                    moe.norm_topk_prob,
                    tally.as_ref(),
                )?;
                let route = single(&mut ch, route);
                ch.stage(route, &format!("layer {l} route"));
                // Tasks per chosen expert when each takes a slice of one
                // expert: gate and up share the workers (one task per worker,
                // since a task's fixed cost exceeds the time of its bytes),
                // down has them all.
                let per_slot = (workers / slots).max(1);
                let per_slot_pair = (workers / (2 * slots)).max(1);
                // Blocks of rows spread every chosen expert over the tasks of
                // a product; gate and up (the products whose input rows every
                // slot shares) take half the workers each, so that an SM
                // prepares input rows and pays a task's fixed cost once per
                // stage.
                let spread_tasks = |shared_x: bool| {
                    if shared_x {
                        ops::pair_parts(workers)
                    } else {
                        workers
                    }
                };
                let expert_gemv = |w: &ExpertMats,
                                   xin: &BufSlice,
                                   y: &Buffer,
                                   rows: usize,
                                   cols: usize,
                                   per_x: bool,
                                   pro: &Prologue,
                                   tasks_per_slot: usize| {
                    let mut specs = Vec::new();
                    if let (ExpertMats::Fp4(w), true) = (w, m > 1) {
                        // Blocks of rows choose many experts, each for few
                        // rows: every task takes a share of all of them.
                        let unit = GemvExpertFp4::unit_rows(cols).min(rows);
                        let tasks = spread_tasks(!per_x);
                        for t in 0..tasks {
                            specs.push(GemvExpertFp4::spread(
                                w,
                                xin,
                                &y.all(),
                                &list.all(),
                                m,
                                slots,
                                per_x,
                                t,
                                tasks,
                                unit,
                                false,
                                pro,
                            )?);
                        }
                        return Ok(specs);
                    }
                    for slot in 0..slots {
                        for (r0, n) in split_even(rows, tasks_per_slot) {
                            let shape = GemvShape { rows, cols, m };
                            specs.push(match w {
                                ExpertMats::Bf16(w) => GemvExpert::rows(
                                    &w.all(),
                                    xin,
                                    &y.all(),
                                    &list.all(),
                                    shape,
                                    experts,
                                    slot,
                                    slots,
                                    per_x,
                                    r0,
                                    n,
                                    pro,
                                )?,
                                ExpertMats::Fp4(w) => GemvExpertFp4::rows(
                                    w,
                                    xin,
                                    &y.all(),
                                    &list.all(),
                                    m,
                                    slot,
                                    slots,
                                    per_x,
                                    r0,
                                    n,
                                    false,
                                    pro,
                                )?,
                            });
                        }
                    }
                    Ok::<_, Error>(specs)
                };
                let gate_specs =
                    expert_gemv(gate, &src, &eg, moe_inter, h, false, &pro, per_slot_pair)?;
                let up_specs =
                    expert_gemv(up, &src, &eu, moe_inter, h, false, &pro, per_slot_pair)?;
                let (dst, acc, site) = into_residual()?;
                let mut comb_specs = Vec::new();
                let comb_ranges = split_even(h, workers.min(h.div_ceil(64)));
                for &(h0, n) in &comb_ranges {
                    comb_specs.push(MoeCombine::task(
                        &dst,
                        &ey.all(),
                        &route_weights.all(),
                        &list.all(),
                        m,
                        h,
                        experts,
                        slots,
                        h0,
                        n,
                        acc,
                    )?);
                }
                // Where each slot has tasks of its own (one row: every task
                // takes rows of one expert), an expert's down tasks wait for
                // that expert's gate and up tasks alone, and a combine task
                // for the down tasks of its columns alone: a late task holds
                // back only the tasks that read what it writes.
                let down_ranges = split_even(h, per_slot);
                let spans: Vec<Vec<usize>> = comb_ranges
                    .iter()
                    .map(|&(h0, n)| {
                        (0..down_ranges.len())
                            .filter(|&p| {
                                let (d0, dn) = down_ranges[p];
                                d0 < h0 + n && h0 < d0 + dn
                            })
                            .collect()
                    })
                    .collect();
                let per_expert = !(matches!(gate, ExpertMats::Fp4(_)) && m > 1)
                    && fuse(moe_inter)
                    && ch.join.is_empty()
                    && spans.iter().all(|s| s.len() <= crate::abi::TASK_WAITS);
                if let (true, Some(routed)) = (per_expert, ch.prev) {
                    let pro = Prologue::Swiglu(eu.all());
                    let down_specs =
                        expert_gemv(down, &eg.all(), &ey, h, moe_inter, true, &pro, per_slot)?;
                    // expert_gemv lists each slot's tasks together.
                    let (gate_ids, up_ids) = (ch.b.push_all(gate_specs), ch.b.push_all(up_specs));
                    let down_ids = ch.b.push_all(down_specs);
                    let down_ev: Vec<_> = (0..down_ranges.len())
                        .map(|p| ch.b.event(&format!("layer {l} expert down ({p})")))
                        .collect();
                    let parts = gate_ids.len() / slots;
                    let slot_tasks = gate_ids
                        .chunks(parts)
                        .zip(up_ids.chunks(parts))
                        .zip(down_ids.chunks(down_ranges.len()));
                    for (slot, ((gates, ups), downs)) in slot_tasks.enumerate() {
                        let ev = ch.b.event(&format!("layer {l} expert gate+up ({slot})"));
                        for &t in gates.iter().chain(ups) {
                            ch.b.task(t).wait(routed).signal(ev);
                        }
                        for (&t, &dev) in downs.iter().zip(&down_ev) {
                            ch.b.task(t).wait(ev).signal(dev);
                        }
                    }
                    let comb = ops::Group(ch.b.push_all(comb_specs));
                    for (&t, span) in comb.0.iter().zip(&spans) {
                        for &p in span {
                            ch.b.task(t).wait(down_ev[p]);
                        }
                    }
                    ch.prev = None;
                    stage_into(&mut ch, comb, site, &format!("layer {l} expert combine"))?;
                } else {
                    let mut specs = gate_specs;
                    specs.extend(up_specs);
                    let gu = ops::Group(ch.b.push_all(specs));
                    ch.stage(gu, &format!("layer {l} expert gate+up"));
                    let what = format!("layer {l} expert swiglu");
                    let pro = swiglu_as(&mut ch, &eg, &eu, moe_inter, &what)?;
                    let d = expert_gemv(down, &eg.all(), &ey, h, moe_inter, true, &pro, per_slot)?;
                    let d = ops::Group(ch.b.push_all(d));
                    ch.stage(d, &format!("layer {l} expert down"));
                    let comb = ops::Group(ch.b.push_all(comb_specs));
                    stage_into(&mut ch, comb, site, &format!("layer {l} expert combine"))?;
                }
            }
        }
        // The layer's output rows, copied while the next stage runs.
        if let Some((taps, cap)) = extras.capture {
            if let Some(k) = taps.iter().position(|&t| t == l) {
                let width = taps.len() * h;
                for r in 0..m {
                    let dst = cap.slice(r * width + k * h..r * width + (k + 1) * h)?;
                    let t = ch.b.push(Copy::task(&dst, &x.slice(r * h..(r + 1) * h)?)?);
                    ch.join.push(t.id());
                }
            }
        }
    }
    // This rank's rows of the LM head (all of them on one device).
    let vl = part(vocab);
    if let Some(tokens) = extras.row_tokens {
        // Every row's logits and greedy token (a verify block). The final
        // norm is a stage of its own where the block's rows would crowd the
        // product's shared memory (same arithmetic either way).
        let all = buf(DType::F32, m * vl)?;
        let (src, pro) = norm_as(&mut ch, final_norm, "final norm", fuse(h))?;
        let lm = ops::gemv_with(
            ch.b,
            &lm_head.all(),
            &src,
            &all.all(),
            GemvShape {
                rows: vl,
                cols: h,
                m,
            },
            workers,
            false,
            &pro,
        )?
        .staged(ch.b);
        ch.stage(lm, "lm head");
        let parts = ops::row_argmax_parts(m, workers);
        let row_pairs = buf(DType::U32, 2 * parts * m)?;
        let lm_done = ch.prev.expect("stages exist");
        let picked = ch.b.event("row tokens");
        // With ranks: each row's best (value, index) pair of this rank's
        // vocabulary, gathered so that row r's pairs of all ranks are adjacent.
        let site = tp.map(|tp| tp.site(DType::U32, 2 * m)).transpose()?;
        for r in 0..m {
            let (out, out_index) = match &site {
                Some((_, data)) => (data.slice(2 * r..2 * r + 2)?, false),
                None => (tokens.slice(r..r + 1)?, true),
            };
            let (partials, pick) = ops::argmax_with(
                ch.b,
                &all.slice(r * vl..(r + 1) * vl)?,
                v0,
                &out,
                out_index,
                &row_pairs.slice(2 * parts * r..2 * parts * (r + 1))?,
                parts,
            )?;
            partials.wait(ch.b, lm_done);
            ch.b.task(pick).signal(picked);
        }
        ch.prev = Some(picked);
        if let (Some(tp), Some((table, data))) = (tp, site) {
            let n = shard.ranks;
            let gathered = buf(DType::U32, 2 * n * m)?;
            let g = tp.gather(ch.b, &table, &data, &gathered.all(), 2)?;
            ch.stage(g, "row token pairs gather");
            let mut picks = Vec::new();
            for r in 0..m {
                let pairs = gathered.slice(2 * n * r..2 * n * (r + 1))?;
                let t = Argmax::over_pairs(&pairs, &tokens.slice(r..r + 1)?, true)?;
                picks.push(ch.b.push(t).id());
            }
            ch.stage(ops::Group(picks), "row tokens of all ranks");
        }
    } else {
        // Logits of the last row only, its final norm fused into the LM head.
        // With ranks, sampling gathers every rank's logits; greedy decoding
        // gathers each rank's best (value, index) pair.
        let site = match tp {
            Some(tp) if sampling.is_some() => Some(tp.site(DType::F32, vl)?),
            Some(tp) => Some(tp.site(DType::U32, 2)?),
            None => None,
        };
        let local_logits = match (&site, sampling) {
            (Some((_, data)), Some(_)) => data.clone(),
            (Some(_), None) => buf(DType::F32, vl)?,
            (None, _) => logits.clone(),
        };
        let last_row = x.slice((m - 1) * h..m * h)?;
        let lm = ops::gemv_with(
            ch.b,
            &lm_head.all(),
            &last_row,
            &local_logits.all(),
            GemvShape {
                rows: vl,
                cols: h,
                m: 1,
            },
            workers,
            false,
            &Prologue::RmsNorm(final_norm.all(), eps),
        )?
        .staged(ch.b);
        ch.stage(lm, "lm head");
        // The token after it: drawn with the sampling settings, or greedy.
        if let Some(params) = sampling {
            if let (Some(tp), Some((table, data))) = (tp, &site) {
                let g = tp.gather(ch.b, table, data, &logits.all(), vl)?;
                ch.stage(g, "logits gather");
            }
            let pick = Sample::task(&logits.all(), &params.all(), &pos_buf.all(), &token.all())?;
            let pick = single(&mut ch, pick);
            ch.stage(pick, "sample");
        } else {
            let (out, out_index) = match &site {
                Some((_, data)) => (data.all(), false),
                None => (token.all(), true),
            };
            let (partials, pick) = ops::argmax_with(
                ch.b,
                &local_logits.all(),
                v0,
                &out,
                out_index,
                &pairs.all(),
                workers,
            )?;
            if let Some(p) = ch.prev {
                partials.wait(ch.b, p);
            }
            ch.prev = None;
            ch.stage(ops::Group(vec![pick]), "token");
            if let (Some(tp), Some((table, data))) = (tp, site) {
                let gathered = buf(DType::U32, 2 * shard.ranks)?;
                let g = tp.gather(ch.b, &table, &data, &gathered.all(), 2)?;
                ch.stage(g, "token pairs gather");
                let t = Argmax::over_pairs(&gathered.all(), &token.all(), true)?;
                let t = single(&mut ch, t);
                ch.stage(t, "token of all ranks");
            }
        }
    }
    let mut last = ch.prev.expect("stages exist");
    if let Some(tail) = extras.tail {
        last = tail(&mut b, last, m, pos_buf)?;
    }
    if !extras.advance {
        return ex.load(&b.build()?);
    }
    b.push(Advance::task(
        &pos_buf.all(),
        &shared.step_ids.all(),
        &token.all(),
        m as u32,
    )?)
    .wait(last);
    b.push(Emit::task(&token.all())?).wait(last);
    ex.load(&b.build()?)
}
