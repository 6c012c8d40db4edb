//! A whole training run as one library call: `fit` trains from a `Position` to the last epoch,
//! evaluates, and reports everything through an `Observer` (a progress bar, JSON lines, a run
//! folder and checkpoints are observers; the CLI's `train` is flags and wiring around `fit`).
//!
//! Contract: `fit` changes `at` only at the end of a completed epoch (its record, and with
//! `keep_host` the weights and optimizer state read back), so that after any error `at` describes a
//! whole, consistent moment from which another backend can continue. Every device failure
//! happens before an epoch is recorded. `fit` is `async` and waits for the device only by
//! awaiting the backend's read-backs.

use std::cell::RefCell;

use super::early_stop::Watch;
use super::{ChunkProgress, EpochEnd, EpochProgress, EvalReport, TrainConfig, Trainer};
use crate::backend::{Backend, Counters};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::{HostTensor, OptimizerState};
use crate::records::EpochRecord;

/// The datasets of a run.
#[derive(Debug, Clone, Copy)]
pub struct FitData<'a> {
    pub train: &'a Dataset,
    pub val: Option<&'a Dataset>,
    pub test: &'a Dataset,
}

/// Where a run stands: whole epochs done, progress into the next, and the state to continue from.
#[derive(Debug, Clone)]
pub struct Position {
    /// Epochs completed.
    pub epoch: usize,
    pub partial: EpochProgress,
    pub history: Vec<EpochRecord>,
    /// Parameters and the optimizer's state as of `epoch` (None: a fresh optimizer).
    pub params: Vec<HostTensor>,
    pub optimizer: Option<OptimizerState>,
    /// With early stopping: the best epoch so far and its weights.
    pub best: Option<BestEpoch>,
}

/// Early stopping's state: the watch over the epochs so far and the best epoch's weights.
#[derive(Debug, Clone)]
pub struct BestEpoch {
    pub watch: Watch,
    pub params: Vec<HostTensor>,
    /// Whether the run stopped before its last epoch.
    pub stopped: bool,
}

/// An epoch that starts: `Observer::epoch_started`.
#[derive(Debug, Clone, Copy)]
pub struct EpochStart {
    /// 0-based.
    pub epoch: usize,
    pub steps: usize,
    /// Where a resumed epoch starts (the default for a new one).
    pub resumed: EpochProgress,
    /// The backend's counters so far.
    pub counters: Counters,
}

/// The weights and the optimizer's state, read back from the device.
pub type HostState<'a> = (&'a [HostTensor], &'a OptimizerState);

/// What a run tells as it goes. Every method has a default that does nothing.
pub trait Observer {
    /// The model and data are on the device and nothing has run yet (a run that can not start
    /// has written nothing); `trainer` can describe its plan.
    fn started(&mut self, trainer: &mut Trainer<'_>) -> Result<()> {
        let _ = trainer;
        Ok(())
    }
    /// An epoch starts (or resumes).
    fn epoch_started(&mut self, start: &EpochStart) {
        let _ = start;
    }
    /// A chunk of steps is done.
    fn chunk_done(&mut self, progress: &ChunkProgress) {
        let _ = progress;
    }
    /// An epoch is done and recorded (the last record of `at.history`); `state` is the weights
    /// and optimizer state of that moment when `wants_state` said so.
    fn epoch_done(&mut self, at: &Position, state: Option<HostState<'_>>, counters: Counters) -> Result<()> {
        let _ = (at, state, counters);
        Ok(())
    }
    /// Whether `epoch_done` and `interrupted` need the weights and optimizer state (checkpoints).
    fn wants_state(&self) -> bool {
        false
    }
    /// Asked between chunks: stop the run there.
    fn should_stop(&self) -> bool {
        false
    }
    /// The run stopped between chunks of epoch `at.epoch` at `stopped`: the error `fit` returns
    /// (an `Error::Interrupted` saying where, or the error of saving a checkpoint).
    fn interrupted(&mut self, at: &Position, stopped: EpochProgress, state: Option<HostState<'_>>) -> Error {
        let _ = state;
        Error::Interrupted(format!(
            "interrupted at epoch {}, step {}",
            at.epoch + 1,
            stopped.steps_done
        ))
    }
}

/// Train on `be` from `at` to epoch `cfg.epochs`, then evaluate on the test set: returns its
/// report and the trained weights. With `keep_host`, `at` follows every completed epoch (one
/// read-back of the weights and one of the optimizer state an epoch), so that another backend can take
/// over after a failure.
pub async fn fit(
    be: &mut dyn Backend,
    data: FitData<'_>,
    cfg: &TrainConfig,
    at: &mut Position,
    keep_host: bool,
    observer: &mut dyn Observer,
) -> Result<(EvalReport, Vec<HostTensor>)> {
    let device = be.name();
    let mut trainer = Trainer::with_params(be, data.train, cfg.clone(), &at.params, at.optimizer.as_ref())?;
    let val_set = data.val.map(|v| trainer.upload_eval_set(v)).transpose()?;
    let test_set = trainer.upload_eval_set(data.test)?;
    observer.started(&mut trainer)?;
    let steps = data.train.len().div_ceil(cfg.batch_size.max(1));
    let want_state = keep_host || observer.wants_state();
    // A run that early stopping ended (a checkpoint resumed after it, even one whose patience ran
    // out on what was then its last epoch) trains no further: it stopped early if it was given
    // more epochs, as the uninterrupted run would have.
    let mut last = cfg.epochs;
    if let Some(b) = at.best.as_mut().filter(|b| b.watch.exhausted()) {
        b.stopped |= at.epoch < cfg.epochs;
        last = at.epoch;
    }
    for epoch in at.epoch..last {
        observer.epoch_started(&EpochStart {
            epoch,
            steps,
            resumed: at.partial,
            counters: trainer.be.counters(),
        });
        // The loop asks whether to stop between chunks and reports progress after each, never
        // both at once: one cell lends the observer to both.
        let shared = RefCell::new(&mut *observer);
        let should_stop = || shared.borrow().should_stop();
        let mut progress = |p: &ChunkProgress| shared.borrow_mut().chunk_done(p);
        let end = trainer.run_epoch(epoch, at.partial, &should_stop, &mut progress).await;
        let report = match end? {
            EpochEnd::Finished(report) => report,
            EpochEnd::Interrupted(stopped) => {
                let state = match observer.wants_state() {
                    true => Some((trainer.params().await?, trainer.optimizer_state().await?)),
                    false => None,
                };
                let state = state.as_ref().map(|(p, o)| (p.as_slice(), o));
                return Err(observer.interrupted(at, stopped, state));
            }
        };
        let val = match val_set {
            Some(set) => Some(trainer.evaluate(set).await?),
            None => None,
        };
        let state = match want_state {
            true => Some((trainer.params().await?, trainer.optimizer_state().await?)),
            false => None,
        };
        let record = EpochRecord {
            epoch: report.epoch,
            train_loss: report.loss,
            train_accuracy: report.accuracy,
            val_loss: val.as_ref().map(|v| v.loss),
            val_accuracy: val.as_ref().map(|v| v.accuracy),
            seconds: report.seconds,
            lr: Some(crate::records::shortest_f64(
                cfg.optimizer.scalars(((epoch + 1) * steps).saturating_sub(1)).lr,
            )),
            device: device.clone(),
        };
        // Early stopping: a best epoch's weights are kept (one more read-back, unless the state
        // was read already), and the run stops once the figure has not improved for long enough.
        // The watch is judged on a copy; `at.best` (and its weights) changes only below, with the
        // rest of `at`.
        let watch = at.best.as_ref().map(|b| b.watch).or(cfg.early_stop.map(Watch::new));
        let judged = watch.map(|mut w| (w.observe(&record), w));
        let best_params = match (judged, &state) {
            (Some((verdict, _)), Some((params, _))) if verdict.best => Some(params.clone()),
            (Some((verdict, _)), None) if verdict.best => Some(trainer.params().await?),
            _ => None,
        };
        at.history.push(record);
        at.partial = EpochProgress::default();
        at.epoch = epoch + 1;
        if let Some((params, optimizer)) = state.as_ref().filter(|_| keep_host) {
            at.params = params.clone();
            at.optimizer = Some(optimizer.clone());
        }
        if let Some((verdict, watch)) = judged {
            let kept = at.best.take().map(|b| b.params).unwrap_or_default();
            at.best = Some(BestEpoch {
                watch,
                params: best_params.unwrap_or(kept),
                stopped: verdict.stop && epoch + 1 < cfg.epochs,
            });
        }
        let view = state.as_ref().map(|(p, o)| (p.as_slice(), o));
        observer.epoch_done(at, view, trainer.be.counters())?;
        if at.best.as_ref().is_some_and(|b| b.stopped) {
            break;
        }
    }
    // With early stopping the run ends with the best epoch's weights (Keras's
    // restore_best_weights), whether it stopped early or ran out of epochs.
    if let Some(b) = at.best.as_ref().filter(|b| !b.params.is_empty()) {
        trainer.graph.set_params(trainer.be, &b.params)?;
    }
    let test = trainer.evaluate(test_set).await?;
    Ok((test, trainer.params().await?))
}
