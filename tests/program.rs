//! Program validation and the per-worker schedule.

use megakernel::error::ProgramError;
use megakernel::prelude::*;
use megakernel::task::{fill::Fill, nop::Nop};

fn err(b: ProgramBuilder) -> ProgramError {
    match b.build() {
        Err(Error::Program(e)) => e,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("invalid program accepted"),
    }
}

#[test]
fn cycles_are_rejected() {
    let mut b = ProgramBuilder::new();
    let (e1, e2, e3) = (b.event("a"), b.event("b"), b.event("c"));
    b.push(Nop::task()).signal(e3);
    b.push(Nop::task()).wait(e1).signal(e2);
    b.push(Nop::task()).wait(e2).signal(e1);
    assert!(matches!(
        err(b),
        ProgramError::Cycle {
            task: 1 | 2,
            kind: "nop"
        }
    ));
    let mut b = ProgramBuilder::new();
    let e = b.event("self");
    b.push(Nop::task()).wait(e).signal(e);
    assert!(matches!(err(b), ProgramError::Cycle { task: 0, .. }));
}

#[test]
fn inputs_nobody_produces_are_rejected() {
    let mut b = ProgramBuilder::new();
    let e = b.event("orphan");
    b.push(Nop::task()).wait(e);
    assert_eq!(
        err(b),
        ProgramError::Unproduced {
            task: 0,
            event: "orphan".into()
        }
    );
}

#[test]
fn inconsistent_counts_are_rejected() {
    let mut b = ProgramBuilder::new();
    let e = b.event("two producers");
    b.push(Nop::task()).signal(e);
    b.push(Nop::task()).signal(e);
    b.push(Nop::task()).wait_count(e, 3);
    assert!(matches!(
        err(b),
        ProgramError::InconsistentCount {
            task: 2,
            need: 3,
            producers: 2,
            ..
        }
    ));
    let mut b = ProgramBuilder::new();
    let e = b.event("two producers");
    b.push(Nop::task()).signal(e);
    b.push(Nop::task()).signal(e);
    b.push(Nop::task()).wait_count(e, 2);
    assert!(b.build().is_ok());
    let mut b = ProgramBuilder::new();
    let x = b.external_event("host");
    b.push(Nop::task()).wait(x);
    assert!(matches!(err(b), ProgramError::BadArgs { .. }));
}

#[test]
fn limits_are_enforced() {
    let mut b = ProgramBuilder::new();
    let es: Vec<_> = (0..3).map(|i| b.event(&format!("e{i}"))).collect();
    for &e in &es {
        b.push(Nop::task()).signal(e);
    }
    b.push(Nop::task()).wait(es[0]).wait(es[1]).wait(es[2]);
    assert!(matches!(
        err(b),
        ProgramError::TooManyWaits {
            task: 3,
            waits: 3,
            max: 2
        }
    ));
    let mut b = ProgramBuilder::new();
    let (e1, e2) = (b.event("1"), b.event("2"));
    b.push(Nop::task()).signal(e1).signal(e2);
    assert_eq!(err(b), ProgramError::TooManySignals { task: 0 });
    assert_eq!(err(ProgramBuilder::new()), ProgramError::Empty);
    let mut other = ProgramBuilder::new();
    let foreign = other.event("elsewhere");
    let mut b = ProgramBuilder::new();
    b.push(Nop::task()).signal(foreign);
    assert_eq!(err(b), ProgramError::UnknownEvent(0));
}

#[test]
fn parameters_only_where_a_kind_allows_them() {
    let cpu = CpuExecutor::new(CpuOptions::default());
    let buf = cpu.alloc(DType::F32, 8).unwrap();
    let mut b = ProgramBuilder::new();
    b.push(Fill::task(&buf.all(), 1.0).unwrap()).param(0, 0);
    assert!(matches!(err(b), ProgramError::BadArgs { kind: "fill", .. }));
    let mut b = ProgramBuilder::new();
    b.push(Fill::task(&buf.all(), 1.0).unwrap()).param(2, 8);
    assert!(matches!(err(b), ProgramError::BadArgs { .. }));
    assert!(matches!(
        cpu.run(
            &cpu.load(&{
                let mut b = ProgramBuilder::new();
                b.push(Fill::task(&buf.all(), 1.0).unwrap()).param(2, 0);
                b.build().unwrap()
            })
            .unwrap(),
            1,
            &[0; 9]
        ),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn mixed_executors_are_rejected() {
    let (a, c) = (
        CpuExecutor::new(CpuOptions::default()),
        CpuExecutor::new(CpuOptions::default()),
    );
    let (x, y) = (
        a.alloc(DType::F32, 4).unwrap(),
        c.alloc(DType::F32, 4).unwrap(),
    );
    let mut b = ProgramBuilder::new();
    b.push(Fill::task(&x.all(), 1.0).unwrap());
    b.push(Fill::task(&y.all(), 1.0).unwrap());
    assert_eq!(err(b), ProgramError::MixedExecutors);
}

#[test]
fn schedule_keeps_every_list_in_topological_order() {
    let mut b = ProgramBuilder::new();
    let mut prev = None;
    for i in 0..50u32 {
        let e = b.event("e");
        let mut h = b.push(Nop::task()).signal(e);
        if let Some(p) = prev {
            h = h.wait(p);
        }
        if i % 7 == 0 {
            h = h.on_worker(3);
        }
        let _ = h;
        prev = Some(e);
    }
    let p = b.build().unwrap();
    for workers in [1, 2, 5, 132] {
        let s = p.schedule(workers);
        assert_eq!(s.workers(), workers);
        assert_eq!(s.tasks.len(), 50);
        let pos: Vec<usize> = {
            let order = p.topological_order();
            let mut pos = vec![0; 50];
            for (i, &t) in order.iter().enumerate() {
                pos[t as usize] = i;
            }
            pos
        };
        for w in 0..workers {
            let ids: Vec<usize> = s.list(w).iter().map(|d| pos[d.id as usize]).collect();
            assert!(
                ids.windows(2).all(|x| x[0] < x[1]),
                "worker {w} list out of order"
            );
        }
        let mut all: Vec<u32> = s.tasks.iter().map(|d| d.id).collect();
        all.sort();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
        // Pinned tasks land on their worker.
        assert!((0..50)
            .step_by(7)
            .all(|i| s.list(3 % workers).iter().any(|d| d.id == i)));
    }
}

#[test]
fn followers_share_their_producers_worker_and_drop_the_waits_and_signals_its_list_meets() {
    use megakernel::abi::NO_EVENT;
    let mut b = ProgramBuilder::new();
    let (ea, ec, ed) = (b.event("a"), b.event("c"), b.event("d"));
    // Producers dealt round-robin, each followed by a task on its worker.
    let mut pairs = Vec::new();
    for k in 0..5 {
        let ev = b.event(&format!("p ({k})"));
        let p = b.push(Nop::task()).signal(ev).id();
        let f = b.push(Nop::task()).wait(ev).follow(p).signal(ec).id();
        pairs.push((p.0, f.0));
    }
    // A task waiting on producers spread over several workers, and a chain
    // of two tasks pinned to one worker.
    let spread = b.push(Nop::task()).wait(ec).id().0;
    let first = b.push(Nop::task()).on_worker(1).signal(ea).id().0;
    let second = b.push(Nop::task()).on_worker(1).wait(ea).signal(ed).id().0;
    b.push(Nop::task()).wait(ed);
    let p = b.build().unwrap();
    for workers in [1, 2, 3, 8] {
        let s = p.schedule(workers);
        let at = |id: u32| {
            (0..workers)
                .find_map(|w| s.list(w).iter().position(|d| d.id == id).map(|i| (w, i)))
                .unwrap()
        };
        let desc = |id: u32| *s.tasks.iter().find(|d| d.id == id).unwrap();
        for &(p, f) in &pairs {
            let ((wp, ip), (wf, i_f)) = (at(p), at(f));
            assert_eq!(wp, wf, "a follower runs on its producer's worker");
            assert!(ip < i_f, "and after it");
            assert_eq!(desc(f).wait, [NO_EVENT; 2], "its wait is met by its list");
            // Nobody on the device waits for the producer's event any more.
            assert_eq!(desc(p).signal, NO_EVENT);
            // The followers' event is read by `spread` where it still waits.
            assert_eq!(desc(f).signal != NO_EVENT, workers > 1);
        }
        let pinned = desc(second).wait;
        assert_eq!(
            pinned, [NO_EVENT; 2],
            "a wait on the same worker is dropped"
        );
        assert_eq!(at(first).0, at(second).0);
        // Five producers on one worker only when there is one worker.
        let kept = desc(spread).wait[0] != NO_EVENT;
        assert_eq!(kept, workers > 1, "{workers} workers");
        // The program's own descriptors keep every wait (other executors use them).
        assert_ne!(p.descriptors()[pairs[0].1 as usize].wait[0], NO_EVENT);
    }
}

#[test]
fn a_follower_must_wait_for_the_task_it_follows() {
    let mut b = ProgramBuilder::new();
    let e = b.event("e");
    let p = b.push(Nop::task()).signal(e).id();
    b.push(Nop::task()).follow(p);
    assert!(matches!(err(b), ProgramError::BadArgs { kind: "nop", .. }));
}
