//! `moe_combine`: the routed experts' weighted sum
//! `S[i, h] = Σ_{s < count} weights[i, list[1 + s]] * y[s, i, h]` for hidden
//! columns `h0..h0 + hn` (slots past the list's count are never read), added
//! into the residual (`x += S`, one rounding) or written (`x = S`: a rank's
//! partial sum before a tensor-parallel all-reduce adds it the same way).

use bytemuck::{Pod, Zeroable};

use super::all_reduce::Runs;
use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`MoeCombine`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct MoeCombineArgs {
    /// Residual `[m, hidden]` (read and written).
    pub x: u64,
    /// Expert outputs, f32 `[slots, m, hidden]`.
    pub y: u64,
    /// Routing weights, f32 `[m, experts]`.
    pub weights: u64,
    /// Routing list: count, then expert ids.
    pub list: u64,
    /// Rows.
    pub m: u32,
    /// Hidden size.
    pub hidden: u32,
    /// Experts.
    pub experts: u32,
    /// First column of this task.
    pub h0: u32,
    /// Columns of this task.
    pub hn: u32,
    /// [`DType`] code of `x`.
    pub x_dtype: u32,
    /// 1: `x += S`; 0: `x = S`.
    pub accumulate: u32,
    /// Capacity of the list (its ids and masks; the count is at most this).
    pub slots: u32,
}

/// Weighted sum of expert outputs into the residual.
pub struct MoeCombine;

impl MoeCombine {
    /// The output elements a task writes: `x`'s address, its element type
    /// and the runs (one per row) of `x`'s elements.
    pub(crate) fn written(a: &MoeCombineArgs) -> (u64, Option<DType>, Runs) {
        let runs = Runs::strided(a.h0, a.hn, a.m, a.hidden);
        (a.x, DType::from_code(a.x_dtype), runs)
    }

    /// Columns `h0..h0 + hn` of every row, added into `x` (`accumulate`) or
    /// written over it.
    #[allow(clippy::too_many_arguments)]
    pub fn task(
        x: &BufSlice,
        y: &BufSlice,
        weights: &BufSlice,
        list: &BufSlice,
        m: usize,
        hidden: usize,
        experts: usize,
        slots: usize,
        h0: usize,
        hn: usize,
        accumulate: bool,
    ) -> Result<TaskSpec, ProgramError> {
        want_float::<MoeCombine>("x", x)?;
        if y.dtype() != DType::F32 || weights.dtype() != DType::F32 || list.dtype() != DType::U32 {
            return Err(bad::<MoeCombine>("y and weights must be f32, list u32"));
        }
        if hn == 0
            || h0 + hn > hidden
            || x.len() < m * hidden
            || y.len() < slots * m * hidden
            || weights.len() < m * experts
            || list.len() < 1 + slots
        {
            return Err(bad::<MoeCombine>(
                "columns out of range or buffers too small",
            ));
        }
        let args = MoeCombineArgs {
            x: x.addr(),
            y: y.addr(),
            weights: weights.addr(),
            list: list.addr(),
            m: m as u32,
            hidden: hidden as u32,
            experts: experts as u32,
            h0: h0 as u32,
            hn: hn as u32,
            x_dtype: x.dtype().code(),
            accumulate: u32::from(accumulate),
            slots: slots as u32,
        };
        Ok(TaskSpec::new::<MoeCombine>(args, &[x, y, weights, list]))
    }
}

impl TaskKind for MoeCombine {
    type Args = MoeCombineArgs;
    const NAME: &'static str = "moe_combine";
    fn cpu(a: &MoeCombineArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let xd = DType::from_code(a.x_dtype).ok_or(TaskFault::BadArgs("moe_combine dtype"))?;
        let (m, h, e) = (a.m as usize, a.hidden as usize, a.experts as usize);
        let count = mem.read_u32(a.list, 1)?[0] as usize;
        let ids = mem.read_u32(a.list + 4, count)?;
        let w = mem.read_f32(a.weights, DType::F32, m * e)?;
        for i in 0..m {
            let at = a.x + ((i * h + a.h0 as usize) * xd.size()) as u64;
            let mut sum = vec![0f32; a.hn as usize];
            for (s, &id) in ids.iter().enumerate() {
                let weight = w[i * e + id as usize];
                if weight == 0.0 {
                    // Not routed here: the expert did not compute this row.
                    continue;
                }
                let y = mem.read_f32(
                    a.y + (((s * m + i) * h + a.h0 as usize) * 4) as u64,
                    DType::F32,
                    a.hn as usize,
                )?;
                sum.iter_mut().zip(&y).for_each(|(a, b)| *a += weight * b);
            }
            if a.accumulate != 0 {
                let x = mem.read_f32(at, xd, a.hn as usize)?;
                sum.iter_mut().zip(&x).for_each(|(s, x)| *s += x);
            }
            mem.write_f32(at, xd, &sum)?;
        }
        Ok(())
    }
    fn layout() -> Layout {
        layout!(MoeCombineArgs {
            x,
            y,
            weights,
            list,
            m,
            hidden,
            experts,
            h0,
            hn,
            x_dtype,
            accumulate,
            slots
        })
    }
}
