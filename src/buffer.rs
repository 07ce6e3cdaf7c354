//! Element types and buffers owned by an executor.
//!
//! A [`Buffer`] is a typed allocation on one executor (device memory for the
//! GPU runtime, host memory for the CPU executor). Task arguments name buffers
//! by address; a [`Program`](crate::program::Program) keeps the buffers it
//! references alive.

use std::any::Any;
use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Element type of a buffer; the numeric codes are shared with the kernels.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32 = 0,
    /// bfloat16.
    Bf16 = 1,
    /// Unsigned 32-bit integer.
    U32 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// The code stored in task arguments.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The type for a code, if valid.
    pub const fn from_code(code: u32) -> Option<DType> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::Bf16),
            2 => Some(DType::U32),
            _ => None,
        }
    }

    /// Whether the type holds floating-point numbers.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::Bf16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::U32 => "u32",
        })
    }
}

struct Inner {
    addr: u64,
    len: usize,
    dtype: DType,
    owner: u64,
    _alloc: Box<dyn Any + Send + Sync>,
}

/// A typed allocation owned by one executor. Cloning shares it; the memory is
/// freed when the last clone (including those held by programs) is dropped.
#[derive(Clone)]
pub struct Buffer(Arc<Inner>);

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Buffer({} x {} at {:#x})",
            self.0.len, self.0.dtype, self.0.addr
        )
    }
}

impl Buffer {
    /// Wraps an executor's allocation. `alloc` is dropped (freeing the memory)
    /// with the last clone.
    pub fn from_parts(
        addr: u64,
        len: usize,
        dtype: DType,
        owner: u64,
        alloc: Box<dyn Any + Send + Sync>,
    ) -> Buffer {
        Buffer(Arc::new(Inner {
            addr,
            len,
            dtype,
            owner,
            _alloc: alloc,
        }))
    }

    /// Address of element 0 in the owning executor's address space.
    pub fn addr(&self) -> u64 {
        self.0.addr
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.len
    }
    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.0.len * self.0.dtype.size()
    }
    /// Id of the executor that owns the memory.
    pub fn owner(&self) -> u64 {
        self.0.owner
    }
    /// The executor-specific allocation.
    pub(crate) fn alloc_ref(&self) -> &(dyn Any + Send + Sync) {
        &*self.0._alloc
    }
    /// Whether two handles share one allocation.
    pub fn same(&self, other: &Buffer) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
    /// The whole buffer as a slice.
    pub fn all(&self) -> BufSlice {
        BufSlice {
            buf: self.clone(),
            offset: 0,
            len: self.len(),
        }
    }
    /// Elements `range` as a slice; out-of-range bounds are an error.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<BufSlice> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e + 1,
            Bound::Excluded(&e) => e,
            Bound::Unbounded => self.len(),
        };
        if start > end || end > self.len() {
            return Err(Error::OutOfBounds {
                offset: start,
                len: end.saturating_sub(start),
                size: self.len(),
            });
        }
        Ok(BufSlice {
            buf: self.clone(),
            offset: start,
            len: end - start,
        })
    }
    /// Checks that `offset..offset + len` lies inside the buffer.
    pub fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset,
                len,
                size: self.len(),
            }),
        }
    }
}

/// A contiguous range of a [`Buffer`], as task constructors take it.
#[derive(Clone, Debug)]
pub struct BufSlice {
    buf: Buffer,
    offset: usize,
    len: usize,
}

impl BufSlice {
    /// The underlying buffer.
    pub fn buffer(&self) -> &Buffer {
        &self.buf
    }
    /// First element within the buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.buf.dtype()
    }
    /// Address of the first element.
    pub fn addr(&self) -> u64 {
        self.buf.addr() + (self.offset * self.dtype().size()) as u64
    }
    /// A sub-slice, relative to this slice.
    pub fn sub(&self, offset: usize, len: usize) -> Result<BufSlice> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(BufSlice {
                buf: self.buf.clone(),
                offset: self.offset + offset,
                len,
            }),
            _ => Err(Error::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }
}
