//! `gemv_bf16`: `y[m, r] (+)= sum_c W[r, c] * x[m, c]` for a block of rows of a
//! row-major bf16 matrix and 1..=16 input rows, accumulated in f32. One task
//! covers a row range; [`crate::program::ops::gemv`] spreads a matrix over all
//! workers.

use bytemuck::{Pod, Zeroable};

use super::all_reduce::Runs;
use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Most input rows (tokens) one task multiplies at once.
pub const MAX_M: usize = 16;

/// Arguments of [`GemvBf16`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct GemvBf16Args {
    /// Matrix address (row 0), bf16, rows `ldw` elements apart.
    pub w: u64,
    /// Input address, `m` rows `ldx` elements apart.
    pub x: u64,
    /// Output address (row 0 of the whole output), `m` rows `ldy` apart.
    pub y: u64,
    /// First matrix row of this task.
    pub row0: u32,
    /// Matrix rows of this task.
    pub rows: u32,
    /// Columns (multiple of 8).
    pub cols: u32,
    /// Matrix row stride in elements (multiple of 8).
    pub ldw: u32,
    /// Input rows, 1..=16.
    pub m: u32,
    /// Input row stride in elements.
    pub ldx: u32,
    /// Output row stride in elements.
    pub ldy: u32,
    /// [`DType`] code of `x`.
    pub x_dtype: u16,
    /// [`DType`] code of `y`.
    pub y_dtype: u16,
    /// 1: add into `y`; 0: overwrite.
    pub accumulate: u16,
    /// `PROLOGUE_*`: how the input rows are prepared before the product.
    pub prologue: u16,
    /// RMSNorm epsilon (f32 bits), for [`PROLOGUE_RMSNORM`].
    pub eps: u32,
    /// RMSNorm weights (bf16, `cols`) for [`PROLOGUE_RMSNORM`]; the `up` rows
    /// (laid out like `x`) for [`PROLOGUE_SWIGLU`].
    pub aux: u64,
}

/// The input rows are used as they are.
pub const PROLOGUE_NONE: u16 = 0;
/// The product uses `bf16(rmsnorm(x) * aux)` (each row normalised), computed
/// into shared memory by every task: the norm costs no stage of its own.
pub const PROLOGUE_RMSNORM: u16 = 1;
/// The product uses `bf16(silu(x) * aux)` (x the gate rows, aux the up rows).
pub const PROLOGUE_SWIGLU: u16 = 2;

/// How a [`GemvBf16`] task prepares its input rows.
#[derive(Clone, Debug, Default)]
pub enum Prologue {
    /// Use `x` as it is.
    #[default]
    None,
    /// RMSNorm each row of `x` with these weights (bf16, `cols`) and epsilon.
    RmsNorm(BufSlice, f32),
    /// SwiGLU: `x` is the gate, this the up projection (same layout and type).
    Swiglu(BufSlice),
}

/// Bytes by which input rows prepared in shared memory lie further apart than
/// their length (the device's `GEMV_ROW_PAD`: it keeps the FP4 products'
/// reads of two rows at once out of each other's banks).
pub const ROW_PAD: usize = 32;

/// Bytes of shared memory a prologue needs for `m` rows of `cols` (bf16 rows,
/// [`ROW_PAD`] apart).
pub fn prologue_bytes(m: usize, cols: usize) -> usize {
    m * (cols * 2 + ROW_PAD)
}

/// Tensor-core tasks of at most this many matrix rows read their input rows
/// in place even when there are several: each element goes into a warp's
/// fragments once per 16-row tile, at most four times, and the repeats come
/// from L1, while a copy would take shared memory from the staged matrix
/// (and time before the products start). The device's
/// `GEMV_READ_IN_PLACE_ROWS`.
pub const READ_IN_PLACE_ROWS: usize = 64;

/// Most bytes the prepared rows of a fused prologue take (a norm or SwiGLU
/// inside the product), whatever the block's shared memory.
pub const FUSED_PROLOGUE_BYTES: usize = 96 * 1024;

/// Whether a product (bf16 or FP4 experts) can prepare `m` input rows of
/// `cols` itself in a block with `shared` bytes of dynamic shared memory:
/// the rows, their reduction scratch, and the partials the device keeps
/// beside them (one tensor-core tile of a bf16 product, a group of an FP4
/// expert product: 16 KiB), with slack. Otherwise the norm or SwiGLU runs as
/// a stage of its own, with the same arithmetic.
pub fn prologue_fits(m: usize, cols: usize, shared: usize) -> bool {
    let rows = prologue_bytes(m, cols);
    let partials = tensor_core_scratch(cols, 16).max(16 * 1024);
    m * cols * 2 <= FUSED_PROLOGUE_BYTES && rows + 128 + partials + 512 <= shared
}

/// Whether a product runs on tensor cores on the GPU (the device's
/// `gemv_mma_ok`): columns a multiple of 32 and bf16 input rows, as given
/// (16-byte aligned; rows of 32k columns stay aligned) or prepared by a
/// prologue. The choice never depends
/// on the input-row count, so a row's result is the same alone or in a block.
pub fn takes_tensor_cores(cols: usize, x: &BufSlice, prologue: &Prologue) -> bool {
    cols % 32 == 0
        && (!matches!(prologue, Prologue::None) || (x.dtype() == DType::Bf16 && x.addr() % 16 == 0))
}

/// Shared memory (bytes) the tensor-core path keeps beside the input rows
/// of a task of `rows` matrix rows: the column-slice partials of up to eight
/// 16-row tiles for 16 input rows (one slice per 256 columns up to 4096
/// columns, else per 512; the device's `gemv_mma_tile_bytes` per tile) and
/// alignment slack. The device runs a task's rows in groups of as many tiles
/// as its partials fit, each group closed by two block barriers; with one
/// tile's room, a staged product's rows ran one or two tiles at a time.
pub fn tensor_core_scratch(cols: usize, rows: usize) -> usize {
    let slice = if cols <= 4096 { 256 } else { 512 };
    cols.div_ceil(slice) * 16 * 16 * 4 * rows.div_ceil(16).clamp(1, 8) + 256
}

/// Row-block matrix-vector product with a bf16 matrix.
pub struct GemvBf16;

/// Shape of one matrix-vector product: `y[m, rows] (+)= x[m, cols] · Wᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvShape {
    /// Matrix rows (outputs per input row).
    pub rows: usize,
    /// Matrix columns (inputs per input row).
    pub cols: usize,
    /// Input rows.
    pub m: usize,
}

impl GemvBf16 {
    /// The output elements a task writes: `y`'s address, its element type
    /// and the runs (one per input row) of `y`'s elements.
    pub(crate) fn written(a: &GemvBf16Args) -> (u64, Option<DType>, Runs) {
        let runs = Runs::strided(a.row0, a.rows, a.m, a.ldy);
        (a.y, DType::from_code(u32::from(a.y_dtype)), runs)
    }

    /// Rows `row0..row0 + rows` of the product; `w` is `[shape.rows, shape.cols]`,
    /// `x` is `[m, cols]`, `y` is `[m, shape.rows]`, all dense.
    pub fn rows(
        w: &BufSlice,
        x: &BufSlice,
        y: &BufSlice,
        shape: GemvShape,
        row0: usize,
        rows: usize,
        accumulate: bool,
    ) -> Result<TaskSpec, ProgramError> {
        Self::rows_with(w, x, y, shape, row0, rows, accumulate, &Prologue::None)
    }

    /// [`rows`](Self::rows) with the input rows prepared by `prologue`.
    #[allow(clippy::too_many_arguments)]
    pub fn rows_with(
        w: &BufSlice,
        x: &BufSlice,
        y: &BufSlice,
        shape: GemvShape,
        row0: usize,
        rows: usize,
        accumulate: bool,
        prologue: &Prologue,
    ) -> Result<TaskSpec, ProgramError> {
        let GemvShape {
            rows: total,
            cols,
            m,
        } = shape;
        if w.dtype() != DType::Bf16 {
            return Err(bad::<GemvBf16>("matrix must be bf16"));
        }
        want_float::<GemvBf16>("x", x)?;
        want_float::<GemvBf16>("y", y)?;
        if !(1..=MAX_M).contains(&m) {
            return Err(bad::<GemvBf16>(format!("m = {m}; supported 1..={MAX_M}")));
        }
        if cols == 0 || cols % 8 != 0 {
            return Err(bad::<GemvBf16>(format!(
                "cols = {cols}; must be a positive multiple of 8"
            )));
        }
        if rows == 0 || row0 + rows > total {
            return Err(bad::<GemvBf16>(format!(
                "rows {row0}..{} of {total}",
                row0 + rows
            )));
        }
        let need = |what: &str, s: &BufSlice, n: usize| {
            if s.len() < n {
                Err(bad::<GemvBf16>(format!(
                    "{what} has {} elements, needs {n}",
                    s.len()
                )))
            } else {
                Ok(())
            }
        };
        need("w", w, total * cols)?;
        need("x", x, m * cols)?;
        need("y", y, m * total)?;
        if w.addr() % 16 != 0 || x.addr() % 16 != 0 {
            return Err(bad::<GemvBf16>("w and x must be 16-byte aligned"));
        }
        let (code, eps, aux) = match prologue {
            Prologue::None => (PROLOGUE_NONE, 0.0, 0),
            Prologue::RmsNorm(nw, eps) => {
                if nw.dtype() != DType::Bf16 || nw.len() < cols || eps.is_nan() || *eps <= 0.0 {
                    return Err(bad::<GemvBf16>(
                        "RMSNorm weights must be bf16 [cols], eps > 0",
                    ));
                }
                (PROLOGUE_RMSNORM, *eps, nw.addr())
            }
            Prologue::Swiglu(up) => {
                if up.dtype() != x.dtype() || up.len() < m * cols {
                    return Err(bad::<GemvBf16>("up must match x in type and size"));
                }
                (PROLOGUE_SWIGLU, 0.0, up.addr())
            }
        };
        let u = |v: usize| u32::try_from(v).map_err(|_| bad::<GemvBf16>("dimension over 2^32"));
        let args = GemvBf16Args {
            w: w.addr(),
            x: x.addr(),
            y: y.addr(),
            row0: u(row0)?,
            rows: u(rows)?,
            cols: u(cols)?,
            ldw: u(cols)?,
            m: u(m)?,
            ldx: u(cols)?,
            ldy: u(total)?,
            x_dtype: x.dtype().code() as u16,
            y_dtype: y.dtype().code() as u16,
            accumulate: u16::from(accumulate),
            prologue: code,
            eps: eps.to_bits(),
            aux,
        };
        let first = w.addr() + (row0 * cols * 2) as u64;
        let mut bufs = vec![w, x, y];
        if let Prologue::RmsNorm(b, _) | Prologue::Swiglu(b) = prologue {
            bufs.push(b);
        }
        // Shared memory the task uses below a staged slice: the prepared or
        // copied input rows (gemv_input on the device; a tensor-core task of
        // few rows reads them in place, see READ_IN_PLACE_ROWS).
        let in_place = takes_tensor_cores(cols, x, prologue) && rows <= READ_IN_PLACE_ROWS;
        let copied = if m > 1 && !in_place {
            m * (cols * x.dtype().size() + ROW_PAD)
        } else {
            0
        };
        // A prologue's rows and its reduction scratch; without one, the
        // copied rows (none for a single row: it is read in place).
        let mut scratch = match prologue {
            Prologue::None => copied,
            _ => prologue_bytes(m, cols) + 128,
        };
        if takes_tensor_cores(cols, x, prologue) {
            scratch = scratch.next_multiple_of(128) + tensor_core_scratch(cols, rows);
        }
        Ok(TaskSpec::new::<GemvBf16>(args, &bufs)
            .with_prefetch(first, (rows * cols * 2) as u64)
            .with_scratch(u32::try_from(scratch).unwrap_or(u32::MAX)))
    }
}

/// The CPU reference of a product described by `a` (input rows, prologue,
/// output), with matrix row `r` given by `weight_row(r)` in f32.
pub(crate) fn cpu_product(
    a: &GemvBf16Args,
    mem: &dyn Memory,
    weight_row: &dyn Fn(usize) -> Result<Vec<f32>, TaskFault>,
) -> Result<(), TaskFault> {
    let xd = DType::from_code(u32::from(a.x_dtype)).ok_or(TaskFault::BadArgs("gemv dtype"))?;
    let yd = DType::from_code(u32::from(a.y_dtype)).ok_or(TaskFault::BadArgs("gemv dtype"))?;
    let (cols, m) = (a.cols as usize, a.m as usize);
    let row_at = |base: u64, i: usize| base + (i * a.ldx as usize * xd.size()) as u64;
    let mut xs: Vec<Vec<f32>> = (0..m)
        .map(|i| mem.read_f32(row_at(a.x, i), xd, cols))
        .collect::<Result<_, _>>()?;
    let bf16 = |v: f32| half::bf16::from_f32(v).to_f32();
    match a.prologue {
        PROLOGUE_NONE => {}
        PROLOGUE_RMSNORM => {
            let nw = mem.read_f32(a.aux, DType::Bf16, cols)?;
            for x in &mut xs {
                *x = super::rmsnorm::normalize(x, &nw, f32::from_bits(a.eps));
                x.iter_mut().for_each(|v| *v = bf16(*v));
            }
        }
        PROLOGUE_SWIGLU => {
            for (i, x) in xs.iter_mut().enumerate() {
                let up = mem.read_f32(row_at(a.aux, i), xd, cols)?;
                for (g, u) in x.iter_mut().zip(up) {
                    *g = bf16(super::swiglu::silu(*g) * u);
                }
            }
        }
        _ => return Err(TaskFault::BadArgs("gemv prologue")),
    }
    let mut out = vec![vec![0f32; a.rows as usize]; m];
    for r in 0..a.rows as usize {
        let row = a.row0 as usize + r;
        let w = weight_row(row)?;
        for (o, x) in out.iter_mut().zip(&xs) {
            o[r] = w.iter().zip(x).map(|(p, q)| p * q).sum();
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        let addr = a.y + ((i * a.ldy as usize + a.row0 as usize) * yd.size()) as u64;
        if a.accumulate != 0 {
            let old = mem.read_f32(addr, yd, o.len())?;
            o.iter_mut().zip(old).for_each(|(v, p)| *v += p);
        }
        mem.write_f32(addr, yd, o)?;
    }
    Ok(())
}

impl TaskKind for GemvBf16 {
    type Args = GemvBf16Args;
    const NAME: &'static str = "gemv_bf16";
    fn cpu(a: &GemvBf16Args, mem: &dyn Memory) -> Result<(), TaskFault> {
        let ldw = a.ldw as usize;
        cpu_product(a, mem, &|row| {
            mem.read_f32(a.w + (row * ldw * 2) as u64, DType::Bf16, a.cols as usize)
        })
    }
    fn layout() -> Layout {
        layout!(GemvBf16Args {
            w,
            x,
            y,
            row0,
            rows,
            cols,
            ldw,
            m,
            ldx,
            ldy,
            x_dtype,
            y_dtype,
            accumulate,
            prologue,
            eps,
            aux
        })
    }
}

#[cfg(test)]
mod tests {
    use super::prologue_fits;

    #[test]
    fn prologues_fuse_only_where_they_fit() {
        // A draft block's SwiGLU input, 8 rows of 6144: 130 KiB holds it
        // beside the partials, 98 KiB (the default) does not.
        assert!(prologue_fits(8, 6144, 130 * 1024));
        assert!(!prologue_fits(8, 6144, 98 * 1024));
        assert!(prologue_fits(1, 2048, 48 * 1024));
        // Over the cap whatever the shared memory.
        assert!(!prologue_fits(16, 4096, 227 * 1024));
    }
}
