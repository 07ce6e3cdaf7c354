//! The interface both executors implement: memory, program loading, commands.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use half::bf16;

use crate::buffer::{Buffer, DType};
use crate::error::{Error, Result};
use crate::program::Program;

/// A program loaded on one executor.
pub struct LoadedProgram {
    pub(crate) owner: u64,
    pub(crate) program: Arc<Program>,
    pub(crate) inner: Box<dyn Any + Send + Sync>,
}

impl LoadedProgram {
    /// The program as built.
    pub fn program(&self) -> &Program {
        &self.program
    }
    /// Id of the executor it is loaded on.
    pub fn owner(&self) -> u64 {
        self.owner
    }
}

/// Completion handle of a submitted command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub(crate) owner: u64,
    /// Global iteration count reached when the command is done.
    pub(crate) end: u64,
}

/// A machine that runs task programs: the GPU [`Runtime`](crate::cuda::Runtime)
/// or the [`CpuExecutor`](crate::cpu::CpuExecutor).
pub trait Executor: Send + Sync {
    /// Unique id of this executor (buffers and programs record it).
    fn id(&self) -> u64;
    /// One line naming the device.
    fn describe(&self) -> String;
    /// Workers (SMs or threads) programs are laid out for.
    fn num_workers(&self) -> usize;
    /// Whether this is a GPU.
    fn is_gpu(&self) -> bool;
    /// Dynamic shared memory of one worker's block in bytes, which decides
    /// what a program builder fuses into one task. Executors without such a
    /// limit report the GPU default, so they build the same programs.
    fn shared_bytes(&self) -> usize {
        crate::cuda::DEFAULT_SHARED_LIMIT as usize
    }
    /// Allocates a zeroed buffer.
    fn alloc(&self, dtype: DType, len: usize) -> Result<Buffer>;
    /// Copies bytes into a buffer at a byte offset.
    fn write_bytes(&self, dst: &Buffer, offset: usize, src: &[u8]) -> Result<()>;
    /// Copies bytes out of a buffer at a byte offset.
    fn read_bytes(&self, src: &Buffer, offset: usize, dst: &mut [u8]) -> Result<()>;
    /// Uploads a program.
    fn load(&self, program: &Program) -> Result<LoadedProgram>;
    /// Enqueues "run `program` `iterations` times with `params`" and returns at once.
    fn submit(&self, program: &LoadedProgram, iterations: u32, params: &[u64]) -> Result<Ticket>;
    /// Like [`submit`](Self::submit), but the command may end early: a task
    /// that writes the running epoch ([`Memory::epoch`](crate::task::Memory::epoch))
    /// into the `u64` stop word `stop` (a `u32` buffer of two words) ends it
    /// after that iteration. `params` may hold one fewer entry than usual: the
    /// last command parameter carries the stop word's address.
    fn submit_until(
        &self,
        program: &LoadedProgram,
        iterations: u32,
        params: &[u64],
        stop: &Buffer,
    ) -> Result<Ticket>;
    /// Waits until a command is done, at most `timeout`.
    fn wait(&self, ticket: &Ticket, timeout: Duration) -> Result<()>;
    /// Whether a command is done (an error if the executor failed).
    fn is_done(&self, ticket: &Ticket) -> Result<bool>;
    /// Moves values the device has emitted so far into `out`; returns how many.
    /// Values are published separately from completion: right after
    /// [`wait`](Self::wait) returns, the last ones may still be on their way,
    /// so a caller that knows how many to expect polls until it has them.
    fn poll_outputs(&self, out: &mut Vec<u64>) -> Result<usize>;
    /// Host wait used by [`ExecutorExt::run`].
    fn default_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

pub(crate) fn check_bytes(buf: &Buffer, offset: usize, len: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= buf.bytes() => Ok(()),
        _ => Err(Error::OutOfBounds {
            offset,
            len,
            size: buf.bytes(),
        }),
    }
}

/// Typed conveniences over [`Executor`].
pub trait ExecutorExt: Executor {
    /// Writes floats converted to the buffer's type (bf16: round to nearest even).
    fn write_f32(&self, dst: &Buffer, vals: &[f32]) -> Result<()> {
        self.write_f32_at(dst, 0, vals)
    }
    /// Writes floats at element `offset`.
    fn write_f32_at(&self, dst: &Buffer, offset: usize, vals: &[f32]) -> Result<()> {
        dst.check_range(offset, vals.len())?;
        let bytes = encode_f32(dst.dtype(), vals)?;
        self.write_bytes(dst, offset * dst.dtype().size(), &bytes)
    }
    /// Reads the whole buffer as floats.
    fn read_f32(&self, src: &Buffer) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; src.bytes()];
        self.read_bytes(src, 0, &mut bytes)?;
        decode_f32(src.dtype(), &bytes)
    }
    /// Writes `u32` values into a `u32` buffer.
    fn write_u32(&self, dst: &Buffer, vals: &[u32]) -> Result<()> {
        if dst.dtype() != DType::U32 {
            return Err(Error::InvalidArgument(format!(
                "write_u32 into a {} buffer",
                dst.dtype()
            )));
        }
        dst.check_range(0, vals.len())?;
        self.write_bytes(dst, 0, bytemuck::cast_slice(vals))
    }
    /// Reads a `u32` buffer.
    fn read_u32(&self, src: &Buffer) -> Result<Vec<u32>> {
        if src.dtype() != DType::U32 {
            return Err(Error::InvalidArgument(format!(
                "read_u32 of a {} buffer",
                src.dtype()
            )));
        }
        let mut v = vec![0u32; src.len()];
        self.read_bytes(src, 0, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }
    /// Submits and waits with the default timeout.
    fn run(&self, program: &LoadedProgram, iterations: u32, params: &[u64]) -> Result<()> {
        let t = self.submit(program, iterations, params)?;
        self.wait(&t, self.default_timeout())
    }
}

impl<E: Executor + ?Sized> ExecutorExt for E {}

/// Encodes floats as `dtype` bytes.
pub fn encode_f32(dtype: DType, vals: &[f32]) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice(vals).to_vec(),
        DType::Bf16 => {
            let v: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::U32 => {
            return Err(Error::InvalidArgument(
                "float values for a u32 buffer".into(),
            ))
        }
    })
}

/// Decodes `dtype` bytes as floats.
pub fn decode_f32(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::U32 => {
            return Err(Error::InvalidArgument(
                "reading a u32 buffer as floats".into(),
            ))
        }
    })
}

/// A fresh executor id (never 0).
pub(crate) fn next_executor_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The parameters of an early-ending command: `params` then, in the last
/// slot, the address of the stop word `stop`.
pub(crate) fn until_params(
    params: &[u64],
    stop: &Buffer,
    owner: u64,
) -> Result<[u64; crate::abi::COMMAND_PARAMS]> {
    use crate::abi::COMMAND_PARAMS;
    if stop.owner() != owner {
        return Err(Error::Foreign("stop word"));
    }
    if stop.dtype() != DType::U32 || stop.len() < 2 {
        return Err(Error::InvalidArgument(
            "the stop word is a u32 buffer of at least two elements".into(),
        ));
    }
    if params.len() >= COMMAND_PARAMS {
        return Err(Error::InvalidArgument(format!(
            "{} command parameters; at most {} with a stop word",
            params.len(),
            COMMAND_PARAMS - 1
        )));
    }
    let mut out = pack_params(params)?;
    out[COMMAND_PARAMS - 1] = stop.addr();
    Ok(out)
}

/// Copies up to [`COMMAND_PARAMS`](crate::abi::COMMAND_PARAMS) parameters into a command's array.
pub(crate) fn pack_params(params: &[u64]) -> Result<[u64; crate::abi::COMMAND_PARAMS]> {
    let mut out = [0u64; crate::abi::COMMAND_PARAMS];
    if params.len() > out.len() {
        return Err(Error::InvalidArgument(format!(
            "{} command parameters; at most {}",
            params.len(),
            out.len()
        )));
    }
    out[..params.len()].copy_from_slice(params);
    Ok(out)
}

/// Checks that a program may be loaded on executor `id`.
pub(crate) fn check_owner(program: &Program, id: u64) -> Result<()> {
    match program.owner() {
        Some(o) if o != id => Err(Error::Foreign("a buffer of this program")),
        _ => Ok(()),
    }
}
