//! Runtime lifecycle: start, use, stop, many times, without leaks or hangs.

mod common;

use common::{gpu, gpu_required};
use megakernel::prelude::*;
use megakernel::task::fill::Fill;

#[test]
fn hundred_runtimes_do_not_leak() {
    let Some((_g, rt)) = gpu("hundred_runtimes_do_not_leak", RuntimeOptions::default()) else {
        return;
    };
    drop(rt);
    let (free_before, _) = megakernel::cuda::memory_info(0).unwrap();
    for i in 0..100u32 {
        let rt = Runtime::new(0).unwrap();
        let buf = rt.alloc(DType::F32, 1 << 20).unwrap();
        let mut b = ProgramBuilder::new();
        b.push(Fill::task(&buf.all(), i as f32).unwrap());
        rt.run(&rt.load(&b.build().unwrap()).unwrap(), 2, &[])
            .unwrap();
        assert_eq!(rt.read_f32(&buf).unwrap()[12345], i as f32);
    }
    let (free_after, _) = megakernel::cuda::memory_info(0).unwrap();
    let lost = free_before.saturating_sub(free_after);
    assert!(
        lost < 32 << 20,
        "lost {lost} bytes of device memory over 100 runtimes"
    );
}

/// A Hopper GPU runs the committed machine code, not JIT-compiled PTX; other
/// GPUs load the portable PTX. Either way the kernel runs.
#[test]
fn hopper_loads_machine_code() {
    let Some((_g, rt)) = gpu("hopper_loads_machine_code", RuntimeOptions::default()) else {
        return;
    };
    let want = if rt.arch() == "sm_90a" {
        "cubin"
    } else {
        "PTX"
    };
    assert_eq!(rt.image_form(), want, "{}", rt.describe());
    assert!(rt.describe().ends_with(&format!("{} {want})", rt.arch())));
    let buf = rt.alloc(DType::F32, 4096).unwrap();
    let mut b = ProgramBuilder::new();
    b.push(Fill::task(&buf.all(), 2.5).unwrap());
    rt.run(&rt.load(&b.build().unwrap()).unwrap(), 1, &[])
        .unwrap();
    assert!(rt.read_f32(&buf).unwrap().iter().all(|&v| v == 2.5));
}

#[test]
fn second_runtime_on_a_busy_device_is_an_error() {
    let Some((_g, rt)) = gpu(
        "second_runtime_on_a_busy_device_is_an_error",
        RuntimeOptions::default(),
    ) else {
        return;
    };
    assert!(matches!(Runtime::new(0), Err(Error::Residency(_))));
    drop(rt);
    drop(Runtime::new(0).unwrap());
}

#[test]
fn missing_device_is_a_typed_error() {
    match Runtime::new(4096) {
        Err(Error::NoDevice { .. }) | Err(Error::NoDriver) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("device 4096 exists?"),
    }
    if !gpu_required() && megakernel::cuda::device_count() == 0 {
        assert!(matches!(
            Runtime::new(0),
            Err(Error::NoDriver) | Err(Error::NoDevice { .. })
        ));
    }
}

#[test]
fn buffers_and_programs_stay_with_their_executor() {
    let a = CpuExecutor::new(CpuOptions::default());
    let b = CpuExecutor::new(CpuOptions::default());
    let buf = a.alloc(DType::F32, 4).unwrap();
    assert!(matches!(
        b.write_f32(&buf, &[1.0; 4]),
        Err(Error::Foreign(_))
    ));
    let mut pb = ProgramBuilder::new();
    pb.push(Fill::task(&buf.all(), 1.0).unwrap());
    let p = pb.build().unwrap();
    assert!(matches!(b.load(&p), Err(Error::Foreign(_))));
    assert!(matches!(
        a.write_f32(&buf, &[1.0; 5]),
        Err(Error::OutOfBounds { .. })
    ));
}
