//! # megakernel
//!
//! LLM decoding on NVIDIA GPUs as **one resident kernel per device**. The
//! kernel is launched once per [`Runtime`](cuda::Runtime), keeps one block on
//! every SM, and executes *task programs*: static DAGs of fixed-size task
//! descriptors laid out into per-SM lists, synchronised by 64-bit monotonic
//! event counters. The host enqueues "run program P k times" through a ring in
//! mapped pinned memory and never launches per-layer kernels. The same programs
//! run on a pure-Rust [`CpuExecutor`](cpu::CpuExecutor), the ground truth for
//! GPU tests and the fallback without a GPU.
//!
//! | module | holds |
//! | --- | --- |
//! | [`error`] | the crate's one error type |
//! | [`abi`] | `#[repr(C)]` records shared with the CUDA side |
//! | [`buffer`] | element types and executor-owned buffers |
//! | [`task`] | task kinds: arguments, builders, CPU reference ops, the registry |
//! | [`program`] | program builder, validation, per-worker schedule |
//! | [`exec`] | the [`Executor`](exec::Executor) trait both backends implement |
//! | [`cpu`] | the multi-threaded CPU executor |
//! | [`cuda`] | the resident-kernel runtime on NVIDIA GPUs |
//! | [`cluster`] | several devices (ranks) running one model split by tensor parallelism |
//! | [`model`] | Hugging Face configs, safetensors, random-weight checkpoints, tokenizer, Qwen3 models and sessions |
//!
//! ```
//! use megakernel::prelude::*;
//! # fn main() -> megakernel::Result<()> {
//! let exec = megakernel::default_executor();
//! let x = exec.alloc(DType::F32, 4096)?;
//! let sum = exec.alloc(DType::F32, 1)?;
//! exec.write_f32(&x, &vec![0.5; 4096])?;
//! let mut b = ProgramBuilder::new();
//! let done = b.event("sum");
//! b.push(task::reduce_sum::ReduceSum::task(&x.all(), &sum.all())?).signal(done);
//! let program = exec.load(&b.build()?)?;
//! exec.run(&program, 1, &[])?;
//! assert_eq!(exec.read_f32(&sum)?[0], 2048.0);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod abi;
pub mod buffer;
pub mod cluster;
pub mod cpu;
pub mod cuda;
pub mod dflash;
pub mod error;
pub mod exec;
pub mod model;
pub mod program;
pub mod quant;
pub mod task;

pub use error::{Error, Result};

/// The names most programs need.
pub mod prelude {
    pub use crate::buffer::{BufSlice, Buffer, DType};
    pub use crate::cpu::{CpuExecutor, CpuOptions};
    pub use crate::cuda::{Runtime, RuntimeOptions};
    pub use crate::exec::{Executor, ExecutorExt, LoadedProgram, Ticket};
    pub use crate::program::{EventId, Program, ProgramBuilder};
    pub use crate::task;
    pub use crate::{Error, Result};
}

/// The GPU runtime on device 0 when a usable GPU exists, otherwise the CPU
/// executor. The second value says why the GPU was not used, if it was not.
pub fn default_executor_with_reason() -> (Box<dyn exec::Executor>, Option<Error>) {
    match cuda::Runtime::new(0) {
        Ok(rt) => (Box::new(rt), None),
        Err(e) => (
            Box::new(cpu::CpuExecutor::new(cpu::CpuOptions::default())),
            Some(e),
        ),
    }
}

/// The GPU runtime on device 0 when a usable GPU exists, otherwise the CPU executor.
pub fn default_executor() -> Box<dyn exec::Executor> {
    default_executor_with_reason().0
}
