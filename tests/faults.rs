//! Failure handling: hangs, bad opcodes and out-of-range indices become typed
//! errors naming the task, and a fresh executor works afterwards.

mod common;

use std::time::{Duration, Instant};

use common::{gpu, on_every_executor};
use megakernel::prelude::*;
use megakernel::task::{copy::Copy, nop::Nop, TaskSpec};

fn hang_program() -> Program {
    let mut b = ProgramBuilder::new();
    let never = b.external_event("never signalled");
    let after = b.event("after");
    b.push(Nop::task()).signal(after);
    b.push(Nop::task()).wait(after).wait_count(never, 1);
    b.build().unwrap()
}

fn check_hang(e: Error) {
    match e {
        Error::DeviceHang {
            task,
            task_kind,
            counter,
            seen,
            needed,
            ..
        } => {
            assert_eq!(task, 1);
            assert_eq!(task_kind, "nop");
            assert!(counter.contains("never signalled"), "{counter}");
            assert_eq!((seen, needed), (0, 1));
        }
        e => panic!("expected a hang, got {e}"),
    }
}

#[test]
fn unmet_dependency_is_a_hang_on_cpu() {
    // The GPU case runs with a short timeout in the next test.
    for threads in [1, 3] {
        let ex = CpuExecutor::new(CpuOptions { threads, seed: 1 });
        let p = ex.load(&hang_program()).unwrap();
        check_hang(ex.run(&p, 1, &[]).unwrap_err());
        // The executor stays failed; a new one works.
        assert!(ex.run(&p, 1, &[]).is_err());
        let fresh = CpuExecutor::new(CpuOptions { threads, seed: 1 });
        let mut b = ProgramBuilder::new();
        b.push(Nop::task());
        fresh
            .run(&fresh.load(&b.build().unwrap()).unwrap(), 2, &[])
            .unwrap();
    }
}

#[test]
fn unmet_dependency_is_a_hang_on_gpu_within_its_timeout() {
    let timeout = Duration::from_millis(300);
    let opts = RuntimeOptions {
        wait_timeout: timeout,
        host_timeout: Duration::from_secs(20),
        ..RuntimeOptions::default()
    };
    let Some((_g, rt)) = gpu("unmet_dependency_is_a_hang_on_gpu", opts.clone()) else {
        return;
    };
    let p = rt.load(&hang_program()).unwrap();
    let start = Instant::now();
    let t = rt.submit(&p, 1, &[]).unwrap();
    let err = rt.wait(&t, Duration::from_secs(20)).unwrap_err();
    let took = start.elapsed();
    check_hang(err.clone());
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "hang reported after {took:?}"
    );
    // Later calls keep reporting the error; a new runtime works.
    assert!(rt.submit(&p, 1, &[]).is_err());
    drop(rt);
    let rt = Runtime::with_options(0, opts).unwrap();
    let b = {
        let mut b = ProgramBuilder::new();
        b.push(Nop::task());
        b.build().unwrap()
    };
    rt.run(&rt.load(&b).unwrap(), 3, &[]).unwrap();
}

#[test]
fn bad_opcode_names_the_task() {
    on_every_executor("bad_opcode_names_the_task", |ex| {
        let mut b = ProgramBuilder::new();
        let e = b.event("e");
        b.push(Nop::task()).signal(e);
        b.push(TaskSpec::raw_opcode(999)).wait(e);
        let p = ex.load(&b.build().unwrap()).unwrap();
        match ex.run(&p, 1, &[]).unwrap_err() {
            Error::DeviceFault {
                what, task, value, ..
            } => {
                assert_eq!((what, task, value), ("bad opcode", 1, 999));
            }
            e => panic!("expected a fault, got {e}"),
        }
    });
}

#[test]
fn out_of_range_row_is_a_fault() {
    on_every_executor("out_of_range_row_is_a_fault", |ex| {
        let src = ex.alloc(DType::F32, 40).unwrap();
        let dst = ex.alloc(DType::F32, 10).unwrap();
        let mut b = ProgramBuilder::new();
        b.push(Nop::task());
        b.push(Copy::row(&dst.all(), &src.all(), 10, 0).unwrap())
            .param(2, 0);
        let p = ex.load(&b.build().unwrap()).unwrap();
        ex.run(&p, 1, &[3]).unwrap();
        match ex.run(&p, 1, &[4]).unwrap_err() {
            Error::DeviceFault {
                what,
                task,
                task_kind,
                value,
                bound,
                command,
                ..
            } => {
                assert_eq!(
                    (what, task, task_kind, value, bound),
                    ("index out of range", 1, "copy", 4, 4)
                );
                assert_eq!(command, 2);
            }
            e => panic!("expected a fault, got {e}"),
        }
    });
}

#[test]
fn host_wait_times_out() {
    let opts = RuntimeOptions {
        wait_timeout: Duration::from_secs(3),
        host_timeout: Duration::from_secs(20),
        ..RuntimeOptions::default()
    };
    let Some((_g, rt)) = gpu("host_wait_times_out", opts) else {
        return;
    };
    let mut b = ProgramBuilder::new();
    let never = b.external_event("never");
    b.push(Nop::task()).wait_count(never, 1);
    let p = rt.load(&b.build().unwrap()).unwrap();
    let t = rt.submit(&p, 1, &[]).unwrap();
    match rt.wait(&t, Duration::from_millis(100)) {
        Err(Error::HostTimeout { .. }) => {}
        r => panic!("expected a host timeout, got {r:?}"),
    }
    // The device then reports the hang itself.
    assert!(matches!(
        rt.wait(&t, Duration::from_secs(10)),
        Err(Error::DeviceHang { .. })
    ));
}
