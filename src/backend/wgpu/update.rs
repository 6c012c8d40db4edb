//! Host side of update.wgsl: a lone optimizer step of a parameter (batch normalisation's scale
//! and offset; dense and convolution weights step inside their gradient's kernel).
//!
//! Contract: `update` checks the four tensors against the length, that each lies in its packed
//! buffer (bound whole, indexed by word offsets) and that no two share one, makes the step table
//! hold the step's scalars (`optimizer::select_step`), and records one invocation per value.

use super::optimizer::flag_of;
use super::params::{KernelParams, UpdateParams};
use super::pipelines::{grid_1d, Kernel};
use super::{Bound, WgpuBackend};
use crate::backend::ops::{Op, StepAt, Update};
use crate::error::Result;

impl WgpuBackend {
    pub(super) fn update(&mut self, u: &Update, at: StepAt) -> Result<()> {
        let op = Op::Update(*u).name();
        let p = u.param;
        for t in [p.value, p.grad, p.velocity, p.momentum] {
            self.tensor(op, t, u.len)?;
        }
        self.distinct(op, &[p.value, p.grad, p.velocity, p.momentum])?;
        self.distinct(op, &[p.velocity, p.grad, p.momentum])?;
        self.distinct(op, &[p.momentum, p.grad])?;
        self.select_step(op, &u.opt, at)?;
        let opt = &u.opt;
        let params = UpdateParams {
            count: Self::u32_of(op, "the values", u.len)?,
            flags: flag_of(opt),
            slot: Self::u32_of(op, "the statistics slot", at.slot)?,
            value: self.word_of(op, p.value)?,
            grad: self.word_of(op, p.grad)?,
            velocity: self.word_of(op, p.velocity)?,
            moment: self.word_of(op, p.momentum)?,
            rho: opt.rho,
            eps: opt.eps,
            beta1: opt.beta1,
            beta2: opt.beta2,
            momentum: opt.momentum,
            l2: opt.l2(),
            ..UpdateParams::default()
        };
        let bind = [
            (1, Bound::BufferOf(p.value)),
            (2, Bound::BufferOf(p.grad)),
            (3, Bound::BufferOf(p.velocity)),
            (4, Bound::BufferOf(p.momentum)),
            (5, Bound::StepTable),
        ];
        let grid = grid_1d(u.len, self.max_groups());
        self.record(Kernel::Update, params.words(), &bind, grid)
    }
}
