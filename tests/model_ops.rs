//! Model building-block task kinds on every executor against f64 references.

mod common;

use common::{bf16_round, on_every_executor, rel_l2, seed, Rng};
use megakernel::prelude::*;
use megakernel::program::ops;
use megakernel::task::{embed::Embed, rmsnorm::RmsNorm, swiglu::Swiglu};

fn store(ex: &dyn Executor, dtype: DType, v: &[f32]) -> (Buffer, Vec<f32>) {
    let b = ex.alloc(dtype, v.len()).unwrap();
    let v = if dtype == DType::Bf16 {
        bf16_round(v)
    } else {
        v.to_vec()
    };
    ex.write_f32(&b, &v).unwrap();
    (b, v)
}

fn run1(ex: &dyn Executor, spec: task::TaskSpec) -> Result<()> {
    let mut b = ProgramBuilder::new();
    b.push(spec);
    ex.run(&ex.load(&b.build()?)?, 1, &[])
}

#[test]
fn rmsnorm_rows_and_heads() {
    let mut rng = Rng(seed());
    on_every_executor("rmsnorm_rows_and_heads", |ex| {
        for (rows, cols, xd, yd, in_place) in [
            (1, 2048, DType::Bf16, DType::F32, false),
            (16, 128, DType::F32, DType::F32, true),
            (5, 1000, DType::F32, DType::Bf16, false),
            (3, 96, DType::Bf16, DType::Bf16, true),
        ] {
            let xv: Vec<f32> = rng.vec(rows * cols).iter().map(|v| v * 3.0).collect();
            let (x, xv) = store(ex, xd, &xv);
            let (w, wv) = store(
                ex,
                DType::Bf16,
                &rng.vec(cols)
                    .iter()
                    .map(|v| 1.0 + v * 0.5)
                    .collect::<Vec<_>>(),
            );
            let y = if in_place {
                x.clone()
            } else {
                store(ex, yd, &vec![f32::NAN; rows * cols]).0
            };
            let yd = if in_place { xd } else { yd };
            run1(
                ex,
                RmsNorm::task(&x.all(), &w.all(), &y.all(), rows, cols, 1e-6).unwrap(),
            )
            .unwrap();
            let mut want = vec![0f64; rows * cols];
            for r in 0..rows {
                let row = &xv[r * cols..(r + 1) * cols];
                let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / cols as f64;
                let inv = 1.0 / (ms + 1e-6).sqrt();
                for c in 0..cols {
                    want[r * cols + c] = f64::from(row[c]) * inv * f64::from(wv[c]);
                }
            }
            let err = rel_l2(&ex.read_f32(&y).unwrap(), &want);
            let tol = if yd == DType::F32 { 1e-5 } else { 8e-3 };
            assert!(err < tol, "{} {rows}x{cols}: {err}", ex.describe());
        }
    });
}

#[test]
fn swiglu_matches_reference() {
    let mut rng = Rng(seed());
    on_every_executor("swiglu_matches_reference", |ex| {
        let n = 3000 + rng.below(3000);
        let (g, gv) = store(
            ex,
            DType::Bf16,
            &rng.vec(n).iter().map(|v| v * 6.0).collect::<Vec<_>>(),
        );
        let (u, uv) = store(ex, DType::F32, &rng.vec(n));
        let (o, _) = store(ex, DType::F32, &vec![f32::NAN; n]);
        run1(ex, Swiglu::task(&o.all(), &g.all(), &u.all()).unwrap()).unwrap();
        let want: Vec<f64> = gv
            .iter()
            .zip(&uv)
            .map(|(&g, &u)| f64::from(g) / (1.0 + (-f64::from(g)).exp()) * f64::from(u))
            .collect();
        assert!(rel_l2(&ex.read_f32(&o).unwrap(), &want) < 1e-5);
    });
}

#[test]
fn embedding_lookup_and_bad_ids() {
    let mut rng = Rng(seed());
    on_every_executor("embedding_lookup_and_bad_ids", |ex| {
        let (rows, cols, m) = (300, 96, 7);
        let (table, tv) = store(ex, DType::Bf16, &rng.vec(rows * cols));
        let ids: Vec<u32> = (0..m)
            .map(|i| if i == 3 { 5 } else { rng.below(rows) as u32 })
            .collect();
        let idb = ex.alloc(DType::U32, m).unwrap();
        ex.write_u32(&idb, &ids).unwrap();
        let (dst, _) = store(ex, DType::F32, &vec![f32::NAN; m * cols]);
        run1(
            ex,
            Embed::task(&dst.all(), &table.all(), &idb.all(), cols).unwrap(),
        )
        .unwrap();
        let got = ex.read_f32(&dst).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(
                got[i * cols..(i + 1) * cols],
                tv[id as usize * cols..(id as usize + 1) * cols]
            );
        }
        // The same rows through `ops::embed`: one task per row.
        ex.write_f32(&dst, &vec![f32::NAN; m * cols]).unwrap();
        let mut b = ProgramBuilder::new();
        let g = ops::embed(&mut b, &dst.all(), &table.all(), &idb.all(), cols).unwrap();
        assert_eq!(g.len(), m);
        ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
            .unwrap();
        assert_eq!(ex.read_f32(&dst).unwrap(), got);
        ex.write_u32(&idb, &[1, 2, rows as u32, 0, 0, 0, 0])
            .unwrap();
        match run1(
            ex,
            Embed::task(&dst.all(), &table.all(), &idb.all(), cols).unwrap(),
        ) {
            Err(Error::DeviceFault {
                what,
                value,
                bound,
                task_kind,
                ..
            }) => {
                assert_eq!(
                    (what, value, bound, task_kind),
                    ("index out of range", rows as u64, rows as u64, "embed")
                );
            }
            r => panic!("expected a fault, got {r:?}"),
        }
    });
}

#[test]
fn argmax_across_workers_prefers_the_lowest_index() {
    let mut rng = Rng(seed());
    on_every_executor("argmax_across_workers_prefers_the_lowest_index", |ex| {
        for dtype in [DType::F32, DType::Bf16] {
            let n = 50_000 + rng.below(100_000);
            let mut v = rng.vec(n);
            let (i, j) = (rng.below(n / 2), n / 2 + rng.below(n / 2));
            v[i] = 7.5;
            v[j] = 7.5;
            v[rng.below(n)] = f32::NAN;
            let (x, _) = store(ex, dtype, &v);
            let out = ex.alloc(DType::U32, 1).unwrap();
            let scratch = ex.alloc(DType::U32, 2 * ex.num_workers()).unwrap();
            let mut b = ProgramBuilder::new();
            ops::argmax(
                &mut b,
                &x.all(),
                &out.all(),
                &scratch.all(),
                ex.num_workers(),
            )
            .unwrap();
            ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
                .unwrap();
            assert_eq!(
                ex.read_u32(&out).unwrap()[0],
                i as u32,
                "{} {dtype}",
                ex.describe()
            );
        }
    });
}

#[test]
fn rope_kv_rotates_and_appends() {
    use megakernel::task::rope_kv::{norm_rope, HeadShape, RopeKv};
    let mut rng = Rng(seed());
    on_every_executor("rope_kv_rotates_and_appends", |ex| {
        for (shape, m, qd) in [
            (
                HeadShape {
                    heads: 8,
                    kv_heads: 2,
                    head_dim: 128,
                },
                1,
                DType::Bf16,
            ),
            (
                HeadShape {
                    heads: 4,
                    kv_heads: 2,
                    head_dim: 64,
                },
                3,
                DType::F32,
            ),
        ] {
            let (hd, kvh, max_seq) = (shape.head_dim, shape.kv_heads, 50);
            let width = shape.qkv_width();
            let (qkv, qv) = store(
                ex,
                qd,
                &rng.vec(m * width)
                    .iter()
                    .map(|v| v * 2.0)
                    .collect::<Vec<_>>(),
            );
            let (norms, nv) = store(
                ex,
                DType::Bf16,
                &rng.vec(2 * hd)
                    .iter()
                    .map(|v| 1.0 + v * 0.3)
                    .collect::<Vec<_>>(),
            );
            let (cache, _) = store(ex, DType::Bf16, &vec![7.0; 2 * kvh * max_seq * hd]);
            let pos = ex.alloc(DType::U32, 1).unwrap();
            let p0 = rng.below(max_seq - m) as u32;
            ex.write_u32(&pos, &[p0]).unwrap();
            let spec = RopeKv::task(
                &qkv.all(),
                &norms.all(),
                &cache.all(),
                &pos.all(),
                shape,
                m,
                max_seq,
                1e-6,
                1e6,
            );
            run1(ex, spec.unwrap()).unwrap();
            let (got_q, got_c) = (ex.read_f32(&qkv).unwrap(), ex.read_f32(&cache).unwrap());
            let (mut want_q, mut got_qs) = (Vec::new(), Vec::new());
            let mut want_c = vec![7.0f64; got_c.len()];
            for i in 0..m {
                let p = p0 + i as u32;
                for h in 0..shape.heads + 2 * kvh {
                    let x = &qv[i * width + h * hd..i * width + (h + 1) * hd];
                    let slot =
                        |which: usize, kh: usize| ((which * kvh + kh) * max_seq + p as usize) * hd;
                    if h < shape.heads {
                        want_q.extend(
                            norm_rope(x, &nv[..hd], p, 1e-6, 1e6)
                                .iter()
                                .map(|&v| f64::from(v)),
                        );
                        got_qs.extend_from_slice(
                            &got_q[i * width + h * hd..i * width + (h + 1) * hd],
                        );
                    } else if h < shape.heads + kvh {
                        let k = norm_rope(x, &nv[hd..], p, 1e-6, 1e6);
                        let s = slot(0, h - shape.heads);
                        want_c[s..s + hd]
                            .iter_mut()
                            .zip(&k)
                            .for_each(|(w, v)| *w = f64::from(*v));
                    } else {
                        let s = slot(1, h - shape.heads - kvh);
                        want_c[s..s + hd]
                            .iter_mut()
                            .zip(x)
                            .for_each(|(w, v)| *w = f64::from(*v));
                    }
                }
            }
            let tol = if qd == DType::F32 { 1e-5 } else { 8e-3 };
            assert!(
                rel_l2(&got_qs, &want_q) < tol,
                "{} q {shape:?}",
                ex.describe()
            );
            // The cache is bf16: every slot not written still holds 7.
            assert!(
                rel_l2(&got_c, &want_c) < 8e-3,
                "{} cache {shape:?}",
                ex.describe()
            );
            assert_eq!(
                got_c.iter().filter(|&&v| v == 7.0).count(),
                want_c.iter().filter(|&&v| v == 7.0).count()
            );
            // A row past the end of the cache is a fault (checked last: it stops the executor).
            ex.write_u32(&pos, &[(max_seq - m + 1) as u32]).unwrap();
            let spec = RopeKv::task(
                &qkv.all(),
                &norms.all(),
                &cache.all(),
                &pos.all(),
                shape,
                m,
                max_seq,
                1e-6,
                1e6,
            );
            if m > 1 {
                assert!(matches!(
                    run1(ex, spec.unwrap()),
                    Err(Error::DeviceFault {
                        task_kind: "rope_kv",
                        ..
                    })
                ));
                return;
            }
        }
    });
}

/// Where an attention run puts its query rows and how it splits them.
struct AttnRun<'a> {
    shape: megakernel::task::rope_kv::HeadShape,
    cache: &'a Buffer,
    max_seq: usize,
    chunks: usize,
    parts: usize,
    bidirectional: bool,
    rope: Option<&'a Buffer>,
}

impl AttnRun<'_> {
    /// Split-sequence attention of the `m` rows of `qkv` at positions
    /// `p0 ..`: the f32 outputs, `m` rows of `heads * head_dim`.
    fn run(&self, ex: &dyn Executor, qkv: &Buffer, m: usize, p0: usize) -> Vec<f32> {
        let (heads, hd) = (self.shape.heads, self.shape.head_dim);
        let pos = ex.alloc(DType::U32, 1).unwrap();
        ex.write_u32(&pos, &[p0 as u32]).unwrap();
        let partial = ex
            .alloc(DType::F32, m * heads * self.chunks * (hd + 2))
            .unwrap();
        let (out, _) = store(ex, DType::F32, &vec![f32::NAN; m * heads * hd]);
        let mut b = ProgramBuilder::new();
        ops::attention(
            &mut b,
            &qkv.all(),
            &self.cache.all(),
            &pos.all(),
            &partial.all(),
            &out.all(),
            self.shape,
            m,
            self.max_seq,
            self.chunks,
            self.parts,
            self.bidirectional,
            self.rope.map(|t| t.all()).as_ref(),
        )
        .unwrap();
        ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
            .unwrap();
        ex.read_f32(&out).unwrap()
    }
}

/// Softmax attention of one query over keys `0..n` (f64): `key(j)` and
/// `val(j)` give key and value `j`, the scores are scaled by `1/sqrt(len q)`.
fn attend<K: AsRef<[f32]>, V: AsRef<[f32]>>(
    q: &[f32],
    n: usize,
    key: impl Fn(usize) -> K,
    val: impl Fn(usize) -> V,
) -> Vec<f64> {
    let hd = q.len();
    let scores: Vec<f64> = (0..n)
        .map(|j| {
            q.iter()
                .zip(key(j).as_ref())
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
                / (hd as f64).sqrt()
        })
        .collect();
    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut out = vec![0f64; hd];
    for (j, wj) in w.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(val(j).as_ref()) {
            *o += wj * f64::from(*v);
        }
    }
    out.iter().map(|o| o / total).collect()
}

#[test]
fn attention_matches_softmax_reference() {
    use megakernel::task::rope_kv::HeadShape;
    let mut rng = Rng(seed());
    on_every_executor("attention_matches_softmax_reference", |ex| {
        for (shape, m, chunks) in [
            (
                HeadShape {
                    heads: 8,
                    kv_heads: 2,
                    head_dim: 128,
                },
                1,
                33,
            ),
            (
                HeadShape {
                    heads: 4,
                    kv_heads: 4,
                    head_dim: 64,
                },
                5,
                7,
            ),
            (
                HeadShape {
                    heads: 6,
                    kv_heads: 3,
                    head_dim: 32,
                },
                16,
                2,
            ),
        ] {
            let (hd, kvh, max_seq) = (shape.head_dim, shape.kv_heads, 400);
            let width = shape.qkv_width();
            let (qkv, qv) = store(
                ex,
                DType::F32,
                &rng.vec(m * width)
                    .iter()
                    .map(|v| v * 2.0)
                    .collect::<Vec<_>>(),
            );
            let (cache, cv) = store(ex, DType::Bf16, &rng.vec(2 * kvh * max_seq * hd));
            let p0 = rng.below(300);
            // A DFlash draft block sees itself whole.
            let run = AttnRun {
                shape,
                cache: &cache,
                max_seq,
                chunks,
                parts: 1 + rng.below(4),
                bidirectional: rng.below(2) == 1,
                rope: None,
            };
            let bidirectional = run.bidirectional;
            let got = run.run(ex, &qkv, m, p0);
            let group = shape.heads / kvh;
            let mut want = Vec::new();
            for i in 0..m {
                for h in 0..shape.heads {
                    let kv = h / group;
                    let q = &qv[i * width + h * hd..i * width + (h + 1) * hd];
                    let key =
                        |j: usize| &cv[((kv * max_seq) + j) * hd..((kv * max_seq) + j + 1) * hd];
                    let val = |j: usize| {
                        &cv[(((kvh + kv) * max_seq) + j) * hd
                            ..(((kvh + kv) * max_seq) + j + 1) * hd]
                    };
                    let last = if bidirectional { p0 + m - 1 } else { p0 + i };
                    want.extend(attend(q, last + 1, key, val));
                }
            }
            let err = rel_l2(&got, &want);
            assert!(
                err < 1e-5,
                "{} {shape:?} m {m} pos {p0} bidirectional {bidirectional}: {err}",
                ex.describe()
            );
        }
    });
}

/// Attention that normalises and rotates q and k itself (a rope table) against
/// an f64 reference built from the raw projections: the block's keys land in
/// the cache rotated, their values as they are, and every row's output
/// matches attention over the rotated q and keys.
#[test]
fn attention_with_rope_table() {
    use megakernel::task::rope_kv::{norm_rope, rope_table, HeadShape};
    let mut rng = Rng(seed());
    on_every_executor("attention_with_rope_table", |ex| {
        // p0: a random place, or (Some) one where the block straddles a
        // change of the slice length (every 16 x chunks keys), so that a
        // block key lies in two grids.
        for (heads, kvh, hd, m, chunks, bidirectional, at) in [
            (32, 4, 128, 1, 33, false, None),
            (32, 4, 128, 8, 33, false, None),
            (16, 8, 64, 16, 5, false, None),
            (8, 2, 128, 5, 7, true, None),
            (16, 2, 128, 16, 2, false, Some(16 * 2 * 4 - 8)),
            // 256 pairs: the GPU's tiled path in sub-blocks of rows, each
            // appending the block's keys it covers.
            (32, 2, 128, 16, 3, false, Some(16 * 3 * 2 - 5)),
        ] {
            let shape = HeadShape {
                heads,
                kv_heads: kvh,
                head_dim: hd,
            };
            let (max_seq, width) = (400, shape.qkv_width());
            let (eps, theta) = (1e-6f32, 1e6f32);
            let (qkv, qv) = store(
                ex,
                DType::Bf16,
                &rng.vec(m * width)
                    .iter()
                    .map(|v| v * 2.0)
                    .collect::<Vec<_>>(),
            );
            let (cache, cv) = store(ex, DType::Bf16, &rng.vec(2 * kvh * max_seq * hd));
            let norms: Vec<f32> = bf16_round(
                &rng.vec(2 * hd)
                    .iter()
                    .map(|v| 1.0 + 0.3 * v)
                    .collect::<Vec<_>>(),
            );
            let (qn, kn) = norms.split_at(hd);
            let (table, _) = store(ex, DType::F32, &rope_table(qn, kn, eps, theta));
            let p0 = at.unwrap_or_else(|| rng.below(300));
            let got = AttnRun {
                shape,
                cache: &cache,
                max_seq,
                chunks,
                parts: 1 + rng.below(4),
                bidirectional,
                rope: Some(&table),
            }
            .run(ex, &qkv, m, p0);
            let raw = |i: usize, h: usize| &qv[i * width + h * hd..i * width + (h + 1) * hd];
            let rot =
                |x: &[f32], w: &[f32], p: usize| bf16_round(&norm_rope(x, w, p as u32, eps, theta));
            // The cache after the task: old keys untouched, the block's rotated.
            let got_cache = ex.read_f32(&cache).unwrap();
            let (mut want_k, mut got_k) = (Vec::new(), Vec::new());
            for kv in 0..kvh {
                for k in 0..m {
                    let at = |which: usize| ((which * kvh + kv) * max_seq + p0 + k) * hd;
                    want_k.extend(
                        rot(raw(k, heads + kv), kn, p0 + k)
                            .iter()
                            .map(|&v| f64::from(v)),
                    );
                    got_k.extend_from_slice(&got_cache[at(0)..at(0) + hd]);
                    assert_eq!(
                        &got_cache[at(1)..at(1) + hd],
                        raw(k, heads + kvh + kv),
                        "value {k}"
                    );
                }
                let old = (kv * max_seq) * hd..(kv * max_seq + p0) * hd;
                assert_eq!(&got_cache[old.clone()], &cv[old], "{}", ex.describe());
            }
            assert!(rel_l2(&got_k, &want_k) < 1e-3, "{}", ex.describe());
            let group = heads / kvh;
            let mut want = Vec::new();
            for i in 0..m {
                for h in 0..heads {
                    let kv = h / group;
                    let q = rot(raw(i, h), qn, p0 + i);
                    let key = |j: usize| -> Vec<f32> {
                        if j < p0 {
                            cv[(kv * max_seq + j) * hd..(kv * max_seq + j + 1) * hd].to_vec()
                        } else {
                            rot(raw(j - p0, heads + kv), kn, j)
                        }
                    };
                    let val = |j: usize| -> Vec<f32> {
                        if j < p0 {
                            let at = ((kvh + kv) * max_seq + j) * hd;
                            cv[at..at + hd].to_vec()
                        } else {
                            raw(j - p0, heads + kvh + kv).to_vec()
                        }
                    };
                    let last = if bidirectional { p0 + m - 1 } else { p0 + i };
                    want.extend(attend(&q, last + 1, key, val));
                }
            }
            let err = rel_l2(&got, &want);
            assert!(
                err < 1e-3,
                "{} {shape:?} m {m} pos {p0} bidirectional {bidirectional}: {err}",
                ex.describe()
            );
        }
    });
}

/// A row of a block attends exactly as it would alone at its position (bf16
/// inputs take the GPU's tiled path): what makes a verify block reproduce
/// decode steps bit for bit.
#[test]
fn attention_rows_do_not_depend_on_their_block() {
    use megakernel::task::rope_kv::HeadShape;
    let mut rng = Rng(seed());
    on_every_executor("attention_rows_do_not_depend_on_their_block", |ex| {
        for (shape, m) in [
            (
                HeadShape {
                    heads: 16,
                    kv_heads: 8,
                    head_dim: 128,
                },
                16,
            ),
            (
                HeadShape {
                    heads: 32,
                    kv_heads: 4,
                    head_dim: 128,
                },
                7,
            ),
            (
                HeadShape {
                    heads: 4,
                    kv_heads: 2,
                    head_dim: 32,
                },
                16,
            ),
            // 256 pairs: the GPU's tiled path in sub-blocks of rows.
            (
                HeadShape {
                    heads: 16,
                    kv_heads: 1,
                    head_dim: 128,
                },
                16,
            ),
        ] {
            let (hd, kvh, max_seq, chunks) = (shape.head_dim, shape.kv_heads, 2600, 16);
            let width = shape.qkv_width();
            let (qkv, qv) = store(ex, DType::Bf16, &rng.vec(m * width));
            let (cache, _) = store(ex, DType::Bf16, &rng.vec(2 * kvh * max_seq * hd));
            // A random place; places whose rows' slices are 48 and 64 keys
            // (one tile; at 48 its last quarter of keys empty); one where the
            // block straddles a change of the slice length (every 16 ×
            // chunks keys); and places whose slices span two and three
            // tiles (every quarter of a warp's keys holding some).
            for p0 in [
                60 + rng.below(1000),
                16 * chunks * 2 + 100,
                16 * chunks * 3 + 100,
                16 * chunks * (1 + rng.below(3)) - 8,
                16 * chunks * 4 + 60,
                16 * chunks * 9 + 50,
            ] {
                let attn = AttnRun {
                    shape,
                    cache: &cache,
                    max_seq,
                    chunks,
                    parts: shape.heads,
                    bidirectional: false,
                    rope: None,
                };
                let run = |qkv: &Buffer, m: usize, p: usize| attn.run(ex, qkv, m, p);
                let block = run(&qkv, m, p0);
                let w = shape.heads * hd;
                let mut bad = Vec::new();
                for i in 0..m {
                    let (one, _) = store(ex, DType::Bf16, &qv[i * width..(i + 1) * width]);
                    let alone = run(&one, 1, p0 + i);
                    let diff: Vec<(usize, f32)> = alone
                        .iter()
                        .zip(&block[i * w..(i + 1) * w])
                        .enumerate()
                        .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
                        .map(|(k, (a, b))| (k, (a - b).abs()))
                        .collect();
                    if let Some(&(k, d)) = diff.first() {
                        bad.push(format!(
                            "row {i}: {} values, first at {k} by {d:e}",
                            diff.len()
                        ));
                    }
                }
                assert!(
                    bad.is_empty(),
                    "{}: {shape:?} m {m} at {p0}: rows differ from the row alone: {bad:?}",
                    ex.describe()
                );
            }
        }
    });
}

/// Independent routing of `m` rows of `e` logits: softmax, top-k with the
/// lower index first on ties, renormalised. The dense weights and the
/// chosen experts in ascending order.
fn reference_routing(lv: &[f32], m: usize, e: usize, k: usize) -> (Vec<f64>, Vec<u32>) {
    let mut want_w = vec![0f64; m * e];
    let mut chosen = std::collections::BTreeSet::new();
    for i in 0..m {
        let row: Vec<f64> = lv[i * e..(i + 1) * e]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = row.iter().map(|v| (v - mx).exp()).collect();
        let mut idx: Vec<usize> = (0..e).collect();
        idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
        let s: f64 = idx[..k].iter().map(|&j| p[j]).sum();
        for &j in &idx[..k] {
            want_w[i * e + j] = p[j] / s;
            chosen.insert(j as u32);
        }
    }
    (want_w, chosen.into_iter().collect())
}

/// A routing task's list (count, ids, each id's row mask) and weights
/// against [`reference_routing`].
#[allow(clippy::too_many_arguments)]
fn check_routing(
    ex: &dyn Executor,
    list: &Buffer,
    weights: &Buffer,
    want_w: &[f64],
    ids: &[u32],
    m: usize,
    e: usize,
    slots: usize,
    what: &str,
) {
    let got = ex.read_u32(list).unwrap();
    assert_eq!(got[0] as usize, ids.len(), "{what}");
    assert_eq!(&got[1..=ids.len()], ids, "{what}");
    // Each listed expert's mask holds exactly the rows that chose it.
    for (s, &id) in ids.iter().enumerate() {
        let want: u32 = (0..m)
            .filter(|&i| want_w[i * e + id as usize] != 0.0)
            .fold(0, |mask, i| mask | (1 << i));
        assert_eq!(got[1 + slots + s], want, "mask of slot {s}, {what}");
    }
    assert!(
        rel_l2(&ex.read_f32(weights).unwrap(), want_w) < 1e-5,
        "{what}"
    );
}

/// Routing alone for expert counts of every register width the device keeps
/// a row's probabilities in (up to 128, 256, 512 and 1024 experts), with a
/// tie for each row's last pick: the list, the masks and the weights against
/// an independent f64 reference.
#[test]
fn moe_routing_over_expert_counts() {
    use megakernel::task::moe_route::MoeRoute;
    let mut rng = Rng(seed());
    on_every_executor("moe_routing_over_expert_counts", |ex| {
        for (m, e, k) in [
            (1, 128, 8),
            (5, 200, 8),
            (3, 384, 8),
            (2, 1000, 16),
            (1, 200, 8),
            (1, 1000, 16),
        ] {
            let slots = (m * k).min(e);
            let mut lv: Vec<f32> = rng.vec(m * e).iter().map(|v| v * 4.0).collect();
            for i in 0..m {
                // Two equal values in different lanes and register slots,
                // tied for the k-th place (k - 1 larger values before them):
                // only the lower index may be chosen.
                let row = &mut lv[i * e..(i + 1) * e];
                let top = row.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
                for r in 0..k - 1 {
                    row[10 + r] = top + 1.0 + r as f32 * 0.25;
                }
                row[e - 3] = top;
                row[7] = top;
            }
            let (logits, _) = store(ex, DType::F32, &lv);
            let (weights, _) = store(ex, DType::F32, &vec![f32::NAN; m * e]);
            let list = ex.alloc(DType::U32, 1 + 2 * slots).unwrap();
            let (l, w) = (logits.all(), weights.all());
            run1(
                ex,
                MoeRoute::task(&l, &w, &list.all(), m, e, k, true, None).unwrap(),
            )
            .unwrap();
            let (want_w, ids) = reference_routing(&lv, m, e, k);
            for i in 0..m {
                // The tie at the cut goes to the lower index.
                assert!(want_w[i * e + 7] > 0.0 && want_w[i * e + e - 3] == 0.0);
            }
            let what = format!("{e} experts, {m} rows: {}", ex.describe());
            check_routing(ex, &list, &weights, &want_w, &ids, m, e, slots, &what);
        }
    });
}

/// A row routed alone (a decode step) gets the weights it gets inside a
/// block of rows (a chunk), bit for bit, and lists the experts it chose:
/// fresh random logits, and logits of three values (ties everywhere), for
/// expert counts of each width.
#[test]
fn a_lone_row_routes_as_in_a_block() {
    use megakernel::task::moe_route::{list_len, MoeRoute};
    let mut rng = Rng(seed());
    on_every_executor("a_lone_row_routes_as_in_a_block", |ex| {
        let m = 4;
        for (e, k, ties) in [
            (128, 8, false),
            (128, 8, true),
            (40, 4, false),
            (300, 8, true),
            (1000, 16, false),
        ] {
            let mut lv: Vec<f32> = rng.vec(m * e).iter().map(|v| v * 4.0).collect();
            if ties {
                lv.iter_mut().for_each(|v| *v = rng.below(3) as f32);
            }
            let (logits, _) = store(ex, DType::F32, &lv);
            let (weights, _) = store(ex, DType::F32, &vec![f32::NAN; m * e]);
            let list = ex.alloc(DType::U32, list_len(m, e, k)).unwrap();
            let (l, w) = (logits.all(), weights.all());
            let spec = MoeRoute::task(&l, &w, &list.all(), m, e, k, true, None).unwrap();
            run1(ex, spec).unwrap();
            let block = ex.read_f32(&weights).unwrap();
            for i in 0..m {
                let (one, _) = store(ex, DType::F32, &vec![f32::NAN; e]);
                let one_list = ex.alloc(DType::U32, list_len(1, e, k)).unwrap();
                let row = logits.all().sub(i * e, e).unwrap();
                let spec =
                    MoeRoute::task(&row, &one.all(), &one_list.all(), 1, e, k, true, None).unwrap();
                run1(ex, spec).unwrap();
                let what = format!("{e} experts, ties {ties}, row {i}: {}", ex.describe());
                let got = ex.read_f32(&one).unwrap();
                for (j, (a, b)) in got.iter().zip(&block[i * e..(i + 1) * e]).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "expert {j}, {what}");
                }
                let ids: Vec<u32> = (0..e as u32).filter(|&j| got[j as usize] != 0.0).collect();
                assert_eq!(ids.len(), k, "{what}");
                let l = ex.read_u32(&one_list).unwrap();
                assert_eq!(l[0] as usize, k, "{what}");
                assert_eq!(&l[1..=k], &ids[..], "{what}");
                assert!(l[1 + k..1 + 2 * k].iter().all(|&b| b == 1), "{what}");
            }
        }
    });
}

#[test]
fn moe_routing_experts_and_combine() {
    use megakernel::task::gemv_bf16::GemvShape;
    use megakernel::task::gemv_expert::GemvExpert;
    use megakernel::task::moe_combine::MoeCombine;
    use megakernel::task::moe_route::MoeRoute;
    let mut rng = Rng(seed());
    on_every_executor("moe_routing_experts_and_combine", |ex| {
        let (m, e, k, hdim, inter) = (3, 16, 3, 64, 32);
        let slots = (m * k).min(e);
        let mut lv: Vec<f32> = rng.vec(m * e).iter().map(|v| v * 4.0).collect();
        lv[5] = lv[9]; // a tie inside row 0
        let (logits, _) = store(ex, DType::F32, &lv);
        let (weights, _) = store(ex, DType::F32, &vec![f32::NAN; m * e]);
        let list = ex.alloc(DType::U32, 1 + 2 * slots).unwrap();
        let (w, wv) = store(
            ex,
            DType::Bf16,
            &rng.vec(e * hdim * inter)
                .iter()
                .map(|v| v * 0.2)
                .collect::<Vec<_>>(),
        );
        let (xin, xv) = store(ex, DType::Bf16, &rng.vec(m * inter));
        let (y, _) = store(ex, DType::F32, &vec![f32::NAN; slots * m * hdim]);
        let (res, rv) = store(ex, DType::F32, &rng.vec(m * hdim));
        let mut b = ProgramBuilder::new();
        let (routed, produced) = (b.event("routed"), b.event("experts"));
        b.push(
            MoeRoute::task(
                &logits.all(),
                &weights.all(),
                &list.all(),
                m,
                e,
                k,
                true,
                None,
            )
            .unwrap(),
        )
        .signal(routed);
        let shape = GemvShape {
            rows: hdim,
            cols: inter,
            m,
        };
        for slot in 0..slots {
            // The input here is shared by every slot (x_per_slot = false).
            let spec = GemvExpert::rows(
                &w.all(),
                &xin.all(),
                &y.all(),
                &list.all(),
                shape,
                e,
                slot,
                slots,
                false,
                0,
                hdim,
                &megakernel::task::gemv_bf16::Prologue::None,
            );
            b.push(spec.unwrap()).wait(routed).signal(produced);
        }
        for (h0, n) in [(0, 40), (40, 24)] {
            let spec = MoeCombine::task(
                &res.all(),
                &y.all(),
                &weights.all(),
                &list.all(),
                m,
                hdim,
                e,
                slots,
                h0,
                n,
                true,
            );
            b.push(spec.unwrap()).wait(produced);
        }
        ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
            .unwrap();

        let (want_w, ids) = reference_routing(&lv, m, e, k);
        check_routing(
            ex,
            &list,
            &weights,
            &want_w,
            &ids,
            m,
            e,
            slots,
            &ex.describe(),
        );
        let mut want = rv.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        for i in 0..m {
            for &id in &ids {
                let wt = want_w[i * e + id as usize];
                for r in 0..hdim {
                    let mat =
                        &wv[(id as usize * hdim + r) * inter..(id as usize * hdim + r + 1) * inter];
                    let dot: f64 = mat
                        .iter()
                        .zip(&xv[i * inter..(i + 1) * inter])
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    want[i * hdim + r] += wt * dot;
                }
            }
        }
        assert!(
            rel_l2(&ex.read_f32(&res).unwrap(), &want) < 1e-5,
            "{}",
            ex.describe()
        );
    });
}
