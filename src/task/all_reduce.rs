//! `all_reduce`: one collective step of a tensor-parallel program, run by every
//! rank of a [`Cluster`](crate::cluster::Cluster) at the same point of the same
//! program.
//!
//! A *site* is one collective in a program. Each rank has, for each site, a
//! data buffer its own tasks write (an f32 partial sum, or `u32` words to
//! gather) and receive slots, one `u64` per rank and element. The site table,
//! a `u32` buffer on each rank read as `u64` entries, holds the address of
//! the cluster's abort word, then for every rank `q` the addresses of `q`'s
//! data and receive slots (peer memory, mapped host memory, or the shared
//! table of CPU ranks).
//!
//! Every task of a site, once the local producers are done (its event wait;
//! a task that follows its producer on that producer's worker, as the model
//! programs place them, has its wait met by the worker's order), for its
//! elements (runs of `count`, `stride` apart: one producer's outputs):
//! 1. pushes: stores each element of this rank's data, with the low 32 bits
//!    of the running epoch beside it, into slot `[rank][element]` of every
//!    rank's receive slots (one 64-bit store on a GPU, so no fence has to
//!    order value and tag; the value first on the CPU executor);
//! 2. takes: waits until its own slot `[q][element]` holds the epoch's tag
//!    for every rank `q`, giving up with a hang naming the missing rank after
//!    half the wait timeout on a GPU (so that the rank's other waits, which a
//!    missing rank stalls too, do not fire first), after the CPU executor's
//!    peer timeout there, or with a "peer failed" fault soon after the abort
//!    word is set (to 1 + the failed rank; host memory, so on a GPU one lane
//!    of each waiting warp reads it every 1024 polls), and combines:
//!    - *sum*: `out[k] += Σ_q data_q[k]` (f32 sum in rank order, so every rank
//!      gets the same bits; with one rank `out[k] + data_0[k]`, the rounding a
//!      single-device accumulating product does);
//!    - *gather*: rank `q`'s element `e` goes to
//!      `out[(e / chunk) * ranks * chunk + q * chunk + e % chunk]`.
//!
//! One pass through the peers, all of it stores: no rank reads another's
//! memory and no system-wide fence is needed (an earlier protocol published
//! arrival flags behind such a fence and read the peers' data: 10 µs at two
//! ranks against NCCL's 22-31).
//!
//! Reuse: a site's slots are rewritten one iteration later, so a rank must not
//! overwrite them while a slower rank still reads them. Programs guarantee
//! this by having at least two sites per iteration, each producer depending
//! on the previous site's output: a rank pushes to a later site only after
//! its producers, which follow its reads of the earlier sites (see
//! `cluster::collective`), and a faster rank cannot pass that later site
//! before the slower one pushed to it.

use std::sync::atomic::{fence, Ordering::SeqCst};
use std::time::Instant;

use bytemuck::{Pod, Zeroable};

use super::{bad, want_len, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Sum f32 partials into the output.
pub const OP_SUM: u32 = 0;
/// Gather `u32` words of every rank.
pub const OP_GATHER: u32 = 1;

/// Arguments of [`AllReduce`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AllReduceArgs {
    /// The site table (`u32` buffer of [`table_words`] words).
    pub table: u64,
    /// Output address (local).
    pub out: u64,
    /// This rank.
    pub rank: u32,
    /// Ranks in the cluster.
    pub ranks: u32,
    /// [`OP_SUM`] or [`OP_GATHER`].
    pub op: u32,
    /// [`DType`] code of `out` (sum: f32 or bf16; gather: u32).
    pub out_dtype: u32,
    /// Elements of each rank's data.
    pub seg: u32,
    /// Gather: words per interleaved chunk (divides `seg`).
    pub chunk: u32,
    /// First element of each rank's data this task handles.
    pub first: u32,
    /// Elements of each run this task handles.
    pub count: u32,
    /// Runs of `count` elements (sum only; 1 for a gather).
    pub runs: u32,
    /// Elements from one run's start to the next's.
    pub stride: u32,
}

/// `u32` words of a rank's receive slots at a site of `len` elements.
pub fn recv_words(ranks: usize, len: usize) -> usize {
    2 * ranks * len
}

/// `u32` words of a site table for `ranks` ranks.
pub fn table_words(ranks: usize) -> usize {
    2 * (2 + 2 * ranks)
}

/// Elements `first + i * stride .. first + i * stride + count` for `i` in
/// `0..runs`: what one task of a collective handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Runs {
    /// First element of the first run.
    pub first: usize,
    /// Elements of each run.
    pub count: usize,
    /// Number of runs.
    pub runs: usize,
    /// Elements from one run's start to the next's.
    pub stride: usize,
}

impl Runs {
    /// One run of `count` elements from `first`.
    pub fn new(first: usize, count: usize) -> Runs {
        Runs {
            first,
            count,
            runs: 1,
            stride: count,
        }
    }

    /// `runs` runs of `count` elements from `first`, `stride` apart, as a
    /// task's `u32` arguments give them.
    pub fn strided(first: u32, count: u32, runs: u32, stride: u32) -> Runs {
        let u = |v: u32| v as usize;
        Runs {
            first: u(first),
            count: u(count),
            runs: u(runs),
            stride: u(stride),
        }
    }
}

/// The collective step.
pub struct AllReduce;

impl AllReduce {
    /// Elements `first..first + count` of a sum over ranks of `seg` f32
    /// partials (this rank's is `local`) added into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn sum(
        table: &BufSlice,
        local: &BufSlice,
        out: &BufSlice,
        rank: usize,
        ranks: usize,
        first: usize,
        count: usize,
    ) -> Result<TaskSpec, ProgramError> {
        Self::sum_runs(table, local, out, rank, ranks, Runs::new(first, count))
    }

    /// The sum of [`sum`](Self::sum) over the elements of `runs` (for
    /// instance the outputs of one product task, a run per input row).
    pub fn sum_runs(
        table: &BufSlice,
        local: &BufSlice,
        out: &BufSlice,
        rank: usize,
        ranks: usize,
        runs: Runs,
    ) -> Result<TaskSpec, ProgramError> {
        if local.dtype() != DType::F32 || !out.dtype().is_float() {
            return Err(bad::<AllReduce>("sums f32 partials into a float output"));
        }
        want_len::<AllReduce>("out", out, local.len())?;
        Self::spec(table, local, out, rank, ranks, OP_SUM, 1, runs)
    }

    /// Words `first..first + count` of every rank's `seg` 32-bit words (this
    /// rank's are `local`; u32 or f32, moved as bits), interleaved in chunks of `chunk` words into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn gather(
        table: &BufSlice,
        local: &BufSlice,
        out: &BufSlice,
        rank: usize,
        ranks: usize,
        chunk: usize,
        first: usize,
        count: usize,
    ) -> Result<TaskSpec, ProgramError> {
        if local.dtype().size() != 4 || out.dtype() != local.dtype() {
            return Err(bad::<AllReduce>(
                "gathers 32-bit words (u32 or f32) into a buffer of the same type",
            ));
        }
        if chunk == 0 || local.len() % chunk != 0 {
            return Err(bad::<AllReduce>("the chunk must divide each rank's words"));
        }
        want_len::<AllReduce>("out", out, local.len() * ranks)?;
        Self::spec(
            table,
            local,
            out,
            rank,
            ranks,
            OP_GATHER,
            chunk,
            Runs::new(first, count),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spec(
        table: &BufSlice,
        local: &BufSlice,
        out: &BufSlice,
        rank: usize,
        ranks: usize,
        op: u32,
        chunk: usize,
        r: Runs,
    ) -> Result<TaskSpec, ProgramError> {
        if table.dtype() != DType::U32 {
            return Err(bad::<AllReduce>("the site table is a u32 buffer"));
        }
        want_len::<AllReduce>("table", table, table_words(ranks))?;
        if ranks == 0 || rank >= ranks || ranks > 256 {
            return Err(bad::<AllReduce>(format!(
                "rank {rank} of {ranks} (1..=256)"
            )));
        }
        let end = (r.runs.max(1) - 1)
            .checked_mul(r.stride)
            .and_then(|v| v.checked_add(r.first + r.count));
        let overlap = r.runs > 1 && r.stride < r.count;
        if r.count == 0 || r.runs == 0 || overlap || !matches!(end, Some(e) if e <= local.len()) {
            return Err(bad::<AllReduce>("elements out of range"));
        }
        let u = |v: usize| u32::try_from(v).map_err(|_| bad::<AllReduce>("too many elements"));
        let args = AllReduceArgs {
            table: table.addr(),
            out: out.addr(),
            rank: rank as u32,
            ranks: ranks as u32,
            op,
            out_dtype: out.dtype().code(),
            seg: u(local.len())?,
            chunk: u(chunk)?,
            first: u(r.first)?,
            count: u(r.count)?,
            runs: u(r.runs)?,
            stride: u(r.stride)?,
        };
        Ok(TaskSpec::new::<AllReduce>(args, &[table, local, out]))
    }
}

impl TaskKind for AllReduce {
    type Args = AllReduceArgs;
    const NAME: &'static str = "all_reduce";
    fn cpu(a: &AllReduceArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let ranks = a.ranks as usize;
        if ranks == 0 || a.rank >= a.ranks || a.chunk == 0 || a.runs == 0 {
            return Err(TaskFault::BadArgs("all_reduce ranks"));
        }
        if a.op != OP_SUM && a.runs != 1 {
            return Err(TaskFault::BadArgs("all_reduce gathers one run"));
        }
        let table = mem.read_u32(a.table, table_words(ranks))?;
        for i in 0..a.runs as u64 {
            let first = a.first as u64 + i * u64::from(a.stride);
            cpu_run(a, mem, &table, first as usize)?;
        }
        Ok(())
    }
    fn layout() -> Layout {
        layout!(AllReduceArgs {
            table,
            out,
            rank,
            ranks,
            op,
            out_dtype,
            seg,
            chunk,
            first,
            count,
            runs,
            stride
        })
    }
}

/// One run of `a.count` elements from `first` on the CPU executor: push,
/// take, combine. `t`: the site table's words.
fn cpu_run(a: &AllReduceArgs, mem: &dyn Memory, t: &[u32], first: usize) -> Result<(), TaskFault> {
    let ranks = a.ranks as usize;
    let entry = |i: usize| u64::from(t[2 * i]) | (u64::from(t[2 * i + 1]) << 32);
    let (data, recv) = (|q: usize| entry(2 + 2 * q), |q: usize| entry(3 + 2 * q));
    let tag = mem.epoch() as u32;
    let (count, seg) = (a.count as usize, a.seg as u64);
    // Push: each value, then (after a fence) its tag.
    let mine = mem.read_u32(data(a.rank as usize) + 4 * first as u64, count)?;
    for q in 0..ranks {
        let at = recv(q) + 8 * (u64::from(a.rank) * seg + first as u64);
        for (j, v) in mine.iter().enumerate() {
            mem.write_u32(at + 8 * j as u64, &[*v])?;
        }
        fence(SeqCst);
        for j in 0..count {
            mem.write_u32(at + 8 * j as u64 + 4, &[tag])?;
        }
    }
    // Take: every rank's values of these elements, each once its tag is there.
    let start = Instant::now();
    let mut got = vec![vec![0u32; count]; ranks];
    for (q, vals) in got.iter_mut().enumerate() {
        let at = recv(a.rank as usize) + 8 * (q as u64 * seg + first as u64);
        for (j, v) in vals.iter_mut().enumerate() {
            let slot = at + 8 * j as u64;
            loop {
                let seen = mem.read_u32(slot + 4, 1)?[0];
                if seen == tag {
                    fence(SeqCst);
                    *v = mem.read_u32(slot, 1)?[0];
                    break;
                }
                let failed = mem.read_u32(entry(0), 1)?[0];
                if failed != 0 {
                    return Err(TaskFault::PeerFailed { rank: failed - 1 });
                }
                if start.elapsed() > mem.wait_timeout() {
                    return Err(TaskFault::PeerHang {
                        rank: q as u32,
                        seen: u64::from(seen),
                        needed: u64::from(tag),
                    });
                }
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
    }
    if a.op == OP_SUM {
        let od = DType::from_code(a.out_dtype).ok_or(TaskFault::BadArgs("all_reduce dtype"))?;
        let mut sum: Vec<f32> = got[0].iter().map(|w| f32::from_bits(*w)).collect();
        for vals in &got[1..] {
            sum.iter_mut()
                .zip(vals)
                .for_each(|(s, v)| *s += f32::from_bits(*v));
        }
        let at = a.out + (first * od.size()) as u64;
        let out = mem.read_f32(at, od, count)?;
        let v: Vec<f32> = out.iter().zip(&sum).map(|(o, s)| o + s).collect();
        mem.write_f32(at, od, &v)
    } else {
        let chunk = a.chunk as usize;
        for (q, words) in got.iter().enumerate() {
            for (j, w) in words.iter().enumerate() {
                let e = first + j;
                let dst = (e / chunk) * ranks * chunk + q * chunk + e % chunk;
                mem.write_u32(a.out + 4 * dst as u64, &[*w])?;
            }
        }
        Ok(())
    }
}
