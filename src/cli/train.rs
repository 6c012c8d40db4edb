//! `gpu-mnist train`: the reference job by default; prints each epoch as it ends, then the test
//! loss and accuracy; optionally saves the model.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use gpu_mnist::backend::Counters;
use gpu_mnist::data::locate::resolve_data_dir;
use gpu_mnist::data::Mnist;
use gpu_mnist::device::open_device;
use gpu_mnist::model::ModelSpec;
use gpu_mnist::optim::{Optimizer, OptimizerKind};
use gpu_mnist::train::{TrainConfig, Trainer};
use gpu_mnist::{checkpoint, Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{parse_hidden, parse_lr, parse_positive, DataArgs, DeviceArgs, Hidden};

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
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "5", value_parser = parse_positive)]
    pub epochs: usize,
    /// Examples per step (the last batch of an epoch keeps the remainder)
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "128", value_parser = parse_positive)]
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
    /// Steps recorded between two read-backs of loss and accuracy
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "64", value_parser = parse_positive)]
    pub chunk_steps: usize,
    /// Save the trained model to PATH (safetensors)
    #[arg(long, value_name = "PATH")]
    pub save: Option<PathBuf>,
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

/// Fail before training if the model could not be saved where asked.
fn check_save_path(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::usage("--save", format!("{} is a directory", path.display())));
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(Error::usage(
            "--save",
            format!("folder {} does not exist", parent.display()),
        ));
    }
    Ok(())
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

pub fn run(args: TrainArgs) -> Result<()> {
    let kind = match args.optimizer {
        OptimizerFlag::Rmsprop => OptimizerKind::RmsProp,
        OptimizerFlag::Sgd => OptimizerKind::Sgd,
    };
    let optimizer = Optimizer::new(kind, args.lr)?;
    if let Some(path) = &args.save {
        check_save_path(path)?;
    }
    let interactive = std::io::stderr().is_terminal() && !args.quiet;
    let (dir, _) = resolve_data_dir(args.data.data.as_deref(), args.data.offline, interactive)?;
    let mnist = Mnist::load(&dir)?;
    let train_set = mnist.train.first(args.train_limit.unwrap_or(usize::MAX));
    let test_set = mnist.test.first(args.data.test_limit.unwrap_or(usize::MAX));
    let spec = ModelSpec::mnist(&args.hidden.0);
    let opened = open_device(args.device.device.into(), args.device.adapter.as_deref())?;
    let cfg = TrainConfig {
        spec: spec.clone(),
        epochs: args.epochs,
        batch_size: args.batch_size,
        optimizer,
        seed: args.seed,
        chunk_steps: args.chunk_steps,
    };
    if !args.quiet {
        println!(
            "data: {} ({} training, {} test images)",
            dir.display(),
            train_set.len(),
            test_set.len()
        );
        println!("{}", opened.note);
        println!(
            "model: {} ({} parameters), {}, batch {}, {} epochs, seed {}",
            spec.describe(),
            spec.param_count(),
            optimizer.describe(),
            args.batch_size,
            args.epochs,
            args.seed
        );
    }
    let mut backend = opened.backend;
    let mut trainer = Trainer::new(backend.as_mut(), &train_set, cfg)?;
    let test_id = trainer.upload_eval_set(&test_set)?;
    for epoch in 0..args.epochs {
        let steps = train_set.len().div_ceil(args.batch_size);
        let bar = epoch_bar(steps, interactive);
        bar.set_prefix(format!("epoch {}/{}", epoch + 1, args.epochs));
        let before = trainer.be.counters();
        let report = trainer.run_epoch(epoch, &mut |p| {
            bar.set_position(p.steps_done as u64);
            bar.set_message(format!("loss {:.4} accuracy {:.2}%", p.loss, 100.0 * p.accuracy));
        })?;
        bar.finish_and_clear();
        if !args.quiet {
            println!(
                "epoch {}/{}: loss {:.4}, accuracy {:.2}%, {:.2} s",
                report.epoch,
                args.epochs,
                report.loss,
                100.0 * report.accuracy,
                report.seconds
            );
        }
        if args.verbose {
            println!("  backend: {}", counters_delta(trainer.be.counters(), before));
        }
    }
    let test = trainer.evaluate(test_id)?;
    println!(
        "test: loss {:.4}, accuracy {:.2}% ({} images)",
        test.loss,
        100.0 * test.accuracy,
        test.examples
    );
    if let Some(path) = &args.save {
        let params = trainer.params()?;
        checkpoint::save(path, &spec, &params)?;
        if !args.quiet {
            println!("saved {}", path.display());
        }
    }
    Ok(())
}
