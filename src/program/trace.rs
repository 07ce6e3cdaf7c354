//! Task timings recorded by the device for one run of a program, and where
//! the time went, stage by stage.

use super::Program;
use crate::abi::NO_EVENT;

/// When one task ran (device `globaltimer`, nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskTime {
    /// Task id in the program.
    pub task: u32,
    /// Worker (SM) that ran it.
    pub worker: u32,
    /// After its waits were satisfied.
    pub start_ns: u64,
    /// After every thread finished, before its signal.
    pub end_ns: u64,
}

/// The timings of every task of one run.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// One entry per task that ran.
    pub tasks: Vec<TaskTime>,
}

/// The tasks that signal one event (a stage), timed.
#[derive(Clone, Debug, PartialEq)]
pub struct StageTime {
    /// The event's name (with `layer N ` removed by [`Trace::by_kind`]).
    pub name: String,
    /// Tasks in the stage (summed over layers by [`Trace::by_kind`]).
    pub tasks: usize,
    /// Stages merged into this row.
    pub count: usize,
    /// Time from the previous stage's last end to this stage's last end: its
    /// share of the critical path (the shares add up to the whole run).
    pub critical_ns: u64,
    /// Mean over tasks of end − start: the work itself, without waiting.
    pub mean_task_ns: f64,
}

impl Trace {
    /// From first start to last end.
    pub fn total_ns(&self) -> u64 {
        let start = self.tasks.iter().map(|t| t.start_ns).min().unwrap_or(0);
        let end = self.tasks.iter().map(|t| t.end_ns).max().unwrap_or(0);
        end.saturating_sub(start)
    }

    /// One row per signalled event, in order of completion; tasks that signal
    /// nothing are grouped as `(no event)`.
    pub fn stages(&self, program: &Program) -> Vec<StageTime> {
        let mut by_event: std::collections::BTreeMap<u32, (u64, u64, usize)> = Default::default();
        for t in &self.tasks {
            let ev = program
                .descs
                .get(t.task as usize)
                .map_or(NO_EVENT, |d| d.signal);
            let e = by_event.entry(ev).or_insert((0, 0, 0));
            e.0 = e.0.max(t.end_ns);
            e.1 += t.end_ns.saturating_sub(t.start_ns);
            e.2 += 1;
        }
        let mut rows: Vec<(u32, u64, u64, usize)> = by_event
            .into_iter()
            .map(|(ev, (end, busy, n))| (ev, end, busy, n))
            .collect();
        rows.sort_by_key(|r| r.1);
        let mut prev = self.tasks.iter().map(|t| t.start_ns).min().unwrap_or(0);
        rows.into_iter()
            .map(|(ev, end, busy, n)| {
                let critical = end.saturating_sub(prev);
                prev = prev.max(end);
                StageTime {
                    name: program.event_name(ev).unwrap_or("(no event)").to_string(),
                    tasks: n,
                    count: 1,
                    critical_ns: critical,
                    mean_task_ns: busy as f64 / n as f64,
                }
            })
            .collect()
    }

    /// [`stages`](Self::stages) with `layer N ` prefixes removed and equal
    /// names summed, largest critical share first.
    pub fn by_kind(&self, program: &Program) -> Vec<StageTime> {
        let mut rows: Vec<StageTime> = Vec::new();
        for s in self.stages(program) {
            let name = strip_layer(&s.name).to_string();
            match rows.iter_mut().find(|r| r.name == name) {
                Some(r) => {
                    let n = (r.tasks + s.tasks) as f64;
                    r.mean_task_ns =
                        (r.mean_task_ns * r.tasks as f64 + s.mean_task_ns * s.tasks as f64) / n;
                    r.tasks += s.tasks;
                    r.count += 1;
                    r.critical_ns += s.critical_ns;
                }
                None => rows.push(StageTime { name, ..s }),
            }
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.critical_ns));
        rows
    }
}

/// `layer 12 qkv` → `qkv`.
fn strip_layer(name: &str) -> &str {
    name.strip_prefix("layer ")
        .and_then(|r| r.split_once(' '))
        .filter(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
        .map_or(name, |(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_prefixes_are_stripped() {
        assert_eq!(strip_layer("layer 12 qkv"), "qkv");
        assert_eq!(strip_layer("layer x qkv"), "layer x qkv");
        assert_eq!(strip_layer("lm head"), "lm head");
    }
}
