//! `nop`: does nothing. Used for empty programs and dependency-latency chains.

use bytemuck::{Pod, Zeroable};

use super::{Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};

/// Arguments of [`Nop`] (none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NopArgs {
    /// Unused, zero.
    pub reserved: u64,
}

/// The empty task.
pub struct Nop;

impl Nop {
    /// A task that only waits and signals.
    pub fn task() -> TaskSpec {
        TaskSpec::new::<Nop>(NopArgs::default(), &[])
    }
}

impl TaskKind for Nop {
    type Args = NopArgs;
    const NAME: &'static str = "nop";
    fn cpu(_: &NopArgs, _: &dyn Memory) -> Result<(), TaskFault> {
        Ok(())
    }
    fn layout() -> Layout {
        layout!(NopArgs { reserved })
    }
}
