//! Task kinds: one file per kind, each with its argument record (shared with
//! `kernels/tasks/<kind>.cuh`), constructors that validate shapes against
//! buffers, and the CPU reference op. Opcodes are assigned in one place,
//! [`registry`].

use bytemuck::Pod;

use crate::abi::{layouts::Layout, TASK_ARG_SLOTS};
use crate::buffer::{BufSlice, Buffer, DType};
use crate::error::ProgramError;

pub mod advance;
pub mod all_reduce;
pub mod argmax;
pub mod attention;
pub mod attention_combine;
pub mod axpy;
pub mod copy;
pub mod dflash_accept;
pub mod dflash_inject;
pub mod embed;
pub mod emit;
pub mod fill;
pub mod fill_random;
pub mod fill_random_fp4;
pub mod gemv_bf16;
pub mod gemv_expert;
pub mod gemv_expert_fp4;
pub mod moe_combine;
pub mod moe_route;
pub mod nop;
pub mod reduce_sum;
pub mod registry;
pub mod rmsnorm;
pub mod rope_kv;
pub mod sample;
pub mod swiglu;

pub use registry::{kind_name, run_cpu, Registered};

/// A failure found by a task while it ran (the CPU twin of a device fault).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskFault {
    /// An index was out of range.
    OutOfRange {
        /// The index.
        index: u64,
        /// Its bound.
        bound: u64,
    },
    /// An address outside every buffer.
    BadAddress(u64),
    /// Arguments that make no sense.
    BadArgs(&'static str),
    /// The opcode is not in the registry.
    BadOpcode(u16),
    /// A collective waited longer than the timeout for rank `rank`.
    PeerHang {
        /// The rank that did not arrive.
        rank: u32,
        /// Its flag as last seen.
        seen: u64,
        /// The epoch needed.
        needed: u64,
    },
    /// A collective saw the cluster's abort word naming a failed rank.
    PeerFailed {
        /// The failed rank.
        rank: u32,
    },
}

/// Memory as the CPU reference ops see it: typed reads and writes by address,
/// with every access bounds-checked.
pub trait Memory: Sync {
    /// Reads `n` numbers of type `dtype` at `addr`, widened to f32.
    fn read_f32(&self, addr: u64, dtype: DType, n: usize) -> Result<Vec<f32>, TaskFault>;
    /// Writes `vals` at `addr`, narrowed to `dtype` (round to nearest even).
    fn write_f32(&self, addr: u64, dtype: DType, vals: &[f32]) -> Result<(), TaskFault>;
    /// Reads `n` raw 32-bit words.
    fn read_u32(&self, addr: u64, n: usize) -> Result<Vec<u32>, TaskFault>;
    /// Writes raw 32-bit words.
    fn write_u32(&self, addr: u64, vals: &[u32]) -> Result<(), TaskFault>;
    /// Appends values to the output ring.
    fn emit(&self, vals: &[u64]);
    /// The running program's epoch: how many times it ran, this iteration included.
    fn epoch(&self) -> u64;
    /// Longest a task may wait for another rank.
    fn wait_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(30)
    }
}

/// A task kind: its name, argument record and CPU reference.
pub trait TaskKind: 'static {
    /// The argument record stored in [`TaskDesc::args`](crate::abi::TaskDesc::args).
    type Args: Pod;
    /// snake_case name, the same as the file names on both sides.
    const NAME: &'static str;
    /// Bit `i` set: argument slot `i` (a `u64` of the record) may be replaced by
    /// a command parameter at run time. Only slots the device bounds-checks.
    const PARAM_SLOTS: u16 = 0;
    /// Runs the task on the CPU in f32.
    fn cpu(args: &Self::Args, mem: &dyn Memory) -> Result<(), TaskFault>;
    /// Size and field offsets of `Args`, checked against the CUDA header.
    fn layout() -> Layout;
}

/// One task ready to be pushed into a [`ProgramBuilder`](crate::program::ProgramBuilder).
#[derive(Clone, Debug)]
pub struct TaskSpec {
    pub(crate) opcode: u16,
    pub(crate) kind: &'static str,
    pub(crate) args: [u64; TASK_ARG_SLOTS],
    pub(crate) param_slots: u16,
    pub(crate) buffers: Vec<Buffer>,
    pub(crate) flags: u16,
    arg_bytes: usize,
}

impl TaskSpec {
    /// Packs a kind's arguments; `buffers` are those the task touches (kept
    /// alive by the program and checked to belong to its executor).
    pub fn new<K: TaskKind + Registered>(args: K::Args, buffers: &[&BufSlice]) -> TaskSpec {
        const { assert!(std::mem::size_of::<K::Args>() <= TASK_ARG_SLOTS * 8) };
        let mut slots = [0u64; TASK_ARG_SLOTS];
        let bytes = bytemuck::bytes_of(&args);
        bytemuck::cast_slice_mut::<u64, u8>(&mut slots)[..bytes.len()].copy_from_slice(bytes);
        TaskSpec {
            opcode: K::OPCODE,
            kind: K::NAME,
            args: slots,
            param_slots: K::PARAM_SLOTS,
            buffers: buffers.iter().map(|s| s.buffer().clone()).collect(),
            flags: 0,
            arg_bytes: bytes.len(),
        }
    }

    /// Declares that the task streams `bytes` bytes from `addr` (for example
    /// its slice of a weight matrix), so the device may prefetch them into L2
    /// while earlier tasks run ([`TASK_FLAG_PREFETCH`](crate::abi::TASK_FLAG_PREFETCH)).
    /// A hint: ignored when the range is misaligned or the kind's arguments
    /// leave no room for it.
    pub fn with_prefetch(mut self, addr: u64, bytes: u64) -> TaskSpec {
        let free = self.arg_bytes <= (TASK_ARG_SLOTS - 2) * 8;
        if free && addr % 16 == 0 && bytes % 16 == 0 && bytes > 0 && bytes <= u64::from(u32::MAX) {
            self.args[TASK_ARG_SLOTS - 1] = addr;
            self.args[TASK_ARG_SLOTS - 2] = bytes;
            self.flags |= crate::abi::TASK_FLAG_PREFETCH;
        }
        self
    }

    /// Records the shared memory (bytes) the task needs for itself, below a
    /// staged copy of its declared range ([`stage`](Self::stage)).
    pub fn with_scratch(mut self, bytes: u32) -> TaskSpec {
        if self.flags & crate::abi::TASK_FLAG_PREFETCH != 0 {
            let count = self.args[TASK_ARG_SLOTS - 2] & u64::from(u32::MAX);
            self.args[TASK_ARG_SLOTS - 2] = count | (u64::from(bytes) << 32);
        }
        self
    }

    /// Declares the range given to [`with_prefetch`](Self::with_prefetch)
    /// constant while the program runs (weights): the device may copy it into
    /// shared memory before the task's waits
    /// ([`TASK_FLAG_STAGE`](crate::abi::TASK_FLAG_STAGE)). Only for ranges no
    /// task of the program writes. Without a declared range, nothing changes.
    pub fn stage(mut self) -> TaskSpec {
        self.mark_staged();
        self
    }

    /// [`stage`](Self::stage) in place.
    pub(crate) fn mark_staged(&mut self) {
        if self.flags & crate::abi::TASK_FLAG_PREFETCH != 0 {
            self.flags |= crate::abi::TASK_FLAG_STAGE;
        }
    }

    /// A task with an arbitrary opcode, for fault-injection tests of the
    /// executors' opcode check. Validation accepts it; running it faults.
    #[doc(hidden)]
    pub fn raw_opcode(opcode: u16) -> TaskSpec {
        TaskSpec {
            opcode,
            kind: "raw",
            args: [0; TASK_ARG_SLOTS],
            param_slots: 0,
            buffers: Vec::new(),
            flags: 0,
            arg_bytes: 0,
        }
    }

    /// Edits the argument record of a task of kind `K`.
    pub(crate) fn map_args<K: TaskKind + Registered>(
        mut self,
        f: impl FnOnce(&mut K::Args),
    ) -> Self {
        debug_assert_eq!(self.opcode, K::OPCODE);
        let mut a: K::Args = decode_args(&self.args);
        f(&mut a);
        let bytes = bytemuck::bytes_of(&a);
        bytemuck::cast_slice_mut::<u64, u8>(&mut self.args)[..bytes.len()].copy_from_slice(bytes);
        self
    }

    /// The output elements of a product that writes an f32 buffer (a
    /// `gemv_bf16` or `moe_combine` task): the buffer's address and the runs
    /// of its elements the task writes. None for other kinds and types.
    pub(crate) fn written_f32(&self) -> Option<(u64, all_reduce::Runs)> {
        let (addr, dtype, runs) = if self.opcode == gemv_bf16::GemvBf16::OPCODE {
            gemv_bf16::GemvBf16::written(&decode_args(&self.args))
        } else if self.opcode == moe_combine::MoeCombine::OPCODE {
            moe_combine::MoeCombine::written(&decode_args(&self.args))
        } else {
            return None;
        };
        (dtype == Some(DType::F32)).then_some((addr, runs))
    }

    /// Opcode of the task.
    pub fn opcode(&self) -> u16 {
        self.opcode
    }
    /// Kind name.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

/// Reads a kind's argument record (`A`, e.g. a task file's `...Args`) out of
/// descriptor slots ([`TaskDesc::args`](crate::abi::TaskDesc::args)).
pub fn decode_args<A: Pod>(slots: &[u64; TASK_ARG_SLOTS]) -> A {
    let bytes = bytemuck::cast_slice::<u64, u8>(slots);
    bytemuck::pod_read_unaligned(&bytes[..std::mem::size_of::<A>()])
}

/// Shorthand for an argument error of kind `K`.
pub(crate) fn bad<K: TaskKind>(reason: impl Into<String>) -> ProgramError {
    ProgramError::BadArgs {
        kind: K::NAME,
        reason: reason.into(),
    }
}

/// Checks that a slice holds floats.
pub(crate) fn want_float<K: TaskKind>(what: &str, s: &BufSlice) -> Result<(), ProgramError> {
    if s.dtype().is_float() {
        Ok(())
    } else {
        Err(bad::<K>(format!(
            "{what} must be f32 or bf16, not {}",
            s.dtype()
        )))
    }
}

/// Checks that a slice has at least `n` elements.
pub(crate) fn want_len<K: TaskKind>(
    what: &str,
    s: &BufSlice,
    n: usize,
) -> Result<(), ProgramError> {
    if s.len() >= n {
        Ok(())
    } else {
        Err(bad::<K>(format!(
            "{what} has {} elements, needs {n}",
            s.len()
        )))
    }
}

/// Splits `n` items into `parts` nearly equal contiguous ranges (`start, len`),
/// dropping empty ones.
pub fn split_even(n: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.max(1).min(n.max(1));
    let (q, r) = (n / parts, n % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for i in 0..parts {
        let len = q + usize::from(i < r);
        if len > 0 {
            out.push((start, len));
        }
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::gemv_bf16::{GemvBf16, GemvShape, Prologue};
    use super::{fill::Fill, TASK_ARG_SLOTS};
    use crate::abi::{TASK_FLAG_PREFETCH, TASK_FLAG_STAGE};
    use crate::buffer::DType;
    use crate::cpu::{CpuExecutor, CpuOptions};
    use crate::exec::Executor;

    #[test]
    fn staging_needs_a_declared_range_and_keeps_the_scratch_size() {
        let ex = CpuExecutor::new(CpuOptions::default());
        let (rows, cols, m) = (48, 64, 3);
        let w = ex.alloc(DType::Bf16, rows * cols).unwrap();
        let x = ex.alloc(DType::F32, m * cols).unwrap();
        let y = ex.alloc(DType::F32, m * rows).unwrap();
        let shape = GemvShape { rows, cols, m };
        let spec = GemvBf16::rows_with(
            &w.all(),
            &x.all(),
            &y.all(),
            shape,
            16,
            8,
            false,
            &Prologue::None,
        )
        .unwrap();
        assert_eq!(spec.flags, TASK_FLAG_PREFETCH);
        let word = spec.args[TASK_ARG_SLOTS - 2];
        assert_eq!(spec.args[TASK_ARG_SLOTS - 1], w.addr() + 16 * 64 * 2);
        assert_eq!(word & u64::from(u32::MAX), 8 * 64 * 2);
        // Three f32 input rows copied into shared memory exceed the prologue's need.
        assert_eq!(
            word >> 32,
            (m * (cols * 4 + super::gemv_bf16::ROW_PAD)) as u64
        );
        let staged = spec.stage();
        assert_eq!(staged.flags, TASK_FLAG_PREFETCH | TASK_FLAG_STAGE);
        assert_eq!(staged.args[TASK_ARG_SLOTS - 2], word);
        // Without a declared range there is nothing to stage.
        let fill = Fill::task(&y.all(), 1.0).unwrap().stage();
        assert_eq!(fill.flags & TASK_FLAG_STAGE, 0);
    }
}
