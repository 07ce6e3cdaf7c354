//! FP4 formats: code tables against the specifications, the scale rules,
//! error bounds of quantize → dequantize, exact round trips, typed errors.

use megakernel::quant::*;
use proptest::prelude::*;

#[test]
fn every_e2m1_code_decodes_as_specified() {
    let mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for c in 0..16u8 {
        let want = if c & 8 != 0 {
            -mags[(c & 7) as usize]
        } else {
            mags[(c & 7) as usize]
        };
        assert_eq!(e2m1_to_f32(c), want, "code {c}");
        assert_eq!(
            e2m1_to_f32(c).to_bits() >> 31,
            u32::from(c >> 3),
            "sign of {c}"
        );
        assert_eq!(f32_to_e2m1(want), c, "encode {want}");
    }
}

#[test]
fn every_e8m0_code_decodes_as_specified() {
    for e in 0..=255u8 {
        let v = e8m0_to_f32(e);
        if e == 255 {
            assert!(v.is_nan());
        } else {
            assert_eq!(f64::from(v), 2f64.powi(i32::from(e) - 127), "code {e}");
        }
    }
}

#[test]
fn every_e4m3_code_decodes_as_specified() {
    for c in 0..=255u8 {
        let v = e4m3_to_f32(c);
        let (s, e, m) = (c >> 7, (c >> 3) & 15, c & 7);
        if e == 15 && m == 7 {
            assert!(v.is_nan(), "code {c:#x}");
            continue;
        }
        let mag = if e == 0 {
            f64::from(m) / 8.0 * 2f64.powi(-6)
        } else {
            (1.0 + f64::from(m) / 8.0) * 2f64.powi(i32::from(e) - 7)
        };
        assert_eq!(f64::from(v), if s == 1 { -mag } else { mag }, "code {c:#x}");
        assert_eq!(f32_to_e4m3(v), c, "round trip {c:#x}");
    }
    assert_eq!(e4m3_to_f32(0x7E), 448.0);
    assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    assert_eq!(f32_to_e4m3(1e6), 0x7E, "saturates");
    // Ties go to the even code: 1.0 + 1/16 lies halfway between 1.0 (0x38) and 1.125 (0x39).
    assert_eq!(f32_to_e4m3(1.0625), 0x38);
}

#[test]
fn e2m1_rounds_to_nearest_even_and_clips() {
    for (x, want) in [
        (0.25, 0.0),
        (0.75, 1.0),
        (1.25, 1.0),
        (1.75, 2.0),
        (2.5, 2.0),
        (3.5, 4.0),
        (5.0, 4.0),
        (5.01, 6.0),
        (7.0, 6.0),
        (1e9, 6.0),
        (-0.3, -0.5),
    ] {
        assert_eq!(e2m1_to_f32(f32_to_e2m1(x)), want, "{x}");
    }
}

#[test]
fn mxfp4_scale_rule() {
    // amax 7: floor(log2 7) = 2, so X = 2^0 and 7 clips to 6.
    let mut b = vec![0.0f32; 32];
    b[3] = 7.0;
    b[4] = -0.5;
    let q = quantize_mxfp4(&b).unwrap();
    assert_eq!(q.scales, vec![127]);
    let d = q.dequantize();
    assert_eq!((d[3], d[4]), (6.0, -0.5));
    // amax 0.1: floor(log2 0.1) = -4, X = 2^-6.
    assert_eq!(mxfp4_scale(0.1), 127 - 6);
    // An all-zero block decodes to zeros; a subnormal amax gets a valid code.
    assert!(quantize_mxfp4(&[0.0; 32])
        .unwrap()
        .dequantize()
        .iter()
        .all(|&v| v == 0.0));
    assert!(mxfp4_scale(1e-40) < 255);
}

#[test]
fn non_finite_and_ragged_inputs_are_errors() {
    let mut b = vec![1.0f32; 32];
    b[9] = f32::NAN;
    assert!(matches!(
        quantize_mxfp4(&b),
        Err(QuantError::NonFinite { index: 9, .. })
    ));
    b[9] = f32::INFINITY;
    assert!(matches!(
        quantize_nvfp4(&b),
        Err(QuantError::NonFinite { index: 9, .. })
    ));
    assert!(matches!(
        quantize_mxfp4(&[1.0; 20]),
        Err(QuantError::Ragged { len: 20, block: 32 })
    ));
    assert!(matches!(
        quantize_nvfp4(&[1.0; 20]),
        Err(QuantError::Ragged { len: 20, block: 16 })
    ));
}

/// A block whose values vary over several binades, at a random overall scale.
fn block(n: usize) -> impl Strategy<Value = Vec<f32>> {
    (
        prop::collection::vec((-1.0f32..1.0, 0i32..6, any::<bool>()), n),
        -30i32..30,
    )
        .prop_map(|(v, s)| {
            v.into_iter()
                .map(|(m, e, zero)| {
                    if zero && m > 0.8 {
                        0.0
                    } else {
                        m * 2f32.powi(e + s)
                    }
                })
                .collect()
        })
}

proptest! {
    /// MXFP4: per block, |x − dq| ≤ 2X where X is the block scale (half the
    /// largest E2M1 gap is X; clipping from [6X, 8X) adds at most 2X), and
    /// ≤ X/4 where |x| ≤ 2X (spacing 0.5 there).
    #[test]
    fn mxfp4_error_is_bounded_per_block(x in prop::collection::vec(block(32), 1..4)) {
        let x: Vec<f32> = x.concat();
        let q = quantize_mxfp4(&x).unwrap();
        let d = q.dequantize();
        for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
            let s = q.block_scale(i / 32);
            let bound = if a.abs() <= 2.0 * s { 0.25 * s } else { 2.0 * s };
            prop_assert!((a - b).abs() <= bound, "x {a} dq {b} scale {s}");
        }
    }

    /// NVFP4: per block, |x − dq| ≤ s·g (the block's step: half the largest
    /// E2M1 gap, or the clip of a block maximum its E4M3 rounding pushed past 6).
    /// Blocks share one binade offset, as a tensor's do: E4M3 block scales span
    /// about 2^17 below the tensor's largest block, and smaller blocks flush to 0.
    #[test]
    fn nvfp4_error_is_bounded_per_block(x in prop::collection::vec(prop::collection::vec((-1.0f32..1.0, 0i32..8), 16), 1..6), e in -30i32..30) {
        let x: Vec<f32> = x.concat().into_iter().map(|(m, k)| m * 2f32.powi(k + e)).collect();
        let q = quantize_nvfp4(&x).unwrap();
        let d = q.dequantize();
        for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
            let step = q.block_scale(i / 16);
            prop_assert!((a - b).abs() <= step * 1.0001 + f32::MIN_POSITIVE, "x {a} dq {b} step {step}");
        }
    }

    /// Values already representable (E2M1 codes times the scale the rule
    /// picks, the block holding a 4 or a 6) come back exactly.
    #[test]
    fn representable_mxfp4_blocks_round_trip(codes in prop::collection::vec(0u8..16, 31), top in 6u8..8, e in -20i32..20) {
        let s = 2f32.powi(e);
        let mut x: Vec<f32> = codes.iter().map(|&c| e2m1_to_f32(c) * s).collect();
        x.push(e2m1_to_f32(top) * s);
        let d = quantize_mxfp4(&x).unwrap().dequantize();
        for (a, b) in x.iter().zip(&d) {
            // Equal as values (−0 and +0 compare equal; every other sign counts).
            prop_assert_eq!(a, b);
        }
    }
}
