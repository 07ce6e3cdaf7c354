//! `gemv_expert_fp4`: [`gemv_expert`](super::gemv_expert) with each expert's
//! matrix in MXFP4 or NVFP4 ([`crate::quant`]), decoded in registers.
//!
//! Layout ([`Fp4Experts`]): `codes` holds the experts' `[rows, cols]` matrices
//! back to back, two E2M1 codes per byte (even column in the low nibble);
//! `scales` holds, per expert, its `[rows, cols / block]` scale codes (E8M0 or
//! E4M3), for NVFP4 followed by the expert's f32 tensor scale, the region
//! padded to 16 bytes. Inputs and outputs are as for `gemv_expert`, with the
//! same prologues.

use bytemuck::{Pod, Zeroable};

use super::gemv_bf16::{cpu_product, GemvBf16Args, Prologue};
use super::gemv_bf16::{PROLOGUE_NONE, PROLOGUE_RMSNORM, PROLOGUE_SWIGLU};
use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, Buffer, DType};
use crate::error::{ProgramError, Result};
use crate::exec::{Executor, ExecutorExt};
use crate::quant::{self, Fp4Format};

/// Arguments of [`GemvExpertFp4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct GemvExpertFp4Args {
    /// Codes of expert 0.
    pub w: u64,
    /// Scale region of expert 0.
    pub scales: u64,
    /// Input rows (slot 0 when per slot).
    pub x: u64,
    /// Output of slot 0 (`[m, ldy]`).
    pub y: u64,
    /// Routing list: count, then expert ids.
    pub list: u64,
    /// Prologue operand (as in `gemv_bf16`).
    pub aux: u64,
    /// First matrix row of this task.
    pub row0: u32,
    /// Matrix rows of this task.
    pub rows: u32,
    /// Columns (a multiple of 32).
    pub cols: u32,
    /// Input rows, 1..=16.
    pub m: u32,
    /// Rows of each expert's matrix (the output row stride).
    pub ldy: u32,
    /// [`DType`] code of `x`.
    pub x_dtype: u8,
    /// [`DType`] code of `y`.
    pub y_dtype: u8,
    /// `PROLOGUE_*` of `gemv_bf16`.
    pub prologue: u8,
    /// 0: MXFP4, 1: NVFP4.
    pub format: u8,
    /// RMSNorm epsilon (f32 bits).
    pub eps: u32,
    /// Slot of the list this task serves (spread: the task's index).
    pub slot: u16,
    /// Bit 0: accumulate into `y`; bit 1: the input is per slot; bit 2
    /// ([`SPREAD`]): the task takes a share of every chosen expert's rows.
    pub flags: u16,
    /// Capacity of the routing list (where the row masks start).
    pub slots: u32,
    /// Spread: the number of tasks sharing the work; otherwise zero.
    pub reserved: u32,
}

/// Flag of [`GemvExpertFp4Args::flags`]: the chosen experts' matrices are cut
/// into units of `rows` rows, one unit per pass over two of the input rows
/// routed to the expert, dealt evenly over `reserved` tasks at run time, so
/// every SM streams an equal share however many experts a block of rows
/// chose and however unevenly.
pub const SPREAD: u16 = 4;

/// FP4 expert matrix-vector product through the routing list.
pub struct GemvExpertFp4;

/// Stacked FP4 expert matrices on an executor.
#[derive(Clone, Debug)]
pub struct Fp4Experts {
    /// The format.
    pub format: Fp4Format,
    /// Codes (bytes, held in a `u32` buffer).
    pub codes: Buffer,
    /// Scale regions (bytes, held in a `u32` buffer).
    pub scales: Buffer,
    /// Number of experts.
    pub experts: usize,
    /// Rows of each matrix.
    pub rows: usize,
    /// Columns of each matrix.
    pub cols: usize,
}

/// Bytes of one expert's scale region (block scales, NVFP4 tensor scale, padding).
pub fn scale_stride(format: Fp4Format, rows: usize, cols: usize) -> usize {
    let extra = if format == Fp4Format::Nvfp4 { 4 } else { 0 };
    (rows * (cols / format.block()) + extra).next_multiple_of(16)
}

fn format_code(f: Fp4Format) -> u8 {
    match f {
        Fp4Format::Mxfp4 => 0,
        Fp4Format::Nvfp4 => 1,
    }
}

/// Bytes as `u32` words (zero padded).
fn words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect()
}

impl Fp4Experts {
    /// Quantizes `experts` matrices (`[rows, cols]` each, f32) and uploads them.
    pub fn upload(
        ex: &dyn Executor,
        format: Fp4Format,
        rows: usize,
        cols: usize,
        experts: &[Vec<f32>],
    ) -> Result<Fp4Experts> {
        let q = experts
            .iter()
            .enumerate()
            .map(|(e, m)| {
                quant::quantize(format, m).map_err(|err| {
                    crate::error::Error::InvalidArgument(format!("expert {e}: {err}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::upload_quantized(ex, format, rows, cols, &q)
    }

    /// Uploads already quantized `[rows, cols]` matrices.
    pub fn upload_quantized(
        ex: &dyn Executor,
        format: Fp4Format,
        rows: usize,
        cols: usize,
        experts: &[quant::Fp4Tensor],
    ) -> Result<Fp4Experts> {
        let fits = |e: &quant::Fp4Tensor| e.len() == rows * cols && e.format == format;
        // 16-byte code rows; a 4-byte aligned NVFP4 tensor scale.
        if cols % 32 != 0 || (rows * cols / 16) % 4 != 0 || !experts.iter().all(fits) {
            return Err(crate::error::Error::InvalidArgument(format!(
                "FP4 experts need {format:?} [rows, cols] matrices, cols a multiple of 32 and rows * cols of 64 (rows {rows}, cols {cols})"
            )));
        }
        let stride = scale_stride(format, rows, cols);
        let mut codes = Vec::with_capacity(experts.len() * rows * cols / 2);
        let mut scales = vec![0u8; experts.len() * stride];
        for (e, q) in experts.iter().enumerate() {
            codes.extend_from_slice(&q.codes);
            let region = &mut scales[e * stride..(e + 1) * stride];
            region[..q.scales.len()].copy_from_slice(&q.scales);
            if format == Fp4Format::Nvfp4 {
                region[q.scales.len()..q.scales.len() + 4]
                    .copy_from_slice(&q.tensor_scale.to_le_bytes());
            }
        }
        let put = |bytes: &[u8]| -> Result<Buffer> {
            let w = words(bytes);
            let buf = ex.alloc(DType::U32, w.len())?;
            ex.write_u32(&buf, &w)?;
            Ok(buf)
        };
        Ok(Fp4Experts {
            format,
            codes: put(&codes)?,
            scales: put(&scales)?,
            experts: experts.len(),
            rows,
            cols,
        })
    }

    /// Bytes the matrices occupy (codes and scales).
    pub fn bytes(&self) -> usize {
        self.codes.len() * 4 + self.scales.len() * 4
    }
}

impl GemvExpertFp4 {
    /// Task `task` of `tasks` that together compute every chosen expert's
    /// product ([`SPREAD`]), in units of `unit_rows` matrix rows.
    #[allow(clippy::too_many_arguments)]
    pub fn spread(
        w: &Fp4Experts,
        x: &BufSlice,
        y: &BufSlice,
        list: &BufSlice,
        m: usize,
        slots: usize,
        x_per_slot: bool,
        task: usize,
        tasks: usize,
        unit_rows: usize,
        accumulate: bool,
        prologue: &Prologue,
    ) -> Result<TaskSpec, ProgramError> {
        if task >= tasks || unit_rows == 0 || unit_rows > w.rows {
            return Err(bad::<GemvExpertFp4>(format!(
                "task {task} of {tasks}, units of {unit_rows} rows"
            )));
        }
        let t = u16::try_from(task).map_err(|_| bad::<GemvExpertFp4>("task over 2^16"))?;
        let spec = Self::rows(
            w, x, y, list, m, 0, slots, x_per_slot, 0, unit_rows, accumulate, prologue,
        )?;
        Ok(spec.map_args::<GemvExpertFp4>(|a| {
            a.slot = t;
            a.flags |= SPREAD;
            a.reserved = tasks as u32;
        }))
    }

    /// Matrix rows per spread unit. With tensor-core products (`cols` a
    /// multiple of 128) the rows a block computes at once: 16-row tiles times
    /// the column slices of a row fill its warps; otherwise two rows per
    /// warp (the rows of a warp follow from the lanes each row takes).
    pub fn unit_rows(cols: usize) -> usize {
        if let Some((slices, _)) = mma_slices(cols) {
            return 16 * (WARPS / slices).max(1);
        }
        let chunks = cols / 32;
        let idle = |l: usize| (l * chunks.div_ceil(l) - chunks) * (32 / l);
        let mut lanes = 32;
        for l in [16, 8] {
            if idle(l) < idle(lanes) {
                lanes = l;
            }
        }
        2 * WARPS * (32 / lanes)
    }

    /// Rows `row0..row0 + rows` of expert `list[1 + slot]`'s product, as
    /// [`GemvExpert::rows`](super::gemv_expert::GemvExpert::rows) with FP4 weights.
    #[allow(clippy::too_many_arguments)]
    pub fn rows(
        w: &Fp4Experts,
        x: &BufSlice,
        y: &BufSlice,
        list: &BufSlice,
        m: usize,
        slot: usize,
        slots: usize,
        x_per_slot: bool,
        row0: usize,
        rows: usize,
        accumulate: bool,
        prologue: &Prologue,
    ) -> Result<TaskSpec, ProgramError> {
        want_float::<GemvExpertFp4>("x", x)?;
        want_float::<GemvExpertFp4>("y", y)?;
        if list.dtype() != DType::U32 || list.len() < 1 + 2 * slots || slot >= slots {
            return Err(bad::<GemvExpertFp4>(
                "list must be u32 with room for every slot",
            ));
        }
        if !(1..=16).contains(&m) || rows == 0 || row0 + rows > w.rows {
            return Err(bad::<GemvExpertFp4>(format!(
                "m {m}, rows {row0}..{}",
                row0 + rows
            )));
        }
        let per_x = if x_per_slot { slots } else { 1 };
        if x.len() < per_x * m * w.cols || y.len() < slots * m * w.rows || x.addr() % 16 != 0 {
            return Err(bad::<GemvExpertFp4>(
                "x or y too small (or x misaligned) for every slot",
            ));
        }
        let (code, eps, aux, extra) = match prologue {
            Prologue::None => (PROLOGUE_NONE, 0.0, 0, None),
            Prologue::RmsNorm(nw, eps) => {
                if nw.dtype() != DType::Bf16 || nw.len() < w.cols {
                    return Err(bad::<GemvExpertFp4>("RMSNorm weights must be bf16 [cols]"));
                }
                (PROLOGUE_RMSNORM, *eps, nw.addr(), Some(nw))
            }
            Prologue::Swiglu(up) => {
                if up.dtype() != x.dtype() || up.len() < x.len() {
                    return Err(bad::<GemvExpertFp4>("up must be laid out like x"));
                }
                (PROLOGUE_SWIGLU, 0.0, up.addr(), Some(up))
            }
        };
        let args = GemvExpertFp4Args {
            w: w.codes.addr(),
            scales: w.scales.addr(),
            x: x.addr(),
            y: y.addr(),
            list: list.addr(),
            aux,
            row0: row0 as u32,
            rows: rows as u32,
            cols: w.cols as u32,
            m: m as u32,
            ldy: w.rows as u32,
            x_dtype: x.dtype().code() as u8,
            y_dtype: y.dtype().code() as u8,
            prologue: code as u8,
            format: format_code(w.format),
            eps: eps.to_bits(),
            slot: u16::try_from(slot).map_err(|_| bad::<GemvExpertFp4>("slot over 2^16"))?,
            flags: u16::from(accumulate) | (u16::from(x_per_slot) << 1),
            slots: slots as u32,
            reserved: 0,
        };
        let (codes, scales) = (w.codes.all(), w.scales.all());
        let mut bufs = vec![&codes, &scales, x, y, list];
        if let Some(b) = extra {
            bufs.push(b);
        }
        Ok(TaskSpec::new::<GemvExpertFp4>(args, &bufs))
    }
}

/// Warps of a resident block.
const WARPS: usize = crate::abi::BLOCK_THREADS as usize / 32;

/// With tensor-core products on the device (`cols` a multiple of 128): the
/// column slices of a row and the 128-column steps in each.
fn mma_slices(cols: usize) -> Option<(usize, usize)> {
    if cols % 128 != 0 || cols == 0 {
        return None;
    }
    let steps = cols / 128;
    let per = if steps <= 16 {
        steps.div_ceil(2)
    } else {
        steps.div_ceil(4)
    };
    Some((steps.div_ceil(per), per))
}

/// Spread task `t`'s units of `units` over `tasks`, as the device deals them:
/// the first `units % tasks` tasks take one unit more, in blocks starting at
/// multiples of their size.
fn share(units: usize, t: usize, tasks: usize) -> std::ops::Range<usize> {
    let (q, r) = (units / tasks, units % tasks);
    let u0 = if t < r {
        t * (q + 1)
    } else {
        r * (q + 1) + (t - r) * q
    };
    u0..u0 + q + usize::from(t < r)
}

/// The CPU reference for matrix rows `row0 .. row0 + rows` of the expert in `slot`.
fn cpu_unit(
    a: &GemvExpertFp4Args,
    mem: &dyn Memory,
    slot: u32,
    row0: u32,
    rows: u32,
) -> std::result::Result<(), TaskFault> {
    let expert = mem.read_u32(a.list + 4 * (1 + u64::from(slot)), 1)?[0] as usize;
    let format = match a.format {
        0 => Fp4Format::Mxfp4,
        1 => Fp4Format::Nvfp4,
        _ => return Err(TaskFault::BadArgs("fp4 format")),
    };
    let (nrows, cols) = (a.ldy as usize, a.cols as usize);
    if cols % 32 != 0 {
        return Err(TaskFault::BadArgs("fp4 cols"));
    }
    let stride = scale_stride(format, nrows, cols);
    let region: Vec<u8> = mem
        .read_u32(a.scales + (expert * stride) as u64, stride / 4)?
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let nblk = cols / format.block();
    let tscale = if format == Fp4Format::Nvfp4 {
        let at = nrows * nblk;
        f32::from_le_bytes([region[at], region[at + 1], region[at + 2], region[at + 3]])
    } else {
        1.0
    };
    let codes_at = a.w + (expert * nrows * cols / 2) as u64;
    let weight_row = |row: usize| -> std::result::Result<Vec<f32>, TaskFault> {
        let bytes: Vec<u8> = mem
            .read_u32(codes_at + (row * cols / 2) as u64, cols / 8)?
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let t = quant::Fp4Tensor {
            format,
            codes: bytes,
            scales: region[row * nblk..(row + 1) * nblk].to_vec(),
            tensor_scale: tscale,
        };
        Ok(t.dequantize())
    };
    let xdt = DType::from_code(u32::from(a.x_dtype)).ok_or(TaskFault::BadArgs("x dtype"))?;
    let ydt = DType::from_code(u32::from(a.y_dtype)).ok_or(TaskFault::BadArgs("y dtype"))?;
    let step = if a.flags & 2 != 0 {
        u64::from(slot) * u64::from(a.m) * u64::from(a.cols) * xdt.size() as u64
    } else {
        0
    };
    let g = GemvBf16Args {
        w: 0,
        x: a.x + step,
        y: a.y + u64::from(slot) * u64::from(a.m) * u64::from(a.ldy) * ydt.size() as u64,
        row0,
        rows,
        cols: a.cols,
        ldw: a.cols,
        m: a.m,
        ldx: a.cols,
        ldy: a.ldy,
        x_dtype: u16::from(a.x_dtype),
        y_dtype: u16::from(a.y_dtype),
        accumulate: a.flags & 1,
        prologue: u16::from(a.prologue),
        eps: a.eps,
        aux: if u16::from(a.prologue) == PROLOGUE_SWIGLU {
            a.aux + step
        } else {
            a.aux
        },
    };
    cpu_product(&g, mem, &weight_row)
}

impl TaskKind for GemvExpertFp4 {
    type Args = GemvExpertFp4Args;
    const NAME: &'static str = "gemv_expert_fp4";
    fn cpu(a: &GemvExpertFp4Args, mem: &dyn Memory) -> std::result::Result<(), TaskFault> {
        if a.rows == 0 {
            return Err(TaskFault::BadArgs("fp4 rows"));
        }
        if a.flags & SPREAD == 0 {
            if u32::from(a.slot) >= a.slots {
                return Err(TaskFault::BadArgs("fp4 slot"));
            }
            let count = mem.read_u32(a.list, 1)?[0];
            if u32::from(a.slot) < count {
                cpu_unit(a, mem, u32::from(a.slot), a.row0, a.rows)?;
            }
            return Ok(());
        }
        // Units of `rows` matrix rows, one per pass (every routed input row
        // at once with tensor cores, else two per pass), slot by slot; this
        // task's share of them (the reference computes every input row of a
        // unit in its first pass).
        let list = mem.read_u32(a.list, 1 + 2 * a.slots as usize)?;
        let count = list[0].min(a.slots) as usize;
        let per = a.ldy.div_ceil(a.rows);
        let mbits = ((1u64 << a.m) - 1) as u32;
        let mut items = Vec::new();
        for s in 0..count {
            let routed = (list[1 + a.slots as usize + s] & mbits).count_ones();
            let passes = if mma_slices(a.cols as usize).is_some() {
                routed.min(1)
            } else {
                routed.div_ceil(2)
            };
            for k in 0..passes * per {
                items.push((s as u32, k / per, (k % per) * a.rows));
            }
        }
        let (t, tasks) = (a.slot as usize, a.reserved.max(1) as usize);
        for &(slot, pass, r0) in &items[share(items.len(), t, tasks)] {
            if pass == 0 {
                cpu_unit(a, mem, slot, r0, a.rows.min(a.ldy - r0))?;
            }
        }
        Ok(())
    }
    fn layout() -> Layout {
        layout!(GemvExpertFp4Args {
            w,
            scales,
            x,
            y,
            list,
            aux,
            row0,
            rows,
            cols,
            m,
            ldy,
            x_dtype,
            y_dtype,
            prologue,
            format,
            eps,
            slot,
            flags,
            slots,
            reserved
        })
    }
}
