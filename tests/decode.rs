//! A dense Qwen3 model decoding inside task programs: against an independent
//! plain-Rust forward pass, and GPU against the CPU executor.

mod common;

use common::{gpu, Rng};
use megakernel::model::checkpoint::{write_random, WriteOptions};
use megakernel::model::{Checkpoint, Model, ModelConfig};
use megakernel::prelude::*;

/// Keys and values seen so far by one layer.
type LayerCache = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// Straightforward f64 forward pass of a Qwen3 model over a token sequence,
/// returning the logits after every token. Values are rounded to bf16 where
/// the model stores them in bf16 (activations, the KV cache), so that routing
/// decisions do not flip on rounding alone; everything else is f64.
/// The reference logits at every position, and at every position the
/// smallest gap (in router logits) between the last expert chosen and the
/// first one left out, over the MoE layers (infinite for dense models): where
/// it is tiny, bf16 activations may route differently and the runs part.
fn reference(ck: &Checkpoint, tokens: &[u32]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let c = &ck.config;
    let w = |n: &str| {
        ck.read_f32(n)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect::<Vec<f64>>()
    };
    let (h, hd, nh, kvh) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let matvec = |m: &[f64], x: &[f64]| -> Vec<f64> {
        m.chunks(x.len())
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let norm = |x: &[f64], g: &[f64]| -> Vec<f64> {
        let inv =
            1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + c.rms_norm_eps).sqrt();
        x.iter().zip(g).map(|(v, g)| v * inv * g).collect()
    };
    let rope = |x: &mut [f64], p: usize| {
        let half = x.len() / 2;
        for j in 0..half {
            let a = p as f64 / c.rope_theta.powf(2.0 * j as f64 / x.len() as f64);
            let (s, co) = a.sin_cos();
            let (x1, x2) = (x[j], x[j + half]);
            x[j] = x1 * co - x2 * s;
            x[j + half] = x2 * co + x1 * s;
        }
    };
    let bf = |v: Vec<f64>| -> Vec<f64> {
        v.into_iter()
            .map(|x| f64::from(half::bf16::from_f32(x as f32).to_f32()))
            .collect()
    };
    let embed = w("model.embed_tokens.weight");
    let head = if c.tie_word_embeddings {
        embed.clone()
    } else {
        w("lm_head.weight")
    };
    let mut caches: Vec<LayerCache> = vec![(Vec::new(), Vec::new()); c.num_layers];
    let mut out = Vec::new();
    let mut gaps = Vec::new();
    for (p, &t) in tokens.iter().enumerate() {
        let mut gap = f64::INFINITY;
        let mut x = embed[t as usize * h..(t as usize + 1) * h].to_vec();
        for (l, (kc, vc)) in caches.iter_mut().enumerate() {
            let pre = |s: &str| w(&format!("model.layers.{l}.{s}"));
            let hn = bf(norm(&x, &pre("input_layernorm.weight")));
            let (q, k, v) = (
                bf(matvec(&pre("self_attn.q_proj.weight"), &hn)),
                bf(matvec(&pre("self_attn.k_proj.weight"), &hn)),
                bf(matvec(&pre("self_attn.v_proj.weight"), &hn)),
            );
            let (qn, kn) = (
                pre("self_attn.q_norm.weight"),
                pre("self_attn.k_norm.weight"),
            );
            let mut kk = Vec::new();
            for g in 0..kvh {
                let mut r = norm(&k[g * hd..(g + 1) * hd], &kn);
                rope(&mut r, p);
                kk.extend(bf(r));
            }
            kc.push(kk);
            vc.push(v);
            let mut attn = Vec::new();
            for hh in 0..nh {
                let g = hh / (nh / kvh);
                let mut qh = norm(&q[hh * hd..(hh + 1) * hd], &qn);
                rope(&mut qh, p);
                let qh = bf(qh);
                let s: Vec<f64> = kc
                    .iter()
                    .map(|kr| {
                        qh.iter()
                            .zip(&kr[g * hd..(g + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let tot: f64 = e.iter().sum();
                for d in 0..hd {
                    attn.push(
                        e.iter()
                            .zip(vc.iter())
                            .map(|(a, vr)| a * vr[g * hd + d])
                            .sum::<f64>()
                            / tot,
                    );
                }
            }
            let attn = bf(attn);
            let o = matvec(&pre("self_attn.o_proj.weight"), &attn);
            x = bf(x.iter().zip(o).map(|(a, b)| a + b).collect());
            let hn = bf(norm(&x, &pre("post_attention_layernorm.weight")));
            let mlp = |prefix: &str| -> Vec<f64> {
                let gt = bf(matvec(&pre(&format!("{prefix}gate_proj.weight")), &hn));
                let up = bf(matvec(&pre(&format!("{prefix}up_proj.weight")), &hn));
                let act: Vec<f64> = bf(gt
                    .iter()
                    .zip(&up)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect());
                matvec(&pre(&format!("{prefix}down_proj.weight")), &act)
            };
            let delta = match &c.moe {
                Some(m) if c.is_moe_layer(l) => {
                    let logits = matvec(&pre("mlp.gate.weight"), &hn);
                    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = logits.iter().map(|v| (v - mx).exp()).collect();
                    let tot: f64 = e.iter().sum();
                    let mut order: Vec<usize> = (0..e.len()).collect();
                    order.sort_by(|&a, &b| e[b].partial_cmp(&e[a]).unwrap().then(a.cmp(&b)));
                    let top = &order[..m.top_k];
                    if m.top_k < order.len() {
                        gap = gap.min(logits[order[m.top_k - 1]] - logits[order[m.top_k]]);
                    }
                    let norm_sum: f64 = if m.norm_topk_prob {
                        top.iter().map(|&j| e[j] / tot).sum()
                    } else {
                        1.0
                    };
                    let mut acc = vec![0f64; h];
                    for &j in top {
                        let y = mlp(&format!("mlp.experts.{j}."));
                        acc.iter_mut()
                            .zip(&y)
                            .for_each(|(a, b)| *a += e[j] / tot / norm_sum * b);
                    }
                    acc
                }
                _ => mlp("mlp."),
            };
            x = bf(x.iter().zip(delta).map(|(a, b)| a + b).collect());
        }
        out.push(matvec(&head, &bf(norm(&x, &w("model.norm.weight")))));
        gaps.push(gap);
    }
    (out, gaps)
}

/// Writes a random checkpoint for `config` and opens it.
fn checkpoint(dir: &std::path::Path, config: &ModelConfig, seed: u64) -> Checkpoint {
    write_random(
        dir,
        config,
        &WriteOptions {
            seed,
            ..WriteOptions::default()
        },
    )
    .unwrap();
    Checkpoint::open(dir).unwrap()
}

fn argmax(v: &[f64]) -> (usize, f64) {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap());
    (idx[0], v[idx[0]] - v[idx[1]])
}

fn rel(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - y).powi(2))
        .sum();
    (num / b.iter().map(|y| y * y).sum::<f64>()).sqrt()
}

/// The `tiny` preset with heads of 64: its attention takes the GPU's tiled
/// path with the rope done inside the attention slices (no rope stage).
fn tiny_wide_heads() -> ModelConfig {
    ModelConfig {
        head_dim: 64,
        ..ModelConfig::preset("tiny").unwrap()
    }
}

/// Attention does the rope work itself where the GPU's tiled path takes the
/// heads (64 or 128): those layers have no rope stage; heads of 32 keep it.
#[test]
fn rope_stage_only_where_attention_cannot_take_it() {
    let cpu = CpuExecutor::new(CpuOptions {
        threads: 1,
        seed: 1,
    });
    for (c, stages) in [
        (ModelConfig::preset("tiny").unwrap(), 2),
        (tiny_wide_heads(), 0),
    ] {
        let s = Model::random(&cpu, &c, 1)
            .unwrap()
            .session(&cpu, 16)
            .unwrap();
        let p = s.step_program();
        let ropes = (0..p.num_events() as u32)
            .filter(|&i| p.event_name(i).is_some_and(|n| n.ends_with(" rope")))
            .count();
        assert_eq!(ropes, stages, "head_dim {}", c.head_dim);
    }
}

#[test]
fn tiny_model_decodes_like_the_reference_on_every_executor() {
    for tied in [false, true] {
        let config = ModelConfig {
            tie_word_embeddings: tied,
            ..ModelConfig::preset("tiny").unwrap()
        };
        decode_against_reference(config);
    }
    decode_against_reference(tiny_wide_heads());
}

/// [`decode_case`] on fresh random models until one gives enough tokens with
/// a clear margin to check (a case whose routing nearly ties early leaves
/// too few, and would check next to nothing); any mismatch fails at once.
fn decode_against_reference(config: ModelConfig) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    const CASES: u64 = 6;
    for k in 0..CASES {
        if decode_case(&config, seed.wrapping_add(k)) {
            return;
        }
    }
    panic!(
        "none of {CASES} random models (seeds from {seed}) gave enough tokens with a clear margin"
    );
}

/// Decodes a random checkpoint (`seed`) on every executor and checks the
/// tokens against an independent forward pass wherever its margin is clear.
/// Returns whether every run had at least half of its examined tokens (and
/// at least one) to check.
fn decode_case(config: &ModelConfig, seed: u64) -> bool {
    let config = config.clone();
    let dir = tempfile::tempdir().unwrap();
    eprintln!("seed {seed}");
    let ck = checkpoint(dir.path(), &config, seed);
    let mut rng = Rng(seed);
    let prompt: Vec<u32> = (0..21)
        .map(|_| rng.below(config.vocab_size) as u32)
        .collect();
    let mut runs: Vec<(String, u32, Vec<u32>, Vec<f32>)> = Vec::new();
    let mut run = |ex: &dyn Executor| {
        let mut d = Model::load(ex, &ck).unwrap().session(ex, 64).unwrap();
        let first = d.prefill(ex, &prompt).unwrap();
        let logits = d.logits(ex).unwrap();
        let mut streamed = Vec::new();
        let more = d.generate_streaming(ex, 24, |t| streamed.push(t)).unwrap();
        assert_eq!(
            streamed, more,
            "streamed tokens differ from the returned ones"
        );
        assert_eq!(d.position(), prompt.len() + 24);
        // Typed errors: context overflow and a token outside the vocabulary.
        assert!(matches!(d.generate(ex, 64), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            d.prefill(ex, &[config.vocab_size as u32]),
            Err(Error::InvalidArgument(_))
        ));
        runs.push((ex.describe(), first, more, logits));
    };
    run(&CpuExecutor::new(CpuOptions { threads: 3, seed }));
    if let Some((_g, rt)) = gpu(
        "tiny_model_decodes_like_the_reference",
        RuntimeOptions::default(),
    ) {
        run(&rt);
    }
    for (name, first, more, logits) in &runs {
        // The independent forward pass over the prompt and this run's own tokens.
        let mut seq = prompt.clone();
        seq.push(*first);
        seq.extend(&more[..more.len() - 1]);
        let (want, gaps) = reference(&ck, &seq);
        let err = rel(logits, &want[prompt.len() - 1]);
        assert!(
            err < 1e-2,
            "{name}: logits after the prompt differ from the reference by {err}"
        );
        let got: Vec<u32> = std::iter::once(*first)
            .chain(more.iter().copied())
            .collect();
        let (mut checked, mut examined) = (0, 0);
        for (i, &t) in got.iter().enumerate() {
            // A near tie in routing at this token's input (or any before it in
            // the generated part) may legitimately send the runs apart.
            let at = prompt.len() - 1 + i;
            if gaps[prompt.len() - 1..=at].iter().any(|&g| g < 0.02) {
                break;
            }
            examined += 1;
            let (best, margin) = argmax(&want[at]);
            if margin > 0.05 {
                assert_eq!(
                    t as usize, best,
                    "{name}: token {i} differs where the reference margin is {margin}"
                );
                checked += 1;
            }
        }
        let distinct = got.iter().collect::<std::collections::HashSet<_>>().len();
        eprintln!(
            "{name} (tied {}): logits rel err {err:.2e}; {checked} of {examined} tokens before any routing near-tie had a margin to check (of {}); {distinct} distinct",
            config.tie_word_embeddings,
            got.len()
        );
        if checked == 0 || checked < examined / 2 {
            eprintln!("too few tokens with a clear margin ({checked} of {examined}): another case");
            return false;
        }
    }
    if runs.len() == 2 {
        let ((_, f0, m0, l0), (_, f1, m1, l1)) = (&runs[0], &runs[1]);
        let l0d: Vec<f64> = l0.iter().map(|&v| f64::from(v)).collect();
        assert!(
            rel(l1, &l0d) < 1e-2,
            "GPU logits differ from the CPU executor's"
        );
        let agree = std::iter::once(f0 == f1)
            .chain(m0.iter().zip(m1).map(|(a, b)| a == b))
            .take_while(|&x| x)
            .count();
        eprintln!("GPU and CPU agree on the first {agree} of 25 tokens");
    }
    true
}

#[test]
fn tiny_moe_model_decodes_like_the_reference() {
    decode_against_reference(ModelConfig::preset("tiny-moe").unwrap());
}

#[test]
fn random_weights_in_memory_equal_the_written_checkpoint() {
    let config = ModelConfig::preset("tiny-moe").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed = 99;
    let ck = checkpoint(dir.path(), &config, seed);
    let cpu = CpuExecutor::new(CpuOptions::default());
    let prompt = [3, 1, 4, 1, 5, 9, 2, 6];
    let mut a = Model::load(&cpu, &ck).unwrap().session(&cpu, 32).unwrap();
    let mut b = Model::random(&cpu, &config, seed)
        .unwrap()
        .session(&cpu, 32)
        .unwrap();
    assert_eq!(
        a.prefill(&cpu, &prompt).unwrap(),
        b.prefill(&cpu, &prompt).unwrap()
    );
    assert_eq!(a.logits(&cpu).unwrap(), b.logits(&cpu).unwrap());
    assert_eq!(a.generate(&cpu, 8).unwrap(), b.generate(&cpu, 8).unwrap());
}

#[test]
fn sessions_on_one_model_keep_their_own_caches() {
    let config = ModelConfig::preset("tiny").unwrap();
    let cpu = CpuExecutor::new(CpuOptions::default());
    let model = Model::random(&cpu, &config, 5).unwrap();
    let (p1, p2) = ([1u32, 2, 3, 4], [400u32, 300, 200, 100, 50]);
    // Alone.
    let alone1 = {
        let mut s = model.session(&cpu, 32).unwrap();
        let f = s.prefill(&cpu, &p1).unwrap();
        (f, s.generate(&cpu, 6).unwrap())
    };
    let alone2 = {
        let mut s = model.session(&cpu, 32).unwrap();
        let f = s.prefill(&cpu, &p2).unwrap();
        (f, s.generate(&cpu, 6).unwrap())
    };
    // Interleaved on the same model.
    let (mut s1, mut s2) = (
        model.session(&cpu, 32).unwrap(),
        model.session(&cpu, 32).unwrap(),
    );
    let f1 = s1.prefill(&cpu, &p1).unwrap();
    let f2 = s2.prefill(&cpu, &p2).unwrap();
    let (mut g1, mut g2) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        g1.extend(s1.generate(&cpu, 2).unwrap());
        g2.extend(s2.generate(&cpu, 2).unwrap());
    }
    assert_eq!((f1, g1), alone1);
    assert_eq!((f2, g2), alone2);
    // A model belongs to its executor.
    let other = CpuExecutor::new(CpuOptions::default());
    assert!(matches!(model.session(&other, 8), Err(Error::Foreign(_))));
}

/// Truncating the context and generating again repeats the same tokens (the
/// cache entries past the cut are overwritten); truncating forward or to an
/// out-of-range token is an error.
#[test]
fn truncate_and_regenerate_repeats() {
    let config = ModelConfig::preset("tiny-moe").unwrap();
    common::on_every_executor("truncate_and_regenerate_repeats", |ex| {
        let model = Model::random(ex, &config, 9).unwrap();
        let mut d = model.session(ex, 64).unwrap();
        let first = d.prefill(ex, &[3, 1, 4, 1, 5]).unwrap();
        let a = d.generate(ex, 12).unwrap();
        d.truncate(ex, 5, first).unwrap();
        assert_eq!(d.generate(ex, 12).unwrap(), a);
        assert!(d.truncate(ex, 40, first).is_err());
        assert!(d.truncate(ex, 2, config.vocab_size as u32).is_err());
    });
}

/// A block of rows gives each row the bits one-token steps give it: logits
/// after a 16-token prefill chunk equal those after the same tokens one at a
/// time, exactly, for many prompts (speculative decoding is lossless only if
/// this holds; a norm summing in another order broke it one prompt in 15).
#[test]
fn chunks_and_single_steps_give_identical_logits() {
    common::on_every_executor("chunks_and_single_steps", |ex| {
        for name in ["tiny", "qwen3-30b-a3b-mini", "tiny, heads of 64"] {
            let c = ModelConfig::preset(name).unwrap_or_else(tiny_wide_heads);
            let model = Model::random(ex, &c, 3).unwrap();
            let mut rng = Rng(common::seed());
            let trials = if ex.is_gpu() { 30 } else { 3 };
            for trial in 0..trials {
                let p: Vec<u32> = (0..21).map(|_| rng.below(c.vocab_size) as u32).collect();
                let mut steps = model.session(ex, 64).unwrap();
                steps.prefill(ex, &p[..5]).unwrap();
                for t in &p[5..] {
                    steps.prefill(ex, &[*t]).unwrap();
                }
                let mut chunk = model.session(ex, 64).unwrap();
                chunk.prefill(ex, &p[..5]).unwrap();
                chunk.prefill(ex, &p[5..]).unwrap();
                let (a, b) = (steps.logits(ex).unwrap(), chunk.logits(ex).unwrap());
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&a) == bits(&b),
                    "{}: {name} trial {trial}: chunk and steps differ",
                    ex.describe()
                );
            }
        }
    });
}

/// The routing tallies: one row chooses exactly top-k experts per layer, a
/// 16-row chunk between top-k and 16 × top-k; a reset starts afresh; a dense
/// model has none.
#[test]
fn expert_use_counts_the_routed_blocks() {
    let config = ModelConfig::preset("qwen3-30b-a3b-mini").unwrap();
    let top_k = config.moe.as_ref().unwrap().top_k as f64;
    common::on_every_executor("expert_use_counts_the_routed_blocks", |ex| {
        let model = Model::random(ex, &config, 12).unwrap();
        let mut s = model.session(ex, 64).unwrap();
        let prompt: Vec<u32> = (0..19).map(|i| (i * 37 + 5) % 1000).collect();
        s.prefill(ex, &prompt).unwrap();
        s.generate(ex, 5).unwrap();
        let used = s.expert_use(ex).unwrap();
        let rows: Vec<(usize, u64)> = used.iter().map(|u| (u.rows, u.blocks)).collect();
        // 3 prompt tokens and 5 generated one at a time, one chunk of 16.
        assert_eq!(rows, [(1, 8), (16, 1)], "{}", ex.describe());
        assert_eq!(used[0].per_layer.len(), config.num_layers);
        assert!(used[0].per_layer.iter().all(|&(_, v)| v == top_k));
        for &(l, v) in &used[1].per_layer {
            assert!(
                v > top_k && v <= 16.0 * top_k && v.fract() == 0.0,
                "layer {l}: {v}"
            );
        }
        eprintln!(
            "{}: a 16-row chunk chose {:.1} experts per layer",
            ex.describe(),
            used[1].mean()
        );
        s.reset_expert_use(ex).unwrap();
        s.generate(ex, 2).unwrap();
        let used = s.expert_use(ex).unwrap();
        assert_eq!(used.len(), 1);
        assert_eq!((used[0].rows, used[0].blocks), (1, 2));
    });
    let cpu = CpuExecutor::new(CpuOptions::default());
    let dense = Model::random(&cpu, &ModelConfig::preset("tiny").unwrap(), 1).unwrap();
    let mut s = dense.session(&cpu, 32).unwrap();
    s.prefill(&cpu, &[1, 2, 3]).unwrap();
    assert!(s.expert_use(&cpu).unwrap().is_empty());
}

/// The shared memory a runtime gives its blocks changes where tasks keep
/// their inputs (staged slices, copied rows), not what they compute: a
/// 48 KiB limit decodes the same bits as the default, FP4 experts included;
/// a limit too small for a task's scratch is a device fault that names it.
#[test]
fn shared_memory_limit_changes_speed_not_results() {
    use megakernel::quant::Fp4Format;
    let config = ModelConfig::preset("qwen3-30b-a3b-mini").unwrap();
    let prompt: Vec<u32> = (0..21).map(|i| (i * 53 + 11) % 1000).collect();
    let run = |limit: Option<u32>| -> Option<megakernel::Result<(Vec<u32>, Vec<f32>)>> {
        let opts = RuntimeOptions {
            shared_limit: limit,
            ..RuntimeOptions::default()
        };
        let (_guard, rt) = gpu("shared_memory_limit_changes_speed_not_results", opts)?;
        if let Some(l) = limit {
            assert!(rt.shared_bytes() <= l, "{} > {l}", rt.shared_bytes());
        }
        let go = || {
            let model = Model::random_with(&rt, &config, 5, Some(Fp4Format::Mxfp4))?;
            let mut s = model.session(&rt, 64)?;
            let mut tokens = vec![s.prefill(&rt, &prompt)?];
            tokens.extend(s.generate(&rt, 8)?);
            Ok((tokens, s.logits(&rt)?))
        };
        Some(go())
    };
    let Some(base) = run(None) else { return };
    let (tokens, logits) = base.unwrap();
    let (t48, l48) = run(Some(48 * 1024)).unwrap().unwrap();
    assert_eq!(t48, tokens, "tokens with 48 KiB of shared memory");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&l48) == bits(&logits), "logits with 48 KiB differ");
    match run(Some(2 * 1024)).unwrap() {
        Err(megakernel::Error::DeviceFault { task_kind, .. }) => {
            eprintln!("2 KiB of shared memory: {task_kind} reports its fault");
        }
        other => panic!("2 KiB of shared memory: expected a device fault, got {other:?}"),
    }
}

/// A one-row MoE step waits for what each task reads, not for whole stages:
/// an expert's down tasks for that expert's gate and up tasks (all their
/// rows), an expert combine task for every slot's down tasks of its columns
/// and no others, an attention merge task for all slices of its heads' KV
/// heads and no others.
#[test]
fn moe_step_tasks_wait_for_their_producers_alone() {
    use megakernel::abi::NO_EVENT;
    use megakernel::task::attention::AttentionArgs;
    use megakernel::task::attention_combine::AttentionCombineArgs;
    use megakernel::task::decode_args;
    use megakernel::task::gemv_expert::GemvExpertArgs;
    use megakernel::task::moe_combine::MoeCombineArgs;
    use std::collections::BTreeMap;

    let cpu = CpuExecutor::new(CpuOptions {
        threads: 4,
        seed: 1,
    });
    let c = ModelConfig::preset("tiny-moe").unwrap();
    let moe = c.moe.clone().unwrap();
    let s = Model::random(&cpu, &c, 1)
        .unwrap()
        .session(&cpu, 16)
        .unwrap();
    let p = s.step_program();
    let descs = p.descriptors();
    let mut producers: Vec<Vec<usize>> = vec![Vec::new(); p.num_events()];
    for (i, d) in descs.iter().enumerate() {
        if d.signal != NO_EVENT {
            producers[d.signal as usize].push(i);
        }
    }
    let from = |i: usize| -> Vec<usize> {
        descs[i]
            .wait
            .iter()
            .filter(|&&e| e != NO_EVENT)
            .flat_map(|&e| producers[e as usize].iter().copied())
            .collect()
    };
    let kind = |i: usize| p.task_kind(i as u32);
    let downs = (0..descs.len())
        .filter(|&i| {
            kind(i) == "gemv_expert"
                && decode_args::<GemvExpertArgs>(&descs[i].args).x_per_slot == 1
        })
        .count();
    let (mut checked_downs, mut combines, mut merges) = (0, 0, 0);
    for i in 0..descs.len() {
        match kind(i) {
            "gemv_expert" => {
                let a: GemvExpertArgs = decode_args(&descs[i].args);
                if a.x_per_slot == 0 {
                    continue;
                }
                checked_downs += 1;
                let mut rows = 0;
                for t in from(i) {
                    assert_eq!(kind(t), "gemv_expert");
                    let b: GemvExpertArgs = decode_args(&descs[t].args);
                    assert_eq!(
                        (b.x_per_slot, b.slot),
                        (0, a.slot),
                        "down task {i} waits for task {t}"
                    );
                    rows += b.gemv.rows as usize;
                }
                assert_eq!(
                    rows,
                    2 * moe.moe_intermediate_size,
                    "down task {i}: gate and up rows"
                );
            }
            "moe_combine" => {
                let a: MoeCombineArgs = decode_args(&descs[i].args);
                combines += 1;
                let producers = from(i);
                assert!(
                    producers.len() < downs,
                    "combine task {i} waits for every down task"
                );
                let mut covered = vec![vec![false; a.hn as usize]; moe.top_k];
                for t in producers {
                    let b: GemvExpertArgs = decode_args(&descs[t].args);
                    assert_eq!((kind(t), b.x_per_slot), ("gemv_expert", 1));
                    for col in b.gemv.row0..b.gemv.row0 + b.gemv.rows {
                        if (a.h0..a.h0 + a.hn).contains(&col) {
                            covered[b.slot as usize][(col - a.h0) as usize] = true;
                        }
                    }
                }
                assert!(
                    covered.iter().flatten().all(|&c| c),
                    "combine task {i}: columns not covered"
                );
            }
            "attention_combine" => {
                let a: AttentionCombineArgs = decode_args(&descs[i].args);
                merges += 1;
                let group = (c.num_heads / c.num_kv_heads) as u32;
                let mut got: BTreeMap<u32, u32> = BTreeMap::new();
                for t in from(i) {
                    assert_eq!(kind(t), "attention");
                    let b: AttentionArgs = decode_args(&descs[t].args);
                    *got.entry(b.kv_head).or_default() += 1;
                    assert_eq!(b.chunks, a.chunks);
                }
                let need: Vec<u32> = (a.head0 / group..=(a.head0 + a.nheads - 1) / group).collect();
                assert_eq!(
                    got.keys().copied().collect::<Vec<_>>(),
                    need,
                    "merge task {i}"
                );
                assert!(
                    got.values().all(|&n| n == a.chunks),
                    "merge task {i}: slices missing"
                );
            }
            _ => {}
        }
    }
    assert!(checked_downs > 0 && combines > 0 && merges > 0);
}
