//! What `--resume` needs: a run's settings and place as saved in its checkpoint, read back and
//! merged with the command line, and the training state a checkpoint carries.
//!
//! Contract: `load_resume` refuses a checkpoint folder whose file is missing, a model file
//! without training state, or a state that disagrees with the tensors, naming the file;
//! `checkpoint_state` writes what `load_resume` reads, early stopping's watch included (its best
//! epoch, that epoch's figure, the epochs waited since, whether it stopped), whose best weights
//! the checkpoint holds as `best.*` tensors.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use gpu_mnist::backend::ops::Augment;
use gpu_mnist::checkpoint::Checkpoint;
use gpu_mnist::data::DatasetKind;
use gpu_mnist::model::ModelSpec;
use gpu_mnist::optim::{Optimizer, OptimizerKind};
use gpu_mnist::records::EpochRecord;
use gpu_mnist::schedule::Schedule;
use gpu_mnist::train::early_stop::{EarlyStop, Monitor, Watch};
use gpu_mnist::train::{BestEpoch, EpochProgress, Position};
use gpu_mnist::{Error, Result};
use serde_json::{json, Value};

use super::{DeviceFlag, TrainArgs, CHECKPOINT_FILE};

/// What defines a run, saved in config.json and in checkpoints so that --resume can continue it.
#[derive(Debug, Clone)]
pub(super) struct RunSettings {
    /// What it trains on (MNIST unless --dataset says otherwise).
    pub(super) dataset: DatasetKind,
    pub(super) spec: ModelSpec,
    pub(super) epochs: usize,
    pub(super) batch_size: usize,
    /// Its schedule is resolved against the run's steps by `resolve_schedule`.
    pub(super) optimizer: Optimizer,
    /// `--schedule`'s words (or the recipe's), until `resolve_schedule` counts the run's steps.
    pub(super) schedule: String,
    pub(super) seed: u64,
    pub(super) train_limit: Option<usize>,
    pub(super) validation_split: Option<f64>,
    pub(super) chunk_steps: usize,
    /// `--early-stop` and `--monitor` (a checkpoint holds the watch and the best epoch's weights).
    pub(super) early_stop: Option<EarlyStop>,
    /// `--augment` (or the recipe's).
    pub(super) augment: Option<Augment>,
}

impl RunSettings {
    pub(super) fn from_args(args: &TrainArgs) -> Result<Self> {
        let spec = args.model.spec()?;
        let recipe = args.model.recipe()?;
        // The recipe's optimizer unless --optimizer names another; then each flag given.
        let mut optimizer = match (args.optimizer.map(OptimizerKind::from), &recipe) {
            (None, Some(r)) => r.optimizer,
            (kind, _) => Optimizer::new(kind.unwrap_or(OptimizerKind::RmsProp), None)?,
        };
        let flags = [
            (&mut optimizer.lr, args.lr),
            (&mut optimizer.beta1, args.beta1),
            (&mut optimizer.beta2, args.beta2),
            (&mut optimizer.eps, args.eps),
            (&mut optimizer.momentum, args.momentum),
            (&mut optimizer.weight_decay, args.weight_decay),
        ];
        for (field, flag) in flags {
            if let Some(value) = flag {
                *field = value;
            }
        }
        optimizer.nesterov = args.nesterov;
        optimizer.validate()?;
        let early_stop = args.early_stop.map(|patience| EarlyStop {
            patience,
            monitor: args.monitor.map_or(Monitor::ValLoss, Monitor::from),
        });
        if early_stop.is_some() && args.validation_split.is_none_or(|f| f <= 0.0) {
            return Err(Error::usage(
                "--early-stop",
                "watches the validation set: give --validation-split above 0",
            ));
        }
        let schedule = match (&args.schedule, &recipe) {
            (Some(text), _) => text.clone(),
            (None, Some(r)) => r.schedule.to_string(),
            (None, None) => "constant".to_string(),
        };
        Ok(RunSettings {
            dataset: args.data.dataset.map(DatasetKind::from).unwrap_or_default(),
            batch_size: args
                .batch_size
                .unwrap_or_else(|| super::super::default_batch(&spec, recipe.as_ref())),
            spec,
            epochs: args.epochs.or(recipe.as_ref().map(|r| r.epochs)).unwrap_or(5),
            optimizer,
            schedule,
            seed: args.seed,
            train_limit: args.train_limit,
            validation_split: args.validation_split,
            chunk_steps: args.chunk_steps,
            early_stop,
            augment: match args.augment {
                Some(flag) => flag.0,
                None => recipe.as_ref().and_then(|r| r.augment),
            },
        })
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "dataset": self.dataset.key(),
            "model": self.spec.describe(),
            "layers": self.spec.to_layers_arg(),
            "hidden": self.spec.hidden(),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer.kind.key(),
            "lr": f32_json(self.optimizer.lr),
            "rho": f32_json(self.optimizer.rho),
            "eps": f32_json(self.optimizer.eps),
            "beta1": f32_json(self.optimizer.beta1),
            "beta2": f32_json(self.optimizer.beta2),
            "momentum": f32_json(self.optimizer.momentum),
            "nesterov": self.optimizer.nesterov,
            "weight_decay": f32_json(self.optimizer.weight_decay),
            "schedule": self.schedule,
            "seed": self.seed,
            "train_limit": self.train_limit,
            "validation_split": self.validation_split,
            "chunk_steps": self.chunk_steps,
            "early_stop": self.early_stop.map(|e| json!({"patience": e.patience, "monitor": e.monitor.key()})),
            "augment": self.augment.map(|a| a.describe()),
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
        // The layers; a run written before convnets existed names only its hidden widths.
        let spec = match v["layers"].as_str() {
            Some(layers) => ModelSpec::parse("layers", layers).map_err(|_| bad("layers"))?,
            None => {
                let hidden: Vec<usize> = v["hidden"]
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_u64().map(|w| w as usize)).collect())
                    .ok_or_else(|| bad("hidden"))?;
                ModelSpec::mnist(&hidden)
            }
        };
        let kind = v["optimizer"]
            .as_str()
            .and_then(OptimizerKind::from_key)
            .ok_or_else(|| bad("optimizer"))?;
        let lr = v["lr"].as_f64().ok_or_else(|| bad("lr"))? as f32;
        // Hyper-parameters a run from before they existed does not name take their defaults.
        let mut optimizer = Optimizer::new(kind, Some(lr)).map_err(|_| bad("lr"))?;
        for (key, field) in [
            ("rho", &mut optimizer.rho),
            ("eps", &mut optimizer.eps),
            ("beta1", &mut optimizer.beta1),
            ("beta2", &mut optimizer.beta2),
            ("momentum", &mut optimizer.momentum),
            ("weight_decay", &mut optimizer.weight_decay),
        ] {
            if !v[key].is_null() {
                *field = v[key].as_f64().ok_or_else(|| bad(key))? as f32;
            }
        }
        optimizer.nesterov = v["nesterov"].as_bool().unwrap_or(false);
        optimizer.validate().map_err(|_| bad("optimizer setting"))?;
        let schedule = v["schedule"].as_str().unwrap_or("constant").to_string();
        optimizer.schedule = Schedule::parse(&schedule, 1).map_err(|_| bad("schedule"))?;
        let validation_split = v["validation_split"].as_f64();
        if validation_split.is_some_and(|f| !(0.0..1.0).contains(&f)) {
            return Err(bad("validation_split"));
        }
        // A run from before datasets other than MNIST existed names none.
        let dataset = match v["dataset"].as_str() {
            Some(key) => DatasetKind::from_key(key).ok_or_else(|| bad("dataset"))?,
            None => DatasetKind::Mnist,
        };
        let settings = RunSettings {
            dataset,
            spec,
            epochs: usize_of("epochs", u32::MAX as u64)?,
            batch_size: usize_of("batch_size", 65_536)?,
            optimizer,
            schedule,
            seed: v["seed"].as_u64().ok_or_else(|| bad("seed"))?,
            train_limit: v["train_limit"].as_u64().map(|x| x as usize),
            validation_split,
            chunk_steps: usize_of("chunk_steps", 4096)?,
            early_stop: match &v["early_stop"] {
                Value::Null => None,
                e => Some(EarlyStop {
                    patience: e["patience"]
                        .as_u64()
                        .filter(|&p| p >= 1)
                        .ok_or_else(|| bad("early_stop patience"))? as usize,
                    monitor: e["monitor"]
                        .as_str()
                        .and_then(Monitor::from_key)
                        .ok_or_else(|| bad("early_stop monitor"))?,
                }),
            },
            augment: match v["augment"].as_str() {
                Some(text) => Some(Augment::parse(text).map_err(|_| bad("augment"))?),
                None => None,
            },
        };
        settings
            .spec
            .check_size(settings.batch_size)
            .map_err(|_| bad("model size (layers and batch size)"))?;
        Ok(settings)
    }
}

impl RunSettings {
    /// Count the run's steps (epochs x batches of a training set of `train_len` images) into
    /// its schedule; the schedule's words from then on name them, so that a resumed run, even
    /// one given more --epochs, keeps the rates of the run it continues.
    pub(super) fn resolve_schedule(&mut self, train_len: usize) -> Result<()> {
        let total = self.epochs.saturating_mul(train_len.div_ceil(self.batch_size.max(1)));
        let schedule = Schedule::parse(&self.schedule, total).map_err(|why| Error::usage("--schedule", why))?;
        self.optimizer.schedule = schedule;
        self.schedule = schedule.describe();
        Ok(())
    }
}

/// An f32 as the shortest decimal that reads back as the same f32 (0.001, not 0.0010000000474974513).
fn f32_json(x: f32) -> Value {
    json!(gpu_mnist::records::shortest_f64(x))
}

/// Where a resumed run stands.
pub(super) struct Resumed {
    pub(super) checkpoint: Checkpoint,
    pub(super) epochs_done: usize,
    /// How far the next epoch had got when the run was interrupted (zero after a whole epoch).
    pub(super) partial: EpochProgress,
    pub(super) history: Vec<EpochRecord>,
    pub(super) run_dir: Option<PathBuf>,
    pub(super) settings: RunSettings,
    /// Where and on what the run ran; reused unless the command line says otherwise.
    pub(super) place: RunPlace,
    /// With `--early-stop`: its watch and the best epoch's weights, once an epoch has finished.
    pub(super) best: Option<BestEpoch>,
}

/// The data folder, test limit and device of a run: not part of its arithmetic (a resumed run may
/// move to another machine), but what `--resume` reuses when the command line does not give them.
#[derive(Debug, Clone, Default)]
pub(super) struct RunPlace {
    pub(super) data: Option<PathBuf>,
    pub(super) test_limit: Option<usize>,
    pub(super) device: Option<DeviceFlag>,
    pub(super) adapter: Option<String>,
}

impl RunPlace {
    /// The place of a run on the data folder `data` with the command line `args`.
    pub(super) fn of(data: &Path, args: &TrainArgs) -> RunPlace {
        RunPlace {
            data: Some(std::path::absolute(data).unwrap_or_else(|_| data.to_path_buf())),
            test_limit: args.data.test_limit,
            device: Some(args.device.device),
            adapter: args.device.adapter.clone(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "data": self.data.as_ref().map(|d| d.display().to_string()),
            "test_limit": self.test_limit,
            "device": self.device.and_then(|d| d.to_possible_value()).map(|v| v.get_name().to_string()),
            "adapter": self.adapter,
        })
    }

    /// Whatever of it a checkpoint holds (a checkpoint without it holds none).
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
    pub(super) fn fill(&self, args: &mut TrainArgs, given: impl Fn(&str) -> bool) {
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

pub(super) fn load_resume(dir: &Path) -> Result<Resumed> {
    let path = dir.join(CHECKPOINT_FILE);
    if !dir.is_dir() {
        return Err(Error::usage("--resume", format!("{} is not a folder", dir.display())));
    }
    let checkpoint = crate::cli::load_model(&path, None)?;
    let state = checkpoint
        .state
        .clone()
        .ok_or_else(|| Error::bad_file(&path, "is a model file, not a training checkpoint (no training state)"))?;
    let settings = RunSettings::from_json(&state["settings"], &path)?;
    let opt = &settings.optimizer;
    let kept = &checkpoint.optimizer;
    if (opt.kind.uses_velocity() && kept.velocities.is_empty()) || (opt.uses_momentum() && kept.momenta.is_empty()) {
        return Err(Error::bad_file(
            &path,
            format!("holds no optimizer state for its {}", opt.kind.key()),
        ));
    }
    if settings.spec != checkpoint.spec {
        return Err(Error::bad_file(
            &path,
            "its training state and its tensors describe different models",
        ));
    }
    if checkpoint.dataset.is_some_and(|d| d != settings.dataset) {
        return Err(Error::bad_file(
            &path,
            "its training state and its metadata name different datasets",
        ));
    }
    let epochs_done = state["epochs_done"].as_u64().map(|e| e as usize).unwrap_or(0);
    let history = state["history"]
        .as_array()
        .map(|a| a.iter().filter_map(record_from_json).collect())
        .unwrap_or_default();
    let run_dir = state["run_dir"].as_str().map(PathBuf::from);
    let best = best_from_json(&state["early_stop"], &settings, &checkpoint, epochs_done, &path)?;
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
        best,
    })
}

/// Early stopping's state as `checkpoint_state` writes it (null without `--early-stop`, or before
/// its first epoch).
fn best_to_json(best: Option<&BestEpoch>) -> Value {
    match best {
        Some(b) => json!({
            "best_epoch": b.watch.best.map(|(epoch, _)| epoch),
            // Readable, and exactly (a tie must stay a tie after a resume; NaN survives too).
            "best_cost": b.watch.best.map(|(_, cost)| cost),
            "best_cost_bits": b.watch.best.map(|(_, cost)| cost.to_bits()),
            "waited": b.watch.waited,
            "stopped": b.stopped,
        }),
        None => Value::Null,
    }
}

/// Early stopping's state read back: the watch from the training state, the best weights from the
/// checkpoint's `best.*` tensors, which must be there exactly when a best epoch (one of the epochs
/// done) is named, and only in a run with `--early-stop`.
fn best_from_json(
    v: &Value,
    settings: &RunSettings,
    checkpoint: &Checkpoint,
    epochs_done: usize,
    path: &Path,
) -> Result<Option<BestEpoch>> {
    let bad = |what: &str| Error::bad_file(path, format!("its training state lacks a valid {what}"));
    let Some(rule) = settings.early_stop else {
        if !checkpoint.best.is_empty() || !v.is_null() {
            return Err(Error::bad_file(
                path,
                "holds early stopping's state, but its settings have no --early-stop",
            ));
        }
        return Ok(None);
    };
    // Interrupted before its first epoch ended: nothing watched yet.
    if v.is_null() {
        if !checkpoint.best.is_empty() {
            return Err(Error::bad_file(
                path,
                "holds best.* weights but no early-stopping state",
            ));
        }
        return Ok(None);
    }
    let best = match (v["best_epoch"].as_u64(), v["best_cost_bits"].as_u64()) {
        (Some(epoch), Some(bits)) if (1..=epochs_done as u64).contains(&epoch) => {
            Some((epoch as usize, f64::from_bits(bits)))
        }
        (None, None) if v["best_epoch"].is_null() => None,
        _ => return Err(bad("early-stopping best epoch")),
    };
    if best.is_some() == checkpoint.best.is_empty() {
        let why = match best {
            Some(_) => "names a best epoch for --early-stop but holds no best.* weights",
            None => "holds best.* weights but names no best epoch for --early-stop",
        };
        return Err(Error::bad_file(path, why));
    }
    Ok(Some(BestEpoch {
        watch: Watch {
            rule,
            best,
            waited: v["waited"].as_u64().ok_or_else(|| bad("early-stopping wait"))? as usize,
        },
        params: checkpoint.best.clone(),
        stopped: v["stopped"].as_bool().ok_or_else(|| bad("early-stopping stop"))?,
    }))
}

pub(super) fn record_to_json(r: &EpochRecord) -> Value {
    json!({
        "epoch": r.epoch, "loss": r.train_loss, "accuracy": r.train_accuracy,
        "val_loss": r.val_loss, "val_accuracy": r.val_accuracy, "seconds": r.seconds, "lr": r.lr, "device": r.device,
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
        lr: v["lr"].as_f64(),
        device: v["device"].as_str().unwrap_or("").to_string(),
    })
}

/// The training state a checkpoint carries besides its tensors: whole epochs done, how far into
/// the next, the settings, where it ran, the history and the run folder.
pub(super) fn checkpoint_state(
    settings: &RunSettings,
    place: &RunPlace,
    at: &Position,
    partial: EpochProgress,
    run_dir: &Path,
) -> Value {
    json!({
        "epochs_done": at.epoch,
        "early_stop": best_to_json(at.best.as_ref()),
        "partial_epoch": {
            "steps_done": partial.steps_done, "loss_sum": partial.loss_sum, "correct": partial.correct,
            "examples": partial.examples, "seconds": partial.seconds,
        },
        "settings": settings.to_json(),
        "place": place.to_json(),
        "history": at.history.iter().map(record_to_json).collect::<Vec<_>>(),
        // Absolute, so that a resume from another working folder writes to the same place.
        "run_dir": std::path::absolute(run_dir).unwrap_or_else(|_| run_dir.to_path_buf()).display().to_string(),
    })
}
