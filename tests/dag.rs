//! Random DAGs of tasks on the executors against a direct sequential computation,
//! and proof that the CPU executor really exercises orderings: a program with
//! one dependency edge removed gives a wrong result on some seed.

mod common;

use common::{gpu, Rng};
use megakernel::prelude::*;
use megakernel::task::{copy::Copy, reduce_sum::ReduceSum};
use proptest::prelude::*;

/// A random layered DAG: layer 0 copies inputs, later tasks sum contiguous
/// ranges of earlier outputs (one or two producer groups, one event each).
struct Dag {
    n: usize,
    /// For each task: None (source, copies input[id]) or the range of outputs it sums.
    inputs: Vec<Option<(usize, usize)>>,
    /// For each task: its group (event) index.
    group: Vec<usize>,
    /// Group id ranges.
    groups: Vec<(usize, usize)>,
    /// For each task: the groups it waits on.
    waits: Vec<Vec<usize>>,
}

impl Dag {
    fn random(rng: &mut Rng, max_layers: usize, max_width: usize) -> Dag {
        let layers = 2 + rng.below(max_layers - 1);
        let (mut inputs, mut group, mut groups, mut waits) = (vec![], vec![], vec![], vec![]);
        let mut n = 0;
        for l in 0..layers {
            let width = 1 + rng.below(max_width);
            let first_group = groups.len();
            let mut i = 0;
            while i < width {
                let size = (1 + rng.below(3)).min(width - i);
                groups.push((n + i, n + i + size));
                i += size;
            }
            for t in n..n + width {
                let g = (first_group..groups.len())
                    .find(|&g| groups[g].0 <= t && t < groups[g].1)
                    .unwrap();
                group.push(g);
                if l == 0 {
                    inputs.push(None);
                    waits.push(vec![]);
                } else {
                    let g1 = rng.below(first_group);
                    let two = g1 + 1 < first_group && rng.below(2) == 0;
                    let g2 = if two { g1 + 1 } else { g1 };
                    inputs.push(Some((groups[g1].0, groups[g2].1)));
                    waits.push(if two { vec![g1, g2] } else { vec![g1] });
                }
            }
            n += width;
        }
        Dag {
            n,
            inputs,
            group,
            groups,
            waits,
        }
    }

    fn reference(&self, input: &[f32]) -> Vec<f64> {
        let mut v = vec![0f64; self.n];
        for t in 0..self.n {
            v[t] = match self.inputs[t] {
                None => f64::from(input[t]),
                Some((a, b)) => v[a..b].iter().sum(),
            };
        }
        v
    }

    /// The program; `drop_wait` removes one (task, wait index) edge.
    fn program(&self, input: &Buffer, out: &Buffer, drop_wait: Option<(usize, usize)>) -> Program {
        let mut b = ProgramBuilder::new();
        let events: Vec<EventId> = (0..self.groups.len())
            .map(|g| b.event(&format!("group {g}")))
            .collect();
        for t in 0..self.n {
            let dst = out.slice(t..t + 1).unwrap();
            let spec = match self.inputs[t] {
                None => Copy::row(&dst, &input.all(), 1, t as u32).unwrap(),
                Some((a, z)) => ReduceSum::task(&out.slice(a..z).unwrap(), &dst).unwrap(),
            };
            let mut h = b.push(spec).signal(events[self.group[t]]);
            for (k, &g) in self.waits[t].iter().enumerate() {
                if drop_wait != Some((t, k)) {
                    h = h.wait(events[g]);
                }
            }
        }
        b.build().unwrap()
    }
}

fn run_dag(ex: &dyn Executor, dag: &Dag, rng: &mut Rng, drop_wait: Option<(usize, usize)>) -> bool {
    let input = ex.alloc(DType::F32, dag.n).unwrap();
    let out = ex.alloc(DType::F32, dag.n).unwrap();
    let iv = rng.vec(dag.n);
    ex.write_f32(&input, &iv).unwrap();
    ex.write_f32(&out, &vec![f32::NAN; dag.n]).unwrap();
    let p = ex.load(&dag.program(&input, &out, drop_wait)).unwrap();
    ex.run(&p, 1, &[]).unwrap();
    let got = ex.read_f32(&out).unwrap();
    let want = dag.reference(&iv);
    got.iter()
        .zip(&want)
        .all(|(&g, &w)| (f64::from(g) - w).abs() <= 1e-5 * w.abs().max(1.0))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_dags_match_sequential_on_cpu(seed in any::<u64>(), threads in 1usize..5, width in 1usize..12) {
        let mut rng = Rng(seed);
        let dag = Dag::random(&mut rng, 7, width);
        let ex = CpuExecutor::new(CpuOptions { threads, seed });
        prop_assert!(run_dag(&ex, &dag, &mut rng, None));
    }
}

#[test]
fn random_dags_match_sequential_on_gpu() {
    let Some((_g, rt)) = gpu(
        "random_dags_match_sequential_on_gpu",
        RuntimeOptions::default(),
    ) else {
        return;
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    for case in 0..40 {
        // Widths up to twice the SM count, so several tasks share each SM's list.
        let width = if case % 2 == 0 {
            12
        } else {
            2 * rt.num_workers()
        };
        let dag = Dag::random(&mut rng, 8, width);
        assert!(run_dag(&rt, &dag, &mut rng, None), "case {case} wrong");
    }
}

#[test]
fn removing_one_edge_breaks_some_seed() {
    let mut rng = Rng(42);
    // A DAG where some task in a later layer waits on a producer.
    let dag = loop {
        let d = Dag::random(&mut rng, 5, 6);
        if d.n >= 8 {
            break d;
        }
    };
    let (t, k) = (0..dag.n)
        .rev()
        .find_map(|t| (!dag.waits[t].is_empty()).then_some((t, 0)))
        .unwrap();
    let mut broken = 0;
    for seed in 0..64 {
        let ex = CpuExecutor::new(CpuOptions {
            threads: 1 + (seed % 3) as usize,
            seed,
        });
        assert!(
            run_dag(&ex, &dag, &mut rng, None),
            "the complete program must always be right"
        );
        if !run_dag(&ex, &dag, &mut rng, Some((t, k))) {
            broken += 1;
        }
    }
    assert!(broken > 0, "no seed exposed the missing edge");
    eprintln!("missing edge exposed on {broken} of 64 seeds");
}

fn input2(ex: &dyn Executor, n: usize) -> Buffer {
    ex.alloc(DType::F32, n).unwrap()
}

/// A traced run records every task once, and the device times respect the
/// program's edges: a task starts only after every task it waits on ended.
#[test]
fn traced_run_times_respect_every_edge() {
    let opts = RuntimeOptions {
        trace: true,
        ..RuntimeOptions::default()
    };
    let Some((_g, rt)) = gpu("traced_run_times_respect_every_edge", opts) else {
        return;
    };
    let mut rng = Rng(common::seed());
    let dag = Dag::random(&mut rng, 8, 2 * rt.num_workers());
    let input = rt.alloc(DType::F32, dag.n).unwrap();
    let out = rt.alloc(DType::F32, dag.n).unwrap();
    rt.write_f32(&input, &rng.vec(dag.n)).unwrap();
    let p = rt.load(&dag.program(&input, &out, None)).unwrap();
    let trace = rt.trace(&p, &[]).unwrap();
    assert_eq!(trace.tasks.len(), dag.n);
    let mut by_task = vec![None; dag.n];
    for t in &trace.tasks {
        assert!(t.start_ns > 0 && t.start_ns <= t.end_ns, "{t:?}");
        assert!((t.worker as usize) < rt.num_workers());
        assert!(by_task[t.task as usize].replace(*t).is_none(), "task twice");
    }
    let mut edges = 0;
    for (task, waits) in dag.waits.iter().enumerate() {
        let me = by_task[task].unwrap();
        for &g in waits {
            let (a, z) = dag.groups[g];
            for (producer, p) in by_task.iter().enumerate().take(z).skip(a) {
                let p = p.unwrap();
                assert!(
                    p.end_ns <= me.start_ns,
                    "task {task} started before {producer} ended"
                );
                edges += 1;
            }
        }
    }
    assert!(edges > 0);
    let stages = trace.stages(p.program());
    // The default kernel carries no tracing code and says so.
    drop(rt);
    let plain = Runtime::new(0).unwrap();
    let p2 = plain
        .load(&dag.program(&input2(&plain, dag.n), &input2(&plain, dag.n), None))
        .unwrap();
    assert!(plain.trace(&p2, &[]).is_err());
    assert_eq!(stages.iter().map(|s| s.tasks).sum::<usize>(), dag.n);
    let critical: u64 = stages.iter().map(|s| s.critical_ns).sum();
    assert_eq!(critical, trace.total_ns());
}
