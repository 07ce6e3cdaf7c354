//! Collective sites of tensor-parallel programs.
//!
//! A site is one all-reduce (or gather) in a program. Every rank builds the
//! same program, asking for sites in the same order; the first rank to ask for
//! site `k` allocates it for all ranks: each rank's data and receive slots
//! in memory every rank can address, and each rank's site table (the abort
//! word, then every rank's data and receive slots; see
//! [`all_reduce`](crate::task::all_reduce)).
//!
//! Reuse of a site's slots one iteration later is safe because decode
//! programs meet at two or more sites per iteration, each site's producers
//! depending on the previous site's result: a rank pushing to site `k + 1`
//! has finished reading site `k`, and one pushing to the first site of
//! iteration `t + 1` has finished iteration `t`.

use std::cell::Cell;
use std::sync::Mutex;

use super::{Cluster, Shard};
use crate::buffer::{BufSlice, Buffer, DType};
use crate::error::{Error, Result};
use crate::exec::ExecutorExt;
use crate::program::{ops, ProgramBuilder};
use crate::task::all_reduce::{recv_words, table_words, AllReduce, Runs};
use crate::task::split_even;

struct Site {
    dtype: DType,
    len: usize,
    data: Vec<Buffer>,
    tables: Vec<Buffer>,
    _recv: Vec<Buffer>,
}

/// The sites of one set of rank programs (kept alive as long as they are).
#[derive(Default)]
pub(crate) struct Sites {
    inner: Mutex<Vec<Site>>,
}

impl Site {
    fn new(cluster: &Cluster, dtype: DType, len: usize) -> Result<Site> {
        let n = cluster.ranks();
        let mut data = Vec::with_capacity(n);
        let mut recv = Vec::with_capacity(n);
        // Tags start at zero; epochs at one.
        let zeros = vec![0u32; recv_words(n, len)];
        for q in 0..n {
            data.push(cluster.alloc_shared(q, dtype, len)?);
            let r = cluster.alloc_shared(q, DType::U32, zeros.len())?;
            cluster.rank(q).write_u32(&r, &zeros)?;
            recv.push(r);
        }
        let mut entries = vec![cluster.abort_addr(), 0];
        for q in 0..n {
            entries.push(data[q].addr());
            entries.push(recv[q].addr());
        }
        let words: Vec<u32> = entries
            .iter()
            .flat_map(|e| [*e as u32, (*e >> 32) as u32])
            .collect();
        debug_assert_eq!(words.len(), table_words(n));
        let mut tables = Vec::with_capacity(n);
        for r in 0..n {
            let t = cluster.rank(r).alloc(DType::U32, words.len())?;
            cluster.rank(r).write_u32(&t, &words)?;
            tables.push(t);
        }
        Ok(Site {
            dtype,
            len,
            data,
            tables,
            _recv: recv,
        })
    }
}

/// One rank's view while its program is built.
pub(crate) struct RankComm<'a> {
    cluster: &'a Cluster,
    sites: &'a Sites,
    rank: usize,
    next: Cell<usize>,
}

impl<'a> RankComm<'a> {
    /// Rank `rank` of `cluster`, allocating from `sites`.
    pub(crate) fn new(cluster: &'a Cluster, sites: &'a Sites, rank: usize) -> Self {
        RankComm {
            cluster,
            sites,
            rank,
            next: Cell::new(0),
        }
    }

    /// This rank's share of the model.
    pub(crate) fn shard(&self) -> Shard {
        Shard {
            rank: self.rank,
            ranks: self.cluster.ranks(),
        }
    }

    /// The next site of the program: its table and this rank's data buffer
    /// (which the site's producers write).
    pub(crate) fn site(&self, dtype: DType, len: usize) -> Result<(Buffer, Buffer)> {
        let k = self.next.get();
        self.next.set(k + 1);
        let mut sites = self.sites.inner.lock().expect("sites poisoned");
        if k == sites.len() {
            sites.push(Site::new(self.cluster, dtype, len)?);
        }
        let s = &sites[k];
        if s.dtype != dtype || s.len != len {
            return Err(Error::InvalidArgument(format!(
                "rank {} asks for collective {k} as {len} {dtype}; another rank built it as {} {}",
                self.rank, s.len, s.dtype
            )));
        }
        Ok((s.tables[self.rank].clone(), s.data[self.rank].clone()))
    }

    /// Tasks adding the ranks' f32 partials in `data` into `out`.
    pub(crate) fn sum(
        &self,
        b: &mut ProgramBuilder,
        table: &Buffer,
        data: &Buffer,
        out: &BufSlice,
        workers: usize,
    ) -> Result<ops::Group> {
        let n = self.cluster.ranks();
        let parts = (data.len() / 256).clamp(1, workers);
        let mut ids = Vec::new();
        for (first, count) in split_even(data.len(), parts) {
            let t = AllReduce::sum(&table.all(), &data.all(), out, self.rank, n, first, count)?;
            ids.push(b.push(t).id());
        }
        Ok(ops::Group(ids))
    }

    /// Whether the sums of a site can follow its `producers` tasks
    /// ([`sum_after`](Self::sum_after)) on `workers` workers. An executor that
    /// runs ready tasks in any order (`any_order`: the CPU executor) cannot
    /// take more such producers than it has workers: every thread could then
    /// wait in a sum whose peer task cannot start. A GPU runs each worker's
    /// list in order, the same lists on every rank, so a sum's peer task
    /// always comes.
    pub(crate) fn followers_fit(producers: usize, workers: usize, any_order: bool) -> bool {
        !any_order || producers <= workers
    }

    /// Tasks adding the ranks' f32 partials in `data` into `out`, one after
    /// each of the `producers` that write `data` (`gemv_bf16` or
    /// `moe_combine` tasks), on its worker: each sums the elements its
    /// producer wrote as soon as that producer is done, with no wait for the
    /// stage's other tasks. Each producer signals an event of its own, named
    /// `name (k)`. Only where [`followers_fit`](Self::followers_fit).
    pub(crate) fn sum_after(
        &self,
        b: &mut ProgramBuilder,
        table: &Buffer,
        data: &Buffer,
        out: &BufSlice,
        producers: &ops::Group,
        name: &str,
    ) -> Result<ops::Group> {
        let n = self.cluster.ranks();
        let mut specs = Vec::with_capacity(producers.len());
        for &p in &producers.0 {
            let written = b.spec(p).and_then(|s| s.written_f32());
            let Some((addr, runs)) = written else {
                return Err(Error::InvalidArgument(format!(
                    "{name}: a producer of an all-reduce site must be a product writing f32"
                )));
            };
            let offset = addr.checked_sub(data.addr()).filter(|o| o % 4 == 0);
            let Some(offset) = offset else {
                return Err(Error::InvalidArgument(format!(
                    "{name}: a producer writes outside the site's data"
                )));
            };
            let runs = Runs {
                first: runs.first + (offset / 4) as usize,
                ..runs
            };
            specs.push(AllReduce::sum_runs(
                &table.all(),
                &data.all(),
                out,
                self.rank,
                n,
                runs,
            )?);
        }
        let mut ids = Vec::with_capacity(specs.len());
        for (k, (&p, spec)) in producers.0.iter().zip(specs).enumerate() {
            let ev = b.event(&format!("{name} ({k})"));
            b.task(p).signal(ev);
            ids.push(b.push(spec).wait(ev).follow(p).id());
        }
        Ok(ops::Group(ids))
    }

    /// One task gathering every rank's `data` into `out`, in chunks of `chunk`.
    pub(crate) fn gather(
        &self,
        b: &mut ProgramBuilder,
        table: &Buffer,
        data: &Buffer,
        out: &BufSlice,
        chunk: usize,
    ) -> Result<ops::Group> {
        let n = self.cluster.ranks();
        let t = AllReduce::gather(
            &table.all(),
            &data.all(),
            out,
            self.rank,
            n,
            chunk,
            0,
            data.len(),
        )?;
        Ok(ops::Group(vec![b.push(t).id()]))
    }
}
