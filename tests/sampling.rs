//! Seeded top-k / top-p sampling: the reference draw's distribution, the
//! device task against the reference, and sampled generation in a session.

mod common;

use common::{on_every_executor, seed, Rng};
use megakernel::model::{Model, ModelConfig};
use megakernel::prelude::*;
use megakernel::task::sample::{draw, Sample, Sampling};

fn softmax(l: &[f32], t: f32) -> Vec<f64> {
    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = l
        .iter()
        .map(|v| (f64::from(v - m) / f64::from(t)).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Frequencies over many positions follow the tempered softmax, restricted to
/// the top-k and renormalised.
#[test]
fn reference_draws_follow_the_filtered_softmax() {
    let mut rng = Rng(seed());
    let logits: Vec<f32> = (0..12).map(|_| 2.0 * rng.f32()).collect();
    for (t, k) in [(1.0f32, 0u32), (0.7, 5)] {
        let s = Sampling {
            temperature: t,
            top_k: k,
            top_p: 1.0,
            seed: rng.next_u64(),
        };
        let n = 40_000;
        let mut counts = [0usize; 12];
        for pos in 0..n {
            counts[draw(&logits, &s, pos) as usize] += 1;
        }
        let mut order: Vec<usize> = (0..12).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let keep = if k == 0 { 12 } else { k as usize };
        let kept: Vec<f32> = order[..keep].iter().map(|&i| logits[i]).collect();
        let p = softmax(&kept, t);
        for (r, &i) in order.iter().enumerate() {
            let want = if r < keep { p[r] } else { 0.0 };
            let got = counts[i] as f64 / n as f64;
            let sd = (want * (1.0 - want) / n as f64).sqrt();
            assert!(
                (got - want).abs() <= 5.0 * sd + 1e-9,
                "t {t} k {k}: token {i}: {got} vs {want}"
            );
        }
    }
}

/// A nucleus smaller than the top token's probability keeps only that token;
/// top-k = 1 is greedy.
#[test]
fn reference_nucleus_and_top1() {
    let logits = vec![0.0f32, 3.0, 1.0, 2.9];
    let greedy = 1;
    for pos in 0..200 {
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.3,
            seed: 7,
        };
        assert_eq!(draw(&logits, &s, pos), greedy);
        let s = Sampling {
            temperature: 5.0,
            top_k: 1,
            top_p: 1.0,
            seed: 9,
        };
        assert_eq!(draw(&logits, &s, pos), greedy);
    }
    let bad = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    assert!(bad.validate().is_err());
    let bad = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.5,
        seed: 0,
    };
    assert!(bad.validate().is_err());
}

/// The device task draws what the reference draws, over random logits,
/// settings and positions.
#[test]
fn sample_task_matches_reference_on_every_executor() {
    let mut rng = Rng(seed());
    on_every_executor("sample_task_matches_reference_on_every_executor", |ex| {
        for case in 0..24 {
            let vocab = 50 + rng.below(5000);
            let logits: Vec<f32> = (0..vocab).map(|_| 4.0 * rng.f32()).collect();
            let s = Sampling {
                temperature: 0.3 + rng.f32().abs(),
                top_k: [0, 1, 7, 50, 1024][case % 5],
                top_p: [1.0, 0.9, 0.5][case % 3],
                seed: rng.next_u64(),
            };
            let pos = rng.below(100_000) as u32;
            let (lb, pb, posb, out) = (
                ex.alloc(DType::F32, vocab).unwrap(),
                ex.alloc(DType::U32, 5).unwrap(),
                ex.alloc(DType::U32, 1).unwrap(),
                ex.alloc(DType::U32, 1).unwrap(),
            );
            ex.write_f32(&lb, &logits).unwrap();
            ex.write_u32(&pb, &s.words()).unwrap();
            ex.write_u32(&posb, &[pos]).unwrap();
            ex.write_u32(&out, &[u32::MAX]).unwrap();
            let mut b = ProgramBuilder::new();
            b.push(Sample::task(&lb.all(), &pb.all(), &posb.all(), &out.all()).unwrap());
            ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
                .unwrap();
            let got = ex.read_u32(&out).unwrap()[0];
            assert_eq!(
                got,
                draw(&logits, &s, pos),
                "case {case}: {s:?} vocab {vocab}"
            );
        }
    });
}

/// Sampled generation is reproducible from its seed, top-k = 1 equals greedy
/// generation, and a different seed gives a different sequence.
#[test]
fn sampled_generation_is_seeded() {
    let config = ModelConfig::preset("tiny").unwrap();
    on_every_executor("sampled_generation_is_seeded", |ex| {
        let model = Model::random(ex, &config, 3).unwrap();
        let run = |s: Option<Sampling>| {
            let mut d = model.session(ex, 96).unwrap();
            d.prefill(ex, &[5, 17, 300, 2]).unwrap();
            match s {
                Some(s) => d.generate_sampled(ex, 40, &s).unwrap(),
                None => d.generate(ex, 40).unwrap(),
            }
        };
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.95,
            seed: 11,
        };
        let a = run(Some(s));
        assert_eq!(a, run(Some(s)));
        assert_ne!(a, run(Some(Sampling { seed: 12, ..s })));
        assert!(a.iter().all(|&t| (t as usize) < config.vocab_size));
        assert_eq!(run(Some(Sampling { top_k: 1, ..s })), run(None));
    });
}
