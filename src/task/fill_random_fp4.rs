//! `fill_random_fp4`: random expert weights drawn and quantized to MXFP4 on
//! the executor itself, bit-identical to quantizing
//! [`random_value`]s on the host with
//! [`quantize_mxfp4`](crate::quant::quantize_mxfp4), so that large random
//! MoE models never pass through the host.
//!
//! A task covers `blocks` consecutive 32-element blocks (a multiple of 4) of
//! one `[rows, part_cols]` part of a `[.., full_cols]` matrix (the part starts
//! at `row0`, `col0`), blocks counted row-major over the part, as
//! [`Fp4Experts`](super::gemv_expert_fp4::Fp4Experts) stores them.

use bytemuck::{Pod, Zeroable};

use super::fill_random::random_value;
use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;
use crate::quant::{e8m0_to_f32, f32_to_e2m1, mxfp4_scale, MXFP4_BLOCK};

/// Arguments of [`FillRandomFp4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct FillRandomFp4Args {
    /// Code bytes of block `first_block` (16 per block).
    pub codes: u64,
    /// Scale byte of block `first_block` (one per block).
    pub scales: u64,
    /// Stream key of the whole matrix.
    pub key: u64,
    /// First block of the part this task writes.
    pub first_block: u32,
    /// Blocks written (a multiple of 4).
    pub blocks: u32,
    /// Columns of the part.
    pub part_cols: u32,
    /// Columns of the whole matrix (its random stream's row length).
    pub full_cols: u32,
    /// First row of the part in the whole matrix.
    pub row0: u32,
    /// First column of the part in the whole matrix.
    pub col0: u32,
    /// Standard deviation (f32 bits).
    pub std: u32,
    /// Mean (f32 bits).
    pub mean: u32,
}

/// Random MXFP4 weights.
pub struct FillRandomFp4;

/// Where a [`FillRandomFp4`] task draws from: the whole matrix's stream and
/// the part of it being written.
#[derive(Clone, Copy, Debug)]
pub struct RandomPart {
    /// Stream key.
    pub key: u64,
    /// Standard deviation.
    pub std: f32,
    /// Mean.
    pub mean: f32,
    /// Columns of the whole matrix.
    pub full_cols: usize,
    /// First row and column of the part.
    pub origin: (usize, usize),
    /// Columns of the part (a multiple of 32).
    pub part_cols: usize,
}

impl FillRandomFp4 {
    /// Blocks `first_block..first_block + blocks` of `part`, into `codes`
    /// (`u32` words, starting at that block's codes) and `scales` (`u32`
    /// words, starting at that block's scale).
    pub fn task(
        codes: &BufSlice,
        scales: &BufSlice,
        part: &RandomPart,
        first_block: usize,
        blocks: usize,
    ) -> Result<TaskSpec, ProgramError> {
        if codes.dtype() != DType::U32 || scales.dtype() != DType::U32 {
            return Err(bad::<FillRandomFp4>("codes and scales are u32 words"));
        }
        if blocks == 0 || blocks % 4 != 0 || first_block % 4 != 0 {
            return Err(bad::<FillRandomFp4>("whole groups of four blocks"));
        }
        if part.part_cols == 0 || part.part_cols % MXFP4_BLOCK != 0 {
            return Err(bad::<FillRandomFp4>("the part's rows hold whole blocks"));
        }
        if codes.len() < blocks * 4 || scales.len() < blocks / 4 {
            return Err(bad::<FillRandomFp4>("destination too small"));
        }
        let u = |v: usize| u32::try_from(v).map_err(|_| bad::<FillRandomFp4>("too large"));
        let args = FillRandomFp4Args {
            codes: codes.addr(),
            scales: scales.addr(),
            key: part.key,
            first_block: u(first_block)?,
            blocks: u(blocks)?,
            part_cols: u(part.part_cols)?,
            full_cols: u(part.full_cols)?,
            row0: u(part.origin.0)?,
            col0: u(part.origin.1)?,
            std: part.std.to_bits(),
            mean: part.mean.to_bits(),
        };
        Ok(TaskSpec::new::<FillRandomFp4>(args, &[codes, scales]))
    }
}

impl TaskKind for FillRandomFp4 {
    type Args = FillRandomFp4Args;
    const NAME: &'static str = "fill_random_fp4";
    fn cpu(a: &FillRandomFp4Args, mem: &dyn Memory) -> Result<(), TaskFault> {
        if a.part_cols == 0 || a.blocks % 4 != 0 {
            return Err(TaskFault::BadArgs("fill_random_fp4 shape"));
        }
        let (std, mean) = (f32::from_bits(a.std), f32::from_bits(a.mean));
        let (pc, fc) = (u64::from(a.part_cols), u64::from(a.full_cols));
        let mut codes = Vec::with_capacity(a.blocks as usize * 4);
        let mut scales = Vec::with_capacity(a.blocks as usize / 4);
        let mut scale_word = 0u32;
        for k in 0..u64::from(a.blocks) {
            let b = u64::from(a.first_block) + k;
            let v: Vec<f32> = (0..32)
                .map(|j| {
                    let p = b * 32 + j;
                    let idx = (u64::from(a.row0) + p / pc) * fc + u64::from(a.col0) + p % pc;
                    random_value(a.key, idx, std, mean)
                })
                .collect();
            let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            let s = mxfp4_scale(amax);
            let inv = 1.0 / f64::from(e8m0_to_f32(s));
            for w in v.chunks(8) {
                codes.push(w.iter().enumerate().fold(0u32, |word, (j, &x)| {
                    word | (u32::from(f32_to_e2m1((f64::from(x) * inv) as f32)) << (4 * j))
                }));
            }
            scale_word |= u32::from(s) << (8 * (k % 4));
            if k % 4 == 3 {
                scales.push(scale_word);
                scale_word = 0;
            }
        }
        mem.write_u32(a.codes, &codes)?;
        mem.write_u32(a.scales, &scales)
    }
    fn layout() -> Layout {
        layout!(FillRandomFp4Args {
            codes,
            scales,
            key,
            first_block,
            blocks,
            part_cols,
            full_cols,
            row0,
            col0,
            std,
            mean
        })
    }
}
