//! Foundation benchmarks (GPU; skipped with a notice without one):
//! (a) host round trip of an empty program vs an empty kernel launch + sync,
//! (b) dependency-hop latency along a chain of tasks on different SMs,
//! (c) bf16 GEMV 8192×8192 and 151936×2048 (an LM head) vs the device's copy
//!     bandwidth, measured in the same run.
//! A summary with medians and ratios is printed at the end.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use megakernel::prelude::*;
use megakernel::program::ops;
use megakernel::task::{gemv_bf16::GemvShape, nop::Nop};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time_n(n: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// Empty-kernel launch + sync and copy bandwidth, with no resident kernel on the GPU.
fn baselines(summary: &mut Vec<(String, f64)>) {
    let launch = megakernel::cuda::probe::launch_latency(0, 2000).unwrap();
    summary.push(("empty kernel launch + sync (s)".into(), launch));
    let copy = megakernel::cuda::probe::copy_bandwidth(0, 1 << 30, 30).unwrap();
    summary.push(("copy bandwidth, read+write (B/s)".into(), copy));
}

fn resident(c: &mut Criterion, summary: &mut Vec<(String, f64)>) {
    let rt = Runtime::new(0).unwrap();
    let sms = rt.num_workers();

    // (a) empty program round trip.
    let mut b = ProgramBuilder::new();
    b.push(Nop::task());
    let empty = rt.load(&b.build().unwrap()).unwrap();
    let mut round_trip = || rt.run(&empty, 1, &[]).unwrap();
    c.bench_function("resident: empty program round trip", |b| {
        b.iter(&mut round_trip)
    });
    summary.push((
        "empty program round trip (s)".into(),
        median(time_n(2000, &mut round_trip)),
    ));

    // (b) hop latency: a chain of nops, each on the next SM.
    let hops = 4 * sms;
    let mut b = ProgramBuilder::new();
    let mut prev = None;
    for i in 0..hops {
        let ev = b.event("hop");
        let mut h = b.push(Nop::task()).on_worker(i as u32).signal(ev);
        if let Some(p) = prev {
            h = h.wait(p);
        }
        let _ = h;
        prev = Some(ev);
    }
    let chain = rt.load(&b.build().unwrap()).unwrap();
    let mut run_chain = || rt.run(&chain, 1, &[]).unwrap();
    c.bench_function("resident: hop chain", |b| b.iter(&mut run_chain));
    let t_chain = median(time_n(200, &mut run_chain));
    let t_rt = summary
        .iter()
        .find(|s| s.0.starts_with("empty program"))
        .unwrap()
        .1;
    summary.push((
        "dependency hop (s)".into(),
        (t_chain - t_rt) / (hops - 1) as f64,
    ));

    // Breakdown of the per-task cost (same run): tasks on one worker only.
    let per_task = |b: ProgramBuilder, n: usize| {
        let p = rt.load(&b.build().unwrap()).unwrap();
        let t = median(time_n(200, || rt.run(&p, 1, &[]).unwrap()));
        (t - t_rt) / n as f64
    };
    let n = 512;
    let mut b = ProgramBuilder::new();
    for _ in 0..n {
        b.push(Nop::task()).on_worker(1);
    }
    summary.push((
        "task, no wait/signal, one worker (s)".into(),
        per_task(b, n),
    ));
    let mut b = ProgramBuilder::new();
    let ev = b.event("signals");
    for _ in 0..n {
        b.push(Nop::task()).on_worker(1).signal(ev);
    }
    // Read by a task on another worker: a signal nobody waits for is left
    // out of the device's program (`Program::schedule`).
    b.push(Nop::task()).on_worker(2).wait(ev);
    summary.push(("task, signal only, one worker (s)".into(), per_task(b, n)));
    let mut b = ProgramBuilder::new();
    let mut prev: Option<EventId> = None;
    for _ in 0..n {
        let ev = b.event("link");
        // A second producer on another worker, so that the device keeps the
        // wait (one whose producers all ran earlier on its worker is left out).
        b.push(Nop::task()).on_worker(2).signal(ev);
        let mut h = b.push(Nop::task()).on_worker(1).signal(ev);
        if let Some(p) = prev {
            h = h.wait(p);
        }
        let _ = h;
        prev = Some(ev);
    }
    summary.push((
        "task, wait + signal chain, one worker (s)".into(),
        per_task(b, n),
    ));

    // (c) GEMV.
    for (rows, cols) in [(8192usize, 8192usize), (151_936, 2048)] {
        let shape = GemvShape { rows, cols, m: 1 };
        let w = rt.alloc(DType::Bf16, rows * cols).unwrap();
        let x = rt.alloc(DType::Bf16, cols).unwrap();
        let y = rt.alloc(DType::F32, rows).unwrap();
        let mut s = 1u32;
        let fill: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect();
        rt.write_f32(&w, &fill).unwrap();
        rt.write_f32(&x, &fill[..cols]).unwrap();
        let mut b = ProgramBuilder::new();
        ops::gemv(&mut b, &w.all(), &x.all(), &y.all(), shape, sms, false).unwrap();
        let p = rt.load(&b.build().unwrap()).unwrap();
        let iters = 50u32;
        let mut run = || rt.run(&p, iters, &[]).unwrap();
        run();
        let name = format!("resident: gemv {rows}x{cols} bf16 x{iters}");
        c.bench_function(&name, |b| b.iter(&mut run));
        let t = median(time_n(20, &mut run)) / f64::from(iters);
        summary.push((format!("gemv {rows}x{cols} per iteration (s)"), t));
        summary.push((
            format!("gemv {rows}x{cols} bandwidth (B/s)"),
            (rows * cols * 2) as f64 / t,
        ));
    }
}

fn all(c: &mut Criterion) {
    if megakernel::cuda::device_count() == 0 {
        if std::env::var("MK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("MK_REQUIRE_GPU=1 but no GPU");
        }
        eprintln!("runtime benchmarks need a GPU; skipped");
        return;
    }
    let mut summary = Vec::new();
    baselines(&mut summary);
    resident(c, &mut summary);
    let get = |k: &str| {
        summary
            .iter()
            .find(|s| s.0.starts_with(k))
            .map(|s| s.1)
            .unwrap()
    };
    let copy = get("copy bandwidth");
    println!("\n== summary (medians) ==");
    for (k, v) in &summary {
        println!("{k:48} {v:.4e}");
    }
    println!(
        "round trip / (launch + sync)        {:.3}",
        get("empty program") / get("empty kernel")
    );
    for g in ["gemv 8192x8192 bandwidth", "gemv 151936x2048 bandwidth"] {
        println!("{g} / copy bandwidth   {:.3}", get(g) / copy);
    }
    let json: Vec<String> = summary
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v:e}"))
        .collect();
    println!("{{{}}}", json.join(", "));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = all
}
criterion_main!(benches);
