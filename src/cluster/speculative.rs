//! DFlash speculative decoding over a cluster: the target split across the
//! ranks, the draft whole on every rank, and the draft's proposals chosen from
//! every rank's slice of the shared LM head.

use super::model::{agree, drain, prefill_ranks};
use super::{Cluster, ClusterModel, RankComm, Sites};
use crate::dflash::{DflashOptions, DflashSession, DflashStats, DraftModel};
use crate::error::{Error, Result};
use crate::model::session::{wait_outputs, ExpertUse, Session};

/// One sequence decoded with DFlash on every rank: one command per rank for
/// `n` tokens, identical to greedy decoding on the same cluster.
pub struct ClusterDflashSession {
    // Dropped before the sites their programs point into.
    sessions: Vec<DflashSession>,
    _sites: Sites,
}

impl ClusterDflashSession {
    /// A session over `model` with `drafts[r]` (the whole draft, loaded on
    /// rank `r` against `model.rank(r)`) on each rank.
    pub fn new(
        cluster: &Cluster,
        model: &ClusterModel,
        drafts: &[DraftModel],
        max_seq: usize,
        opts: &DflashOptions,
    ) -> Result<Self> {
        if drafts.len() != cluster.ranks() {
            return Err(Error::InvalidArgument(format!(
                "{} drafts for {} ranks",
                drafts.len(),
                cluster.ranks()
            )));
        }
        let sites = Sites::default();
        let sessions = drafts
            .iter()
            .enumerate()
            .map(|(r, d)| {
                // One rank has nobody to meet (as ClusterModel::session).
                let comm = (cluster.ranks() > 1).then(|| RankComm::new(cluster, &sites, r));
                DflashSession::new_on(
                    cluster.rank(r),
                    model.rank(r),
                    d,
                    max_seq,
                    opts,
                    comm.as_ref(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClusterDflashSession {
            sessions,
            _sites: sites,
        })
    }

    /// Positions used so far.
    pub fn position(&self) -> usize {
        self.sessions[0].position()
    }

    /// Feeds a prompt on every rank and returns the model's next token.
    pub fn prefill(&mut self, cluster: &Cluster, prompt: &[u32]) -> Result<u32> {
        let mut all: Vec<&mut Session> = self.sessions.iter_mut().map(|s| s.session()).collect();
        prefill_ranks(cluster, &mut all, prompt)
    }

    /// Generates up to `n` greedy tokens in one command per rank, stopping
    /// early after `stop_token` (emitted).
    pub fn generate(
        &mut self,
        cluster: &Cluster,
        n: usize,
        stop_token: Option<u32>,
    ) -> Result<Vec<u32>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        for (r, s) in self.sessions.iter().enumerate() {
            s.prepare(cluster.rank(r), n, stop_token)?;
        }
        drain(cluster)?;
        let sessions = &self.sessions;
        cluster.run_all(&|r, ex| sessions[r].submit(ex, n), &mut || Ok(()))?;
        let produced = self.sessions[0].produced(cluster.rank(0))?;
        let mut first = Vec::new();
        wait_outputs(cluster.rank(0), &mut first, produced, "tokens from rank 0")?;
        let out = agree(cluster, first, produced)?;
        for s in &mut self.sessions {
            s.session().advanced(produced);
        }
        Ok(out.into_iter().map(|t| t as u32).collect())
    }

    /// Acceptance statistics since the session began (the same on every rank).
    pub fn stats(&self, cluster: &Cluster) -> Result<DflashStats> {
        self.sessions[0].stats(cluster.rank(0))
    }

    /// Unique experts per MoE layer in the target's blocks (rank 0's routing,
    /// the same on every rank), as [`Session::expert_use`].
    pub fn expert_use(&self, cluster: &Cluster) -> Result<Vec<ExpertUse>> {
        self.sessions[0].expert_use(cluster.rank(0))
    }

    /// Starts the counts of [`expert_use`](Self::expert_use) afresh.
    pub fn reset_expert_use(&mut self, cluster: &Cluster) -> Result<()> {
        self.sessions[0].session().reset_expert_use(cluster.rank(0))
    }

    /// Runs one iteration on every rank with device timing of every task
    /// (GPU ranks created with tracing on), as
    /// [`DflashSession::trace_iteration`] does on one device: the ranks'
    /// commands are submitted together, since they meet at their
    /// all-reduces. Returns each rank's times;
    /// [`iteration_program`](Self::iteration_program) names the stages.
    pub fn trace_iteration(
        &mut self,
        cluster: &Cluster,
    ) -> Result<Vec<crate::program::trace::Trace>> {
        let rts = cluster.gpu_runtimes("tracing")?;
        drain(cluster)?;
        let before = self
            .sessions
            .iter()
            .zip(&rts)
            .map(|(s, rt)| s.traced_prepare(rt))
            .collect::<Result<Vec<_>>>()?;
        let sessions = &self.sessions;
        cluster.run_all(&|r, _| sessions[r].traced_submit(rts[r]), &mut || Ok(()))?;
        self.sessions
            .iter_mut()
            .zip(&rts)
            .zip(before)
            .map(|((s, rt), b)| s.traced_finish(rt, b))
            .collect()
    }

    /// Rank `r`'s iteration program (its event names label the stages).
    pub fn iteration_program(&self, r: usize) -> &crate::program::Program {
        self.sessions[r].iteration_program()
    }
}
