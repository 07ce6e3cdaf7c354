//! `gemv_expert`: the `gemv_bf16` product for the expert in slot `slot` of a
//! routing list (see [`moe_route`](super::moe_route)): the matrix is expert
//! `list[1 + slot]` of a stacked `[experts, rows, cols]` tensor, the output is
//! slot `slot` of a `[slots, m, rows]` buffer, and with `x_per_slot` the input
//! is slot `slot` of a `[slots, m, cols]` buffer. A slot past the list's count
//! does nothing.

use bytemuck::{Pod, Zeroable};

use super::gemv_bf16::{GemvBf16, GemvBf16Args, GemvShape, Prologue};
use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`GemvExpert`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct GemvExpertArgs {
    /// The product for expert 0 and slot 0.
    pub gemv: GemvBf16Args,
    /// Routing list: count, then expert ids.
    pub list: u64,
    /// Slot of the list this task serves.
    pub slot: u32,
    /// 1: the input is per slot.
    pub x_per_slot: u16,
    /// Capacity of the routing list (where the row masks start).
    pub slots: u16,
}

/// Expert matrix-vector product through the routing list.
pub struct GemvExpert;

impl GemvExpert {
    /// Rows `row0..row0 + rows` of expert `list[1 + slot]`'s product; `w` holds
    /// `experts` stacked `[shape.rows, shape.cols]` matrices.
    #[allow(clippy::too_many_arguments)]
    pub fn rows(
        w: &BufSlice,
        x: &BufSlice,
        y: &BufSlice,
        list: &BufSlice,
        shape: GemvShape,
        experts: usize,
        slot: usize,
        slots: usize,
        x_per_slot: bool,
        row0: usize,
        rows: usize,
        prologue: &Prologue,
    ) -> Result<TaskSpec, ProgramError> {
        if list.dtype() != DType::U32 || list.len() < 1 + 2 * slots || slot >= slots {
            return Err(bad::<GemvExpert>(
                "list must be u32 with room for every slot",
            ));
        }
        let per = |n: usize, s: &BufSlice| s.len() >= n;
        if !per(experts * shape.rows * shape.cols, w)
            || !per(slots * shape.m * shape.rows, y)
            || !per(if x_per_slot { slots } else { 1 } * shape.m * shape.cols, x)
        {
            return Err(bad::<GemvExpert>(
                "w, x or y too small for every expert and slot",
            ));
        }
        // Checked as the product of expert 0, slot 0; the device adds the offsets
        // (to `up` too, which is laid out like `x`).
        let prologue = match prologue {
            Prologue::Swiglu(up) => {
                if up.len() < x.len() {
                    return Err(bad::<GemvExpert>("up must be laid out like x"));
                }
                Prologue::Swiglu(
                    up.sub(0, shape.m * shape.cols)
                        .map_err(|e| bad::<GemvExpert>(e.to_string()))?,
                )
            }
            other => other.clone(),
        };
        let spec = GemvBf16::rows_with(
            &w.sub(0, shape.rows * shape.cols)
                .map_err(|e| bad::<GemvExpert>(e.to_string()))?,
            &x.sub(0, shape.m * shape.cols)
                .map_err(|e| bad::<GemvExpert>(e.to_string()))?,
            &y.sub(0, shape.m * shape.rows)
                .map_err(|e| bad::<GemvExpert>(e.to_string()))?,
            shape,
            row0,
            rows,
            false,
            &prologue,
        )?;
        let mut bufs = vec![w, x, y, list];
        if let Prologue::RmsNorm(b, _) | Prologue::Swiglu(b) = &prologue {
            bufs.push(b);
        }
        let args = GemvExpertArgs {
            gemv: super::decode_args(&spec.args),
            list: list.addr(),
            slot: slot as u32,
            x_per_slot: u16::from(x_per_slot),
            slots: u16::try_from(slots).map_err(|_| bad::<GemvExpert>("over 2^16 slots"))?,
        };
        Ok(TaskSpec::new::<GemvExpert>(args, &bufs))
    }
}

/// The plain product this task performs, or `None` when its slot is empty.
fn resolve(a: &GemvExpertArgs, list: &[u32]) -> Result<Option<GemvBf16Args>, TaskFault> {
    let count = list[0];
    if a.slot >= count {
        return Ok(None);
    }
    let expert = u64::from(list[1 + a.slot as usize]);
    let mut g = a.gemv;
    g.w += expert * u64::from(g.ldy) * u64::from(g.cols) * 2;
    let ysize = DType::from_code(u32::from(g.y_dtype))
        .ok_or(TaskFault::BadArgs("gemv dtype"))?
        .size() as u64;
    g.y += u64::from(a.slot) * u64::from(g.m) * u64::from(g.ldy) * ysize;
    if a.x_per_slot != 0 {
        let xsize = DType::from_code(u32::from(g.x_dtype))
            .ok_or(TaskFault::BadArgs("gemv dtype"))?
            .size() as u64;
        let step = u64::from(a.slot) * u64::from(g.m) * u64::from(g.ldx) * xsize;
        g.x += step;
        if g.prologue == super::gemv_bf16::PROLOGUE_SWIGLU {
            g.aux += step;
        }
    }
    Ok(Some(g))
}

impl TaskKind for GemvExpert {
    type Args = GemvExpertArgs;
    const NAME: &'static str = "gemv_expert";
    fn cpu(a: &GemvExpertArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let list = mem.read_u32(a.list, a.slot as usize + 2)?;
        match resolve(a, &list)? {
            Some(g) => GemvBf16::cpu(&g, mem),
            None => Ok(()),
        }
    }
    fn layout() -> Layout {
        layout!(GemvExpertArgs {
            gemv,
            list,
            slot,
            x_per_slot,
            slots
        })
    }
}
