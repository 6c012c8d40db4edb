//! `gpu-mnist train`: the reference job by default. Prints each epoch as it ends (a live progress
//! bar on a terminal, JSON lines with --json), records the run in a folder, checkpoints every epoch
//! with --checkpoint-dir and continues one with --resume, then prints the test loss and accuracy.

mod report;
mod resume;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use gpu_mnist::backend::cpu::CpuBackend;
use gpu_mnist::backend::ops::Augment;
use gpu_mnist::backend::Backend;
use gpu_mnist::checkpoint::{self, Checkpoint};
use gpu_mnist::data::{Dataset, DatasetKind, Mnist};
use gpu_mnist::device::open_device;
use gpu_mnist::model::{glorot_init, HostTensor, ModelSpec};
use gpu_mnist::optim::OptimizerKind;
use gpu_mnist::records::RunFolder;
use gpu_mnist::schedule::Schedule;
use gpu_mnist::train::early_stop::Monitor;
use gpu_mnist::train::{fit, BestEpoch, EpochProgress, EvalReport, FitData, Position, TrainConfig};
use gpu_mnist::{Error, Result};
use serde_json::json;
use web_time::Instant;

use report::{interrupt_flag, Reporter};
use resume::{load_resume, Resumed, RunPlace, RunSettings};

use super::{
    check_output_path, parse_batch, parse_chunk, parse_lr, parse_positive, DataArgs, DeviceArgs, DeviceFlag, ModelArgs,
};

/// The checkpoint file inside a --checkpoint-dir.
pub(super) const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Passes over the training set [default: 5; 1 for --model fast, 10 for --model accurate]
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = parse_epochs)]
    pub epochs: Option<usize>,
    /// Examples per step (the last batch of an epoch keeps the remainder) [default: 128 for an
    /// mlp, 64 for a convnet, as in the book; 128 for --model fast and accurate]
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = parse_batch)]
    pub batch_size: Option<usize>,
    /// Learning rate: the base of --schedule (one-cycle's peak) [default: 0.001 for rmsprop,
    /// adam and adamw, 0.01 for sgd and --model fast and accurate]
    #[arg(long, allow_negative_numbers = true, value_name = "LR", value_parser = parse_lr)]
    pub lr: Option<f32>,
    /// rmsprop (Keras's: rho 0.9, eps 1e-7 inside the square root), sgd (PyTorch's, with
    /// --momentum and --nesterov), adam or adamw (PyTorch's: betas 0.9 0.999, eps 1e-8 outside
    /// the square root, bias-corrected; adamw with decoupled --weight-decay 0.01) [default:
    /// rmsprop; adam for --model fast and accurate]
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerFlag>,
    /// Adam's decay of the gradient's mean [default: 0.9; 0.7 for --model fast and accurate]
    #[arg(long, allow_negative_numbers = true, value_name = "B", value_parser = parse_unit)]
    pub beta1: Option<f32>,
    /// Adam's decay of the gradient's mean square [default: 0.999; 0.9 for --model fast and accurate]
    #[arg(long, allow_negative_numbers = true, value_name = "B", value_parser = parse_unit)]
    pub beta2: Option<f32>,
    /// Epsilon of rmsprop (inside the square root) or adam (outside) [default: 1e-7, adam 1e-8]
    #[arg(long, allow_negative_numbers = true, value_name = "EPS", value_parser = parse_lr)]
    pub eps: Option<f32>,
    /// SGD's momentum (PyTorch's: m = mu m + g, p -= lr m) [default: 0]
    #[arg(long, allow_negative_numbers = true, value_name = "MU", value_parser = parse_unit)]
    pub momentum: Option<f32>,
    /// Nesterov momentum for sgd (p -= lr (g + mu m)); needs --momentum
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay: decoupled for adamw (p -= lr wd p), L2 (wd p added to the gradient) for
    /// the others [default: 0.01 for adamw, else 0]
    #[arg(long, allow_negative_numbers = true, value_name = "WD", value_parser = parse_decay)]
    pub weight_decay: Option<f32>,
    /// The learning rate of each step, from --lr: constant, step[:every=N,gamma=G],
    /// exponential[:gamma=G], cosine[:warmup=N,floor=F] (linear warm-up, then cosine to
    /// floor x lr) or one-cycle[:pct_start=P,div_factor=D,final_div_factor=F] (PyTorch's
    /// OneCycleLR); steps count over the whole run [default: constant; one-cycle for --model fast and accurate]
    #[arg(long, value_name = "NAME[:K=V,...]", value_parser = parse_schedule)]
    pub schedule: Option<String>,
    /// Move every training image by its own random shift, rotation and scale as the batch is
    /// gathered on the device (bilinear; never the validation or test images):
    /// shift:PIXELS,rotate:DEGREES,scale:FRACTION, any of them, e.g. shift:2,rotate:10,scale:0.1, or
    /// none [default: none; shift:2,rotate:10,scale:0.1 for --model accurate]
    #[arg(long, value_name = "SPEC", value_parser = parse_augment)]
    pub augment: Option<AugmentArg>,
    /// Seed of the initial weights, of every epoch's shuffle, and of dropout and --augment
    #[arg(long, allow_negative_numbers = true, default_value = "0")]
    pub seed: u64,
    /// Train on the first N training images only
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = parse_positive)]
    pub train_limit: Option<usize>,
    /// Hold out the last fraction F of the training images for validation (as Keras does)
    #[arg(long, allow_negative_numbers = true, value_name = "F", value_parser = parse_split)]
    pub validation_split: Option<f64>,
    /// Stop once the validation figure (--monitor) has not improved for N epochs in a row, and end
    /// with the best epoch's weights, as Keras's EarlyStopping(restore_best_weights=True) (which
    /// restores them only when it stops early); needs --validation-split
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = parse_positive,
)]
    pub early_stop: Option<usize>,
    /// What --early-stop watches [default: val-loss]
    #[arg(long, value_enum, requires = "early_stop")]
    pub monitor: Option<MonitorFlag>,
    /// Steps recorded between two read-backs of loss and accuracy
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "64", value_parser = parse_chunk)]
    pub chunk_steps: usize,
    /// Save the trained model to PATH (safetensors)
    #[arg(long, value_name = "PATH")]
    pub save: Option<PathBuf>,
    /// Save model and optimizer state (and --early-stop's best epoch) to DIR/checkpoint.safetensors
    /// after every epoch
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
    /// Also print the step's plan (one line a dispatch) and what the backend did each epoch
    /// (dispatches, submits, read-backs, uploads)
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
    Adam,
    Adamw,
}

impl From<OptimizerFlag> for OptimizerKind {
    fn from(flag: OptimizerFlag) -> OptimizerKind {
        match flag {
            OptimizerFlag::Rmsprop => OptimizerKind::RmsProp,
            OptimizerFlag::Sgd => OptimizerKind::Sgd,
            OptimizerFlag::Adam => OptimizerKind::Adam,
            OptimizerFlag::Adamw => OptimizerKind::AdamW,
        }
    }
}

/// `--monitor`.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum MonitorFlag {
    ValLoss,
    ValAccuracy,
}

impl From<MonitorFlag> for Monitor {
    fn from(flag: MonitorFlag) -> Monitor {
        match flag {
            MonitorFlag::ValLoss => Monitor::ValLoss,
            MonitorFlag::ValAccuracy => Monitor::ValAccuracy,
        }
    }
}

/// A decay or momentum: from 0 up to (not including) 1.
fn parse_unit(text: &str) -> std::result::Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err("must be a number from 0 up to (not including) 1, such as 0.9".to_string()),
    }
}

/// A weight decay: finite, 0 or more.
fn parse_decay(text: &str) -> std::result::Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("must be a number of 0 or more, such as 0.01".to_string()),
    }
}

/// `--augment`: an augmentation, or `none` (to train a preset without its own).
#[derive(Debug, Clone, Copy)]
pub struct AugmentArg(pub Option<Augment>);

/// `--augment`'s words, or `none`.
fn parse_augment(text: &str) -> std::result::Result<AugmentArg, String> {
    match text.trim() {
        "none" => Ok(AugmentArg(None)),
        words => Augment::parse(words).map(|a| AugmentArg(Some(a))),
    }
}

/// A schedule's words, checked now (its steps are counted once the data is known).
fn parse_schedule(text: &str) -> std::result::Result<String, String> {
    Schedule::parse(text, 1).map(|_| text.trim().to_string())
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

pub fn run(mut args: TrainArgs, matches: &ArgMatches) -> Result<()> {
    let t_start = Instant::now();
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let resumed = args.resume.as_deref().map(load_resume).transpose()?;
    if let Some(r) = &resumed {
        r.place.fill(&mut args, given);
    }
    let mut settings = merged_settings(&args, resumed.as_ref(), given)?;
    settings.spec.check_size(settings.batch_size)?;
    check_outputs(&args)?;
    let checkpoint_dir = args.resume.clone().or_else(|| args.checkpoint_dir.clone());
    let human = !args.json && !args.quiet;
    let interactive = std::io::stderr().is_terminal() && !args.quiet && !args.json;

    let dir = args.data.folder(settings.dataset, interactive)?;
    let mnist = Mnist::load(&dir)?;
    let (train_set, val_set) = split(
        &mnist.train.first(settings.train_limit.unwrap_or(usize::MAX)),
        settings.validation_split,
    )?;
    let test_set = mnist.test.first(args.data.test_limit.unwrap_or(usize::MAX));
    settings.resolve_schedule(train_set.len())?;
    let spec = settings.spec.clone();
    let run_dir = args
        .out
        .clone()
        .or_else(|| resumed.as_ref().and_then(|r| r.run_dir.clone()))
        .unwrap_or_else(RunFolder::default_path);
    let opened = open_device(args.device.device.into(), args.device.adapter.as_deref())?;
    let mut config = settings.to_json();
    config["data"] = json!(dir.display().to_string());
    config["device"] = json!(opened.backend.name());
    config["test_limit"] = json!(args.data.test_limit);
    let data = FitData {
        train: &train_set,
        val: val_set.as_ref(),
        test: &test_set,
    };
    if human {
        print_header(&data, &dir, &opened.note, &settings, &run_dir);
    }
    let mut at = start_position(resumed, &spec, &settings, human, args.resume.as_deref());
    let cfg = TrainConfig {
        spec: spec.clone(),
        epochs: settings.epochs,
        batch_size: settings.batch_size,
        optimizer: settings.optimizer,
        seed: settings.seed,
        chunk_steps: settings.chunk_steps,
        early_stop: settings.early_stop,
        augment: settings.augment,
    };
    let place = RunPlace::of(&dir, &args);
    let mut reporter = Reporter {
        settings: &settings,
        place: &place,
        spec: &spec,
        run_dir: &run_dir,
        checkpoint_dir: checkpoint_dir.as_deref(),
        config: &config,
        json: args.json,
        quiet: args.quiet,
        verbose: args.verbose,
        interactive,
        t_start,
        stop: interrupt_flag(),
        folder: None,
        bar: None,
        epoch_t0: Instant::now(),
        epoch: None,
        first_chunk_told: false,
        locks: Vec::new(),
    };
    // Under --device auto, a GPU that fails (lost, out of memory) hands over to the CPU path,
    // which continues from the end of the last completed epoch.
    let fall_back = args.device.device == DeviceFlag::Auto && opened.is_gpu;
    match fit_with_hand_over(opened.backend, fall_back, data, &cfg, &mut at, &mut reporter) {
        Err(Error::Numerical(msg)) => Err(with_kept_checkpoint(msg, checkpoint_dir.as_deref())),
        Err(e) => Err(e),
        Ok((test, params)) => finish(&args, &settings, &run_dir, (test, params), at.best.as_ref()),
    }
}

/// `fit` on `backend`, and with `fall_back`, when the GPU fails, on the CPU path from where the
/// GPU's last completed epoch left `at`.
fn fit_with_hand_over(
    mut backend: Box<dyn Backend>,
    mut fall_back: bool,
    data: FitData,
    cfg: &TrainConfig,
    at: &mut Position,
    reporter: &mut Reporter,
) -> Result<(EvalReport, Vec<HostTensor>)> {
    loop {
        match pollster::block_on(fit(backend.as_mut(), data, cfg, at, fall_back, reporter)) {
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
                backend = Box::new(CpuBackend::fast(&gpu_mnist::settings::settings().cpu));
                fall_back = false;
            }
            other => return other,
        }
    }
}

/// The settings of the run: a resumed run keeps its checkpoint's, except --epochs, which may
/// extend or shorten it (other training flags are ignored, with a warning).
fn merged_settings(args: &TrainArgs, resumed: Option<&Resumed>, given: impl Fn(&str) -> bool) -> Result<RunSettings> {
    let settings = match resumed {
        Some(r) => {
            // A resumed run keeps its settings, except --epochs, which may extend or shorten it.
            let mut settings = r.settings.clone();
            if let Some(epochs) = args.epochs {
                settings.epochs = epochs;
            }
            // Another dataset would make the checkpoint's classes mean other things.
            if let Some(asked) = args
                .data
                .dataset
                .map(DatasetKind::from)
                .filter(|&d| d != settings.dataset)
            {
                return Err(Error::usage(
                    "--dataset",
                    format!(
                        "the checkpoint trained on {}, not {asked}; leave out --dataset to continue it",
                        settings.dataset
                    ),
                ));
            }
            let fixed = [
                ("hidden", "--hidden"),
                ("model", "--model"),
                ("layers", "--layers"),
                ("batch_size", "--batch-size"),
                ("lr", "--lr"),
                ("optimizer", "--optimizer"),
                ("beta1", "--beta1"),
                ("beta2", "--beta2"),
                ("eps", "--eps"),
                ("momentum", "--momentum"),
                ("nesterov", "--nesterov"),
                ("weight_decay", "--weight-decay"),
                ("schedule", "--schedule"),
                ("seed", "--seed"),
                ("train_limit", "--train-limit"),
                ("validation_split", "--validation-split"),
                ("chunk_steps", "--chunk-steps"),
                ("augment", "--augment"),
                ("early_stop", "--early-stop"),
                ("monitor", "--monitor"),
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
        None => RunSettings::from_args(args)?,
    };
    Ok(settings)
}

/// Refuse, before anything runs, outputs that would overwrite another run or can not be written.
fn check_outputs(args: &TrainArgs) -> Result<()> {
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
    // The files a run writes into its folders: each a regular file or nothing yet.
    let mut written: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(out) = args.out.as_deref() {
        let files = ["config.json", "metrics.csv", "learning_curve.svg", "result.json"];
        written.extend(files.map(|f| ("--out", out.join(f))));
    }
    if let Some(dir) = args.resume.as_deref().or(args.checkpoint_dir.as_deref()) {
        written.push(("--checkpoint-dir", dir.join(CHECKPOINT_FILE)));
    }
    for (flag, path) in written {
        if let Some(why) = gpu_mnist::checkpoint::not_writable(&path) {
            return Err(Error::usage(flag, format!("{} {why}", path.display())));
        }
    }
    let checkpoint_dir = args.resume.as_deref().or(args.checkpoint_dir.as_deref());
    if let Some(dir) = checkpoint_dir.filter(|d| d.exists() && !d.is_dir()) {
        return Err(Error::usage(
            "--checkpoint-dir",
            format!("{} exists and is not a folder", dir.display()),
        ));
    }
    Ok(())
}

/// What the run is about to do, in four lines.
fn print_header(data: &FitData, dir: &Path, device_note: &str, settings: &RunSettings, run_dir: &Path) {
    let val = data
        .val
        .map(|v| format!(", {} validation", v.len()))
        .unwrap_or_default();
    println!(
        "data: {} in {} ({} training{val}, {} test images)",
        settings.dataset,
        dir.display(),
        data.train.len(),
        data.test.len()
    );
    println!("{device_note}");
    let spec = &settings.spec;
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

/// Where the run starts: the checkpoint's position when resuming, else Glorot-initialised weights.
fn start_position(
    resumed: Option<Resumed>,
    spec: &ModelSpec,
    settings: &RunSettings,
    human: bool,
    from: Option<&Path>,
) -> Position {
    let Some(r) = resumed else {
        return Position {
            epoch: 0,
            partial: EpochProgress::default(),
            history: Vec::new(),
            params: glorot_init(spec, settings.seed),
            optimizer: None,
            best: None,
        };
    };
    if human {
        let within = match r.partial.steps_done {
            0 => String::new(),
            k => format!(" and step {k} of epoch {}", r.epochs_done + 1),
        };
        let from = from.unwrap_or(Path::new(".")).display();
        println!(
            "resuming after epoch {} of {}{within} from {from}",
            r.epochs_done, settings.epochs
        );
        if r.best.as_ref().is_some_and(|b| b.watch.exhausted()) {
            println!("early stopping had ended this run: it trains no further, and is evaluated");
        }
    }
    Position {
        epoch: r.epochs_done,
        partial: r.partial,
        history: r.history,
        params: r.checkpoint.params,
        optimizer: Some(r.checkpoint.optimizer),
        best: r.best,
    }
}

/// A diverged run's message, naming the checkpoint it keeps.
fn with_kept_checkpoint(msg: String, checkpoint_dir: Option<&Path>) -> Error {
    match checkpoint_dir {
        Some(dir) if dir.join(CHECKPOINT_FILE).exists() => {
            Error::Numerical(format!("{msg}; the last good checkpoint is kept in {}", dir.display()))
        }
        _ => Error::Numerical(msg),
    }
}

/// Print the test result (and with early stopping the epoch whose weights were kept, also in the
/// run folder's result.json) and save the model.
fn finish(
    args: &TrainArgs,
    settings: &RunSettings,
    run_dir: &Path,
    (test, params): (EvalReport, Vec<HostTensor>),
    best: Option<&BestEpoch>,
) -> Result<()> {
    let kept = best.and_then(|b| b.watch.best_epoch().map(|epoch| (b, epoch)));
    let mut result = json!({"test_loss": test.loss, "test_accuracy": test.accuracy, "examples": test.examples, "dataset": settings.dataset.key(), "run_dir": run_dir.display().to_string()});
    if let Some((b, epoch)) = kept {
        result["kept_epoch"] = json!(epoch);
        result["stopped_early"] = json!(b.stopped);
        result["monitor"] = json!(b.watch.rule.monitor.key());
        if !args.json && !args.quiet {
            let (monitor, patience) = (b.watch.rule.monitor.key(), b.watch.rule.patience);
            let why = match b.stopped {
                true => format!(
                    "{monitor} did not improve for {patience} epochs; stopped after epoch {} and ",
                    epoch + b.watch.waited
                ),
                false => String::new(),
            };
            println!("early stop: {why}kept the weights of epoch {epoch} (the best {monitor})");
        }
    }
    if kept.is_some() {
        RunFolder::create(run_dir)?.write_result(&result)?;
    }
    if args.json {
        println!("{result}");
    } else {
        println!(
            "test: loss {:.4}, accuracy {:.2}% ({} images)",
            test.loss,
            100.0 * test.accuracy,
            test.examples
        );
    }
    if let Some(path) = &args.save {
        checkpoint::save(path, &Checkpoint::model(&settings.spec, params, settings.dataset))?;
        if !args.json && !args.quiet {
            println!("saved {}", path.display());
        }
    }
    Ok(())
}
