//! `emit`: appends `u32` values from memory to the output ring, where the host
//! reads them as they are produced (later: tokens).

use bytemuck::{Pod, Zeroable};

use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`Emit`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct EmitArgs {
    /// Source address of `u32` values.
    pub src: u64,
    /// Values to emit.
    pub n: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Output-ring writer.
pub struct Emit;

/// Most values one emit task may append.
pub const MAX_EMIT: usize = 1024;

impl Emit {
    /// Emits every element of `src` (a `u32` slice of at most [`MAX_EMIT`] elements).
    pub fn task(src: &BufSlice) -> Result<TaskSpec, ProgramError> {
        if src.dtype() != DType::U32 {
            return Err(bad::<Emit>("source must be u32"));
        }
        if src.is_empty() || src.len() > MAX_EMIT {
            return Err(bad::<Emit>(format!(
                "emits 1..={MAX_EMIT} values, not {}",
                src.len()
            )));
        }
        let args = EmitArgs {
            src: src.addr(),
            n: src.len() as u32,
            reserved: 0,
        };
        Ok(TaskSpec::new::<Emit>(args, &[src]))
    }
}

impl TaskKind for Emit {
    type Args = EmitArgs;
    const NAME: &'static str = "emit";
    fn cpu(a: &EmitArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let v = mem.read_u32(a.src, a.n as usize)?;
        mem.emit(&v.iter().map(|&x| u64::from(x)).collect::<Vec<_>>());
        Ok(())
    }
    fn layout() -> Layout {
        layout!(EmitArgs { src, n, reserved })
    }
}
