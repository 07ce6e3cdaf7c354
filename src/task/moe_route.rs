//! `moe_route`: Qwen3-MoE routing for `m` rows: softmax over the router logits,
//! top-k (lowest index on ties), optional renormalisation of the k weights.
//! Writes a dense `[m, experts]` weight table (zero for experts a row did not
//! choose) and the list of experts chosen by any row, in ascending order:
//! `list[0]` is the count, `list[1 + s]` the expert in slot `s`, and
//! `list[1 + slots + s]` a bit mask of the rows routed to it (`slots =
//! min(experts, m * top_k)`, the list's capacity). Expert tasks stride over the
//! list, so each chosen expert's weights are read once per step, and compute
//! only the rows in its mask. With a tally, the count is also added to
//! `tally[0]` and the routing counted in `tally[1]` (unique experts per block).

use bytemuck::{Pod, Zeroable};

use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Most experts the routing kernel handles.
pub const MAX_EXPERTS: usize = 1024;

/// Arguments of [`MoeRoute`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct MoeRouteArgs {
    /// Router logits, f32 `[m, experts]`.
    pub logits: u64,
    /// Output weights, f32 `[m, experts]`.
    pub weights: u64,
    /// Output list, `u32`: count, then ids.
    pub list: u64,
    /// Rows.
    pub m: u32,
    /// Experts.
    pub experts: u32,
    /// Experts per row.
    pub top_k: u32,
    /// 1: renormalise the chosen weights to sum to one.
    pub norm_topk: u32,
    /// Capacity of the list (`min(experts, m * top_k)`); the masks follow the ids.
    pub slots: u32,
    /// Zero.
    pub reserved: u32,
    /// `u32 [2]`: sum of the list counts and routings so far; 0 for none.
    pub tally: u64,
}

/// Slots of a routing list for `m` rows (its capacity).
pub fn list_slots(m: usize, experts: usize, top_k: usize) -> usize {
    experts.min(m * top_k)
}

/// Elements of a routing list for `m` rows: count, ids, row masks.
pub fn list_len(m: usize, experts: usize, top_k: usize) -> usize {
    1 + 2 * list_slots(m, experts, top_k)
}

/// Routing.
pub struct MoeRoute;

impl MoeRoute {
    /// Routes `m` rows over `experts` experts; with `tally` (`u32 [2]`) it
    /// also adds its list count and one routing there.
    #[allow(clippy::too_many_arguments)]
    pub fn task(
        logits: &BufSlice,
        weights: &BufSlice,
        list: &BufSlice,
        m: usize,
        experts: usize,
        top_k: usize,
        norm_topk: bool,
        tally: Option<&BufSlice>,
    ) -> Result<TaskSpec, ProgramError> {
        if tally.is_some_and(|t| t.dtype() != DType::U32 || t.len() < 2) {
            return Err(bad::<MoeRoute>("tally must be u32 [2]"));
        }
        if logits.dtype() != DType::F32
            || weights.dtype() != DType::F32
            || list.dtype() != DType::U32
        {
            return Err(bad::<MoeRoute>("logits and weights must be f32, list u32"));
        }
        if m == 0 || experts == 0 || experts > MAX_EXPERTS || top_k == 0 || top_k > experts.min(32)
        {
            return Err(bad::<MoeRoute>(format!(
                "{experts} experts, top {top_k}, m {m} unsupported"
            )));
        }
        if logits.len() < m * experts
            || weights.len() < m * experts
            || list.len() < list_len(m, experts, top_k)
        {
            return Err(bad::<MoeRoute>("logits, weights or list too small"));
        }
        let args = MoeRouteArgs {
            logits: logits.addr(),
            weights: weights.addr(),
            list: list.addr(),
            m: m as u32,
            experts: experts as u32,
            top_k: top_k as u32,
            norm_topk: u32::from(norm_topk),
            slots: list_slots(m, experts, top_k) as u32,
            reserved: 0,
            tally: tally.map_or(0, BufSlice::addr),
        };
        let mut bufs = vec![logits, weights, list];
        bufs.extend(tally);
        Ok(TaskSpec::new::<MoeRoute>(args, &bufs))
    }
}

impl TaskKind for MoeRoute {
    type Args = MoeRouteArgs;
    const NAME: &'static str = "moe_route";
    fn cpu(a: &MoeRouteArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let (m, e, k) = (a.m as usize, a.experts as usize, a.top_k as usize);
        let logits = mem.read_f32(a.logits, DType::F32, m * e)?;
        let mut weights = vec![0f32; m * e];
        let mut chosen = vec![false; e];
        for i in 0..m {
            let row = &logits[i * e..(i + 1) * e];
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let ex: Vec<f32> = row.iter().map(|v| (v - mx).exp()).collect();
            let total: f32 = ex.iter().sum();
            let p: Vec<f32> = ex.iter().map(|v| v / total).collect();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&x, &y| {
                p[y].partial_cmp(&p[x])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(x.cmp(&y))
            });
            let top = &order[..k];
            let sum: f32 = top.iter().map(|&j| p[j]).sum();
            for &j in top {
                weights[i * e + j] = if a.norm_topk != 0 { p[j] / sum } else { p[j] };
                chosen[j] = true;
            }
        }
        mem.write_f32(a.weights, DType::F32, &weights)?;
        let ids: Vec<u32> = (0..e as u32).filter(|&j| chosen[j as usize]).collect();
        let slots = a.slots as usize;
        if ids.len() > slots || m > 32 {
            return Err(TaskFault::BadArgs("routing list capacity"));
        }
        let mut list = vec![0u32; 1 + 2 * slots];
        list[0] = ids.len() as u32;
        for (s, &j) in ids.iter().enumerate() {
            list[1 + s] = j;
            list[1 + slots + s] = (0..m)
                .filter(|&i| weights[i * e + j as usize] != 0.0)
                .fold(0, |mask, i| mask | (1 << i));
        }
        mem.write_u32(a.list, &list)?;
        if a.tally != 0 {
            let t = mem.read_u32(a.tally, 2)?;
            mem.write_u32(
                a.tally,
                &[t[0].wrapping_add(ids.len() as u32), t[1].wrapping_add(1)],
            )?;
        }
        Ok(())
    }
    fn layout() -> Layout {
        layout!(MoeRouteArgs {
            logits,
            weights,
            list,
            m,
            experts,
            top_k,
            norm_topk,
            slots,
            reserved,
            tally
        })
    }
}
