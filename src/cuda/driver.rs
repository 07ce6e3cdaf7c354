//! The only module with raw CUDA driver calls: mapped host memory, stream-ordered
//! device memory, copies, the cooperative launch of the resident kernel, and
//! stream queries. Everything it exports is safe to call.

use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{result, sys, CudaFunction, CudaStream, DriverError};

use crate::abi::KernelParams;
use crate::error::Error;

/// Host memory mapped into the device address space (`cuMemHostAlloc` with
/// `DEVICEMAP | PORTABLE`): ordinary cached pages, cheap for the host to read.
pub(crate) struct MappedHost {
    host: *mut u8,
    dev: u64,
    bytes: usize,
}

// SAFETY: the allocation is plain pinned memory owned by this value; all
// accesses go through raw pointers with volatile or atomic operations.
unsafe impl Send for MappedHost {}
// SAFETY: as above; shared access is only through atomics/volatile ops.
unsafe impl Sync for MappedHost {}

impl MappedHost {
    /// Allocates `bytes` zeroed bytes.
    pub(crate) fn new(bytes: usize) -> Result<Self, DriverError> {
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the context is current (bound by the caller); the pointer
        // returned is valid for `bytes` bytes until `free_host`.
        let host = unsafe { result::malloc_host(bytes, flags) }? as *mut u8;
        // SAFETY: `host` is valid for `bytes` bytes.
        unsafe { std::ptr::write_bytes(host, 0, bytes) };
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `host` was allocated with DEVICEMAP in the current context.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host as *mut c_void, 0) };
        if let Err(e) = r.result() {
            // SAFETY: allocated above and not shared.
            unsafe { result::free_host(host as *mut c_void) }.ok();
            return Err(e);
        }
        Ok(MappedHost { host, dev, bytes })
    }
    /// Host address of byte `off`.
    pub(crate) fn host_ptr(&self, off: usize) -> *mut u8 {
        assert!(off < self.bytes);
        // SAFETY: in bounds by the assertion.
        unsafe { self.host.add(off) }
    }
    /// Device address of byte `off`.
    pub(crate) fn dev_ptr(&self, off: usize) -> u64 {
        self.dev + off as u64
    }
}

impl Drop for MappedHost {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_host`; the owner drops this only after
        // the resident kernel has exited.
        unsafe { result::free_host(self.host as *mut c_void) }.ok();
    }
}

/// Device memory from the stream-ordered allocator (`cuMemAllocAsync` on the
/// copy stream), which, unlike `cuMemFree`, never waits for the resident kernel.
pub(crate) struct DevMem {
    ptr: u64,
    bytes: usize,
    stream: Arc<CudaStream>,
}

impl DevMem {
    /// Allocates `bytes` (at least 256) zeroed bytes.
    ///
    /// Zeroing copies from host memory: `cuMemset` may run as a kernel, which
    /// could never start while the resident kernel holds every SM.
    pub(crate) fn zeroed(stream: &Arc<CudaStream>, bytes: usize) -> Result<Self, Error> {
        const CHUNK: usize = 4 << 20;
        static ZEROS: [u8; CHUNK] = [0; CHUNK];
        let bytes = bytes.max(256);
        stream.context().bind_to_thread()?;
        // SAFETY: valid stream of the current context.
        let ptr = unsafe { result::malloc_async(stream.cu_stream(), bytes) }?;
        let mem = DevMem {
            ptr,
            bytes,
            stream: stream.clone(),
        };
        let mut off = 0;
        while off < bytes {
            let n = CHUNK.min(bytes - off);
            // SAFETY: `ptr + off .. + n` lies in the allocation; ZEROS is static.
            unsafe {
                result::memcpy_htod_async(ptr + off as u64, &ZEROS[..n], stream.cu_stream())
            }?;
            off += n;
        }
        sync(stream)?;
        Ok(mem)
    }
    /// Device address.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Copies `src` to byte offset `off` and waits for it.
    pub(crate) fn write(&self, off: usize, src: &[u8]) -> Result<(), Error> {
        assert!(off + src.len() <= self.bytes);
        if src.is_empty() {
            return Ok(());
        }
        self.stream.context().bind_to_thread()?;
        // SAFETY: destination range checked above; the copy completes before return.
        unsafe { result::memcpy_htod_async(self.ptr + off as u64, src, self.stream.cu_stream()) }?;
        sync(&self.stream)
    }
    /// Copies from byte offset `off` into `dst` and waits for it.
    pub(crate) fn read(&self, off: usize, dst: &mut [u8]) -> Result<(), Error> {
        assert!(off + dst.len() <= self.bytes);
        if dst.is_empty() {
            return Ok(());
        }
        self.stream.context().bind_to_thread()?;
        // SAFETY: source range checked above; the copy completes before return.
        unsafe { result::memcpy_dtoh_async(dst, self.ptr + off as u64, self.stream.cu_stream()) }?;
        sync(&self.stream)
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if self.stream.context().bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_async`; no task of a running command
            // uses it any more (programs and buffers outlive their commands).
            unsafe { result::free_async(self.ptr, self.stream.cu_stream()) }.ok();
        }
    }
}

/// Launches the resident kernel cooperatively (fails instead of hanging when
/// the grid cannot be co-resident).
pub(crate) fn launch_resident(
    func: &CudaFunction,
    stream: &CudaStream,
    grid: u32,
    block: u32,
    shared_bytes: u32,
    params: &KernelParams,
    cooperative: bool,
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    let mut p = *params;
    let mut args = [&mut p as *mut KernelParams as *mut c_void];
    // A kernel on part of the SMs (beside another runtime's) is launched
    // plainly: its blocks take the free SMs one each.
    let launch = if cooperative {
        result::launch_cooperative_kernel
    } else {
        result::launch_kernel
    };
    // SAFETY: the kernel takes exactly one `KernelParams` by value (same layout
    // on both sides, checked by the ABI test); `p` lives across the call, which
    // copies it.
    unsafe {
        launch(
            func.cu_function(),
            (grid, 1, 1),
            (block, 1, 1),
            shared_bytes,
            stream.cu_stream(),
            &mut args,
        )
    }
}

/// Whether all work on `stream` has finished (`cuStreamQuery`).
pub(crate) fn stream_done(stream: &CudaStream) -> Result<bool, DriverError> {
    stream.context().bind_to_thread()?;
    // SAFETY: valid stream of the current context.
    match unsafe { sys::cuStreamQuery(stream.cu_stream()) } {
        sys::CUresult::CUDA_SUCCESS => Ok(true),
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        e => Err(DriverError(e)),
    }
}

/// Waits for the copy stream, polling, so that a copy that cannot proceed
/// becomes an error instead of a hang.
pub(crate) fn sync(stream: &CudaStream) -> Result<(), Error> {
    const LIMIT: Duration = Duration::from_secs(120);
    let start = Instant::now();
    while !stream_done(stream)? {
        if start.elapsed() > LIMIT {
            return Err(Error::HostTimeout {
                waited: start.elapsed(),
                what: "a device copy".into(),
            });
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// Whether the CUDA driver library can be loaded.
pub(crate) fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

/// Whether device `dev` can read and write device `peer`'s memory directly.
pub(crate) fn can_access_peer(dev: usize, peer: usize) -> Result<bool, DriverError> {
    let (mut a, mut b, mut ok): (sys::CUdevice, sys::CUdevice, std::ffi::c_int) = (0, 0, 0);
    // SAFETY: out-pointers to locals; the driver is initialised by the caller.
    unsafe {
        sys::cuDeviceGet(&mut a, dev as std::ffi::c_int).result()?;
        sys::cuDeviceGet(&mut b, peer as std::ffi::c_int).result()?;
        sys::cuDeviceCanAccessPeer(&mut ok, a, b).result()?;
    }
    Ok(ok != 0)
}

/// Lets device `peer` read and write every allocation of device `owner`'s
/// default memory pool (the stream-ordered allocator [`DevMem`] uses; peer
/// access to pool memory is granted per pool, not per context).
pub(crate) fn grant_pool_access(owner: usize, peer: usize) -> Result<(), DriverError> {
    let mut dev: sys::CUdevice = 0;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let desc = sys::CUmemAccessDesc {
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: peer as std::ffi::c_int,
        },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: out-pointers to locals; `desc` lives across the call.
    unsafe {
        sys::cuDeviceGet(&mut dev, owner as std::ffi::c_int).result()?;
        sys::cuDeviceGetDefaultMemPool(&mut pool, dev).result()?;
        sys::cuMemPoolSetAccess(pool, &desc, 1).result()
    }
}
