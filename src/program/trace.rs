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
    /// From the previous stage's last end to this stage's first start (0 when
    /// it started earlier): the dependency hop, where the stage waited
    /// (summed over layers by [`Trace::by_kind`]).
    pub first_start_ns: u64,
    /// From the previous stage's last end to this stage's last start: how
    /// late its slowest worker began (summed like `first_start_ns`).
    pub last_start_ns: u64,
}

impl Trace {
    /// From first start to last end.
    pub fn total_ns(&self) -> u64 {
        let start = self.tasks.iter().map(|t| t.start_ns).min().unwrap_or(0);
        let end = self.tasks.iter().map(|t| t.end_ns).max().unwrap_or(0);
        end.saturating_sub(start)
    }

    /// One row per stage, in order of completion: the tasks that signal one
    /// event, or the parts of one stage (events made one after another whose
    /// names differ only in a ` (N)` suffix, such as one per expert, signalled
    /// side by side), named without the suffix; tasks that signal nothing are
    /// grouped as `(no event)`.
    pub fn stages(&self, program: &Program) -> Vec<StageTime> {
        // Each event's stage: the first event of its run of parts.
        let name = |e: u32| strip_part(program.event_name(e).unwrap_or("(no event)"));
        let mut stage_of = vec![0u32; program.num_events()];
        for e in 0..stage_of.len() {
            stage_of[e] = if e > 0 && name(e as u32) == name(e as u32 - 1) {
                stage_of[e - 1]
            } else {
                e as u32
            };
        }
        #[derive(Clone, Copy)]
        struct Span {
            end: u64,
            busy: u64,
            tasks: usize,
            first: u64,
            last: u64,
        }
        let mut by_event: std::collections::BTreeMap<u32, Span> = Default::default();
        for t in &self.tasks {
            let ev = signal_of(program, t.task);
            let ev = stage_of.get(ev as usize).copied().unwrap_or(ev);
            let e = by_event.entry(ev).or_insert(Span {
                end: 0,
                busy: 0,
                tasks: 0,
                first: u64::MAX,
                last: 0,
            });
            e.end = e.end.max(t.end_ns);
            e.busy += t.end_ns.saturating_sub(t.start_ns);
            e.tasks += 1;
            e.first = e.first.min(t.start_ns);
            e.last = e.last.max(t.start_ns);
        }
        let mut rows: Vec<(u32, Span)> = by_event.into_iter().collect();
        rows.sort_by_key(|r| r.1.end);
        let mut prev = self.tasks.iter().map(|t| t.start_ns).min().unwrap_or(0);
        rows.into_iter()
            .map(|(ev, sp)| {
                let row = StageTime {
                    name: name(ev).to_string(),
                    tasks: sp.tasks,
                    count: 1,
                    critical_ns: sp.end.saturating_sub(prev),
                    mean_task_ns: sp.busy as f64 / sp.tasks as f64,
                    first_start_ns: sp.first.saturating_sub(prev),
                    last_start_ns: sp.last.saturating_sub(prev),
                };
                prev = prev.max(sp.end);
                row
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
                    r.first_start_ns += s.first_start_ns;
                    r.last_start_ns += s.last_start_ns;
                }
                None => rows.push(StageTime { name, ..s }),
            }
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.critical_ns));
        rows
    }

    /// Writes [`by_kind`](Self::by_kind) as a table, one line a stage kind
    /// (each line indented by two spaces): its occurrences and tasks, its
    /// critical-path time and share, the mean task, and per occurrence its
    /// critical time and when its first and last tasks started after the
    /// stage before (all in µs).
    pub fn write_stage_table(
        &self,
        program: &Program,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<()> {
        let total = self.total_ns() as f64;
        writeln!(
            out,
            "  {:<28} {:>6} {:>6} {:>10} {:>6} {:>9} {:>9} {:>9} {:>9}",
            "stage",
            "count",
            "tasks",
            "µs/step",
            "share",
            "µs/task",
            "µs/stage",
            "1st start",
            "last start"
        )?;
        for s in self.by_kind(program) {
            let per = |ns: u64| ns as f64 / 1e3 / s.count as f64;
            writeln!(
                out,
                "  {:<28} {:>6} {:>6} {:>10.1} {:>5.1}% {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                s.name,
                s.count,
                s.tasks,
                s.critical_ns as f64 / 1e3,
                100.0 * s.critical_ns as f64 / total,
                s.mean_task_ns / 1e3,
                per(s.critical_ns),
                per(s.first_start_ns),
                per(s.last_start_ns)
            )?;
        }
        Ok(())
    }

    /// Writes the trace in the Chrome trace event format, for Perfetto or
    /// `chrome://tracing`: one track per worker (SM), one complete event per
    /// task named for the event it signals, times in microseconds from the
    /// first start.
    pub fn write_chrome_json(
        &self,
        program: &Program,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<()> {
        let t0 = self.tasks.iter().map(|t| t.start_ns).min().unwrap_or(0);
        writeln!(out, "{{\"traceEvents\": [")?;
        for (i, t) in self.tasks.iter().enumerate() {
            let ev = signal_of(program, t.task);
            let name = program.event_name(ev).unwrap_or("(no event)");
            let name: String = name
                .chars()
                .map(|c| {
                    if c == '"' || c == '\\' || c.is_control() {
                        '_'
                    } else {
                        c
                    }
                })
                .collect();
            writeln!(
                out,
                "{{\"name\": \"{name}\", \"ph\": \"X\", \"pid\": 0, \"tid\": {}, \"ts\": {:.3}, \"dur\": {:.3}, \"args\": {{\"task\": {}}}}}{}",
                t.worker,
                t.start_ns.saturating_sub(t0) as f64 / 1e3,
                t.end_ns.saturating_sub(t.start_ns) as f64 / 1e3,
                t.task,
                if i + 1 < self.tasks.len() { "," } else { "" }
            )?;
        }
        writeln!(out, "]}}")
    }
}

/// The event task `task` of `program` signals ([`NO_EVENT`] if none).
fn signal_of(program: &Program, task: u32) -> u32 {
    program
        .descs
        .get(task as usize)
        .map_or(NO_EVENT, |d| d.signal)
}

/// `expert down (3)` → `expert down`: one part of a stage split over events.
fn strip_part(name: &str) -> &str {
    match name.strip_suffix(')').and_then(|r| r.rsplit_once(" (")) {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => base,
        _ => name,
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
    fn stages_time_their_starts_from_the_stage_before() {
        let mut b = crate::program::ProgramBuilder::new();
        let (e0, e1) = (b.event("layer 0 a"), b.event("layer 0 b"));
        let _ = b.push(crate::task::TaskSpec::raw_opcode(0)).signal(e0);
        for _ in 0..2 {
            let _ = b
                .push(crate::task::TaskSpec::raw_opcode(0))
                .wait(e0)
                .signal(e1);
        }
        let program = b.build().unwrap();
        let at = |task, worker, start_ns, end_ns| TaskTime {
            task,
            worker,
            start_ns,
            end_ns,
        };
        let trace = Trace {
            tasks: vec![
                at(0, 0, 100, 400),
                at(1, 1, 1_300, 2_000),
                at(2, 2, 1_700, 2_600),
            ],
        };
        let rows = trace.stages(&program);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].critical_ns, rows[0].first_start_ns), (300, 0));
        assert_eq!(rows[1].name, "layer 0 b");
        assert_eq!(rows[1].critical_ns, 2_200);
        assert_eq!(
            (rows[1].first_start_ns, rows[1].last_start_ns),
            (900, 1_300)
        );
        assert_eq!(rows[1].mean_task_ns, 800.0);
    }

    #[test]
    fn chrome_json_has_one_event_per_task() {
        let mut b = crate::program::ProgramBuilder::new();
        let ev = b.event("layer 0 \"odd\" name");
        let _ = b.push(crate::task::TaskSpec::raw_opcode(0)).signal(ev);
        let _ = b.push(crate::task::TaskSpec::raw_opcode(0));
        let program = b.build().unwrap();
        let trace = Trace {
            tasks: vec![
                TaskTime {
                    task: 0,
                    worker: 3,
                    start_ns: 1_000,
                    end_ns: 3_500,
                },
                TaskTime {
                    task: 1,
                    worker: 5,
                    start_ns: 2_000,
                    end_ns: 2_250,
                },
            ],
        };
        let mut out = Vec::new();
        trace.write_chrome_json(&program, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\"name\": \"layer 0 _odd_ name\", \"ph\": \"X\", \"pid\": 0, \"tid\": 3, \"ts\": 0.000, \"dur\": 2.500"));
        assert!(text.contains("\"name\": \"(no event)\", \"ph\": \"X\", \"pid\": 0, \"tid\": 5, \"ts\": 1.000, \"dur\": 0.250"));
        assert_eq!(text.matches("\"ph\"").count(), 2);
        assert!(text.trim_end().ends_with("]}"));
    }

    #[test]
    fn parts_of_a_stage_merge_into_one_stage() {
        let mut b = crate::program::ProgramBuilder::new();
        let e0 = b.event("layer 0 a");
        let parts = [b.event("layer 0 b (0)"), b.event("layer 0 b (1)")];
        let _ = b.push(crate::task::TaskSpec::raw_opcode(0)).signal(e0);
        for p in parts {
            let _ = b
                .push(crate::task::TaskSpec::raw_opcode(0))
                .wait(e0)
                .signal(p);
        }
        let program = b.build().unwrap();
        let at = |task, start_ns, end_ns| TaskTime {
            task,
            worker: task,
            start_ns,
            end_ns,
        };
        let trace = Trace {
            tasks: vec![at(0, 100, 400), at(1, 1_300, 2_000), at(2, 1_700, 2_600)],
        };
        let rows = trace.stages(&program);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].name.as_str(), rows[0].critical_ns),
            ("layer 0 a", 300)
        );
        let r = &rows[1];
        assert_eq!((r.name.as_str(), r.count, r.tasks), ("layer 0 b", 1, 2));
        // From `a`'s end (400 ns): the parts' last end, first and last start.
        assert_eq!(r.critical_ns, 2_200);
        assert_eq!((r.first_start_ns, r.last_start_ns), (900, 1_300));
        assert_eq!(r.mean_task_ns, 800.0);
    }

    #[test]
    fn part_suffixes_are_stripped() {
        assert_eq!(
            strip_part("layer 3 expert down (12)"),
            "layer 3 expert down"
        );
        assert_eq!(strip_part("attention.slices (0)"), "attention.slices");
        assert_eq!(strip_part("odd (x)"), "odd (x)");
        assert_eq!(strip_part("odd ()"), "odd ()");
        assert_eq!(strip_part("qkv"), "qkv");
    }

    #[test]
    fn layer_prefixes_are_stripped() {
        assert_eq!(strip_layer("layer 12 qkv"), "qkv");
        assert_eq!(strip_layer("layer x qkv"), "layer x qkv");
        assert_eq!(strip_layer("lm head"), "lm head");
    }
}
