//! A standalone chain of all-reduces over a cluster: the latency benchmark's
//! program, and a way to test the collective machinery (including a rank
//! that faults or never arrives) without a model.

use super::{Cluster, RankComm, Sites};
use crate::buffer::{Buffer, DType};
use crate::error::Result;
use crate::exec::{Executor, LoadedProgram, Ticket};
use crate::program::ProgramBuilder;
use crate::task::copy::Copy;
use crate::task::nop::Nop;

/// Per iteration on every rank: copy row `param 0` of its `[rows, len]` f32
/// input into the first site's data, then `sites` all-reduces in a chain, each
/// adding every rank's data into the next site's data (the last into the
/// output). After one iteration from zero, `output = ranks^(sites-1) · Σ_q input_q[row_q]`.
pub struct AllReduceChain {
    programs: Vec<LoadedProgram>,
    idle: Vec<LoadedProgram>,
    inputs: Vec<Buffer>,
    outputs: Vec<Buffer>,
    len: usize,
    rows: usize,
    sites: usize,
    _sites: Sites,
}

impl AllReduceChain {
    /// `sites` chained all-reduces of `len` f32 values, inputs of `rows` rows.
    pub fn new(cluster: &Cluster, len: usize, rows: usize, sites: usize) -> Result<Self> {
        let all = Sites::default();
        let (mut programs, mut idle, mut inputs, mut outputs) = (vec![], vec![], vec![], vec![]);
        for r in 0..cluster.ranks() {
            let ex = cluster.rank(r);
            let comm = RankComm::new(cluster, &all, r);
            let input = ex.alloc(DType::F32, rows * len)?;
            let output = ex.alloc(DType::F32, len)?;
            let mut b = ProgramBuilder::new();
            let mut site = comm.site(DType::F32, len)?;
            let mut prev = b.event("input");
            b.push(Copy::row(&site.1.all(), &input.all(), len, 0)?)
                .param(2, 0)
                .signal(prev);
            for k in 0..sites {
                let next = if k + 1 < sites {
                    Some(comm.site(DType::F32, len)?)
                } else {
                    None
                };
                let out = next.as_ref().map_or(output.clone(), |n| n.1.clone());
                let g = comm.sum(&mut b, &site.0, &site.1, &out.all(), ex.num_workers())?;
                let ev = b.event(&format!("all-reduce {k}"));
                g.wait(&mut b, prev).signal(&mut b, ev);
                prev = ev;
                if let Some(n) = next {
                    site = n;
                }
            }
            programs.push(ex.load(&b.build()?)?);
            let mut nop = ProgramBuilder::new();
            nop.push(Nop::task());
            idle.push(ex.load(&nop.build()?)?);
            inputs.push(input);
            outputs.push(output);
        }
        Ok(AllReduceChain {
            programs,
            idle,
            inputs,
            outputs,
            len,
            rows,
            sites,
            _sites: all,
        })
    }

    /// Rank `r`'s input, `[rows, len]` f32.
    pub fn input(&self, r: usize) -> &Buffer {
        &self.inputs[r]
    }

    /// Rank `r`'s output, `len` f32.
    pub fn output(&self, r: usize) -> &Buffer {
        &self.outputs[r]
    }

    /// Values per all-reduce.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the all-reduces are empty (never: `len` is at least 1).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All-reduces per iteration.
    pub fn sites(&self) -> usize {
        self.sites
    }

    /// Runs `iterations` iterations on every rank, rank `r` copying input row
    /// `rows[r]` (a row past the input faults on that rank). `absent`: that
    /// rank runs an empty program instead, as if it never arrived.
    pub fn run(
        &self,
        cluster: &Cluster,
        iterations: u32,
        rows: &[u32],
        absent: Option<usize>,
    ) -> Result<()> {
        let submit = |r: usize, ex: &dyn Executor| -> Result<Ticket> {
            if absent == Some(r) {
                return ex.submit(&self.idle[r], 1, &[]);
            }
            let row = rows.get(r).copied().unwrap_or(0);
            ex.submit(&self.programs[r], iterations, &[u64::from(row)])
        };
        cluster.run_all(&submit, &mut || Ok(()))
    }

    /// Rows of each input.
    pub fn rows(&self) -> usize {
        self.rows
    }
}
