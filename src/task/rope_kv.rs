//! `rope_kv`: Qwen3's per-head q/k RMSNorm, rotary position embedding and
//! KV-cache append, for `m` token rows at positions `pos[0] + i`.
//!
//! Row `i` of `qkv` is `[q heads | k heads | v heads]` (as one fused projection
//! writes it). Each q head is normalised with `q_norm`, rotated, and written
//! back in place; each k head is normalised with `k_norm`, rotated and stored at
//! `cache[0][kv_head][pos]`; each v head is stored at `cache[1][kv_head][pos]`.
//! Rotation (Hugging Face's `rotate_half` convention): with `d = head_dim`,
//! `f_j = theta^(-2j/d)` and the angle `pos * f_j` computed in f32 as the
//! reference implementation does, element pairs `(j, j + d/2)` turn by that
//! angle. A position at or past `max_seq` is a device fault.

use bytemuck::{Pod, Zeroable};

use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`RopeKv`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct RopeKvArgs {
    /// Fused projection output, `m` rows of `(heads + 2 kv_heads) * head_dim`.
    pub qkv: u64,
    /// `[q_norm; k_norm]`, `2 * head_dim` elements.
    pub norms: u64,
    /// KV cache `[2][kv_heads][max_seq][head_dim]`.
    pub cache: u64,
    /// Address of the `u32` position of row 0.
    pub pos: u64,
    /// Token rows.
    pub m: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// Head size (even).
    pub head_dim: u32,
    /// Cache length in positions.
    pub max_seq: u32,
    /// RMSNorm epsilon, f32 bits.
    pub eps: u32,
    /// RoPE base, f32 bits.
    pub theta: u32,
    /// [`DType`] code of `qkv`.
    pub qkv_dtype: u32,
    /// [`DType`] code of `norms`.
    pub norm_dtype: u32,
    /// [`DType`] code of the cache.
    pub cache_dtype: u32,
    /// First job (`row * (heads + 2 * kv_heads) + head`) this task handles.
    pub job0: u32,
    /// Jobs this task handles.
    pub jobs: u32,
}

/// Attention geometry shared by the attention tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
}

impl HeadShape {
    /// Elements of one fused `qkv` row.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// Per-head norm, RoPE and KV-cache append.
pub struct RopeKv;

impl RopeKv {
    /// The task for `m` rows of `qkv`; `pos` holds the position of row 0.
    #[allow(clippy::too_many_arguments)]
    pub fn task(
        qkv: &BufSlice,
        norms: &BufSlice,
        cache: &BufSlice,
        pos: &BufSlice,
        shape: HeadShape,
        m: usize,
        max_seq: usize,
        eps: f32,
        theta: f32,
    ) -> Result<TaskSpec, ProgramError> {
        let mut one = Self::split(qkv, norms, cache, pos, shape, m, max_seq, eps, theta, 1)?;
        Ok(one.remove(0))
    }

    /// The same work split over `parts` tasks by (row, head) job.
    #[allow(clippy::too_many_arguments)]
    pub fn split(
        qkv: &BufSlice,
        norms: &BufSlice,
        cache: &BufSlice,
        pos: &BufSlice,
        shape: HeadShape,
        m: usize,
        max_seq: usize,
        eps: f32,
        theta: f32,
        parts: usize,
    ) -> Result<Vec<TaskSpec>, ProgramError> {
        for (n, s) in [("qkv", qkv), ("norms", norms), ("cache", cache)] {
            want_float::<RopeKv>(n, s)?;
        }
        let HeadShape {
            heads,
            kv_heads,
            head_dim,
        } = shape;
        if pos.dtype() != DType::U32 || pos.is_empty() {
            return Err(bad::<RopeKv>("pos must be a u32 slice"));
        }
        if m == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad::<RopeKv>(format!(
                "bad geometry {shape:?} with m = {m}"
            )));
        }
        if qkv.len() < m * shape.qkv_width()
            || norms.len() < 2 * head_dim
            || cache.len() < 2 * kv_heads * max_seq * head_dim
        {
            return Err(bad::<RopeKv>("qkv, norms or cache too small"));
        }
        if !(eps > 0.0 && theta > 1.0) {
            return Err(bad::<RopeKv>("eps must be positive and theta above 1"));
        }
        let u = |v: usize| u32::try_from(v).map_err(|_| bad::<RopeKv>("dimension over 2^32"));
        let all = RopeKvArgs {
            qkv: qkv.addr(),
            norms: norms.addr(),
            cache: cache.addr(),
            pos: pos.addr(),
            m: u(m)?,
            heads: u(heads)?,
            kv_heads: u(kv_heads)?,
            head_dim: u(head_dim)?,
            max_seq: u(max_seq)?,
            eps: eps.to_bits(),
            theta: theta.to_bits(),
            qkv_dtype: qkv.dtype().code(),
            norm_dtype: norms.dtype().code(),
            cache_dtype: cache.dtype().code(),
            job0: 0,
            jobs: 0,
        };
        let jobs = (heads + 2 * kv_heads) * m;
        super::split_even(jobs, parts.max(1))
            .into_iter()
            .map(|(j0, n)| {
                let args = RopeKvArgs {
                    job0: u(j0)?,
                    jobs: u(n)?,
                    ..all
                };
                Ok(TaskSpec::new::<RopeKv>(args, &[qkv, norms, cache, pos]))
            })
            .collect()
    }
}

/// The rotation frequencies `theta^(-2j/d)` of a head of size `d` (computed
/// in f64, rounded to f32, as the kernel does).
pub fn rope_freqs(d: usize, theta: f32) -> Vec<f32> {
    (0..d / 2)
        .map(|j| (1.0 / f64::from(theta).powf(2.0 * j as f64 / d as f64)) as f32)
        .collect()
}

/// Normalises one head with `w` and rotates it to position `p` (f32, as the kernel).
pub fn norm_rope(x: &[f32], w: &[f32], p: u32, eps: f32, theta: f32) -> Vec<f32> {
    norm_rope_with(x, w, p, eps, &rope_freqs(x.len(), theta))
}

/// [`norm_rope`] with the frequencies given ([`rope_freqs`]).
pub fn norm_rope_with(x: &[f32], w: &[f32], p: u32, eps: f32, freqs: &[f32]) -> Vec<f32> {
    let d = x.len();
    let ms = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / d as f64;
    let inv = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
    let n: Vec<f32> = x.iter().zip(w).map(|(v, g)| v * inv * g).collect();
    let half = d / 2;
    let mut out = n.clone();
    for (j, &freq) in freqs.iter().enumerate().take(half) {
        let angle = (p as f32) * freq;
        let (s, c) = f64::from(angle).sin_cos();
        let (x1, x2) = (f64::from(n[j]), f64::from(n[j + half]));
        out[j] = (x1 * c - x2 * s) as f32;
        out[j + half] = (x2 * c + x1 * s) as f32;
    }
    out
}

/// Length of a rope table for heads of `head_dim` ([`rope_table`]).
pub fn rope_table_len(head_dim: usize) -> usize {
    2 * head_dim + head_dim / 2 + 1
}

/// The table with which attention tasks normalise and rotate q and k
/// themselves ([`Attention::with_rope`](super::attention::Attention::with_rope)),
/// f32: `q_norm`, `k_norm` (`head_dim` each), the [`rope_freqs`], then `eps`.
pub fn rope_table(q_norm: &[f32], k_norm: &[f32], eps: f32, theta: f32) -> Vec<f32> {
    let mut t = Vec::with_capacity(rope_table_len(q_norm.len()));
    t.extend_from_slice(q_norm);
    t.extend_from_slice(k_norm);
    t.extend(rope_freqs(q_norm.len(), theta));
    t.push(eps);
    t
}

impl TaskKind for RopeKv {
    type Args = RopeKvArgs;
    const NAME: &'static str = "rope_kv";
    fn cpu(a: &RopeKvArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let dt = |c| DType::from_code(c).ok_or(TaskFault::BadArgs("rope_kv dtype"));
        let (qd, nd, cd) = (dt(a.qkv_dtype)?, dt(a.norm_dtype)?, dt(a.cache_dtype)?);
        let (hd, heads, kvh) = (a.head_dim as usize, a.heads as usize, a.kv_heads as usize);
        let (eps, theta) = (f32::from_bits(a.eps), f32::from_bits(a.theta));
        let norms = mem.read_f32(a.norms, nd, 2 * hd)?;
        let pos0 = mem.read_u32(a.pos, 1)?[0];
        let width = (heads + 2 * kvh) * hd;
        for i in 0..a.m as usize {
            let p = pos0
                .checked_add(i as u32)
                .filter(|&p| p < a.max_seq)
                .ok_or(TaskFault::OutOfRange {
                    index: u64::from(pos0) + i as u64,
                    bound: u64::from(a.max_seq),
                })?;
            let row = a.qkv + (i * width * qd.size()) as u64;
            for h in 0..heads + 2 * kvh {
                let job = (i * (heads + 2 * kvh) + h) as u32;
                if job < a.job0 || job - a.job0 >= a.jobs {
                    continue;
                }
                let at = row + (h * hd * qd.size()) as u64;
                let x = mem.read_f32(at, qd, hd)?;
                let slot = |which: usize, kh: usize| {
                    a.cache
                        + (((which * kvh + kh) * a.max_seq as usize + p as usize) * hd * cd.size())
                            as u64
                };
                if h < heads {
                    mem.write_f32(at, qd, &norm_rope(&x, &norms[..hd], p, eps, theta))?;
                } else if h < heads + kvh {
                    mem.write_f32(
                        slot(0, h - heads),
                        cd,
                        &norm_rope(&x, &norms[hd..], p, eps, theta),
                    )?;
                } else {
                    mem.write_f32(slot(1, h - heads - kvh), cd, &x)?;
                }
            }
        }
        Ok(())
    }
    fn layout() -> Layout {
        layout!(RopeKvArgs {
            qkv,
            norms,
            cache,
            pos,
            m,
            heads,
            kv_heads,
            head_dim,
            max_seq,
            eps,
            theta,
            qkv_dtype,
            norm_dtype,
            cache_dtype,
            job0,
            jobs
        })
    }
}
