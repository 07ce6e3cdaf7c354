//! `sample`: draws the next token from logits with temperature, top-k and
//! top-p (nucleus) filtering, from a seeded counter-based stream.
//!
//! Semantics (the CPU reference below and `kernels/tasks/sample.cuh`):
//! candidates are the `k` largest logits (`k = top_k`, 0 meaning
//! [`MAX_TOP_K`], ties broken by lower token id), in that order; their weights
//! are `exp((l - l_max) / temperature)`; the nucleus is the shortest prefix
//! whose cumulative weight reaches `top_p` of the total; the token is the
//! first whose cumulative weight exceeds `u * nucleus weight`, where `u` is
//! [`uniform`]`(seed, position)`. The same seed and position give the same
//! draw. Weights are summed in order in f32, so executors agree up to the
//! rounding of `exp`.

use bytemuck::{Pod, Zeroable};

use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Most candidates a draw considers (the largest `top_k`).
pub const MAX_TOP_K: u32 = 1024;

/// Sampling settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Softmax temperature, > 0.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: [`MAX_TOP_K`]; at most that).
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose probability reaches
    /// this, in (0, 1].
    pub top_p: f32,
    /// Seed of the draws.
    pub seed: u64,
}

impl Sampling {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ProgramError> {
        let t = self.temperature;
        if t.is_nan() || t <= 0.0 || !t.is_finite() {
            return Err(bad::<Sample>(format!(
                "temperature {t} must be positive and finite"
            )));
        }
        if self.top_p.is_nan() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(bad::<Sample>(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if self.top_k > MAX_TOP_K {
            return Err(bad::<Sample>(format!(
                "top_k {} exceeds {MAX_TOP_K}",
                self.top_k
            )));
        }
        Ok(())
    }

    /// The five `u32` words the device reads: temperature, top_k, top_p, seed
    /// low, seed high.
    pub fn words(&self) -> [u32; 5] {
        [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.seed as u32,
            (self.seed >> 32) as u32,
        ]
    }
}

/// A uniform draw in `[0, 1)` for `(seed, position)`: SplitMix64, 24 bits.
pub fn uniform(seed: u64, pos: u32) -> f32 {
    let mut z = seed.wrapping_add((u64::from(pos) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as u32 as f32 * (1.0 / 16_777_216.0)
}

/// Arguments of [`Sample`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SampleArgs {
    /// Logits, f32 `[vocab]`.
    pub logits: u64,
    /// [`Sampling::words`] (u32 `[5]`).
    pub params: u64,
    /// Position of the token being drawn (u32; selects the draw).
    pub pos: u64,
    /// The token (u32).
    pub out: u64,
    /// Vocabulary size.
    pub vocab: u32,
    /// Zero.
    pub reserved: u32,
}

/// Seeded top-k / top-p sampling of one token (one task).
pub struct Sample;

impl Sample {
    /// Draws `out[0]` from `logits` with the settings in `params`.
    pub fn task(
        logits: &BufSlice,
        params: &BufSlice,
        pos: &BufSlice,
        out: &BufSlice,
    ) -> Result<TaskSpec, ProgramError> {
        if logits.dtype() != DType::F32 || logits.is_empty() {
            return Err(bad::<Sample>("logits must be f32"));
        }
        for (what, s, n) in [("params", params, 5), ("pos", pos, 1), ("out", out, 1)] {
            if s.dtype() != DType::U32 || s.len() < n {
                return Err(bad::<Sample>(format!("{what} must be u32 [{n}]")));
            }
        }
        let args = SampleArgs {
            logits: logits.addr(),
            params: params.addr(),
            pos: pos.addr(),
            out: out.addr(),
            vocab: u32::try_from(logits.len())
                .map_err(|_| bad::<Sample>("vocabulary over 2^32"))?,
            reserved: 0,
        };
        Ok(TaskSpec::new::<Sample>(args, &[logits, params, pos, out]))
    }
}

/// The token drawn from `logits` (the reference semantics).
pub fn draw(logits: &[f32], s: &Sampling, pos: u32) -> u32 {
    let k = if s.top_k == 0 {
        MAX_TOP_K
    } else {
        s.top_k.min(MAX_TOP_K)
    } as usize;
    let key = |v: f32| -> u32 {
        if v.is_nan() {
            0
        } else if v.to_bits() & 0x8000_0000 != 0 {
            !v.to_bits()
        } else {
            v.to_bits() | 0x8000_0000
        }
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        key(logits[b as usize])
            .cmp(&key(logits[a as usize]))
            .then(a.cmp(&b))
    });
    order.truncate(k.min(logits.len()));
    let top = logits[order[0] as usize];
    let p: Vec<f32> = order
        .iter()
        .map(|&i| ((logits[i as usize] - top) / s.temperature).exp())
        .collect();
    let total: f32 = p.iter().sum();
    let mut cum = 0f32;
    let mut kept = p.len();
    for (r, w) in p.iter().enumerate() {
        cum += w;
        if cum >= s.top_p * total {
            kept = r + 1;
            break;
        }
    }
    let target = uniform(s.seed, pos) * cum;
    let mut run = 0f32;
    for r in 0..kept {
        run += p[r];
        if run > target {
            return order[r];
        }
    }
    order[kept - 1]
}

impl TaskKind for Sample {
    type Args = SampleArgs;
    const NAME: &'static str = "sample";
    fn cpu(a: &SampleArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let w = mem.read_u32(a.params, 5)?;
        let s = Sampling {
            temperature: f32::from_bits(w[0]),
            top_k: w[1],
            top_p: f32::from_bits(w[2]),
            seed: u64::from(w[3]) | (u64::from(w[4]) << 32),
        };
        let logits = mem.read_f32(a.logits, DType::F32, a.vocab as usize)?;
        let pos = mem.read_u32(a.pos, 1)?[0];
        mem.write_u32(a.out, &[draw(&logits, &s, pos)])
    }
    fn layout() -> Layout {
        layout!(SampleArgs {
            logits,
            params,
            pos,
            out,
            vocab,
            reserved
        })
    }
}
