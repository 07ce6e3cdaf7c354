//! `attention_combine`: merges the per-slice partials of
//! [`attention`](super::attention) for a range of heads: with `M` the largest
//! slice maximum, `o = Σ e^(max_c − M) o_c / Σ e^(max_c − M) sum_c`.

use bytemuck::{Pod, Zeroable};

use super::attention::check_geometry;
use super::rope_kv::HeadShape;
use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`AttentionCombine`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionCombineArgs {
    /// Partials written by [`Attention`](super::attention::Attention).
    pub partial: u64,
    /// Output `[m][heads * head_dim]`.
    pub out: u64,
    /// Query rows.
    pub m: u32,
    /// Query heads in all.
    pub heads: u32,
    /// Head size.
    pub head_dim: u32,
    /// Slices per head.
    pub chunks: u32,
    /// First head this task merges.
    pub head0: u32,
    /// Heads this task merges.
    pub nheads: u32,
    /// [`DType`] code of `out`.
    pub out_dtype: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Merges attention slices for a range of heads.
pub struct AttentionCombine;

/// Most slices a combine merges (the device keeps one weight per slice per warp).
pub const MAX_CHUNKS: usize = 256;

impl AttentionCombine {
    /// Heads `head0..head0 + nheads` of every row.
    #[allow(clippy::too_many_arguments)]
    pub fn task(
        partial: &BufSlice,
        out: &BufSlice,
        shape: HeadShape,
        m: usize,
        chunks: usize,
        head0: usize,
        nheads: usize,
    ) -> Result<TaskSpec, ProgramError> {
        check_geometry::<AttentionCombine>(shape, m)?;
        want_float::<AttentionCombine>("out", out)?;
        let HeadShape {
            heads, head_dim, ..
        } = shape;
        if nheads == 0 || head0 + nheads > heads || chunks == 0 || chunks > MAX_CHUNKS {
            return Err(bad::<AttentionCombine>("head range or chunks out of range"));
        }
        if partial.dtype() != DType::F32
            || partial.len() < m * heads * chunks * (head_dim + 2)
            || out.len() < m * heads * head_dim
        {
            return Err(bad::<AttentionCombine>("partial (f32) or out too small"));
        }
        let u =
            |v: usize| u32::try_from(v).map_err(|_| bad::<AttentionCombine>("dimension over 2^32"));
        let args = AttentionCombineArgs {
            partial: partial.addr(),
            out: out.addr(),
            m: u(m)?,
            heads: u(heads)?,
            head_dim: u(head_dim)?,
            chunks: u(chunks)?,
            head0: u(head0)?,
            nheads: u(nheads)?,
            out_dtype: out.dtype().code(),
            reserved: 0,
        };
        Ok(TaskSpec::new::<AttentionCombine>(args, &[partial, out]))
    }
}

impl TaskKind for AttentionCombine {
    type Args = AttentionCombineArgs;
    const NAME: &'static str = "attention_combine";
    fn cpu(a: &AttentionCombineArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let od = DType::from_code(a.out_dtype).ok_or(TaskFault::BadArgs("combine dtype"))?;
        let (hd, chunks) = (a.head_dim as usize, a.chunks as usize);
        for i in 0..a.m as usize {
            for h in a.head0 as usize..(a.head0 + a.nheads) as usize {
                let at = (i * a.heads as usize + h) * chunks * (hd + 2);
                let p = mem.read_f32(a.partial + (at * 4) as u64, DType::F32, chunks * (hd + 2))?;
                let parts: Vec<&[f32]> = p.chunks_exact(hd + 2).collect();
                let mx = parts
                    .iter()
                    .map(|c| c[hd])
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut o = vec![0f32; hd];
                let mut sum = 0f32;
                for c in &parts {
                    if c[hd + 1] > 0.0 {
                        let w = (c[hd] - mx).exp();
                        sum += w * c[hd + 1];
                        o.iter_mut().zip(&c[..hd]).for_each(|(a, b)| *a += w * b);
                    }
                }
                o.iter_mut().for_each(|v| *v /= sum);
                let dst = a.out + (((i * a.heads as usize + h) * hd) * od.size()) as u64;
                mem.write_f32(dst, od, &o)?;
            }
        }
        Ok(())
    }
    fn layout() -> Layout {
        layout!(AttentionCombineArgs {
            partial,
            out,
            m,
            heads,
            head_dim,
            chunks,
            head0,
            nheads,
            out_dtype,
            reserved
        })
    }
}
