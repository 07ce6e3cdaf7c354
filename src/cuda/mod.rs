//! The GPU runtime: one resident kernel per device.
//!
//! [`Runtime::new`] loads the PTX for the GPU, sizes the grid to one block per
//! SM (checked against the occupancy query) and launches the kernel
//! cooperatively on its own non-blocking stream. Commands go through a ring in
//! mapped host memory; completion, errors and emitted values come back through
//! a status block and an output ring in the same mapping. Memory and program
//! uploads use a second stream and the stream-ordered allocator, so nothing
//! ever waits for the resident kernel except [`Runtime::shutdown`].

pub(crate) mod driver;
pub mod probe;
pub mod ptx;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::abi::{
    fault, wait_site, Command, DeviceState, KernelParams, StatusBlock, TaskDesc, BLOCK_THREADS,
    CMD_FLAG_TRACE, CMD_FLAG_UNTIL, CMD_RUN, CMD_SHUTDOWN, COMMAND_PARAMS, COMMAND_RING_CAP,
    COMMAND_SLOT_BYTES, OUTPUT_RING_CAP,
};
use crate::buffer::{Buffer, DType};
use crate::error::{Error, Result};
use crate::exec::{
    check_bytes, check_owner, next_executor_id, pack_params, until_params, Executor, LoadedProgram,
    Ticket,
};
use crate::program::trace::{TaskTime, Trace};
use crate::program::Program;
use crate::task::kind_name;
use driver::{DevMem, MappedHost};

/// Options of a [`Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// Longest a device-side wait may take before the kernel reports a hang.
    pub wait_timeout: Duration,
    /// Default host wait ([`ExecutorExt::run`](crate::exec::ExecutorExt::run), shutdown).
    pub host_timeout: Duration,
    /// Launch the kernel variant that can time every task
    /// ([`Runtime::trace`]); the default variant carries no tracing code.
    /// The variant runs every program, traced or not, and is a few percent
    /// slower: time speeds without it.
    pub trace: bool,
    /// Run on this many SMs instead of all of them. Several runtimes may share
    /// one GPU this way (each keeps its SMs for itself), for example the ranks
    /// of a [`Cluster`](crate::cluster::Cluster) tested on one GPU.
    pub sms: Option<u32>,
    /// Most dynamic shared memory a block takes, in bytes; `None` takes
    /// [`DEFAULT_SHARED_LIMIT`]. What a block leaves of its SM's unified
    /// memory serves as L1 cache, which also holds the threads' register
    /// spills: BENCHMARKS.md has decode times for several limits. A task
    /// that needs more scratch than it leaves takes a slower path or, where
    /// it has none, reports a fault that names it.
    pub shared_limit: Option<u32>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            wait_timeout: Duration::from_secs(5),
            host_timeout: Duration::from_secs(60),
            trace: false,
            sms: None,
            shared_limit: None,
        }
    }
}

/// Dynamic shared memory a resident block takes unless
/// [`RuntimeOptions::shared_limit`] says otherwise (or the device allows
/// less). Room for every task's scratch and for staged weight slices, yet
/// with the kernel's static shared memory and the 1 KiB the hardware
/// reserves per block it fits the 100 KiB shared-memory configuration of
/// sm_80/sm_90 SMs (with 176 bytes to spare: the kernels' static shared
/// memory is 832 and 848 bytes; any more and a block takes the 132 KiB
/// configuration), so the other 156 KiB of an H100 or H200 SM's 256 KiB
/// serve as L1 cache (register spills, reused inputs). On an H200 this made
/// the 30B decode step 3 % faster than 130 KiB (124 KiB of L1) and DFlash 1
/// % faster, with 16-row blocks 1 % slower; taking all 227 KiB left 28 KiB
/// of L1 and made decode 8 % slower (BENCHMARKS.md).
pub const DEFAULT_SHARED_LIMIT: u32 = 98 * 1024;

/// SMs held by live resident kernels in this process, per device.
static BUSY: Mutex<Option<HashMap<usize, u32>>> = Mutex::new(None);

/// Primary contexts, retained for the life of the process so that creating and
/// dropping runtimes does not tear the context down each time.
fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    static CTX: OnceLock<Mutex<Vec<Option<Arc<CudaContext>>>>> = OnceLock::new();
    if !driver::driver_present() {
        return Err(Error::NoDriver);
    }
    let count = CudaContext::device_count()? as usize;
    if ordinal >= count {
        return Err(Error::NoDevice { ordinal, count });
    }
    let mut all = CTX
        .get_or_init(Mutex::default)
        .lock()
        .expect("context cache poisoned");
    if all.len() <= ordinal {
        all.resize(ordinal + 1, None);
    }
    if all[ordinal].is_none() {
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: buffers shared with the resident kernel must not carry
        // cudarc's per-buffer events; this crate orders its own work.
        unsafe { ctx.disable_event_tracking() };
        all[ordinal] = Some(ctx);
    }
    Ok(all[ordinal].clone().expect("set above"))
}

/// Free and total device memory in bytes.
pub fn memory_info(ordinal: usize) -> Result<(usize, usize)> {
    let ctx = context(ordinal)?;
    ctx.bind_to_thread()?;
    Ok(ctx.mem_get_info()?)
}

/// The resident kernel's module and function on device `ordinal`, loaded once
/// per process: loading a module while a resident kernel runs in the context
/// (a second runtime on a shared GPU) may wait for that kernel.
fn resident_function(
    ordinal: usize,
    ctx: &Arc<CudaContext>,
    image: ptx::Image,
    trace: bool,
) -> Result<(Arc<CudaModule>, CudaFunction, &'static str)> {
    type Loaded = HashMap<(usize, bool), (Arc<CudaModule>, CudaFunction, &'static str)>;
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    let mut loaded = LOADED
        .get_or_init(Mutex::default)
        .lock()
        .expect("module cache poisoned");
    if let Some(f) = loaded.get(&(ordinal, trace)) {
        return Ok(f.clone());
    }
    let (module, form) = ptx::load(ctx, image)?;
    let func = module.load_function(if trace {
        "mk_resident_trace"
    } else {
        "mk_resident"
    })?;
    loaded.insert((ordinal, trace), (module.clone(), func.clone(), form));
    Ok((module, func, form))
}

/// Number of SMs of device `ordinal`.
pub fn sm_count(ordinal: usize) -> Result<u32> {
    let ctx = context(ordinal)?;
    Ok(ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32)
}

/// Number of CUDA devices (0 when there is no driver).
pub fn device_count() -> usize {
    if !driver::driver_present() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

const STATUS_OFF: usize = (COMMAND_RING_CAP * COMMAND_SLOT_BYTES) as usize;
const OUTPUT_OFF: usize = STATUS_OFF + 256;
const MAPPED_BYTES: usize = OUTPUT_OFF + OUTPUT_RING_CAP as usize * 8;

struct GpuProgram {
    /// Holds the device image the addresses below point into.
    mem: DevMem,
    /// Byte offset of the trace area (two `u64`s per task slot).
    trace_off: usize,
    /// `(task id, worker)` of each task slot.
    slots: Vec<(u32, u32)>,
    program: Arc<Program>,
    epoch: AtomicU64,
    tasks: u64,
    worker_offsets: u64,
    events: u64,
}

struct Outstanding {
    seq: u64,
    end: u64,
    program: Arc<GpuProgram>,
}

struct HostState {
    seq: u64,
    iterations: u64,
    outstanding: VecDeque<Outstanding>,
    consumed: u64,
    failed: Option<Error>,
    running: bool,
}

/// One resident kernel on one GPU.
pub struct Runtime {
    id: u64,
    ordinal: usize,
    name: String,
    arch: &'static str,
    form: &'static str,
    num_sms: u32,
    shared_bytes: u32,
    opts: RuntimeOptions,
    kernel_stream: Arc<CudaStream>,
    copy_stream: Arc<CudaStream>,
    state: Mutex<HostState>,
    // Dropped after the kernel has exited (see Drop).
    mapped: Option<MappedHost>,
    device_state: Option<DevMem>,
    _func: CudaFunction,
    _module: Arc<CudaModule>,
}

impl Runtime {
    /// Starts the resident kernel on device `ordinal` with default options.
    pub fn new(ordinal: usize) -> Result<Runtime> {
        Self::with_options(ordinal, RuntimeOptions::default())
    }

    /// Starts the resident kernel on device `ordinal`.
    pub fn with_options(ordinal: usize, opts: RuntimeOptions) -> Result<Runtime> {
        let ctx = context(ordinal)?;
        ctx.bind_to_thread()?;
        let (major, minor) = ctx.compute_capability()?;
        let name = ctx.name()?;
        if major < 8 {
            return Err(Error::UnsupportedGpu { name, major, minor });
        }
        let total =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let sms = opts.sms.unwrap_or(total);
        if sms == 0 || sms > total {
            return Err(Error::InvalidArgument(format!(
                "{sms} SMs requested; device {ordinal} has {total}"
            )));
        }
        {
            let mut busy = BUSY.lock().expect("device registry poisoned");
            let used = busy
                .get_or_insert_with(HashMap::new)
                .entry(ordinal)
                .or_insert(0);
            if *used + sms > total {
                return Err(Error::Residency(format!(
                    "device {ordinal} has {} of its {total} SMs free for a resident kernel in this \
                     process; {sms} requested",
                    total - *used
                )));
            }
            *used += sms;
        }
        Self::start(ordinal, opts, ctx, name, major, minor, sms)
            .inspect_err(|_| release_device(ordinal, sms))
    }

    fn start(
        ordinal: usize,
        opts: RuntimeOptions,
        ctx: Arc<CudaContext>,
        name: String,
        major: i32,
        minor: i32,
        num_sms: u32,
    ) -> Result<Runtime> {
        let image = ptx::select(major, minor);
        let arch = image.arch;
        let (module, func, form) = resident_function(ordinal, &ctx, image, opts.trace)?;
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let shared_bytes = ((optin - func.shared_size_bytes()?).max(0) as u32)
            .min(opts.shared_limit.unwrap_or(DEFAULT_SHARED_LIMIT));
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared_bytes as i32,
        )?;
        let per_sm = func.occupancy_max_active_blocks_per_multiprocessor(
            BLOCK_THREADS,
            shared_bytes as usize,
            None,
        )?;
        if per_sm < 1 {
            return Err(Error::Residency(format!(
                "no block of {BLOCK_THREADS} threads with {shared_bytes} bytes of shared memory fits an SM \
                 ({} registers per thread)",
                func.num_regs()?
            )));
        }
        let kernel_stream = ctx.new_stream()?;
        let copy_stream = ctx.new_stream()?;
        let mapped = MappedHost::new(MAPPED_BYTES)?;
        let state_bytes = std::mem::size_of::<DeviceState>().next_multiple_of(256);
        let device_state =
            DevMem::zeroed(&copy_stream, state_bytes + COMMAND_RING_CAP as usize * 128)?;
        let params = KernelParams {
            host_commands: mapped.dev_ptr(0),
            dev_commands: device_state.ptr() + state_bytes as u64,
            status: mapped.dev_ptr(STATUS_OFF),
            state: device_state.ptr(),
            output: mapped.dev_ptr(OUTPUT_OFF),
            wait_timeout_ns: opts.wait_timeout.as_nanos().min(u128::from(u64::MAX)) as u64,
        };
        driver::launch_resident(
            &func,
            &kernel_stream,
            num_sms,
            BLOCK_THREADS,
            shared_bytes,
            &params,
            opts.sms.is_none(),
        )?;
        Ok(Runtime {
            id: next_executor_id(),
            ordinal,
            name,
            arch,
            form,
            num_sms,
            shared_bytes,
            opts,
            kernel_stream,
            copy_stream,
            state: Mutex::new(HostState {
                seq: 0,
                iterations: 0,
                outstanding: VecDeque::new(),
                consumed: 0,
                failed: None,
                running: true,
            }),
            mapped: Some(mapped),
            device_state: Some(device_state),
            _func: func,
            _module: module,
        })
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// Which kernel image was loaded (`sm_90a` or `compute_80`).
    pub fn arch(&self) -> &'static str {
        self.arch
    }
    /// In which form it was loaded: `"cubin"` (machine code, no JIT
    /// compilation) or `"PTX"`.
    pub fn image_form(&self) -> &'static str {
        self.form
    }
    /// A zeroed buffer in pinned host memory mapped into the device's address
    /// space (and every other GPU's): slow to touch from kernels, but reachable
    /// by every device without peer access.
    pub fn alloc_host_mapped(&self, dtype: DType, len: usize) -> Result<Buffer> {
        let bytes = len.checked_mul(dtype.size()).ok_or_else(|| {
            Error::InvalidArgument(format!("buffer of {len} {dtype} is too large"))
        })?;
        self.kernel_stream.context().bind_to_thread()?;
        let mem = MappedHost::new(bytes.max(16))?;
        Ok(Buffer::from_parts(
            mem.dev_ptr(0),
            len,
            dtype,
            self.id,
            Box::new(MappedAlloc {
                ordinal: self.ordinal,
                mem: Some(mem),
            }),
        ))
    }

    /// The mapped host memory behind a buffer of [`alloc_host_mapped`](Self::alloc_host_mapped).
    fn mapped_of<'b>(&self, buf: &'b Buffer) -> Option<&'b MappedHost> {
        buf.alloc_ref()
            .downcast_ref::<MappedAlloc>()
            .filter(|_| buf.owner() == self.id)
            .and_then(|a| a.mem.as_ref())
    }

    /// Dynamic shared memory each block has.
    pub fn shared_bytes(&self) -> u32 {
        self.shared_bytes
    }

    fn status(&self) -> &MappedHost {
        self.mapped
            .as_ref()
            .expect("mapped memory lives until drop")
    }
    fn status_u64(&self, field: usize) -> &AtomicU64 {
        // SAFETY: `field` is the offset of a u64 of the StatusBlock inside the
        // mapping, 8-byte aligned, valid while `self` lives.
        unsafe { AtomicU64::from_ptr(self.status().host_ptr(STATUS_OFF + field) as *mut u64) }
    }
    fn status_u32(&self, field: usize) -> &AtomicU32 {
        // SAFETY: as for `status_u64`, for a u32 field.
        unsafe { AtomicU32::from_ptr(self.status().host_ptr(STATUS_OFF + field) as *mut u32) }
    }
    fn error_record(&self) -> Option<crate::abi::ErrorRecord> {
        let kind_off = std::mem::offset_of!(StatusBlock, error);
        if self.status_u32(kind_off).load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut rec = <crate::abi::ErrorRecord as bytemuck::Zeroable>::zeroed();
        let bytes = bytemuck::bytes_of_mut(&mut rec);
        for (i, b) in bytes.iter_mut().enumerate() {
            // SAFETY: inside the mapping; the device finished writing the record
            // before its release store of `kind`, which we acquired.
            *b = unsafe {
                std::ptr::read_volatile(self.status().host_ptr(STATUS_OFF + kind_off + i))
            };
        }
        Some(rec)
    }

    /// Turns the device's error record into an [`Error`].
    fn device_error(&self, st: &HostState, rec: crate::abi::ErrorRecord) -> Error {
        let task_kind = kind_name(rec.opcode as u16).unwrap_or("unknown");
        let program = st
            .outstanding
            .iter()
            .find(|o| o.seq == rec.command)
            .map(|o| &o.program.program);
        match rec.kind {
            fault::HANG => {
                let counter = match rec.event {
                    wait_site::ITERATION => {
                        "the iteration barrier (every worker done with the previous iteration)"
                            .into()
                    }
                    wait_site::OUTPUT_SPACE => "space in the output ring (host not reading)".into(),
                    wait_site::OUTPUT_ORDER => "output ring ordering".into(),
                    ev if (wait_site::PEER..wait_site::PEER + 256).contains(&ev) => {
                        crate::cpu::peer_counter(ev - wait_site::PEER)
                    }
                    ev => match program.and_then(|p| p.event_name(ev)) {
                        Some(n) => format!("event '{n}'"),
                        None => format!("event {ev}"),
                    },
                };
                let task_kind = if rec.event == wait_site::ITERATION {
                    "iteration start"
                } else {
                    task_kind
                };
                Error::DeviceHang {
                    sm: rec.sm,
                    task: rec.task,
                    task_kind,
                    counter,
                    seen: rec.seen,
                    needed: rec.needed,
                    command: rec.command,
                }
            }
            k => Error::DeviceFault {
                what: match k {
                    fault::BAD_OPCODE => "bad opcode",
                    fault::OUT_OF_RANGE => "index out of range",
                    fault::BAD_ARGS => "bad arguments",
                    fault::PEER_FAILED => crate::cpu::PEER_FAILED,
                    _ => "unknown fault",
                },
                sm: rec.sm,
                task: rec.task,
                task_kind,
                value: rec.seen,
                bound: rec.needed,
                command: rec.command,
            },
        }
    }

    /// Checks for a device error or a dead kernel; records it. `query` also
    /// asks the driver (slow: a driver call), which catches kernels killed by
    /// a hardware fault.
    fn check_alive(&self, st: &mut HostState, query: bool) -> Result<()> {
        if let Some(e) = &st.failed {
            return Err(e.clone());
        }
        if let Some(rec) = self.error_record() {
            let e = self.device_error(st, rec);
            st.failed = Some(e.clone());
            return Err(e);
        }
        if self
            .status_u32(std::mem::offset_of!(StatusBlock, exited))
            .load(Ordering::Acquire)
            != 0
            || (query && driver::stream_done(&self.kernel_stream)?)
        {
            let e = Error::Stopped("the resident kernel exited".into());
            st.failed = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    fn iterations_done(&self) -> u64 {
        self.status_u64(std::mem::offset_of!(StatusBlock, iterations_done))
            .load(Ordering::Acquire)
    }

    /// Spins, then yields, then sleeps until `done()` or the timeout.
    fn poll_until(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            if done()? {
                return Ok(());
            }
            let waited = start.elapsed();
            if waited > timeout {
                return Err(Error::HostTimeout {
                    waited,
                    what: what.into(),
                });
            }
            polls += 1;
            if polls < 20_000 {
                std::hint::spin_loop();
            } else if polls < 40_000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn done(&self, ticket: &Ticket, query: bool) -> Result<bool> {
        if ticket.owner != self.id {
            return Err(Error::Foreign("ticket"));
        }
        if self.iterations_done() >= ticket.end && self.error_record().is_none() {
            return Ok(true);
        }
        let mut st = self.state.lock().expect("runtime state poisoned");
        self.check_alive(&mut st, query)?;
        Ok(self.iterations_done() >= ticket.end)
    }

    /// Drops bookkeeping of commands that are complete.
    fn retire(&self, st: &mut HostState) {
        let done = self.iterations_done();
        while st.outstanding.front().is_some_and(|o| o.end <= done) {
            st.outstanding.pop_front();
        }
    }

    fn write_command(&self, st: &mut HostState, mut cmd: Command) -> Result<u64> {
        // Keep at most COMMAND_RING_CAP - 1 commands in flight.
        while st.outstanding.len() >= COMMAND_RING_CAP as usize - 1 {
            let end = st.outstanding.front().map_or(0, |o| o.end);
            self.poll_until(self.opts.host_timeout, "a free command slot", || {
                Ok(self.iterations_done() >= end)
            })?;
            self.retire(st);
        }
        st.seq += 1;
        cmd.seq = st.seq;
        let slot = ((st.seq - 1) % u64::from(COMMAND_RING_CAP)) as usize;
        let base = self.status().host_ptr(slot * COMMAND_SLOT_BYTES as usize) as *mut u64;
        let words: [u64; 16] = bytemuck::cast(cmd);
        for (i, w) in words.iter().enumerate() {
            // SAFETY: chunk `i` of slot `slot` (16 bytes, 16-byte aligned) inside the
            // mapping; the device has finished with this slot (the command that used
            // it before has completed). The word is stored before its tag.
            unsafe {
                std::ptr::write_volatile(base.add(2 * i), *w);
                AtomicU64::from_ptr(base.add(2 * i + 1)).store(st.seq, Ordering::Release);
            }
        }
        Ok(st.seq)
    }

    /// Stops the resident kernel and waits for it to exit. Called by `Drop`.
    pub fn shutdown(&mut self) -> Result<()> {
        let mut st = self.state.lock().expect("runtime state poisoned");
        if !st.running {
            return Ok(());
        }
        let ask = self.write_command(
            &mut st,
            Command {
                kind: CMD_SHUTDOWN,
                ..bytemuck::Zeroable::zeroed()
            },
        );
        if ask.is_err() {
            self.status_u32(std::mem::offset_of!(StatusBlock, abort))
                .store(1, Ordering::Release);
        }
        let wait = self.opts.wait_timeout + Duration::from_secs(10);
        let exited = self.poll_until(wait, "the resident kernel to exit", || {
            Ok(driver::stream_done(&self.kernel_stream)?)
        });
        let exited = match exited {
            Ok(()) => Ok(()),
            Err(_) => {
                self.status_u32(std::mem::offset_of!(StatusBlock, abort))
                    .store(1, Ordering::Release);
                self.poll_until(wait, "the resident kernel to exit after abort", || {
                    Ok(driver::stream_done(&self.kernel_stream)?)
                })
            }
        };
        st.running = false;
        if exited.is_err() {
            // The kernel may still touch these; leak them rather than free memory in use.
            std::mem::forget(self.mapped.take());
            std::mem::forget(self.device_state.take());
            std::mem::forget(std::mem::take(&mut st.outstanding));
        } else {
            st.outstanding.clear();
            if let Some(m) = self.mapped.take() {
                bury(self.ordinal, m);
            }
        }
        release_device(self.ordinal, self.num_sms);
        exited
    }
}

fn release_device(ordinal: usize, sms: u32) {
    if let Some(used) = BUSY
        .lock()
        .expect("device registry poisoned")
        .as_mut()
        .and_then(|m| m.get_mut(&ordinal))
    {
        *used = used.saturating_sub(sms);
    }
    free_buried(ordinal);
}

/// Mapped host memory no longer used, waiting for its device to have no
/// resident kernel: freeing pinned memory (`cuMemFreeHost`) waits for every
/// kernel of the context, so with several runtimes on one GPU it could never
/// return while another runtime's kernel runs.
static BURIED: Mutex<Vec<(usize, MappedHost)>> = Mutex::new(Vec::new());

/// Frees `mem` now if no resident kernel runs on `ordinal`, else once none does.
fn bury(ordinal: usize, mem: MappedHost) {
    BURIED
        .lock()
        .expect("mapped memory list poisoned")
        .push((ordinal, mem));
    free_buried(ordinal);
}

fn free_buried(ordinal: usize) {
    let idle = BUSY
        .lock()
        .expect("device registry poisoned")
        .as_ref()
        .and_then(|m| m.get(&ordinal))
        .map_or(true, |&used| used == 0);
    if idle {
        let mut all = BURIED.lock().expect("mapped memory list poisoned");
        let (free, keep): (Vec<_>, Vec<_>) = all.drain(..).partition(|(o, _)| *o == ordinal);
        *all = keep;
        drop(all);
        drop(free);
    }
}

/// Owns a buffer's mapped host memory; buries it when dropped.
struct MappedAlloc {
    ordinal: usize,
    mem: Option<MappedHost>,
}

impl Drop for MappedAlloc {
    fn drop(&mut self) {
        if let Some(m) = self.mem.take() {
            bury(self.ordinal, m);
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl Executor for Runtime {
    fn id(&self) -> u64 {
        self.id
    }
    fn describe(&self) -> String {
        format!(
            "{} (device {}, {} SMs, {} {})",
            self.name, self.ordinal, self.num_sms, self.arch, self.form
        )
    }
    fn num_workers(&self) -> usize {
        self.num_sms as usize
    }
    fn is_gpu(&self) -> bool {
        true
    }
    fn shared_bytes(&self) -> usize {
        self.shared_bytes as usize
    }
    fn alloc(&self, dtype: DType, len: usize) -> Result<Buffer> {
        let bytes = len.checked_mul(dtype.size()).ok_or_else(|| {
            Error::InvalidArgument(format!("buffer of {len} {dtype} is too large"))
        })?;
        let mem = DevMem::zeroed(&self.copy_stream, bytes)?;
        Ok(Buffer::from_parts(
            mem.ptr(),
            len,
            dtype,
            self.id,
            Box::new(mem),
        ))
    }
    fn write_bytes(&self, dst: &Buffer, offset: usize, src: &[u8]) -> Result<()> {
        if let Some(m) = self.mapped_of(dst) {
            check_bytes(dst, offset, src.len())?;
            for (i, b) in src.iter().enumerate() {
                // SAFETY: inside the mapping (checked above); shared with the
                // device, so byte-wise volatile stores.
                unsafe { std::ptr::write_volatile(m.host_ptr(offset + i), *b) };
            }
            std::sync::atomic::fence(Ordering::SeqCst);
            return Ok(());
        }
        let mem = dst
            .alloc_ref()
            .downcast_ref::<DevMem>()
            .filter(|_| dst.owner() == self.id);
        check_bytes(dst, offset, src.len())?;
        mem.ok_or(Error::Foreign("buffer"))?.write(offset, src)
    }
    fn read_bytes(&self, src: &Buffer, offset: usize, dst: &mut [u8]) -> Result<()> {
        if let Some(m) = self.mapped_of(src) {
            check_bytes(src, offset, dst.len())?;
            std::sync::atomic::fence(Ordering::SeqCst);
            for (i, b) in dst.iter_mut().enumerate() {
                // SAFETY: inside the mapping (checked above).
                *b = unsafe { std::ptr::read_volatile(m.host_ptr(offset + i)) };
            }
            return Ok(());
        }
        let mem = src
            .alloc_ref()
            .downcast_ref::<DevMem>()
            .filter(|_| src.owner() == self.id);
        check_bytes(src, offset, dst.len())?;
        mem.ok_or(Error::Foreign("buffer"))?.read(offset, dst)
    }
    fn load(&self, program: &Program) -> Result<LoadedProgram> {
        check_owner(program, self.id)?;
        let sched = program.schedule(self.num_sms as usize);
        // One allocation: [worker offsets][event counters][tasks], 128-byte aligned parts.
        let offsets_bytes = (sched.offsets.len() * 4).next_multiple_of(128);
        let events_bytes = (program.num_events() * 8).next_multiple_of(128);
        let tasks_off = offsets_bytes + events_bytes;
        let trace_off = tasks_off + sched.tasks.len() * std::mem::size_of::<TaskDesc>();
        let total = trace_off + sched.tasks.len() * 16;
        let mem = DevMem::zeroed(&self.copy_stream, total)?;
        let mut image = vec![0u8; total];
        image[..sched.offsets.len() * 4].copy_from_slice(bytemuck::cast_slice(&sched.offsets));
        image[tasks_off..trace_off].copy_from_slice(bytemuck::cast_slice(&sched.tasks));
        mem.write(0, &image)?;
        let base = mem.ptr();
        let program = Arc::new(program.clone());
        let slots = sched
            .offsets
            .windows(2)
            .enumerate()
            .flat_map(|(w, r)| (r[0]..r[1]).map(move |_| w as u32))
            .zip(&sched.tasks)
            .map(|(w, d)| (d.id, w))
            .collect();
        let inner = Arc::new(GpuProgram {
            mem,
            trace_off,
            slots,
            program: program.clone(),
            epoch: AtomicU64::new(0),
            tasks: base + tasks_off as u64,
            worker_offsets: base,
            events: base + offsets_bytes as u64,
        });
        Ok(LoadedProgram {
            owner: self.id,
            program,
            inner: Box::new(inner),
        })
    }
    fn submit(&self, program: &LoadedProgram, iterations: u32, params: &[u64]) -> Result<Ticket> {
        self.submit_kind(program, iterations, pack_params(params)?, CMD_RUN)
    }
    fn submit_until(
        &self,
        program: &LoadedProgram,
        iterations: u32,
        params: &[u64],
        stop: &Buffer,
    ) -> Result<Ticket> {
        let params = until_params(params, stop, self.id)?;
        self.submit_kind(program, iterations, params, CMD_RUN | CMD_FLAG_UNTIL)
    }
    fn wait(&self, ticket: &Ticket, timeout: Duration) -> Result<()> {
        let what = format!("iteration {} to complete", ticket.end);
        let mut polls = 0u32;
        self.poll_until(timeout, &what, || {
            polls = polls.wrapping_add(1);
            self.done(ticket, polls % 4096 == 0)
        })
    }
    fn is_done(&self, ticket: &Ticket) -> Result<bool> {
        self.done(ticket, true)
    }
    fn poll_outputs(&self, out: &mut Vec<u64>) -> Result<usize> {
        let mut st = self.state.lock().expect("runtime state poisoned");
        let published = self
            .status_u64(std::mem::offset_of!(StatusBlock, out_published))
            .load(Ordering::Acquire);
        let n = published - st.consumed;
        for i in st.consumed..published {
            let slot = (i % u64::from(OUTPUT_RING_CAP)) as usize;
            // SAFETY: slot inside the output ring; published by the device
            // (release) before `out_published`, which we acquired.
            out.push(unsafe {
                std::ptr::read_volatile(self.status().host_ptr(OUTPUT_OFF + slot * 8) as *const u64)
            });
        }
        st.consumed = published;
        self.status_u64(std::mem::offset_of!(StatusBlock, out_consumed))
            .store(published, Ordering::Release);
        Ok(n as usize)
    }
    fn default_timeout(&self) -> Duration {
        self.opts.host_timeout
    }
}

impl Runtime {
    fn gpu_program<'p>(&self, program: &'p LoadedProgram) -> Result<&'p Arc<GpuProgram>> {
        program
            .inner
            .downcast_ref::<Arc<GpuProgram>>()
            .filter(|_| program.owner == self.id)
            .ok_or(Error::Foreign("program"))
    }

    fn submit_kind(
        &self,
        program: &LoadedProgram,
        iterations: u32,
        params: [u64; COMMAND_PARAMS],
        kind: u32,
    ) -> Result<Ticket> {
        let gp = self.gpu_program(program)?;
        let mut st = self.state.lock().expect("runtime state poisoned");
        if !st.running {
            return Err(Error::Stopped("the runtime was shut down".into()));
        }
        self.check_alive(&mut st, false)?;
        self.retire(&mut st);
        let epoch = gp.epoch.load(Ordering::Relaxed);
        let cmd = Command {
            kind,
            iterations,
            seq: 0,
            epoch_base: epoch,
            iter_base: st.iterations,
            tasks: gp.tasks,
            worker_offsets: gp.worker_offsets,
            events: gp.events,
            num_events: gp.program.num_events() as u32,
            num_workers: self.num_sms,
            params,
        };
        let seq = self.write_command(&mut st, cmd)?;
        gp.epoch
            .store(epoch + u64::from(iterations), Ordering::Relaxed);
        st.iterations += u64::from(iterations);
        let end = st.iterations;
        st.outstanding.push_back(Outstanding {
            seq,
            end,
            program: gp.clone(),
        });
        Ok(Ticket {
            owner: self.id,
            end,
        })
    }

    /// Runs `program` once with `params` (on a runtime created with
    /// [`RuntimeOptions::trace`]), recording when each task started
    /// (its waits satisfied) and ended, and returns those times.
    pub fn trace(&self, program: &LoadedProgram, params: &[u64]) -> Result<Trace> {
        let t = self.submit_traced(program, params)?;
        self.wait(&t, self.opts.host_timeout)?;
        self.read_trace(program)
    }

    /// Submits one traced run of `program` (as [`trace`](Self::trace) does)
    /// without waiting for it: ranks of a cluster that meet inside their
    /// programs are submitted together. Read the times with
    /// [`read_trace`](Self::read_trace) once it completed.
    pub fn submit_traced(&self, program: &LoadedProgram, params: &[u64]) -> Result<Ticket> {
        if !self.opts.trace {
            return Err(Error::InvalidArgument(
                "tracing needs a runtime created with RuntimeOptions { trace: true, .. }".into(),
            ));
        }
        self.submit_kind(program, 1, pack_params(params)?, CMD_RUN | CMD_FLAG_TRACE)
    }

    /// The task times of `program`'s last traced run (after its ticket
    /// completed).
    pub fn read_trace(&self, program: &LoadedProgram) -> Result<Trace> {
        let gp = self.gpu_program(program)?;
        let mut raw = vec![0u8; gp.slots.len() * 16];
        gp.mem.read(gp.trace_off, &mut raw)?;
        let times: &[u64] = bytemuck::cast_slice(&raw);
        let tasks = gp
            .slots
            .iter()
            .enumerate()
            .map(|(i, &(task, worker))| TaskTime {
                task,
                worker,
                start_ns: times[2 * i],
                end_ns: times[2 * i + 1],
            })
            .collect();
        Ok(Trace { tasks })
    }
}
