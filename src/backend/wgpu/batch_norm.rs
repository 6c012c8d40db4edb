//! Host side of batch_norm.wgsl: batch normalisation's statistics, forward and backward passes.
//!
//! Contract: `batch_norm` checks every tensor's length and that gamma, beta and the moving
//! averages share the packed values buffer and dgamma and dbeta the packed gradients (bound
//! whole and indexed by word offsets), then records: training, the statistics (a workgroup per
//! channel) and the forward pass; evaluation, the forward pass from the moving averages;
//! backward, the parameters' gradients (a workgroup per channel) and then the input's.

use super::params::{batch_norm_flags, BatchNormParams, KernelParams};
use super::pipelines::{grid_1d, Kernel};
use super::{Bound, WgpuBackend};
use crate::backend::ops::{BatchNorm, BatchNormKind, NormParams, Op, BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM};
use crate::backend::TensorId;
use crate::error::{Error, Result};

impl WgpuBackend {
    pub(super) fn batch_norm(&mut self, b: &BatchNorm) -> Result<()> {
        let op = Op::BatchNorm(*b).name();
        let (rows, c) = (b.rows, b.channels);
        let n = rows * c;
        let mut params = BatchNormParams {
            rows: Self::u32_of(op, "the rows", rows)?,
            channels: Self::u32_of(op, "the channels", c)?,
            count: Self::u32_of(op, "the values", n)?,
            momentum: BATCH_NORM_MOMENTUM,
            eps: BATCH_NORM_EPSILON,
            ..BatchNormParams::default()
        };
        let values_grid = grid_1d(n, self.max_groups());
        let channel_grid = self.workgroups(c);
        match b.kind {
            BatchNormKind::ForwardTrain {
                out,
                inp,
                params: p,
                stats,
                relu,
            } => {
                self.tensor(op, inp, n)?;
                self.tensor(op, out, n)?;
                self.tensor(op, stats, 2 * c)?;
                self.distinct(op, &[out, inp, stats, p.gamma])?;
                self.distinct(op, &[stats, inp, p.gamma])?;
                self.distinct(op, &[p.gamma, inp])?;
                self.norm_offsets(op, p, c, &mut params)?;
                if relu {
                    params.flags |= batch_norm_flags::RELU;
                }
                let values = Bound::BufferOf(p.gamma);
                let stats_bind = [(1, Bound::Tensor(inp)), (3, values), (4, Bound::Tensor(stats))];
                self.record(Kernel::BatchNormStats, params.words(), &stats_bind, channel_grid)?;
                let bind = [
                    (1, Bound::Tensor(inp)),
                    (3, values),
                    (4, Bound::Tensor(stats)),
                    (5, Bound::Tensor(out)),
                ];
                self.record(Kernel::BatchNormForward, params.words(), &bind, values_grid)
            }
            BatchNormKind::ForwardEval {
                out,
                inp,
                params: p,
                relu,
            } => {
                self.tensor(op, inp, n)?;
                self.tensor(op, out, n)?;
                self.distinct(op, &[out, inp, p.gamma])?;
                self.norm_offsets(op, p, c, &mut params)?;
                params.flags |= batch_norm_flags::EVAL;
                if relu {
                    params.flags |= batch_norm_flags::RELU;
                }
                // The statistics binding is not read in evaluation: the unused output stands in.
                let bind = [
                    (1, Bound::Tensor(inp)),
                    (3, Bound::BufferOf(p.gamma)),
                    (4, Bound::DummyOut),
                    (5, Bound::Tensor(out)),
                ];
                self.record(Kernel::BatchNormForward, params.words(), &bind, values_grid)
            }
            BatchNormKind::Backward {
                dinp,
                dout,
                inp,
                gamma,
                stats,
                dgamma,
                dbeta,
            } => {
                self.tensor(op, inp, n)?;
                self.tensor(op, dout, n)?;
                self.tensor(op, stats, 2 * c)?;
                [params.gamma] = self.shared_words(op, [gamma], c, "gamma")?;
                [params.dgamma, params.dbeta] = self.shared_words(op, [dgamma, dbeta], c, "dgamma and dbeta")?;
                self.distinct(op, &[dgamma, inp, dout, stats])?;
                let grads = Bound::BufferOf(dgamma);
                let sums = [
                    (1, Bound::Tensor(inp)),
                    (2, Bound::Tensor(dout)),
                    (4, Bound::Tensor(stats)),
                    (6, grads),
                ];
                self.record(Kernel::BatchNormBackwardParams, params.words(), &sums, channel_grid)?;
                let Some(dinp) = dinp else { return Ok(()) };
                self.tensor(op, dinp, n)?;
                self.distinct(op, &[dinp, inp, dout, stats, gamma, dgamma])?;
                let bind = [
                    (1, Bound::Tensor(inp)),
                    (2, Bound::Tensor(dout)),
                    (3, Bound::BufferOf(gamma)),
                    (4, Bound::Tensor(stats)),
                    (5, Bound::Tensor(dinp)),
                    (6, grads),
                ];
                self.record(Kernel::BatchNormBackwardInput, params.words(), &bind, values_grid)
            }
        }
    }

    /// The word offsets of gamma, beta and the moving averages, which must share one buffer.
    fn norm_offsets(&self, op: &'static str, p: NormParams, c: usize, params: &mut BatchNormParams) -> Result<()> {
        let four = [p.gamma, p.beta, p.moving_mean, p.moving_variance];
        [params.gamma, params.beta, params.moving_mean, params.moving_variance] =
            self.shared_words(op, four, c, "gamma, beta and the moving averages")?;
        Ok(())
    }

    /// The word offsets of tensors that a kernel indexes in one binding of their packed buffer:
    /// each checked to hold `len` values, all to share the first's buffer (`what` names them).
    pub(super) fn shared_words<const N: usize>(
        &self,
        op: &'static str,
        tensors: [TensorId; N],
        len: usize,
        what: &str,
    ) -> Result<[u32; N]> {
        let mut words = [0u32; N];
        for (word, &t) in words.iter_mut().zip(&tensors) {
            self.tensor(op, t, len)?;
            if self.tensors[t.0].buf.id != self.tensors[tensors[0].0].buf.id {
                return Err(Error::shape(op, format!("{what} must share a packed buffer")));
            }
            *word = self.word_of(op, t)?;
        }
        Ok(words)
    }

    /// The word offset of a tensor in its buffer.
    pub(super) fn word_of(&self, op: &'static str, t: TensorId) -> Result<u32> {
        Self::u32_of(op, "a parameter offset", (self.tensors[t.0].offset / 4) as usize)
    }

    /// A grid of `n` workgroups (one per channel), folded onto 2-D past the per-dimension limit.
    fn workgroups(&self, n: usize) -> (u32, u32, u32) {
        let max = self.max_groups().max(1) as usize;
        let n = n.max(1);
        if n <= max {
            (n as u32, 1, 1)
        } else {
            (max as u32, n.div_ceil(max) as u32, 1)
        }
    }
}
