//! The crate's error type.

use std::time::Duration;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the crate reports.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A CUDA driver call failed.
    #[error("CUDA driver call failed: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// No CUDA driver library could be loaded on this machine.
    #[error("no NVIDIA driver found (libcuda could not be loaded)")]
    NoDriver,
    /// The driver reports no device with this ordinal.
    #[error("no CUDA device {ordinal} (the driver reports {count})")]
    NoDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// The GPU is older than sm_80.
    #[error("GPU {name} has compute capability {major}.{minor}; megakernel needs 8.0 or newer")]
    UnsupportedGpu {
        /// Device name.
        name: String,
        /// Compute capability major.
        major: i32,
        /// Compute capability minor.
        minor: i32,
    },
    /// The resident kernel cannot keep one block on every SM.
    #[error("resident kernel cannot be co-resident: {0}")]
    Residency(String),
    /// A program failed validation.
    #[error("invalid program: {0}")]
    Program(#[from] ProgramError),
    /// A device wait did not complete in time.
    #[error("device hang: SM {sm}, task {task} ({task_kind}) of command {command} waited on {counter}: saw {seen}, needed {needed}")]
    DeviceHang {
        /// Worker (SM) that timed out.
        sm: u32,
        /// Task id in its program.
        task: u32,
        /// Task kind name.
        task_kind: &'static str,
        /// What was waited on.
        counter: String,
        /// Counter value seen last.
        seen: u64,
        /// Value needed.
        needed: u64,
        /// Command sequence number.
        command: u64,
    },
    /// A task found bad data (index out of range, bad opcode, bad arguments).
    #[error("device fault: {what} in SM {sm}, task {task} ({task_kind}) of command {command}: value {value}, bound {bound}")]
    DeviceFault {
        /// Kind of fault.
        what: &'static str,
        /// Worker (SM) that reported.
        sm: u32,
        /// Task id in its program.
        task: u32,
        /// Task kind name.
        task_kind: &'static str,
        /// Offending value.
        value: u64,
        /// Bound it violated.
        bound: u64,
        /// Command sequence number.
        command: u64,
    },
    /// A host-side wait ran out of time.
    #[error("host wait timed out after {waited:?} waiting for {what}")]
    HostTimeout {
        /// How long the host waited.
        waited: Duration,
        /// What it waited for.
        what: String,
    },
    /// The runtime stopped after an earlier error and accepts no more work.
    #[error("runtime stopped after an earlier error: {0}")]
    Stopped(String),
    /// A buffer or program belongs to another executor.
    #[error("{0} belongs to another executor")]
    Foreign(&'static str),
    /// A host-side access fell outside a buffer.
    #[error("access of {len} elements at {offset} is outside a buffer of {size}")]
    OutOfBounds {
        /// First element.
        offset: usize,
        /// Elements accessed.
        len: usize,
        /// Buffer length.
        size: usize,
    },
    /// A host-side argument was wrong.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A model file or configuration could not be used.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A rank of a [`Cluster`](crate::cluster::Cluster) failed; every rank's
    /// wait ends with this error naming the rank that failed first.
    #[error("rank {rank} of {ranks} failed: {source}")]
    RankFailed {
        /// The rank whose failure stopped the cluster.
        rank: usize,
        /// Ranks in the cluster.
        ranks: usize,
        /// Its error.
        source: Box<Error>,
    },
}

/// Why a checkpoint or its configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        message: String,
    },
    /// A file ends before its header says it should.
    #[error("{path}: truncated: needs {needed} bytes, has {actual}")]
    Truncated {
        /// The file.
        path: String,
        /// Bytes the header requires.
        needed: u64,
        /// Bytes present.
        actual: u64,
    },
    /// A safetensors header or index that is not valid.
    #[error("{path}: bad header: {reason}")]
    BadHeader {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's data lies outside the file's data section or disagrees with its shape.
    #[error("{path}: tensor '{tensor}': {reason}")]
    BadTensor {
        /// The file.
        path: String,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    /// A tensor the model does not use is present.
    #[error("unexpected tensor '{0}'")]
    UnexpectedTensor(String),
    /// A tensor has the wrong shape.
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype the loader does not accept.
    #[error("tensor '{name}' has dtype {dtype}; supported: BF16, F16, F32")]
    Dtype {
        /// Tensor name.
        name: String,
        /// Its dtype string.
        dtype: String,
    },
    /// A configuration that is malformed or names an unsupported model or option.
    #[error("config: {0}")]
    Config(String),
}

/// Why a program was rejected by the builder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// The dependency graph has a cycle through this task.
    #[error("dependency cycle through task {task} ({kind})")]
    Cycle {
        /// A task on the cycle.
        task: u32,
        /// Its kind.
        kind: &'static str,
    },
    /// A task waits on an event that no task signals.
    #[error("task {task} waits on event '{event}', which no task signals")]
    Unproduced {
        /// Waiting task.
        task: u32,
        /// Event name.
        event: String,
    },
    /// A wait count differs from the number of tasks that signal the event.
    #[error(
        "task {task} waits for {need} signals of event '{event}', but {producers} tasks signal it"
    )]
    InconsistentCount {
        /// Waiting task.
        task: u32,
        /// Event name.
        event: String,
        /// Count the task asked for.
        need: u32,
        /// Tasks signalling the event.
        producers: u32,
    },
    /// A task waits on more events than a descriptor holds.
    #[error("task {task} waits on {waits} events; at most {max} are allowed")]
    TooManyWaits {
        /// The task.
        task: u32,
        /// Waits asked for.
        waits: usize,
        /// Limit.
        max: usize,
    },
    /// A task signals more than one event.
    #[error("task {task} signals more than one event")]
    TooManySignals {
        /// The task.
        task: u32,
    },
    /// An event id from another builder.
    #[error("unknown event id {0}")]
    UnknownEvent(u32),
    /// A task's arguments do not fit its buffers or its kind.
    #[error("{kind}: {reason}")]
    BadArgs {
        /// Task kind.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A program with no tasks.
    #[error("program has no tasks")]
    Empty,
    /// Buffers of several executors in one program.
    #[error("program mixes buffers of different executors")]
    MixedExecutors,
}
