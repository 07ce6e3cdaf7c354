//! FP4 expert products: the device decodes MXFP4 and NVFP4 bit-exactly as the
//! Rust reference does, products match an f64 reference on every executor
//! (with each prologue), and the error of FP4 against bf16 weights is reported.

mod common;

use common::{bf16_round, on_every_executor, rel_l2, seed, Rng};
use megakernel::prelude::*;
use megakernel::quant::{quantize, Fp4Format};
use megakernel::task::gemv_bf16::Prologue;
use megakernel::task::gemv_expert_fp4::{Fp4Experts, GemvExpertFp4};

fn experts(rng: &mut Rng, n: usize, rows: usize, cols: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| rng.vec(rows * cols).iter().map(|v| v * 0.05).collect())
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn run(
    ex: &dyn Executor,
    w: &Fp4Experts,
    x: &Buffer,
    y: &Buffer,
    chosen: &[u32],
    m: usize,
    x_per_slot: bool,
    pro: &Prologue,
    spread: bool,
) {
    // Count, ids, then each slot's row mask (every row here).
    let list = ex.alloc(DType::U32, 1 + 2 * chosen.len()).unwrap();
    let mut l = vec![chosen.len() as u32];
    l.extend_from_slice(chosen);
    l.extend(chosen.iter().map(|_| (1u32 << m) - 1));
    ex.write_u32(&list, &l).unwrap();
    let mut b = ProgramBuilder::new();
    if spread {
        // Five tasks share the chosen experts in units of 32 rows.
        for t in 0..5 {
            b.push(
                GemvExpertFp4::spread(
                    w,
                    &x.all(),
                    &y.all(),
                    &list.all(),
                    m,
                    chosen.len(),
                    x_per_slot,
                    t,
                    5,
                    32,
                    false,
                    pro,
                )
                .unwrap(),
            );
        }
    }
    for slot in (0..chosen.len()).filter(|_| !spread) {
        for (r0, n) in [(0, w.rows / 3), (w.rows / 3, w.rows - w.rows / 3)] {
            b.push(
                GemvExpertFp4::rows(
                    w,
                    &x.all(),
                    &y.all(),
                    &list.all(),
                    m,
                    slot,
                    chosen.len(),
                    x_per_slot,
                    r0,
                    n,
                    false,
                    pro,
                )
                .unwrap(),
            );
        }
    }
    ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
        .unwrap();
}

/// One-hot inputs read single matrix entries out of the product: every
/// decoded weight equals `quant::dequantize` bit for bit, for experts whose
/// block scales are ordinary, above 2 (E8M0 codes over 128), tiny, and
/// spread over 2^20 within one matrix (NVFP4 block scales down to E4M3's
/// subnormals and zero).
#[test]
fn device_decoding_is_bit_exact() {
    let mut rng = Rng(seed());
    on_every_executor("device_decoding_is_bit_exact", |ex| {
        let (rows, cols, m) = (40, 256, 16);
        for format in [Fp4Format::Mxfp4, Fp4Format::Nvfp4] {
            let mut mats = experts(&mut rng, 4, rows, cols);
            for (mat, k) in mats.iter_mut().zip([1.0f32, 4096.0, 2f32.powi(-60), 1.0]) {
                mat.iter_mut().for_each(|v| *v *= k);
            }
            // Each 16 columns of a row a power of two smaller than the last,
            // each row starting one lower, wrapping after 2^-20.
            for (i, v) in mats[3].iter_mut().enumerate() {
                *v *= 2f32.powi(-(((i % cols) / 16 + i / cols) as i32 % 21));
            }
            if format == Fp4Format::Nvfp4 {
                let s = quantize(format, &mats[3]).unwrap().scales;
                assert!(
                    s.iter().any(|&c| c & 0x78 == 0 && c & 7 != 0),
                    "no subnormal E4M3 scale"
                );
                assert!(s.iter().any(|&c| c & 0x7F == 0), "no zero E4M3 scale");
            }
            let w = Fp4Experts::upload(ex, format, rows, cols, &mats).unwrap();
            for (e, mat) in mats.iter().enumerate() {
                let want = quantize(format, mat).unwrap().dequantize();
                let cols_hit: Vec<usize> = (0..m).map(|_| rng.below(cols)).collect();
                let mut xv = vec![0f32; m * cols];
                for (i, &c) in cols_hit.iter().enumerate() {
                    xv[i * cols + c] = 1.0;
                }
                let x = ex.alloc(DType::Bf16, m * cols).unwrap();
                ex.write_f32(&x, &xv).unwrap();
                let y = ex.alloc(DType::F32, m * rows).unwrap();
                ex.write_f32(&y, &vec![f32::NAN; m * rows]).unwrap();
                run(
                    ex,
                    &w,
                    &x,
                    &y,
                    &[e as u32],
                    m,
                    false,
                    &Prologue::None,
                    e % 2 == 1,
                );
                let got = ex.read_f32(&y).unwrap();
                for (i, &c) in cols_hit.iter().enumerate() {
                    for r in 0..rows {
                        let (g, d) = (got[i * rows + r], want[r * cols + c]);
                        // A sum may turn −0 into +0; every other value must match bit for bit.
                        let same = g.to_bits() == d.to_bits() || (g == 0.0 && d == 0.0);
                        assert!(same, "{format:?} expert {e} row {r} col {c}: {g} vs {d}");
                    }
                }
            }
        }
    });
}

/// Several slots, each prologue, both formats: against an f64 product with
/// the dequantized weights; and FP4 against the bf16 weights (printed).
#[test]
fn fp4_expert_products_match_reference() {
    let mut rng = Rng(seed());
    on_every_executor("fp4_expert_products_match_reference", |ex| {
        use Fp4Format::{Mxfp4, Nvfp4};
        let mut draw = || 1 + rng.below(16);
        // Case 0: no prologue, 1: RMSNorm, 2: SwiGLU with rows per slot. The
        // wide ones take 16 rows at once: bf16 rows copied beside the
        // tensor-core partials, f32 rows and 7168-wide rows read in place.
        let cases = [
            (0, Mxfp4, 384, draw(), DType::Bf16),
            (1, Nvfp4, 384, draw(), DType::Bf16),
            (2, Mxfp4, 384, draw(), DType::Bf16),
            (0, Mxfp4, 4096, 16, DType::Bf16),
            (0, Nvfp4, 4096, 16, DType::F32),
            (0, Mxfp4, 7168, 16, DType::Bf16),
        ];
        for (case, format, cols, m, x_dtype) in cases {
            // The narrow cases' tasks take more rows than one group of a
            // block's jobs (128 rows at 384 columns): several groups share
            // one barrier (per slot: tasks of 96 and 192 rows; spread: runs
            // of up to six 32-row units).
            let (n, rows) = (6, if cols <= 384 { 288 } else { 96 });
            let mats = experts(&mut rng, n, rows, cols);
            let w = Fp4Experts::upload(ex, format, rows, cols, &mats).unwrap();
            let chosen = [4u32, 1, 5];
            let per_slot = case == 2;
            let nx = if per_slot { chosen.len() } else { 1 } * m * cols;
            let xv = bf16_round(&rng.vec(nx));
            let av = bf16_round(&rng.vec(nx));
            let x = ex.alloc(x_dtype, nx).unwrap();
            let aux = ex.alloc(DType::Bf16, nx).unwrap();
            ex.write_f32(&x, &xv).unwrap();
            ex.write_f32(&aux, &av).unwrap();
            let pro = match case {
                0 => Prologue::None,
                1 => Prologue::RmsNorm(aux.slice(0..cols).unwrap(), 1e-6),
                _ => Prologue::Swiglu(aux.all()),
            };
            let y = ex.alloc(DType::F32, chosen.len() * m * rows).unwrap();
            run(ex, &w, &x, &y, &chosen, m, per_slot, &pro, false);
            let got = ex.read_f32(&y).unwrap();
            // Spread over tasks in units of rows: the same values, bit for bit.
            let y2 = ex.alloc(DType::F32, chosen.len() * m * rows).unwrap();
            run(ex, &w, &x, &y2, &chosen, m, per_slot, &pro, true);
            let spread = ex.read_f32(&y2).unwrap();
            assert!(
                got.iter()
                    .zip(&spread)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: case {case} {format:?} {cols} cols: spread tasks differ",
                ex.describe()
            );
            let (mut want, mut exact) = (Vec::new(), Vec::new());
            for (s, &e) in chosen.iter().enumerate() {
                let dq = quantize(format, &mats[e as usize]).unwrap().dequantize();
                for i in 0..m {
                    let at = if per_slot {
                        (s * m + i) * cols
                    } else {
                        i * cols
                    };
                    let xr = &xv[at..at + cols];
                    let prepared: Vec<f64> = match case {
                        0 => xr.iter().map(|&v| f64::from(v)).collect(),
                        1 => {
                            let ms =
                                xr.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / cols as f64;
                            let inv = 1.0 / (ms + 1e-6).sqrt();
                            let v: Vec<f32> = xr
                                .iter()
                                .zip(&av[..cols])
                                .map(|(v, g)| (f64::from(*v) * inv * f64::from(*g)) as f32)
                                .collect();
                            bf16_round(&v).iter().map(|&v| f64::from(v)).collect()
                        }
                        _ => {
                            let v: Vec<f32> = xr
                                .iter()
                                .zip(&av[at..at + cols])
                                .map(|(g, u)| {
                                    let g = f64::from(*g);
                                    (g / (1.0 + (-g).exp()) * f64::from(*u)) as f32
                                })
                                .collect();
                            bf16_round(&v).iter().map(|&v| f64::from(v)).collect()
                        }
                    };
                    for r in 0..rows {
                        let dot = |w: &[f32]| {
                            w[r * cols..(r + 1) * cols]
                                .iter()
                                .zip(&prepared)
                                .map(|(a, b)| f64::from(*a) * b)
                                .sum::<f64>()
                        };
                        want.push(dot(&dq));
                        exact.push(dot(&bf16_round(&mats[e as usize])));
                    }
                }
            }
            let err = rel_l2(&got, &want);
            assert!(
                err < 1e-3,
                "case {case} {format:?} {cols} cols: rel L2 {err}"
            );
            let q = rel_l2(&got, &exact);
            eprintln!(
                "{}: {format:?} expert outputs vs bf16 weights: rel L2 {q:.4}",
                ex.describe()
            );
            assert!(
                q < 0.2,
                "{format:?}: FP4 error {q} is far above the format's"
            );
        }
    });
}

/// Each step's greedy token and logits.
type Steps = Vec<(u32, Vec<f32>)>;

/// Greedy tokens and logits of a step-by-step decode.
fn decode_steps(
    ex: &dyn Executor,
    format: Option<Fp4Format>,
    steps: usize,
) -> Vec<(u32, Vec<f32>)> {
    use megakernel::model::{Model, ModelConfig};
    let config = ModelConfig::preset("tiny-moe").unwrap();
    let model = Model::random_with(ex, &config, 21, format).unwrap();
    let mut d = model.session(ex, 64).unwrap();
    let mut tok = d.prefill(ex, &[7, 99, 3, 250, 18]).unwrap();
    let mut out = vec![(tok, d.logits(ex).unwrap())];
    for _ in 0..steps {
        tok = d.generate(ex, 1).unwrap()[0];
        out.push((tok, d.logits(ex).unwrap()));
    }
    out
}

/// A whole MoE model with FP4 experts decodes alike on every executor. The CPU
/// executors agree exactly (same f32 reference ops whatever the thread
/// count). The GPU, with its own rounding, must match after the prompt (logits
/// within bf16 tolerance, the same token where the margin is clear); later
/// steps are compared until the runs part, since a near tie in routing may
/// send them apart legitimately, and the length of agreement is printed.
#[test]
fn fp4_model_decodes_alike_on_every_executor() {
    for format in [Some(Fp4Format::Mxfp4), Some(Fp4Format::Nvfp4)] {
        let mut runs: Vec<(String, bool, Steps)> = Vec::new();
        on_every_executor("fp4_model_decodes_alike_on_every_executor", |ex| {
            runs.push((ex.describe(), ex.is_gpu(), decode_steps(ex, format, 24)));
        });
        let (_, _, base) = &runs[0];
        for (who, gpu, run) in &runs[1..] {
            if !gpu {
                assert_eq!(run, base, "{format:?} {who}: CPU executors differ");
                continue;
            }
            let mut agree = 0;
            for (step, ((t0, l0), (t1, l1))) in base.iter().zip(run).enumerate() {
                let want: Vec<f64> = l0.iter().map(|&v| f64::from(v)).collect();
                let err = rel_l2(l1, &want);
                let mut sorted = l0.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let clear = sorted[0] - sorted[1] >= 0.05 * sorted[0].abs().max(1.0);
                if step == 0 {
                    assert!(
                        err < 3e-2,
                        "{format:?} {who}: logits after the prompt, rel L2 {err}"
                    );
                    assert!(
                        t0 == t1 || !clear,
                        "{format:?} {who}: first token {t1} vs {t0}"
                    );
                }
                if err >= 3e-2 || t0 != t1 {
                    break;
                }
                agree += 1;
            }
            eprintln!(
                "{format:?} {who}: agrees with the CPU executor for {agree} of {} steps",
                base.len()
            );
        }
    }
}

fn tiny_tokens(ex: &dyn Executor, model: &megakernel::model::Model) -> (Vec<u32>, Vec<f32>) {
    let mut d = model.session(ex, 48).unwrap();
    let first = d.prefill(ex, &[7, 99, 3, 250, 18]).unwrap();
    let mut t = vec![first];
    t.extend(d.generate(ex, 16).unwrap());
    (t, d.logits(ex).unwrap())
}

/// A checkpoint saved with FP4 experts (random, or quantized from a bf16
/// checkpoint) loads without quantizing again and decodes exactly like the
/// same weights quantized on load; a format mismatch and an unknown
/// quantization method are typed errors.
#[test]
fn quantized_checkpoints_save_and_load() {
    use megakernel::model::checkpoint::{write_quantized, write_random, WriteOptions};
    use megakernel::model::{Checkpoint, Model, ModelConfig};
    let cpu = CpuExecutor::new(CpuOptions {
        threads: 1,
        seed: 1,
    });
    let dir = tempfile::tempdir().unwrap();
    let base = ModelConfig::preset("tiny-moe").unwrap();
    let opts = WriteOptions {
        seed: 77,
        ..WriteOptions::default()
    };
    write_random(&dir.path().join("bf16"), &base, &opts).unwrap();
    let bf16 = Checkpoint::open(&dir.path().join("bf16")).unwrap();
    for format in [Fp4Format::Mxfp4, Fp4Format::Nvfp4] {
        let want = tiny_tokens(&cpu, &Model::load_with(&cpu, &bf16, Some(format)).unwrap());
        // Quantized from the bf16 checkpoint.
        let q = dir.path().join(format.name());
        write_quantized(&q, &bf16, format, &opts).unwrap();
        let ck = Checkpoint::open(&q).unwrap();
        assert_eq!(ck.config.moe.as_ref().unwrap().fp4, Some(format));
        assert!(ck
            .info("model.layers.0.mlp.experts.0.gate_proj.weight_blocks")
            .is_some());
        assert!(ck
            .info("model.layers.0.mlp.experts.0.gate_proj.weight")
            .is_none());
        assert_eq!(tiny_tokens(&cpu, &Model::load(&cpu, &ck).unwrap()), want);
        let other = match format {
            Fp4Format::Mxfp4 => Fp4Format::Nvfp4,
            Fp4Format::Nvfp4 => Fp4Format::Mxfp4,
        };
        assert!(Model::load_with(&cpu, &ck, Some(other)).is_err());
        // Random weights written quantized equal random weights quantized on load.
        let mut config = base.clone();
        config.moe.as_mut().unwrap().fp4 = Some(format);
        let r = dir.path().join(format!("random-{}", format.name()));
        write_random(&r, &config, &opts).unwrap();
        let from_disk = Model::load(&cpu, &Checkpoint::open(&r).unwrap()).unwrap();
        let in_memory = Model::random_with(&cpu, &base, 77, Some(format)).unwrap();
        assert_eq!(tiny_tokens(&cpu, &from_disk), tiny_tokens(&cpu, &in_memory));
    }
    let mut j: serde_json::Value = serde_json::from_str(&base.to_json()).unwrap();
    j["quantization_config"] = serde_json::json!({"quant_method": "awq"});
    let err = ModelConfig::from_json(&j.to_string())
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantization_config"), "{err}");
}

/// MXFP4 weights drawn and quantized by `fill_random_fp4` on the executor are
/// the bits the host quantizer makes of the same random values, for a whole
/// matrix and for row and column parts of one (a rank's shard).
#[test]
fn device_drawn_mxfp4_equals_host_quantized() {
    use megakernel::quant::{quantize_mxfp4, Fp4Format};
    use megakernel::task::fill_random::random_value;
    use megakernel::task::fill_random_fp4::{FillRandomFp4, RandomPart};
    use megakernel::task::gemv_expert_fp4::scale_stride;
    common::on_every_executor("device_drawn_mxfp4", |ex| {
        let cols = 256usize; // of the whole [96, 256] matrix
        let key = common::seed();
        for (origin, prows, pcols) in [((0, 0), 96, 256), ((32, 0), 48, 256), ((0, 64), 96, 128)] {
            let (std, mean) = (0.02f32, 0.0f32);
            let values: Vec<f32> = (0..prows * pcols)
                .map(|p| {
                    let (r, c) = (p / pcols + origin.0, p % pcols + origin.1);
                    random_value(key, (r * cols + c) as u64, std, mean)
                })
                .collect();
            let want = quantize_mxfp4(&values).unwrap();
            let blocks = prows * pcols / 32;
            let codes = ex.alloc(DType::U32, blocks * 4).unwrap();
            let stride = scale_stride(Fp4Format::Mxfp4, prows, pcols);
            let scales = ex.alloc(DType::U32, stride / 4).unwrap();
            let part = RandomPart {
                key,
                std,
                mean,
                full_cols: cols,
                origin,
                part_cols: pcols,
            };
            let mut b = ProgramBuilder::new();
            // Two tasks: the second starts mid-matrix.
            let half = (blocks / 2) & !3;
            for (first, n) in [(0, half), (half, blocks - half)] {
                let t = FillRandomFp4::task(
                    &codes.slice(first * 4..(first + n) * 4).unwrap(),
                    &scales.slice(first / 4..(first + n) / 4).unwrap(),
                    &part,
                    first,
                    n,
                )
                .unwrap();
                b.push(t);
            }
            ex.run(&ex.load(&b.build().unwrap()).unwrap(), 1, &[])
                .unwrap();
            let bytes = |b: &Buffer| -> Vec<u8> {
                let words = ex.read_u32(b).unwrap();
                words.iter().flat_map(|w| w.to_le_bytes()).collect()
            };
            let (got_codes, got_scales) = (bytes(&codes), bytes(&scales));
            assert_eq!(
                got_codes,
                want.codes,
                "{}: codes of part at {origin:?}",
                ex.describe()
            );
            assert_eq!(
                &got_scales[..blocks],
                &want.scales[..],
                "{}: scales",
                ex.describe()
            );
        }
    });
}
