//! Host side of output_layer.wgsl: the output layer's whole training step in one dispatch.
//!
//! Contract: `output_layer` checks the class count, the statistics slot, the rows, every tensor
//! and that the weight and bias of each part (values, gradients, velocities) share a packed
//! buffer, and that no written buffer is bound twice; then records one dispatch of one workgroup.
//! The backend calls it only for shapes `Fusions::output_layer` admits.

use super::params::{KernelParams, LossParams};
use super::pipelines::Kernel;
use super::{checks, Bound, WgpuBackend};
use crate::backend::ops::{OutputLayer, StepAt};
use crate::error::Result;
use crate::optim::OptimizerKind;

impl WgpuBackend {
    /// logits, loss, dinp through the previous ReLU, dW and dbias with the optimizer step.
    pub(super) fn output_layer(&mut self, o: &OutputLayer, at: StepAt) -> Result<()> {
        let op = "output layer step";
        let (b, c, k) = (o.shape.rows, o.shape.inputs, o.shape.outputs);
        checks::loss(op, k, at.slot, self.stats_slots)?;
        self.dataset(op, o.ds, at.start, b)?;
        for (t, len) in [(o.inp, b * c), (o.dinp, b * c), (o.dlogits, b * k)] {
            self.tensor(op, t, len)?;
        }
        Self::u32_of(op, "rows * inputs", b * c)?;
        let step = self.step_words(op, o.weight.state(), o.bias.state(), (c, k), &o.opt)?;
        let grad = self.packed_pair(op, o.weight.grad, o.bias.grad, c, k)?;
        // Each written buffer once, and none of them the input (wgpu refuses a buffer bound twice
        // when one binding writes it); SGD binds no velocity.
        let rmsprop = o.opt.kind == OptimizerKind::RmsProp;
        let bound = [
            o.inp,
            o.dlogits,
            o.dinp,
            o.weight.value,
            o.weight.grad,
            o.weight.velocity,
        ];
        let bound = &bound[..if rmsprop { 6 } else { 5 }];
        for i in 0..bound.len() {
            self.distinct(op, &bound[i..])?;
        }
        let params = LossParams {
            rows: Self::u32_of(op, "rows", b)?,
            classes: k as u32,
            start: Self::u32_of(op, "start", at.start)?,
            slot: at.slot as u32,
            write_dlogits: 1,
            c: Self::u32_of(op, "inputs", c)?,
            flags: step.flags,
            w_value: step.value[0],
            b_value: step.value[1],
            w_velocity: step.velocity[0],
            b_velocity: step.velocity[1],
            w_grad: grad[0],
            b_grad: grad[1],
            lr: step.lr,
            rho: step.rho,
            eps: step.eps,
        };
        let velocity = if rmsprop {
            Bound::BufferOf(o.weight.velocity)
        } else {
            Bound::DummyOut
        };
        let bind = [
            (2, Bound::Labels(o.ds)),
            (3, Bound::Order(o.ds)),
            (4, Bound::Tensor(o.dlogits)),
            (5, Bound::Stats),
            (6, Bound::Tensor(o.inp)),
            (7, Bound::BufferOf(o.weight.value)),
            (8, velocity),
            (9, Bound::BufferOf(o.weight.grad)),
            (10, Bound::Tensor(o.dinp)),
        ];
        self.record(Kernel::OutputLayer, params.words(), &bind, (1, 1, 1))
    }
}
