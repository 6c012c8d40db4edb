//! Host side of softmax_xent.wgsl: the fused softmax + cross-entropy of a batch of logits.
//!
//! Contract: `loss` checks the class count, the statistics slot, the rows against the dataset
//! and the tensors, then records one dispatch of one workgroup. Without `dlogits` the kernel
//! writes only the statistics (an unused output is bound in its place).

use super::params::{KernelParams, LossParams};
use super::pipelines::Kernel;
use super::{checks, Bound, WgpuBackend};
use crate::backend::ops::{Loss, StepAt};
use crate::error::Result;

impl WgpuBackend {
    /// The batch's loss sum and correct count into the step's slot, and (softmax - onehot) / rows
    /// into `dlogits` when given.
    pub(super) fn loss(&mut self, l: &Loss, at: StepAt) -> Result<()> {
        let op = "softmax cross-entropy";
        checks::loss(op, l.classes, at.slot, self.stats_slots)?;
        self.dataset(op, l.ds, at.start, l.rows)?;
        self.tensor(op, l.logits, l.rows * l.classes)?;
        let dlogits = match l.dlogits {
            Some(d) => {
                self.tensor(op, d, l.rows * l.classes)?;
                self.distinct(op, &[d, l.logits])?;
                Bound::Tensor(d)
            }
            None => Bound::DummyOut,
        };
        let params = LossParams {
            rows: Self::u32_of(op, "rows", l.rows)?,
            classes: l.classes as u32,
            start: Self::u32_of(op, "start", at.start)?,
            slot: at.slot as u32,
            write_dlogits: l.dlogits.is_some() as u32,
            ..LossParams::default()
        };
        let bind = [
            (1, Bound::Tensor(l.logits)),
            (2, Bound::Labels(l.ds)),
            (3, Bound::Order(l.ds)),
            (4, dlogits),
            (5, Bound::Stats),
        ];
        self.record(Kernel::SoftmaxXent, params.words(), &bind, (1, 1, 1))
    }
}
