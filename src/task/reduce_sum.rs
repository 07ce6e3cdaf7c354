//! `reduce_sum`: one block sums a range into one number. A reduction across
//! SMs is several of these over parts of the input, writing partial sums, and
//! one more over the partials (see [`crate::program::ops::reduce_sum`]).

use bytemuck::{Pod, Zeroable};

use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`ReduceSum`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ReduceSumArgs {
    /// Output address (one element).
    pub out: u64,
    /// Input address.
    pub x: u64,
    /// Input elements.
    pub n: u32,
    /// [`DType`] code of the input.
    pub x_dtype: u32,
    /// [`DType`] code of the output.
    pub out_dtype: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Sum of a range, accumulated in f32.
pub struct ReduceSum;

impl ReduceSum {
    /// `out[0] = sum(x)`.
    pub fn task(x: &BufSlice, out: &BufSlice) -> Result<TaskSpec, ProgramError> {
        want_float::<ReduceSum>("x", x)?;
        want_float::<ReduceSum>("out", out)?;
        if out.is_empty() {
            return Err(bad::<ReduceSum>("empty output"));
        }
        let n = u32::try_from(x.len()).map_err(|_| bad::<ReduceSum>("more than 2^32 elements"))?;
        let args = ReduceSumArgs {
            out: out.addr(),
            x: x.addr(),
            n,
            x_dtype: x.dtype().code(),
            out_dtype: out.dtype().code(),
            reserved: 0,
        };
        Ok(TaskSpec::new::<ReduceSum>(args, &[x, out]))
    }
}

impl TaskKind for ReduceSum {
    type Args = ReduceSumArgs;
    const NAME: &'static str = "reduce_sum";
    fn cpu(a: &ReduceSumArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let xd = DType::from_code(a.x_dtype).ok_or(TaskFault::BadArgs("reduce dtype"))?;
        let od = DType::from_code(a.out_dtype).ok_or(TaskFault::BadArgs("reduce dtype"))?;
        let x = mem.read_f32(a.x, xd, a.n as usize)?;
        let s: f64 = x.iter().map(|&v| f64::from(v)).sum();
        mem.write_f32(a.out, od, &[s as f32])
    }
    fn layout() -> Layout {
        layout!(ReduceSumArgs {
            out,
            x,
            n,
            x_dtype,
            out_dtype,
            reserved
        })
    }
}
