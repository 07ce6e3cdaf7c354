//! `fill`: sets every element of a range to one value.

use bytemuck::{Pod, Zeroable};

use super::{bad, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`Fill`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct FillArgs {
    /// Destination address.
    pub dst: u64,
    /// Elements to write.
    pub n: u32,
    /// [`DType`] code of the destination.
    pub dtype: u32,
    /// Value: f32 bits for float destinations, the integer for `u32` (slot 2; may be a parameter).
    pub value: u64,
}

/// Fills a range with one value.
pub struct Fill;

impl Fill {
    /// `dst[..] = value` (rounded to the destination type).
    pub fn task(dst: &BufSlice, value: f32) -> Result<TaskSpec, ProgramError> {
        if !dst.dtype().is_float() {
            return Err(bad::<Fill>(
                "float value for an integer buffer; use Fill::u32",
            ));
        }
        Self::bits(dst, u64::from(value.to_bits()))
    }

    /// `dst[..] = value` for a `u32` buffer.
    pub fn u32(dst: &BufSlice, value: u32) -> Result<TaskSpec, ProgramError> {
        if dst.dtype() != DType::U32 {
            return Err(bad::<Fill>("Fill::u32 needs a u32 buffer"));
        }
        Self::bits(dst, u64::from(value))
    }

    fn bits(dst: &BufSlice, value: u64) -> Result<TaskSpec, ProgramError> {
        let n = u32::try_from(dst.len()).map_err(|_| bad::<Fill>("more than 2^32 elements"))?;
        let args = FillArgs {
            dst: dst.addr(),
            n,
            dtype: dst.dtype().code(),
            value,
        };
        Ok(TaskSpec::new::<Fill>(args, &[dst]))
    }
}

impl TaskKind for Fill {
    type Args = FillArgs;
    const NAME: &'static str = "fill";
    const PARAM_SLOTS: u16 = 1 << 2;
    fn cpu(a: &FillArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let dtype = DType::from_code(a.dtype).ok_or(TaskFault::BadArgs("fill dtype"))?;
        let n = a.n as usize;
        if dtype.is_float() {
            mem.write_f32(a.dst, dtype, &vec![f32::from_bits(a.value as u32); n])
        } else {
            mem.write_u32(a.dst, &vec![a.value as u32; n])
        }
    }
    fn layout() -> Layout {
        layout!(FillArgs {
            dst,
            n,
            dtype,
            value
        })
    }
}
