//! The CPU executor: runs task programs on host threads with f32 reference ops.
//!
//! It is the ground truth for GPU tests and the fallback without a GPU. Each
//! iteration runs every task once; worker threads repeatedly take a *random*
//! ready task (one whose waited events have reached their counts), so any
//! order the dependencies allow can happen, and a missing dependency edge
//! shows up as a wrong result on some seed. Counters are monotonic across runs
//! with the same epoch rule as the GPU. A state where tasks remain but none can
//! become ready is reported as [`Error::DeviceHang`] at once.

mod memory;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::abi::{TaskDesc, COMMAND_PARAMS, NO_EVENT};
use crate::buffer::{Buffer, DType};
use crate::error::{Error, Result};
use crate::exec::{
    check_bytes, check_owner, next_executor_id, pack_params, until_params, Executor, LoadedProgram,
    Ticket,
};
use crate::program::Program;
use crate::task::{kind_name, run_cpu, TaskFault};
use memory::{CpuMemory, MemTable};

/// Options of the [`CpuExecutor`].
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// Worker threads (at least 1).
    pub threads: usize,
    /// Seed of the random task order; each command uses `seed + command index`.
    pub seed: u64,
}

impl Default for CpuOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8);
        CpuOptions {
            threads,
            seed: 0x6d65_6761,
        }
    }
}

/// Multi-threaded reference executor.
pub struct CpuExecutor {
    id: u64,
    opts: CpuOptions,
    /// Longest a collective task waits for another rank of a group.
    wait_timeout: Duration,
    mem: Arc<MemTable>,
    outputs: Mutex<Vec<u64>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    commands: u64,
    iterations: u64,
    failed: Option<Error>,
}

struct CpuProgram {
    descs: Vec<TaskDesc>,
    /// `(task, wait slot)` pairs waiting on each event.
    waiters: Vec<Vec<(u32, usize)>>,
    counters: Mutex<Vec<u64>>,
    epoch: AtomicU64,
}

/// SplitMix64: small, seedable, good enough to shuffle task orders.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

struct Sched {
    ready: Vec<u32>,
    pending: Vec<u32>,
    remaining: usize,
    running: usize,
    rng: Rng,
    error: Option<Error>,
}

impl CpuExecutor {
    /// A new executor.
    pub fn new(opts: CpuOptions) -> Self {
        let opts = CpuOptions {
            threads: opts.threads.max(1),
            ..opts
        };
        CpuExecutor {
            id: next_executor_id(),
            opts,
            wait_timeout: Duration::from_secs(30),
            mem: Arc::default(),
            outputs: Mutex::default(),
            state: Mutex::default(),
        }
    }

    /// `n` executors sharing one address space: each may read and write the
    /// others' buffers by address, as the GPUs of a node do over peer memory
    /// (the ranks of a CPU [`Cluster`](crate::cluster::Cluster)). A task
    /// waiting for another executor gives up after `wait_timeout`.
    pub fn group(n: usize, opts: CpuOptions, wait_timeout: Duration) -> Vec<CpuExecutor> {
        let mem: Arc<MemTable> = Arc::default();
        (0..n)
            .map(|_| CpuExecutor {
                mem: mem.clone(),
                wait_timeout,
                ..CpuExecutor::new(opts.clone())
            })
            .collect()
    }

    /// The options in use.
    pub fn options(&self) -> &CpuOptions {
        &self.opts
    }

    fn submit_params(
        &self,
        program: &LoadedProgram,
        iterations: u32,
        params: [u64; COMMAND_PARAMS],
        stop: Option<&Buffer>,
    ) -> Result<Ticket> {
        if program.owner != self.id {
            return Err(Error::Foreign("program"));
        }
        let prog = program
            .inner
            .downcast_ref::<CpuProgram>()
            .ok_or(Error::Foreign("program"))?;
        let mut st = self.state.lock().expect("executor state poisoned");
        if let Some(e) = &st.failed {
            return Err(e.clone());
        }
        st.commands += 1;
        let epoch_base = prog.epoch.load(Ordering::Relaxed);
        for _ in 0..iterations {
            // The command ends once a task stamped the stop word with an epoch
            // of this command (skipped iterations never ran: epochs stay exact).
            if let Some(stop) = stop {
                let mut w = [0u8; 8];
                self.read_bytes(stop, 0, &mut w)?;
                if u64::from_le_bytes(w) > epoch_base {
                    break;
                }
            }
            let epoch = prog.epoch.fetch_add(1, Ordering::Relaxed) + 1;
            let seed = self
                .opts
                .seed
                .wrapping_add(st.iterations.wrapping_mul(0x2545_F491_4F6C_DD1D));
            if let Err(mut e) = self.run_iteration(prog, &program.program, epoch, &params, seed) {
                if let Error::DeviceHang { command, .. } | Error::DeviceFault { command, .. } =
                    &mut e
                {
                    *command = st.commands;
                }
                st.failed = Some(e);
                break;
            }
            st.iterations += 1;
        }
        Ok(Ticket {
            owner: self.id,
            end: st.iterations.max(1),
        })
    }

    fn run_iteration(
        &self,
        prog: &CpuProgram,
        program: &Program,
        epoch: u64,
        params: &[u64; COMMAND_PARAMS],
        seed: u64,
    ) -> Result<()> {
        let counters = prog.counters.lock().expect("counters poisoned").clone();
        let mut pending = vec![0u32; prog.descs.len()];
        let mut ready = Vec::new();
        for (i, d) in prog.descs.iter().enumerate() {
            for k in 0..d.wait.len() {
                if d.wait[k] != NO_EVENT
                    && counters[d.wait[k] as usize] < u64::from(d.wait_need[k]) * epoch
                {
                    pending[i] += 1;
                }
            }
            if pending[i] == 0 {
                ready.push(i as u32);
            }
        }
        let sched = Mutex::new(Sched {
            ready,
            pending,
            remaining: prog.descs.len(),
            running: 0,
            rng: Rng(seed),
            error: None,
        });
        let counters = Mutex::new(counters);
        let cv = Condvar::new();
        let mem = CpuMemory {
            table: &self.mem,
            outputs: &self.outputs,
            epoch,
            wait_timeout: self.wait_timeout,
        };
        std::thread::scope(|s| {
            for worker in 0..self.opts.threads {
                let (sched, counters, cv, mem) = (&sched, &counters, &cv, &mem);
                s.spawn(move || {
                    self.worker(
                        worker as u32,
                        prog,
                        program,
                        epoch,
                        params,
                        sched,
                        counters,
                        cv,
                        mem,
                    )
                });
            }
        });
        *prog.counters.lock().expect("counters poisoned") =
            counters.into_inner().expect("counters poisoned");
        match sched.into_inner().expect("scheduler poisoned").error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn worker(
        &self,
        worker: u32,
        prog: &CpuProgram,
        program: &Program,
        epoch: u64,
        params: &[u64; COMMAND_PARAMS],
        sched: &Mutex<Sched>,
        counters: &Mutex<Vec<u64>>,
        cv: &Condvar,
        mem: &CpuMemory<'_>,
    ) {
        let mut g = sched.lock().expect("scheduler poisoned");
        loop {
            if g.error.is_some() || g.remaining == 0 {
                cv.notify_all();
                return;
            }
            if g.ready.is_empty() {
                if g.running == 0 {
                    let c = counters.lock().expect("counters poisoned");
                    g.error = Some(hang_error(prog, program, &g.pending, &c, epoch, worker));
                    continue;
                }
                g = cv.wait(g).expect("scheduler poisoned");
                continue;
            }
            let pick = (g.rng.next() % g.ready.len() as u64) as usize;
            let t = g.ready.swap_remove(pick);
            g.running += 1;
            drop(g);
            let d = &prog.descs[t as usize];
            let result = match d.resolved_args(params) {
                Some(args) => run_cpu(d.opcode, &args, mem),
                None => Err(TaskFault::BadArgs("parameter index out of range")),
            };
            g = sched.lock().expect("scheduler poisoned");
            g.running -= 1;
            g.remaining -= 1;
            if let Err(f) = result {
                g.error = Some(fault_error(f, d, worker));
                continue;
            }
            if d.signal != NO_EVENT {
                let mut c = counters.lock().expect("counters poisoned");
                let ev = d.signal as usize;
                c[ev] += 1;
                for &(w, k) in &prog.waiters[ev] {
                    if c[ev] == u64::from(prog.descs[w as usize].wait_need[k]) * epoch {
                        g.pending[w as usize] -= 1;
                        if g.pending[w as usize] == 0 {
                            g.ready.push(w);
                        }
                    }
                }
            }
            cv.notify_all();
        }
    }
}

/// What a collective waiting for rank `rank` waited on.
pub(crate) fn peer_counter(rank: u32) -> String {
    format!("rank {rank}'s arrival at an all-reduce")
}

/// The rank named by [`peer_counter`], if `counter` is one.
pub(crate) fn peer_of_counter(counter: &str) -> Option<usize> {
    counter
        .strip_prefix("rank ")?
        .split('\'')
        .next()?
        .parse()
        .ok()
}

/// The fault a collective reports when the cluster's abort word names a failed rank.
pub(crate) const PEER_FAILED: &str = "another rank failed (value: that rank)";

fn hang_error(
    prog: &CpuProgram,
    program: &Program,
    pending: &[u32],
    counters: &[u64],
    epoch: u64,
    worker: u32,
) -> Error {
    for (i, d) in prog.descs.iter().enumerate() {
        if pending[i] == 0 {
            continue;
        }
        for k in 0..d.wait.len() {
            let ev = d.wait[k];
            let need = u64::from(d.wait_need[k]) * epoch;
            if ev != NO_EVENT && counters[ev as usize] < need {
                return Error::DeviceHang {
                    sm: worker,
                    task: d.id,
                    task_kind: kind_name(d.opcode).unwrap_or("unknown"),
                    counter: format!("event '{}'", program.event_name(ev).unwrap_or("?")),
                    seen: counters[ev as usize],
                    needed: need,
                    command: 0,
                };
            }
        }
    }
    Error::Stopped("scheduler stalled with no waiting task".into())
}

fn fault_error(f: TaskFault, d: &TaskDesc, worker: u32) -> Error {
    let task_kind = kind_name(d.opcode).unwrap_or("unknown");
    let (what, value, bound) = match f {
        TaskFault::PeerHang { rank, seen, needed } => {
            return Error::DeviceHang {
                sm: worker,
                task: d.id,
                task_kind,
                counter: peer_counter(rank),
                seen,
                needed,
                command: 0,
            }
        }
        TaskFault::PeerFailed { rank } => (PEER_FAILED, u64::from(rank), 0),
        TaskFault::OutOfRange { index, bound } => ("index out of range", index, bound),
        TaskFault::BadAddress(a) => ("address outside every buffer", a, 0),
        TaskFault::BadArgs(_) => ("bad arguments", 0, 0),
        TaskFault::BadOpcode(op) => ("bad opcode", u64::from(op), 0),
    };
    Error::DeviceFault {
        what,
        sm: worker,
        task: d.id,
        task_kind,
        value,
        bound,
        command: 0,
    }
}

impl Executor for CpuExecutor {
    fn id(&self) -> u64 {
        self.id
    }
    fn describe(&self) -> String {
        format!(
            "CPU executor ({} threads, f32 reference ops)",
            self.opts.threads
        )
    }
    fn num_workers(&self) -> usize {
        self.opts.threads
    }
    fn is_gpu(&self) -> bool {
        false
    }
    fn alloc(&self, dtype: DType, len: usize) -> Result<Buffer> {
        let bytes = len
            .checked_mul(dtype.size())
            .filter(|&b| b < 1 << 40)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("buffer of {len} {dtype} is too large"))
            })?;
        let (addr, alloc) = self.mem.alloc(bytes);
        Ok(Buffer::from_parts(
            addr,
            len,
            dtype,
            self.id,
            Box::new(alloc),
        ))
    }
    fn write_bytes(&self, dst: &Buffer, offset: usize, src: &[u8]) -> Result<()> {
        if dst.owner() != self.id {
            return Err(Error::Foreign("buffer"));
        }
        check_bytes(dst, offset, src.len())?;
        self.mem
            .write_bytes(dst.addr() + offset as u64, src)
            .map_err(|_| Error::InvalidArgument("write to a freed buffer".into()))
    }
    fn read_bytes(&self, src: &Buffer, offset: usize, dst: &mut [u8]) -> Result<()> {
        if src.owner() != self.id {
            return Err(Error::Foreign("buffer"));
        }
        check_bytes(src, offset, dst.len())?;
        self.mem
            .read_bytes(src.addr() + offset as u64, dst)
            .map_err(|_| Error::InvalidArgument("read of a freed buffer".into()))
    }
    fn load(&self, program: &Program) -> Result<LoadedProgram> {
        check_owner(program, self.id)?;
        let mut waiters = vec![Vec::new(); program.num_events()];
        for d in program.descriptors() {
            for k in 0..d.wait.len() {
                if d.wait[k] != NO_EVENT {
                    waiters[d.wait[k] as usize].push((d.id, k));
                }
            }
        }
        let inner = CpuProgram {
            descs: program.descriptors().to_vec(),
            waiters,
            counters: Mutex::new(vec![0; program.num_events()]),
            epoch: AtomicU64::new(0),
        };
        Ok(LoadedProgram {
            owner: self.id,
            program: Arc::new(program.clone()),
            inner: Box::new(inner),
        })
    }
    fn submit(&self, program: &LoadedProgram, iterations: u32, params: &[u64]) -> Result<Ticket> {
        self.submit_params(program, iterations, pack_params(params)?, None)
    }
    fn submit_until(
        &self,
        program: &LoadedProgram,
        iterations: u32,
        params: &[u64],
        stop: &Buffer,
    ) -> Result<Ticket> {
        let params = until_params(params, stop, self.id)?;
        self.submit_params(program, iterations, params, Some(stop))
    }
    fn wait(&self, ticket: &Ticket, _timeout: Duration) -> Result<()> {
        self.is_done(ticket).map(|_| ())
    }
    fn is_done(&self, ticket: &Ticket) -> Result<bool> {
        if ticket.owner != self.id {
            return Err(Error::Foreign("ticket"));
        }
        match &self.state.lock().expect("executor state poisoned").failed {
            Some(e) => Err(e.clone()),
            None => Ok(true),
        }
    }
    fn poll_outputs(&self, out: &mut Vec<u64>) -> Result<usize> {
        let mut o = self.outputs.lock().expect("output ring poisoned");
        let n = o.len();
        out.append(&mut o);
        Ok(n)
    }
}
