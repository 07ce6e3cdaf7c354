//! Time of one task of each small decode kind on an otherwise idle GPU: a
//! program of 256 copies on one SM, timed as a whole, less an empty program,
//! per task. The shapes are a `qwen3-30b-a3b` decode step's at 1024 tokens of
//! context (routing over 128 experts, top 8; one head's merge of 33 attention
//! slices; one slice of 32 keys for 8 query heads; 64 hidden columns of the
//! expert combine; one task's rows of the qkv, o_proj, router and LM head
//! products, each copy on other rows of a matrix larger than L2, so that
//! copies do not hit each other's rows in L2; the qkv and o_proj rows once
//! more with every copy on the same rows, which then come from L2). A nop
//! program gives the
//! resident loop's own cost per task. Needs a GPU; prints a notice and exits
//! without one.
//!
//! `cargo run --release --example task_latency`

use std::time::Instant;

use megakernel::prelude::*;
use megakernel::task::attention::Attention;
use megakernel::task::attention_combine::AttentionCombine;
use megakernel::task::gemv_bf16::{GemvBf16, GemvShape, Prologue};
use megakernel::task::moe_combine::MoeCombine;
use megakernel::task::moe_route::{list_len, MoeRoute};
use megakernel::task::nop::Nop;
use megakernel::task::rope_kv::HeadShape;
use megakernel::task::TaskSpec;

/// Copies of a task in one program.
const COPIES: usize = 256;
/// Timed runs of each program (the median is reported).
const RUNS: usize = 50;

/// Median seconds of one run of `n` tasks made by `spec`, all on SM 0.
fn time_program(rt: &Runtime, spec: &dyn Fn(usize) -> Result<TaskSpec>, n: usize) -> Result<f64> {
    let mut b = ProgramBuilder::new();
    for i in 0..n {
        let _ = b.push(spec(i)?).on_worker(0);
    }
    let program = rt.load(&b.build()?)?;
    rt.run(&program, 1, &[])?;
    let mut t = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        rt.run(&program, 1, &[])?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[RUNS / 2])
}

/// Uniform values in [-scale / 2, scale / 2) from a fixed-seed generator.
fn values(state: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn main() -> Result<()> {
    let rt = match Runtime::new(0) {
        Ok(rt) => rt,
        Err(e) => {
            println!("no GPU runtime ({e}); task_latency needs a GPU");
            return Ok(());
        }
    };
    let mut seed = 12345u64;
    let empty = time_program(&rt, &|_| Ok(Nop::task()), 1)?;
    let per_task = |label: &str, spec: &dyn Fn(usize) -> Result<TaskSpec>| -> Result<()> {
        let t = (time_program(&rt, spec, COPIES)? - empty) / COPIES as f64;
        println!("{label:<44} {:7.3} µs per task", t * 1e6);
        Ok(())
    };
    println!("empty program round trip: {:.1} µs", empty * 1e6);
    per_task("nop", &|_| Ok(Nop::task()))?;

    let (experts, top_k, hidden) = (128, 8, 2048);
    let logits = rt.alloc(DType::F32, experts)?;
    rt.write_f32(&logits, &values(&mut seed, experts, 4.0))?;
    let weights = rt.alloc(DType::F32, experts)?;
    let list = rt.alloc(DType::U32, list_len(1, experts, top_k))?;
    per_task("route: 128 experts, top 8", &|_| {
        Ok(MoeRoute::task(
            &logits.all(),
            &weights.all(),
            &list.all(),
            1,
            experts,
            top_k,
            true,
            None,
        )?)
    })?;

    let shape = HeadShape {
        heads: 32,
        kv_heads: 4,
        head_dim: 128,
    };
    let (chunks, stride) = (33, shape.head_dim + 2);
    let partial = rt.alloc(DType::F32, shape.heads * chunks * stride)?;
    let mut pv = values(&mut seed, shape.heads * chunks * stride, 1.0);
    for s in pv.chunks_mut(stride) {
        s[shape.head_dim] *= 4.0; // running max
        s[shape.head_dim + 1] = s[shape.head_dim + 1].abs() * 10.0 + 1.0; // running sum
    }
    rt.write_f32(&partial, &pv)?;
    let attn = rt.alloc(DType::Bf16, shape.heads * shape.head_dim)?;
    per_task("attention combine: one head, 33 slices", &|i| {
        Ok(AttentionCombine::task(
            &partial.all(),
            &attn.all(),
            shape,
            1,
            chunks,
            i % shape.heads,
            1,
        )?)
    })?;

    let max_seq = 2048;
    let qkv = rt.alloc(DType::Bf16, shape.qkv_width())?;
    rt.write_f32(&qkv, &values(&mut seed, shape.qkv_width(), 1.0))?;
    let cache_len = 2 * shape.kv_heads * max_seq * shape.head_dim;
    let cache = rt.alloc(DType::Bf16, cache_len)?;
    rt.write_f32(&cache, &values(&mut seed, cache_len, 1.0))?;
    let pos = rt.alloc(DType::U32, 1)?;
    rt.write_u32(&pos, &[1023])?;
    per_task("attention slice: 32 keys, 8 query heads", &|i| {
        Ok(Attention::task(
            &qkv.all(),
            &cache.all(),
            &pos.all(),
            &partial.all(),
            shape,
            1,
            max_seq,
            i % shape.kv_heads,
            i % 32,
            chunks,
        )?)
    })?;

    // The routing programs above left a list of 8 experts.
    let x = rt.alloc(DType::Bf16, hidden)?;
    let y = rt.alloc(DType::F32, top_k * hidden)?;
    rt.write_f32(&y, &values(&mut seed, top_k * hidden, 1.0))?;
    per_task("expert combine: 64 of 2048 columns, 8 experts", &|i| {
        Ok(MoeCombine::task(
            &x.all(),
            &y.all(),
            &weights.all(),
            &list.all(),
            1,
            hidden,
            experts,
            top_k,
            (i % 32) * 64,
            64,
            true,
        )?)
    })?;

    // Products: `rows` rows of a [total, cols] bf16 matrix per task, copy i
    // on rows i * rows onwards (wrapping; `hot`: every copy on the first
    // rows), one input row.
    let product = |label: &str,
                   total: usize,
                   cols: usize,
                   rows: usize,
                   norm: bool,
                   hot: bool|
     -> Result<()> {
        let w = rt.alloc(DType::Bf16, total * cols)?;
        let x = rt.alloc(DType::Bf16, cols)?;
        let mut s = 7u64;
        rt.write_f32(&x, &values(&mut s, cols, 1.0))?;
        let g = rt.alloc(DType::Bf16, cols)?;
        rt.write_f32(&g, &vec![1.0; cols])?;
        let y = rt.alloc(DType::F32, total)?;
        let shape = GemvShape {
            rows: total,
            cols,
            m: 1,
        };
        let pro = if norm {
            Prologue::RmsNorm(g.all(), 1e-6)
        } else {
            Prologue::None
        };
        let tasks = if hot { 1 } else { total / rows };
        per_task(label, &|i| {
            Ok(GemvBf16::rows_with(
                &w.all(),
                &x.all(),
                &y.all(),
                shape,
                (i % tasks) * rows,
                rows,
                false,
                &pro,
            )?)
        })
    };
    // Matrices of at least 64 MiB (beyond the H100's 50 MB of L2).
    product(
        "qkv: 39 rows x 2048, RMSNorm input",
        16384,
        2048,
        39,
        true,
        false,
    )?;
    product("qkv, rows in L2", 16384, 2048, 39, true, true)?;
    product("o_proj: 16 rows x 4096", 8192, 4096, 16, false, false)?;
    product("o_proj, rows in L2", 8192, 4096, 16, false, true)?;
    product(
        "router: 1 row x 2048, RMSNorm input",
        16384,
        2048,
        1,
        true,
        false,
    )?;
    product(
        "lm head: 1151 rows x 2048, RMSNorm input",
        151936,
        2048,
        1151,
        true,
        false,
    )?;
    Ok(())
}
