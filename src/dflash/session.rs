//! A target session with a DFlash draft: the draft → verify → accept loop as
//! one device program, run by one command for `n` tokens.
//!
//! One iteration (one program run) at position `pos` with last token `t`:
//!
//! 1. **Draft block.** The block `[t, MASK × (B−1)]` at positions
//!    `pos .. pos+B` is embedded with the target's embedding and runs
//!    through the draft's layers; each layer's queries come from the block,
//!    its keys and values from the draft's context cache (positions `< pos`)
//!    and the block, attended bidirectionally. The draft's final norm and the
//!    target's LM head give `B−1` greedy proposals, written after `t` into
//!    the verify block.
//! 2. **Verify.** The target runs the `B` rows (its 1..16-row path), copies
//!    the outputs of the draft's `target_layer_ids` layers, and picks its
//!    greedy token after every row.
//! 3. **Context.** The copied hidden states of the `B` rows are concatenated,
//!    projected (`fc`, `hidden_norm`) and turned into each draft layer's
//!    keys and values at `pos .. pos+B` (rows the target rejects are
//!    overwritten later, never read).
//! 4. **Accept** ([`DflashAccept`]): the longest agreeing prefix plus the
//!    target's own token are emitted, the position advances, and the command
//!    ends when it has its tokens.
//!
//! Prefill runs the target's usual programs, which here also capture hidden
//! states and fill the draft's context cache.

use super::draft::DraftModel;
use crate::buffer::{BufSlice, Buffer, DType};
use crate::cluster::RankComm;
use crate::error::{Error, Result};
use crate::exec::{Executor, ExecutorExt, LoadedProgram};
use crate::model::session::{ExpertUse, Extras, Hook, MAX_FUSED_NORM_ROWS};
use crate::model::{Model, Session};
use crate::program::{ops, EventId, ProgramBuilder};
use crate::task::argmax::Argmax;
use crate::task::attention::takes_rope_table;
use crate::task::dflash_accept::{state, AcceptIo, DflashAccept};
use crate::task::dflash_inject::DflashInject;
use crate::task::gemv_bf16::{prologue_fits, GemvShape, Prologue};
use crate::task::rope_kv::HeadShape;

/// How a [`DflashSession`] runs.
#[derive(Clone, Debug, Default)]
pub struct DflashOptions {
    /// Tokens per block (2..=16); the draft's `block_size` when `None`.
    pub block_size: Option<usize>,
    /// Benchmark mode: the draft's proposals are replaced after it ran (see
    /// [`DflashInject`]). Results stay the target's greedy tokens.
    pub injected: Option<Injected>,
}

/// Injected acceptance for benchmarks: the greedy sequence by position
/// (prompt then continuation) and the mean acceptance length to produce.
#[derive(Clone, Debug)]
pub struct Injected {
    /// Token at each position, from position 0.
    pub reference: Vec<u32>,
    /// Mean tokens per iteration (1..=block size).
    pub tau: f64,
}

/// Acceptance statistics of a [`DflashSession`] so far.
#[derive(Clone, Debug, PartialEq)]
pub struct DflashStats {
    /// Iterations run.
    pub iterations: u64,
    /// `histogram[k]`: iterations that accepted `k` tokens (`k` in 1..=16).
    pub histogram: [u64; 17],
}

impl DflashStats {
    /// Mean acceptance length τ (tokens per iteration, counting the
    /// target's own token).
    pub fn mean_acceptance(&self) -> f64 {
        let n: u64 = self.histogram.iter().sum();
        let t: u64 = self
            .histogram
            .iter()
            .enumerate()
            .map(|(k, &c)| k as u64 * c)
            .sum();
        if n == 0 {
            0.0
        } else {
            t as f64 / n as f64
        }
    }
}

/// A sequence decoded by a target [`Model`] with a DFlash draft.
pub struct DflashSession {
    session: Session,
    block: usize,
    vids: Buffer,
    dids: Buffer,
    state: Buffer,
    stop: Buffer,
    iteration: LoadedProgram,
    injected: bool,
}

/// τ × 1000, checked against the block size.
fn tau_milli(tau: f64, block: usize) -> Result<u32> {
    if !(1.0..=block as f64).contains(&tau) {
        return Err(Error::InvalidArgument(format!(
            "injected tau {tau} outside 1..={block}"
        )));
    }
    Ok((tau * 1000.0).round() as u32)
}

/// Draft-side buffers the programs share.
struct DraftBufs {
    cap: Buffer,
    ctx: Buffer,
    ctxn: Buffer,
    kv: Vec<Buffer>,
    caches: Vec<Buffer>,
    cache_len: usize,
}

/// A chain of stages: each waits on the previous one.
struct Stages<'a> {
    b: &'a mut ProgramBuilder,
    prev: EventId,
}

impl Stages<'_> {
    fn stage(&mut self, g: ops::Group, name: &str) {
        g.wait(self.b, self.prev);
        let ev = self.b.event(name);
        g.signal(self.b, ev);
        self.prev = ev;
    }
}

impl DflashSession {
    /// A session of `max_seq` positions on `model` drafted by `draft`.
    pub fn new(
        ex: &dyn Executor,
        model: &Model,
        draft: &DraftModel,
        max_seq: usize,
        opts: &DflashOptions,
    ) -> Result<DflashSession> {
        Self::new_on(ex, model, draft, max_seq, opts, None)
    }

    /// [`new`](Self::new) for one rank of a cluster (`tp`): the target is the
    /// rank's shard, the draft whole on every rank.
    pub(crate) fn new_on(
        ex: &dyn Executor,
        model: &Model,
        draft: &DraftModel,
        max_seq: usize,
        opts: &DflashOptions,
        tp: Option<&RankComm<'_>>,
    ) -> Result<DflashSession> {
        let dc = draft.config();
        dc.check_target(model.config())?;
        if ex.id() != model.owner() || ex.id() != draft.owner() {
            return Err(Error::Foreign("model"));
        }
        let block = opts.block_size.unwrap_or(dc.block_size);
        if !(2..=crate::model::PREFILL_CHUNK).contains(&block) {
            return Err(Error::InvalidArgument(format!(
                "block size {block} outside 2..={}",
                crate::model::PREFILL_CHUNK
            )));
        }
        let c = model.config();
        let (h, rows) = (c.hidden_size, crate::model::PREFILL_CHUNK);
        let taps = dc.target_layer_ids.clone();
        let d = &dc.layers;
        let kv_width = 2 * d.num_kv_heads * d.head_dim;
        let cache_len = max_seq + block;
        let bufs = DraftBufs {
            cap: ex.alloc(DType::Bf16, rows * taps.len() * h)?,
            ctx: ex.alloc(DType::Bf16, rows * h)?,
            ctxn: ex.alloc(DType::Bf16, rows * h)?,
            kv: (0..d.num_layers)
                .map(|_| ex.alloc(DType::Bf16, rows * kv_width))
                .collect::<Result<_>>()?,
            caches: (0..d.num_layers)
                .map(|_| ex.alloc(DType::Bf16, kv_width * cache_len))
                .collect::<Result<_>>()?,
            cache_len,
        };
        let (workers, shared) = (ex.num_workers(), ex.shared_bytes());
        let context = |b: &mut ProgramBuilder, after: EventId, m: usize, pos: &Buffer| {
            context_tasks(b, after, m, pos, draft, &bufs, workers, shared)
        };
        let hook = Hook {
            slack: block,
            capture: (&taps, &bufs.cap),
            tail: &context,
        };
        let session = model.session_on(ex, max_seq, Some(&hook), tp)?;
        let u32s = |n| ex.alloc(DType::U32, n);
        let (vids, dids, targets) = (u32s(block)?, u32s(block)?, u32s(block)?);
        let (state_buf, stop) = (u32s(state::LEN)?, u32s(2)?);
        ex.write_u32(&dids, &vec![dc.mask_token_id; block])?;
        let mut st = vec![0u32; state::LEN];
        st[state::STOP_TOKEN] = u32::MAX;
        if let Some(inj) = &opts.injected {
            st[state::TAU_MILLI] = tau_milli(inj.tau, block)?;
        }
        ex.write_u32(&state_buf, &st)?;
        let reference = match &opts.injected {
            Some(inj) => {
                if inj.reference.is_empty() {
                    return Err(Error::InvalidArgument("empty injected reference".into()));
                }
                session.check(&inj.reference, 0)?;
                let r = u32s(inj.reference.len())?;
                ex.write_u32(&r, &inj.reference)?;
                Some(r)
            }
            None => None,
        };
        let (pos, step_ids) = session.position_and_input();
        let scratch = BlockBufs::new(ex, model, draft, block, bufs.cache_len)?;
        let head = |b: &mut ProgramBuilder| {
            let ev = draft_block(
                b, model, draft, &bufs, &scratch, &dids, &vids, pos, block, workers, shared, tp,
            )?;
            match &reference {
                Some(r) => {
                    let t = DflashInject::task(
                        &vids.all(),
                        &r.all(),
                        &pos.all(),
                        &state_buf.all(),
                        block,
                        c.vocab_size,
                    )?;
                    let done = b.event("inject");
                    b.push(t).wait(ev).signal(done);
                    Ok(done)
                }
                None => Ok(ev),
            }
        };
        let io = AcceptIo {
            ids: &vids.all(),
            targets: &targets.all(),
            pos: &pos.all(),
            state: &state_buf.all(),
            stop: &stop.all(),
            draft_ids: &dids.all(),
            step_ids: &step_ids.all(),
        };
        let accept = DflashAccept::task(&io, block, max_seq)?;
        let tail = |b: &mut ProgramBuilder, after: EventId, m: usize, pos: &Buffer| {
            let ev = context(b, after, m, pos)?;
            let done = b.event("accept");
            b.push(accept.clone()).wait(ev).signal(done);
            Ok(done)
        };
        let extras = Extras {
            capture: Some((&taps, &bufs.cap)),
            row_tokens: Some(&targets),
            head: Some(&head),
            tail: Some(&tail),
            advance: false,
        };
        let iteration = model.program(ex, &session, &vids, block, &extras, tp)?;
        Ok(DflashSession {
            session,
            block,
            vids,
            dids,
            state: state_buf,
            stop,
            iteration,
            injected: opts.injected.is_some(),
        })
    }

    /// Benchmark sessions ([`DflashOptions::injected`]): changes the mean
    /// acceptance length to inject from the next iteration on.
    pub fn set_injected_tau(&mut self, ex: &dyn Executor, tau: f64) -> Result<()> {
        if !self.injected {
            return Err(Error::InvalidArgument(
                "the session was not created with injected acceptance".into(),
            ));
        }
        let mut st = ex.read_u32(&self.state)?;
        st[state::TAU_MILLI] = tau_milli(tau, self.block)?;
        ex.write_u32(&self.state, &st)
    }

    /// Forgets every position from `len` on and makes `next` the next input
    /// (see [`Session::truncate`]); the draft's context follows.
    pub fn truncate(&mut self, ex: &dyn Executor, len: usize, next: u32) -> Result<()> {
        self.session.truncate(ex, len, next)
    }

    /// Runs one iteration with device timing of every task (the runtime must
    /// be created with tracing on); [`iteration_program`](Self::iteration_program)
    /// names the stages. Its tokens are emitted and counted like any others;
    /// call only with room for a block left in the context.
    pub fn trace_iteration(
        &mut self,
        rt: &crate::cuda::Runtime,
    ) -> Result<crate::program::trace::Trace> {
        let before = self.traced_prepare(rt)?;
        let t = self.traced_submit(rt)?;
        rt.wait(&t, rt.default_timeout())?;
        self.traced_finish(rt, before)
    }

    /// A traced iteration's set-up (room checked, one block's limit set);
    /// returns the tokens produced before it.
    pub(crate) fn traced_prepare(&self, rt: &crate::cuda::Runtime) -> Result<u32> {
        let room = self.session.max_seq() - self.session.position();
        if room < self.block {
            return Err(Error::InvalidArgument(format!(
                "a traced iteration needs {} free positions, {room} are left",
                self.block
            )));
        }
        self.sync_input(rt)?;
        let before = rt.read_u32(&self.state)?[state::PRODUCED];
        let mut st = rt.read_u32(&self.state)?;
        st[state::LIMIT] = before.saturating_add(self.block as u32);
        rt.write_u32(&self.state, &st)?;
        Ok(before)
    }

    /// Submits the traced iteration prepared by `traced_prepare`.
    pub(crate) fn traced_submit(&self, rt: &crate::cuda::Runtime) -> Result<crate::exec::Ticket> {
        rt.submit_traced(&self.iteration, &[])
    }

    /// After the traced iteration completed: its task times; the tokens it
    /// produced are counted (and drained).
    pub(crate) fn traced_finish(
        &mut self,
        rt: &crate::cuda::Runtime,
        before: u32,
    ) -> Result<crate::program::trace::Trace> {
        let trace = rt.read_trace(&self.iteration)?;
        let after = rt.read_u32(&self.state)?[state::PRODUCED];
        self.session.advanced((after - before) as usize);
        let mut sink = Vec::new();
        rt.poll_outputs(&mut sink)?;
        Ok(trace)
    }

    /// The target session (position, configuration, plain decoding).
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Unique experts per MoE layer in the target's blocks (verify blocks of
    /// the block size, prefill chunks), as [`Session::expert_use`].
    pub fn expert_use(&self, ex: &dyn Executor) -> Result<Vec<ExpertUse>> {
        self.session.expert_use(ex)
    }

    /// Positions used so far.
    pub fn position(&self) -> usize {
        self.session.position()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block
    }

    /// The iteration program (its event names label the stages).
    pub fn iteration_program(&self) -> &crate::program::Program {
        self.iteration.program()
    }

    /// Feeds a prompt (target and draft context) and returns the next token.
    pub fn prefill(&mut self, ex: &dyn Executor, prompt: &[u32]) -> Result<u32> {
        self.session.prefill(ex, prompt)
    }

    /// Generates up to `n` greedy tokens in one command, stopping early after
    /// `stop_token` (emitted); identical to plain greedy decoding.
    pub fn generate(
        &mut self,
        ex: &dyn Executor,
        n: usize,
        stop_token: Option<u32>,
    ) -> Result<Vec<u32>> {
        self.generate_streaming(ex, n, stop_token, |_| {})
    }

    /// [`generate`](Self::generate), calling `on_token` for each token as the
    /// device emits it.
    pub fn generate_streaming(
        &mut self,
        ex: &dyn Executor,
        n: usize,
        stop_token: Option<u32>,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        self.prepare(ex, n, stop_token)?;
        let mut out = Vec::new();
        ex.poll_outputs(&mut out)?;
        out.clear();
        let t = self.submit(ex, n)?;
        let deadline = std::time::Instant::now() + ex.default_timeout();
        let mut seen = 0;
        let mut expected = None;
        loop {
            if expected.is_none() && ex.is_done(&t)? {
                expected = Some(self.produced(ex)?);
            }
            ex.poll_outputs(&mut out)?;
            for &tok in &out[seen..] {
                on_token(tok as u32);
            }
            seen = out.len();
            if expected.is_some_and(|e| seen >= e) {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::HostTimeout {
                    waited: ex.default_timeout(),
                    what: format!("{n} tokens from DFlash ({seen} arrived)"),
                });
            }
            std::thread::yield_now();
        }
        self.session.advanced(seen);
        Ok(out.into_iter().map(|t| t as u32).collect())
    }

    /// Checks a request for `n` tokens and sets the device state up for it.
    pub(crate) fn prepare(&self, ex: &dyn Executor, n: usize, stop: Option<u32>) -> Result<()> {
        if self.session.position() == 0 {
            return Err(Error::InvalidArgument(
                "prefill a prompt before generating".into(),
            ));
        }
        let stop_ids: Vec<u32> = stop.into_iter().collect();
        self.session.check(&stop_ids, n)?;
        let n32 = u32::try_from(n).map_err(|_| Error::InvalidArgument("n too large".into()))?;
        self.sync_input(ex)?;
        let mut st = ex.read_u32(&self.state)?;
        st[state::LIMIT] = n32;
        st[state::PRODUCED] = 0;
        st[state::STOP_TOKEN] = stop.unwrap_or(u32::MAX);
        st[state::REASON] = 0;
        ex.write_u32(&self.state, &st)
    }

    /// The one command producing up to `n` tokens (at most `n` iterations:
    /// each emits at least one token), after [`prepare`](Self::prepare).
    pub(crate) fn submit(&self, ex: &dyn Executor, n: usize) -> Result<crate::exec::Ticket> {
        ex.submit_until(&self.iteration, n as u32, &[], &self.stop)
    }

    /// Tokens the last command produced (once it is done).
    pub(crate) fn produced(&self, ex: &dyn Executor) -> Result<usize> {
        Ok(ex.read_u32(&self.state)?[state::PRODUCED] as usize)
    }

    /// Makes the one-token step's input (the last token, also what
    /// [`truncate`](Self::truncate) sets) the first token of both blocks.
    fn sync_input(&self, ex: &dyn Executor) -> Result<()> {
        let (_, step_ids) = self.session.position_and_input();
        let last = ex.read_u32(step_ids)?[0];
        let mut ids = vec![0; self.block];
        ids[0] = last;
        ex.write_u32(&self.vids, &ids)?;
        ex.write_u32(&self.dids, &[last])
    }

    /// Acceptance statistics since the session began.
    pub fn stats(&self, ex: &dyn Executor) -> Result<DflashStats> {
        let st = ex.read_u32(&self.state)?;
        let mut histogram = [0u64; 17];
        for (k, h) in histogram.iter_mut().enumerate().skip(1) {
            *h = u64::from(st[state::HIST + k]);
        }
        Ok(DflashStats {
            iterations: u64::from(st[state::ITERS]),
            histogram,
        })
    }
}

/// Context projection for `m` rows at `pos`: the captured hidden states →
/// `fc` → `hidden_norm` → each draft layer's keys and values (normed,
/// rotated) into its context cache. Returns the event of the last stage.
#[allow(clippy::too_many_arguments)]
fn context_tasks(
    b: &mut ProgramBuilder,
    after: EventId,
    m: usize,
    pos: &Buffer,
    draft: &DraftModel,
    bufs: &DraftBufs,
    workers: usize,
    shared: usize,
) -> Result<EventId> {
    let dc = draft.config();
    let d = &dc.layers;
    let h = d.hidden_size;
    let eps = d.rms_norm_eps as f32;
    let taps = dc.target_layer_ids.len();
    let mut s = Stages { b, prev: after };
    let ctx = bufs.ctx.slice(0..m * h)?;
    let fc = ops::gemv(
        s.b,
        &draft.fc.all(),
        &bufs.cap.slice(0..m * taps * h)?,
        &ctx,
        GemvShape {
            rows: h,
            cols: taps * h,
            m,
        },
        workers,
        false,
    )?
    .staged(s.b);
    s.stage(fc, "draft context fc");
    let (src, pro) = if m <= MAX_FUSED_NORM_ROWS && prologue_fits(m, h, shared) {
        (ctx, Prologue::RmsNorm(draft.hidden_norm.all(), eps))
    } else {
        let out = bufs.ctxn.slice(0..m * h)?;
        let n = ops::rmsnorm(
            s.b,
            &ctx,
            &draft.hidden_norm.all(),
            &out,
            m,
            h,
            eps,
            workers,
        )?;
        s.stage(n, "draft context norm");
        (out, Prologue::None)
    };
    // Only keys and values: the rows of `k_proj` and `v_proj`.
    let q_rows = d.num_heads * d.head_dim;
    let kv_rows = 2 * d.num_kv_heads * d.head_dim;
    let per = (workers / d.num_layers).max(1);
    let mut g = ops::Group(Vec::new());
    for (ly, kv) in draft.layers.iter().zip(&bufs.kv) {
        let w = ly.attn.qkv.slice(q_rows * h..(q_rows + kv_rows) * h)?;
        let shape = GemvShape {
            rows: kv_rows,
            cols: h,
            m,
        };
        g.0.extend(
            ops::gemv_with(
                s.b,
                &w,
                &src,
                &kv.slice(0..m * kv_rows)?,
                shape,
                per,
                false,
                &pro,
            )?
            .0,
        );
    }
    s.stage(g, "draft context kv");
    let kv_only = HeadShape {
        heads: 0,
        kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
    };
    let mut g = ops::Group(Vec::new());
    for ((ly, kv), cache) in draft.layers.iter().zip(&bufs.kv).zip(&bufs.caches) {
        let r = ops::rope_kv(
            s.b,
            &kv.all(),
            &ly.attn.qk_norms.all(),
            &cache.all(),
            &pos.all(),
            kv_only,
            m,
            bufs.cache_len,
            eps,
            d.rope_theta as f32,
            per,
        )?;
        g.0.extend(r.0);
    }
    s.stage(g, "draft context rope");
    Ok(s.prev)
}

/// Activations of the draft block.
struct BlockBufs {
    x: Buffer,
    xn: Buffer,
    qkv: Buffer,
    attn: Buffer,
    g: Buffer,
    u: Buffer,
    partial: Buffer,
    logits: Buffer,
    pairs: Buffer,
    /// Every rank's proposal pairs (used on cluster ranks).
    gathered: Buffer,
    chunks: usize,
}

impl BlockBufs {
    fn new(
        ex: &dyn Executor,
        model: &Model,
        draft: &DraftModel,
        block: usize,
        cache_len: usize,
    ) -> Result<Self> {
        let d = &draft.config().layers;
        let shape = head_shape(d);
        let workers = ex.num_workers();
        let chunks = crate::task::attention::slices_per_head(workers, d.num_kv_heads, cache_len);
        let shard = model.shard();
        let (v0, v1) = shard.range(model.config().vocab_size);
        let vl = v1 - v0;
        let bf = |n| ex.alloc(DType::Bf16, n);
        Ok(BlockBufs {
            x: bf(block * d.hidden_size)?,
            xn: bf(block * d.hidden_size)?,
            qkv: bf(block * shape.qkv_width())?,
            attn: bf(block * d.num_heads * d.head_dim)?,
            g: bf(block * d.intermediate_size)?,
            u: bf(block * d.intermediate_size)?,
            partial: ex.alloc(DType::F32, block * d.num_heads * chunks * (d.head_dim + 2))?,
            logits: ex.alloc(DType::F32, (block - 1) * vl)?,
            pairs: ex.alloc(DType::U32, 2 * workers.max(block))?,
            gathered: ex.alloc(DType::U32, 2 * shard.ranks * (block - 1))?,
            chunks,
        })
    }
}

fn head_shape(d: &crate::model::ModelConfig) -> HeadShape {
    HeadShape {
        heads: d.num_heads,
        kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
    }
}

/// The draft's forward over the block `dids` at `pos`; its `block − 1`
/// greedy proposals land in `vids[1..]`. Returns the final event.
#[allow(clippy::too_many_arguments)]
fn draft_block(
    b: &mut ProgramBuilder,
    model: &Model,
    draft: &DraftModel,
    bufs: &DraftBufs,
    a: &BlockBufs,
    dids: &Buffer,
    vids: &Buffer,
    pos: &Buffer,
    block: usize,
    workers: usize,
    shared: usize,
    tp: Option<&RankComm<'_>>,
) -> Result<EventId> {
    let d = &draft.config().layers;
    let (h, m) = (d.hidden_size, block);
    let eps = d.rms_norm_eps as f32;
    let shape = head_shape(d);
    let width = shape.qkv_width();
    let (embed, lm_head) = model.embed_and_head();
    let ev = b.event("draft embed");
    ops::embed(b, &a.x.all(), &embed.all(), &dids.all(), h)?.signal(b, ev);
    let mut s = Stages { b, prev: ev };
    let fuse = |rows: usize, cols: usize| prologue_fits(rows, cols, shared);
    // `x` rows normalised by `w`: inside the product, or as a stage.
    let normed = |s: &mut Stages<'_>, x: &BufSlice, w: &Buffer, rows: usize, name: &str| {
        if rows <= MAX_FUSED_NORM_ROWS && fuse(rows, h) {
            return Ok::<_, Error>((x.clone(), Prologue::RmsNorm(w.all(), eps)));
        }
        let out = a.xn.slice(0..rows * h)?;
        let n = ops::rmsnorm(s.b, x, &w.all(), &out, rows, h, eps, workers)?;
        s.stage(n, name);
        Ok((out, Prologue::None))
    };
    // Products split over `parts` tasks, their weight slices staged.
    let gemv = |s: &mut Stages<'_>,
                w: &Buffer,
                x: &BufSlice,
                y: &BufSlice,
                rows,
                cols,
                acc,
                pro: &Prologue,
                parts: usize| {
        ops::gemv_with(
            s.b,
            &w.all(),
            x,
            y,
            GemvShape { rows, cols, m },
            parts,
            acc,
            pro,
        )
        .map(|g| g.staged(s.b))
    };
    for (l, (ly, cache)) in draft.layers.iter().zip(&bufs.caches).enumerate() {
        let (src, pro) = normed(&mut s, &a.x.all(), &ly.attn.in_norm, m, "draft input norm")?;
        let q = gemv(
            &mut s,
            &ly.attn.qkv,
            &src,
            &a.qkv.all(),
            width,
            h,
            false,
            &pro,
            workers,
        )?;
        s.stage(q, &format!("draft layer {l} qkv"));
        // The attention slices normalise and rotate q and k themselves where
        // the GPU's tiled path takes them; elsewhere a rope stage runs first.
        let fused = takes_rope_table(shape, DType::Bf16, cache.dtype(), ly.rope.len(), shared);
        if !fused {
            let r = ops::rope_kv(
                s.b,
                &a.qkv.all(),
                &ly.attn.qk_norms.all(),
                &cache.all(),
                &pos.all(),
                shape,
                m,
                bufs.cache_len,
                eps,
                d.rope_theta as f32,
                workers,
            )?;
            s.stage(r, &format!("draft layer {l} rope"));
        }
        let table = fused.then(|| ly.rope.all());
        let (slices, combine) = ops::attention(
            s.b,
            &a.qkv.all(),
            &cache.all(),
            &pos.all(),
            &a.partial.all(),
            &a.attn.all(),
            shape,
            m,
            bufs.cache_len,
            a.chunks,
            ops::combine_parts(shape.heads, m, workers),
            true,
            table.as_ref(),
        )?;
        slices.wait(s.b, s.prev);
        let ev = s.b.event("draft attention");
        combine.signal(s.b, ev);
        s.prev = ev;
        let o = gemv(
            &mut s,
            &ly.attn.o,
            &a.attn.all(),
            &a.x.all(),
            h,
            shape.heads * shape.head_dim,
            true,
            &Prologue::None,
            workers,
        )?;
        s.stage(o, &format!("draft layer {l} o_proj"));
        let (src, pro) = normed(&mut s, &a.x.all(), &ly.attn.post_norm, m, "draft post norm")?;
        let inter = d.intermediate_size;
        // Gate and up over half the workers each: one task of the pair per SM.
        let half = ops::pair_parts(workers);
        let (g, u) = (a.g.all(), a.u.all());
        let mut gu = gemv(&mut s, &ly.gate, &src, &g, inter, h, false, &pro, half)?;
        gu.0.extend(gemv(&mut s, &ly.up, &src, &u, inter, h, false, &pro, half)?.0);
        s.stage(gu, &format!("draft layer {l} gate+up"));
        let pro = if fuse(m, inter) {
            Prologue::Swiglu(u)
        } else {
            let sw = ops::swiglu(s.b, &g, &g, &u, workers)?;
            s.stage(sw, &format!("draft layer {l} swiglu"));
            Prologue::None
        };
        let dn = gemv(
            &mut s,
            &ly.down,
            &a.g.all(),
            &a.x.all(),
            h,
            inter,
            true,
            &pro,
            workers,
        )?;
        s.stage(dn, &format!("draft layer {l} down"));
    }
    // Rows 1.. through the draft's norm and the target's LM head.
    let rows = m - 1;
    let tail = a.x.slice(h..m * h)?;
    let (src, pro) = normed(&mut s, &tail, &draft.norm, rows, "draft final norm")?;
    // The target's LM head: all of it, or this rank's vocabulary slice
    // whose best (value, index) pair per row is gathered from every rank.
    let shard = model.shard();
    let (v0, v1) = shard.range(model.config().vocab_size);
    let vl = v1 - v0;
    let lm = ops::gemv_with(
        s.b,
        &lm_head.all(),
        &src,
        &a.logits.all(),
        GemvShape {
            rows: vl,
            cols: h,
            m: rows,
        },
        workers,
        false,
        &pro,
    )?;
    s.stage(lm, "draft lm head");
    let parts = ops::row_argmax_parts(rows, workers);
    let lm_done = s.prev;
    let picked = s.b.event("draft proposals");
    let site = tp.map(|tp| tp.site(DType::U32, 2 * rows)).transpose()?;
    for r in 0..rows {
        let (out, out_index) = match &site {
            Some((_, data)) => (data.slice(2 * r..2 * r + 2)?, false),
            None => (vids.slice(r + 1..r + 2)?, true),
        };
        let (partials, pick) = ops::argmax_with(
            s.b,
            &a.logits.slice(r * vl..(r + 1) * vl)?,
            v0,
            &out,
            out_index,
            &a.pairs.slice(2 * parts * r..2 * parts * (r + 1))?,
            parts,
        )?;
        partials.wait(s.b, lm_done);
        s.b.task(pick).signal(picked);
    }
    let (Some(tp), Some((table, data))) = (tp, site) else {
        return Ok(picked);
    };
    let n = shard.ranks;
    let gathered = &a.gathered;
    let g = tp.gather(s.b, &table, &data, &gathered.all(), 2)?;
    let got = s.b.event("draft proposal pairs gather");
    g.wait(s.b, picked).signal(s.b, got);
    let done = s.b.event("draft proposals of all ranks");
    for r in 0..rows {
        let pairs = gathered.slice(2 * n * r..2 * n * (r + 1))?;
        let t = Argmax::over_pairs(&pairs, &vids.slice(r + 1..r + 2)?, true)?;
        s.b.push(t).wait(got).signal(done);
    }
    Ok(done)
}
