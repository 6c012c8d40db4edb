//! `gpu-mnist train`: the reference job by default. Prints each epoch as it ends (a live progress
//! bar on a terminal, JSON lines with --json), records the run in a folder, checkpoints every epoch
//! with --checkpoint-dir and continues one with --resume, then prints the test loss and accuracy.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use gpu_mnist::backend::cpu::CpuBackend;
use gpu_mnist::backend::{Backend, Counters};
use gpu_mnist::checkpoint::{self, Checkpoint};
use gpu_mnist::data::locate::resolve_data_dir;
use gpu_mnist::data::{Dataset, Mnist};
use gpu_mnist::device::open_device;
use gpu_mnist::model::{glorot_init, HostTensor, ModelSpec};
use gpu_mnist::optim::{Optimizer, OptimizerKind};
use gpu_mnist::records::{EpochRecord, RunFolder};
use gpu_mnist::train::{EpochEnd, EpochProgress, EvalReport, TrainConfig, Trainer};
use gpu_mnist::{Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use super::{
    check_output_path, parse_batch, parse_chunk, parse_hidden, parse_lr, parse_positive, DataArgs, DeviceArgs,
    DeviceFlag, Hidden,
};

/// The checkpoint file inside a --checkpoint-dir.
const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Hidden layer widths, comma-separated (ReLU after each): 512 is the book's model
    #[arg(long, value_name = "W[,W...]", default_value = "512", value_parser = parse_hidden)]
    pub hidden: Hidden,
    /// Passes over the training set
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "5", value_parser = parse_epochs)]
    pub epochs: usize,
    /// Examples per step (the last batch of an epoch keeps the remainder)
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "128", value_parser = parse_batch)]
    pub batch_size: usize,
    /// Learning rate [default: 0.001 for rmsprop, 0.01 for sgd]
    #[arg(long, allow_negative_numbers = true, value_name = "LR", value_parser = parse_lr)]
    pub lr: Option<f32>,
    /// rmsprop (Keras's: rho 0.9, eps 1e-7) or plain sgd
    #[arg(long, value_enum, default_value = "rmsprop")]
    pub optimizer: OptimizerFlag,
    /// Seed of the initial weights and of every epoch's shuffle
    #[arg(long, allow_negative_numbers = true, default_value = "0")]
    pub seed: u64,
    /// Train on the first N training images only
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = parse_positive)]
    pub train_limit: Option<usize>,
    /// Hold out the last fraction F of the training images for validation (as Keras does)
    #[arg(long, allow_negative_numbers = true, value_name = "F", value_parser = parse_split)]
    pub validation_split: Option<f64>,
    /// Steps recorded between two read-backs of loss and accuracy
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "64", value_parser = parse_chunk)]
    pub chunk_steps: usize,
    /// Save the trained model to PATH (safetensors)
    #[arg(long, value_name = "PATH")]
    pub save: Option<PathBuf>,
    /// Save model and optimizer state to DIR/checkpoint.safetensors after every epoch
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue the run checkpointed in DIR with its settings (--epochs may extend it), data
    /// folder, test limit and device unless given; it keeps checkpointing there
    #[arg(long, value_name = "DIR", conflicts_with = "checkpoint_dir")]
    pub resume: Option<PathBuf>,
    /// Folder for config.json, metrics.csv and learning_curve.svg [default: runs/run-<UTC time>]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print one JSON object per epoch and one at the end, nothing else on stdout
    #[arg(long)]
    pub json: bool,
    /// Also print what the backend did each epoch (dispatches, submits, read-backs, uploads)
    #[arg(long, short)]
    pub verbose: bool,
    /// Print only the final test result
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum OptimizerFlag {
    Rmsprop,
    Sgd,
}

/// Epochs: 1 to 1,000,000.
fn parse_epochs(text: &str) -> std::result::Result<usize, String> {
    super::parse_up_to(text, 1_000_000)
}

/// A fraction in [0, 1).
fn parse_split(text: &str) -> std::result::Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err("must be a fraction from 0 up to (not including) 1, such as 0.1".to_string()),
    }
}

/// What defines a run, saved in config.json and in checkpoints so that --resume can continue it.
#[derive(Debug, Clone)]
struct Settings {
    hidden: Vec<usize>,
    epochs: usize,
    batch_size: usize,
    optimizer: Optimizer,
    seed: u64,
    train_limit: Option<usize>,
    validation_split: Option<f64>,
    chunk_steps: usize,
}

impl Settings {
    fn from_args(args: &TrainArgs) -> Result<Self> {
        let kind = match args.optimizer {
            OptimizerFlag::Rmsprop => OptimizerKind::RmsProp,
            OptimizerFlag::Sgd => OptimizerKind::Sgd,
        };
        Ok(Settings {
            hidden: args.hidden.0.clone(),
            epochs: args.epochs,
            batch_size: args.batch_size,
            optimizer: Optimizer::new(kind, args.lr)?,
            seed: args.seed,
            train_limit: args.train_limit,
            validation_split: args.validation_split,
            chunk_steps: args.chunk_steps,
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "model": ModelSpec::mnist(&self.hidden).describe(),
            "hidden": self.hidden,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "optimizer": match self.optimizer.kind { OptimizerKind::RmsProp => "rmsprop", OptimizerKind::Sgd => "sgd" },
            "lr": f32_json(self.optimizer.lr),
            "rho": f32_json(self.optimizer.rho),
            "eps": f32_json(self.optimizer.eps),
            "seed": self.seed,
            "train_limit": self.train_limit,
            "validation_split": self.validation_split,
            "chunk_steps": self.chunk_steps,
        })
    }

    fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |what: &str| Error::bad_file(path, format!("its training state lacks a valid {what}"));
        // Checked like the flags they stand for: a count from 1 to `max`.
        let usize_of = |k: &str, max: u64| {
            v[k].as_u64()
                .filter(|&x| (1..=max).contains(&x))
                .map(|x| x as usize)
                .ok_or_else(|| bad(k))
        };
        let hidden: Vec<usize> = v["hidden"]
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|w| w as usize)).collect())
            .ok_or_else(|| bad("hidden"))?;
        let kind = match v["optimizer"].as_str() {
            Some("rmsprop") => OptimizerKind::RmsProp,
            Some("sgd") => OptimizerKind::Sgd,
            _ => return Err(bad("optimizer")),
        };
        let lr = v["lr"].as_f64().ok_or_else(|| bad("lr"))? as f32;
        let validation_split = v["validation_split"].as_f64();
        if validation_split.is_some_and(|f| !(0.0..1.0).contains(&f)) {
            return Err(bad("validation_split"));
        }
        let settings = Settings {
            hidden,
            epochs: usize_of("epochs", u32::MAX as u64)?,
            batch_size: usize_of("batch_size", 65_536)?,
            optimizer: Optimizer::new(kind, Some(lr)).map_err(|_| bad("lr"))?,
            seed: v["seed"].as_u64().ok_or_else(|| bad("seed"))?,
            train_limit: v["train_limit"].as_u64().map(|x| x as usize),
            validation_split,
            chunk_steps: usize_of("chunk_steps", 4096)?,
        };
        ModelSpec::mnist(&settings.hidden)
            .check_size(settings.batch_size)
            .map_err(|_| bad("model size (hidden widths and batch size)"))?;
        Ok(settings)
    }
}

/// An f32 as the shortest decimal that reads back as the same f32 (0.001, not 0.0010000000474974513).
fn f32_json(x: f32) -> Value {
    x.to_string().parse::<f64>().map_or(Value::Null, |v| json!(v))
}

/// Where a resumed run stands.
struct Resumed {
    checkpoint: Checkpoint,
    epochs_done: usize,
    /// How far the next epoch had got when the run was interrupted (zero after a whole epoch).
    partial: EpochProgress,
    history: Vec<EpochRecord>,
    run_dir: Option<PathBuf>,
    settings: Settings,
    /// Where and on what the run ran; reused unless the command line says otherwise.
    place: RunPlace,
}

/// The data folder, test limit and device of a run: not part of its arithmetic (a resumed run may
/// move to another machine), but what `--resume` reuses when the command line does not give them.
#[derive(Debug, Clone, Default)]
struct RunPlace {
    data: Option<PathBuf>,
    test_limit: Option<usize>,
    device: Option<DeviceFlag>,
    adapter: Option<String>,
}

impl RunPlace {
    fn to_json(data: &Path, args: &TrainArgs) -> Value {
        json!({
            "data": std::path::absolute(data).unwrap_or_else(|_| data.to_path_buf()).display().to_string(),
            "test_limit": args.data.test_limit,
            "device": args.device.device.to_possible_value().map(|v| v.get_name().to_string()),
            "adapter": args.device.adapter,
        })
    }

    /// Whatever of it a checkpoint holds (checkpoints before it was kept hold none).
    fn from_json(v: &Value) -> RunPlace {
        RunPlace {
            data: v["data"].as_str().map(PathBuf::from),
            test_limit: v["test_limit"].as_u64().filter(|&n| n >= 1).map(|n| n as usize),
            device: v["device"].as_str().and_then(|d| DeviceFlag::from_str(d, true).ok()),
            adapter: v["adapter"].as_str().map(str::to_string),
        }
    }

    /// Fill in what the command line left out: the data folder if it still holds the four files,
    /// the test limit, and the device (with its adapter).
    fn fill(&self, args: &mut TrainArgs, given: impl Fn(&str) -> bool) {
        if args.data.data.is_none() {
            args.data.data = self.data.clone().filter(|d| gpu_mnist::data::dir_has_all_files(d));
        }
        if !given("test_limit") {
            args.data.test_limit = self.test_limit;
        }
        if let Some(device) = self.device.filter(|_| !given("device") && !given("adapter")) {
            args.device.device = device;
            args.device.adapter = self.adapter.clone();
        }
    }
}

fn load_resume(dir: &Path) -> Result<Resumed> {
    let path = dir.join(CHECKPOINT_FILE);
    if !dir.is_dir() {
        return Err(Error::usage("--resume", format!("{} is not a folder", dir.display())));
    }
    let checkpoint = checkpoint::load(&path)?;
    let state = checkpoint
        .state
        .clone()
        .ok_or_else(|| Error::bad_file(&path, "is a model file, not a training checkpoint (no training state)"))?;
    if checkpoint.velocities.is_empty() {
        return Err(Error::bad_file(&path, "holds no optimizer state"));
    }
    let settings = Settings::from_json(&state["settings"], &path)?;
    if ModelSpec::mnist(&settings.hidden) != checkpoint.spec {
        return Err(Error::bad_file(
            &path,
            "its training state and its tensors describe different models",
        ));
    }
    let epochs_done = state["epochs_done"].as_u64().map(|e| e as usize).unwrap_or(0);
    let history = state["history"]
        .as_array()
        .map(|a| a.iter().filter_map(record_from_json).collect())
        .unwrap_or_default();
    let run_dir = state["run_dir"].as_str().map(PathBuf::from);
    let p = &state["partial_epoch"];
    let partial = EpochProgress {
        steps_done: p["steps_done"].as_u64().unwrap_or(0) as usize,
        loss_sum: p["loss_sum"].as_f64().unwrap_or(0.0),
        correct: p["correct"].as_u64().unwrap_or(0),
        examples: p["examples"].as_u64().unwrap_or(0) as usize,
        seconds: p["seconds"].as_f64().unwrap_or(0.0),
        ..EpochProgress::default()
    };
    Ok(Resumed {
        checkpoint,
        epochs_done,
        partial,
        history,
        run_dir,
        settings,
        place: RunPlace::from_json(&state["place"]),
    })
}

fn record_to_json(r: &EpochRecord) -> Value {
    json!({
        "epoch": r.epoch, "loss": r.train_loss, "accuracy": r.train_accuracy,
        "val_loss": r.val_loss, "val_accuracy": r.val_accuracy, "seconds": r.seconds, "device": r.device,
    })
}

fn record_from_json(v: &Value) -> Option<EpochRecord> {
    Some(EpochRecord {
        epoch: v["epoch"].as_u64()? as usize,
        train_loss: v["loss"].as_f64()?,
        train_accuracy: v["accuracy"].as_f64()?,
        val_loss: v["val_loss"].as_f64(),
        val_accuracy: v["val_accuracy"].as_f64(),
        seconds: v["seconds"].as_f64()?,
        device: v["device"].as_str().unwrap_or("").to_string(),
    })
}

/// Split off the last `fraction` of `data` for validation.
fn split(data: &Dataset, fraction: Option<f64>) -> Result<(Dataset, Option<Dataset>)> {
    let Some(f) = fraction.filter(|&f| f > 0.0) else {
        return Ok((data.clone(), None));
    };
    let n_val = (data.len() as f64 * f).round() as usize;
    if n_val == 0 || n_val >= data.len() {
        let reason = format!(
            "{f} of {} images leaves no training or no validation images",
            data.len()
        );
        return Err(Error::usage("--validation-split", reason));
    }
    let n_train = data.len() - n_val;
    let val = Dataset::new(
        data.images[n_train * gpu_mnist::data::IMAGE_PIXELS..].to_vec(),
        data.labels[n_train..].to_vec(),
    )?;
    Ok((data.first(n_train), Some(val)))
}

fn epoch_bar(steps: usize, show: bool) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    if !show {
        bar.set_draw_target(ProgressDrawTarget::hidden());
        return bar;
    }
    bar.set_draw_target(ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn counters_delta(now: Counters, before: Counters) -> String {
    format!(
        "{} dispatches, {} submits, {} read-backs, {} uploads",
        now.dispatches - before.dispatches,
        now.submits - before.submits,
        now.readbacks - before.readbacks,
        now.uploads - before.uploads
    )
}

fn epoch_line(r: &EpochRecord, epochs: usize) -> String {
    let mut line = format!(
        "epoch {}/{}: loss {:.4}, accuracy {:.2}%",
        r.epoch,
        epochs,
        r.train_loss,
        100.0 * r.train_accuracy
    );
    if let (Some(l), Some(a)) = (r.val_loss, r.val_accuracy) {
        line.push_str(&format!(", val_loss {l:.4}, val_accuracy {:.2}%", 100.0 * a));
    }
    // Three significant digits: a GPU epoch takes a few hundredths of a second.
    let decimals = if r.seconds < 1.0 { 3 } else { 2 };
    line.push_str(&format!(", {:.*} s", decimals, r.seconds));
    line
}

/// Set by Ctrl-C: the training loop stops between chunks, checkpoints and exits with 130.
/// A second Ctrl-C exits at once (checkpoint writes are atomic, so nothing is left half-written).
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::Relaxed) {
            eprintln!("error: interrupted twice; exiting now");
            std::process::exit(130);
        }
        eprintln!("interrupt: finishing the current chunk of steps (Ctrl-C again to quit at once)");
    });
    flag
}

pub fn run(mut args: TrainArgs, matches: &ArgMatches) -> Result<()> {
    let t_start = Instant::now();
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let resumed = args.resume.as_deref().map(load_resume).transpose()?;
    if let Some(r) = &resumed {
        r.place.fill(&mut args, given);
    }
    let settings = match &resumed {
        Some(r) => {
            // A resumed run keeps its settings, except --epochs, which may extend or shorten it.
            let mut settings = r.settings.clone();
            if given("epochs") {
                settings.epochs = args.epochs;
            }
            let fixed = [
                ("hidden", "--hidden"),
                ("batch_size", "--batch-size"),
                ("lr", "--lr"),
                ("optimizer", "--optimizer"),
                ("seed", "--seed"),
                ("train_limit", "--train-limit"),
                ("validation_split", "--validation-split"),
                ("chunk_steps", "--chunk-steps"),
            ];
            let ignored: Vec<&str> = fixed
                .iter()
                .filter(|(id, _)| given(id))
                .map(|(_, flag)| *flag)
                .collect();
            if !ignored.is_empty() {
                eprintln!(
                    "warning: --resume continues with the checkpoint's settings; ignoring {}",
                    ignored.join(", ")
                );
            }
            settings
        }
        None => Settings::from_args(&args)?,
    };
    ModelSpec::mnist(&settings.hidden).check_size(settings.batch_size)?;
    if args.resume.is_none() {
        // A new run never overwrites another run's checkpoint or records.
        if let Some(dir) = args
            .checkpoint_dir
            .as_deref()
            .filter(|d| d.join(CHECKPOINT_FILE).exists())
        {
            let reason = format!(
                "{} already holds a checkpoint; continue that run with --resume {}, or choose an empty folder",
                dir.display(),
                dir.display()
            );
            return Err(Error::usage("--checkpoint-dir", reason));
        }
        if let Some(out) = args.out.as_deref().filter(|d| d.join("metrics.csv").exists()) {
            let reason = format!("{} already holds a run's records; choose another folder", out.display());
            return Err(Error::usage("--out", reason));
        }
    }
    if let Some(path) = &args.save {
        check_output_path("--save", path)?;
    }
    let checkpoint_dir = args.resume.clone().or_else(|| args.checkpoint_dir.clone());
    if let Some(dir) = checkpoint_dir.as_deref().filter(|d| d.exists() && !d.is_dir()) {
        return Err(Error::usage(
            "--checkpoint-dir",
            format!("{} exists and is not a folder", dir.display()),
        ));
    }
    let human = !args.json && !args.quiet;
    let interactive = std::io::stderr().is_terminal() && !args.quiet && !args.json;

    let (dir, _) = resolve_data_dir(args.data.data.as_deref(), args.data.offline, interactive)?;
    let mnist = Mnist::load(&dir)?;
    let (train_set, val_set) = split(
        &mnist.train.first(settings.train_limit.unwrap_or(usize::MAX)),
        settings.validation_split,
    )?;
    let test_set = mnist.test.first(args.data.test_limit.unwrap_or(usize::MAX));
    let spec = ModelSpec::mnist(&settings.hidden);
    let run_dir = args
        .out
        .clone()
        .or_else(|| resumed.as_ref().and_then(|r| r.run_dir.clone()))
        .unwrap_or_else(RunFolder::default_path);
    let opened = open_device(args.device.device.into(), args.device.adapter.as_deref())?;
    let device_name = opened.backend.name();
    let mut config = settings.to_json();
    config["data"] = json!(dir.display().to_string());
    config["device"] = json!(device_name);
    config["test_limit"] = json!(args.data.test_limit);

    if human {
        let val = val_set
            .as_ref()
            .map(|v| format!(", {} validation", v.len()))
            .unwrap_or_default();
        println!(
            "data: {} ({} training{val}, {} test images)",
            dir.display(),
            train_set.len(),
            test_set.len()
        );
        println!("{}", opened.note);
        println!(
            "model: {} ({} parameters), {}, batch {}, {} epoch{}, seed {}",
            spec.describe(),
            spec.param_count(),
            settings.optimizer.describe(),
            settings.batch_size,
            settings.epochs,
            if settings.epochs == 1 { "" } else { "s" },
            settings.seed
        );
        println!("run folder: {}", run_dir.display());
    }
    let cfg = TrainConfig {
        spec: spec.clone(),
        epochs: settings.epochs,
        batch_size: settings.batch_size,
        optimizer: settings.optimizer,
        seed: settings.seed,
        chunk_steps: settings.chunk_steps,
    };
    let mut at = match resumed {
        Some(r) => {
            if human {
                let within = match r.partial.steps_done {
                    0 => String::new(),
                    k => format!(" and step {k} of epoch {}", r.epochs_done + 1),
                };
                let from = args.resume.as_deref().unwrap_or(Path::new(".")).display();
                println!(
                    "resuming after epoch {} of {}{within} from {from}",
                    r.epochs_done, settings.epochs
                );
            }
            let ck = r.checkpoint;
            Position {
                epoch: r.epochs_done,
                partial: r.partial,
                history: r.history,
                params: ck.params,
                velocities: Some(ck.velocities),
            }
        }
        None => Position {
            epoch: 0,
            partial: EpochProgress::default(),
            history: Vec::new(),
            params: glorot_init(&spec, settings.seed),
            velocities: None,
        },
    };
    let run = Run {
        args: &args,
        settings: &settings,
        spec: &spec,
        cfg,
        run_dir: &run_dir,
        checkpoint_dir: checkpoint_dir.as_deref(),
        data_dir: &dir,
        config: &config,
        human,
        interactive,
        t_start,
        stop: interrupt_flag(),
        data: RunData {
            train: &train_set,
            val: val_set.as_ref(),
            test: &test_set,
        },
    };
    let mut backend = opened.backend;
    // Under --device auto, a GPU that fails (lost, out of memory) hands over to the CPU path,
    // which continues from the end of the last completed epoch.
    let mut fall_back = args.device.device == DeviceFlag::Auto && opened.is_gpu;
    let mut folder = None;
    loop {
        match run.train_on(backend.as_mut(), &mut at, &mut folder, fall_back) {
            Err(Error::Gpu(msg)) if fall_back => {
                eprintln!(
                    "warning: GPU: {msg}; --device auto continues on the CPU from the end of epoch {}{}",
                    at.epoch,
                    match at.partial.steps_done {
                        0 => String::new(),
                        k => format!(" and step {k} of epoch {}", at.epoch + 1),
                    }
                );
                // `at` holds the weights, velocities and position (whole epochs and any resumed
                // part of the next) of the same moment, so the CPU continues exactly from there.
                backend = Box::new(CpuBackend::fast());
                fall_back = false;
            }
            other => return other,
        }
    }
}

/// Where a run stands: whole epochs done, progress into the next, and the state to continue from.
struct Position {
    /// Epochs completed.
    epoch: usize,
    partial: EpochProgress,
    history: Vec<EpochRecord>,
    /// Parameters and optimizer velocities as of `epoch` (None: fresh velocities).
    params: Vec<HostTensor>,
    velocities: Option<Vec<HostTensor>>,
}

struct RunData<'a> {
    train: &'a Dataset,
    val: Option<&'a Dataset>,
    test: &'a Dataset,
}

/// Everything fixed about a training run.
struct Run<'a> {
    args: &'a TrainArgs,
    settings: &'a Settings,
    spec: &'a ModelSpec,
    cfg: TrainConfig,
    run_dir: &'a Path,
    checkpoint_dir: Option<&'a Path>,
    /// The MNIST folder in use.
    data_dir: &'a Path,
    config: &'a Value,
    human: bool,
    interactive: bool,
    t_start: Instant,
    stop: Arc<AtomicBool>,
    data: RunData<'a>,
}

impl Run<'_> {
    /// --verbose diagnostics go with the human output, or to stderr when stdout carries JSON.
    fn diag(&self, line: String) {
        if self.args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    /// Save model, optimizer and progress (whole epochs, and how far into the next one).
    fn save_checkpoint(
        &self,
        params: Vec<HostTensor>,
        velocities: Vec<HostTensor>,
        epochs_done: usize,
        partial: EpochProgress,
        history: &[EpochRecord],
    ) -> Result<()> {
        let Some(dir) = self.checkpoint_dir else { return Ok(()) };
        let state = json!({
            "epochs_done": epochs_done,
            "partial_epoch": {
                "steps_done": partial.steps_done, "loss_sum": partial.loss_sum, "correct": partial.correct,
                "examples": partial.examples, "seconds": partial.seconds,
            },
            "settings": self.settings.to_json(),
            "place": RunPlace::to_json(self.data_dir, self.args),
            "history": history.iter().map(record_to_json).collect::<Vec<_>>(),
            // Absolute, so that a resume from another working folder writes to the same place.
            "run_dir": std::path::absolute(self.run_dir).unwrap_or_else(|_| self.run_dir.to_path_buf()).display().to_string(),
        });
        let ck = Checkpoint {
            spec: self.spec.clone(),
            params,
            velocities,
            state: Some(state),
        };
        checkpoint::save(&dir.join(CHECKPOINT_FILE), &ck)
    }

    /// Train on `be` from `at` to the end, then test and save. With `keep_host`, `at` follows every
    /// completed epoch (one read-back of the weights an epoch) so that another backend can take over.
    fn train_on(
        &self,
        be: &mut dyn Backend,
        at: &mut Position,
        folder: &mut Option<RunFolder>,
        keep_host: bool,
    ) -> Result<()> {
        let (args, settings) = (self.args, self.settings);
        let device_name = be.name();
        let mut trainer = Trainer::with_params(
            be,
            self.data.train,
            self.cfg.clone(),
            &at.params,
            at.velocities.as_deref(),
        )?;
        let val_id = self.data.val.map(|v| trainer.upload_eval_set(v)).transpose()?;
        let test_id = trainer.upload_eval_set(self.data.test)?;
        if folder.is_none() {
            // Only now, with the model and data on the device, does the run write anything.
            if let Some(dir) = self.checkpoint_dir {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::bad_file(dir, format!("could not create the checkpoint folder ({e})")))?;
            }
            let f = RunFolder::create(self.run_dir)?;
            f.write_config(self.config)?;
            *folder = Some(f);
        }
        let steps = self.data.train.len().div_ceil(settings.batch_size);
        let should_stop = || self.stop.load(Ordering::Relaxed);
        let first_epoch = at.epoch;
        for epoch in first_epoch..settings.epochs {
            let partial = at.partial;
            let bar = epoch_bar(steps, self.interactive);
            bar.set_prefix(format!("epoch {}/{}", epoch + 1, settings.epochs));
            let before = trainer.be.counters();
            let t_epoch = Instant::now();
            let end = trainer.run_epoch(epoch, partial, &should_stop, &mut |p| {
                if args.verbose && epoch == first_epoch && p.steps_done <= partial.steps_done + settings.chunk_steps {
                    self.diag(format!(
                        "first chunk of steps done {:.2} s after start",
                        self.t_start.elapsed().as_secs_f64()
                    ));
                }
                let rate = (p.examples_done - partial.examples) as f64 / t_epoch.elapsed().as_secs_f64().max(1e-9);
                bar.set_position(p.steps_done as u64);
                bar.set_message(format!(
                    "loss {:.4} accuracy {:.2}% {:.0} samples/s",
                    p.loss,
                    100.0 * p.accuracy,
                    rate
                ));
            });
            bar.finish_and_clear();
            let end = end.map_err(|e| match (e, self.checkpoint_dir) {
                (Error::Numerical(msg), Some(dir)) if dir.join(CHECKPOINT_FILE).exists() => {
                    Error::Numerical(format!("{msg}; the last good checkpoint is kept in {}", dir.display()))
                }
                (e, _) => e,
            });
            let report = match end? {
                EpochEnd::Finished(report) => report,
                EpochEnd::Interrupted(stopped) => {
                    if self.checkpoint_dir.is_some() {
                        let (p, v) = (trainer.params()?, trainer.velocities()?);
                        self.save_checkpoint(p, v, epoch, stopped, &at.history)?;
                    }
                    let place = format!("epoch {}, step {} of {steps}", epoch + 1, stopped.steps_done);
                    let message = match self.checkpoint_dir {
                        Some(dir) => format!(
                            "interrupted at {place}; checkpoint saved in {dir}; continue with: gpu-mnist train --resume {dir}",
                            dir = dir.display()
                        ),
                        None => format!("interrupted at {place}; nothing saved (use --checkpoint-dir DIR to be able to resume)"),
                    };
                    return Err(Error::Interrupted(message));
                }
            };
            let val: Option<EvalReport> = val_id.map(|id| trainer.evaluate(id)).transpose()?;
            // Everything that can fail on the device happens before the epoch is recorded, so that
            // a GPU that fails here leaves `at` at the previous epoch, whole and consistent.
            let host_state = if keep_host || self.checkpoint_dir.is_some() {
                Some((trainer.params()?, trainer.velocities()?))
            } else {
                None
            };
            let record = EpochRecord {
                epoch: report.epoch,
                train_loss: report.loss,
                train_accuracy: report.accuracy,
                val_loss: val.as_ref().map(|v| v.loss),
                val_accuracy: val.as_ref().map(|v| v.accuracy),
                seconds: report.seconds,
                device: device_name.clone(),
            };
            if args.json {
                println!("{}", record_to_json(&record));
            } else if !args.quiet {
                println!("{}", epoch_line(&record, settings.epochs));
            }
            if args.verbose {
                self.diag(format!("  backend: {}", counters_delta(trainer.be.counters(), before)));
            }
            at.history.push(record);
            at.partial = EpochProgress::default();
            at.epoch = epoch + 1;
            if let Some(f) = folder.as_ref() {
                f.write_epochs(&at.history)?;
            }
            if let Some((params, velocities)) = host_state {
                if self.checkpoint_dir.is_some() {
                    self.save_checkpoint(params.clone(), velocities.clone(), at.epoch, at.partial, &at.history)?;
                }
                if keep_host {
                    at.params = params;
                    at.velocities = Some(velocities);
                }
            }
        }
        let test = trainer.evaluate(test_id)?;
        if args.json {
            let run_dir = self.run_dir.display().to_string();
            println!(
                "{}",
                json!({"test_loss": test.loss, "test_accuracy": test.accuracy, "examples": test.examples, "run_dir": run_dir})
            );
        } else {
            println!(
                "test: loss {:.4}, accuracy {:.2}% ({} images)",
                test.loss,
                100.0 * test.accuracy,
                test.examples
            );
        }
        if let Some(path) = &args.save {
            checkpoint::save(path, &Checkpoint::model(self.spec, trainer.params()?))?;
            if self.human {
                println!("saved {}", path.display());
            }
        }
        Ok(())
    }
}
