//! Host memory of the CPU executor.
//!
//! Each buffer is its own array of `AtomicU32` words, so tasks running on
//! several threads may touch neighbouring elements (or, in a program with a
//! missing dependency, the same ones) without undefined behaviour. An address
//! is `(buffer id << 40) | byte offset`; every access is bounds-checked.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use half::bf16;

use crate::buffer::DType;
use crate::task::{Memory, TaskFault};

const OFFSET_BITS: u32 = 40;

/// All buffers of one CPU executor.
#[derive(Default)]
pub(crate) struct MemTable {
    slots: RwLock<Vec<Option<Arc<[AtomicU32]>>>>,
}

/// Owns one buffer's slot; frees it when dropped.
pub(crate) struct CpuAlloc {
    table: Arc<MemTable>,
    id: usize,
}

impl Drop for CpuAlloc {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.table.slots.write() {
            slots[self.id] = None;
        }
    }
}

impl MemTable {
    /// Allocates `bytes` zeroed bytes; returns the address and the owner.
    pub(crate) fn alloc(self: &Arc<Self>, bytes: usize) -> (u64, CpuAlloc) {
        let words: Arc<[AtomicU32]> = (0..bytes.div_ceil(4)).map(|_| AtomicU32::new(0)).collect();
        let mut slots = self.slots.write().expect("memory table poisoned");
        let id = match slots.iter().skip(1).position(Option::is_none) {
            Some(i) => i + 1,
            None => {
                if slots.is_empty() {
                    slots.push(None);
                }
                slots.push(None);
                slots.len() - 1
            }
        };
        slots[id] = Some(words);
        (
            (id as u64) << OFFSET_BITS,
            CpuAlloc {
                table: self.clone(),
                id,
            },
        )
    }

    /// The words behind `addr`, the byte offset, checked for `len` bytes.
    fn resolve(
        &self,
        addr: u64,
        len: usize,
        align: usize,
    ) -> Result<(Arc<[AtomicU32]>, usize), TaskFault> {
        let id = (addr >> OFFSET_BITS) as usize;
        let off = (addr & ((1 << OFFSET_BITS) - 1)) as usize;
        let slots = self.slots.read().map_err(|_| TaskFault::BadAddress(addr))?;
        let words = slots
            .get(id)
            .and_then(|s| s.clone())
            .ok_or(TaskFault::BadAddress(addr))?;
        if off % align != 0 || off + len > words.len() * 4 {
            return Err(TaskFault::BadAddress(addr));
        }
        Ok((words, off))
    }

    pub(crate) fn read_bytes(&self, addr: u64, out: &mut [u8]) -> Result<(), TaskFault> {
        let (w, off) = self.resolve(addr, out.len(), 1)?;
        for (i, b) in out.iter_mut().enumerate() {
            let p = off + i;
            *b = (w[p / 4].load(Relaxed) >> (8 * (p % 4))) as u8;
        }
        Ok(())
    }

    pub(crate) fn write_bytes(&self, addr: u64, src: &[u8]) -> Result<(), TaskFault> {
        let (w, off) = self.resolve(addr, src.len(), 1)?;
        let mut i = 0;
        while i < src.len() {
            let p = off + i;
            if p % 4 == 0 && i + 4 <= src.len() {
                w[p / 4].store(
                    u32::from_le_bytes(src[i..i + 4].try_into().unwrap()),
                    Relaxed,
                );
                i += 4;
            } else {
                let shift = 8 * (p % 4);
                set_bits(&w[p / 4], 0xFF << shift, u32::from(src[i]) << shift);
                i += 1;
            }
        }
        Ok(())
    }
}

/// Replaces the bits of `word` under `mask` with `bits` in one atomic step,
/// so that a concurrent reader never sees them cleared (tasks may rewrite an
/// element with the value it holds while another task reads it, as attention
/// slices covering the same key of a block do).
fn set_bits(word: &AtomicU32, mask: u32, bits: u32) {
    let _ = word.fetch_update(Relaxed, Relaxed, |old| Some((old & !mask) | bits));
}

/// [`Memory`] for tasks of one run: the table plus the output ring.
pub(crate) struct CpuMemory<'a> {
    pub(crate) table: &'a MemTable,
    pub(crate) outputs: &'a Mutex<Vec<u64>>,
    pub(crate) epoch: u64,
    pub(crate) wait_timeout: std::time::Duration,
}

impl Memory for CpuMemory<'_> {
    fn read_f32(&self, addr: u64, dtype: DType, n: usize) -> Result<Vec<f32>, TaskFault> {
        let (w, off) = self.table.resolve(addr, n * dtype.size(), dtype.size())?;
        Ok(match dtype {
            DType::F32 => (0..n)
                .map(|i| f32::from_bits(w[off / 4 + i].load(Relaxed)))
                .collect(),
            DType::Bf16 => (0..n)
                .map(|i| {
                    let p = off / 2 + i;
                    let bits = (w[p / 2].load(Relaxed) >> (16 * (p % 2))) as u16;
                    bf16::from_bits(bits).to_f32()
                })
                .collect(),
            DType::U32 => return Err(TaskFault::BadArgs("u32 data read as floats")),
        })
    }

    fn write_f32(&self, addr: u64, dtype: DType, vals: &[f32]) -> Result<(), TaskFault> {
        let (w, off) = self
            .table
            .resolve(addr, vals.len() * dtype.size(), dtype.size())?;
        match dtype {
            DType::F32 => vals
                .iter()
                .enumerate()
                .for_each(|(i, v)| w[off / 4 + i].store(v.to_bits(), Relaxed)),
            DType::Bf16 => vals.iter().enumerate().for_each(|(i, v)| {
                let p = off / 2 + i;
                let shift = 16 * (p % 2);
                let bits = u32::from(bf16::from_f32(*v).to_bits()) << shift;
                set_bits(&w[p / 2], 0xFFFF << shift, bits);
            }),
            DType::U32 => return Err(TaskFault::BadArgs("floats written to u32 data")),
        }
        Ok(())
    }

    fn read_u32(&self, addr: u64, n: usize) -> Result<Vec<u32>, TaskFault> {
        let (w, off) = self.table.resolve(addr, n * 4, 4)?;
        Ok((0..n).map(|i| w[off / 4 + i].load(Relaxed)).collect())
    }

    fn write_u32(&self, addr: u64, vals: &[u32]) -> Result<(), TaskFault> {
        let (w, off) = self.table.resolve(addr, vals.len() * 4, 4)?;
        vals.iter()
            .enumerate()
            .for_each(|(i, v)| w[off / 4 + i].store(*v, Relaxed));
        Ok(())
    }

    fn emit(&self, vals: &[u64]) {
        self.outputs
            .lock()
            .expect("output ring poisoned")
            .extend_from_slice(vals);
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn wait_timeout(&self) -> std::time::Duration {
        self.wait_timeout
    }
}
