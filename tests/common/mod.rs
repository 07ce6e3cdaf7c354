//! Shared test helpers: one test body runs on the CPU executor and, when a GPU
//! is present, on the resident kernel. Without a GPU the GPU half prints a skip
//! notice, or fails when `MK_REQUIRE_GPU=1`.
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use megakernel::prelude::*;

/// Serialises GPU use inside one test binary (one resident kernel per device).
static GPU: Mutex<()> = Mutex::new(());

/// Whether GPU tests must run (set on the GPU machine).
pub fn gpu_required() -> bool {
    std::env::var("MK_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// A GPU runtime with the GPU lock held, or `None` (after a skip notice) when
/// the machine has no usable GPU. Panics if a GPU is required but unusable.
pub fn gpu(test: &str, opts: RuntimeOptions) -> Option<(MutexGuard<'static, ()>, Runtime)> {
    let guard = GPU.lock().unwrap_or_else(|e| e.into_inner());
    match Runtime::with_options(0, opts) {
        Ok(rt) => Some((guard, rt)),
        Err(e) if gpu_required() => panic!("{test}: MK_REQUIRE_GPU=1 but no GPU runtime: {e}"),
        Err(e) => {
            eprintln!("skipping GPU part of {test}: {e}");
            None
        }
    }
}

/// The GPU lock when at least `devices` GPUs are usable, or `None` after a
/// skip notice (a failure when `MK_REQUIRE_GPU=1` and `devices` is 1).
pub fn gpus(test: &str, devices: usize) -> Option<MutexGuard<'static, ()>> {
    let guard = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let count = megakernel::cuda::device_count();
    if count >= devices {
        return Some(guard);
    }
    if devices == 1 && gpu_required() {
        panic!("{test}: MK_REQUIRE_GPU=1 but no GPU");
    }
    eprintln!("skipping GPU part of {test}: {count} GPUs, {devices} needed");
    None
}

/// Runs `body` on CPU executors with a few thread counts and on the GPU.
pub fn on_every_executor(test: &str, mut body: impl FnMut(&dyn Executor)) {
    for threads in [1, 3] {
        let cpu = CpuExecutor::new(CpuOptions {
            threads,
            seed: 7 + threads as u64,
        });
        body(&cpu);
    }
    if let Some((_guard, rt)) = gpu(test, RuntimeOptions::default()) {
        body(&rt);
    }
}

/// Small seedable generator for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Rounds through bf16, as a bf16 buffer stores it.
pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - y).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
    (num / den.max(1e-300)).sqrt()
}

/// A fresh seed from the clock, printed so that a failure can be replayed.
pub fn seed() -> u64 {
    // MK_TEST_SEED repeats a run whose printed seed exposed a failure.
    let s = std::env::var("MK_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("seed {s}");
    s
}
