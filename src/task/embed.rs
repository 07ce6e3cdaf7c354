//! `embed`: gathers rows of a table by token ids held in device memory
//! (`dst[i, :] = table[ids[i], :]`); an id outside the table is a device fault.

use bytemuck::{Pod, Zeroable};

use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`Embed`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct EmbedArgs {
    /// Output address, `m` rows of `cols`.
    pub dst: u64,
    /// Table address, `rows` rows of `cols`.
    pub table: u64,
    /// Address of `m` `u32` ids.
    pub ids: u64,
    /// Ids to look up.
    pub m: u32,
    /// Columns.
    pub cols: u32,
    /// Rows in the table (ids must be below this).
    pub rows: u32,
    /// [`DType`] code of the table.
    pub table_dtype: u32,
    /// [`DType`] code of the output.
    pub dst_dtype: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Embedding lookup.
pub struct Embed;

impl Embed {
    /// Looks up `ids.len()` ids in `table` (`cols` columns) into `dst`.
    pub fn task(
        dst: &BufSlice,
        table: &BufSlice,
        ids: &BufSlice,
        cols: usize,
    ) -> Result<TaskSpec, ProgramError> {
        want_float::<Embed>("dst", dst)?;
        want_float::<Embed>("table", table)?;
        if ids.dtype() != DType::U32 || ids.is_empty() {
            return Err(bad::<Embed>("ids must be a non-empty u32 slice"));
        }
        let m = ids.len();
        if cols == 0 || table.len() < cols || dst.len() < m * cols {
            return Err(bad::<Embed>(format!(
                "{m} rows of {cols} do not fit dst or the table"
            )));
        }
        let u = |v: usize| u32::try_from(v).map_err(|_| bad::<Embed>("dimension over 2^32"));
        let args = EmbedArgs {
            dst: dst.addr(),
            table: table.addr(),
            ids: ids.addr(),
            m: u(m)?,
            cols: u(cols)?,
            rows: u(table.len() / cols)?,
            table_dtype: table.dtype().code(),
            dst_dtype: dst.dtype().code(),
            reserved: 0,
        };
        Ok(TaskSpec::new::<Embed>(args, &[dst, table, ids]))
    }
}

impl TaskKind for Embed {
    type Args = EmbedArgs;
    const NAME: &'static str = "embed";
    fn cpu(a: &EmbedArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let dt = |c| DType::from_code(c).ok_or(TaskFault::BadArgs("embed dtype"));
        let (td, dd) = (dt(a.table_dtype)?, dt(a.dst_dtype)?);
        let cols = a.cols as usize;
        let ids = mem.read_u32(a.ids, a.m as usize)?;
        for (i, &id) in ids.iter().enumerate() {
            if id >= a.rows {
                return Err(TaskFault::OutOfRange {
                    index: u64::from(id),
                    bound: u64::from(a.rows),
                });
            }
            let row = mem.read_f32(a.table + (id as usize * cols * td.size()) as u64, td, cols)?;
            mem.write_f32(a.dst + (i * cols * dd.size()) as u64, dd, &row)?;
        }
        Ok(())
    }
    fn layout() -> Layout {
        layout!(EmbedArgs {
            dst,
            table,
            ids,
            m,
            cols,
            rows,
            table_dtype,
            dst_dtype,
            reserved
        })
    }
}
