//! `gpu-mnist bench`: per device, matmul GFLOP/s at the model's shapes, one step's time, throughput,
//! start-up time, memory and GPU round trips per step; optionally against a baseline command run in
//! the same invocation (e.g. the PyTorch script), reported as a ratio.

use std::path::{Path, PathBuf};
use std::process::Command;
use web_time::Instant;

use clap::{Args, ValueEnum};
use gpu_mnist::backend::wgpu::list_adapters;
use gpu_mnist::bench::{bench_device, memory, BenchConfig, DeviceBench};
use gpu_mnist::data::locate::{cache_dir, check_identity};
use gpu_mnist::data::{dir_has_all_files, Dataset, DatasetKind, Mnist, IMAGE_PIXELS};
use gpu_mnist::device::{open_device, DeviceChoice};
use gpu_mnist::optim::{Optimizer, OptimizerKind};
use gpu_mnist::{Error, Result};
use serde_json::{json, Value};

use super::{parse_batch, parse_positive, DatasetFlag, ModelArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Devices to measure (repeatable): all = reference, cpu and every GPU adapter
    #[arg(long, value_enum, default_value = "all")]
    pub device: Vec<BenchDevice>,
    /// The dataset whose training images are timed (all three have MNIST's shapes)
    #[arg(long, value_enum, default_value = "mnist")]
    pub dataset: DatasetFlag,
    /// The dataset's folder [default: $GPU_MNIST_DATA (or $GPU_MNIST_FASHION_DATA,
    /// $GPU_MNIST_KMNIST_DATA), then the cache; synthetic data when none has it]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Examples per step [default: 128 for an mlp, 64 for a convnet]
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = parse_batch)]
    pub batch_size: Option<usize>,
    /// Steps per timed throughput run (the reference backend runs 2, software adapters a fifth)
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "100", value_parser = parse_positive)]
    pub steps: usize,
    /// Timed runs per figure (the median is reported)
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "5", value_parser = parse_positive)]
    pub repeats: usize,
    /// A command that runs a baseline and prints `RESULT {json}` with `median_epoch_s` (or
    /// `train_seconds` over `epochs`), e.g. "python3 ../shared/bench/torch_mnist.py --device
    /// cpu" or, for --model fast, "python3 ../shared/bench/torch_fast99.py --data DIR"; run
    /// once, compared by ratio
    #[arg(long, value_name = "CMD")]
    pub baseline: Option<String>,
    /// Print one JSON object instead of the table
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchDevice {
    All,
    Reference,
    Cpu,
    Gpu,
}

/// The real dataset when it is found without downloading, else synthetic images of MNIST's shape
/// and sparsity.
fn bench_data(flag: Option<&Path>, kind: DatasetKind) -> Result<(Dataset, String)> {
    let env = std::env::var_os(kind.data_env())
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let dir = flag
        .map(Path::to_path_buf)
        .or(env)
        .or_else(|| cache_dir(kind).filter(|d| dir_has_all_files(d)));
    if let Some(dir) = dir {
        check_identity(kind, &dir)?;
        let m = Mnist::load(&dir)?;
        return Ok((m.train, format!("real {kind} from {}", dir.display())));
    }
    // As sparse as MNIST's images (about 19 % of the pixels lit), which the CPU path exploits.
    let n = 60_000;
    let images = (0..n * IMAGE_PIXELS)
        .map(|i| {
            let h = i.wrapping_mul(2_654_435_761) >> 7;
            if h % 100 < 19 {
                (1 + (h >> 8) % 255) as u8
            } else {
                0
            }
        })
        .collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Ok((
        Dataset::new(images, labels)?,
        format!("synthetic data (no {kind} found; pass --data DIR for real images)"),
    ))
}

/// What to open, with its display label and the step count scale.
fn plan(devices: &[BenchDevice]) -> Vec<(DeviceChoice, Option<String>, &'static str)> {
    let mut out = Vec::new();
    let all = devices.contains(&BenchDevice::All);
    if all || devices.contains(&BenchDevice::Reference) {
        out.push((DeviceChoice::Reference, None, "reference"));
    }
    if all || devices.contains(&BenchDevice::Cpu) {
        out.push((DeviceChoice::Cpu, None, "cpu"));
    }
    if all {
        for a in list_adapters() {
            out.push((
                DeviceChoice::Gpu,
                Some(a.name.clone()),
                if a.is_hardware() { "gpu" } else { "software gpu" },
            ));
        }
    } else if devices.contains(&BenchDevice::Gpu) {
        out.push((DeviceChoice::Gpu, None, "gpu"));
    }
    out
}

fn run_baseline(cmd: &str) -> Result<Value> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| Error::usage("--baseline", format!("could not run '{cmd}': {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).ok_or_else(|| {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("no output");
        Error::Command(format!("--baseline '{cmd}' printed no RESULT line ({last})"))
    })?;
    serde_json::from_str(line)
        .map_err(|e| Error::Command(format!("--baseline '{cmd}': its RESULT line is not JSON ({e})")))
}

fn to_json(b: &DeviceBench) -> Value {
    json!({
        "device": b.device,
        "startup_s": b.startup_s,
        "matmuls": b.matmuls.iter().map(|m| json!({"op": m.op, "layer": m.layer, "mkn": [m.mkn.0, m.mkn.1, m.mkn.2], "ms": m.millis, "gflops": m.gflops})).collect::<Vec<_>>(),
        "profile_us": b.profile.iter().map(|(k, us)| json!({"kernel": k, "us": us})).collect::<Vec<_>>(),
        "step_ms": b.step_ms,
        "samples_per_s": b.samples_per_s,
        "record_ms_per_step": b.record_ms,
        "epoch_s": b.epoch_s,
        "steps": b.steps,
        "per_step": {"dispatches": b.per_step[0], "submits": b.per_step[1], "readbacks": b.per_step[2], "uploads": b.per_step[3]},
        "peak_rss_mib": b.peak_rss_mib,
        "device_mib": b.device_mib,
    })
}

/// GFLOP/s of the first product whose name starts with `name` (the first layer's forward).
fn first_gflops(b: &DeviceBench, name: &str) -> f64 {
    b.matmuls
        .iter()
        .find(|m| m.name.starts_with(name))
        .map_or(0.0, |m| m.gflops)
}

/// GFLOP/s of the last product whose name starts with `name` (the first layer's weight gradient).
fn last_gflops(b: &DeviceBench, name: &str) -> f64 {
    b.matmuls
        .iter()
        .rev()
        .find(|m| m.name.starts_with(name))
        .map_or(0.0, |m| m.gflops)
}

fn print_table(results: &[DeviceBench], baseline: Option<&Value>) {
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8} {:>8} {:>16}",
        "device",
        "fwd GF/s",
        "dW GF/s",
        "mm ms",
        "step ms",
        "issue ms",
        "samples/s",
        "epoch s",
        "start s",
        "RSS MiB",
        "disp/sub/rb step"
    );
    for b in results {
        let name: String = b.device.chars().take(44).collect();
        println!(
            "{:<44} {:>9.1} {:>9.1} {:>9.3} {:>9.3} {:>9.3} {:>10.0} {:>9.3} {:>8.2} {:>8.0} {:>16}",
            name,
            first_gflops(b, "matmul forward"),
            last_gflops(b, "matmul backward weight"),
            b.matmuls.iter().map(|m| m.millis).sum::<f64>(),
            b.step_ms,
            b.record_ms,
            b.samples_per_s,
            b.epoch_s,
            b.startup_s,
            b.peak_rss_mib,
            format!("{:.0}/{:.3}/{:.3}", b.per_step[0], b.per_step[1], b.per_step[2])
        );
    }
    println!(
        "(GF/s: a dense product's 2 M N K flops over the time, at the first layer's shapes; the CPU \
         path skips the zero pixels of MNIST's input, so its figure can pass the machine's peak)"
    );
    for b in results.iter().filter(|b| !b.profile.is_empty()) {
        let total: f64 = b.profile.iter().map(|(_, us)| us).sum();
        let parts: Vec<String> = b.profile.iter().map(|(k, us)| format!("{k} {us:.1}")).collect();
        println!(
            "{}: device time per dispatch of one step, us: {}; sum {total:.1} us",
            b.device,
            parts.join(", ")
        );
    }
    if let Some(base) = baseline {
        // The dense and convnet scripts print a median epoch; torch_fast99.py its whole training
        // (model build and its epochs), `train_seconds`.
        let per_epoch = base["train_seconds"]
            .as_f64()
            .map(|s| s / base["epochs"].as_f64().unwrap_or(1.0));
        let base_epoch = base["median_epoch_s"].as_f64().or(per_epoch).unwrap_or(f64::NAN);
        let label = format!(
            "{} on {}",
            base["framework"].as_str().unwrap_or("baseline"),
            base["device"].as_str().unwrap_or("?")
        );
        let rss = match &base["peak_rss_mib"] {
            Value::Null => String::new(),
            mib => format!(", peak RSS {mib} MiB"),
        };
        println!("baseline {label}: median epoch {base_epoch:.3} s{rss}");
        for b in results {
            println!(
                "  {:<44} epoch time {:.2}x the baseline's",
                b.device.chars().take(44).collect::<String>(),
                b.epoch_s / base_epoch
            );
        }
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let (data, source) = bench_data(args.data.as_deref(), args.dataset.into())?;
    let spec = args.model.spec()?;
    let recipe = args.model.recipe()?;
    let batch = args
        .batch_size
        .unwrap_or_else(|| super::default_batch(&spec, recipe.as_ref()));
    // The recipe's optimizer, its schedule over the recipe's epochs of these images, else RMSprop.
    let optimizer = match &recipe {
        Some(r) => r.optimizer_over(data.len().div_ceil(batch.max(1)) * r.epochs)?,
        None => Optimizer::new(OptimizerKind::RmsProp, None)?,
    };
    if batch > data.len() {
        let reason = format!("{batch} is larger than the {} training images", data.len());
        return Err(Error::usage("--batch-size", reason));
    }
    spec.check_size(batch)?;
    if !args.json {
        println!(
            "data: {source}; batch {batch}, model {}, {}",
            spec.describe(),
            optimizer.describe()
        );
    }
    let mut results = Vec::new();
    for (choice, adapter, kind) in plan(&args.device) {
        let steps = match kind {
            "reference" => 2,
            "software gpu" => (args.steps / 5).max(2),
            _ => args.steps,
        };
        let repeats = if kind == "reference" { 1 } else { args.repeats };
        let cfg = BenchConfig {
            spec: spec.clone(),
            optimizer,
            augment: recipe
                .as_ref()
                .and_then(|r| r.augment)
                .map(|a| gpu_mnist::backend::ops::Augment {
                    key: gpu_mnist::backend::ops::augment::key_of(0),
                    ..a
                }),
            batch,
            steps,
            repeats,
            warmup: 1,
        };
        memory::reset_peak();
        let t_open = Instant::now();
        let opened = open_device(choice, adapter.as_deref())?;
        let result = pollster::block_on(bench_device(opened, &data, &cfg, t_open))?;
        if !args.json {
            eprintln!("measured {}", result.device);
        }
        results.push(result);
    }
    let baseline = args.baseline.as_deref().map(run_baseline).transpose()?;
    if args.json {
        let out = json!({
            "data": source,
            "batch": batch,
            "model": spec.describe(),
            "devices": results.iter().map(to_json).collect::<Vec<_>>(),
            "baseline": baseline,
            "settings": gpu_mnist::settings::settings().to_json(),
        });
        println!("{out}");
    } else {
        print_table(&results, baseline.as_ref());
    }
    Ok(())
}
