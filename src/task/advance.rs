//! `advance`: ends a decode step: `ids[0] = token[0]` (the next input) and
//! `pos[0] += m` (the next position).

use bytemuck::{Pod, Zeroable};

use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`Advance`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AdvanceArgs {
    /// Address of the `u32` position.
    pub pos: u64,
    /// Address of the `u32` next-input id.
    pub ids: u64,
    /// Address of the `u32` token just chosen.
    pub token: u64,
    /// Positions consumed by the step.
    pub m: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Step bookkeeping.
pub struct Advance;

impl Advance {
    /// `ids[0] = token[0]; pos[0] += m`.
    pub fn task(
        pos: &BufSlice,
        ids: &BufSlice,
        token: &BufSlice,
        m: u32,
    ) -> Result<TaskSpec, ProgramError> {
        if [pos, ids, token]
            .iter()
            .any(|s| s.dtype() != DType::U32 || s.is_empty())
        {
            return Err(bad::<Advance>("pos, ids and token must be u32"));
        }
        let args = AdvanceArgs {
            pos: pos.addr(),
            ids: ids.addr(),
            token: token.addr(),
            m,
            reserved: 0,
        };
        Ok(TaskSpec::new::<Advance>(args, &[pos, ids, token]))
    }
}

impl TaskKind for Advance {
    type Args = AdvanceArgs;
    const NAME: &'static str = "advance";
    fn cpu(a: &AdvanceArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let t = mem.read_u32(a.token, 1)?;
        mem.write_u32(a.ids, &t)?;
        let p = mem.read_u32(a.pos, 1)?[0];
        mem.write_u32(a.pos, &[p.wrapping_add(a.m)])
    }
    fn layout() -> Layout {
        layout!(AdvanceArgs {
            pos,
            ids,
            token,
            m,
            reserved
        })
    }
}
