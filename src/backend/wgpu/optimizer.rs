//! How a fused kernel learns its optimizer step: the flags of optimizer.wgsl, the constant
//! hyper-parameters, where a layer's weight and bias sit in the packed values and moments, and
//! the step table from which each step reads its rate and Adam's bias corrections.
//!
//! Contract: `step_words` checks that the weight (`c * n` values) and the bias (`n`) of a fused
//! update share their packed buffers (`Backend::alloc_packed`), which the kernel binds whole, and
//! returns their word offsets there; a moment the optimizer does not keep is not bound, and its
//! offsets are 0. `select_step` makes the step table hold `at.step`'s scalars at the row the
//! kernel reads for slot `at.slot`: the table holds `STEP_TABLE_ROWS` consecutive steps of one
//! optimizer (`Optimizer::scalars`, the numbers every backend uses), written when a run starts,
//! when it reaches the end of the rows, or when the optimizer changes; between chunks of steps
//! only word 0 (the row of slot 0) changes, one 4-byte upload, so that the recorded dispatches
//! and their bind groups are the same every chunk and nothing waits for the host. An optimizer
//! whose scalars are the same every step (a constant rate, no bias corrections) never moves it.
//! A write lands before the next submit: work already recorded that reads the table is
//! submitted first, other recorded work (the chunk's gather) need not be.

use super::buffers::{self, GpuBuffer};
use super::params::optimizer_flags;
use super::WgpuBackend;
use crate::backend::ops::{ParamState, StepAt};
use crate::backend::TensorId;
use crate::error::{Error, Result};
use crate::optim::{Optimizer, OptimizerKind, StepScalars};
use crate::schedule::Schedule;

/// Steps the table holds: more than the statistics slots of two chunks of the longest chunk
/// (2 x 4096), so that a chunk never crosses the table's end.
const STEP_TABLE_ROWS: usize = 16_384;

/// The optimizer's part of a fused kernel's parameter block.
#[derive(Debug, Clone, Copy)]
pub(super) struct StepWords {
    /// optimizer.wgsl's flags.
    pub flags: u32,
    /// The constant rate (output_layer.wgsl, which steps at a constant rate only).
    pub lr: f32,
    pub rho: f32,
    pub eps: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub momentum: f32,
    pub l2: f32,
    /// Word offsets of the weight and the bias in the packed values, velocities and momenta.
    pub value: [u32; 2],
    pub velocity: [u32; 2],
    pub moment: [u32; 2],
}

/// The step table on the device (layout in matmul.wgsl, binding 4) and what it holds.
pub(super) struct StepTable {
    pub(super) buf: GpuBuffer,
    opt: Optimizer,
    /// The run's step of row 0.
    first: usize,
    /// Word 0 as written: the row of slot 0 (wrapping, so that slot + word 0 is the step's row).
    slot0_row: u32,
    /// Whether a dispatch recorded since the last submit reads the table.
    pub(super) read_pending: bool,
}

/// Whether every step of `opt` has the same scalars (any row of its table is right).
fn same_every_step(opt: &Optimizer) -> bool {
    opt.schedule == Schedule::Constant && !matches!(opt.kind, OptimizerKind::Adam | OptimizerKind::AdamW)
}

/// optimizer.wgsl's flag for `opt`.
pub(super) fn flag_of(opt: &Optimizer) -> u32 {
    match opt.kind {
        OptimizerKind::RmsProp => optimizer_flags::RMSPROP,
        OptimizerKind::Sgd if opt.momentum == 0.0 => optimizer_flags::SGD,
        OptimizerKind::Sgd if opt.nesterov => optimizer_flags::MOMENTUM | optimizer_flags::NESTEROV,
        OptimizerKind::Sgd => optimizer_flags::MOMENTUM,
        OptimizerKind::Adam | OptimizerKind::AdamW => optimizer_flags::ADAM,
    }
}

impl WgpuBackend {
    /// The fused step of `weight` (c, n) and `bias` (n) with `opt`.
    pub(super) fn step_words(
        &self,
        op: &'static str,
        weight: ParamState,
        bias: ParamState,
        (c, n): (usize, usize),
        opt: &Optimizer,
    ) -> Result<StepWords> {
        let value = self.packed_pair(op, weight.value, bias.value, c, n)?;
        let velocity = match opt.kind.uses_velocity() {
            true => self.packed_pair(op, weight.velocity, bias.velocity, c, n)?,
            false => [0, 0],
        };
        let moment = match opt.uses_momentum() {
            true => self.packed_pair(op, weight.momentum, bias.momentum, c, n)?,
            false => [0, 0],
        };
        Ok(StepWords {
            flags: flag_of(opt),
            lr: opt.lr,
            rho: opt.rho,
            eps: opt.eps,
            beta1: opt.beta1,
            beta2: opt.beta2,
            momentum: opt.momentum,
            l2: opt.l2(),
            value,
            velocity,
            moment,
        })
    }

    /// Make the step table hold `opt`'s scalars of step `at.step` at row word 0 + `at.slot` (see
    /// the module contract). Work recorded before a change of the table is submitted first, so
    /// that it reads the table as it was.
    pub(super) fn select_step(&mut self, op: &'static str, opt: &Optimizer, at: StepAt) -> Result<()> {
        let covered = self.step_table.as_ref().is_some_and(|t| {
            t.opt == *opt && (same_every_step(opt) || (t.first..t.first + STEP_TABLE_ROWS).contains(&at.step))
        });
        if covered && same_every_step(opt) {
            return Ok(());
        }
        // The row of slot 0: step - slot - first, modulo 2^32 (a step may be below its slot).
        let slot0_row = |first: usize| (at.step.wrapping_sub(at.slot).wrapping_sub(first)) as u32;
        if !covered {
            self.flush_table_readers()?;
            let first = at.step.saturating_sub(at.slot);
            let rows: Vec<StepScalars> = (first..first + STEP_TABLE_ROWS).map(|s| opt.scalars(s)).collect();
            let mut words: Vec<f32> = vec![f32::from_bits(slot0_row(first)), 0.0, 0.0, 0.0];
            words.extend(rows.iter().flat_map(|r| [r.lr, r.adam_step, r.adam_norm, r.decay]));
            let buf = match self.step_table.take() {
                Some(t) => t.buf,
                None => buffers::create(&self.ctx, words.len() as u64 * 4, "optimizer step table")?,
            };
            self.ctx
                .queue
                .write_buffer(&buf.buffer, 0, bytemuck::cast_slice(&words));
            self.counters.uploads += 1;
            self.step_table = Some(StepTable {
                buf,
                opt: *opt,
                first,
                slot0_row: slot0_row(first),
                read_pending: false,
            });
            return self.ctx.errors.check(op);
        }
        let Some(table) = self.step_table.as_ref() else {
            return Err(Error::Gpu(format!("{op}: no step table")));
        };
        let row = slot0_row(table.first);
        if row != table.slot0_row {
            self.flush_table_readers()?;
            let Some(table) = self.step_table.as_mut() else {
                return Err(Error::Gpu(format!("{op}: no step table")));
            };
            self.ctx
                .queue
                .write_buffer(&table.buf.buffer, 0, bytemuck::bytes_of(&row));
            table.slot0_row = row;
            self.counters.uploads += 1;
        }
        Ok(())
    }

    /// Submit the recorded work if some of it reads the step table (about to be written).
    fn flush_table_readers(&mut self) -> Result<()> {
        if self.step_table.as_ref().is_some_and(|t| t.read_pending) {
            self.flush()?;
        }
        Ok(())
    }

    /// A weight (`c * n` values) and its bias (`n`) that a fused optimizer step updates through
    /// one binding of their packed buffer: checked to be that long and to share the buffer;
    /// returns their offsets in it in f32 words, which the shaders index by.
    pub(super) fn packed_pair(
        &self,
        op: &'static str,
        weight: TensorId,
        bias: TensorId,
        c: usize,
        n: usize,
    ) -> Result<[u32; 2]> {
        self.tensor(op, weight, c * n)?;
        self.tensor(op, bias, n)?;
        if self.tensors[weight.0].buf.id != self.tensors[bias.0].buf.id {
            return Err(Error::shape(
                op,
                "the weight and the bias must share a packed buffer (alloc_packed)".to_string(),
            ));
        }
        let word = |t: TensorId| Self::u32_of(op, "a parameter offset", (self.tensors[t.0].offset / 4) as usize);
        Ok([word(weight)?, word(bias)?])
    }
}
