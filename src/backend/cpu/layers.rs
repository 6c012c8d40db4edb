//! Batch normalisation and dropout on the CPU: both paths run the reference's loops
//! (`reference::layers`), whose cost is a few passes over a layer's output, small beside the
//! products around them.

use super::{r, CpuBackend};
use crate::backend::ops::{
    dropout, BatchNorm, BatchNormKind, Dropout, DropoutKind, NormParams, StepAt, BATCH_NORM_EPSILON,
    BATCH_NORM_MOMENTUM,
};
use crate::error::Result;

impl CpuBackend {
    /// Dropout forward (the step's mask, or a copy in evaluation) or backward (the same mask).
    pub(super) fn dropout(&mut self, d: &Dropout, at: StepAt) -> Result<()> {
        let op = "dropout";
        let step_key = dropout::step_key(d.key, at.step as u32);
        let n = d.len;
        match d.kind {
            DropoutKind::Forward { out, inp, train } => self.with_out(op, (out, n), &[(inp, n)], |out, ins| {
                if train {
                    r::dropout_apply(out, ins[0], None, step_key, d.rate);
                } else {
                    out.copy_from_slice(ins[0]);
                }
            }),
            DropoutKind::Backward { dinp, dout, relu_mask } => {
                let mut inputs = vec![(dout, n)];
                inputs.extend(relu_mask.map(|m| (m, n)));
                self.with_out(op, (dinp, n), &inputs, |dinp, ins| {
                    r::dropout_apply(dinp, ins[0], ins.get(1).copied(), step_key, d.rate);
                })
            }
        }
    }

    /// Batch normalisation forward (batch statistics, moving averages moved; or the moving
    /// statistics) or backward (the parameters' gradients, then the input's).
    pub(super) fn batch_norm(&mut self, b: &BatchNorm) -> Result<()> {
        let op = "batch norm";
        let (rows, c) = (b.rows, b.channels);
        let n = rows * c;
        match b.kind {
            BatchNormKind::ForwardTrain {
                out,
                inp,
                params,
                stats,
                relu,
            } => {
                let (mut mean, mut var, mut invstd) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
                r::batchnorm_stats(&mut mean, &mut var, self.tensor(op, inp, n)?, rows, c);
                r::batchnorm_invstd(&mut invstd, &var, BATCH_NORM_EPSILON);
                let (gamma, beta) = self.scale_offset(op, params, c)?;
                self.tensor(op, stats, 2 * c)?;
                self.tensor(op, params.moving_mean, c)?;
                self.tensor(op, params.moving_variance, c)?;
                self.with_out(op, (out, n), &[(inp, n)], |out, ins| {
                    r::batchnorm_forward(out, ins[0], (&gamma, &beta), (&mean, &invstd), rows, relu);
                })?;
                let s = self.tensor_mut(op, stats, 2 * c)?;
                s[..c].copy_from_slice(&mean);
                s[c..].copy_from_slice(&invstd);
                r::batchnorm_moving(self.tensor_mut(op, params.moving_mean, c)?, &mean, BATCH_NORM_MOMENTUM);
                r::batchnorm_moving(
                    self.tensor_mut(op, params.moving_variance, c)?,
                    &var,
                    BATCH_NORM_MOMENTUM,
                );
                Ok(())
            }
            BatchNormKind::ForwardEval { out, inp, params, relu } => {
                let (gamma, beta) = self.scale_offset(op, params, c)?;
                let mean = self.tensor(op, params.moving_mean, c)?.to_vec();
                let mut invstd = vec![0.0f32; c];
                r::batchnorm_invstd(
                    &mut invstd,
                    self.tensor(op, params.moving_variance, c)?,
                    BATCH_NORM_EPSILON,
                );
                self.with_out(op, (out, n), &[(inp, n)], |out, ins| {
                    r::batchnorm_forward(out, ins[0], (&gamma, &beta), (&mean, &invstd), rows, relu);
                })
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
                let s = self.tensor(op, stats, 2 * c)?.to_vec();
                let (mean, invstd) = s.split_at(c);
                let gamma = self.tensor(op, gamma, c)?.to_vec();
                let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
                let (dy, x) = (self.tensor(op, dout, n)?, self.tensor(op, inp, n)?);
                r::batchnorm_backward_params((&mut dg, &mut db), dy, x, (mean, invstd), rows);
                self.tensor_mut(op, dgamma, c)?.copy_from_slice(&dg);
                self.tensor_mut(op, dbeta, c)?.copy_from_slice(&db);
                let Some(dinp) = dinp else { return Ok(()) };
                let channels = r::batchnorm_channels(&gamma, (mean, invstd), (&dg, &db), rows);
                self.with_out(op, (dinp, n), &[(dout, n), (inp, n)], |dx, ins| {
                    r::batchnorm_backward_input(dx, ins[0], ins[1], &channels, rows);
                })
            }
        }
    }

    /// Copies of a batch normalisation's gamma and beta.
    fn scale_offset(&self, op: &'static str, p: NormParams, c: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            self.tensor(op, p.gamma, c)?.to_vec(),
            self.tensor(op, p.beta, c)?.to_vec(),
        ))
    }
}
