//! `dflash_inject`: the benchmark's injected-acceptance mode. After the draft
//! has run its full computation, its proposals `ids[1..block]` are replaced by
//! a known greedy continuation `reference` (the token at each absolute
//! position), with the first mismatch placed so that iteration `k` accepts
//! `⌊(k+1)τ⌋ − ⌊kτ⌋` tokens (clamped to `1..=block`): a mean acceptance length
//! of τ, read from the accept state ([`state::TAU_MILLI`]) so that one
//! program serves every τ. Outputs stay the target's greedy tokens; only
//! acceptance is steered.

use bytemuck::{Pod, Zeroable};

use super::dflash_accept::state;
use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`DflashInject`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct DflashInjectArgs {
    /// `u32 [block]` verify inputs; proposals at `1..block`.
    pub ids: u64,
    /// `u32 [ref_len]` the greedy sequence by position.
    pub reference: u64,
    /// Address of the `u32` position of `ids[0]`.
    pub pos: u64,
    /// The accept state (its iteration count picks the pattern, τ its length).
    pub state: u64,
    /// Block size.
    pub block: u32,
    /// Positions `reference` covers.
    pub ref_len: u32,
    /// Vocabulary size (a mismatching token stays a valid id).
    pub vocab: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Injected acceptance (benchmarks only).
pub struct DflashInject;

/// Tokens iteration `k` accepts under a mean of `tau_milli / 1000`.
pub fn injected_length(k: u64, tau_milli: u32, block: u32) -> u32 {
    let t = u64::from(tau_milli);
    ((k + 1) * t / 1000 - k * t / 1000).clamp(1, u64::from(block)) as u32
}

impl DflashInject {
    /// The task.
    pub fn task(
        ids: &BufSlice,
        reference: &BufSlice,
        pos: &BufSlice,
        accept_state: &BufSlice,
        block: usize,
        vocab: usize,
    ) -> Result<TaskSpec, ProgramError> {
        if [ids, reference, pos, accept_state]
            .iter()
            .any(|s| s.dtype() != DType::U32)
        {
            return Err(bad::<DflashInject>("every buffer is u32"));
        }
        if ids.len() < block || !(2..=16).contains(&block) {
            return Err(bad::<DflashInject>("ids must hold a block of 2..=16"));
        }
        if accept_state.len() < state::LEN || pos.is_empty() || reference.is_empty() {
            return Err(bad::<DflashInject>("a buffer is too short"));
        }
        let u = |v: usize| u32::try_from(v).map_err(|_| bad::<DflashInject>("size over 2^32"));
        let args = DflashInjectArgs {
            ids: ids.addr(),
            reference: reference.addr(),
            pos: pos.addr(),
            state: accept_state.addr(),
            block: u(block)?,
            ref_len: u(reference.len())?,
            vocab: u(vocab)?,
            reserved: 0,
        };
        Ok(TaskSpec::new::<DflashInject>(
            args,
            &[ids, reference, pos, accept_state],
        ))
    }
}

impl TaskKind for DflashInject {
    type Args = DflashInjectArgs;
    const NAME: &'static str = "dflash_inject";
    fn cpu(a: &DflashInjectArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let b = a.block as usize;
        let mut ids = mem.read_u32(a.ids, b)?;
        let st = mem.read_u32(a.state, state::LEN)?;
        let k = st[state::ITERS];
        let want = injected_length(u64::from(k), st[state::TAU_MILLI], a.block) as usize;
        let p = mem.read_u32(a.pos, 1)?[0] as usize;
        let end = b.min((a.ref_len as usize).saturating_sub(p));
        if end > 1 {
            let reference = mem.read_u32(a.reference + 4 * p as u64, end)?;
            for i in 1..end {
                if i < want {
                    ids[i] = reference[i];
                } else if i == want {
                    ids[i] = (reference[i] + 1) % a.vocab;
                }
            }
        }
        mem.write_u32(a.ids, &ids)
    }
    fn layout() -> Layout {
        layout!(DflashInjectArgs {
            ids,
            reference,
            pos,
            state,
            block,
            ref_len,
            vocab,
            reserved
        })
    }
}
