//! How a fused kernel learns its optimizer step: the flag of optimizer.wgsl, the hyper-parameters,
//! and where a layer's weight and bias sit in the packed value and velocity buffers.
//!
//! Contract: `step_words` checks that the weight (`c * n` values) and the bias (`n`) of a fused
//! update share their packed buffers (`Backend::alloc_packed`), which the kernel binds whole, and
//! returns their word offsets there; SGD binds no velocity, so its offsets are 0.

use super::params::optimizer_flags;
use super::WgpuBackend;
use crate::backend::ops::ParamState;
use crate::backend::TensorId;
use crate::error::{Error, Result};
use crate::optim::{Optimizer, OptimizerKind};

/// The optimizer's part of a fused kernel's parameter block.
#[derive(Debug, Clone, Copy)]
pub(super) struct StepWords {
    /// optimizer.wgsl's RMSPROP or SGD.
    pub flags: u32,
    pub lr: f32,
    pub rho: f32,
    pub eps: f32,
    /// Word offsets of the weight and the bias in the packed values, and in the velocities.
    pub value: [u32; 2],
    pub velocity: [u32; 2],
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
        let (flags, velocity) = match opt.kind {
            OptimizerKind::RmsProp => (
                optimizer_flags::RMSPROP,
                self.packed_pair(op, weight.velocity, bias.velocity, c, n)?,
            ),
            OptimizerKind::Sgd => (optimizer_flags::SGD, [0, 0]),
        };
        Ok(StepWords {
            flags,
            lr: opt.lr,
            rho: opt.rho,
            eps: opt.eps,
            value,
            velocity,
        })
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
