//! Reference measurements the benchmarks compare against, taken with plain
//! kernels of the same module while no resident kernel runs on the device.

use std::time::Instant;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{context, ptx, BUSY};
use crate::error::{Error, Result};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn check_idle(ordinal: usize) -> Result<()> {
    let busy = BUSY.lock().expect("device registry poisoned");
    if busy
        .as_ref()
        .and_then(|s| s.get(&ordinal))
        .is_some_and(|&used| used > 0)
    {
        return Err(Error::Residency(format!(
            "device {ordinal} runs a resident kernel; probes need it idle"
        )));
    }
    Ok(())
}

/// Device copy bandwidth in bytes per second, counting bytes read plus
/// written: the median of `reps` 16-byte-per-thread copies of `bytes` bytes.
pub fn copy_bandwidth(ordinal: usize, bytes: usize, reps: usize) -> Result<f64> {
    check_idle(ordinal)?;
    let ctx = context(ordinal)?;
    let (major, minor) = ctx.compute_capability()?;
    let module = ptx::load(&ctx, ptx::select(major, minor))?.0;
    let copy = module.load_function("mk_probe_copy")?;
    let stream = ctx.new_stream()?;
    let bytes = bytes.next_multiple_of(16);
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    let n = (bytes / 16) as u64;
    let sms = ctx.attribute(
        cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )?;
    let cfg = LaunchConfig {
        grid_dim: (sms as u32 * 2, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut times = Vec::with_capacity(reps);
    for i in 0..=reps {
        let t = Instant::now();
        // SAFETY: mk_probe_copy(src, dst, n) copies n 16-byte elements; both
        // buffers hold `bytes` = 16 n bytes.
        unsafe {
            stream
                .launch_builder(&copy)
                .arg(&src)
                .arg(&mut dst)
                .arg(&n)
                .launch(cfg)
        }?;
        stream.synchronize()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * bytes as f64 / median(times))
}

/// Median time of an empty kernel launch plus stream synchronisation, in seconds.
pub fn launch_latency(ordinal: usize, reps: usize) -> Result<f64> {
    check_idle(ordinal)?;
    let ctx = context(ordinal)?;
    let (major, minor) = ctx.compute_capability()?;
    let module = ptx::load(&ctx, ptx::select(major, minor))?.0;
    let empty = module.load_function("mk_probe_empty")?;
    let stream = ctx.new_stream()?;
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut times = Vec::with_capacity(reps);
    for i in 0..=reps {
        let t = Instant::now();
        // SAFETY: mk_probe_empty takes no arguments.
        unsafe { stream.launch_builder(&empty).launch(one) }?;
        stream.synchronize()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}
