//! Host side of dropout.wgsl, and the step base it reads its step from.
//!
//! Contract: `dropout` checks the tensors (the written one shares no buffer with those read)
//! and records one invocation per value. The step is not a parameter of the dispatch (its bind
//! group would then differ every step): the kernel reads the step of slot 0 from the step base,
//! a one-word buffer that `select_step_base` writes when a chunk's steps move it, so that the
//! recorded dispatches are the same every chunk. A write lands before the next submit: work
//! already recorded that reads the base is submitted first.

use super::buffers::{self, GpuBuffer};
use super::params::{dropout_flags, DropoutParams, KernelParams};
use super::pipelines::{grid_1d, Kernel};
use super::{Bound, WgpuBackend};
use crate::backend::ops::{dropout, Dropout, DropoutKind, Op, StepAt};
use crate::error::Result;

/// The step of statistics slot 0 on the device.
pub(super) struct StepBase {
    pub(super) buf: GpuBuffer,
    value: u32,
    /// Whether a dispatch recorded since the last submit reads it.
    pub(super) read_pending: bool,
}

impl WgpuBackend {
    /// Dropout forward (the step's mask, or a copy in evaluation) or backward (the same mask).
    pub(super) fn dropout(&mut self, d: &Dropout, at: StepAt) -> Result<()> {
        let op = Op::Dropout(*d).name();
        let n = d.len;
        let (inp, mask, out, mut flags) = match d.kind {
            DropoutKind::Forward { out, inp, train } => (inp, None, out, if train { dropout_flags::TRAIN } else { 0 }),
            DropoutKind::Backward { dinp, dout, relu_mask } => (dout, relu_mask, dinp, dropout_flags::TRAIN),
        };
        self.tensor(op, out, n)?;
        self.tensor(op, inp, n)?;
        let mut ids = vec![out, inp];
        if let Some(m) = mask {
            self.tensor(op, m, n)?;
            ids.push(m);
            flags |= dropout_flags::RELU_MASK;
        }
        self.distinct(op, &ids)?;
        self.select_step_base(at)?;
        let params = DropoutParams {
            count: Self::u32_of(op, "the values", n)?,
            key: d.key,
            threshold: dropout::threshold(d.rate),
            scale: dropout::scale(d.rate),
            slot: Self::u32_of(op, "the statistics slot", at.slot)?,
            flags,
            _pad0: 0,
            _pad1: 0,
        };
        let bind = [
            (1, Bound::Tensor(inp)),
            (2, mask.map_or(Bound::Dummy, Bound::Tensor)),
            (3, Bound::Tensor(out)),
            (4, Bound::StepBase),
        ];
        let grid = grid_1d(n, self.max_groups());
        self.record(Kernel::Dropout, params.words(), &bind, grid)
    }

    /// Make the step base hold the step of slot 0 for `at` (step - slot, wrapping at 2^32).
    pub(super) fn select_step_base(&mut self, at: StepAt) -> Result<()> {
        let value = (at.step as u32).wrapping_sub(at.slot as u32);
        if self.step_base.as_ref().is_some_and(|b| b.value == value) {
            return Ok(());
        }
        if self.step_base.as_ref().is_some_and(|b| b.read_pending) {
            self.flush()?;
        }
        let buf = match self.step_base.take() {
            Some(b) => b.buf,
            None => buffers::create(&self.ctx, 4, "dropout step base")?,
        };
        self.ctx.queue.write_buffer(&buf.buffer, 0, bytemuck::bytes_of(&value));
        self.counters.uploads += 1;
        self.step_base = Some(StepBase {
            buf,
            value,
            read_pending: false,
        });
        self.ctx.errors.check("writing the dropout step base")
    }
}
