//! `argmax`: the index of the largest value (lowest index on ties; NaN never
//! wins). A search across SMs is several of these over parts of the input,
//! each writing a `(value, index)` pair, and one over the pairs (see
//! [`crate::program::ops::argmax`]).

use bytemuck::{Pod, Zeroable};

use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`Argmax`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ArgmaxArgs {
    /// Input: `n` floats, or `n` `(f32 bits, index)` pairs of `u32`.
    pub x: u64,
    /// Output: one `u32` index, or one `(f32 bits, index)` pair.
    pub out: u64,
    /// Candidates.
    pub n: u32,
    /// [`DType`] code of float input.
    pub x_dtype: u32,
    /// Index of the first float candidate.
    pub base: u32,
    /// 1: the input is pairs.
    pub in_pairs: u32,
    /// 1: write only the index.
    pub out_index: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Largest value's index.
pub struct Argmax;

impl Argmax {
    /// Over floats `x` (indices `base..base + x.len()`), writing a pair into `out[..2]`
    /// or, with `out_index`, the index into `out[0]`.
    pub fn over_values(
        x: &BufSlice,
        base: usize,
        out: &BufSlice,
        out_index: bool,
    ) -> Result<TaskSpec, ProgramError> {
        if !x.dtype().is_float() || x.is_empty() {
            return Err(bad::<Argmax>("values must be a non-empty float slice"));
        }
        Self::make(x, x.len(), base, false, out, out_index)
    }

    /// Over `(value, index)` pairs in a `u32` slice of `2 * n` elements.
    pub fn over_pairs(
        pairs: &BufSlice,
        out: &BufSlice,
        out_index: bool,
    ) -> Result<TaskSpec, ProgramError> {
        if pairs.dtype() != DType::U32 || pairs.is_empty() || pairs.len() % 2 != 0 {
            return Err(bad::<Argmax>("pairs must be a u32 slice of even length"));
        }
        Self::make(pairs, pairs.len() / 2, 0, true, out, out_index)
    }

    fn make(
        x: &BufSlice,
        n: usize,
        base: usize,
        in_pairs: bool,
        out: &BufSlice,
        out_index: bool,
    ) -> Result<TaskSpec, ProgramError> {
        if out.dtype() != DType::U32 || out.len() < if out_index { 1 } else { 2 } {
            return Err(bad::<Argmax>(
                "out must be u32 with room for an index or a pair",
            ));
        }
        let u = |v: usize| u32::try_from(v).map_err(|_| bad::<Argmax>("over 2^32 candidates"));
        u(base + n)?;
        let args = ArgmaxArgs {
            x: x.addr(),
            out: out.addr(),
            n: u(n)?,
            x_dtype: x.dtype().code(),
            base: u(base)?,
            in_pairs: u32::from(in_pairs),
            out_index: u32::from(out_index),
            reserved: 0,
        };
        Ok(TaskSpec::new::<Argmax>(args, &[x, out]))
    }
}

/// Whether `(v, i)` beats `(bv, bi)`: larger value, or equal value and lower index.
pub fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    v > bv || (v == bv && i < bi)
}

impl TaskKind for Argmax {
    type Args = ArgmaxArgs;
    const NAME: &'static str = "argmax";
    fn cpu(a: &ArgmaxArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let n = a.n as usize;
        let cands: Vec<(f32, u32)> = if a.in_pairs != 0 {
            mem.read_u32(a.x, 2 * n)?
                .chunks_exact(2)
                .map(|p| (f32::from_bits(p[0]), p[1]))
                .collect()
        } else {
            let d = DType::from_code(a.x_dtype).ok_or(TaskFault::BadArgs("argmax dtype"))?;
            mem.read_f32(a.x, d, n)?.into_iter().zip(a.base..).collect()
        };
        let (mut bv, mut bi) = (f32::NEG_INFINITY, u32::MAX);
        for (v, i) in cands {
            if better(v, i, bv, bi) {
                (bv, bi) = (v, i);
            }
        }
        if a.out_index != 0 {
            mem.write_u32(a.out, &[bi])
        } else {
            mem.write_u32(a.out, &[bv.to_bits(), bi])
        }
    }
    fn layout() -> Layout {
        layout!(ArgmaxArgs {
            x,
            out,
            n,
            x_dtype,
            base,
            in_pairs,
            out_index,
            reserved
        })
    }
}
