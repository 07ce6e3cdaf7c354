//! Several-GPU benchmark: all-reduce latency of hidden-size vectors inside the
//! resident kernels against NCCL in the same run, and tensor-parallel decode
//! tokens/s for each rank count. Needs GPUs; without them it says so and exits.

use std::time::Instant;

use megakernel::cluster::{
    AllReduceChain, Cluster, ClusterDflashSession, ClusterModel, ClusterOptions,
};
use megakernel::dflash::{DflashOptions, DraftConfig, DraftModel, Injected};
use megakernel::model::ModelConfig;
use megakernel::prelude::*;
use megakernel::quant::Fp4Format;

const HELP: &str = "usage: cluster_bench [--ranks N]... [--share] [--preset NAME] [--experts F]
                     [--context N] [--tokens N] [--sizes LIST] [--no-decode]
                     [--dflash TAUS] [--block B] [--layers LIST]
                     [--project-ranks R] [--profile] [--trace-out D]

For each rank count N: the all-reduce latency of vectors of each size (f32
partials summed into the output, what a decode step does twice per layer)
inside the resident kernels, timed over chains of 16 dependent all-reduces per
iteration, median and p99; NCCL's bf16 all-reduce of the same length on the
same GPUs, timed before the resident kernels start (launch + completion, one
at a time); then batch-1 decode of the preset split over the N ranks.

  --ranks N     rank counts (repeatable; default 1 and each power of two up to
                the number of GPUs)
  --share       all ranks on GPU 0, each with its share of the SMs (tests the
                machinery on one GPU; NCCL is skipped)
  --preset NAME model to decode (default qwen3-30b-a3b)
  --experts F   bf16, mxfp4 (default) or nvfp4 routed experts
  --context N   positions before the timed steps (default 1024)
  --tokens N    timed decode steps (default 64)
  --sizes LIST  all-reduce lengths (default 2048,4096,7168)
  --no-decode   all-reduce latency only
  --dflash TAUS also decode with DFlash in INJECTED-ACCEPTANCE mode at each
                mean acceptance length in the list (e.g. 1,5,6.5): a random
                draft (whole on every rank) runs its full computation, then
                its proposals are replaced by the greedy continuation from the
                plain run with the first mismatch placed to give that tau
  --block B     DFlash block size (default 8, as in bench)
  --profile     after the decode timing, trace one 16-row prefill chunk on
                every rank (a fresh session, all ranks submitted together) and
                print each rank's traced time and the first and last ranks'
                stages; with --dflash, likewise one iteration after each timed
                run (rank 0's stages). Every run is then timed on the tracing
                kernel (a few percent slower)
  --trace-out D with --profile, also write each rank's traced chunk and
                iterations to D/<what>-rank<r>.json (Chrome trace format, for
                Perfetto or chrome://tracing)
  --layers LIST decode the preset cut to each of these layer counts (e.g.
                8,24: as many of a large shape's layers as fit); with two or
                more, a straight line through the step times gives the time
                per layer and the rest (embedding, LM head)
  --project-ranks R
                with --layers: print a PROJECTION (not a measurement) of the
                whole preset on R GPUs from that fit: each layer's bytes and
                the LM head's spread over R instead of N ranks at GPU 0's copy
                bandwidth, and all-reduces of 6 us x log2(2R) scaled to the
                latency measured on N ranks (2 ranks 12 us, 4 ranks 18 us
                measured on H100 NVLink follow that line)";

/// Each rank's traced time of one `label` run, the stages of the ranks in
/// `tables`, and with `dir` each rank's trace as `dir/<what>-rank<r>.json`
/// (Chrome trace format).
fn report_traces(
    label: &str,
    what: &str,
    traces: &[megakernel::program::trace::Trace],
    programs: &[&megakernel::program::Program],
    tables: &[usize],
    dir: Option<&std::path::Path>,
) {
    for (r, t) in traces.iter().enumerate() {
        println!(
            "  rank {r}: one traced {label}, {:.1} µs (first task start to last task end)",
            t.total_ns() as f64 / 1e3
        );
    }
    for &r in tables {
        println!("  rank {r}'s stages of the {label}:");
        if let Err(e) = traces[r].write_stage_table(programs[r], &mut std::io::stdout()) {
            eprintln!("  could not print the stages: {e}");
        }
    }
    let Some(dir) = dir else { return };
    for (r, (t, p)) in traces.iter().zip(programs).enumerate() {
        let path = dir.join(format!("{what}-rank{r}.json"));
        let written = std::fs::create_dir_all(dir).and_then(|()| {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
            t.write_chrome_json(p, &mut f)
        });
        match written {
            Ok(()) => println!("  trace written to {}", path.display()),
            Err(e) => eprintln!("  could not write {}: {e}", path.display()),
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// NCCL all-reduce latency (µs, median and p99) of `len` bf16 on devices `0..n`.
fn nccl_latency(n: usize, len: usize) -> std::result::Result<(f64, f64), String> {
    use cudarc::driver::CudaContext;
    use cudarc::nccl::{result, safe::Comm, safe::ReduceOp};
    // SAFETY: only probes whether the library can be loaded.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err("NCCL library not found".into());
    }
    let err = |e: &dyn std::fmt::Debug| format!("{e:?}");
    let streams = (0..n)
        .map(|d| CudaContext::new(d).map(|c| c.default_stream()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    let comms = Comm::from_devices(streams.clone()).map_err(|e| err(&e))?;
    let mut bufs = Vec::new();
    for s in &streams {
        let send = s.alloc_zeros::<half::bf16>(len).map_err(|e| err(&e))?;
        let recv = s.alloc_zeros::<half::bf16>(len).map_err(|e| err(&e))?;
        bufs.push((send, recv));
    }
    let mut once = || -> std::result::Result<f64, String> {
        let t = Instant::now();
        result::group_start().map_err(|e| err(&e))?;
        for (c, (send, recv)) in comms.iter().zip(bufs.iter_mut()) {
            c.all_reduce(send, recv, &ReduceOp::Sum)
                .map_err(|e| err(&e))?;
        }
        result::group_end().map_err(|e| err(&e))?;
        for s in &streams {
            s.synchronize().map_err(|e| err(&e))?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e6)
    };
    for _ in 0..20 {
        once()?;
    }
    let mut v = (0..300)
        .map(|_| once())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((percentile(&mut v, 0.5), percentile(&mut v, 0.99)))
}

/// In-kernel all-reduce latency (µs per all-reduce, median and p99 of samples).
fn kernel_latency(cluster: &Cluster, len: usize) -> Result<(f64, f64)> {
    const SITES: usize = 16;
    const ITERS: u32 = 4;
    let chain = AllReduceChain::new(cluster, len, 1, SITES)?;
    let rows = vec![0; cluster.ranks()];
    for _ in 0..5 {
        chain.run(cluster, ITERS, &rows, None)?;
    }
    let mut v = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        chain.run(cluster, ITERS, &rows, None)?;
        v.push(t.elapsed().as_secs_f64() * 1e6 / (f64::from(ITERS) * SITES as f64));
    }
    Ok((percentile(&mut v, 0.5), percentile(&mut v, 0.99)))
}

fn main() -> Result<()> {
    let (mut ranks, mut share, mut decode) = (Vec::<usize>::new(), false, true);
    let (mut preset, mut experts) = ("qwen3-30b-a3b".to_string(), Some(Fp4Format::Mxfp4));
    let (mut context, mut tokens) = (1024usize, 64usize);
    let mut sizes = vec![2048usize, 4096, 7168];
    let (mut taus, mut block) = (Vec::<f64>::new(), 8usize);
    let (mut layer_counts, mut project) = (Vec::<usize>::new(), None::<usize>);
    let mut profile = false;
    let mut trace_out: Option<std::path::PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next().unwrap_or_else(|| {
                eprintln!("{a} needs a value\n\n{HELP}");
                std::process::exit(2)
            })
        };
        let num = |v: String| -> usize {
            v.parse().unwrap_or_else(|_| {
                eprintln!("'{v}' is not a number\n\n{HELP}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--ranks" => ranks.push(num(val())),
            "--share" => share = true,
            "--no-decode" => decode = false,
            "--preset" => preset = val(),
            "--experts" => {
                experts = match val().as_str() {
                    "bf16" => None,
                    f => Some(Fp4Format::parse(f).unwrap_or_else(|| {
                        eprintln!("unknown expert format '{f}'\n\n{HELP}");
                        std::process::exit(2)
                    })),
                }
            }
            "--context" => context = num(val()),
            "--tokens" => tokens = num(val()),
            "--sizes" => sizes = val().split(',').map(|s| num(s.to_string())).collect(),
            "--block" => block = num(val()),
            "--layers" => layer_counts = val().split(',').map(|s| num(s.to_string())).collect(),
            "--project-ranks" => project = Some(num(val())),
            "--profile" => profile = true,
            "--trace-out" => trace_out = Some(val().into()),
            "--dflash" => {
                taus = val()
                    .split(',')
                    .map(|t| {
                        t.parse().unwrap_or_else(|_| {
                            eprintln!("--dflash needs numbers, not '{t}'\n\n{HELP}");
                            std::process::exit(2)
                        })
                    })
                    .collect()
            }
            "--help" | "-h" => {
                println!("{HELP}");
                return Ok(());
            }
            _ => {
                eprintln!("unknown argument '{a}'\n\n{HELP}");
                std::process::exit(2)
            }
        }
    }
    let gpus = megakernel::cuda::device_count();
    if gpus == 0 {
        println!("cluster_bench needs a GPU; none found");
        if std::env::var("MK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            std::process::exit(1);
        }
        return Ok(());
    }
    if ranks.is_empty() {
        ranks = std::iter::successors(Some(1), |n| Some(n * 2))
            .take_while(|&n| n <= gpus.max(if share { 4 } else { 1 }))
            .collect();
    }
    let config = ModelConfig::preset(&preset)
        .ok_or_else(|| Error::InvalidArgument(format!("unknown preset '{preset}'")))?;
    let copy = megakernel::cuda::probe::copy_bandwidth(0, 1 << 30, 20)?;
    println!(
        "device 0 copy bandwidth (read + write): {:.3} TB/s",
        copy / 1e12
    );
    for &n in &ranks {
        if !share && n > gpus {
            println!("{n} ranks: only {gpus} GPUs, skipped");
            continue;
        }
        let nccl: Vec<_> = sizes
            .iter()
            .map(|&len| {
                if share {
                    Err("ranks share one GPU".to_string())
                } else {
                    nccl_latency(n, len)
                }
            })
            .collect();
        let devices: Vec<usize> = (0..n).map(|r| if share { 0 } else { r }).collect();
        let opts = ClusterOptions {
            runtime: RuntimeOptions {
                trace: profile,
                ..RuntimeOptions::default()
            },
            ..ClusterOptions::default()
        };
        let cluster = Cluster::gpus(&devices, &opts)?;
        println!("{}", cluster.describe());
        if profile {
            println!(
                "{n} ranks: timed on the tracing kernel (a few percent slower than the plain one)"
            );
        }
        let mut hidden_latency = None;
        for (&len, nccl) in sizes.iter().zip(&nccl) {
            let (med, p99) = kernel_latency(&cluster, len)?;
            if len == config.hidden_size {
                hidden_latency = Some(med);
            }
            let (peer, ratio) = match nccl {
                Ok((m, p)) => (
                    format!("NCCL bf16 median {m:.2} us, p99 {p:.2} us"),
                    format!("{:.2}", m / med),
                ),
                Err(e) => (format!("NCCL: {e}"), "null".into()),
            };
            println!(
                "all-reduce {len} values over {n} ranks ({:?}): in-kernel median {med:.2} us, p99 {p99:.2} us; {peer}; NCCL/in-kernel {ratio}",
                cluster.transport()
            );
            println!(
                "{{\"bench\": \"all_reduce\", \"ranks\": {n}, \"len\": {len}, \"transport\": \"{:?}\", \"median_us\": {med:.3}, \"p99_us\": {p99:.3}, \"nccl_median_us\": {}, \"nccl_p99_us\": {}}}",
                cluster.transport(),
                nccl.as_ref().map_or("null".into(), |x| format!("{:.3}", x.0)),
                nccl.as_ref().map_or("null".into(), |x| format!("{:.3}", x.1)),
            );
        }
        if !decode {
            continue;
        }
        let full = config.num_layers;
        let counts = if layer_counts.is_empty() {
            vec![full]
        } else {
            layer_counts.clone()
        };
        let mut points = Vec::new();
        for &layers in &counts {
            if layers == 0 || layers > full {
                return Err(Error::InvalidArgument(format!(
                    "--layers {layers}: {preset} has {full}"
                )));
            }
            let c = ModelConfig {
                num_layers: layers,
                ..config.clone()
            };
            let label = if layers == full {
                preset.clone()
            } else {
                format!("{preset} ({layers} of {full} layers)")
            };
            let run = Decode {
                preset: &preset,
                cluster: &cluster,
                config: &c,
                label: &label,
                experts,
                context,
                tokens,
                copy,
                share,
                hidden_latency,
                profile,
                trace_out: trace_out.as_deref(),
            };
            points.push(run.go(&taus, block)?);
        }
        if points.len() >= 2 {
            let at = Fit {
                preset: &preset,
                config: &config,
                experts,
                context: context + tokens / 2,
                copy,
                latency_us: hidden_latency,
            };
            at.go(&points, project, n);
        }
    }
    Ok(())
}

/// What one decode run measured.
struct Point {
    layers: usize,
    /// Seconds per plain decode step.
    per_token: f64,
    /// (tau asked, tau measured, seconds per DFlash iteration).
    iterations: Vec<(f64, f64, f64)>,
}

/// Least-squares line through (x, y): (slope, intercept).
fn line(xy: &[(f64, f64)]) -> (f64, f64) {
    let n = xy.len() as f64;
    let (sx, sy) = xy.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let (mx, my) = (sx / n, sy / n);
    let sxy: f64 = xy.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = xy.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let slope = sxy / sxx;
    (slope, my - slope * mx)
}

/// A preset's runs with several layer counts, to be fitted.
struct Fit<'a> {
    preset: &'a str,
    config: &'a ModelConfig,
    experts: Option<Fp4Format>,
    /// Mean context of the timed steps.
    context: usize,
    /// GPU 0's copy bandwidth, bytes/s.
    copy: f64,
    /// Measured all-reduce latency of a hidden-size vector on these ranks.
    latency_us: Option<f64>,
}

impl Fit<'_> {
    /// Time per layer and the rest from runs with several layer counts on `n`
    /// ranks, and, with `project`, the whole preset on that many GPUs.
    fn go(&self, points: &[Point], project: Option<usize>, n: usize) {
        let (config, copy) = (self.config, self.copy);
        let bytes = |layers: usize| {
            let c = ModelConfig {
                num_layers: layers,
                ..config.clone()
            };
            c.decode_bytes_with(self.context, self.experts) as f64
        };
        let full = config.num_layers;
        // Whole-model bytes of one layer, and of the rest (embedding row, LM head).
        let layer_bytes = bytes(2) - bytes(1);
        let rest_bytes = bytes(1) - layer_bytes;
        let xy: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.layers as f64, p.per_token))
            .collect();
        let (per_layer, rest) = line(&xy);
        // All-reduce latency on k ranks: 6 us x log2(2k), scaled to the measured one.
        let ar_line = |k: usize| 6e-6 * (2.0 * k as f64).log2();
        let ar_n = self.latency_us.map_or(ar_line(n), |l| l * 1e-6);
        let stream = |k: usize| layer_bytes / k as f64 / copy;
        let fixed = per_layer - stream(n) - 2.0 * ar_n;
        let layers: Vec<usize> = points.iter().map(|p| p.layers).collect();
        println!(
            "{} over {n} ranks, fit over {layers:?} layers: {:.1} us per layer ({:.1} MB per rank: {:.1} us at copy \
             bandwidth; 2 all-reduces {:.1} us; the rest of a layer {:.1} us), {:.3} ms per step besides the layers",
            self.preset,
            per_layer * 1e6,
            layer_bytes / n as f64 / 1e6,
            stream(n) * 1e6,
            2e6 * ar_n,
            fixed * 1e6,
            rest * 1e3,
        );
        let Some(r) = project else { return };
        let ar_r = ar_n * ar_line(r) / ar_line(n);
        let layer_r = fixed + stream(r) + 2.0 * ar_r;
        let rest_r = rest - rest_bytes / n as f64 / copy + rest_bytes / r as f64 / copy;
        let step = rest_r + full as f64 * layer_r;
        let floor = bytes(full) / r as f64 / copy;
        println!(
            "PROJECTION (not a measurement): {} with all {full} layers on {r} GPUs: {:.3} ms/token, {:.0} tokens/s \
             ({:.1} us per layer with all-reduces of {:.1} us; floor {:.3} ms at GPU 0's copy bandwidth: {:.1} % of it)",
            self.preset,
            step * 1e3,
            1.0 / step,
            layer_r * 1e6,
            ar_r * 1e6,
            floor * 1e3,
            100.0 * floor / step,
        );
        println!(
            "{{\"bench\": \"projection\", \"ranks_measured\": {n}, \"ranks\": {r}, \"layers\": {full}, \
             \"ms_per_token\": {:.4}, \"tokens_per_s\": {:.2}, \"us_per_layer\": {:.2}, \"all_reduce_us\": {:.2}, \
             \"floor_ms\": {:.4}}}",
            step * 1e3,
            1.0 / step,
            layer_r * 1e6,
            ar_r * 1e6,
            floor * 1e3,
        );
        // DFlash: each iteration's line, its per-layer part scaled as a plain
        // step's per-layer part is (an assumption: the verify block's extra
        // experts scale with the ranks like the plain step's bytes).
        for (k, &(tau, measured, _)) in points[0].iterations.iter().enumerate() {
            let xy: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.layers as f64, p.iterations[k].2))
                .collect();
            let (a, b) = line(&xy);
            let iteration = b * rest_r / rest + full as f64 * a * layer_r / per_layer;
            println!(
                "PROJECTION (not a measurement): {} dflash INJECTED tau {tau} (measured {measured:.2}) with all \
                 {full} layers on {r} GPUs: {:.3} ms per iteration ({:.1} us per layer measured on {n} ranks), \
                 {:.0} tokens/s",
                self.preset,
                iteration * 1e3,
                a * 1e6,
                measured / iteration,
            );
        }
    }
}

/// One plain decode run (and its DFlash runs) of a model on a cluster.
struct Decode<'a> {
    preset: &'a str,
    cluster: &'a Cluster,
    config: &'a ModelConfig,
    label: &'a str,
    experts: Option<Fp4Format>,
    context: usize,
    tokens: usize,
    copy: f64,
    share: bool,
    hidden_latency: Option<f64>,
    profile: bool,
    trace_out: Option<&'a std::path::Path>,
}

impl Decode<'_> {
    fn go(&self, taus: &[f64], block: usize) -> Result<Point> {
        let (cluster, config, label, context, tokens) = (
            self.cluster,
            self.config,
            self.label,
            self.context,
            self.tokens,
        );
        let n = cluster.ranks();
        let dtype = self.experts.map_or("bf16", |f| f.name());
        eprintln!("{label} {dtype} over {n} ranks: drawing random weights");
        let t = Instant::now();
        let model = ClusterModel::random(cluster, config, 7, self.experts)?;
        let mut s = model.session(cluster, context + tokens + 8)?;
        let load = t.elapsed().as_secs_f64();
        let prompt: Vec<u32> = (0..context)
            .map(|i| ((i * 7919) % config.vocab_size) as u32)
            .collect();
        let t = Instant::now();
        let next = s.prefill(cluster, &prompt)?;
        let prefill = t.elapsed().as_secs_f64();
        let mut first = vec![next];
        first.extend(s.generate(cluster, 4)?);
        let t = Instant::now();
        let generated = s.generate(cluster, tokens)?;
        let per_token = t.elapsed().as_secs_f64() / tokens as f64;
        drop(s);
        if self.profile && prompt.len() >= 16 {
            // One prefill chunk traced on every rank, in a fresh session.
            let mut p = model.session(cluster, context + tokens + 8)?;
            let traces = p.trace_chunk(cluster, &prompt[..16])?;
            let programs: Vec<_> = (0..n).map(|r| p.rank(r).chunk_program()).collect();
            let tables = if n > 1 { vec![0, n - 1] } else { vec![0] };
            report_traces(
                "16-row prefill chunk",
                &format!("chunk-{n}-ranks"),
                &traces,
                &programs,
                &tables,
                self.trace_out,
            );
        }
        // Each rank reads about 1/n of a step's bytes (replicated norms and router aside).
        let bytes = config.decode_bytes_with(context + tokens / 2, self.experts) as f64 / n as f64;
        let roofline = bytes / per_token / self.copy;
        // Two all-reduces a layer and the token's gather; one rank has none.
        let reduces = if n > 1 { 2 * config.num_layers + 1 } else { 0 };
        let share_ar = self
            .hidden_latency
            .map(|l| reduces as f64 * l * 1e-6 / per_token);
        println!(
            "{label} {dtype} over {n} ranks: {:.3} ms/token, {:.1} tokens/s at context {context}; {:.2} GB/step per rank; \
             {:.1} % of one GPU's copy bandwidth per rank; all-reduces (estimated from the median) {}; prefill {:.0} tokens/s; load {load:.1} s",
            per_token * 1e3,
            1.0 / per_token,
            bytes / 1e9,
            roofline * 100.0,
            share_ar.map_or("n/a".into(), |s| format!("{:.1} % of a step", s * 100.0)),
            context as f64 / prefill,
        );
        println!(
            "{{\"bench\": \"decode\", \"preset\": \"{}\", \"layers\": {}, \"dtype\": \"{dtype}\", \"ranks\": {n}, \"shared_gpu\": {}, \
             \"context\": {context}, \"ms_per_token\": {:.4}, \"tokens_per_s\": {:.2}, \"bytes_per_rank_step\": {bytes:.0}, \
             \"roofline_per_rank\": {roofline:.4}, \"all_reduce_share\": {}}}",
            self.preset,
            config.num_layers,
            self.share,
            per_token * 1e3,
            1.0 / per_token,
            share_ar.map_or("null".into(), |s| format!("{s:.4}")),
        );
        let mut iterations = Vec::new();
        if !taus.is_empty() {
            let mut reference = prompt.clone();
            reference.extend(first.iter().chain(&generated));
            let run = DflashRun {
                model: &model,
                prompt: &prompt,
                reference,
                tokens,
                block,
                plain: per_token,
                profile: self.profile,
                trace_out: self.trace_out,
            };
            iterations = run.go(cluster, taus, &format!("{label} {dtype} over {n} ranks"))?;
        }
        Ok(Point {
            layers: config.num_layers,
            per_token,
            iterations,
        })
    }
}

/// DFlash runs at injected acceptance lengths next to the plain run.
struct DflashRun<'a> {
    model: &'a ClusterModel,
    prompt: &'a [u32],
    /// The prompt, then the plain run's greedy continuation.
    reference: Vec<u32>,
    tokens: usize,
    block: usize,
    plain: f64,
    profile: bool,
    trace_out: Option<&'a std::path::Path>,
}

impl DflashRun<'_> {
    /// Runs at each tau; returns (tau, measured tau, seconds per iteration).
    fn go(&self, cluster: &Cluster, taus: &[f64], what: &str) -> Result<Vec<(f64, f64, f64)>> {
        let mut out = Vec::new();
        let c = self.model.config();
        let dc = DraftConfig::for_target(c, DraftConfig::default_layers(c.num_layers), self.block);
        let drafts = (0..cluster.ranks())
            .map(|r| DraftModel::random(cluster.rank(r), &dc, 11, self.model.rank(r)))
            .collect::<Result<Vec<_>>>()?;
        for &tau in taus {
            let opts = DflashOptions {
                block_size: Some(self.block),
                injected: Some(Injected {
                    reference: self.reference.clone(),
                    tau,
                }),
            };
            let max_seq = self.reference.len() + self.block + 8;
            let mut s = ClusterDflashSession::new(cluster, self.model, &drafts, max_seq, &opts)?;
            s.prefill(cluster, self.prompt)?;
            let want = &self.reference[self.prompt.len() + 1..];
            // The first token came from the prefill; 4 warm-up tokens, then the timed ones.
            let warm = s.generate(cluster, 4, None)?;
            let before = s.stats(cluster)?.iterations;
            s.reset_expert_use(cluster)?;
            let t = Instant::now();
            let got = s.generate(cluster, self.tokens, None)?;
            let secs = t.elapsed().as_secs_f64();
            let per_token = secs / self.tokens as f64;
            let experts = s
                .expert_use(cluster)?
                .iter()
                .find(|u| u.rows == self.block)
                .map(|u| u.mean());
            let same = warm
                .iter()
                .chain(&got)
                .eq(want.iter().take(4 + self.tokens));
            let st = s.stats(cluster)?;
            let iters = (st.iterations - before).max(1);
            let per_iteration = secs / iters as f64;
            println!(
                "{what} dflash tau {tau} (INJECTED acceptance, block {}): {:.1} tokens/s, {:.2}x plain; measured tau {:.2}; \
                 {:.3} ms per iteration; {} unique experts per MoE layer per verify block; output equals greedy: {same}",
                self.block,
                1.0 / per_token,
                self.plain / per_token,
                st.mean_acceptance(),
                per_iteration * 1e3,
                experts.map_or("no".into(), |e| format!("{e:.1}")),
            );
            println!(
                "{{\"bench\": \"dflash\", \"injected\": true, \"ranks\": {}, \"tau\": {tau}, \"block\": {}, \"tokens_per_s\": {:.2}, \
                 \"ratio_to_plain\": {:.3}, \"measured_tau\": {:.3}, \"ms_per_iteration\": {:.4}, \"verify_unique_experts\": {}, \"equals_greedy\": {same}}}",
                cluster.ranks(),
                self.block,
                1.0 / per_token,
                self.plain / per_token,
                st.mean_acceptance(),
                per_iteration * 1e3,
                experts.map_or("null".into(), |e| format!("{e:.2}")),
            );
            out.push((tau, self.tokens as f64 / iters as f64, per_iteration));
            if self.profile {
                // A fresh session at the timed run's start, one traced iteration.
                drop(s);
                let mut p =
                    ClusterDflashSession::new(cluster, self.model, &drafts, max_seq, &opts)?;
                p.prefill(cluster, self.prompt)?;
                p.generate(cluster, 4, None)?;
                let traces = p.trace_iteration(cluster)?;
                let programs: Vec<_> = (0..traces.len()).map(|r| p.iteration_program(r)).collect();
                report_traces(
                    &format!("iteration (tau {tau})"),
                    &format!("dflash-tau{tau}-{}-ranks", traces.len()),
                    &traces,
                    &programs,
                    &[0],
                    self.trace_out,
                );
            }
        }
        Ok(out)
    }
}
