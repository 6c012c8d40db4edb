//! Measurements behind `gpu-mnist bench`: matmul GFLOP/s at the model's shapes, the time of one
//! training step, throughput over a run of steps, start-up time, memory, and the backend's
//! dispatches, submits and read-backs per step.
//!
//! Contract: every timed region ends with (an awaited) `Backend::sync`, so GPU work is finished before the
//! clock stops; each figure is the median of `repeats` timed runs after `warmup` untimed ones.

use web_time::Instant;

use crate::backend::ops::StepAt;
use crate::backend::{Backend, Counters, DatasetId, Op};
use crate::data::{batches, epoch_order, Dataset};
use crate::device::OpenedDevice;
use crate::error::Result;
use crate::model::{glorot_init, Batch, Graph, ModelSpec};
use crate::optim::Optimizer;
use crate::plan::PlanKind;

/// How much to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The model benchmarked.
    pub spec: ModelSpec,
    /// The optimizer (with its schedule) each timed step applies.
    pub optimizer: Optimizer,
    /// How the timed steps augment their batches (a recipe's `--augment`), if at all.
    pub augment: Option<crate::backend::ops::Augment>,
    pub batch: usize,
    /// Steps per timed throughput run.
    pub steps: usize,
    pub repeats: usize,
    pub warmup: usize,
}

/// One op of a training step at its real shape.
#[derive(Debug, Clone)]
pub struct MatmulFigure {
    /// The op with its shape (`Op::describe`).
    pub op: String,
    /// Its kind (`Op::name`), e.g. "matmul forward".
    pub name: &'static str,
    /// 1-based position in the step's plan.
    pub layer: usize,
    /// (M, K, N) of a product; zeros for other ops.
    pub mkn: (usize, usize, usize),
    pub millis: f64,
    /// 0 for ops that are not products.
    pub gflops: f64,
}

/// Everything measured on one device.
#[derive(Debug, Clone)]
pub struct DeviceBench {
    pub device: String,
    /// Opening the device, allocating and uploading, and the first training step (synced).
    pub startup_s: f64,
    pub matmuls: Vec<MatmulFigure>,
    /// (kernel, device microseconds) of each dispatch of one training step (GPUs with timestamps).
    pub profile: Vec<(String, f64)>,
    /// Median time of one training step, synced after each.
    pub step_ms: f64,
    /// Training samples per second over `steps` steps with one sync at the end.
    pub samples_per_s: f64,
    /// Host time to issue (record) one step, without waiting for the device; on a GPU the rest of
    /// a step's time is the device's.
    pub record_ms: f64,
    /// 60,000 / samples_per_s.
    pub epoch_s: f64,
    pub steps: usize,
    /// Backend counters per training step (dispatches, submits, read-backs, uploads).
    pub per_step: [f64; 4],
    /// Peak resident memory of the process while this device ran (Linux: since a reset).
    pub peak_rss_mib: f64,
    /// Memory the backend holds for tensors and data.
    pub device_mib: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `run` over `repeats` runs after `warmup` untimed ones; each run ends when
/// its work is done, and with the statistics it requested (when it says it did) read back.
async fn time_median(
    be: &mut dyn Backend,
    warmup: usize,
    repeats: usize,
    run: &mut dyn FnMut(&mut dyn Backend) -> Result<bool>,
) -> Result<f64> {
    let mut times = Vec::with_capacity(repeats);
    for i in 0..warmup + repeats.max(1) {
        let t0 = Instant::now();
        if run(be)? {
            be.collect_stats().await?;
        }
        be.sync().await?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// Median seconds of `reps` runs of `op` (more when that is too short to time: about 20 ms of
/// work per timed run, to outweigh a submit and a wait on a GPU), and the runs it took.
async fn time_op(be: &mut dyn Backend, cfg: &BenchConfig, op: &Op, reps: usize) -> Result<(f64, usize)> {
    let t0 = Instant::now();
    for _ in 0..reps {
        be.run(op, StepAt::default())?;
    }
    be.sync().await?;
    let once = t0.elapsed().as_secs_f64() / reps as f64;
    let reps = if reps > 1 {
        ((0.02 / once.max(1e-9)) as usize).clamp(reps, 2000)
    } else {
        reps
    };
    let secs = time_median(be, cfg.warmup, cfg.repeats, &mut |be| {
        for _ in 0..reps {
            be.run(op, StepAt::default())?;
        }
        Ok(false)
    })
    .await?;
    Ok((secs, reps))
}

/// Every op of a training step (the backend's fused plan of a full batch) at its real shape,
/// `reps` times each per timed run (more when one run would be too short to time), after one
/// run of the whole step so that every tensor holds what a step gives it (the first layer's input
/// the first batch of `ds`, mostly zeros for MNIST, which the CPU path exploits). A product's
/// GFLOP/s counts a dense product's 2 M N K flops; a fused op with a product in it (a first layer
/// with its pool) counts its product's over the whole op's time.
async fn bench_ops(
    be: &mut dyn Backend,
    graph: &mut Graph,
    cfg: &BenchConfig,
    ds: DatasetId,
    opt: Optimizer,
    reps: usize,
) -> Result<Vec<MatmulFigure>> {
    let plan = graph
        .plan(be, PlanKind::Train, Batch { ds, rows: cfg.batch }, Some(opt))?
        .to_vec();
    for op in &plan {
        be.run(op, StepAt::default())?;
    }
    let mut figures = Vec::new();
    for (index, op) in plan.iter().enumerate() {
        let (secs, reps) = time_op(be, cfg, op, reps).await?;
        let product = match op {
            Op::Matmul(m) => Some(m.product()),
            Op::ConvPool(f) => Some(f.conv.product()),
            Op::PoolWeightGradient(f) => Some(f.weight.product()),
            _ => None,
        };
        let (mkn, flops) = match product {
            Some(p) => ((p.m, p.k, p.n), 2.0 * (p.m * p.n * p.k) as f64),
            None => ((0, 0, 0), 0.0),
        };
        figures.push(MatmulFigure {
            op: op.describe(),
            name: op.name(),
            layer: index + 1,
            mkn,
            millis: 1e3 * secs / reps as f64,
            gflops: flops * reps as f64 / secs / 1e9,
        });
    }
    Ok(figures)
}

/// Benchmark one device on `data` (real or synthetic training images). `reference` scales the
/// work down for the plain-loop backend.
pub async fn bench_device(
    opened: OpenedDevice,
    data: &Dataset,
    cfg: &BenchConfig,
    t_open: Instant,
) -> Result<DeviceBench> {
    let mut backend = opened.backend;
    let be = backend.as_mut();
    let device = be.name();
    let spec = cfg.spec.clone();
    let opt = cfg.optimizer;
    let mut graph = Graph::new(be, &spec, cfg.batch)?;
    graph.set_augment(cfg.augment);
    graph.set_params(be, &glorot_init(&spec, 0))?;
    let ds = be.upload_dataset(data)?;
    be.set_order(ds, &epoch_order(data.len(), 0, 0))?;
    let steps: Vec<(usize, usize)> = batches(data.len(), cfg.batch)
        .filter(|&(_, rows)| rows == cfg.batch)
        .collect();
    let n_steps = cfg.steps.min(steps.len()).max(1);
    be.reserve_stats(n_steps)?;
    let first = StepAt {
        start: steps[0].0,
        slot: 0,
        step: 0,
    };
    graph.train_step(be, Batch { ds, rows: steps[0].1 }, first, &opt)?;
    be.sync().await?;
    let startup_s = t_open.elapsed().as_secs_f64();

    let second = StepAt {
        start: steps[1 % steps.len()].0,
        slot: 0,
        step: 1,
    };
    let step_s = time_median(be, cfg.warmup, cfg.repeats, &mut |be| {
        graph
            .train_step(be, Batch { ds, rows: cfg.batch }, second, &opt)
            .map(|_| false)
    })
    .await?;
    let before = be.counters();
    let mut record_s = Vec::new();
    let run_s = time_median(be, cfg.warmup, cfg.repeats, &mut |be| {
        let t0 = Instant::now();
        for (slot, &(start, rows)) in steps[..n_steps].iter().enumerate() {
            graph.train_step(
                be,
                Batch { ds, rows },
                StepAt {
                    start,
                    slot,
                    step: slot,
                },
                &opt,
            )?;
        }
        record_s.push(t0.elapsed().as_secs_f64());
        be.request_stats(0, n_steps).map(|_| true)
    })
    .await?;
    let record_ms = 1e3 * median(record_s) / n_steps as f64;
    let after = be.counters();
    let runs = (cfg.warmup + cfg.repeats.max(1)) as f64 * n_steps as f64;
    let per = |f: fn(&Counters) -> u64| (f(&after) - f(&before)) as f64 / runs;
    let per_step = [
        per(|c| c.dispatches),
        per(|c| c.submits),
        per(|c| c.readbacks),
        per(|c| c.uploads),
    ];
    let samples_per_s = (n_steps * cfg.batch) as f64 / run_s;

    // GPU time of each dispatch of one step, where the device can tell.
    let profile = if be.start_profile(64)? {
        graph.train_step(be, Batch { ds, rows: steps[0].1 }, first, &opt)?;
        be.finish_profile().await?
    } else {
        Vec::new()
    };
    let reps = if device.contains("reference") { 1 } else { 10 };
    let matmuls = bench_ops(be, &mut graph, cfg, ds, opt, reps).await?;
    let device_mib = be.counters().allocated_bytes as f64 / (1 << 20) as f64;
    Ok(DeviceBench {
        device,
        startup_s,
        matmuls,
        profile,
        step_ms: 1e3 * step_s,
        samples_per_s,
        record_ms,
        epoch_s: 60_000.0 / samples_per_s,
        steps: n_steps,
        per_step,
        peak_rss_mib: memory::peak_rss_mib(),
        device_mib,
    })
}

/// Peak resident memory of this process.
pub mod memory {
    /// Reset the kernel's peak-RSS mark (Linux), so the next reading covers only what follows.
    pub fn reset_peak() {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    /// Peak resident memory in MiB (VmHWM on Linux; 0 where unknown).
    pub fn peak_rss_mib() -> f64 {
        let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
            return 0.0;
        };
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}
