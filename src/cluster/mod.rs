//! Several devices running one model: one executor (a resident kernel per GPU,
//! or a CPU executor) per *rank*, the model split across ranks by tensor
//! parallelism, and the ranks meeting inside their programs at all-reduce
//! steps ([`all_reduce`](crate::task::all_reduce)).
//!
//! - [`Cluster`] opens the ranks and the memory they reach each other through
//!   ([`Transport`]); a failure on one rank ends every rank's wait with
//!   [`Error::RankFailed`] naming it.
//! - [`shard`] says which heads, rows and columns each rank holds.
//! - [`ClusterModel`] and [`ClusterSession`] load a model across the ranks and
//!   decode with one command per rank for `n` tokens, as on one device;
//!   [`ClusterDflashSession`] does the same with DFlash speculative decoding.

mod collective;
mod model;
mod probe;
pub mod shard;
mod speculative;

use std::time::{Duration, Instant};

use crate::buffer::{Buffer, DType};
use crate::cpu::{CpuExecutor, CpuOptions};
use crate::cuda::{Runtime, RuntimeOptions};
use crate::error::{Error, Result};
use crate::exec::{Executor, ExecutorExt, Ticket};

pub(crate) use collective::{RankComm, Sites};
pub use model::{ClusterModel, ClusterSession};
pub use probe::AllReduceChain;
pub use shard::Shard;
pub use speculative::ClusterDflashSession;

/// How ranks reach each other's collective buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// CPU ranks in one address space.
    Shared,
    /// GPU ranks reading each other's device memory directly (peer access over
    /// NVLink or PCIe); also ranks that share one GPU.
    Peer,
    /// GPU ranks exchanging through pinned host memory mapped into every GPU:
    /// slower, but needs no peer access.
    HostMapped,
}

/// Options of a GPU [`Cluster`].
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Options of every rank's runtime (`sms` is set per rank when ranks share a GPU).
    pub runtime: RuntimeOptions,
    /// Force a transport; by default [`Transport::Peer`] when every pair of
    /// devices has peer access, otherwise [`Transport::HostMapped`].
    pub transport: Option<Transport>,
}

enum Ranks {
    Cpu(Vec<CpuExecutor>),
    Gpu(Vec<Runtime>),
}

/// The ranks of one model: executors that run the same programs in step.
pub struct Cluster {
    ranks: Ranks,
    transport: Transport,
    /// Set by the host to `1 + rank` when a rank failed; collective waits stop.
    abort: Buffer,
    timeout: Duration,
}

impl Cluster {
    /// `ranks` CPU executors sharing one address space (threads simulate the
    /// ranks); a rank waits at most 30 s for another.
    pub fn cpu(ranks: usize, opts: CpuOptions) -> Result<Cluster> {
        Self::cpu_with_timeout(ranks, opts, Duration::from_secs(30))
    }

    /// [`cpu`](Self::cpu) with the longest wait for another rank.
    pub fn cpu_with_timeout(ranks: usize, opts: CpuOptions, wait: Duration) -> Result<Cluster> {
        if ranks == 0 {
            return Err(Error::InvalidArgument("a cluster needs a rank".into()));
        }
        let exs = CpuExecutor::group(ranks, opts, wait);
        let abort = exs[0].alloc(DType::U32, 2)?;
        Ok(Cluster {
            ranks: Ranks::Cpu(exs),
            transport: Transport::Shared,
            abort,
            timeout: Duration::from_secs(600),
        })
    }

    /// One rank per entry of `devices` (GPU ordinals). An ordinal listed `k`
    /// times gives `k` ranks on that GPU, each with its share of the SMs.
    pub fn gpus(devices: &[usize], opts: &ClusterOptions) -> Result<Cluster> {
        if devices.is_empty() {
            return Err(Error::InvalidArgument("a cluster needs a rank".into()));
        }
        // NVLink multicast stays off (the crate never uses it; NCCL must not either).
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        let mut distinct: Vec<usize> = devices.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let peer = {
            let mut all = true;
            for &a in &distinct {
                for &b in &distinct {
                    if a != b && !crate::cuda::driver::can_access_peer(a, b)? {
                        all = false;
                    }
                }
            }
            all
        };
        let transport = match opts.transport {
            Some(Transport::Shared) => {
                return Err(Error::InvalidArgument(
                    "the shared transport is for CPU ranks".into(),
                ))
            }
            Some(Transport::Peer) if !peer => {
                return Err(Error::InvalidArgument(
                    "peer transport requested but some devices cannot access each other".into(),
                ))
            }
            Some(t) => t,
            None if peer => Transport::Peer,
            None => Transport::HostMapped,
        };
        let mut runtimes = Vec::with_capacity(devices.len());
        for &d in devices {
            let share = devices.iter().filter(|&&e| e == d).count() as u32;
            let sms = if share > 1 {
                let total = crate::cuda::sm_count(d)?;
                Some(opts.runtime.sms.unwrap_or(total).min(total) / share)
            } else {
                opts.runtime.sms
            };
            runtimes.push(Runtime::with_options(
                d,
                RuntimeOptions {
                    sms,
                    ..opts.runtime.clone()
                },
            )?);
        }
        if transport == Transport::Peer {
            for &a in &distinct {
                for &b in &distinct {
                    if a != b {
                        crate::cuda::driver::grant_pool_access(a, b)?;
                    }
                }
            }
        }
        let abort = runtimes[0].alloc_host_mapped(DType::U32, 2)?;
        let timeout = opts.runtime.host_timeout;
        Ok(Cluster {
            ranks: Ranks::Gpu(runtimes),
            transport,
            abort,
            timeout,
        })
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        match &self.ranks {
            Ranks::Cpu(v) => v.len(),
            Ranks::Gpu(v) => v.len(),
        }
    }

    /// The executor of rank `r`.
    pub fn rank(&self, r: usize) -> &dyn Executor {
        match &self.ranks {
            Ranks::Cpu(v) => &v[r],
            Ranks::Gpu(v) => &v[r],
        }
    }

    /// The GPU runtime of rank `r` (none for CPU ranks).
    pub fn runtime(&self, r: usize) -> Option<&Runtime> {
        match &self.ranks {
            Ranks::Gpu(v) => v.get(r),
            Ranks::Cpu(_) => None,
        }
    }

    /// Every rank's runtime, for what only GPU ranks can do (`what`, named in
    /// the error CPU ranks give).
    pub(crate) fn gpu_runtimes(&self, what: &str) -> Result<Vec<&Runtime>> {
        match &self.ranks {
            Ranks::Gpu(v) => Ok(v.iter().collect()),
            Ranks::Cpu(_) => Err(Error::InvalidArgument(format!("{what} needs GPU ranks"))),
        }
    }

    /// How ranks reach each other.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Whether the ranks are GPUs.
    pub fn is_gpu(&self) -> bool {
        matches!(self.ranks, Ranks::Gpu(_))
    }

    /// One line naming the ranks and the transport.
    pub fn describe(&self) -> String {
        format!(
            "{} ranks over {:?}: {}",
            self.ranks(),
            self.transport,
            (0..self.ranks())
                .map(|r| self.rank(r).describe())
                .collect::<Vec<_>>()
                .join("; ")
        )
    }

    /// A buffer of rank `r` that every rank can address.
    pub(crate) fn alloc_shared(&self, r: usize, dtype: DType, len: usize) -> Result<Buffer> {
        match (&self.ranks, self.transport) {
            (Ranks::Gpu(v), Transport::HostMapped) => v[r].alloc_host_mapped(dtype, len),
            _ => self.rank(r).alloc(dtype, len),
        }
    }

    /// Address of the abort word.
    pub(crate) fn abort_addr(&self) -> u64 {
        self.abort.addr()
    }

    /// Marks rank `r` failed: every collective wait on every rank ends.
    fn fail(&self, r: usize) {
        // The first failure stays recorded; a write error leaves the timeouts.
        let ex = self.rank(0);
        if ex.read_u32(&self.abort).is_ok_and(|w| w[0] == 0) {
            let _ = ex.write_u32(&self.abort, &[r as u32 + 1, 0]);
        }
    }

    /// Runs `submit` for every rank and waits for all of them. CPU ranks run
    /// their commands to completion inside `submit`, so each gets a thread;
    /// GPU ranks are submitted in turn and polled. `on_poll` runs while GPU
    /// ranks work (to stream their outputs).
    pub(crate) fn run_all(
        &self,
        submit: &(dyn Fn(usize, &dyn Executor) -> Result<Ticket> + Sync),
        on_poll: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let n = self.ranks();
        let results: Vec<Result<()>> = if self.is_gpu() {
            // Per rank: its ticket, and its outcome once known.
            let mut tickets = Vec::with_capacity(n);
            let mut done: Vec<Option<Result<()>>> = Vec::with_capacity(n);
            for r in 0..n {
                match submit(r, self.rank(r)) {
                    Ok(t) => {
                        tickets.push(Some(t));
                        done.push(None);
                    }
                    Err(e) => {
                        self.fail(r);
                        tickets.push(None);
                        done.push(Some(Err(e)));
                    }
                }
            }
            let deadline = Instant::now() + self.timeout;
            while done.iter().any(Option::is_none) {
                for r in 0..n {
                    let (Some(t), None) = (&tickets[r], &done[r]) else {
                        continue;
                    };
                    match self.rank(r).is_done(t) {
                        Ok(true) => done[r] = Some(Ok(())),
                        Ok(false) => {}
                        Err(e) => {
                            self.fail(r);
                            done[r] = Some(Err(e));
                        }
                    }
                }
                on_poll()?;
                if Instant::now() > deadline {
                    let waiting: Vec<usize> = (0..n).filter(|&r| done[r].is_none()).collect();
                    return Err(Error::HostTimeout {
                        waited: self.timeout,
                        what: format!("ranks {waiting:?} to finish a command"),
                    });
                }
                std::thread::yield_now();
            }
            done.into_iter().flatten().collect()
        } else {
            let results = std::thread::scope(|s| {
                let handles: Vec<_> = (0..n)
                    .map(|r| {
                        s.spawn(move || {
                            let ex = self.rank(r);
                            let res = submit(r, ex).and_then(|t| ex.wait(&t, ex.default_timeout()));
                            if res.is_err() {
                                self.fail(r);
                            }
                            res
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("rank thread panicked"))
                    .collect()
            });
            on_poll()?;
            results
        };
        match culprit(&results) {
            None => Ok(()),
            Some((rank, e)) => Err(Error::RankFailed {
                rank,
                ranks: n,
                source: Box::new(e),
            }),
        }
    }
}

/// The rank whose failure explains the others': one that failed on its own
/// (not a wait), else the rank a collective waited for in vain, else one whose
/// wait timed out, else any.
fn culprit(results: &[Result<()>]) -> Option<(usize, Error)> {
    // (priority, rank to name) of rank `r`'s error; lower priorities explain more.
    let cause = |r: usize, e: &Error| match e {
        Error::DeviceFault { what, .. } if *what == crate::cpu::PEER_FAILED => (3, r),
        Error::DeviceHang { counter, .. } => match crate::cpu::peer_of_counter(counter) {
            Some(q) => (1, q),
            None => (2, r),
        },
        _ => (0, r),
    };
    results
        .iter()
        .enumerate()
        .filter_map(|(r, res)| res.as_ref().err().map(|e| (cause(r, e), e)))
        .min_by_key(|((priority, _), _)| *priority)
        .map(|((_, rank), e)| (rank, e.clone()))
}
