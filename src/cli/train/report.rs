//! How `train` reports a run: the console (a live progress bar on a terminal, one line an
//! epoch, or JSON lines), the run folder, checkpoints and Ctrl-C, as one `Observer` of the
//! library's `fit`.
//!
//! Contract: the run folder is created only once the model and data are on the device, so a run
//! that can not start writes nothing; every epoch rewrites it and (with `--checkpoint-dir`) the
//! checkpoint atomically; Ctrl-C stops the run between chunks with a checkpoint of that moment.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use gpu_mnist::backend::Counters;
use gpu_mnist::checkpoint::{self, Checkpoint};
use gpu_mnist::lock::FolderLock;
use gpu_mnist::model::ModelSpec;
use gpu_mnist::records::{EpochRecord, RunFolder};
use gpu_mnist::train::{ChunkProgress, EpochProgress, EpochStart, HostState, Observer, Position, Trainer};
use gpu_mnist::{Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use web_time::Instant;

use super::resume::{checkpoint_state, record_to_json, RunPlace, RunSettings};
use super::CHECKPOINT_FILE;

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

/// An epoch's line; with `rate`, the rate of its last step too (a run with a schedule).
fn epoch_line(r: &EpochRecord, epochs: usize, rate: bool) -> String {
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
    if let Some(lr) = r.lr.filter(|_| rate) {
        line.push_str(&format!(", lr {lr:.3e}"));
    }
    // Three significant digits: a GPU epoch takes a few hundredths of a second.
    let decimals = if r.seconds < 1.0 { 3 } else { 2 };
    line.push_str(&format!(", {:.*} s", decimals, r.seconds));
    line
}

/// Set by Ctrl-C: the training loop stops between chunks, checkpoints and exits with 130.
/// A second Ctrl-C exits at once (checkpoint writes are atomic, so nothing is left half-written).
pub(super) fn interrupt_flag() -> Arc<AtomicBool> {
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

/// Where and how a run reports.
pub(super) struct Reporter<'a> {
    pub settings: &'a RunSettings,
    pub place: &'a RunPlace,
    pub spec: &'a ModelSpec,
    pub run_dir: &'a Path,
    pub checkpoint_dir: Option<&'a Path>,
    /// config.json's content.
    pub config: &'a Value,
    pub json: bool,
    pub quiet: bool,
    pub verbose: bool,
    /// Draw a live progress bar (stderr is a terminal).
    pub interactive: bool,
    pub t_start: Instant,
    pub stop: Arc<AtomicBool>,
    /// The run folder, once created (it stays across a hand-over to another backend).
    pub folder: Option<RunFolder>,
    /// The epoch running: its bar, when it started, and how it started.
    pub bar: Option<ProgressBar>,
    pub epoch_t0: Instant,
    pub epoch: Option<EpochStart>,
    pub first_chunk_told: bool,
    /// The locks on the run folder and the checkpoint folder, held until the run ends.
    pub locks: Vec<FolderLock>,
}

impl Reporter<'_> {
    /// --verbose diagnostics go with the human output, or to stderr when stdout carries JSON.
    fn diag(&self, line: String) {
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    /// Save model, optimizer, early stopping's best epoch and progress (whole epochs, `at.epoch`,
    /// and how far into the next one, `partial`).
    fn save_checkpoint(&self, state: HostState<'_>, at: &Position, partial: EpochProgress) -> Result<()> {
        let Some(dir) = self.checkpoint_dir else { return Ok(()) };
        let ck = Checkpoint {
            spec: self.spec.clone(),
            params: state.0.to_vec(),
            optimizer: state.1.clone(),
            best: at.best.as_ref().map(|b| b.params.clone()).unwrap_or_default(),
            dataset: Some(self.settings.dataset),
            data_hash: gpu_mnist::checkpoint::DataHash::Matched,
            state: Some(checkpoint_state(self.settings, self.place, at, partial, self.run_dir)),
        };
        checkpoint::save(&dir.join(CHECKPOINT_FILE), &ck)
    }
}

impl Observer for Reporter<'_> {
    fn started(&mut self, trainer: &mut Trainer<'_>) -> Result<()> {
        if self.verbose {
            let plan = trainer.describe_plan()?;
            self.diag(format!("plan: {plan}"));
        }
        if self.folder.is_none() {
            if let Some(dir) = self.checkpoint_dir {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::bad_file(dir, format!("could not create the checkpoint folder ({e})")))?;
                self.locks.push(FolderLock::acquire(dir)?);
            }
            let folder = RunFolder::create(self.run_dir)?;
            // One run per folder: a folder that is both is locked once.
            let same = |a: &Path, b: &Path| std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok();
            if !self.checkpoint_dir.is_some_and(|c| same(c, self.run_dir)) {
                self.locks.push(FolderLock::acquire(self.run_dir)?);
            }
            folder.write_config(self.config)?;
            self.folder = Some(folder);
        }
        Ok(())
    }

    fn epoch_started(&mut self, start: &EpochStart) {
        let bar = epoch_bar(start.steps, self.interactive);
        bar.set_prefix(format!("epoch {}/{}", start.epoch + 1, self.settings.epochs));
        self.bar = Some(bar);
        self.epoch_t0 = Instant::now();
        self.epoch = Some(*start);
    }

    fn chunk_done(&mut self, p: &ChunkProgress) {
        let resumed = self.epoch.map_or(0, |e| e.resumed.examples);
        if self.verbose && !self.first_chunk_told {
            self.first_chunk_told = true;
            let after = self.t_start.elapsed().as_secs_f64();
            self.diag(format!("first chunk of steps done {after:.2} s after start"));
        }
        let rate = (p.examples_done - resumed) as f64 / self.epoch_t0.elapsed().as_secs_f64().max(1e-9);
        if let Some(bar) = &self.bar {
            bar.set_position(p.steps_done as u64);
            bar.set_message(format!(
                "loss {:.4} accuracy {:.2}% {:.0} samples/s",
                p.loss,
                100.0 * p.accuracy,
                rate
            ));
        }
    }

    fn epoch_done(&mut self, at: &Position, state: Option<HostState<'_>>, counters: Counters) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let Some(record) = at.history.last() else { return Ok(()) };
        if self.json {
            println!("{}", record_to_json(record));
        } else if !self.quiet {
            let scheduled = self.settings.optimizer.schedule != gpu_mnist::schedule::Schedule::Constant;
            println!("{}", epoch_line(record, self.settings.epochs, scheduled));
        }
        if self.verbose {
            let before = self.epoch.map(|e| e.counters).unwrap_or_default();
            self.diag(format!("  backend: {}", counters_delta(counters, before)));
        }
        if let Some(folder) = &self.folder {
            folder.write_epochs(&at.history)?;
        }
        match state {
            Some(state) => self.save_checkpoint(state, at, at.partial),
            None => Ok(()),
        }
    }

    fn wants_state(&self) -> bool {
        self.checkpoint_dir.is_some()
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn interrupted(&mut self, at: &Position, stopped: EpochProgress, state: Option<HostState<'_>>) -> Error {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(state) = state {
            if let Err(e) = self.save_checkpoint(state, at, stopped) {
                return e;
            }
        }
        let steps = self.epoch.map_or(0, |e| e.steps);
        let place = format!("epoch {}, step {} of {steps}", at.epoch + 1, stopped.steps_done);
        let message = match self.checkpoint_dir {
            Some(dir) => format!(
                "interrupted at {place}; checkpoint saved in {dir}; continue with: gpu-mnist train --resume {dir}",
                dir = dir.display()
            ),
            None => format!("interrupted at {place}; nothing saved (use --checkpoint-dir DIR to be able to resume)"),
        };
        Error::Interrupted(message)
    }
}
