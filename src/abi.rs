//! Records shared bit-for-bit between the host and the resident kernel.
//!
//! Every struct here has a twin in `kernels/include/abi.cuh`. Both sides pin
//! their sizes and field offsets to the same literal numbers: the CUDA side with
//! `static_assert`, this side with the tables in [`layouts`], which a unit test
//! compares against the CUDA header text. A change on one side without the other
//! fails either the kernel build or `cargo test`.

use bytemuck::{Pod, Zeroable};

/// Sentinel for "no event" in [`TaskDesc::wait`] and [`TaskDesc::signal`].
pub const NO_EVENT: u32 = u32::MAX;
/// Number of `u64` argument slots in a task descriptor.
pub const TASK_ARG_SLOTS: usize = 11;
/// Number of events a task may wait on.
pub const TASK_WAITS: usize = 2;
/// Number of `u64` parameters a command carries to its program.
pub const COMMAND_PARAMS: usize = 8;
/// Threads per block of the resident kernel.
pub const BLOCK_THREADS: u32 = 512;

/// One unit of work for one block, 128 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TaskDesc {
    /// Opcode from the task registry.
    pub opcode: u16,
    /// `TASK_FLAG_*` bits.
    pub flags: u16,
    /// Index of the task in the program as built (for error reports).
    pub id: u32,
    /// Event counter incremented by one when the task completes, or [`NO_EVENT`].
    pub signal: u32,
    /// Bit `i` set: argument slot `i` gets `params[param_sel nibble i]` added at run time.
    pub param_mask: u32,
    /// Events waited on before the task runs ([`NO_EVENT`] for unused slots).
    pub wait: [u32; TASK_WAITS],
    /// Per-iteration count each waited event must reach: the task of program
    /// epoch `e` waits until `counter >= wait_need * e`.
    pub wait_need: [u32; TASK_WAITS],
    /// Four bits per argument slot: which command parameter to add.
    pub param_sel: u64,
    /// The task kind's own argument record (see each kind's `Args`).
    pub args: [u64; TASK_ARG_SLOTS],
}

/// Task flag: `args[TASK_ARG_SLOTS - 1]` is a 16-byte-aligned device address
/// and the low 32 bits of `args[TASK_ARG_SLOTS - 2]` a byte count (a multiple
/// of 16) that the task
/// will stream; the device may prefetch that range into L2 one task ahead,
/// before the task's waits are satisfied.
pub const TASK_FLAG_PREFETCH: u16 = 1;

/// Task flag, with [`TASK_FLAG_PREFETCH`]: the declared range does not change
/// while the program runs (weights), so the device may copy it into the top of
/// the block's shared memory before the task's waits (Hopper bulk copies) and
/// the task reads it from there. The high 32 bits of the byte-count slot are
/// the shared memory the task keeps for itself below the copy.
pub const TASK_FLAG_STAGE: u16 = 2;

/// Command kind: run a program for some iterations.
pub const CMD_RUN: u32 = 1;
/// Command kind: stop the resident kernel.
pub const CMD_SHUTDOWN: u32 = 2;
/// Flag or-ed into a [`CMD_RUN`] kind: record each task's start and end time
/// (`globaltimer`, ns) into the program's trace area, two `u64`s per task slot,
/// placed right after the task array.
pub const CMD_FLAG_TRACE: u32 = 0x100;
/// Flag or-ed into a [`CMD_RUN`] kind: the last command parameter is the
/// address of a `u64` stop word; a task that writes its epoch there ends the
/// command after the current iteration (see [`Executor::submit_until`](crate::exec::Executor::submit_until)).
pub const CMD_FLAG_UNTIL: u32 = 0x200;

/// One entry of the host → device command ring, 128 bytes. It carries the
/// program's device addresses itself, so a block needs no further dependent
/// load before it can fetch its first task.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Command {
    /// `CMD_*`.
    pub kind: u32,
    /// Iterations to run.
    pub iterations: u32,
    /// Sequence number of the command (1-based).
    pub seq: u64,
    /// Program epoch before this command (times the program ran so far).
    pub epoch_base: u64,
    /// Global iteration count before this command.
    pub iter_base: u64,
    /// Device address of the program's task array, grouped by worker.
    pub tasks: u64,
    /// Device address of `num_workers + 1` `u32` offsets into `tasks`.
    pub worker_offsets: u64,
    /// Device address of the program's `num_events` `u64` monotonic counters.
    pub events: u64,
    /// Number of event counters.
    pub num_events: u32,
    /// Number of workers the program was laid out for.
    pub num_workers: u32,
    /// Parameters substituted into argument slots selected by `param_mask`.
    pub params: [u64; COMMAND_PARAMS],
}

/// Capacity of the command ring (entries).
pub const COMMAND_RING_CAP: u32 = 64;
/// Bytes of one host command-ring slot: the 128-byte [`Command`] as sixteen
/// 16-byte chunks `{word, seq}`. The device reads a whole slot in one batch of
/// loads and accepts it when every chunk carries the expected sequence number
/// (the host writes each word before its tag), so a command costs one PCIe
/// round trip instead of a head poll plus a read.
pub const COMMAND_SLOT_BYTES: u32 = 256;
/// Capacity of the output ring (`u64` values).
pub const OUTPUT_RING_CAP: u32 = 1 << 16;

/// Error kinds written by the device into [`ErrorRecord::kind`].
pub mod fault {
    /// A wait did not complete within the timeout.
    pub const HANG: u32 = 1;
    /// A task carried an opcode the kernel does not know.
    pub const BAD_OPCODE: u32 = 2;
    /// An index read or carried by a task was out of range.
    pub const OUT_OF_RANGE: u32 = 3;
    /// A task's arguments were inconsistent.
    pub const BAD_ARGS: u32 = 4;
    /// A collective task saw the cluster's abort word naming a failed rank.
    pub const PEER_FAILED: u32 = 5;
}

/// Which counter a hang was waiting on ([`ErrorRecord::event`] for waits that
/// are not program events).
pub mod wait_site {
    /// The global "iteration done" counter (source tasks).
    pub const ITERATION: u32 = 0xFFFF_FF00;
    /// Space in the output ring.
    pub const OUTPUT_SPACE: u32 = 0xFFFF_FF01;
    /// Ordering of output ring publication.
    pub const OUTPUT_ORDER: u32 = 0xFFFF_FF02;
    /// `PEER + q`: rank `q`'s arrival at a collective (up to 256 ranks).
    pub const PEER: u32 = 0xFFFF_FE00;
}

/// The device's error report, in mapped host memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ErrorRecord {
    /// Zero while no error happened; then a [`fault`] kind.
    pub kind: u32,
    /// SM (block index) that reported.
    pub sm: u32,
    /// Task id in its program.
    pub task: u32,
    /// Opcode of the task.
    pub opcode: u32,
    /// Event (or [`wait_site`]) a hang waited on.
    pub event: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Value seen (hang) or offending index (out of range).
    pub seen: u64,
    /// Value needed (hang) or bound (out of range).
    pub needed: u64,
    /// Sequence number of the command that was running.
    pub command: u64,
}

/// Host-visible status block in mapped host memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct StatusBlock {
    /// Reserved, zero.
    pub reserved0: u64,
    /// Global iterations completed by every worker.
    pub iterations_done: u64,
    /// Values published into the output ring.
    pub out_published: u64,
    /// Values the host has consumed from the output ring.
    pub out_consumed: u64,
    /// Set by the host to make the kernel stop at its next wait.
    pub abort: u32,
    /// Set by the kernel once every block has exited its loop.
    pub exited: u32,
    /// Reserved, zero.
    pub reserved: [u64; 2],
    /// The error report.
    pub error: ErrorRecord,
}

/// Device-memory state of the resident kernel (never touched by the host after launch).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct DeviceState {
    /// Number of commands copied from the host ring into `commands`.
    pub cmd_head: u64,
    /// Worker-iterations completed (each worker adds one per iteration).
    pub worker_iters: u64,
    /// Output ring slots reserved.
    pub out_reserved: u64,
    /// Output ring slots published (device copy of the host value).
    pub out_published: u64,
    /// Non-zero once an error was claimed or an abort seen.
    pub abort: u32,
    /// Blocks that have exited.
    pub exited_blocks: u32,
    /// Reserved, zero.
    pub reserved: [u64; 2],
}

/// Kernel parameters of the resident kernel, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct KernelParams {
    /// Host command ring (`COMMAND_RING_CAP` tagged slots of `COMMAND_SLOT_BYTES`, mapped host memory).
    pub host_commands: u64,
    /// Device copy of the command ring.
    pub dev_commands: u64,
    /// [`StatusBlock`] (mapped host memory).
    pub status: u64,
    /// [`DeviceState`] (device memory, zeroed before launch).
    pub state: u64,
    /// Output ring (`OUTPUT_RING_CAP` `u64`s, mapped host memory).
    pub output: u64,
    /// Device wait timeout in nanoseconds.
    pub wait_timeout_ns: u64,
}

/// Size/offset tables, kept in step with `kernels/include/abi.cuh`.
pub mod layouts {
    use super::*;

    /// A struct's name, size and `(field, offset)` pairs.
    pub type Layout = (&'static str, usize, Vec<(&'static str, usize)>);

    macro_rules! layout {
        ($t:ty { $($f:ident),* $(,)? }) => {
            (stringify!($t), ::core::mem::size_of::<$t>(), vec![$((stringify!($f), ::core::mem::offset_of!($t, $f))),*])
        };
    }
    pub(crate) use layout;

    /// Every shared record of the runtime itself (task kinds add their own).
    pub fn all() -> Vec<Layout> {
        vec![
            layout!(TaskDesc {
                opcode,
                flags,
                id,
                signal,
                param_mask,
                wait,
                wait_need,
                param_sel,
                args
            }),
            layout!(Command {
                kind,
                iterations,
                seq,
                epoch_base,
                iter_base,
                tasks,
                worker_offsets,
                events,
                num_events,
                num_workers,
                params
            }),
            layout!(ErrorRecord {
                kind,
                sm,
                task,
                opcode,
                event,
                seen,
                needed,
                command
            }),
            layout!(StatusBlock {
                reserved0,
                iterations_done,
                out_published,
                out_consumed,
                abort,
                exited,
                error
            }),
            layout!(DeviceState {
                cmd_head,
                worker_iters,
                out_reserved,
                out_published,
                abort,
                exited_blocks
            }),
            layout!(KernelParams {
                host_commands,
                dev_commands,
                status,
                state,
                output,
                wait_timeout_ns
            }),
        ]
    }
}

const _: () = assert!(core::mem::size_of::<TaskDesc>() == 128);
const _: () = assert!(core::mem::size_of::<Command>() == 128);

impl TaskDesc {
    /// The argument slots with command parameters substituted, or `None` when
    /// a slot selects a parameter index out of range.
    pub fn resolved_args(&self, params: &[u64; COMMAND_PARAMS]) -> Option<[u64; TASK_ARG_SLOTS]> {
        let mut args = self.args;
        for (i, a) in args.iter_mut().enumerate() {
            if self.param_mask & (1 << i) != 0 {
                *a = *params.get(((self.param_sel >> (4 * i)) & 0xF) as usize)?;
            }
        }
        Some(args)
    }
}
