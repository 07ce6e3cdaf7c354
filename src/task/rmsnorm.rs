//! `rmsnorm`: `y[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) * w` for a block of
//! rows; with `cols = head_dim` and one row per head it is Qwen3's per-head
//! q/k norm.

use bytemuck::{Pod, Zeroable};

use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`RmsNorm`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct RmsNormArgs {
    /// Input address, `rows` rows `cols` apart.
    pub x: u64,
    /// Weight address (`cols` elements).
    pub w: u64,
    /// Output address, same layout as `x` (may equal `x`).
    pub y: u64,
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub cols: u32,
    /// Epsilon, f32 bits.
    pub eps: u32,
    /// [`DType`] code of `x`.
    pub x_dtype: u32,
    /// [`DType`] code of `w`.
    pub w_dtype: u32,
    /// [`DType`] code of `y`.
    pub y_dtype: u32,
}

/// Root-mean-square normalisation with a weight.
pub struct RmsNorm;

impl RmsNorm {
    /// Normalises `rows` rows of `cols` elements of `x` into `y`.
    pub fn task(
        x: &BufSlice,
        w: &BufSlice,
        y: &BufSlice,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<TaskSpec, ProgramError> {
        for (n, s) in [("x", x), ("w", w), ("y", y)] {
            want_float::<RmsNorm>(n, s)?;
        }
        if rows == 0
            || cols == 0
            || x.len() < rows * cols
            || y.len() < rows * cols
            || w.len() < cols
        {
            return Err(bad::<RmsNorm>(format!(
                "{rows}x{cols} does not fit x, w or y"
            )));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(bad::<RmsNorm>("eps must be positive"));
        }
        let u = |v: usize| u32::try_from(v).map_err(|_| bad::<RmsNorm>("dimension over 2^32"));
        let args = RmsNormArgs {
            x: x.addr(),
            w: w.addr(),
            y: y.addr(),
            rows: u(rows)?,
            cols: u(cols)?,
            eps: eps.to_bits(),
            x_dtype: x.dtype().code(),
            w_dtype: w.dtype().code(),
            y_dtype: y.dtype().code(),
        };
        Ok(TaskSpec::new::<RmsNorm>(args, &[x, w, y]))
    }
}

/// `x * w / sqrt(mean(x²) + eps)`, the mean in f64.
pub fn normalize(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / x.len() as f64;
    let inv = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

impl TaskKind for RmsNorm {
    type Args = RmsNormArgs;
    const NAME: &'static str = "rmsnorm";
    fn cpu(a: &RmsNormArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let dt = |c| DType::from_code(c).ok_or(TaskFault::BadArgs("rmsnorm dtype"));
        let (xd, wd, yd) = (dt(a.x_dtype)?, dt(a.w_dtype)?, dt(a.y_dtype)?);
        let cols = a.cols as usize;
        let w = mem.read_f32(a.w, wd, cols)?;
        let eps = f32::from_bits(a.eps);
        for r in 0..a.rows as usize {
            let x = mem.read_f32(a.x + (r * cols * xd.size()) as u64, xd, cols)?;
            let y = normalize(&x, &w, eps);
            mem.write_f32(a.y + (r * cols * yd.size()) as u64, yd, &y)?;
        }
        Ok(())
    }
    fn layout() -> Layout {
        layout!(RmsNormArgs {
            x,
            w,
            y,
            rows,
            cols,
            eps,
            x_dtype,
            w_dtype,
            y_dtype
        })
    }
}
