//! `attention`: split-sequence ("flash-decoding") GQA attention for `m` query
//! rows at positions `pos[0] + i` over the KV cache. Each task takes one KV
//! head and one of `chunks` slices of each row's keys (steps of
//! [`SLICE_KEYS`] keys, sliced at run time from the row's own length; see
//! [`slice_range`]) and writes, per query row and head of its group, a
//! partial `(o[head_dim], max, sum)`; [`attention_combine`](super::attention_combine)
//! merges the slices. Row `i` attends keys `0..=pos[0] + i` (causal inside a
//! block of rows), or all of them when the task is
//! [`bidirectional`](Attention::bidirectional). A row's result does not
//! depend on the other rows of its block, bit for bit, so a verify block
//! reproduces decode steps exactly.

use bytemuck::{Pod, Zeroable};

use super::rope_kv::{norm_rope_with, rope_table_len, HeadShape};
use super::{bad, decode_args, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Largest head size the kernels take (each lane holds `head_dim / 32` values).
pub const MAX_HEAD_DIM: usize = 128;

/// Arguments of [`Attention`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionArgs {
    /// Fused `qkv` rows (queries already normalised and rotated).
    pub qkv: u64,
    /// KV cache `[2][kv_heads][max_seq][head_dim]`.
    pub cache: u64,
    /// Address of the `u32` position of row 0.
    pub pos: u64,
    /// Partials, f32 `[m][heads][chunks][head_dim + 2]`.
    pub partial: u64,
    /// Query rows.
    pub m: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// Head size.
    pub head_dim: u32,
    /// Cache length in positions.
    pub max_seq: u32,
    /// The KV head of this task.
    pub kv_head: u32,
    /// The slice of this task.
    pub chunk: u32,
    /// Slices per KV head.
    pub chunks: u32,
    /// Score scale (usually `head_dim^-0.5`), f32 bits.
    pub scale: u32,
    /// [`DType`] code of `qkv`.
    pub qkv_dtype: u32,
    /// [`DType`] code of the cache.
    pub cache_dtype: u32,
    /// 1: every row attends all `pos[0] + m` keys (a block that sees itself
    /// whole, as a DFlash draft block does); 0: causal.
    pub bidirectional: u32,
    /// 0, or the address of a rope table ([`rope_table`](super::rope_kv::rope_table)): the task then
    /// normalises and rotates the raw q and k of `qkv` itself and appends the
    /// block's keys it covers (and their values) to the cache, so that no
    /// `rope_kv` stage runs before it ([`Attention::with_rope`]).
    pub rope: u64,
}

/// One slice of split-sequence attention.
pub struct Attention;

/// Checks a geometry the attention kernels take: head sizes 32, 64 or 128.
pub(crate) fn check_geometry<K: TaskKind>(shape: HeadShape, m: usize) -> Result<(), ProgramError> {
    let HeadShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    if m == 0
        || kv_heads == 0
        || heads % kv_heads != 0
        || ![32, 64, MAX_HEAD_DIM].contains(&head_dim)
    {
        return Err(bad::<K>(format!(
            "unsupported geometry {shape:?} with m = {m}"
        )));
    }
    Ok(())
}

impl Attention {
    /// The task for KV head `kv_head`, slice `chunk` of `chunks`.
    #[allow(clippy::too_many_arguments)]
    pub fn task(
        qkv: &BufSlice,
        cache: &BufSlice,
        pos: &BufSlice,
        partial: &BufSlice,
        shape: HeadShape,
        m: usize,
        max_seq: usize,
        kv_head: usize,
        chunk: usize,
        chunks: usize,
    ) -> Result<TaskSpec, ProgramError> {
        check_geometry::<Attention>(shape, m)?;
        want_float::<Attention>("qkv", qkv)?;
        want_float::<Attention>("cache", cache)?;
        let HeadShape {
            heads,
            kv_heads,
            head_dim,
        } = shape;
        if pos.dtype() != DType::U32 || partial.dtype() != DType::F32 {
            return Err(bad::<Attention>("pos must be u32 and partial f32"));
        }
        if kv_head >= kv_heads || chunk >= chunks {
            return Err(bad::<Attention>("kv_head or chunk out of range"));
        }
        if qkv.len() < m * shape.qkv_width()
            || cache.len() < 2 * kv_heads * max_seq * head_dim
            || partial.len() < m * heads * chunks * (head_dim + 2)
        {
            return Err(bad::<Attention>("qkv, cache or partial too small"));
        }
        let u = |v: usize| u32::try_from(v).map_err(|_| bad::<Attention>("dimension over 2^32"));
        let args = AttentionArgs {
            qkv: qkv.addr(),
            cache: cache.addr(),
            pos: pos.addr(),
            partial: partial.addr(),
            m: u(m)?,
            heads: u(heads)?,
            kv_heads: u(kv_heads)?,
            head_dim: u(head_dim)?,
            max_seq: u(max_seq)?,
            kv_head: u(kv_head)?,
            chunk: u(chunk)?,
            chunks: u(chunks)?,
            scale: (1.0 / (head_dim as f32).sqrt()).to_bits(),
            qkv_dtype: qkv.dtype().code(),
            cache_dtype: cache.dtype().code(),
            bidirectional: 0,
            rope: 0,
        };
        Ok(TaskSpec::new::<Attention>(
            args,
            &[qkv, cache, pos, partial],
        ))
    }
}

impl Attention {
    /// Makes an attention task's rows see the whole block (`bidirectional`).
    pub fn bidirectional(spec: TaskSpec) -> TaskSpec {
        spec.map_args::<Attention>(|a| a.bidirectional = 1)
    }

    /// Makes an attention task do the `rope_kv` task's work for what it
    /// reads, with the f32 rope `table` ([`rope_table`](super::rope_kv::rope_table)). On the GPU only the
    /// tiled path takes it: bf16 `qkv` and cache, head size 64 or 128
    /// ([`fuses_rope`]).
    pub fn with_rope(spec: TaskSpec, table: &BufSlice) -> Result<TaskSpec, ProgramError> {
        let a: AttentionArgs = decode_args(&spec.args);
        let shape = HeadShape {
            heads: a.heads as usize,
            kv_heads: a.kv_heads as usize,
            head_dim: a.head_dim as usize,
        };
        let dt = |c| DType::from_code(c).unwrap_or(DType::U32);
        if !fuses_rope(shape, dt(a.qkv_dtype), dt(a.cache_dtype)) {
            return Err(bad::<Attention>(format!(
                "a rope table needs bf16 qkv and cache and heads of 64 or 128, not {shape:?}"
            )));
        }
        if table.dtype() != DType::F32 || table.len() < rope_table_len(a.head_dim as usize) {
            return Err(bad::<Attention>(
                "the rope table must be f32, 2.5 head_dim + 1 long",
            ));
        }
        let mut spec = spec.map_args::<Attention>(|a| a.rope = table.addr());
        spec.buffers.push(table.buffer().clone());
        Ok(spec)
    }
}

/// Keys per tile of the GPU's tiled path.
const TILE_KEYS: usize = 64;

/// Warps of the GPU's tiled path that share a 16-pair tile, each a quarter
/// of every tile's keys.
const KEY_QUARTERS: usize = 4;

/// Whether the GPU's tiled path takes one query row of `shape` within
/// `shared_bytes` of shared memory per block (q and two K/V tile buffers, as
/// the kernel lays them out, and at most one 16-pair tile per four warps).
pub fn tiled_fits(shape: HeadShape, shared_bytes: usize) -> bool {
    let (pairs, hd) = (shape.heads / shape.kv_heads.max(1), shape.head_dim);
    let max_pairs = 16 * (crate::abi::BLOCK_THREADS as usize / 32) / KEY_QUARTERS;
    // Rows padded against bank conflicts: hd / 2 + 4 words.
    let words = hd / 2 + 4;
    // Per row its slice and grid.
    let bytes = pairs * words * 4 + 4 * TILE_KEYS * words * 4 + 3 * 4;
    pairs <= max_pairs && bytes <= shared_bytes
}

/// Sequence slices per KV head for a KV cache of `max_len` positions on
/// `workers` workers: one per worker of each KV head, so that a long
/// sequence's attention uses every SM, but no more than keep a slice of a
/// full cache within one tile of the GPU's tiled path (more would only add
/// tasks, each a hop and a partial to merge, for a few keys each).
pub fn slices_per_head(workers: usize, kv_heads: usize, max_len: usize) -> usize {
    (workers / kv_heads.max(1))
        .min(max_len.div_ceil(TILE_KEYS))
        .max(1)
}

/// Whether attention over `qkv` and `cache` of these types and head size
/// normalises and rotates q and k itself on every executor (the GPU's tiled
/// path; see [`Attention::with_rope`]).
pub fn fuses_rope(shape: HeadShape, qkv: DType, cache: DType) -> bool {
    qkv == DType::Bf16 && cache == DType::Bf16 && matches!(shape.head_dim, 64 | 128)
}

/// Whether a model layer's attention slices take its rope `table` of
/// `table_len` values (and no `rope_kv` stage runs): [`fuses_rope`], a full
/// table, and the tiled path fitting `shared_bytes`.
pub fn takes_rope_table(
    shape: HeadShape,
    qkv: DType,
    cache: DType,
    table_len: usize,
    shared_bytes: usize,
) -> bool {
    fuses_rope(shape, qkv, cache)
        && table_len == super::rope_kv::rope_table_len(shape.head_dim)
        && tiled_fits(shape, shared_bytes)
}

/// Keys per slice step: a row's slices are multiples of it.
pub const SLICE_KEYS: u32 = 16;

/// The key range `[lo, hi)` of slice `chunk` of `chunks` for a row attending
/// `len` keys: `ceil(len / 16 / chunks)` steps of [`SLICE_KEYS`] keys per
/// slice. It depends on the row's own length alone (and the kernel anchors its
/// tiles at the slice start), so a row computes alike alone (a decode step) or
/// inside a block of rows (a verify step).
pub fn slice_range(len: u32, chunk: u32, chunks: u32) -> (u32, u32) {
    let per = len.div_ceil(SLICE_KEYS).div_ceil(chunks) * SLICE_KEYS;
    let lo = (chunk * per).min(len);
    (lo, (lo + per).min(len))
}

impl TaskKind for Attention {
    type Args = AttentionArgs;
    const NAME: &'static str = "attention";
    fn cpu(a: &AttentionArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let dt = |c| DType::from_code(c).ok_or(TaskFault::BadArgs("attention dtype"));
        let (qd, cd) = (dt(a.qkv_dtype)?, dt(a.cache_dtype)?);
        let (hd, heads, kvh) = (a.head_dim as usize, a.heads as usize, a.kv_heads as usize);
        let group = heads / kvh;
        let pos0 = mem.read_u32(a.pos, 1)?[0];
        pos0.checked_add(a.m)
            .filter(|&l| l <= a.max_seq)
            .ok_or(TaskFault::OutOfRange {
                index: u64::from(pos0) + u64::from(a.m),
                bound: u64::from(a.max_seq),
            })?;
        let row_len = |i: u32| pos0 + if a.bidirectional != 0 { a.m } else { i + 1 };
        let row = |which: usize, j: u32| {
            a.cache
                + (((which * kvh + a.kv_head as usize) * a.max_seq as usize + j as usize)
                    * hd
                    * cd.size()) as u64
        };
        let scale = f32::from_bits(a.scale);
        let width = (heads + 2 * kvh) * hd;
        let table = match a.rope {
            0 => None,
            t => Some(mem.read_f32(t, DType::F32, rope_table_len(hd))?),
        };
        let raw = |i: usize, head: usize| {
            mem.read_f32(a.qkv + ((i * width + head * hd) * qd.size()) as u64, qd, hd)
        };
        if let Some(t) = &table {
            // The block's keys inside this task's slices, rotated into the cache.
            let (kn, freqs, eps) = (
                &t[hd..2 * hd],
                &t[2 * hd..2 * hd + hd / 2],
                t[2 * hd + hd / 2],
            );
            for k in 0..a.m {
                let p = pos0 + k;
                let covered = (0..a.m).any(|i| {
                    let (lo, hi) = slice_range(row_len(i), a.chunk, a.chunks);
                    (lo..hi).contains(&p)
                });
                if covered {
                    let key = raw(k as usize, heads + a.kv_head as usize)?;
                    mem.write_f32(row(0, p), cd, &norm_rope_with(&key, kn, p, eps, freqs))?;
                    mem.write_f32(
                        row(1, p),
                        cd,
                        &raw(k as usize, heads + kvh + a.kv_head as usize)?,
                    )?;
                }
            }
        }
        for i in 0..a.m as usize {
            // This row's keys in this slice.
            let (lo, hi) = slice_range(row_len(i as u32), a.chunk, a.chunks);
            let keys: Vec<Vec<f32>> = (lo..hi)
                .map(|j| mem.read_f32(row(0, j), cd, hd))
                .collect::<Result<_, _>>()?;
            let vals: Vec<Vec<f32>> = (lo..hi)
                .map(|j| mem.read_f32(row(1, j), cd, hd))
                .collect::<Result<_, _>>()?;
            for gh in 0..group {
                let h = a.kv_head as usize * group + gh;
                let mut q = raw(i, h)?;
                if let Some(t) = &table {
                    // Normalised, rotated and rounded to the type of qkv, as
                    // a rope_kv task would have stored it there.
                    let (qn, freqs, eps) =
                        (&t[..hd], &t[2 * hd..2 * hd + hd / 2], t[2 * hd + hd / 2]);
                    q = norm_rope_with(&q, qn, pos0 + i as u32, eps, freqs);
                    if qd == DType::Bf16 {
                        q.iter_mut()
                            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
                    }
                }
                let (mut mx, mut sum, mut o) = (f32::NEG_INFINITY, 0f32, vec![0f32; hd]);
                let scores: Vec<f32> = keys
                    .iter()
                    .map(|k| q.iter().zip(k).map(|(x, y)| x * y).sum::<f32>() * scale)
                    .collect();
                for &s in &scores {
                    mx = mx.max(s);
                }
                for (s, v) in scores.iter().zip(&vals) {
                    let p = (s - mx).exp();
                    sum += p;
                    o.iter_mut().zip(v).for_each(|(a, b)| *a += p * b);
                }
                o.push(mx);
                o.push(sum);
                let at = ((i * heads + h) * a.chunks as usize + a.chunk as usize) * (hd + 2);
                mem.write_f32(a.partial + (at * 4) as u64, DType::F32, &o)?;
            }
        }
        Ok(())
    }
    fn layout() -> Layout {
        layout!(AttentionArgs {
            qkv,
            cache,
            pos,
            partial,
            m,
            heads,
            kv_heads,
            head_dim,
            max_seq,
            kv_head,
            chunk,
            chunks,
            scale,
            qkv_dtype,
            cache_dtype,
            bidirectional,
            rope
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_per_head_keeps_a_full_cache_within_a_tile_a_slice() {
        // 132 workers, 4 KV heads: 33 slices for long caches, fewer for short.
        assert_eq!(slices_per_head(132, 4, 40960), 33);
        assert_eq!(slices_per_head(132, 4, 1122), 18);
        assert_eq!(slices_per_head(132, 4, 64), 1);
        assert_eq!(slices_per_head(132, 4, 1), 1);
        assert_eq!(slices_per_head(2, 4, 4096), 1);
        assert_eq!(slices_per_head(132, 0, 4096), 64);
        // At the full cache every slice is at most one tile, and the slices
        // cover every key once.
        for max_len in [1usize, 63, 64, 65, 1000, 1122, 2112, 2113, 9000] {
            let chunks = slices_per_head(132, 4, max_len) as u32;
            for len in [1u32, 17, max_len as u32] {
                let mut next = 0;
                for chunk in 0..chunks {
                    let (lo, hi) = slice_range(len, chunk, chunks);
                    assert!(
                        lo == next || lo == hi,
                        "len {len} chunk {chunk}: {lo}..{hi} after {next}"
                    );
                    if lo < hi {
                        next = hi;
                    }
                    if len as usize == max_len && max_len <= 33 * TILE_KEYS {
                        assert!(hi - lo <= TILE_KEYS as u32, "len {len}: slice {lo}..{hi}");
                    }
                }
                assert_eq!(next, len);
            }
        }
    }
}
