//! Multi-task building blocks: one operation spread over many workers.

use super::{EventId, ProgramBuilder, TaskId};
use crate::buffer::BufSlice;
use crate::error::Result;
use crate::task::{
    argmax::Argmax,
    attention::Attention,
    attention_combine::AttentionCombine,
    axpy::Axpy,
    embed::Embed,
    fill::Fill,
    gemv_bf16::{takes_tensor_cores, GemvBf16, GemvShape, Prologue, READ_IN_PLACE_ROWS},
    reduce_sum::ReduceSum,
    rmsnorm::RmsNorm,
    rope_kv::{HeadShape, RopeKv},
    split_even,
    swiglu::Swiglu,
    TaskSpec,
};

/// Tasks that together perform one operation.
#[derive(Clone, Debug)]
pub struct Group(pub Vec<TaskId>);

impl Group {
    /// Makes every task wait on `ev`.
    pub fn wait(&self, b: &mut ProgramBuilder, ev: EventId) -> &Self {
        for &t in &self.0 {
            b.task(t).wait(ev);
        }
        self
    }
    /// Makes every task signal `ev`.
    pub fn signal(&self, b: &mut ProgramBuilder, ev: EventId) -> &Self {
        for &t in &self.0 {
            b.task(t).signal(ev);
        }
        self
    }
    /// Marks every task's declared range (its slice of a weight matrix)
    /// constant while the program runs, so the device may stage it into shared
    /// memory before the task's waits ([`TaskSpec::stage`]).
    pub fn staged(self, b: &mut ProgramBuilder) -> Self {
        for &t in &self.0 {
            b.task(t).stage();
        }
        self
    }
    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether the group is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Most bytes of input rows a GEMV block copies into shared memory (the rest
/// of it stages the matrix slice).
const COPIED_ROWS_BYTES: usize = 200 * 1024;

/// `y (+)= x · Wᵀ`, rows split evenly over `parts` tasks (on tensor cores at
/// most one task per 16-row tile).
pub fn gemv(
    b: &mut ProgramBuilder,
    w: &BufSlice,
    x: &BufSlice,
    y: &BufSlice,
    shape: GemvShape,
    parts: usize,
    accumulate: bool,
) -> Result<Group> {
    gemv_with(b, w, x, y, shape, parts, accumulate, &Prologue::None)
}

/// [`gemv`] with the input rows prepared by `prologue` in every task.
#[allow(clippy::too_many_arguments)]
pub fn gemv_with(
    b: &mut ProgramBuilder,
    w: &BufSlice,
    x: &BufSlice,
    y: &BufSlice,
    shape: GemvShape,
    parts: usize,
    accumulate: bool,
    prologue: &Prologue,
) -> Result<Group> {
    // Tensor-core tasks compute whole 16-row tiles: no more tasks than tiles
    // (132 tasks of 15 or 16 rows ran slower than 128 of 16; the round-robin
    // layout then puts the next stage's first tasks on the four SMs left
    // without one).
    let mma = takes_tensor_cores(shape.cols, x, prologue);
    let parts = if mma {
        parts.min(shape.rows.div_ceil(16)).max(1)
    } else {
        parts
    };
    // Input rows read as they are are copied into each task's shared memory
    // when they fit; a block whose rows do not fit runs in groups of rows that
    // do (each group streams the matrix once, as the device's passes of at
    // most 8 rows would anyway), instead of every warp rereading them from L2.
    // Tensor-core tasks of few matrix rows read their input rows in place
    // whatever their size (READ_IN_PLACE_ROWS): one stream of the matrix
    // serves every row.
    let row_bytes = shape.cols * x.dtype().size();
    let in_place = mma && shape.rows.div_ceil(parts.max(1)) <= READ_IN_PLACE_ROWS;
    if shape.m > 1
        && !in_place
        && matches!(prologue, Prologue::None)
        && shape.m * row_bytes > COPIED_ROWS_BYTES
        && row_bytes <= COPIED_ROWS_BYTES
    {
        let per = (COPIED_ROWS_BYTES / row_bytes).min(8);
        let mut ids = Vec::new();
        for i0 in (0..shape.m).step_by(per) {
            let g = per.min(shape.m - i0);
            let xs = x.sub(i0 * shape.cols, g * shape.cols)?;
            let ys = y.sub(i0 * shape.rows, g * shape.rows)?;
            let part = GemvShape { m: g, ..shape };
            ids.extend(gemv_with(b, w, &xs, &ys, part, parts, accumulate, prologue)?.0);
        }
        return Ok(Group(ids));
    }
    let specs = split_even(shape.rows, parts)
        .into_iter()
        .map(|(r0, n)| GemvBf16::rows_with(w, x, y, shape, r0, n, accumulate, prologue))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Group(b.push_all(specs)))
}

/// Embedding lookup of `ids.len()` rows of `cols` columns into `dst`, one
/// task per row: the rows' reads run side by side on as many SMs instead of
/// one after another in one task.
pub fn embed(
    b: &mut ProgramBuilder,
    dst: &BufSlice,
    table: &BufSlice,
    ids: &BufSlice,
    cols: usize,
) -> Result<Group> {
    let mut specs = Vec::new();
    for r in 0..ids.len() {
        specs.push(Embed::task(
            &dst.sub(r * cols, cols)?,
            table,
            &ids.sub(r, 1)?,
            cols,
        )?);
    }
    Ok(Group(b.push_all(specs)))
}

/// `dst[..] = value`, split over `parts` tasks.
pub fn fill(b: &mut ProgramBuilder, dst: &BufSlice, value: f32, parts: usize) -> Result<Group> {
    let mut specs = Vec::new();
    for (s, n) in split_even(dst.len(), parts) {
        specs.push(Fill::task(&dst.sub(s, n)?, value)?);
    }
    Ok(Group(b.push_all(specs)))
}

/// RMSNorm of `rows` rows of `cols`, rows split over up to `parts` tasks.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(
    b: &mut ProgramBuilder,
    x: &BufSlice,
    w: &BufSlice,
    y: &BufSlice,
    rows: usize,
    cols: usize,
    eps: f32,
    parts: usize,
) -> Result<Group> {
    let mut specs = Vec::new();
    for (r, n) in split_even(rows, parts) {
        specs.push(RmsNorm::task(
            &x.sub(r * cols, n * cols)?,
            w,
            &y.sub(r * cols, n * cols)?,
            n,
            cols,
            eps,
        )?);
    }
    Ok(Group(b.push_all(specs)))
}

/// The `rope_kv` work of `m` rows of `shape` (q and k normalised and rotated,
/// k and v appended to `cache`), its (row, head) jobs four a task, over at
/// most `parts` tasks.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv(
    b: &mut ProgramBuilder,
    qkv: &BufSlice,
    norms: &BufSlice,
    cache: &BufSlice,
    pos: &BufSlice,
    shape: HeadShape,
    m: usize,
    max_seq: usize,
    eps: f32,
    theta: f32,
    parts: usize,
) -> Result<Group> {
    let jobs = (shape.heads + 2 * shape.kv_heads) * m;
    let specs = RopeKv::split(
        qkv,
        norms,
        cache,
        pos,
        shape,
        m,
        max_seq,
        eps,
        theta,
        jobs.div_ceil(4).min(parts),
    )?;
    Ok(Group(b.push_all(specs)))
}

/// `out = silu(gate) * up`, split over `parts` tasks.
pub fn swiglu(
    b: &mut ProgramBuilder,
    out: &BufSlice,
    gate: &BufSlice,
    up: &BufSlice,
    parts: usize,
) -> Result<Group> {
    let mut specs = Vec::new();
    for (s, n) in split_even(out.len(), parts) {
        specs.push(Swiglu::task(
            &out.sub(s, n)?,
            &gate.sub(s, n)?,
            &up.sub(s, n)?,
        )?);
    }
    Ok(Group(b.push_all(specs)))
}

/// `y = alpha * x + y`, split over `parts` tasks.
pub fn axpy(
    b: &mut ProgramBuilder,
    y: &BufSlice,
    x: &BufSlice,
    alpha: f32,
    parts: usize,
) -> Result<Group> {
    let mut specs = Vec::new();
    for (s, n) in split_even(y.len(), parts) {
        specs.push(Axpy::task(&y.sub(s, n)?, &x.sub(s, n)?, alpha)?);
    }
    Ok(Group(b.push_all(specs)))
}

/// Two-level pattern: one task per part of `x` writes `width` elements of
/// `scratch`, then one task combines the written prefix of `scratch`.
#[allow(clippy::too_many_arguments)]
fn split_then_combine(
    b: &mut ProgramBuilder,
    x: &BufSlice,
    scratch: &BufSlice,
    parts: usize,
    width: usize,
    name: &str,
    part: impl Fn(&BufSlice, usize, &BufSlice) -> Result<TaskSpec>,
    combine: impl FnOnce(&BufSlice) -> Result<TaskSpec>,
) -> Result<(Group, TaskId)> {
    let ranges = split_even(x.len(), parts);
    let written = scratch.sub(0, width * ranges.len())?;
    let mut specs = Vec::new();
    for (i, &(s, n)) in ranges.iter().enumerate() {
        specs.push(part(&x.sub(s, n)?, s, &written.sub(width * i, width)?)?);
    }
    let group = Group(b.push_all(specs));
    let ev = b.event(name);
    group.signal(b, ev);
    let last = b.push(combine(&written)?).wait(ev).id();
    Ok((group, last))
}

/// `out[0] = sum(x)` across workers: `parts` tasks write partial sums into
/// `scratch` (f32, at least `parts` elements), then one task adds them up.
/// Returns the partial-sum group (wire its inputs) and the combining task
/// (wire its output).
pub fn reduce_sum(
    b: &mut ProgramBuilder,
    x: &BufSlice,
    out: &BufSlice,
    scratch: &BufSlice,
    parts: usize,
) -> Result<(Group, TaskId)> {
    let part = |x: &BufSlice, _: usize, dst: &BufSlice| Ok(ReduceSum::task(x, dst)?);
    let combine = |partials: &BufSlice| Ok(ReduceSum::task(partials, out)?);
    split_then_combine(
        b,
        x,
        scratch,
        parts,
        1,
        "reduce_sum.partials",
        part,
        combine,
    )
}

/// The index of the largest value of `x` into `out[0]` (a `u32`), across
/// workers: `parts` tasks write `(value, index)` pairs into `scratch` (`u32`, at
/// least `2 * parts` elements), then one task picks the best pair. Returns the
/// partial group (wire its inputs) and the combining task (wire its output).
pub fn argmax(
    b: &mut ProgramBuilder,
    x: &BufSlice,
    out: &BufSlice,
    scratch: &BufSlice,
    parts: usize,
) -> Result<(Group, TaskId)> {
    argmax_with(b, x, 0, out, true, scratch, parts)
}

/// [`argmax`] of values whose indices start at `base`, writing the index
/// (`out_index`) or the `(value, index)` pair (to combine with other ranks').
pub fn argmax_with(
    b: &mut ProgramBuilder,
    x: &BufSlice,
    base: usize,
    out: &BufSlice,
    out_index: bool,
    scratch: &BufSlice,
    parts: usize,
) -> Result<(Group, TaskId)> {
    let part = |x: &BufSlice, at: usize, dst: &BufSlice| {
        Ok(Argmax::over_values(x, base + at, dst, false)?)
    };
    let combine = |pairs: &BufSlice| Ok(Argmax::over_pairs(pairs, out, out_index)?);
    split_then_combine(b, x, scratch, parts, 2, "argmax.partials", part, combine)
}

/// Tasks of each product of a pair run as one stage (gate and up): half the
/// workers each, so that an SM runs one task of the pair, not two in turn.
pub fn pair_parts(workers: usize) -> usize {
    (workers / 2).max(1)
}

/// Partial tasks per row when `rows` rows each find their greedy token with
/// [`argmax_with`] side by side on `workers`: as many as leave room for
/// every row's combining task too, so that no row's partials queue behind
/// another row's on the same SM.
pub fn row_argmax_parts(rows: usize, workers: usize) -> usize {
    (workers.saturating_sub(rows) / rows.max(1)).max(1)
}

/// Merge tasks per row for `m` rows of `heads` query heads on `workers`: as
/// many as let all rows' tasks run side by side, with at most four heads each
/// (up to four, a task merges each head with the whole block, as a lone row's
/// task does, so a row's result does not depend on its block).
pub fn combine_parts(heads: usize, m: usize, workers: usize) -> usize {
    (workers / m.max(1)).clamp(heads.div_ceil(4), heads.max(1))
}

/// Split-sequence attention for `m` rows: `chunks` slices per KV head (tasks
/// signal an internal event), then `combine_parts` tasks per row merge heads
/// into `out`.
/// Returns the slice group (wire its inputs) and the combine group (wire its output).
/// `bidirectional`: every row attends the whole block (see [`Attention::bidirectional`]).
/// `rope`: the slices normalise and rotate q and k themselves with this table
/// (see [`Attention::with_rope`]); no `rope_kv` stage need run before them.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    b: &mut ProgramBuilder,
    qkv: &BufSlice,
    cache: &BufSlice,
    pos: &BufSlice,
    partial: &BufSlice,
    out: &BufSlice,
    shape: HeadShape,
    m: usize,
    max_seq: usize,
    chunks: usize,
    combine_parts: usize,
    bidirectional: bool,
    rope: Option<&BufSlice>,
) -> Result<(Group, Group)> {
    let mut specs = Vec::new();
    for kv in 0..shape.kv_heads {
        for c in 0..chunks {
            let mut t =
                Attention::task(qkv, cache, pos, partial, shape, m, max_seq, kv, c, chunks)?;
            if bidirectional {
                t = Attention::bidirectional(t);
            }
            if let Some(table) = rope {
                t = Attention::with_rope(t, table)?;
            }
            specs.push(t);
        }
    }
    let slices = Group(b.push_all(specs));
    // Each row of a block merges in tasks of its own (the same tasks a row
    // alone gets), so a block's rows merge side by side on more SMs.
    let mut specs = Vec::new();
    let mut groups = Vec::new();
    let (per_partial, per_out) = (
        shape.heads * chunks * (shape.head_dim + 2),
        shape.heads * shape.head_dim,
    );
    let group = (shape.heads / shape.kv_heads.max(1)).max(1);
    for i in 0..m {
        let p = partial.sub(i * per_partial, per_partial)?;
        let o = out.sub(i * per_out, per_out)?;
        for (h0, n) in split_even(shape.heads, combine_parts) {
            specs.push(AttentionCombine::task(&p, &o, shape, 1, chunks, h0, n)?);
            groups.push(h0 / group..(h0 + n - 1) / group + 1);
        }
    }
    let combine = Group(b.push_all(specs));
    // A merge task waits for the slices of the KV heads its query heads
    // read (one event per KV head), not for every slice, where each task's
    // heads lie under at most TASK_WAITS KV heads; else for all of them.
    let per_kv = groups.iter().all(|g| g.len() <= crate::abi::TASK_WAITS);
    if per_kv {
        let evs: Vec<EventId> = (0..shape.kv_heads)
            .map(|k| b.event(&format!("attention.slices ({k})")))
            .collect();
        for (kv, ids) in slices.0.chunks(chunks).enumerate() {
            Group(ids.to_vec()).signal(b, evs[kv]);
        }
        for (&t, g) in combine.0.iter().zip(&groups) {
            for kv in g.clone() {
                b.task(t).wait(evs[kv]);
            }
        }
    } else {
        let ev = b.event("attention.slices");
        slices.signal(b, ev);
        combine.wait(b, ev);
    }
    Ok((slices, combine))
}

#[cfg(test)]
mod tests {
    use super::{combine_parts, row_argmax_parts};

    #[test]
    fn row_argmax_tasks_fit_the_workers_side_by_side() {
        for workers in [1, 7, 16, 132] {
            for rows in 1..=16 {
                let parts = row_argmax_parts(rows, workers);
                assert!(parts >= 1);
                if rows * 2 <= workers {
                    // Every row's partials and its combining task.
                    assert!(rows * (parts + 1) <= workers, "{rows} rows on {workers}");
                    assert!(rows * (parts + 2) > workers, "{rows} rows on {workers}");
                }
            }
        }
        assert_eq!(row_argmax_parts(8, 132), 15);
        assert_eq!(row_argmax_parts(7, 132), 17);
    }

    #[test]
    fn merge_tasks_fill_the_workers_with_at_most_four_heads_each() {
        assert_eq!(combine_parts(32, 1, 132), 32);
        assert_eq!(combine_parts(32, 8, 132), 16);
        assert_eq!(combine_parts(32, 16, 132), 8);
        for heads in [1, 2, 8, 16, 32, 64] {
            for m in 1..=16 {
                for workers in [1, 8, 132] {
                    let p = combine_parts(heads, m, workers);
                    assert!((1..=heads).contains(&p) && heads.div_ceil(p) <= 4);
                }
            }
        }
    }
}
