//! A model split across the ranks of a [`Cluster`], and its sessions.

use super::{Cluster, Shard, Sites};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::safetensors::Checkpoint;
use crate::model::session::{prompt_commands, wait_outputs, Model, Session, WeightSource};
use crate::program::trace::Trace;
use crate::quant::Fp4Format;
use crate::task::sample::Sampling;

/// One model over every rank of a cluster: each rank holds its [`Shard`].
pub struct ClusterModel {
    config: ModelConfig,
    models: Vec<Model>,
}

/// One sequence on a [`ClusterModel`]: a session per rank whose programs meet
/// at all-reduce sites.
pub struct ClusterSession {
    // Dropped before the sites their programs point into.
    sessions: Vec<Session>,
    _sites: Sites,
}

impl ClusterModel {
    /// Loads a validated checkpoint, each rank its shard (routed experts
    /// quantized to `experts` if given).
    pub fn load(cluster: &Cluster, ck: &Checkpoint, experts: Option<Fp4Format>) -> Result<Self> {
        ck.validate()?;
        Self::from_source(cluster, &WeightSource::Checkpoint(ck), experts)
    }

    /// Random weights generated on every rank (the same values as on one device).
    pub fn random(
        cluster: &Cluster,
        config: &ModelConfig,
        seed: u64,
        experts: Option<Fp4Format>,
    ) -> Result<Self> {
        config.validate()?;
        Self::from_source(cluster, &WeightSource::Random { config, seed }, experts)
    }

    /// Loads every rank's shard from `src`.
    pub fn from_source(
        cluster: &Cluster,
        src: &WeightSource<'_>,
        experts: Option<Fp4Format>,
    ) -> Result<Self> {
        let ranks = cluster.ranks();
        Shard::check(ranks, src.config(), experts)?;
        // Ranks load at the same time (random weights are drawn on each rank).
        let models = std::thread::scope(|s| {
            let loads: Vec<_> = (0..ranks)
                .map(|rank| {
                    s.spawn(move || {
                        let shard = Shard { rank, ranks };
                        Model::from_source_sharded(cluster.rank(rank), src, experts, shard)
                    })
                })
                .collect();
            loads
                .into_iter()
                .map(|l| l.join().expect("loader thread panicked"))
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(ClusterModel {
            config: src.config().clone(),
            models,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Rank `r`'s part.
    pub fn rank(&self, r: usize) -> &Model {
        &self.models[r]
    }

    /// A new session with a context of `max_seq` positions.
    pub fn session(&self, cluster: &Cluster, max_seq: usize) -> Result<ClusterSession> {
        if cluster.ranks() != self.models.len() {
            return Err(Error::InvalidArgument(format!(
                "a model of {} ranks on a cluster of {}",
                self.models.len(),
                cluster.ranks()
            )));
        }
        let sites = Sites::default();
        let sessions = self
            .models
            .iter()
            .enumerate()
            .map(|(r, m)| {
                // One rank has nobody to meet: its programs are a lone device's.
                let comm = (cluster.ranks() > 1).then(|| super::RankComm::new(cluster, &sites, r));
                m.session_on(cluster.rank(r), max_seq, None, comm.as_ref())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClusterSession {
            sessions,
            _sites: sites,
        })
    }
}

impl ClusterSession {
    /// Positions used so far.
    pub fn position(&self) -> usize {
        self.sessions[0].position()
    }

    /// Positions the context holds.
    pub fn max_seq(&self) -> usize {
        self.sessions[0].max_seq()
    }

    /// Rank `r`'s session (its programs name the stages, all-reduces included).
    pub fn rank(&self, r: usize) -> &Session {
        &self.sessions[r]
    }

    /// Feeds a prompt on every rank and returns the model's next token.
    pub fn prefill(&mut self, cluster: &Cluster, prompt: &[u32]) -> Result<u32> {
        let mut all: Vec<&mut Session> = self.sessions.iter_mut().collect();
        prefill_ranks(cluster, &mut all, prompt)
    }

    /// Feeds one prefill chunk (`tokens`, [`PREFILL_CHUNK`](crate::model::session::PREFILL_CHUNK)
    /// of them) on every rank with device timing of every task (GPU ranks
    /// created with tracing on), the ranks' commands submitted together.
    /// Returns each rank's times; [`Session::chunk_program`] of
    /// [`rank`](Self::rank) names the stages. The positions count like any
    /// others; the chunk's next token is dropped.
    pub fn trace_chunk(&mut self, cluster: &Cluster, tokens: &[u32]) -> Result<Vec<Trace>> {
        use crate::model::session::PREFILL_CHUNK;
        if tokens.len() != PREFILL_CHUNK {
            return Err(Error::InvalidArgument(format!(
                "a chunk is {PREFILL_CHUNK} tokens, not {}",
                tokens.len()
            )));
        }
        let rts = cluster.gpu_runtimes("tracing")?;
        self.sessions[0].check_prompt(tokens)?;
        drain(cluster)?;
        let mut staged = Vec::with_capacity(rts.len());
        for (s, rt) in self.sessions.iter().zip(&rts) {
            staged.push(s.stage_prompt(*rt, tokens)?.0);
        }
        cluster.run_all(&|r, _| rts[r].submit_traced(staged[r], &[]), &mut || Ok(()))?;
        let traces = staged
            .iter()
            .zip(&rts)
            .map(|(p, rt)| rt.read_trace(p))
            .collect::<Result<Vec<_>>>()?;
        self.sessions
            .iter_mut()
            .for_each(|s| s.advanced(tokens.len()));
        drain(cluster)?;
        Ok(traces)
    }

    /// Generates `n` tokens greedily in one command per rank.
    pub fn generate(&mut self, cluster: &Cluster, n: usize) -> Result<Vec<u32>> {
        self.generate_with(cluster, n, None, |_| {})
    }

    /// Generates `n` tokens in one command per rank, greedily or drawn with
    /// `sampling` (every rank draws the same), calling `on_token` as rank 0
    /// emits them.
    pub fn generate_with(
        &mut self,
        cluster: &Cluster,
        n: usize,
        sampling: Option<&Sampling>,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        self.sessions[0].check(&[], n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut programs = Vec::with_capacity(self.sessions.len());
        for (r, s) in self.sessions.iter().enumerate() {
            programs.push(s.stage_generate(cluster.rank(r), sampling)?);
        }
        drain(cluster)?;
        let mut first = Vec::new();
        let mut seen = 0;
        let mut stream = |out: &mut Vec<u64>| -> Result<()> {
            cluster.rank(0).poll_outputs(out)?;
            for &t in &out[seen..] {
                on_token(t as u32);
            }
            seen = out.len();
            Ok(())
        };
        cluster.run_all(&|r, ex| ex.submit(programs[r], n as u32, &[]), &mut || {
            stream(&mut first)
        })?;
        wait_outputs(cluster.rank(0), &mut first, n, "tokens from rank 0")?;
        stream(&mut first)?;
        let out = agree(cluster, first, n)?;
        self.sessions.iter_mut().for_each(|s| s.advanced(n));
        Ok(out.into_iter().map(|t| t as u32).collect())
    }
}

/// Drops values the ranks emitted earlier.
pub(crate) fn drain(cluster: &Cluster) -> Result<()> {
    let mut sink = Vec::new();
    for r in 0..cluster.ranks() {
        cluster.rank(r).poll_outputs(&mut sink)?;
    }
    Ok(())
}

/// Collects `n` values from every rank (rank 0's start with `first`) and
/// checks that they agree.
pub(crate) fn agree(cluster: &Cluster, first: Vec<u64>, n: usize) -> Result<Vec<u64>> {
    let mut base = first;
    wait_outputs(cluster.rank(0), &mut base, n, "tokens from rank 0")?;
    for r in 1..cluster.ranks() {
        let mut out = Vec::new();
        wait_outputs(cluster.rank(r), &mut out, n, "tokens")?;
        if out != base {
            let at = out.iter().zip(&base).position(|(a, b)| a != b).unwrap_or(0);
            return Err(Error::RankFailed {
                rank: r,
                ranks: cluster.ranks(),
                source: Box::new(Error::InvalidArgument(format!(
                    "its token {at} is {}, rank 0's is {}",
                    out[at], base[at]
                ))),
            });
        }
    }
    Ok(base)
}

/// Feeds a prompt through every rank's session and returns the next token.
pub(crate) fn prefill_ranks(
    cluster: &Cluster,
    sessions: &mut [&mut Session],
    prompt: &[u32],
) -> Result<u32> {
    sessions[0].check_prompt(prompt)?;
    drain(cluster)?;
    let mut rest = prompt;
    while !rest.is_empty() {
        let mut staged = Vec::with_capacity(sessions.len());
        for (r, s) in sessions.iter().enumerate() {
            staged.push(s.stage_prompt(cluster.rank(r), rest)?);
        }
        let n = staged[0].1;
        cluster.run_all(&|r, ex| ex.submit(staged[r].0, 1, &[]), &mut || Ok(()))?;
        sessions.iter_mut().for_each(|s| s.advanced(n));
        rest = &rest[n..];
    }
    let n = prompt_commands(prompt.len());
    let out = agree(cluster, Vec::new(), n)?;
    Ok(out[n - 1] as u32)
}
