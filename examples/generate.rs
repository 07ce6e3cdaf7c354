//! Runs a demonstration program on the resident kernel (or, without a GPU, on
//! the CPU executor) and checks it against the CPU executor.
//!
//! Until a model exists, the "decode step" is a stack of bf16 matrix-vector
//! products with a residual update and a cross-SM reduction; each step streams
//! one value (a row index chosen by a command parameter) back to the host.

use std::time::Instant;

use megakernel::prelude::*;
use megakernel::program::ops;
use megakernel::task::{copy::Copy, emit::Emit, gemv_bf16::GemvShape};

const HELP: &str = "usage: generate [--steps N] [--hidden N] [--layers N] [--cpu]

Runs a demonstration task program for N steps on the GPU's resident kernel
(or on the CPU executor when there is no GPU, or with --cpu), then checks the
result against the CPU executor.

  --steps N    decode steps to run in one command (default 64)
  --hidden N   vector width, a multiple of 8 (default 1024)
  --layers N   matrix-vector products per step (default 4)
  --cpu        use the CPU executor even if a GPU is present
  --help       this text";

struct Args {
    steps: u32,
    hidden: usize,
    layers: usize,
    cpu: bool,
}

fn parse() -> std::result::Result<Args, String> {
    let mut a = Args {
        steps: 64,
        hidden: 1024,
        layers: 4,
        cpu: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> std::result::Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--steps" => a.steps = value("--steps")? as u32,
            "--hidden" => a.hidden = value("--hidden")?,
            "--layers" => a.layers = value("--layers")?,
            "--cpu" => a.cpu = true,
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}\n\n{HELP}")),
        }
    }
    if a.hidden == 0 || a.hidden % 8 != 0 || a.layers == 0 || a.steps == 0 {
        return Err(
            "--hidden must be a positive multiple of 8; --layers and --steps positive".into(),
        );
    }
    Ok(a)
}

/// Loads weights, builds the step program, runs `steps` steps; returns the
/// final state vector, the streamed values and the seconds per step.
fn run(
    ex: &dyn Executor,
    a: &Args,
    weights: &[Vec<f32>],
    x0: &[f32],
) -> Result<(Vec<f32>, Vec<u64>, f64)> {
    let h = a.hidden;
    let shape = GemvShape {
        rows: h,
        cols: h,
        m: 1,
    };
    let parts = ex.num_workers();
    let x = ex.alloc(DType::F32, h)?;
    let t = ex.alloc(DType::F32, h)?;
    let sum = ex.alloc(DType::F32, 1)?;
    let scratch = ex.alloc(DType::F32, parts)?;
    let ids = ex.alloc(DType::U32, 64)?;
    let picked = ex.alloc(DType::U32, 1)?;
    ex.write_f32(&x, x0)?;
    ex.write_u32(&ids, &(0..64u32).map(|i| i * i).collect::<Vec<_>>())?;
    let mut ws = Vec::new();
    for w in weights {
        let buf = ex.alloc(DType::Bf16, h * h)?;
        ex.write_f32(&buf, w)?;
        ws.push(buf);
    }
    let mut b = ProgramBuilder::new();
    let mut prev: Option<EventId> = None;
    for (l, w) in ws.iter().enumerate() {
        // t = W x, then x = x + 0.5 t (residual), layer after layer.
        let g = ops::gemv(&mut b, &w.all(), &x.all(), &t.all(), shape, parts, false)?;
        if let Some(p) = prev {
            g.wait(&mut b, p);
        }
        let done = b.event(&format!("layer {l} gemv"));
        g.signal(&mut b, done);
        let r = ops::axpy(&mut b, &x.all(), &t.all(), 0.5, parts)?;
        r.wait(&mut b, done);
        let next = b.event(&format!("layer {l} residual"));
        r.signal(&mut b, next);
        prev = Some(next);
    }
    let last = prev.expect("at least one layer");
    let (partials, combine) = ops::reduce_sum(&mut b, &x.all(), &sum.all(), &scratch.all(), parts)?;
    partials.wait(&mut b, last);
    let reduced = b.event("reduced");
    b.task(combine).signal(reduced);
    let chosen = b.event("chosen");
    b.push(Copy::row(&picked.all(), &ids.all(), 1, 0)?)
        .param(2, 0)
        .wait(reduced)
        .signal(chosen);
    b.push(Emit::task(&picked.all())?).wait(chosen);
    let program = ex.load(&b.build()?)?;
    let start = Instant::now();
    let ticket = ex.submit(&program, a.steps, &[7])?;
    ex.wait(&ticket, ex.default_timeout())?;
    let per_step = start.elapsed().as_secs_f64() / f64::from(a.steps);
    let mut out = Vec::new();
    ex.poll_outputs(&mut out)?;
    Ok((ex.read_f32(&x)?, out, per_step))
}

fn main() -> Result<()> {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let (exec, why): (Box<dyn Executor>, Option<Error>) = if args.cpu {
        (Box::new(CpuExecutor::new(CpuOptions::default())), None)
    } else {
        megakernel::default_executor_with_reason()
    };
    if let Some(e) = why {
        println!("no GPU runtime ({e}); running on the CPU executor");
    }
    println!("executor: {}", exec.describe());
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let scale = 1.0 / (args.hidden as f32).sqrt();
    let weights: Vec<Vec<f32>> = (0..args.layers)
        .map(|_| {
            (0..args.hidden * args.hidden)
                .map(|_| rnd() * scale)
                .collect()
        })
        .collect();
    let x0: Vec<f32> = (0..args.hidden).map(|_| rnd()).collect();

    let (x, out, per_step) = run(exec.as_ref(), &args, &weights, &x0)?;
    println!(
        "{} steps of {} layers ({}x{} bf16): {:.1} us/step, {:.0} steps/s",
        args.steps,
        args.layers,
        args.hidden,
        args.hidden,
        per_step * 1e6,
        1.0 / per_step
    );
    println!(
        "streamed values: {:?}{}",
        &out[..out.len().min(8)],
        if out.len() > 8 { " ..." } else { "" }
    );
    if exec.is_gpu() {
        let cpu = CpuExecutor::new(CpuOptions::default());
        let check = Args {
            steps: args.steps.min(8),
            ..args
        };
        let (want, _, _) = run(&cpu, &check, &weights, &x0)?;
        let (got, _, _) = run(exec.as_ref(), &check, &weights, &x0)?;
        let num: f32 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f32 = want.iter().map(|b| b * b).sum();
        println!(
            "relative L2 difference vs the CPU executor over {} steps: {:.2e}",
            check.steps,
            (num / den).sqrt()
        );
    }
    assert!(x.iter().all(|v| v.is_finite()));
    Ok(())
}
