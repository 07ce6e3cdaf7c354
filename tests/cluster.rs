//! Tensor-parallel decode over a cluster of ranks: greedy tokens equal the
//! single-device run (up to near-ties the sharded sums may resolve the other
//! way), collectives compute the right sums, and a rank that faults or never
//! arrives ends every rank's wait with an error naming it.

mod common;

use std::time::{Duration, Instant};

use megakernel::cluster::{AllReduceChain, Cluster, ClusterModel, ClusterOptions, Transport};
use megakernel::model::config::ModelConfig;
use megakernel::model::session::Model;
use megakernel::prelude::*;
use megakernel::quant::Fp4Format;

const PROMPT: [u32; 19] = [
    3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 8,
];
const TOKENS: usize = 24;

/// Greedy tokens of one device and the top-2 logit margin behind each.
fn reference(
    ex: &dyn Executor,
    c: &ModelConfig,
    experts: Option<Fp4Format>,
    seed: u64,
) -> (Vec<u32>, Vec<f32>) {
    let model = Model::random_with(ex, c, seed, experts).unwrap();
    let mut s = model.session(ex, 64).unwrap();
    let margin = |s: &megakernel::model::session::Session| {
        let mut l = s.logits(ex).unwrap();
        l.sort_by(|a, b| b.total_cmp(a));
        l[0] - l[1]
    };
    let mut tokens = vec![s.prefill(ex, &PROMPT).unwrap()];
    let mut margins = vec![margin(&s)];
    while tokens.len() < TOKENS {
        tokens.push(s.generate(ex, 1).unwrap()[0]);
        margins.push(margin(&s));
    }
    (tokens, margins)
}

/// Greedy tokens of the same model over `cluster`.
fn on_cluster(
    cluster: &Cluster,
    c: &ModelConfig,
    experts: Option<Fp4Format>,
    seed: u64,
) -> Vec<u32> {
    let model = ClusterModel::random(cluster, c, seed, experts).unwrap();
    let mut s = model.session(cluster, 64).unwrap();
    let mut tokens = vec![s.prefill(cluster, &PROMPT).unwrap()];
    tokens.extend(s.generate(cluster, TOKENS - 1).unwrap());
    assert_eq!(s.position(), PROMPT.len() + TOKENS - 1);
    tokens
}

/// `got` equals the reference, or first differs where the reference's top two
/// logits were within `tol` (sums split over ranks round differently).
fn check(what: &str, reference: &(Vec<u32>, Vec<f32>), got: &[u32], exact: bool) {
    let (want, margins) = reference;
    if let Some(i) = want.iter().zip(got).position(|(a, b)| a != b) {
        assert!(
            !exact && margins[i] < 0.05,
            "{what}: token {i} is {} instead of {} (top-2 margin {})\n got {got:?}\nwant {want:?}",
            got[i],
            want[i],
            margins[i]
        );
        eprintln!(
            "{what}: first difference at token {i}, margin {}",
            margins[i]
        );
    }
}

fn cpu_opts() -> CpuOptions {
    CpuOptions {
        threads: 2,
        seed: common::seed(),
    }
}

fn cpu_case(preset: &str, experts: Option<Fp4Format>, ranks: &[usize]) {
    cpu_case_of(
        preset,
        &ModelConfig::preset(preset).unwrap(),
        experts,
        ranks,
    );
}

fn cpu_case_of(preset: &str, c: &ModelConfig, experts: Option<Fp4Format>, ranks: &[usize]) {
    let c = c.clone();
    let single = CpuExecutor::new(cpu_opts());
    let want = reference(&single, &c, experts, 11);
    for &n in ranks {
        let cluster = Cluster::cpu(n, cpu_opts()).unwrap();
        assert_eq!(cluster.transport(), Transport::Shared);
        let got = on_cluster(&cluster, &c, experts, 11);
        check(
            &format!("{preset} {experts:?} on {n} CPU ranks"),
            &want,
            &got,
            n == 1,
        );
    }
}

#[test]
fn cpu_tiny_matches_one_device_on_1_2_4_8_ranks() {
    cpu_case("tiny", None, &[1, 2, 4, 8]);
}

#[test]
fn cpu_30b_shaped_matches_one_device_on_1_2_4_8_ranks() {
    cpu_case("qwen3-30b-a3b-mini", None, &[1, 2, 4, 8]);
}

#[test]
fn cpu_30b_shaped_mxfp4_matches_one_device_on_1_2_4_8_ranks() {
    cpu_case("qwen3-30b-a3b-mini", Some(Fp4Format::Mxfp4), &[1, 2, 4, 8]);
}

/// FP4 experts whose even share would not be whole 128-column steps split
/// in such steps, unevenly (640 columns over 4 ranks: 128, 128, 128, 256),
/// and still decode as one device does.
#[test]
fn cpu_fp4_experts_in_uneven_column_steps_match_one_device() {
    let mut c = ModelConfig::preset("qwen3-30b-a3b-mini").unwrap();
    c.moe.as_mut().unwrap().moe_intermediate_size = 640;
    let shares: Vec<_> = (0..4)
        .map(|rank| megakernel::cluster::shard::Shard { rank, ranks: 4 }.expert_range(640, true))
        .collect();
    assert_eq!(shares, [(0, 128), (128, 256), (256, 384), (384, 640)]);
    cpu_case_of(
        "30b-shaped, 640 expert columns",
        &c,
        Some(Fp4Format::Mxfp4),
        &[4],
    );
}

#[test]
fn only_clusters_of_several_ranks_build_collectives() {
    let c = ModelConfig::preset("tiny").unwrap();
    for n in [1, 2] {
        let cluster = Cluster::cpu(n, cpu_opts()).unwrap();
        let model = ClusterModel::random(&cluster, &c, 1, None).unwrap();
        let s = model.session(&cluster, 64).unwrap();
        let p = s.rank(0).step_program();
        let collectives = (0..p.num_tasks() as u32)
            .filter(|&t| p.task_kind(t) == "all_reduce")
            .count();
        if n == 1 {
            assert_eq!(collectives, 0, "one rank has nobody to meet");
        } else {
            // Two sums a layer and the token's gather.
            assert!(
                collectives > 2 * c.num_layers,
                "{collectives} collective tasks"
            );
        }
    }
}

#[test]
fn strided_sum_runs_are_checked() {
    use megakernel::error::ProgramError;
    use megakernel::task::all_reduce::{table_words, AllReduce, Runs};
    let ex = CpuExecutor::new(cpu_opts());
    let ranks = 2;
    let table = ex.alloc(DType::U32, table_words(ranks)).unwrap();
    let (data, out) = (
        ex.alloc(DType::F32, 64).unwrap(),
        ex.alloc(DType::F32, 64).unwrap(),
    );
    let spec = |r: Runs| AllReduce::sum_runs(&table.all(), &data.all(), &out.all(), 1, ranks, r);
    // Four runs of 5 elements, 16 apart: elements 3..8, 19..24, 35..40, 51..56.
    assert!(spec(Runs::strided(3, 5, 4, 16)).is_ok());
    for bad in [
        Runs::strided(3, 5, 4, 4),  // runs overlap
        Runs::strided(3, 5, 4, 20), // the last run ends past the data
        Runs::strided(3, 0, 4, 16), // empty runs
        Runs::strided(3, 5, 0, 16), // no run
    ] {
        assert!(
            matches!(
                spec(bad),
                Err(ProgramError::BadArgs {
                    kind: "all_reduce",
                    ..
                })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn models_that_do_not_split_are_typed_errors() {
    let cluster = Cluster::cpu(3, cpu_opts()).unwrap();
    let c = ModelConfig::preset("tiny").unwrap();
    let e = ClusterModel::random(&cluster, &c, 1, None).err().unwrap();
    assert!(
        matches!(e, Error::InvalidArgument(ref m) if m.contains("3 ranks")),
        "{e}"
    );
    // Each rank's expert share must hold whole FP4 blocks.
    let cluster = Cluster::cpu(4, cpu_opts()).unwrap();
    let c = ModelConfig::preset("tiny-moe").unwrap();
    let e = ClusterModel::random(&cluster, &c, 1, Some(Fp4Format::Mxfp4))
        .err()
        .unwrap();
    assert!(
        matches!(e, Error::InvalidArgument(ref m) if m.contains("multiple of 32")),
        "{e}"
    );
}

/// The chain's output on every rank: `ranks^(sites-1) * Σ_q input_q[row_q]`.
fn check_chain(cluster: &Cluster, chain: &AllReduceChain, rows: &[u32], seed: u64) {
    let n = cluster.ranks();
    let len = chain.len();
    let mut rng = common::Rng(seed);
    let inputs: Vec<Vec<f32>> = (0..n).map(|_| rng.vec(chain.rows() * len)).collect();
    for (r, v) in inputs.iter().enumerate() {
        cluster.rank(r).write_f32(chain.input(r), v).unwrap();
    }
    chain.run(cluster, 1, rows, None).unwrap();
    let scale = (n as f64).powi(chain.sites() as i32 - 1);
    let want: Vec<f64> = (0..len)
        .map(|i| {
            let s: f64 = (0..n)
                .map(|q| f64::from(inputs[q][rows[q] as usize * len + i]))
                .sum();
            s * scale
        })
        .collect();
    let first = cluster.rank(0).read_f32(chain.output(0)).unwrap();
    assert!(common::rel_l2(&first, &want) < 1e-5, "sum is wrong");
    for r in 1..n {
        let got = cluster.rank(r).read_f32(chain.output(r)).unwrap();
        assert_eq!(got, first, "rank {r} differs from rank 0");
    }
}

/// A rank whose task faults, then a rank that never arrives: both end every
/// rank's wait with `RankFailed` naming that rank, well within the timeout.
fn check_failures(make: &dyn Fn() -> Cluster, timeout: Duration) {
    let cluster = make();
    let n = cluster.ranks();
    let chain = AllReduceChain::new(&cluster, 300, 2, 2).unwrap();
    let mut rows = vec![0u32; n];
    rows[n - 1] = 7; // past the input's 2 rows
    let start = Instant::now();
    let e = chain.run(&cluster, 3, &rows, None).expect_err("a fault");
    assert!(
        matches!(e, Error::RankFailed { rank, .. } if rank == n - 1),
        "{e}"
    );
    assert!(start.elapsed() < timeout + Duration::from_secs(20), "{e}");
    drop(chain);
    drop(cluster);

    let cluster = make();
    let chain = AllReduceChain::new(&cluster, 300, 2, 2).unwrap();
    let start = Instant::now();
    let e = chain
        .run(&cluster, 2, &vec![0; n], Some(0))
        .expect_err("a hang");
    match &e {
        Error::RankFailed {
            rank: 0, source, ..
        } => {
            assert!(matches!(**source, Error::DeviceHang { .. }), "{e}")
        }
        _ => panic!("expected rank 0 to be named: {e}"),
    }
    assert!(start.elapsed() < timeout + Duration::from_secs(20), "{e}");
}

#[test]
fn cpu_all_reduce_chain_sums_on_every_rank() {
    for n in [1, 3, 4] {
        let cluster = Cluster::cpu(n, cpu_opts()).unwrap();
        let chain = AllReduceChain::new(&cluster, 1000, 3, 3).unwrap();
        let rows: Vec<u32> = (0..n as u32).map(|r| r % 3).collect();
        check_chain(&cluster, &chain, &rows, 5 + n as u64);
    }
}

#[test]
fn cpu_rank_failures_name_the_rank() {
    let timeout = Duration::from_secs(2);
    check_failures(
        &|| Cluster::cpu_with_timeout(3, cpu_opts(), timeout).unwrap(),
        timeout,
    );
}

fn gpu_opts(timeout: Duration) -> ClusterOptions {
    ClusterOptions {
        runtime: RuntimeOptions {
            wait_timeout: timeout,
            ..RuntimeOptions::default()
        },
        transport: None,
    }
}

#[test]
fn gpu_all_reduce_chain_and_failures_with_ranks_sharing_one_gpu() {
    let Some(_lock) = common::gpus("gpu_all_reduce_chain", 1) else {
        return;
    };
    for n in [1, 2, 4] {
        let start = Instant::now();
        let cluster = Cluster::gpus(&vec![0; n], &gpu_opts(Duration::from_secs(5))).unwrap();
        eprintln!("{n} ranks on GPU 0 started in {:?}", start.elapsed());
        assert_eq!(cluster.transport(), Transport::Peer);
        let chain = AllReduceChain::new(&cluster, 4096, 2, 3).unwrap();
        let rows: Vec<u32> = (0..n as u32).map(|r| r % 2).collect();
        check_chain(&cluster, &chain, &rows, 40 + n as u64);
    }
    // Through mapped host memory instead of device memory.
    let opts = ClusterOptions {
        transport: Some(Transport::HostMapped),
        ..gpu_opts(Duration::from_secs(5))
    };
    let cluster = Cluster::gpus(&[0, 0], &opts).unwrap();
    let chain = AllReduceChain::new(&cluster, 2048, 2, 2).unwrap();
    check_chain(&cluster, &chain, &[1, 0], 77);
    eprintln!("mapped host memory transport checked");
    drop(chain);
    drop(cluster);
    let timeout = Duration::from_secs(2);
    check_failures(
        &|| Cluster::gpus(&[0, 0], &gpu_opts(timeout)).unwrap(),
        timeout,
    );
}

/// Tokens of the GPU single-device run, then of clusters with these devices.
fn gpu_case(test: &str, preset: &str, experts: Option<Fp4Format>, layouts: &[Vec<usize>]) {
    let c = ModelConfig::preset(preset).unwrap();
    let want = {
        let rt = Runtime::new(0).unwrap();
        reference(&rt, &c, experts, 23)
    };
    for devices in layouts {
        let cluster = Cluster::gpus(devices, &ClusterOptions::default()).unwrap();
        let got = on_cluster(&cluster, &c, experts, 23);
        let what = format!("{test}: {preset} on devices {devices:?}");
        check(&what, &want, &got, devices.len() == 1);
    }
}

#[test]
fn gpu_cluster_of_one_equals_the_runtime_and_shared_gpu_ranks_match() {
    let Some(_lock) = common::gpus("gpu_cluster_tokens", 1) else {
        return;
    };
    let layouts = [vec![0], vec![0, 0], vec![0, 0, 0, 0]];
    gpu_case("gpu", "tiny", None, &layouts);
    gpu_case(
        "gpu",
        "qwen3-30b-a3b-mini",
        Some(Fp4Format::Mxfp4),
        &layouts,
    );
}

#[test]
fn several_gpus_match_one() {
    let n = megakernel::cuda::device_count();
    let Some(_lock) = common::gpus("several_gpus_match_one", 2) else {
        return;
    };
    let layouts: Vec<Vec<usize>> = [2, 4, 8]
        .into_iter()
        .filter(|&k| k <= n)
        .map(|k| (0..k).collect())
        .collect();
    gpu_case("gpus", "tiny", None, &layouts);
    gpu_case(
        "gpus",
        "qwen3-30b-a3b-mini",
        Some(Fp4Format::Mxfp4),
        &layouts,
    );
    let timeout = Duration::from_secs(2);
    let all: Vec<usize> = (0..n).collect();
    check_failures(
        &|| Cluster::gpus(&all, &gpu_opts(timeout)).unwrap(),
        timeout,
    );
}

/// DFlash over a cluster equals greedy decoding on the same cluster token for
/// token (and, on one rank, greedy decoding on one device).
#[test]
fn cpu_dflash_on_ranks_equals_greedy_on_ranks() {
    let single = CpuExecutor::new(cpu_opts());
    for ranks in [1, 2, 4] {
        let one = (ranks == 1).then_some(&single as &dyn Executor);
        dflash_case(&Cluster::cpu(ranks, cpu_opts()).unwrap(), one);
    }
}

#[test]
fn gpu_dflash_on_ranks_sharing_one_gpu_equals_greedy_on_them() {
    let Some(_lock) = common::gpus("gpu_dflash_on_ranks", 1) else {
        return;
    };
    for devices in [vec![0], vec![0, 0]] {
        let cluster = Cluster::gpus(&devices, &ClusterOptions::default()).unwrap();
        dflash_case(&cluster, None);
    }
}

/// DFlash with one rank per GPU on every GPU present equals greedy decoding
/// on those GPUs.
#[test]
fn dflash_on_several_gpus_equals_greedy_on_them() {
    let n = megakernel::cuda::device_count();
    let Some(_lock) = common::gpus("dflash_on_several_gpus", 2) else {
        return;
    };
    let all: Vec<usize> = (0..n).collect();
    let cluster = Cluster::gpus(&all, &ClusterOptions::default()).unwrap();
    dflash_case(&cluster, None);
}

/// DFlash on `cluster` against greedy decoding on it, and against greedy
/// decoding on `one_device` when given.
fn dflash_case(cluster: &Cluster, one_device: Option<&dyn Executor>) {
    use megakernel::cluster::ClusterDflashSession;
    use megakernel::dflash::{DflashOptions, DraftConfig, DraftModel};
    let ranks = cluster.ranks();
    let n_tokens = 40;
    for (preset, experts) in [
        ("tiny", None),
        ("qwen3-30b-a3b-mini", Some(Fp4Format::Mxfp4)),
    ] {
        let c = ModelConfig::preset(preset).unwrap();
        let model = ClusterModel::random(cluster, &c, 9, experts).unwrap();
        let mut plain = model.session(cluster, 96).unwrap();
        let mut want = vec![plain.prefill(cluster, &PROMPT).unwrap()];
        want.extend(plain.generate(cluster, n_tokens - 1).unwrap());
        if let Some(ex) = one_device {
            let m = Model::random_with(ex, &c, 9, experts).unwrap();
            let mut s = m.session(ex, 96).unwrap();
            let mut one = vec![s.prefill(ex, &PROMPT).unwrap()];
            one.extend(s.generate(ex, n_tokens - 1).unwrap());
            assert_eq!(one, want, "{preset}: one rank differs from one device");
        }
        for block in [4, 16] {
            let layers = DraftConfig::default_layers(c.num_layers);
            let dc = DraftConfig::for_target(&c, layers, block);
            let drafts: Vec<DraftModel> = (0..ranks)
                .map(|r| DraftModel::random(cluster.rank(r), &dc, 5, model.rank(r)).unwrap())
                .collect();
            let opts = DflashOptions::default();
            let mut s = ClusterDflashSession::new(cluster, &model, &drafts, 96, &opts).unwrap();
            let mut got = vec![s.prefill(cluster, &PROMPT).unwrap()];
            got.extend(s.generate(cluster, n_tokens - 1, None).unwrap());
            assert_eq!(got, want, "{preset} on {ranks} ranks, block {block}");
            assert_eq!(s.position(), PROMPT.len() + n_tokens - 1);
            let st = s.stats(cluster).unwrap();
            assert!(
                st.iterations > 0 && st.iterations < n_tokens as u64,
                "{st:?}"
            );
        }
    }
}

/// One prefill chunk and one DFlash iteration traced on every rank at once: a
/// time for every task of each rank's program, and the sessions go on as
/// untraced ones would; CPU ranks cannot be traced (a typed error).
#[test]
fn traced_chunk_and_dflash_iteration_on_every_rank() {
    use megakernel::cluster::ClusterDflashSession;
    use megakernel::dflash::{DflashOptions, DraftConfig, DraftModel};
    let c = ModelConfig::preset("tiny").unwrap();
    let session = |cluster: &Cluster| {
        let model = ClusterModel::random(cluster, &c, 9, None).unwrap();
        let dc = DraftConfig::for_target(&c, DraftConfig::default_layers(c.num_layers), 4);
        let drafts: Vec<DraftModel> = (0..cluster.ranks())
            .map(|r| DraftModel::random(cluster.rank(r), &dc, 5, model.rank(r)).unwrap())
            .collect();
        let s = ClusterDflashSession::new(cluster, &model, &drafts, 96, &DflashOptions::default());
        (model, s.unwrap())
    };
    let cpu = Cluster::cpu(2, cpu_opts()).unwrap();
    let (model, mut s) = session(&cpu);
    s.prefill(&cpu, &PROMPT).unwrap();
    assert!(matches!(
        s.trace_iteration(&cpu),
        Err(Error::InvalidArgument(_))
    ));
    let mut plain = model.session(&cpu, 96).unwrap();
    let chunk = plain.trace_chunk(&cpu, &PROMPT[..16]);
    assert!(matches!(chunk, Err(Error::InvalidArgument(_))));

    let Some(_lock) = common::gpus("traced_chunk_and_dflash_iteration", 1) else {
        return;
    };
    let opts = ClusterOptions {
        runtime: RuntimeOptions {
            trace: true,
            ..RuntimeOptions::default()
        },
        ..ClusterOptions::default()
    };
    // Every task has a start and an end (a trace never recorded reads as zeros).
    let timed = |t: &megakernel::program::trace::Trace| {
        t.total_ns() > 0
            && t.tasks
                .iter()
                .all(|x| x.start_ns > 0 && x.end_ns >= x.start_ns)
    };
    let cluster = Cluster::gpus(&[0, 0], &opts).unwrap();
    let (model, mut s) = session(&cluster);
    let mut plain = model.session(&cluster, 96).unwrap();
    let mut want = vec![plain.prefill(&cluster, &PROMPT).unwrap()];
    want.extend(plain.generate(&cluster, 39).unwrap());
    // A traced prefill chunk: every task timed on each rank, and the rest of
    // the prompt then gives the same next token.
    let mut chunked = model.session(&cluster, 96).unwrap();
    assert!(matches!(
        chunked.trace_chunk(&cluster, &PROMPT[..15]),
        Err(Error::InvalidArgument(_))
    ));
    let traces = chunked.trace_chunk(&cluster, &PROMPT[..16]).unwrap();
    assert_eq!(traces.len(), 2);
    for (r, t) in traces.iter().enumerate() {
        assert_eq!(t.tasks.len(), chunked.rank(r).chunk_program().num_tasks());
        assert!(timed(t), "chunk, rank {r}");
    }
    assert_eq!(chunked.position(), 16);
    assert_eq!(chunked.prefill(&cluster, &PROMPT[16..]).unwrap(), want[0]);
    let mut got = vec![s.prefill(&cluster, &PROMPT).unwrap()];
    got.extend(s.generate(&cluster, 3, None).unwrap());
    let traces = s.trace_iteration(&cluster).unwrap();
    assert_eq!(traces.len(), 2);
    for (r, t) in traces.iter().enumerate() {
        let tasks = s.iteration_program(r).num_tasks();
        assert_eq!(t.tasks.len(), tasks, "rank {r}");
        assert!(timed(t), "iteration, rank {r}");
    }
    // The traced iteration's tokens were counted; the next ones follow them.
    let done = s.position() - PROMPT.len() + 1;
    assert!(done > got.len(), "the traced iteration produced nothing");
    let next = s.generate(&cluster, 8, None).unwrap();
    assert_eq!(next, want[done..done + 8], "after the traced iteration");
}

/// Injected acceptance (the benchmark mode) over ranks: the mean acceptance
/// length asked for, and the greedy output.
#[test]
fn cpu_injected_acceptance_on_ranks_hits_tau() {
    use megakernel::cluster::ClusterDflashSession;
    use megakernel::dflash::{DflashOptions, DraftConfig, DraftModel, Injected};
    let c = ModelConfig::preset("tiny").unwrap();
    let cluster = Cluster::cpu(2, cpu_opts()).unwrap();
    let model = ClusterModel::random(&cluster, &c, 4, None).unwrap();
    let n = 100;
    let mut plain = model.session(&cluster, 256).unwrap();
    let mut want = vec![plain.prefill(&cluster, &PROMPT).unwrap()];
    want.extend(plain.generate(&cluster, n - 1).unwrap());
    let dc = DraftConfig::for_target(&c, 1, 16);
    let drafts: Vec<DraftModel> = (0..2)
        .map(|r| DraftModel::random(cluster.rank(r), &dc, 1, model.rank(r)).unwrap())
        .collect();
    for tau in [3.0, 6.5] {
        let mut reference = PROMPT.to_vec();
        reference.extend(&want);
        let opts = DflashOptions {
            block_size: None,
            injected: Some(Injected { reference, tau }),
        };
        let mut s = ClusterDflashSession::new(&cluster, &model, &drafts, 256, &opts).unwrap();
        let mut got = vec![s.prefill(&cluster, &PROMPT).unwrap()];
        got.extend(s.generate(&cluster, n - 1, None).unwrap());
        assert_eq!(got, want, "tau {tau}");
        let m = s.stats(&cluster).unwrap().mean_acceptance();
        assert!((m - tau).abs() < 0.15 * tau, "tau {tau}: mean {m}");
    }
}
