//! DFlash speculative decoding: lossless against plain greedy decoding on the
//! same executor (CPU executor and GPU), its edge cases, acceptance
//! statistics, injected acceptance, and draft checkpoints.

mod common;

use common::{gpu, seed, Rng};
use megakernel::dflash::{
    write_random_draft, DflashOptions, DflashSession, DraftConfig, DraftModel, Injected,
};
use megakernel::model::{Model, ModelConfig};
use megakernel::prelude::*;
use megakernel::quant::Fp4Format;

fn cpu() -> CpuExecutor {
    CpuExecutor::new(CpuOptions {
        threads: 3,
        seed: 11,
    })
}

fn prompt(rng: &mut Rng, vocab: usize, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.below(vocab) as u32).collect()
}

/// Plain greedy continuation of `prompt`: the first token and `n − 1` more.
fn greedy(ex: &dyn Executor, model: &Model, prompt: &[u32], n: usize, max_seq: usize) -> Vec<u32> {
    let mut s = model.session(ex, max_seq).unwrap();
    let mut out = vec![s.prefill(ex, prompt).unwrap()];
    out.extend(s.generate(ex, n - 1).unwrap());
    out
}

/// The same with DFlash, and its session.
fn dflash(
    ex: &dyn Executor,
    model: &Model,
    draft: &DraftModel,
    prompt: &[u32],
    n: usize,
    max_seq: usize,
    opts: &DflashOptions,
) -> (Vec<u32>, DflashSession) {
    let mut s = DflashSession::new(ex, model, draft, max_seq, opts).unwrap();
    let mut out = vec![s.prefill(ex, prompt).unwrap()];
    out.extend(s.generate(ex, n - 1, None).unwrap());
    (out, s)
}

/// DFlash output equals plain greedy output for block sizes 4, 8 and 16 over
/// `n` tokens (`short` for blocks 4 and 8 when given).
fn lossless(
    ex: &dyn Executor,
    config: &ModelConfig,
    experts: Option<Fp4Format>,
    n: usize,
    short: Option<usize>,
) {
    let mut rng = Rng(seed());
    let model = Model::random_with(ex, config, 3, experts).unwrap();
    let layers = DraftConfig::default_layers(config.num_layers);
    let p = prompt(&mut rng, config.vocab_size, 21);
    let max_seq = p.len() + n + 3;
    let want = greedy(ex, &model, &p, n, max_seq);
    for block in [4, 8, 16] {
        let n = if block < 16 { short.unwrap_or(n) } else { n };
        let want = &want[..n];
        let dc = DraftConfig::for_target(config, layers, block);
        let draft = DraftModel::random(ex, &dc, 5, &model).unwrap();
        let (got, s) = dflash(
            ex,
            &model,
            &draft,
            &p,
            n,
            max_seq,
            &DflashOptions::default(),
        );
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        assert_eq!(
            first,
            None,
            "{}: block {block}: DFlash parts from greedy at token {first:?}",
            ex.describe()
        );
        assert_eq!(got.len(), want.len());
        let st = s.stats(ex).unwrap();
        assert!(st.iterations > 0 && st.iterations < n as u64);
        let accepted: u64 = st
            .histogram
            .iter()
            .enumerate()
            .map(|(k, &c)| k as u64 * c)
            .sum();
        assert!(accepted >= (n - 1) as u64, "{st:?}");
        assert!(st.mean_acceptance() >= 1.0);
    }
}

#[test]
fn dflash_is_lossless_on_tiny_cpu() {
    lossless(
        &cpu(),
        &ModelConfig::preset("tiny").unwrap(),
        None,
        520,
        Some(64),
    );
}

/// Heads of 64: the target's attention does the rope work itself (no rope
/// stage), in verify blocks as in single steps.
#[test]
fn dflash_is_lossless_with_wide_heads_cpu() {
    let config = ModelConfig {
        head_dim: 64,
        ..ModelConfig::preset("tiny").unwrap()
    };
    lossless(&cpu(), &config, None, 128, None);
}

#[test]
fn dflash_is_lossless_on_tiny_moe_cpu() {
    lossless(
        &cpu(),
        &ModelConfig::preset("tiny-moe").unwrap(),
        None,
        64,
        None,
    );
}

#[test]
fn dflash_is_lossless_on_the_gpu() {
    // Random drafts accept about one token per block: a long run.
    let opts = RuntimeOptions {
        host_timeout: std::time::Duration::from_secs(600),
        ..RuntimeOptions::default()
    };
    let Some((_g, rt)) = gpu("dflash_is_lossless_on_the_gpu", opts) else {
        return;
    };
    lossless(&rt, &ModelConfig::preset("tiny").unwrap(), None, 520, None);
    lossless(
        &rt,
        &ModelConfig::preset("qwen3-0.6b").unwrap(),
        None,
        520,
        None,
    );
    let moe = ModelConfig::preset("qwen3-30b-a3b").unwrap();
    lossless(&rt, &moe, Some(Fp4Format::Mxfp4), 520, None);
}

/// A stop token inside an accepted block ends generation right after it; the
/// context's end mid-block stops at the last position; asking for more is an error.
fn edges(ex: &dyn Executor) {
    let mut rng = Rng(seed());
    let config = ModelConfig::preset("tiny").unwrap();
    let model = Model::random(ex, &config, 9).unwrap();
    let p = prompt(&mut rng, config.vocab_size, 17);
    let n = 60;
    let want = greedy(ex, &model, &p, n, p.len() + n);
    let dc = DraftConfig::for_target(&config, 1, 8);
    let draft = DraftModel::random(ex, &dc, 2, &model).unwrap();
    // Injected acceptance makes blocks long, so the stop lands inside one.
    let mut reference = p.clone();
    reference.extend(&want);
    let opts = DflashOptions {
        block_size: None,
        injected: Some(Injected {
            reference,
            tau: 6.0,
        }),
    };
    // The first token comes from the prefill and is never checked as a stop:
    // generation ends at the stop's first place after it.
    let stop = want[30];
    let cut = 1 + want[1..].iter().position(|&t| t == stop).unwrap();
    let mut s = DflashSession::new(ex, &model, &draft, p.len() + n, &opts).unwrap();
    let first = s.prefill(ex, &p).unwrap();
    let got = s.generate(ex, n - 1, Some(stop)).unwrap();
    let mut all = vec![first];
    all.extend(&got);
    assert_eq!(all[..], want[..cut + 1], "{}", ex.describe());
    assert_eq!(s.position(), p.len() + got.len());
    // Continue to the very end of the context: blocks run past it and are clipped.
    let rest = s.generate(ex, n - 1 - got.len(), None).unwrap();
    all.extend(&rest);
    assert_eq!(all, want, "{}", ex.describe());
    assert_eq!(s.position(), p.len() + n - 1);
    let st = s.stats(ex).unwrap();
    assert!(st.mean_acceptance() > 4.0, "{st:?}");
    // One position is left (the last token's); two more do not fit.
    assert!(matches!(
        s.generate(ex, 2, None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.generate(ex, 1, Some(config.vocab_size as u32)),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn dflash_edges_on_the_cpu() {
    edges(&cpu());
}

#[test]
fn dflash_edges_on_the_gpu() {
    if let Some((_g, rt)) = gpu("dflash_edges_on_the_gpu", RuntimeOptions::default()) {
        edges(&rt);
    }
}

/// Injected acceptance produces the chosen mean τ and the same tokens.
#[test]
fn injected_acceptance_hits_tau() {
    let ex = cpu();
    let mut rng = Rng(seed());
    let config = ModelConfig::preset("tiny").unwrap();
    let model = Model::random(&ex, &config, 4).unwrap();
    let p = prompt(&mut rng, config.vocab_size, 5);
    let n = 120;
    let want = greedy(&ex, &model, &p, n, 256);
    let dc = DraftConfig::for_target(&config, 1, 16);
    let draft = DraftModel::random(&ex, &dc, 1, &model).unwrap();
    for tau in [1.0, 3.0, 6.5] {
        let mut reference = p.clone();
        reference.extend(&want);
        let opts = DflashOptions {
            block_size: None,
            injected: Some(Injected { reference, tau }),
        };
        let (got, s) = dflash(&ex, &model, &draft, &p, n, 256, &opts);
        assert_eq!(got, want, "tau {tau}");
        let m = s.stats(&ex).unwrap().mean_acceptance();
        // The last iteration may be clipped to the tokens asked for.
        assert!((m - tau).abs() < 0.15 * tau, "tau {tau}: mean {m}");
    }
}

/// A draft written to disk loads back and drafts as the one drawn in memory;
/// malformed drafts are typed errors.
#[test]
fn draft_checkpoints_round_trip() {
    let ex = cpu();
    let config = ModelConfig::preset("tiny").unwrap();
    let model = Model::random(&ex, &config, 4).unwrap();
    let dc = DraftConfig::for_target(&config, 1, 4);
    let dir = std::env::temp_dir().join(format!("mk-draft-{}", std::process::id()));
    write_random_draft(&dir, &dc, 21).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert_eq!(DraftConfig::from_json(&text).unwrap(), dc);
    let loaded = DraftModel::open(&ex, &dir, &model).unwrap();
    let drawn = DraftModel::random(&ex, &dc, 21, &model).unwrap();
    let p = [3u32, 1, 4, 1, 5, 9, 2, 6];
    let (a, sa) = dflash(&ex, &model, &loaded, &p, 40, 64, &DflashOptions::default());
    let (b, sb) = dflash(&ex, &model, &drawn, &p, 40, 64, &DflashOptions::default());
    assert_eq!(a, b);
    assert_eq!(sa.stats(&ex).unwrap(), sb.stats(&ex).unwrap());
    // Malformed configurations.
    let bad = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        f(&mut v);
        DraftConfig::from_json(&v.to_string())
    };
    assert!(bad(&|v| {
        v.as_object_mut().unwrap().remove("block_size");
    })
    .is_err());
    assert!(bad(&|v| v["dflash_config"]["mask_token_id"] = 100_000.into()).is_err());
    assert!(bad(&|v| v["block_size"] = 17.into()).is_err());
    assert!(bad(&|v| v["dflash_config"]["target_layer_ids"] = "1".into()).is_err());
    // A draft for another target.
    let mut other = dc.clone();
    other.target_layer_ids = vec![7];
    assert!(DraftModel::random(&ex, &other, 1, &model).is_err());
    let mut wide = DraftConfig::for_target(&ModelConfig::preset("qwen3-0.6b").unwrap(), 1, 4);
    wide.layers.vocab_size = config.vocab_size;
    wide.mask_token_id = 1;
    assert!(matches!(
        DraftModel::random(&ex, &wide, 1, &model),
        Err(Error::Load(_))
    ));
    // A missing tensor.
    let st = megakernel::model::SafeTensors::open(&dir.join("model.safetensors")).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .keys()
        .filter(|n| n.as_str() != "hidden_norm.weight")
        .map(|n| {
            let i = &st.tensors()[n];
            (
                n.clone(),
                megakernel::model::TensorDtype::Bf16,
                i.shape.clone(),
                st.bytes(n).unwrap().to_vec(),
            )
        })
        .collect();
    megakernel::model::safetensors::write(&dir.join("model.safetensors"), &kept).unwrap();
    assert!(matches!(
        DraftModel::open(&ex, &dir, &model),
        Err(Error::Load(megakernel::error::LoadError::MissingTensor(_)))
    ));
    std::fs::remove_dir_all(&dir).ok();
}

/// An early-ending command runs exactly the iterations until the accept task
/// stamps the stop word, and the program's epochs stay right for the commands
/// after it (a dependency inside the program would otherwise hang).
#[test]
fn commands_end_early_and_epochs_stay_exact() {
    use megakernel::task::dflash_accept::{state, AcceptIo, DflashAccept};
    use megakernel::task::nop::Nop;
    common::on_every_executor("commands_end_early_and_epochs_stay_exact", |ex| {
        let block = 4;
        let u32s = |n| ex.alloc(DType::U32, n).unwrap();
        let (ids, targets, pos, st, stop, dids, step) = (
            u32s(block),
            u32s(block),
            u32s(1),
            u32s(state::LEN),
            u32s(2),
            u32s(block),
            u32s(1),
        );
        // Every iteration accepts the target's token alone (the first
        // proposal disagrees): one token per iteration.
        ex.write_u32(&ids, &[7, 1, 2, 3]).unwrap();
        ex.write_u32(&targets, &[9, 8, 8, 8]).unwrap();
        let io = AcceptIo {
            ids: &ids.all(),
            targets: &targets.all(),
            pos: &pos.all(),
            state: &st.all(),
            stop: &stop.all(),
            draft_ids: &dids.all(),
            step_ids: &step.all(),
        };
        let mut b = ProgramBuilder::new();
        let ev = b.event("before accept");
        b.push(Nop::task()).signal(ev);
        b.push(DflashAccept::task(&io, block, 1000).unwrap())
            .wait(ev);
        let program = ex.load(&b.build().unwrap()).unwrap();
        let limit = |n: u32| {
            let mut s = ex.read_u32(&st).unwrap();
            s[state::LIMIT] = n;
            s[state::PRODUCED] = 0;
            s[state::STOP_TOKEN] = u32::MAX;
            ex.write_u32(&st, &s).unwrap();
        };
        let mut out = Vec::new();
        for (n, max_iters) in [(3, 10), (2, 2), (5, 40)] {
            limit(n);
            let t = ex.submit_until(&program, max_iters, &[], &stop).unwrap();
            ex.wait(&t, ex.default_timeout()).unwrap();
            let s = ex.read_u32(&st).unwrap();
            assert_eq!(s[state::PRODUCED], n, "{}", ex.describe());
            assert_eq!(s[state::REASON], 1);
            let want = out.len() + n as usize;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while out.len() < want && std::time::Instant::now() < deadline {
                ex.poll_outputs(&mut out).unwrap();
            }
            assert_eq!(out.len(), want, "{}", ex.describe());
        }
        let s = ex.read_u32(&st).unwrap();
        assert_eq!(s[state::ITERS], 10, "{}", ex.describe());
        assert_eq!(ex.read_u32(&pos).unwrap()[0], 10);
        assert!(out.iter().all(|&t| t == 9));
        // A plain command of the same program after the early ends.
        limit(100);
        ex.run(&program, 3, &[]).unwrap();
        assert_eq!(
            ex.read_u32(&st).unwrap()[state::ITERS],
            13,
            "{}",
            ex.describe()
        );
    });
}
