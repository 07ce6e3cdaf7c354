//! Static layout of a program into per-worker task lists.
//!
//! Tasks are dealt to workers round-robin in topological order (or to the
//! worker a task is pinned to), and every worker's list keeps that order.
//! Blocking waits therefore cannot deadlock: the unfinished task that comes
//! first in the topological order is always at the head of its worker's list
//! with all its producers done. A task that follows another goes to that
//! task's worker, later in its list.

use super::Program;
use crate::abi::{TaskDesc, NO_EVENT, TASK_WAITS};

/// Per-worker task lists, flattened.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Descriptors grouped by worker, each group in topological order.
    pub tasks: Vec<TaskDesc>,
    /// `workers + 1` offsets: worker `w` runs `tasks[offsets[w]..offsets[w + 1]]`.
    pub offsets: Vec<u32>,
}

impl Schedule {
    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.offsets.len() - 1
    }
    /// Worker `w`'s list.
    pub fn list(&self, w: usize) -> &[TaskDesc] {
        &self.tasks[self.offsets[w] as usize..self.offsets[w + 1] as usize]
    }
}

impl Program {
    /// Lays the program out for `workers` workers (at least one).
    ///
    /// A task that follows another ([`TaskHandle::follow`]) goes to that
    /// task's worker. A wait whose event's producers all precede the waiting
    /// task on its own worker is dropped from the laid-out descriptor: the
    /// worker ran them first, and the block's barrier between two tasks makes
    /// their writes visible. Then a signal that no laid-out wait reads is
    /// dropped as well. (Executors that run the program's own descriptors,
    /// as the CPU executor does, keep every wait and signal.)
    ///
    /// [`TaskHandle::follow`]: super::TaskHandle::follow
    pub fn schedule(&self, workers: usize) -> Schedule {
        let workers = workers.max(1);
        let mut lists: Vec<Vec<TaskDesc>> = vec![Vec::new(); workers];
        let mut placed = vec![usize::MAX; self.descs.len()];
        let mut cursor = 0usize;
        for &t in &self.topo {
            let w = match (self.follows[t as usize], self.workers[t as usize]) {
                (Some(f), _) if placed[f as usize] != usize::MAX => placed[f as usize],
                (_, Some(w)) => w as usize % workers,
                _ => {
                    cursor += 1;
                    (cursor - 1) % workers
                }
            };
            placed[t as usize] = w;
            lists[w].push(self.descs[t as usize]);
        }
        // The worker of each event's producers, if they share one.
        let mut home: Vec<Option<usize>> = vec![None; self.events.len()];
        let mut mixed = vec![false; self.events.len()];
        for (t, d) in self.descs.iter().enumerate() {
            if let Some(e) = (d.signal != NO_EVENT).then_some(d.signal as usize) {
                match home[e] {
                    Some(w) if w != placed[t] => mixed[e] = true,
                    _ => home[e] = Some(placed[t]),
                }
            }
        }
        for (w, list) in lists.iter_mut().enumerate() {
            for d in list.iter_mut() {
                for k in 0..TASK_WAITS {
                    let e = d.wait[k];
                    // Internal events only: an external one has no producers here.
                    let local = e != NO_EVENT
                        && !self.events[e as usize].external
                        && !mixed[e as usize]
                        && home[e as usize] == Some(w);
                    if local {
                        d.wait[k] = NO_EVENT;
                        d.wait_need[k] = 0;
                    }
                }
            }
        }
        // A signal no wait of the laid-out program reads (a follower's
        // producer, for instance) is left out too: its release fence and
        // atomic would only delay the worker's next task.
        let mut waited = vec![false; self.events.len()];
        for d in lists.iter().flatten() {
            for &e in d.wait.iter().filter(|&&e| e != NO_EVENT) {
                waited[e as usize] = true;
            }
        }
        for d in lists.iter_mut().flatten() {
            if d.signal != NO_EVENT && !waited[d.signal as usize] {
                d.signal = NO_EVENT;
            }
        }
        let mut offsets = Vec::with_capacity(workers + 1);
        let mut tasks = Vec::with_capacity(self.descs.len());
        offsets.push(0);
        for l in lists {
            tasks.extend(l);
            offsets.push(tasks.len() as u32);
        }
        Schedule { tasks, offsets }
    }
}
