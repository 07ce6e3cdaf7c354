//! `axpy`: `y = alpha * x + y` over a range, f32 arithmetic.

use bytemuck::{Pod, Zeroable};

use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`Axpy`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AxpyArgs {
    /// `y` address (read and written).
    pub y: u64,
    /// `x` address.
    pub x: u64,
    /// `alpha` as f32 bits (slot 2; may be a parameter).
    pub alpha: u64,
    /// Elements.
    pub n: u32,
    /// [`DType`] code of `x`.
    pub x_dtype: u32,
    /// [`DType`] code of `y`.
    pub y_dtype: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// `y = alpha * x + y`.
pub struct Axpy;

impl Axpy {
    /// `y[i] = alpha * x[i] + y[i]` for `i < y.len()`.
    pub fn task(y: &BufSlice, x: &BufSlice, alpha: f32) -> Result<TaskSpec, ProgramError> {
        want_float::<Axpy>("x", x)?;
        want_float::<Axpy>("y", y)?;
        if x.len() != y.len() {
            return Err(bad::<Axpy>(format!(
                "x has {} elements, y {}",
                x.len(),
                y.len()
            )));
        }
        let n = u32::try_from(y.len()).map_err(|_| bad::<Axpy>("more than 2^32 elements"))?;
        let args = AxpyArgs {
            y: y.addr(),
            x: x.addr(),
            alpha: u64::from(alpha.to_bits()),
            n,
            x_dtype: x.dtype().code(),
            y_dtype: y.dtype().code(),
            reserved: 0,
        };
        Ok(TaskSpec::new::<Axpy>(args, &[y, x]))
    }
}

impl TaskKind for Axpy {
    type Args = AxpyArgs;
    const NAME: &'static str = "axpy";
    const PARAM_SLOTS: u16 = 1 << 2;
    fn cpu(a: &AxpyArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let xd = DType::from_code(a.x_dtype).ok_or(TaskFault::BadArgs("axpy dtype"))?;
        let yd = DType::from_code(a.y_dtype).ok_or(TaskFault::BadArgs("axpy dtype"))?;
        let n = a.n as usize;
        let alpha = f32::from_bits(a.alpha as u32);
        let x = mem.read_f32(a.x, xd, n)?;
        let mut y = mem.read_f32(a.y, yd, n)?;
        for (yi, xi) in y.iter_mut().zip(&x) {
            *yi = alpha.mul_add(*xi, *yi);
        }
        mem.write_f32(a.y, yd, &y)
    }
    fn layout() -> Layout {
        layout!(AxpyArgs {
            y,
            x,
            alpha,
            n,
            x_dtype,
            y_dtype,
            reserved
        })
    }
}
