//! 4-bit floating-point weight formats: MXFP4 and NVFP4.
//!
//! Element format, both: **E2M1** (1 sign, 2 exponent bits with bias 1, 1
//! mantissa bit): codes 0..=7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the
//! sign. No infinity or NaN. Two codes per byte, the even element in the low
//! nibble (the layout of Hugging Face's MXFP4 `*_blocks` tensors).
//!
//! * **MXFP4** (OCP Microscaling Formats spec v1.0): blocks of 32 elements
//!   share one **E8M0** scale, `2^(e - 127)` (e = 255 is NaN). Scale rule (the
//!   spec's): `X = 2^(floor(log2(amax)) - 2)`, 2 being the largest E2M1
//!   exponent, so the block's largest magnitude lands in [4, 8) before
//!   rounding; elements are `rne_e2m1(x / X)`, values above 6 clip to ±6. An
//!   all-zero block gets the smallest scale that keeps its exponent in range.
//! * **NVFP4** (NVIDIA's format): blocks of 16 elements share one **E4M3**
//!   scale (bias 7, largest 448, no infinity), under a per-tensor f32 scale
//!   `g = amax(tensor) / (6 * 448)`. Block scale `s = e4m3(amax(block) / 6 / g)`
//!   (round to nearest even); elements are `rne_e2m1(x / (s * g))`.
//!
//! Every rounding is to nearest, ties to even. Infinite or NaN input is an
//! error ([`QuantError`]), never silently clipped.

use thiserror::Error;

/// Elements per MXFP4 block.
pub const MXFP4_BLOCK: usize = 32;
/// Elements per NVFP4 block.
pub const NVFP4_BLOCK: usize = 16;
/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;
/// Largest E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// What a quantizer refuses.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum QuantError {
    /// The input holds an infinity or NaN.
    #[error("element {index} is {value}; FP4 formats hold finite values only")]
    NonFinite {
        /// Its index.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The length is not a whole number of blocks.
    #[error("{len} elements are not a whole number of {block}-element blocks")]
    Ragged {
        /// Elements given.
        len: usize,
        /// Block size.
        block: usize,
    },
}

/// The 4-bit weight formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp4Format {
    /// 32-element blocks, E8M0 scales.
    Mxfp4,
    /// 16-element blocks, E4M3 scales, an f32 tensor scale.
    Nvfp4,
}

impl Fp4Format {
    /// Elements per block.
    pub fn block(self) -> usize {
        match self {
            Fp4Format::Mxfp4 => MXFP4_BLOCK,
            Fp4Format::Nvfp4 => NVFP4_BLOCK,
        }
    }
    /// Name as written in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fp4Format::Mxfp4 => "mxfp4",
            Fp4Format::Nvfp4 => "nvfp4",
        }
    }
    /// Parses [`name`](Self::name).
    pub fn parse(s: &str) -> Option<Fp4Format> {
        match s {
            "mxfp4" => Some(Fp4Format::Mxfp4),
            "nvfp4" => Some(Fp4Format::Nvfp4),
            _ => None,
        }
    }
}

/// Magnitudes of E2M1 codes 0..=7.
const E2M1_MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The value of an E2M1 code (low 4 bits).
pub fn e2m1_to_f32(code: u8) -> f32 {
    let m = E2M1_MAGNITUDES[(code & 7) as usize];
    if code & 8 != 0 {
        -m
    } else {
        m
    }
}

/// The E2M1 code nearest to `x` (ties to even code, which is the even
/// mantissa), clipping magnitudes above 6 to 6. `x` must be finite.
pub fn f32_to_e2m1(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 8 } else { 0 };
    let a = x.abs();
    // Midpoints between neighbours; at a midpoint the even code wins.
    const MID: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
    let mut code = 7u8;
    for (i, &m) in MID.iter().enumerate() {
        if a < m || (a == m && i % 2 == 0) {
            code = i as u8;
            break;
        }
    }
    // A negative value rounding to zero keeps the sign bit (−0), as a
    // hardware conversion does; it decodes to −0.0.
    sign | code
}

/// The value of an E8M0 scale code: `2^(e - 127)`, NaN for 255.
pub fn e8m0_to_f32(e: u8) -> f32 {
    if e == 255 {
        f32::NAN
    } else {
        (2f64).powi(i32::from(e) - 127) as f32
    }
}

/// The value of an E4M3 (FN) code: bias 7, subnormals, 0x7F/0xFF NaN.
pub fn e4m3_to_f32(c: u8) -> f32 {
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((c >> 3) & 0xF);
    let m = f32::from(c & 7);
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    let v = if e == 0 {
        m / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    sign * v
}

/// The E4M3 code nearest to `x` (ties to even), saturating at ±448. `x` must
/// be finite.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    // Codes 0..=0x7E increase with their value: binary search for the first
    // code not below `a`, then take the nearer neighbour (ties to the even code).
    let (mut lo, mut hi) = (0u8, 0x7Eu8);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if e4m3_to_f32(mid) < a {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let best = if lo == 0 {
        0
    } else {
        let (below, above) = (a - e4m3_to_f32(lo - 1), e4m3_to_f32(lo) - a);
        if below < above || (below == above && (lo - 1) % 2 == 0) {
            lo - 1
        } else {
            lo
        }
    };
    sign | best
}

/// One quantized tensor: packed E2M1 codes and per-block scale codes.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp4Tensor {
    /// The format.
    pub format: Fp4Format,
    /// Two codes per byte, even element in the low nibble.
    pub codes: Vec<u8>,
    /// One scale code per block (E8M0 for MXFP4, E4M3 for NVFP4).
    pub scales: Vec<u8>,
    /// The NVFP4 per-tensor scale (1.0 for MXFP4).
    pub tensor_scale: f32,
}

fn check(x: &[f32], block: usize) -> Result<(), QuantError> {
    if let Some((index, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(QuantError::NonFinite { index, value });
    }
    if x.len() % block != 0 {
        return Err(QuantError::Ragged {
            len: x.len(),
            block,
        });
    }
    Ok(())
}

fn pack(codes: &[u8]) -> Vec<u8> {
    codes.chunks(2).map(|p| p[0] | (p[1] << 4)).collect()
}

/// The MXFP4 scale exponent code of a block with largest magnitude `amax`.
pub fn mxfp4_scale(amax: f32) -> u8 {
    if amax == 0.0 {
        return 0;
    }
    // floor(log2(amax)) from the f32 exponent (exact, subnormals included).
    let e = if amax.to_bits() >> 23 == 0 {
        // Subnormal: position of the highest set mantissa bit.
        -127 - (amax.to_bits().leading_zeros() as i32 - 9)
    } else {
        ((amax.to_bits() >> 23) & 0xFF) as i32 - 127
    };
    (e - 2 + 127).clamp(0, 254) as u8
}

/// Quantizes to MXFP4.
pub fn quantize_mxfp4(x: &[f32]) -> Result<Fp4Tensor, QuantError> {
    check(x, MXFP4_BLOCK)?;
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / MXFP4_BLOCK);
    for b in x.chunks(MXFP4_BLOCK) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = mxfp4_scale(amax);
        let inv = 1.0 / f64::from(e8m0_to_f32(s));
        codes.extend(b.iter().map(|&v| f32_to_e2m1((f64::from(v) * inv) as f32)));
        scales.push(s);
    }
    Ok(Fp4Tensor {
        format: Fp4Format::Mxfp4,
        codes: pack(&codes),
        scales,
        tensor_scale: 1.0,
    })
}

/// Quantizes to NVFP4.
pub fn quantize_nvfp4(x: &[f32]) -> Result<Fp4Tensor, QuantError> {
    check(x, NVFP4_BLOCK)?;
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let g = if amax == 0.0 {
        1.0
    } else {
        amax / (E2M1_MAX * E4M3_MAX)
    };
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / NVFP4_BLOCK);
    for b in x.chunks(NVFP4_BLOCK) {
        let bmax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = f32_to_e4m3(bmax / E2M1_MAX / g);
        let step = f64::from(e4m3_to_f32(s)) * f64::from(g);
        codes.extend(b.iter().map(|&v| {
            if step == 0.0 {
                0
            } else {
                f32_to_e2m1((f64::from(v) / step) as f32)
            }
        }));
        scales.push(s);
    }
    Ok(Fp4Tensor {
        format: Fp4Format::Nvfp4,
        codes: pack(&codes),
        scales,
        tensor_scale: g,
    })
}

/// Quantizes to `format`.
pub fn quantize(format: Fp4Format, x: &[f32]) -> Result<Fp4Tensor, QuantError> {
    match format {
        Fp4Format::Mxfp4 => quantize_mxfp4(x),
        Fp4Format::Nvfp4 => quantize_nvfp4(x),
    }
}

impl Fp4Tensor {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.codes.len() * 2
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }
    /// The scale of block `b` as a float (tensor scale included).
    pub fn block_scale(&self, b: usize) -> f32 {
        match self.format {
            Fp4Format::Mxfp4 => e8m0_to_f32(self.scales[b]),
            Fp4Format::Nvfp4 => e4m3_to_f32(self.scales[b]) * self.tensor_scale,
        }
    }
    /// The values: `code * block scale` (MXFP4) or `(code * E4M3 scale) *
    /// tensor scale` (NVFP4; the first product is exact), rounded once to f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let block = self.format.block();
        (0..self.len())
            .map(|i| {
                let byte = self.codes[i / 2];
                let code = if i % 2 == 0 { byte & 0xF } else { byte >> 4 };
                let b = i / block;
                match self.format {
                    Fp4Format::Mxfp4 => e2m1_to_f32(code) * e8m0_to_f32(self.scales[b]),
                    Fp4Format::Nvfp4 => {
                        e2m1_to_f32(code) * e4m3_to_f32(self.scales[b]) * self.tensor_scale
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2m1_codes_decode_as_specified() {
        let want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for c in 0..8u8 {
            assert_eq!(e2m1_to_f32(c), want[c as usize]);
            assert_eq!(e2m1_to_f32(c | 8), -want[c as usize]);
            assert_eq!(f32_to_e2m1(want[c as usize]), c);
        }
    }
}
