//! `copy`: copies one row of a row-major source (chosen by an index that may
//! come from a command parameter) into a destination, converting float types.

use bytemuck::{Pod, Zeroable};

use super::{bad, want_len, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`Copy`](struct@Copy).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct CopyArgs {
    /// Destination address.
    pub dst: u64,
    /// Source address (row 0).
    pub src: u64,
    /// Row to copy (slot 2; may be a parameter; checked against `src_rows`).
    pub row: u64,
    /// Elements per row.
    pub n: u32,
    /// Rows in the source.
    pub src_rows: u32,
    /// [`DType`] code of the destination.
    pub dst_dtype: u32,
    /// [`DType`] code of the source.
    pub src_dtype: u32,
}

/// Row copy with type conversion.
pub struct Copy;

impl Copy {
    /// `dst[..n] = src[..n]` with `n = dst.len()`.
    pub fn task(dst: &BufSlice, src: &BufSlice) -> Result<TaskSpec, ProgramError> {
        Self::row(dst, src, dst.len(), 0)
    }

    /// `dst[..n] = src[row * n..(row + 1) * n]`; `src` holds `src.len() / n` rows.
    pub fn row(
        dst: &BufSlice,
        src: &BufSlice,
        n: usize,
        row: u32,
    ) -> Result<TaskSpec, ProgramError> {
        if n == 0 {
            return Err(bad::<Copy>("empty row"));
        }
        if dst.dtype().is_float() != src.dtype().is_float() {
            return Err(bad::<Copy>("cannot convert between integer and float"));
        }
        want_len::<Copy>("dst", dst, n)?;
        let rows = src.len() / n;
        let n32 = u32::try_from(n).map_err(|_| bad::<Copy>("row too long"))?;
        let src_rows = u32::try_from(rows).map_err(|_| bad::<Copy>("too many rows"))?;
        if rows == 0 {
            return Err(bad::<Copy>("source shorter than one row"));
        }
        let args = CopyArgs {
            dst: dst.addr(),
            src: src.addr(),
            row: u64::from(row),
            n: n32,
            src_rows,
            dst_dtype: dst.dtype().code(),
            src_dtype: src.dtype().code(),
        };
        Ok(TaskSpec::new::<Copy>(args, &[dst, src]))
    }
}

impl TaskKind for Copy {
    type Args = CopyArgs;
    const NAME: &'static str = "copy";
    const PARAM_SLOTS: u16 = 1 << 2;
    fn cpu(a: &CopyArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        if a.row >= u64::from(a.src_rows) {
            return Err(TaskFault::OutOfRange {
                index: a.row,
                bound: u64::from(a.src_rows),
            });
        }
        let dd = DType::from_code(a.dst_dtype).ok_or(TaskFault::BadArgs("copy dtype"))?;
        let sd = DType::from_code(a.src_dtype).ok_or(TaskFault::BadArgs("copy dtype"))?;
        let n = a.n as usize;
        let src = a.src + a.row * u64::from(a.n) * sd.size() as u64;
        if dd.is_float() {
            let v = mem.read_f32(src, sd, n)?;
            mem.write_f32(a.dst, dd, &v)
        } else {
            let v = mem.read_u32(src, n)?;
            mem.write_u32(a.dst, &v)
        }
    }
    fn layout() -> Layout {
        layout!(CopyArgs {
            dst,
            src,
            row,
            n,
            src_rows,
            dst_dtype,
            src_dtype
        })
    }
}
