//! [`ProgramBuilder`] and the validated [`Program`].

use crate::abi::{TaskDesc, NO_EVENT, TASK_WAITS};
use crate::buffer::Buffer;
use crate::error::{ProgramError, Result};
use crate::task::TaskSpec;

/// An event of one builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventId(pub(crate) u32);

/// A task of one builder (its index in build order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u32);

#[derive(Clone, Debug)]
pub(crate) struct EventInfo {
    pub(crate) name: String,
    pub(crate) external: bool,
    pub(crate) producers: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct TaskNode {
    pub(crate) spec: TaskSpec,
    pub(crate) waits: Vec<(EventId, Option<u32>)>,
    pub(crate) signals: Vec<EventId>,
    pub(crate) params: Vec<(usize, u8)>,
    pub(crate) worker: Option<u32>,
    pub(crate) follows: Option<u32>,
}

/// Collects tasks and events; [`build`](Self::build) validates them into a [`Program`].
#[derive(Default)]
pub struct ProgramBuilder {
    tasks: Vec<TaskNode>,
    events: Vec<EventInfo>,
    errors: Vec<ProgramError>,
}

/// Configures one pushed task.
pub struct TaskHandle<'a> {
    b: &'a mut ProgramBuilder,
    id: TaskId,
}

impl TaskHandle<'_> {
    fn node(&mut self) -> &mut TaskNode {
        &mut self.b.tasks[self.id.0 as usize]
    }
    /// Waits for every task that signals `ev` (in the same run).
    pub fn wait(mut self, ev: EventId) -> Self {
        self.node().waits.push((ev, None));
        self
    }
    /// Waits until `ev` was signalled `count` times per run; for internal
    /// events `count` must equal the number of signalling tasks.
    pub fn wait_count(mut self, ev: EventId, count: u32) -> Self {
        self.node().waits.push((ev, Some(count)));
        self
    }
    /// Signals `ev` once when the task completes.
    pub fn signal(mut self, ev: EventId) -> Self {
        self.node().signals.push(ev);
        self
    }
    /// Replaces argument slot `slot` with command parameter `index` at run time.
    pub fn param(mut self, slot: usize, index: u8) -> Self {
        let allowed = slot < 16 && self.node().spec.param_slots & (1 << slot) != 0;
        if !allowed || usize::from(index) >= crate::abi::COMMAND_PARAMS {
            let kind = self.node().spec.kind;
            let reason = format!("slot {slot} cannot take command parameter {index}");
            self.b.errors.push(ProgramError::BadArgs { kind, reason });
        } else {
            self.node().params.push((slot, index));
        }
        self
    }
    /// Marks the task's declared range constant while the program runs, so
    /// the device may stage it before the task's waits ([`TaskSpec::stage`]).
    pub fn stage(mut self) -> Self {
        self.node().spec.mark_staged();
        self
    }
    /// Pins the task to worker `w % workers` instead of the round-robin choice.
    pub fn on_worker(mut self, w: u32) -> Self {
        self.node().worker = Some(w);
        self
    }
    /// Places the task on the worker of `task`, which it must wait for
    /// (through an event only `task` signals, or events whose producers all
    /// share that worker): the worker runs it after `task`, and the device
    /// drops such waits, which the order of the worker's list already meets
    /// ([`Program::schedule`]). Other executors wait as usual.
    pub fn follow(mut self, task: TaskId) -> Self {
        self.node().follows = Some(task.0);
        self
    }
    /// The task's id.
    pub fn id(&self) -> TaskId {
        self.id
    }
}

impl ProgramBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares an event signalled by tasks of this program.
    pub fn event(&mut self, name: &str) -> EventId {
        self.events.push(EventInfo {
            name: name.into(),
            external: false,
            producers: 0,
        });
        EventId(self.events.len() as u32 - 1)
    }

    /// Declares an event signalled from outside the program (waits on it must
    /// give their count with [`TaskHandle::wait_count`]).
    pub fn external_event(&mut self, name: &str) -> EventId {
        self.events.push(EventInfo {
            name: name.into(),
            external: true,
            producers: 0,
        });
        EventId(self.events.len() as u32 - 1)
    }

    /// Adds a task; its argument errors surface here or in [`build`](Self::build).
    pub fn push(&mut self, spec: TaskSpec) -> TaskHandle<'_> {
        self.tasks.push(TaskNode {
            spec,
            waits: Vec::new(),
            signals: Vec::new(),
            params: Vec::new(),
            worker: None,
            follows: None,
        });
        let id = TaskId(self.tasks.len() as u32 - 1);
        TaskHandle { b: self, id }
    }

    /// Adds several tasks at once.
    pub fn push_all(&mut self, specs: Vec<TaskSpec>) -> Vec<TaskId> {
        specs.into_iter().map(|s| self.push(s).id()).collect()
    }

    /// Configures an already pushed task.
    pub fn task(&mut self, id: TaskId) -> TaskHandle<'_> {
        TaskHandle { b: self, id }
    }

    /// The spec of a pushed task.
    pub(crate) fn spec(&self, id: TaskId) -> Option<&TaskSpec> {
        self.tasks.get(id.0 as usize).map(|t| &t.spec)
    }

    /// Number of tasks pushed so far.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task was pushed.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Validates the DAG and freezes it.
    pub fn build(mut self) -> Result<Program> {
        if let Some(e) = self.errors.into_iter().next() {
            return Err(e.into());
        }
        if self.tasks.is_empty() {
            return Err(ProgramError::Empty.into());
        }
        let ne = self.events.len() as u32;
        let check = |ev: EventId| {
            if ev.0 < ne {
                Ok(())
            } else {
                Err(ProgramError::UnknownEvent(ev.0))
            }
        };
        for (i, t) in self.tasks.iter().enumerate() {
            if t.waits.len() > TASK_WAITS {
                let e = ProgramError::TooManyWaits {
                    task: i as u32,
                    waits: t.waits.len(),
                    max: TASK_WAITS,
                };
                return Err(e.into());
            }
            if t.signals.len() > 1 {
                return Err(ProgramError::TooManySignals { task: i as u32 }.into());
            }
            for &(ev, _) in &t.waits {
                check(ev)?;
            }
            for &ev in &t.signals {
                check(ev)?;
                self.events[ev.0 as usize].producers += 1;
            }
        }
        let mut descs = Vec::with_capacity(self.tasks.len());
        for (i, t) in self.tasks.iter().enumerate() {
            let mut d = TaskDesc {
                opcode: t.spec.opcode,
                flags: t.spec.flags,
                id: i as u32,
                signal: t.signals.first().map_or(NO_EVENT, |e| e.0),
                param_mask: 0,
                wait: [NO_EVENT; TASK_WAITS],
                wait_need: [0; TASK_WAITS],
                param_sel: 0,
                args: t.spec.args,
            };
            for (k, &(ev, count)) in t.waits.iter().enumerate() {
                let info = &self.events[ev.0 as usize];
                let need = if info.external {
                    match count {
                        Some(c) if c > 0 => c,
                        _ => {
                            let reason =
                                format!("wait on external event '{}' needs a count", info.name);
                            return Err(ProgramError::BadArgs {
                                kind: t.spec.kind,
                                reason,
                            }
                            .into());
                        }
                    }
                } else if info.producers == 0 {
                    return Err(ProgramError::Unproduced {
                        task: i as u32,
                        event: info.name.clone(),
                    }
                    .into());
                } else {
                    match count {
                        Some(c) if c != info.producers => {
                            let e = ProgramError::InconsistentCount {
                                task: i as u32,
                                event: info.name.clone(),
                                need: c,
                                producers: info.producers,
                            };
                            return Err(e.into());
                        }
                        _ => info.producers,
                    }
                };
                d.wait[k] = ev.0;
                d.wait_need[k] = need;
            }
            for &(slot, index) in &t.params {
                d.param_mask |= 1 << slot;
                d.param_sel |= u64::from(index) << (4 * slot);
            }
            descs.push(d);
        }
        let owner = {
            let mut owners = self
                .tasks
                .iter()
                .flat_map(|t| t.spec.buffers.iter().map(Buffer::owner));
            let first = owners.next();
            if let Some(o) = first {
                if owners.any(|x| x != o) {
                    return Err(ProgramError::MixedExecutors.into());
                }
            }
            first
        };
        let topo = topological_order(&self.tasks, &self.events, &descs)?;
        let mut buffers: Vec<Buffer> = Vec::new();
        for t in &self.tasks {
            for b in &t.spec.buffers {
                if !buffers.iter().any(|x| x.same(b)) {
                    buffers.push(b.clone());
                }
            }
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if let Some(f) = t.follows {
                let waits_on = |ev: &u32| {
                    self.tasks
                        .get(f as usize)
                        .is_some_and(|p| p.signals.iter().any(|e| e.0 == *ev))
                };
                if !descs[i].wait.iter().any(waits_on) {
                    let reason = format!("task {i} follows task {f} but waits for no event of it");
                    return Err(ProgramError::BadArgs {
                        kind: t.spec.kind,
                        reason,
                    }
                    .into());
                }
            }
        }
        let workers = self.tasks.iter().map(|t| t.worker).collect();
        let follows = self.tasks.iter().map(|t| t.follows).collect();
        Ok(Program {
            descs,
            events: self.events,
            topo,
            workers,
            follows,
            buffers,
            owner,
        })
    }
}

/// Kahn's algorithm over producer → consumer edges; the order prefers lower ids.
fn topological_order(
    tasks: &[TaskNode],
    events: &[EventInfo],
    descs: &[TaskDesc],
) -> Result<Vec<u32>> {
    let n = tasks.len();
    let mut producers_of: Vec<Vec<u32>> = vec![Vec::new(); events.len()];
    for (i, t) in tasks.iter().enumerate() {
        for ev in &t.signals {
            producers_of[ev.0 as usize].push(i as u32);
        }
    }
    let mut consumers: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut indeg = vec![0usize; n];
    let mut preds: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (i, d) in descs.iter().enumerate() {
        for &ev in d.wait.iter().filter(|&&e| e != NO_EVENT) {
            for &p in &producers_of[ev as usize] {
                consumers[p as usize].push(i as u32);
                preds[i].push(p);
                indeg[i] += 1;
            }
        }
    }
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<u32>> = (0..n as u32)
        .filter(|&i| indeg[i as usize] == 0)
        .map(std::cmp::Reverse)
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(std::cmp::Reverse(t)) = ready.pop() {
        order.push(t);
        for &c in &consumers[t as usize] {
            indeg[c as usize] -= 1;
            if indeg[c as usize] == 0 {
                ready.push(std::cmp::Reverse(c));
            }
        }
    }
    if order.len() < n {
        // Walk unfinished predecessors from any unfinished task until one repeats.
        let mut seen = vec![false; n];
        let mut t = (0..n).find(|&i| indeg[i] > 0).unwrap_or(0);
        while !seen[t] {
            seen[t] = true;
            t = preds[t]
                .iter()
                .map(|&p| p as usize)
                .find(|&p| indeg[p] > 0)
                .unwrap_or(t);
        }
        return Err(ProgramError::Cycle {
            task: t as u32,
            kind: tasks[t].spec.kind,
        }
        .into());
    }
    Ok(order)
}

/// A validated task program, independent of any executor until loaded.
#[derive(Clone, Debug)]
pub struct Program {
    pub(crate) descs: Vec<TaskDesc>,
    pub(crate) events: Vec<EventInfo>,
    pub(crate) topo: Vec<u32>,
    pub(crate) workers: Vec<Option<u32>>,
    pub(crate) follows: Vec<Option<u32>>,
    pub(crate) buffers: Vec<Buffer>,
    pub(crate) owner: Option<u64>,
}

impl Program {
    /// Task descriptors in build order (`desc.id` is the index).
    pub fn descriptors(&self) -> &[TaskDesc] {
        &self.descs
    }
    /// Number of tasks.
    pub fn num_tasks(&self) -> usize {
        self.descs.len()
    }
    /// Number of events.
    pub fn num_events(&self) -> usize {
        self.events.len()
    }
    /// Name of event `i`.
    pub fn event_name(&self, i: u32) -> Option<&str> {
        self.events.get(i as usize).map(|e| e.name.as_str())
    }
    /// Task ids in a topological order.
    pub fn topological_order(&self) -> &[u32] {
        &self.topo
    }
    /// Buffers the program touches (kept alive with it).
    pub fn buffers(&self) -> &[Buffer] {
        &self.buffers
    }
    /// Id of the executor whose buffers the program uses, if it uses any.
    pub fn owner(&self) -> Option<u64> {
        self.owner
    }
    /// Kind name of task `id`.
    pub fn task_kind(&self, id: u32) -> &'static str {
        self.descs
            .get(id as usize)
            .and_then(|d| crate::task::kind_name(d.opcode))
            .unwrap_or("unknown")
    }
}
