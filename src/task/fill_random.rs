//! `fill_random`: fills a range with counter-based pseudo-random numbers, the
//! same values on every executor and in checkpoints written to disk.

use bytemuck::{Pod, Zeroable};

use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::BufSlice;
use crate::error::ProgramError;

/// Arguments of [`FillRandom`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct FillRandomArgs {
    /// Destination address (element `first` of the tensor).
    pub dst: u64,
    /// Stream key (a hash of seed and tensor name).
    pub key: u64,
    /// Index, within the tensor, of the first element written.
    pub first: u64,
    /// Elements to write.
    pub n: u32,
    /// [`DType`](crate::buffer::DType) code of the destination.
    pub dtype: u32,
    /// Standard deviation (f32 bits).
    pub std: u32,
    /// Mean (f32 bits).
    pub mean: u32,
    /// Zero: element `j` is index `first + j`. Otherwise the destination is a
    /// `width`-wide part of a row-major matrix whose rows are `stride` long:
    /// element `j` is index `first + (j / width) * stride + j % width`.
    pub width: u32,
    /// Row length of the whole matrix (with `width`).
    pub stride: u32,
}

/// Element `i` of the random stream `key`: `mean + std * g`, where `g` has zero
/// mean and unit variance.
///
/// `g` is an Irwin–Hall draw: the sum of the four 16-bit parts of a SplitMix64
/// hash of `key + i * golden`, centred and scaled by `sqrt(3) / 65536`. It uses
/// only integer arithmetic and two correctly rounded f32 operations, so the CUDA
/// twin (`kernels/tasks/fill_random.cuh`) produces bit-identical values. It is
/// bounded by ±sqrt(12)·std, which suits weight initialisation.
pub fn random_value(key: u64, i: u64, std: f32, mean: f32) -> f32 {
    let mut z = key.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let s = (z & 0xFFFF) + ((z >> 16) & 0xFFFF) + ((z >> 32) & 0xFFFF) + (z >> 48);
    let g = (s as i32 - 131_070) as f32 * (1.732_050_8_f32 / 65_536.0);
    mean + std * g
}

/// Fills a range with [`random_value`]s.
pub struct FillRandom;

impl FillRandom {
    /// `dst[j] = random_value(key, first + j, std, mean)` (rounded to the
    /// destination type).
    pub fn task(
        dst: &BufSlice,
        key: u64,
        first: u64,
        std: f32,
        mean: f32,
    ) -> Result<TaskSpec, ProgramError> {
        Self::strided(dst, key, first, 0, 0, std, mean)
    }

    /// The columns `c0..c0 + width` of a row-major matrix with rows of `stride`
    /// elements, starting at row `first / stride`: `dst` holds those columns of
    /// consecutive rows back to back (a shard of the matrix).
    pub fn strided(
        dst: &BufSlice,
        key: u64,
        first: u64,
        width: usize,
        stride: usize,
        std: f32,
        mean: f32,
    ) -> Result<TaskSpec, ProgramError> {
        if width > stride || (width > 0 && dst.len() % width != 0) {
            return Err(bad::<FillRandom>(
                "a strided fill covers whole rows of width <= stride",
            ));
        }
        let width = u32::try_from(width).map_err(|_| bad::<FillRandom>("width"))?;
        let stride = u32::try_from(stride).map_err(|_| bad::<FillRandom>("stride"))?;
        if !dst.dtype().is_float() {
            return Err(bad::<FillRandom>("the destination must be a float buffer"));
        }
        let n =
            u32::try_from(dst.len()).map_err(|_| bad::<FillRandom>("more than 2^32 elements"))?;
        let args = FillRandomArgs {
            dst: dst.addr(),
            key,
            first,
            n,
            dtype: dst.dtype().code(),
            std: std.to_bits(),
            mean: mean.to_bits(),
            width,
            stride,
        };
        Ok(TaskSpec::new::<FillRandom>(args, &[dst]))
    }
}

impl TaskKind for FillRandom {
    type Args = FillRandomArgs;
    const NAME: &'static str = "fill_random";
    fn cpu(a: &FillRandomArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let dtype = crate::buffer::DType::from_code(a.dtype)
            .ok_or(TaskFault::BadArgs("fill_random dtype"))?;
        let (std, mean) = (f32::from_bits(a.std), f32::from_bits(a.mean));
        let index = |j: u64| match u64::from(a.width) {
            0 => a.first + j,
            w => a.first + (j / w) * u64::from(a.stride) + j % w,
        };
        let vals: Vec<f32> = (0..u64::from(a.n))
            .map(|j| random_value(a.key, index(j), std, mean))
            .collect();
        mem.write_f32(a.dst, dtype, &vals)
    }
    fn layout() -> Layout {
        layout!(FillRandomArgs {
            dst,
            key,
            first,
            n,
            dtype,
            std,
            mean,
            width,
            stride
        })
    }
}
