//! Batch-1 decode steps (GPU; skipped with a notice without one): for
//! `tiny-moe` and `qwen3-0.6b` with random weights drawn on the device, the
//! time of one command of 8 greedy steps at 1024 tokens of context. The
//! summary gives ms/token next to the device copy bandwidth measured first in
//! the same run, and the share of the copy-bandwidth floor reached.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use megakernel::model::{Model, ModelConfig};
use megakernel::prelude::*;

const CONTEXT: usize = 1024;
const STEPS: usize = 8;

fn decode(c: &mut Criterion) {
    if megakernel::cuda::device_count() == 0 {
        println!("decode bench: no GPU found; skipped");
        if std::env::var("MK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("MK_REQUIRE_GPU=1 but no GPU");
        }
        return;
    }
    let copy = megakernel::cuda::probe::copy_bandwidth(0, 1 << 30, 20).unwrap();
    let mut summary = Vec::new();
    for name in ["tiny-moe", "qwen3-0.6b"] {
        let config = ModelConfig::preset(name).unwrap();
        let rt = Runtime::new(0).unwrap();
        let model = Model::random(&rt, &config, 7).unwrap();
        let mut d = model.session(&rt, CONTEXT + STEPS + 1).unwrap();
        let prompt: Vec<u32> = (0..CONTEXT)
            .map(|i| ((i * 7919) % config.vocab_size) as u32)
            .collect();
        let first = d.prefill(&rt, &prompt).unwrap();
        let mut step = || {
            d.truncate(&rt, CONTEXT, first).unwrap();
            d.generate(&rt, STEPS).unwrap();
        };
        c.bench_function(
            &format!("decode {name} bf16, {STEPS} steps at {CONTEXT}"),
            |b| b.iter(&mut step),
        );
        let mut times: Vec<f64> = (0..30)
            .map(|_| {
                let t = Instant::now();
                step();
                t.elapsed().as_secs_f64() / STEPS as f64
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let per = times[times.len() / 2];
        let floor = config.decode_bytes(CONTEXT + STEPS / 2) as f64 / copy;
        summary.push((name, per, floor));
    }
    println!(
        "\n== summary (medians; copy bandwidth {:.3} TB/s) ==",
        copy / 1e12
    );
    for (name, per, floor) in summary {
        println!(
            "{name} bf16: {:.3} ms/token ({:.0} tokens/s), {:.1} % of the copy-bandwidth floor ({:.3} ms)",
            per * 1e3,
            1.0 / per,
            100.0 * floor / per,
            floor * 1e3
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = decode
}
criterion_main!(benches);
