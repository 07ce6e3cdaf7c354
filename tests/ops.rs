//! Every task kind on every executor against a direct computation in f64.

mod common;

use common::{bf16_round, on_every_executor, rel_l2, seed, Rng};
use megakernel::prelude::*;
use megakernel::program::ops;
use megakernel::task::{copy::Copy, emit::Emit, gemv_bf16::GemvShape};

#[test]
fn fill_every_dtype() {
    let mut rng = Rng(seed());
    on_every_executor("fill_every_dtype", |ex| {
        for dtype in [DType::F32, DType::Bf16] {
            let n = 1000 + rng.below(5000);
            let buf = ex.alloc(dtype, n).unwrap();
            ex.write_f32(&buf, &rng.vec(n)).unwrap();
            let mut b = ProgramBuilder::new();
            let value = rng.f32();
            ops::fill(&mut b, &buf.all(), value, ex.num_workers()).unwrap();
            ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
                .unwrap();
            let want = bf16_round(&[value])[0];
            let got = ex.read_f32(&buf).unwrap();
            assert!(got.iter().all(|&v| if dtype == DType::F32 {
                v == value
            } else {
                v == want
            }));
        }
        let buf = ex.alloc(DType::U32, 777).unwrap();
        let mut b = ProgramBuilder::new();
        b.push(task::fill::Fill::u32(&buf.all(), 0xDEAD_BEEF).unwrap());
        ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
            .unwrap();
        assert!(ex.read_u32(&buf).unwrap().iter().all(|&v| v == 0xDEAD_BEEF));
    });
}

/// The device draws exactly the values the CPU reference (and a checkpoint
/// written to disk) holds, bit for bit, from any starting index.
#[test]
fn fill_random_is_bit_identical_everywhere() {
    let mut rng = Rng(seed());
    let key = rng.next_u64();
    let first = rng.below(1 << 20) as u64;
    let (std, mean) = (0.02 + rng.f32().abs(), rng.f32());
    let n = 5000 + rng.below(5000);
    let want: Vec<f32> = (0..n as u64)
        .map(|j| task::fill_random::random_value(key, first + j, std, mean))
        .collect();
    let m = want.iter().sum::<f32>() / n as f32;
    let var = want.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / n as f32;
    assert!((m - mean).abs() < 0.1 * std && (var.sqrt() / std - 1.0).abs() < 0.05);
    on_every_executor("fill_random_is_bit_identical_everywhere", |ex| {
        for dtype in [DType::F32, DType::Bf16] {
            let buf = ex.alloc(dtype, n).unwrap();
            ex.write_f32(&buf, &vec![f32::NAN; n]).unwrap();
            let mut b = ProgramBuilder::new();
            b.push(task::fill_random::FillRandom::task(&buf.all(), key, first, std, mean).unwrap());
            ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
                .unwrap();
            let got = ex.read_f32(&buf).unwrap();
            let exp = if dtype == DType::F32 {
                want.clone()
            } else {
                bf16_round(&want)
            };
            let same = got
                .iter()
                .zip(&exp)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?}: device values differ from random_value");
        }
    });
}

#[test]
fn copy_row_chosen_by_parameter() {
    let mut rng = Rng(seed());
    on_every_executor("copy_row_chosen_by_parameter", |ex| {
        let (rows, n) = (37, 300);
        let src = ex.alloc(DType::Bf16, rows * n).unwrap();
        let data = bf16_round(&rng.vec(rows * n));
        ex.write_f32(&src, &data).unwrap();
        let dst = ex.alloc(DType::F32, n).unwrap();
        let mut b = ProgramBuilder::new();
        b.push(Copy::row(&dst.all(), &src.all(), n, 0).unwrap())
            .param(2, 3);
        let p = ex.load(&b.build().unwrap()).unwrap();
        for _ in 0..4 {
            let r = rng.below(rows);
            ex.write_f32(&dst, &vec![f32::NAN; n]).unwrap();
            ex.run(&p, 1, &[0, 0, 0, r as u64]).unwrap();
            assert_eq!(ex.read_f32(&dst).unwrap(), data[r * n..(r + 1) * n]);
        }
    });
}

#[test]
fn axpy_with_parameter_alpha() {
    let mut rng = Rng(seed());
    on_every_executor("axpy_with_parameter_alpha", |ex| {
        let n = 10_000 + rng.below(10_000);
        let (x, y) = (
            ex.alloc(DType::Bf16, n).unwrap(),
            ex.alloc(DType::F32, n).unwrap(),
        );
        let (xv, yv) = (bf16_round(&rng.vec(n)), rng.vec(n));
        ex.write_f32(&x, &xv).unwrap();
        ex.write_f32(&y, &yv).unwrap();
        let mut b = ProgramBuilder::new();
        let g = ops::axpy(&mut b, &y.all(), &x.all(), 0.0, ex.num_workers()).unwrap();
        for &t in &g.0 {
            b.task(t).param(2, 0);
        }
        let alpha = rng.f32();
        ex.run(
            &ex.load(&b.build().unwrap()).unwrap(),
            1,
            &[u64::from(alpha.to_bits())],
        )
        .unwrap();
        let want: Vec<f64> = xv
            .iter()
            .zip(&yv)
            .map(|(&a, &b)| f64::from(alpha) * f64::from(a) + f64::from(b))
            .collect();
        assert!(rel_l2(&ex.read_f32(&y).unwrap(), &want) < 1e-6);
    });
}

#[test]
fn reduction_across_workers() {
    let mut rng = Rng(seed());
    on_every_executor("reduction_across_workers", |ex| {
        let n = 100_000 + rng.below(100_000);
        let x = ex.alloc(DType::F32, n).unwrap();
        let xv = rng.vec(n);
        ex.write_f32(&x, &xv).unwrap();
        let out = ex.alloc(DType::F32, 1).unwrap();
        let scratch = ex.alloc(DType::F32, ex.num_workers()).unwrap();
        ex.write_f32(&out, &[f32::NAN]).unwrap();
        let mut b = ProgramBuilder::new();
        ops::reduce_sum(
            &mut b,
            &x.all(),
            &out.all(),
            &scratch.all(),
            ex.num_workers(),
        )
        .unwrap();
        ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
            .unwrap();
        let want: f64 = xv.iter().map(|&v| f64::from(v)).sum();
        let got = f64::from(ex.read_f32(&out).unwrap()[0]);
        assert!(
            (got - want).abs() <= 1e-5 * xv.iter().map(|v| f64::from(v.abs())).sum::<f64>(),
            "{got} vs {want}"
        );
    });
}

fn gemv_case(
    ex: &dyn Executor,
    rng: &mut Rng,
    shape: GemvShape,
    x_dtype: DType,
    y_dtype: DType,
    accumulate: bool,
    staged: bool,
) {
    let GemvShape { rows, cols, m } = shape;
    let w = ex.alloc(DType::Bf16, rows * cols).unwrap();
    let x = ex.alloc(x_dtype, m * cols).unwrap();
    let y = ex.alloc(y_dtype, m * rows).unwrap();
    let wv = bf16_round(&rng.vec(rows * cols));
    let mut xv = rng.vec(m * cols);
    if x_dtype == DType::Bf16 {
        xv = bf16_round(&xv);
    }
    let mut y0 = rng.vec(m * rows);
    if y_dtype == DType::Bf16 {
        y0 = bf16_round(&y0);
    }
    ex.write_f32(&w, &wv).unwrap();
    ex.write_f32(&x, &xv).unwrap();
    ex.write_f32(&y, &y0).unwrap();
    let mut b = ProgramBuilder::new();
    // Staged slices: a few tasks, so that most slices exceed shared memory
    // and are read partly from shared memory, partly from global memory.
    let parts = if staged {
        1 + rng.below(4)
    } else {
        1 + rng.below(2 * ex.num_workers())
    };
    let g = ops::gemv(
        &mut b,
        &w.all(),
        &x.all(),
        &y.all(),
        shape,
        parts,
        accumulate,
    )
    .unwrap();
    if staged {
        g.staged(&mut b);
    }
    ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
        .unwrap();
    let mut want = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            let dot: f64 = (0..cols)
                .map(|c| f64::from(wv[r * cols + c]) * f64::from(xv[i * cols + c]))
                .sum();
            want[i * rows + r] = dot
                + if accumulate {
                    f64::from(y0[i * rows + r])
                } else {
                    0.0
                };
        }
    }
    let err = rel_l2(&ex.read_f32(&y).unwrap(), &want);
    // Tensor cores (bf16 rows, columns a multiple of 32, on a GPU) round
    // their f32 sums once per 16 products, toward zero: a few units in the
    // last place per 16 columns, still far below bf16's resolution.
    let tc = x_dtype == DType::Bf16 && cols % 32 == 0 && ex.is_gpu();
    let tol = match (y_dtype, tc) {
        (DType::F32, false) => 1e-5,
        (DType::F32, true) => 1e-4,
        _ => 8e-3,
    };
    assert!(
        err < tol,
        "{} {shape:?} x {x_dtype} y {y_dtype} acc {accumulate} staged {staged}: rel err {err}",
        ex.describe()
    );
}

/// f32 or bf16, at random.
fn float_dtype(rng: &mut Rng) -> DType {
    if rng.below(2) == 0 {
        DType::F32
    } else {
        DType::Bf16
    }
}

#[test]
fn gemv_random_shapes() {
    let mut rng = Rng(seed());
    on_every_executor("gemv_random_shapes", |ex| {
        for case in 0..12 {
            let shape = GemvShape {
                rows: 1 + rng.below(700),
                cols: 8 * (1 + rng.below(160)),
                m: if case < 4 {
                    case + 1
                } else {
                    1 + rng.below(16)
                },
            };
            let (xd, yd) = (float_dtype(&mut rng), float_dtype(&mut rng));
            let acc = rng.below(2) == 0;
            gemv_case(ex, &mut rng, shape, xd, yd, acc, false);
        }
    });
}

/// Weight slices declared constant (`Group::staged`): on Hopper each task's
/// slice is copied into shared memory before its waits, in full when it fits
/// and otherwise its first rows, the rest read from global memory. Products
/// of every size and input-row count against an f64 reference, and blocks of
/// rows too wide for shared memory (run in groups of rows, or read in place
/// by tensor-core tasks of at most 64 matrix rows).
#[test]
fn staged_gemv_matches_reference() {
    let mut rng = Rng(seed());
    on_every_executor("staged_gemv_matches_reference", |ex| {
        for case in 0..8 {
            let shape = GemvShape {
                rows: 1 + rng.below(900),
                cols: 8 * (1 + rng.below(320)),
                m: if case < 2 { 1 } else { 1 + rng.below(16) },
            };
            let xd = float_dtype(&mut rng);
            let acc = rng.below(2) == 0;
            gemv_case(ex, &mut rng, shape, xd, DType::F32, acc, true);
        }
        // Blocks whose input rows exceed shared memory: groups of rows, or
        // (64 matrix rows: every task at most 64) read in place.
        for (rows, cols, m, xd) in [
            (200, 12288, 16, DType::Bf16),
            (64, 12288, 16, DType::Bf16),
            (200, 8192, 11, DType::F32),
        ] {
            let shape = GemvShape { rows, cols, m };
            gemv_case(ex, &mut rng, shape, xd, DType::F32, true, true);
        }
    });
}

/// A block of input rows too wide for shared memory is computed in groups of
/// rows (one stream of the matrix each) unless every task is a tensor-core
/// task of at most 64 matrix rows, which reads the rows in place: then one
/// task per part streams its slice once for every row.
#[test]
fn wide_rows_stream_the_matrix_once_where_read_in_place() {
    let ex = CpuExecutor::new(CpuOptions {
        threads: 1,
        seed: 1,
    });
    let (cols, m) = (12288, 16);
    let x = ex.alloc(DType::Bf16, m * cols).unwrap();
    for (rows, parts, tasks) in [(640, 10, 10), (640, 5, 10), (640, 11, 11)] {
        let w = ex.alloc(DType::Bf16, rows * cols).unwrap();
        let y = ex.alloc(DType::F32, m * rows).unwrap();
        let mut b = ProgramBuilder::new();
        let shape = GemvShape { rows, cols, m };
        let g = ops::gemv(&mut b, &w.all(), &x.all(), &y.all(), shape, parts, false).unwrap();
        assert_eq!(g.len(), tasks, "{rows} rows in {parts} parts");
    }
}

/// Tensor-core products (bf16 input rows, columns a multiple of 32) take at
/// most one task per 16-row tile; other products take the parts asked for.
#[test]
fn tensor_core_products_take_whole_tiles() {
    let ex = CpuExecutor::new(CpuOptions {
        threads: 1,
        seed: 1,
    });
    let cols = 256;
    for (rows, xd, parts, tasks) in [
        (2048, DType::Bf16, 132, 128),
        (1000, DType::Bf16, 132, 63),
        (5120, DType::Bf16, 132, 132),
        (1000, DType::F32, 132, 132),
    ] {
        let w = ex.alloc(DType::Bf16, rows * cols).unwrap();
        let x = ex.alloc(xd, cols).unwrap();
        let y = ex.alloc(DType::F32, rows).unwrap();
        let mut b = ProgramBuilder::new();
        let shape = GemvShape { rows, cols, m: 1 };
        let g = ops::gemv(&mut b, &w.all(), &x.all(), &y.all(), shape, parts, false).unwrap();
        assert_eq!(g.len(), tasks, "{rows} rows, {xd:?} input, {parts} parts");
    }
}

#[test]
fn emit_streams_values_in_order() {
    let mut rng = Rng(seed());
    on_every_executor("emit_streams_values_in_order", |ex| {
        let table: Vec<u32> = (0..64).map(|_| rng.next_u64() as u32).collect();
        let src = ex.alloc(DType::U32, table.len()).unwrap();
        ex.write_u32(&src, &table).unwrap();
        let (a, bb) = (
            ex.alloc(DType::U32, 1).unwrap(),
            ex.alloc(DType::U32, 3).unwrap(),
        );
        let mut b = ProgramBuilder::new();
        let e1 = b.event("picked");
        let e2 = b.event("first emitted");
        let e3 = b.event("second picked");
        b.push(Copy::row(&a.all(), &src.all(), 1, 0).unwrap())
            .param(2, 0)
            .signal(e1);
        b.push(Emit::task(&a.all()).unwrap()).wait(e1).signal(e2);
        b.push(Copy::row(&bb.all(), &src.all(), 3, 0).unwrap())
            .param(2, 1)
            .wait(e2)
            .signal(e3);
        b.push(Emit::task(&bb.all()).unwrap()).wait(e3);
        let p = ex.load(&b.build().unwrap()).unwrap();
        let mut out = Vec::new();
        ex.poll_outputs(&mut out).unwrap();
        out.clear();
        let (i, j) = (rng.below(64) as u64, rng.below(21) as u64);
        ex.run(&p, 5, &[i, j]).unwrap();
        poll_until(ex, &mut out, 20);
        let one: Vec<u64> = std::iter::once(table[i as usize])
            .chain(table[3 * j as usize..3 * j as usize + 3].iter().copied())
            .map(u64::from)
            .collect();
        assert_eq!(out, one.repeat(5));
    });
}

/// Polls the output ring until `n` values arrived (they may trail completion).
fn poll_until(ex: &dyn Executor, out: &mut Vec<u64>, n: usize) {
    let start = std::time::Instant::now();
    while out.len() < n && start.elapsed() < std::time::Duration::from_secs(10) {
        ex.poll_outputs(out).unwrap();
    }
}

#[test]
fn many_queued_commands_wrap_the_command_ring() {
    let mut rng = Rng(seed());
    on_every_executor("many_queued_commands_wrap_the_command_ring", |ex| {
        let table: Vec<u32> = (0..100).map(|_| rng.next_u64() as u32).collect();
        let src = ex.alloc(DType::U32, table.len()).unwrap();
        ex.write_u32(&src, &table).unwrap();
        let v = ex.alloc(DType::U32, 1).unwrap();
        let mut b = ProgramBuilder::new();
        let e = b.event("picked");
        b.push(Copy::row(&v.all(), &src.all(), 1, 0).unwrap())
            .param(2, 5)
            .signal(e);
        b.push(Emit::task(&v.all()).unwrap()).wait(e);
        let p = ex.load(&b.build().unwrap()).unwrap();
        let rows: Vec<usize> = (0..300).map(|_| rng.below(table.len())).collect();
        let mut last = None;
        for &r in &rows {
            // Submitted without waiting: more than the ring holds are in flight.
            last = Some(ex.submit(&p, 1, &[0, 0, 0, 0, 0, r as u64]).unwrap());
        }
        ex.wait(&last.unwrap(), std::time::Duration::from_secs(30))
            .unwrap();
        let mut out = Vec::new();
        poll_until(ex, &mut out, rows.len());
        let want: Vec<u64> = rows.iter().map(|&r| u64::from(table[r])).collect();
        assert_eq!(out, want);
    });
}

/// A product whose input rows are first RMS-normalised or SwiGLU-combined by
/// every task (rounded to bf16, as a separate stage would store them) matches
/// the f64 reference of norm-then-product and swiglu-then-product.
#[test]
fn gemv_prologues_match_reference() {
    use megakernel::task::gemv_bf16::Prologue;
    let mut rng = Rng(seed());
    on_every_executor("gemv_prologues_match_reference", |ex| {
        for case in 0..6 {
            let (rows, cols, m) = (
                1 + rng.below(500),
                8 * (1 + rng.below(96)),
                1 + rng.below(16),
            );
            let xd = if case % 2 == 0 {
                DType::F32
            } else {
                DType::Bf16
            };
            let xv = bf16_round(&rng.vec(m * cols));
            let av = bf16_round(&rng.vec(m * cols));
            let wv = bf16_round(&rng.vec(rows * cols));
            let (x, aux, w, y) = (
                ex.alloc(xd, m * cols).unwrap(),
                ex.alloc(DType::Bf16, m * cols).unwrap(),
                ex.alloc(DType::Bf16, rows * cols).unwrap(),
                ex.alloc(DType::F32, m * rows).unwrap(),
            );
            ex.write_f32(&x, &xv).unwrap();
            ex.write_f32(&w, &wv).unwrap();
            let norm = case < 3;
            // The swiglu prologue needs `up` of x's type.
            let up = ex.alloc(xd, m * cols).unwrap();
            ex.write_f32(&up, &av).unwrap();
            ex.write_f32(&aux, &av).unwrap();
            let eps = 1e-6f32;
            let pro = if norm {
                Prologue::RmsNorm(aux.slice(0..cols).unwrap(), eps)
            } else {
                Prologue::Swiglu(up.all())
            };
            ex.write_f32(&y, &vec![f32::NAN; m * rows]).unwrap();
            let mut b = ProgramBuilder::new();
            ops::gemv_with(
                &mut b,
                &w.all(),
                &x.all(),
                &y.all(),
                GemvShape { rows, cols, m },
                ex.num_workers(),
                false,
                &pro,
            )
            .unwrap();
            ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
                .unwrap();
            let got = ex.read_f32(&y).unwrap();
            let mut want = Vec::new();
            for i in 0..m {
                let xr = &xv[i * cols..(i + 1) * cols];
                let prepared: Vec<f32> = if norm {
                    let ms = xr.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / cols as f64;
                    let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                    xr.iter()
                        .zip(&av[..cols])
                        .map(|(v, g)| (f64::from(*v) * inv * f64::from(*g)) as f32)
                        .collect()
                } else {
                    xr.iter()
                        .zip(&av[i * cols..(i + 1) * cols])
                        .map(|(g, u)| {
                            let g = f64::from(*g);
                            (g / (1.0 + (-g).exp()) * f64::from(*u)) as f32
                        })
                        .collect()
                };
                let prepared = bf16_round(&prepared);
                for r in 0..rows {
                    let wr = &wv[r * cols..(r + 1) * cols];
                    want.push(
                        wr.iter()
                            .zip(&prepared)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>(),
                    );
                }
            }
            let err = rel_l2(&got, &want);
            assert!(
                err < 1e-2,
                "case {case} (norm {norm}, m {m}, cols {cols}): rel L2 {err}"
            );
        }
    });
}

/// A row's SwiGLU-prologue product has the same bits whether the row is
/// computed alone (the single-row element loop on the device) or inside a
/// block of rows (eight columns per thread): speculative verify blocks rely
/// on it to reproduce single decode steps.
#[test]
fn swiglu_prologue_rows_do_not_depend_on_their_block() {
    use megakernel::task::gemv_bf16::Prologue;
    let mut rng = Rng(seed());
    on_every_executor("swiglu_prologue_rows_do_not_depend_on_their_block", |ex| {
        let (rows, cols, m) = (
            1 + rng.below(300),
            8 * (1 + rng.below(128)),
            2 + rng.below(15),
        );
        let (gv, uv, wv) = (
            bf16_round(&rng.vec(m * cols)),
            bf16_round(&rng.vec(m * cols)),
            bf16_round(&rng.vec(rows * cols)),
        );
        let (g, u, w) = (
            ex.alloc(DType::Bf16, m * cols).unwrap(),
            ex.alloc(DType::Bf16, m * cols).unwrap(),
            ex.alloc(DType::Bf16, rows * cols).unwrap(),
        );
        ex.write_f32(&g, &gv).unwrap();
        ex.write_f32(&u, &uv).unwrap();
        ex.write_f32(&w, &wv).unwrap();
        let product = |x: &BufSlice, up: &BufSlice, n: usize| {
            let y = ex.alloc(DType::F32, n * rows).unwrap();
            ex.write_f32(&y, &vec![f32::NAN; n * rows]).unwrap();
            let mut b = ProgramBuilder::new();
            ops::gemv_with(
                &mut b,
                &w.all(),
                x,
                &y.all(),
                GemvShape { rows, cols, m: n },
                ex.num_workers(),
                false,
                &Prologue::Swiglu(up.clone()),
            )
            .unwrap();
            ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
                .unwrap();
            ex.read_f32(&y).unwrap()
        };
        let block = product(&g.all(), &u.all(), m);
        assert!(block.iter().all(|v| v.is_finite()));
        for i in [0, m / 2, m - 1] {
            let span = i * cols..(i + 1) * cols;
            let alone = product(&g.slice(span.clone()).unwrap(), &u.slice(span).unwrap(), 1);
            assert!(
                alone
                    .iter()
                    .zip(&block[i * rows..(i + 1) * rows])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: row {i} of {m} ({cols} columns) differs alone",
                ex.describe()
            );
        }
    });
}
