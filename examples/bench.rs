//! Batch-1 decode benchmark: tokens/s at a given context for a preset with
//! random weights generated straight into GPU memory, the bytes each step must
//! read, and the device's copy bandwidth measured in the same run (roofline %).
//! Prints a table line and one JSON line per run. Needs a GPU.

use std::time::Instant;

use megakernel::dflash::{DflashOptions, DflashSession, DraftConfig, DraftModel, Injected};
use megakernel::model::{ExpertUse, Model, ModelConfig};
use megakernel::prelude::*;
use megakernel::quant::Fp4Format;

const HELP: &str = "usage: bench [--preset NAME]... [--context N] [--tokens N]

For each preset (default qwen3-0.6b): random weights straight into GPU memory,
a prompt of N-context random tokens (chunked prefill, reported as prompt
tokens/s), then N-tokens greedy decode steps in one command. Reports ms/token,
tokens/s, the bytes a step reads at the mean context, the device copy bandwidth
measured first in the same run, and the ratio (roofline %); then the time of a
16-row verify step (the prefill chunk program) next to one decode step.

  --preset NAME   tiny, tiny-moe, qwen3-0.6b, qwen3-8b, qwen3-30b-a3b (repeatable)
  --context N     positions before the timed steps (default 1024)
  --tokens N      timed decode steps (default 64)
  --max-context N open every session with room for N positions (default: the
                  context, the timed tokens and some slack; attention splits
                  a session's keys by its maximum, so this times the programs
                  of a session opened for long prompts at a short context)
  --config-out D  write D/NAME/config.json for each preset (for the PyTorch
                  peer, scripts/torch_decode_bench.py --random) and exit
  --experts F     routed experts as bf16 (default), mxfp4 or nvfp4 (repeatable:
                  each preset runs once per format; bf16 for dense presets)
  --expert-stream also time the FP4 expert task alone streaming every expert
                  of one qwen3-30b-a3b layer (gate, up and down of 128 experts,
                  one token), for each FP4 format, against the copy bandwidth
  --profile       after timing, trace one more step and print where its time
                  went, stage by stage (device timestamps of every task); the
                  whole run then uses the tracing kernel, a few percent slower:
                  compare speeds from runs without it
  --trace-out D   with --profile, also write each traced step to
                  D/PRESET-DTYPE-{decode,verify16,dflash}.json in the Chrome
                  trace event format (one track per SM; open in Perfetto)
  --dflash TAUS   also decode with DFlash in INJECTED-ACCEPTANCE mode at each
                  mean acceptance length in the comma-separated list (e.g.
                  1,3,5,6.5,8): a random draft runs its full computation, then
                  its proposals are replaced by the greedy continuation with
                  the first mismatch placed to give that tau; tokens/s next to
                  plain decode from the same run (with --profile: draft,
                  verify, context and accept time of one traced iteration)
  --block B       DFlash block size (default 8: on one H100 8-row blocks gave
                  more tokens/s than 16-row ones at every tau measured)
  --shared-kb N   give each resident block at most N KiB of dynamic shared
                  memory (default 98, the crate default); the rest of the
                  SM's memory serves as L1 cache, which holds register spills";

fn main() -> Result<()> {
    let mut presets = Vec::new();
    let (mut context, mut tokens, mut profile) = (1024usize, 64usize, false);
    let mut max_context = 0usize;
    let mut config_out: Option<String> = None;
    let mut expert_stream = false;
    let mut formats: Vec<Option<Fp4Format>> = Vec::new();
    let (mut taus, mut block) = (Vec::<f64>::new(), 8usize);
    let mut shared_kb: Option<u32> = None;
    let mut trace_out: Option<std::path::PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |f: &str| -> usize {
            it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{f} needs a number\n\n{HELP}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--preset" => presets.push(it.next().unwrap_or_default()),
            "--context" => context = num("--context"),
            "--tokens" => tokens = num("--tokens"),
            "--max-context" => max_context = num("--max-context"),
            "--profile" => profile = true,
            "--trace-out" => trace_out = it.next().map(Into::into),
            "--expert-stream" => expert_stream = true,
            "--config-out" => config_out = it.next(),
            "--block" => block = num("--block"),
            "--shared-kb" => shared_kb = Some(num("--shared-kb") as u32),
            "--dflash" => {
                let v = it.next().unwrap_or_default();
                taus = v
                    .split(',')
                    .map(|t| t.trim().parse::<f64>())
                    .collect::<std::result::Result<_, _>>()
                    .unwrap_or_else(|_| {
                        eprintln!("--dflash needs a list of numbers, not '{v}'\n\n{HELP}");
                        std::process::exit(2)
                    });
            }
            "--experts" => {
                let v = it.next().unwrap_or_default();
                formats.push(match v.as_str() {
                    "bf16" => None,
                    f => Some(Fp4Format::parse(f).unwrap_or_else(|| {
                        eprintln!("--experts: bf16, mxfp4 or nvfp4, not '{f}'\n\n{HELP}");
                        std::process::exit(2)
                    })),
                });
            }
            _ => {
                println!("{HELP}");
                std::process::exit(if a == "--help" { 0 } else { 2 });
            }
        }
    }
    if presets.is_empty() {
        presets.push("qwen3-0.6b".into());
    }
    if let Some(dir) = config_out {
        for name in &presets {
            let config = ModelConfig::preset(name)
                .ok_or_else(|| Error::InvalidArgument(format!("unknown preset '{name}'")))?;
            let d = std::path::Path::new(&dir).join(name);
            std::fs::create_dir_all(&d)
                .and_then(|_| std::fs::write(d.join("config.json"), config.to_json()))
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", d.display())))?;
            println!("wrote {}", d.join("config.json").display());
        }
        return Ok(());
    }
    if megakernel::cuda::device_count() == 0 {
        println!("bench needs a GPU; none found");
        if std::env::var("MK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            std::process::exit(1);
        }
        return Ok(());
    }
    let copy = megakernel::cuda::probe::copy_bandwidth(0, 1 << 30, 20)?;
    println!(
        "device copy bandwidth (read + write): {:.3} TB/s",
        copy / 1e12
    );
    if expert_stream {
        for format in [Fp4Format::Mxfp4, Fp4Format::Nvfp4] {
            stream_experts(format, copy)?;
        }
    }
    if formats.is_empty() {
        formats.push(None);
    }
    let runs: Vec<(String, Option<Fp4Format>)> = presets
        .iter()
        .flat_map(|p| formats.iter().map(move |f| (p.clone(), *f)))
        .collect();
    for (name, experts) in runs {
        let config = ModelConfig::preset(&name)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown preset '{name}'")))?;
        if experts.is_some() && config.moe.is_none() {
            continue;
        }
        let dtype = experts.map_or("bf16", |f| f.name());
        let rt = Runtime::with_options(
            0,
            RuntimeOptions {
                trace: profile,
                shared_limit: shared_kb.map(|k| k * 1024),
                ..RuntimeOptions::default()
            },
        )?;
        println!(
            "{name}: {} KiB of shared memory per block",
            rt.shared_bytes() / 1024
        );
        if profile {
            println!(
                "{name}: timed on the tracing kernel (a few percent slower than the plain one)"
            );
        }
        let t = Instant::now();
        eprintln!("{name}: drawing random weights on the device");
        let model = Model::random_with(&rt, &config, 7, experts)?;
        let mut d = model.session(&rt, (context + tokens + 34).max(max_context))?;
        let load = t.elapsed().as_secs_f64();
        let prompt: Vec<u32> = (0..context)
            .map(|i| ((i * 7919) % config.vocab_size) as u32)
            .collect();
        eprintln!("{name}: prefill of {context} tokens");
        let t = Instant::now();
        let first = d.prefill(&rt, &prompt)?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let generated = d.generate(&rt, tokens)?;
        let per_token = t.elapsed().as_secs_f64() / tokens as f64;
        // A 16-row block through the chunk program (a speculative verify step),
        // then the context cut back: its cost next to one decode step.
        let (base, last) = (d.position(), generated.last().copied().unwrap_or(0));
        let chunk: Vec<u32> = (0..16)
            .map(|i| ((i * 31 + 7) % config.vocab_size) as u32)
            .collect();
        let mut verify = f64::INFINITY;
        d.reset_expert_use(&rt)?;
        for _ in 0..4 {
            let t = Instant::now();
            d.prefill(&rt, &chunk)?;
            verify = verify.min(t.elapsed().as_secs_f64());
            d.truncate(&rt, base, last)?;
        }
        let verify_experts = mean_experts(&d.expert_use(&rt)?, 16);
        let bytes = config.decode_bytes_with(context + tokens / 2, experts) as f64;
        let roofline = bytes / per_token / copy;
        println!(
            "{name} {dtype}: {:.3} ms/token, {:.1} tokens/s at context {context}; {:.2} GB/step; {:.1} % of copy bandwidth; \
             prefill {:.0} tokens/s; load {load:.1} s; a 16-row verify step {:.3} ms ({:.1} decode steps{})",
            per_token * 1e3,
            1.0 / per_token,
            bytes / 1e9,
            roofline * 100.0,
            context as f64 / prefill,
            verify * 1e3,
            verify / per_token,
            verify_experts.map_or(String::new(), |e| format!(
                ", {e:.1} unique experts per MoE layer"
            )),
        );
        println!(
            "{{\"preset\": \"{name}\", \"dtype\": \"{dtype}\", \"context\": {context}, \"ms_per_token\": {:.4}, \"tokens_per_s\": {:.2}, \
             \"bytes_per_step\": {bytes:.0}, \"copy_bandwidth\": {copy:.4e}, \"roofline\": {roofline:.4}, \"prefill_tokens_per_s\": {:.1}, \
             \"verify16_ms\": {:.4}, \"verify16_unique_experts\": {}, \"device\": \"{}\"}}",
            per_token * 1e3,
            1.0 / per_token,
            context as f64 / prefill,
            verify * 1e3,
            verify_experts.map_or("null".into(), |e| format!("{e:.2}")),
            rt.describe()
        );
        if !taus.is_empty() {
            let mut reference = prompt.clone();
            reference.push(first);
            reference.extend(&generated);
            let run = DflashRun {
                name: &name,
                dtype,
                model: &model,
                prompt: &prompt,
                reference,
                tokens,
                block,
                max_context,
                plain: per_token,
                profile,
                trace_out: trace_out.as_deref(),
            };
            drop(d);
            run.go(&rt, &taus)?;
            continue;
        }
        if profile {
            let out = |what: &str| {
                trace_out
                    .as_ref()
                    .map(|d| d.join(format!("{name}-{dtype}-{what}.json")))
            };
            print_profile(&d.trace_step(&rt)?, d.step_program(), out("decode"));
            let chunk: Vec<u32> = (0..16)
                .map(|i| ((i * 17 + 3) % config.vocab_size) as u32)
                .collect();
            println!("  a 16-row chunk (verify block):");
            print_profile(
                &d.trace_chunk(&rt, &chunk)?,
                d.chunk_program(),
                out("verify16"),
            );
        }
    }
    Ok(())
}

/// One qwen3-30b-a3b MoE layer's experts (128 × gate, up [768, 2048] and down
/// [2048, 768]) in `format`, streamed by the FP4 expert task for one token,
/// every expert chosen: bytes read per second against the copy bandwidth.
fn stream_experts(format: Fp4Format, copy: f64) -> Result<()> {
    use megakernel::task::gemv_expert_fp4::{Fp4Experts, GemvExpertFp4};
    let (n, inter, h) = (128usize, 768usize, 2048usize);
    let rt = Runtime::new(0)?;
    let mats = |rows: usize, cols: usize| -> Vec<Vec<f32>> {
        (0..n)
            .map(|e| {
                megakernel::model::checkpoint::tensor_values_serial(
                    &ModelConfig::preset("qwen3-30b-a3b").expect("preset"),
                    e as u64,
                    "model.layers.0.mlp.experts.0.gate_proj.weight",
                    &[rows, cols],
                )
            })
            .collect()
    };
    let gate = Fp4Experts::upload(&rt, format, inter, h, &mats(inter, h))?;
    let up = Fp4Experts::upload(&rt, format, inter, h, &mats(inter, h))?;
    let down = Fp4Experts::upload(&rt, format, h, inter, &mats(h, inter))?;
    let x = rt.alloc(DType::Bf16, h.max(inter) * n)?;
    rt.write_f32(&x, &vec![0.01; h.max(inter) * n])?;
    let (yg, yu) = (
        rt.alloc(DType::Bf16, n * inter)?,
        rt.alloc(DType::Bf16, n * inter)?,
    );
    let yd = rt.alloc(DType::F32, n * h)?;
    let list = rt.alloc(DType::U32, 2 * n + 1)?;
    let ids: Vec<u32> = std::iter::once(n as u32)
        .chain(0..n as u32)
        .chain((0..n).map(|_| 1))
        .collect();
    rt.write_u32(&list, &ids)?;
    let mut b = ProgramBuilder::new();
    let per = (rt.num_workers() / n).max(1);
    for slot in 0..n {
        for (w, y, rows, cols) in [
            (&gate, &yg, inter, h),
            (&up, &yu, inter, h),
            (&down, &yd, h, inter),
        ] {
            let xs = x.slice(0..cols)?;
            for (r0, k) in megakernel::task::split_even(rows, per) {
                let none = megakernel::task::gemv_bf16::Prologue::None;
                let t = GemvExpertFp4::rows(
                    w,
                    &xs,
                    &y.all(),
                    &list.all(),
                    1,
                    slot,
                    n,
                    false,
                    r0,
                    k,
                    false,
                    &none,
                )?;
                b.push(t);
            }
        }
    }
    let p = rt.load(&b.build()?)?;
    rt.run(&p, 3, &[])?;
    let iters = 50;
    let t = Instant::now();
    rt.run(&p, iters, &[])?;
    let per_iter = t.elapsed().as_secs_f64() / f64::from(iters);
    let bytes = (gate.bytes() + up.bytes() + down.bytes()) as f64;
    println!(
        "expert stream {}: one layer's 128 experts ({:.1} MB) in {:.1} µs: {:.3} TB/s, {:.1} % of copy bandwidth",
        format.name(),
        bytes / 1e6,
        per_iter * 1e6,
        bytes / per_iter / 1e12,
        100.0 * bytes / per_iter / copy
    );
    Ok(())
}

/// Mean unique experts per MoE layer in the blocks of `rows` rows counted.
fn mean_experts(used: &[ExpertUse], rows: usize) -> Option<f64> {
    used.iter().find(|u| u.rows == rows).map(ExpertUse::mean)
}

/// DFlash decode of one preset with injected acceptance, next to plain decode.
struct DflashRun<'a> {
    name: &'a str,
    dtype: &'a str,
    model: &'a Model,
    prompt: &'a [u32],
    /// Prompt, first token, then the plain greedy continuation.
    reference: Vec<u32>,
    tokens: usize,
    block: usize,
    /// Positions the session must hold at least (`--max-context`).
    max_context: usize,
    /// Plain decode seconds per token, same run.
    plain: f64,
    profile: bool,
    /// Where the traced iteration goes (Chrome trace format), if anywhere.
    trace_out: Option<&'a std::path::Path>,
}

impl DflashRun<'_> {
    fn go(&self, rt: &Runtime, taus: &[f64]) -> Result<()> {
        let config = self.model.config();
        let layers = DraftConfig::default_layers(config.num_layers);
        let dc = DraftConfig::for_target(config, layers, self.block);
        let draft = DraftModel::random(rt, &dc, 11, self.model)?;
        let opts = DflashOptions {
            block_size: Some(self.block),
            injected: Some(Injected {
                reference: self.reference.clone(),
                tau: 1.0,
            }),
        };
        let max_seq = (self.prompt.len() + self.tokens + 2 * self.block + 34).max(self.max_context);
        let mut s = DflashSession::new(rt, self.model, &draft, max_seq, &opts)?;
        let first = s.prefill(rt, self.prompt)?;
        let base = s.position();
        let want = &self.reference[base + 1..];
        for &tau in taus {
            s.set_injected_tau(rt, tau)?;
            let before = s.stats(rt)?;
            s.session().reset_expert_use(rt)?;
            let t = Instant::now();
            let out = s.generate(rt, self.tokens, None)?;
            let secs = t.elapsed().as_secs_f64();
            let after = s.stats(rt)?;
            let experts = mean_experts(&s.expert_use(rt)?, self.block);
            let iters = after.iterations - before.iterations;
            let lossless = out[..] == want[..self.tokens];
            let per_token = secs / self.tokens as f64;
            println!(
                "{} {} dflash INJECTED tau {tau}: {:.1} tokens/s ({:.3} ms/token), {:.2}x plain decode; \
                 block {}, {iters} iterations, measured tau {:.2}, {:.3} ms/iteration{}; output equals greedy: {lossless}",
                self.name,
                self.dtype,
                1.0 / per_token,
                per_token * 1e3,
                self.plain / per_token,
                self.block,
                self.tokens as f64 / iters as f64,
                secs * 1e3 / iters as f64,
                experts.map_or(String::new(), |e| format!(
                    ", {e:.1} unique experts per MoE layer per verify block"
                )),
            );
            println!(
                "{{\"preset\": \"{}\", \"dtype\": \"{}\", \"mode\": \"dflash injected\", \"tau\": {tau}, \"block\": {}, \
                 \"tokens_per_s\": {:.2}, \"plain_tokens_per_s\": {:.2}, \"speedup\": {:.3}, \"iterations\": {iters}, \
                 \"ms_per_iteration\": {:.4}, \"lossless\": {lossless}, \"device\": \"{}\"}}",
                self.name,
                self.dtype,
                self.block,
                1.0 / per_token,
                1.0 / self.plain,
                self.plain / per_token,
                secs * 1e3 / iters as f64,
                rt.describe()
            );
            s.truncate(rt, base, first)?;
        }
        if self.profile {
            let trace = s.trace_iteration(rt)?;
            let program = s.iteration_program();
            let mut parts = [
                ("draft", 0u64),
                ("verify", 0),
                ("context", 0),
                ("accept", 0),
            ];
            for st in trace.stages(program) {
                let k = if st.name.starts_with("draft context") {
                    2
                } else if st.name.starts_with("draft") || st.name == "inject" {
                    0
                } else if st.name == "accept" {
                    3
                } else {
                    1
                };
                parts[k].1 += st.critical_ns;
            }
            let total = trace.total_ns() as f64;
            let line: Vec<String> = parts
                .iter()
                .map(|(n, ns)| {
                    format!(
                        "{n} {:.1} µs ({:.0} %)",
                        *ns as f64 / 1e3,
                        100.0 * *ns as f64 / total
                    )
                })
                .collect();
            println!(
                "  one traced iteration, {:.1} µs: {}",
                total / 1e3,
                line.join(", ")
            );
            let out = self
                .trace_out
                .map(|d| d.join(format!("{}-{}-dflash.json", self.name, self.dtype)));
            print_profile(&trace, program, out);
        }
        Ok(())
    }
}

/// Critical-path share of each stage kind (summed over layers) in one step.
fn print_profile(
    trace: &megakernel::program::trace::Trace,
    program: &megakernel::program::Program,
    out: Option<std::path::PathBuf>,
) {
    if let Some(path) = out {
        let written = std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new(".")))
            .and_then(|()| {
                let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
                trace.write_chrome_json(program, &mut f)
            });
        match written {
            Ok(()) => println!("  trace written to {}", path.display()),
            Err(e) => eprintln!("  could not write {}: {e}", path.display()),
        }
    }
    let total = trace.total_ns() as f64;
    println!(
        "  traced step: {:.1} µs (first task start to last task end)",
        total / 1e3
    );
    // Per stage of its kind (means over its occurrences): the critical-path
    // share, and when its first and last tasks started after the stage before.
    if let Err(e) = trace.write_stage_table(program, &mut std::io::stdout()) {
        eprintln!("  could not print the stages: {e}");
    }
}
