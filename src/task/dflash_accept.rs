//! `dflash_accept`: ends a DFlash iteration. With the verify block's inputs
//! `ids = [last, p₁ … p_{B−1}]` and the target's greedy choice after each row
//! `targets`, it accepts the longest prefix of proposals the target agrees
//! with plus the target's own next token (`acc` tokens, 1..=B), emits them
//! (clipped to the command's token limit, the context, and a stop token),
//! advances the position and makes the last emitted token the next input of
//! the draft block, the verify block and the one-token step. When the command
//! has what it asked for it stamps the stop word with the running epoch (see
//! [`Executor::submit_until`](crate::exec::Executor::submit_until)).

use bytemuck::{Pod, Zeroable};

use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Words of the accept state (`u32`).
pub mod state {
    /// Tokens the running command may emit (set by the host).
    pub const LIMIT: usize = 0;
    /// Tokens emitted by the running command (zeroed by the host).
    pub const PRODUCED: usize = 1;
    /// A token that ends generation once emitted (`u32::MAX`: none).
    pub const STOP_TOKEN: usize = 2;
    /// Iterations run (cumulative).
    pub const ITERS: usize = 3;
    /// Why the last command ended: 0 not yet, 1 limit, 2 stop token, 3 context full.
    pub const REASON: usize = 4;
    /// Histogram of acceptance lengths: `HIST + acc` counts iterations that
    /// accepted `acc` tokens (1..=16; cumulative).
    pub const HIST: usize = 5;
    /// Injected-acceptance benchmarks: the mean acceptance length × 1000
    /// (see [`DflashInject`](crate::task::dflash_inject::DflashInject)).
    pub const TAU_MILLI: usize = 22;
    /// Length of the state.
    pub const LEN: usize = 24;
}

/// Arguments of [`DflashAccept`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct DflashAcceptArgs {
    /// `u32 [block]` verify inputs `[last, proposals…]`; `ids[0]` becomes the next input.
    pub ids: u64,
    /// `u32 [block]` the target's greedy token after each verify row.
    pub targets: u64,
    /// Address of the `u32` position (tokens in the target's KV cache).
    pub pos: u64,
    /// `u32 [state::LEN]` accept state.
    pub state: u64,
    /// `u64` stop word.
    pub stop: u64,
    /// `u32 [block]` draft block inputs; `[0]` becomes the next input.
    pub draft_ids: u64,
    /// `u32` input of the one-token step; becomes the next input.
    pub step_ids: u64,
    /// Block size.
    pub block: u32,
    /// Positions the context holds.
    pub max_pos: u32,
}

/// DFlash acceptance.
pub struct DflashAccept;

/// The buffers [`DflashAccept`] reads and writes.
pub struct AcceptIo<'a> {
    /// Verify inputs.
    pub ids: &'a BufSlice,
    /// Target tokens per verify row.
    pub targets: &'a BufSlice,
    /// Position.
    pub pos: &'a BufSlice,
    /// Accept state.
    pub state: &'a BufSlice,
    /// Stop word (two `u32`).
    pub stop: &'a BufSlice,
    /// Draft block inputs.
    pub draft_ids: &'a BufSlice,
    /// One-token step input.
    pub step_ids: &'a BufSlice,
}

impl DflashAccept {
    /// The task for blocks of `block` tokens in a context of `max_pos` positions.
    pub fn task(io: &AcceptIo<'_>, block: usize, max_pos: usize) -> Result<TaskSpec, ProgramError> {
        let all = [
            io.ids,
            io.targets,
            io.pos,
            io.state,
            io.stop,
            io.draft_ids,
            io.step_ids,
        ];
        if all.iter().any(|s| s.dtype() != DType::U32) {
            return Err(bad::<DflashAccept>("every buffer is u32"));
        }
        if !(2..=16).contains(&block) {
            return Err(bad::<DflashAccept>(format!(
                "block size {block} outside 2..=16"
            )));
        }
        if io.ids.len() < block
            || io.targets.len() < block
            || io.draft_ids.len() < block
            || io.state.len() < state::LEN
            || io.stop.len() < 2
            || io.pos.is_empty()
            || io.step_ids.is_empty()
        {
            return Err(bad::<DflashAccept>("a buffer is too short"));
        }
        let max_pos =
            u32::try_from(max_pos).map_err(|_| bad::<DflashAccept>("context too long"))?;
        let args = DflashAcceptArgs {
            ids: io.ids.addr(),
            targets: io.targets.addr(),
            pos: io.pos.addr(),
            state: io.state.addr(),
            stop: io.stop.addr(),
            draft_ids: io.draft_ids.addr(),
            step_ids: io.step_ids.addr(),
            block: block as u32,
            max_pos,
        };
        Ok(TaskSpec::new::<DflashAccept>(args, &all))
    }
}

impl TaskKind for DflashAccept {
    type Args = DflashAcceptArgs;
    const NAME: &'static str = "dflash_accept";
    fn cpu(a: &DflashAcceptArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let b = a.block as usize;
        let mut ids = mem.read_u32(a.ids, b)?;
        let targets = mem.read_u32(a.targets, b)?;
        let mut st = mem.read_u32(a.state, state::LEN)?;
        let p = mem.read_u32(a.pos, 1)?[0];
        let mut acc = 1;
        while acc < b && ids[acc] == targets[acc - 1] {
            acc += 1;
        }
        let (produced, limit) = (st[state::PRODUCED], st[state::LIMIT]);
        let mut n = acc
            .min(limit.saturating_sub(produced) as usize)
            .min(a.max_pos.saturating_sub(p) as usize);
        let mut reason = 0;
        if let Some(i) = targets[..n]
            .iter()
            .position(|&t| t == st[state::STOP_TOKEN])
        {
            n = i + 1;
            reason = 2;
        }
        st[state::ITERS] = st[state::ITERS].wrapping_add(1);
        st[state::HIST + acc.min(16)] += 1;
        if n > 0 {
            mem.emit(
                &targets[..n]
                    .iter()
                    .map(|&t| u64::from(t))
                    .collect::<Vec<_>>(),
            );
            let last = targets[n - 1];
            ids[0] = last;
            mem.write_u32(a.ids, &ids[..1])?;
            mem.write_u32(a.draft_ids, &[last])?;
            mem.write_u32(a.step_ids, &[last])?;
            mem.write_u32(a.pos, &[p + n as u32])?;
            st[state::PRODUCED] = produced + n as u32;
        }
        if reason == 0 && produced + n as u32 >= limit {
            reason = 1;
        }
        if reason == 0 && p + n as u32 >= a.max_pos {
            reason = 3;
        }
        if reason != 0 {
            st[state::REASON] = reason;
            let e = mem.epoch();
            mem.write_u32(a.stop, &[e as u32, (e >> 32) as u32])?;
        }
        mem.write_u32(a.state, &st)
    }
    fn layout() -> Layout {
        layout!(DflashAcceptArgs {
            ids,
            targets,
            pos,
            state,
            stop,
            draft_ids,
            step_ids,
            block,
            max_pos
        })
    }
}
