//! Static layout of a program into per-worker task lists.
//!
//! Tasks are dealt to workers round-robin in topological order (or to the
//! worker a task is pinned to), and every worker's list keeps that order.
//! Blocking waits therefore cannot deadlock: the unfinished task that comes
//! first in the topological order is always at the head of its worker's list
//! with all its producers done.

use super::Program;
use crate::abi::TaskDesc;

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
    pub fn schedule(&self, workers: usize) -> Schedule {
        let workers = workers.max(1);
        let mut lists: Vec<Vec<TaskDesc>> = vec![Vec::new(); workers];
        let mut cursor = 0usize;
        for &t in &self.topo {
            let w = match self.workers[t as usize] {
                Some(w) => w as usize % workers,
                None => {
                    cursor += 1;
                    (cursor - 1) % workers
                }
            };
            lists[w].push(self.descs[t as usize]);
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
