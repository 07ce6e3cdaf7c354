//! Task programs: a builder for DAGs of tasks joined by events, validation,
//! and the static layout into per-worker lists.
//!
//! Dependencies are expressed through *events*: a task signals at most one
//! event when it completes and waits on at most
//! [`TASK_WAITS`](crate::abi::TASK_WAITS) events before it starts. An event's
//! count per run is the number of tasks that signal it, so a consumer of
//! epoch `e` waits until `counter >= producers * e` and counters are never
//! reset between runs.

mod builder;
pub mod ops;
mod schedule;
pub mod trace;

pub use builder::{EventId, Program, ProgramBuilder, TaskHandle, TaskId};
pub use schedule::Schedule;
