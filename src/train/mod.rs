//! The training loop over any `Backend`, as a library: epochs of shuffled minibatches, metrics,
//! evaluation (`eval`), and whole runs reported through an observer (`fit`).
//!
//! Contract: `Trainer::with_params` uploads the data and the initial parameters once; `run_epoch`
//! records the epoch's steps in chunks of `chunk_steps` and reads the step statistics back once
//! per chunk (never per step), collecting chunk i's after chunk i + 1 is recorded so that a GPU
//! never waits for the host between chunks; the only other upload per epoch is the shuffled
//! order. Loss is the mean of the per-example cross-entropy over the epoch (what Keras prints); a
//! non-finite loss stops the run with the epoch and step named. The loop is `async`: it waits for
//! the device only by awaiting the backend's `Readback` futures, so a native caller drives it with
//! `pollster::block_on` and a browser with its event loop.

pub mod early_stop;
mod eval;
mod fit;

pub use eval::{evaluate, predict, EvalReport, EvalSet, Prediction};
pub use fit::{fit, BestEpoch, EpochStart, FitData, HostState, Observer, Position};

use web_time::Instant;

use crate::backend::ops::augment::{self, Augment};
use crate::backend::ops::StepAt;
use crate::backend::{Backend, DatasetId, StepStats};
use crate::data::{batches, epoch_order, Dataset};
use crate::error::{Error, Result};
use crate::model::{Batch, Graph, HostTensor, ModelSpec, OptimizerState, ParamPart};
use crate::optim::Optimizer;
use crate::plan::PlanKind;

/// Everything that defines a training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub spec: ModelSpec,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: Optimizer,
    pub seed: u64,
    /// Steps recorded between two read-backs of the statistics.
    pub chunk_steps: usize,
    /// Stop when the validation figure stops improving, ending with the best epoch's weights.
    pub early_stop: Option<early_stop::EarlyStop>,
    /// Move each training image by a random transform (its key is drawn from `seed`).
    pub augment: Option<Augment>,
}

/// Metrics of one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub seconds: f64,
}

/// Progress inside an epoch, reported after every chunk.
#[derive(Debug, Clone)]
pub struct ChunkProgress {
    pub epoch: usize,
    pub steps_done: usize,
    pub steps_total: usize,
    pub examples_done: usize,
    pub loss: f64,
    pub accuracy: f64,
}

/// How far an epoch got: steps done, sums of their statistics, and seconds spent. The start of
/// an epoch is `EpochProgress::default()`; an interrupted epoch is resumed from its value.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct EpochProgress {
    pub steps_done: usize,
    pub loss_sum: f64,
    pub correct: u64,
    pub examples: usize,
    pub seconds: f64,
    /// Steps in a row, up to now, whose loss was infinite in f32 terms, and the first of them.
    pub infinite_steps: usize,
    pub infinite_since: usize,
}

impl EpochProgress {
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.examples.max(1) as f64
    }
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples.max(1) as f64
    }
}

/// How `run_epoch` ended.
#[derive(Debug, Clone, PartialEq)]
pub enum EpochEnd {
    Finished(EpochReport),
    /// `should_stop` asked to stop between chunks; this is where the epoch stands.
    Interrupted(EpochProgress),
}

/// A model and its data resident on a backend.
pub struct Trainer<'b> {
    pub be: &'b mut dyn Backend,
    pub graph: Graph,
    pub cfg: TrainConfig,
    train: DatasetId,
    train_len: usize,
}

impl<'b> Trainer<'b> {
    /// Upload the training set and the given parameters (Glorot-initialised by `glorot_init` for a
    /// new run) and, when resuming, the optimizer's state (its moments; those it lacks start at 0).
    pub fn with_params(
        be: &'b mut dyn Backend,
        train: &Dataset,
        cfg: TrainConfig,
        params: &[HostTensor],
        state: Option<&OptimizerState>,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(Error::usage("--batch-size", "must be at least 1"));
        }
        let mut graph = Graph::new(be, &cfg.spec, cfg.batch_size)?;
        graph.set_seed(cfg.seed);
        graph.set_augment(cfg.augment.map(|a| Augment {
            key: augment::key_of(cfg.seed),
            ..a
        }));
        graph.set_params(be, params)?;
        if let Some(state) = state {
            if !state.velocities.is_empty() {
                graph.write_part(be, ParamPart::Velocity, &state.velocities)?;
            }
            if !state.momenta.is_empty() {
                graph.write_part(be, ParamPart::Momentum, &state.momenta)?;
            }
        }
        let train_id = be.upload_dataset(train)?;
        // Two chunks' statistics: one being read back while the next is recorded.
        be.reserve_stats(2 * cfg.chunk_steps.max(1))?;
        Ok(Trainer {
            be,
            graph,
            cfg,
            train: train_id,
            train_len: train.len(),
        })
    }

    /// Train epoch `epoch` (0-based) from `from` (the start, or where an interrupted run stopped),
    /// calling `progress` after each chunk and `should_stop` between chunks. The epoch's order
    /// depends only on (seed, epoch), so a resumed epoch visits exactly the remaining batches.
    pub async fn run_epoch(
        &mut self,
        epoch: usize,
        from: EpochProgress,
        should_stop: &dyn Fn() -> bool,
        progress: &mut dyn FnMut(&ChunkProgress),
    ) -> Result<EpochEnd> {
        let t0 = Instant::now();
        let order = epoch_order(self.train_len, self.cfg.seed, epoch);
        self.be.set_order(self.train, &order)?;
        let steps: Vec<(usize, usize)> = batches(self.train_len, self.cfg.batch_size).collect();
        let chunk = self.cfg.chunk_steps.max(1);
        let mut done = from;
        // Chunk i writes its statistics to slots (i % 2) * chunk..; on a device that runs behind
        // the host its read-back is collected after chunk i + 1 is recorded, so the device works on
        // one chunk while the host records the next.
        let mut in_flight: Option<&[(usize, usize)]> = None;
        for (i, chunk_steps) in steps[from.steps_done.min(steps.len())..].chunks(chunk).enumerate() {
            if should_stop() {
                if let Some(prev) = in_flight.take() {
                    self.absorb(&mut done, prev, epoch, steps.len(), progress).await?;
                }
                done.seconds = from.seconds + t0.elapsed().as_secs_f64();
                return Ok(EpochEnd::Interrupted(done));
            }
            let first_slot = (i % 2) * chunk;
            // The run's optimizer step of the chunk's first step.
            let first_step = epoch * steps.len() + from.steps_done.min(steps.len()) + i * chunk;
            for (slot, &(start, rows)) in chunk_steps.iter().enumerate() {
                let at = StepAt {
                    start,
                    slot: first_slot + slot,
                    step: first_step + slot,
                };
                self.graph
                    .train_step(self.be, Batch { ds: self.train, rows }, at, &self.cfg.optimizer)?;
            }
            self.be.request_stats(first_slot, chunk_steps.len())?;
            if let Some(prev) = in_flight.replace(chunk_steps) {
                if let Err(e) = self.absorb(&mut done, prev, epoch, steps.len(), progress).await {
                    // Leave no read-back pending on the backend (a later read_stats would get it).
                    let _ = self.be.collect_stats().await;
                    return Err(e);
                }
            }
            // A backend that ran the chunk already (the CPU) gains nothing by waiting a chunk.
            if !self.be.runs_behind_host() {
                if let Some(now) = in_flight.take() {
                    self.absorb(&mut done, now, epoch, steps.len(), progress).await?;
                }
            }
        }
        if let Some(prev) = in_flight {
            self.absorb(&mut done, prev, epoch, steps.len(), progress).await?;
        }
        Ok(EpochEnd::Finished(EpochReport {
            epoch: epoch + 1,
            loss: done.mean_loss(),
            accuracy: done.accuracy(),
            seconds: from.seconds + t0.elapsed().as_secs_f64(),
        }))
    }

    /// Collect the statistics of the oldest requested chunk (`chunk_steps`) into `done`, stop on
    /// divergence, and report progress.
    async fn absorb(
        &mut self,
        done: &mut EpochProgress,
        chunk_steps: &[(usize, usize)],
        epoch: usize,
        total_steps: usize,
        progress: &mut dyn FnMut(&ChunkProgress),
    ) -> Result<()> {
        let stats = self.be.collect_stats().await?;
        accumulate(done, &stats, chunk_steps, MAX_FINITE_LOSS, |step, what, detail| {
            format!(
                "training diverged: the loss became {what} at epoch {}, step {} of {total_steps}{detail}; try a smaller --lr",
                epoch + 1,
                step + 1,
            )
        })?;
        progress(&ChunkProgress {
            epoch: epoch + 1,
            steps_done: done.steps_done,
            steps_total: total_steps,
            examples_done: done.examples,
            loss: done.mean_loss(),
            accuracy: done.accuracy(),
        });
        Ok(())
    }

    /// Make an evaluation set resident (once); pass the id to `evaluate`.
    pub fn upload_eval_set(&mut self, data: &Dataset) -> Result<EvalSet> {
        Ok(EvalSet {
            ds: self.be.upload_dataset(data)?,
            len: data.len(),
        })
    }

    /// Loss and accuracy of the current parameters on a resident evaluation set.
    pub async fn evaluate(&mut self, set: EvalSet) -> Result<EvalReport> {
        evaluate(self.be, &mut self.graph, set, self.cfg.chunk_steps).await
    }

    /// The current parameters, read back from the backend.
    pub async fn params(&mut self) -> Result<Vec<HostTensor>> {
        self.graph.params_to_host(self.be).await
    }

    /// The optimizer's state, read back from the backend (for a checkpoint): the moments its
    /// optimizer keeps.
    pub async fn optimizer_state(&mut self) -> Result<OptimizerState> {
        let opt = self.cfg.optimizer;
        let mut state = OptimizerState::default();
        if opt.kind.uses_velocity() {
            state.velocities = self.graph.read_part(self.be, ParamPart::Velocity).await?;
        }
        if opt.uses_momentum() {
            state.momenta = self.graph.read_part(self.be, ParamPart::Momentum).await?;
        }
        Ok(state)
    }

    /// The training plan of a full batch, as `train --verbose` prints it.
    pub fn describe_plan(&mut self) -> Result<String> {
        let rows = self.cfg.batch_size.min(self.train_len).max(1);
        let ops = self.graph.plan(
            self.be,
            PlanKind::Train,
            Batch { ds: self.train, rows },
            Some(self.cfg.optimizer),
        )?;
        Ok(crate::plan::describe(ops))
    }
}

/// The mean cross-entropy above which a batch's loss counts as infinite: past it the probability
/// of the right class is below the smallest positive f32, so -log(p) computed from f32
/// probabilities (the textbook formula, and Keras's without clipping) is +inf. Our log-sum-exp
/// form stays finite far beyond it, which would hide a diverged run.
pub const MAX_FINITE_LOSS: f64 = 103.28;

/// How many steps in a row the loss may stay infinite (above `MAX_FINITE_LOSS`) before the run
/// counts as diverged. High but workable learning rates spike there for a few steps and recover
/// (RMSprop at lr 0.05 and 0.2: 3 and 5 steps); runs that never recover stay for dozens
/// (lr 1: 13 in a row, lr 100: 98). Measured on the reference job.
pub const INFINITE_LOSS_STEPS: usize = 8;

/// Add a chunk's statistics to `done`. Fails at a NaN or infinite loss, or once the mean loss has
/// stayed above `max_loss` for `INFINITE_LOSS_STEPS` steps in a row (naming the first of them).
pub(crate) fn accumulate(
    done: &mut EpochProgress,
    stats: &[StepStats],
    steps: &[(usize, usize)],
    max_loss: f64,
    diverged: impl Fn(usize, String, String) -> String,
) -> Result<()> {
    for (s, &(_, rows)) in stats.iter().zip(steps) {
        let mean = s.loss_sum as f64 / rows as f64;
        if !mean.is_finite() {
            return Err(Error::Numerical(diverged(
                done.steps_done,
                s.loss_sum.to_string(),
                String::new(),
            )));
        }
        if mean > max_loss {
            if done.infinite_steps == 0 {
                done.infinite_since = done.steps_done;
            }
            done.infinite_steps += 1;
            if done.infinite_steps >= INFINITE_LOSS_STEPS {
                let detail = format!(
                    " and stayed so for {INFINITE_LOSS_STEPS} steps (mean cross-entropy {mean:.3e}: the right class \
                     has probability 0 in f32)"
                );
                return Err(Error::Numerical(diverged(
                    done.infinite_since,
                    "infinite".to_string(),
                    detail,
                )));
            }
        } else {
            done.infinite_steps = 0;
        }
        done.loss_sum += s.loss_sum as f64;
        done.correct += s.correct as u64;
        done.examples += rows;
        done.steps_done += 1;
    }
    Ok(())
}
