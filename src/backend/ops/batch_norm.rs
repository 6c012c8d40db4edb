//! Batch normalisation as ops: per-channel statistics of a batch in training, the moving
//! averages in evaluation, and the backward pass, with Keras's defaults.
//!
//! Contract: a batch of `rows` values per channel (images x pixels for an image, the batch for a
//! flat input) holds `channels` channels as its last axis. Training normalises with the batch's
//! mean and biased variance, keeps (mean, 1 / sqrt(variance + EPSILON)) in `stats` for the
//! backward pass and moves the moving averages: moving = moving x MOMENTUM + batch x (1 -
//! MOMENTUM), as Keras does (PyTorch's running variance is the unbiased one, and its momentum is
//! 1 - ours); evaluation normalises with the moving averages.

use super::TensorId;

/// Keras's BatchNormalization momentum.
pub const MOMENTUM: f32 = 0.99;
/// Keras's BatchNormalization epsilon (PyTorch's is 1e-5).
pub const EPSILON: f32 = 1e-3;

/// A batch normalisation layer's parameters (values): scale, offset and moving statistics,
/// each (channels,).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormParams {
    pub gamma: TensorId,
    pub beta: TensorId,
    pub moving_mean: TensorId,
    pub moving_variance: TensorId,
}

/// A batch normalisation op over (rows, channels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNorm {
    pub rows: usize,
    pub channels: usize,
    pub kind: BatchNormKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BatchNormKind {
    /// Training: stats (2, channels) = (mean, 1 / sqrt(var + EPSILON)) of inp's batch; out =
    /// gamma (inp - mean) / sqrt(var + EPSILON) + beta, then max(., 0) when `relu`; the moving
    /// averages move towards the batch's.
    ForwardTrain {
        out: TensorId,
        inp: TensorId,
        params: NormParams,
        stats: TensorId,
        relu: bool,
    },
    /// Evaluation: out as in training with the moving mean and variance.
    ForwardEval {
        out: TensorId,
        inp: TensorId,
        params: NormParams,
        relu: bool,
    },
    /// dgamma = sum of dout x xhat, dbeta = sum of dout (per channel), dinp = gamma / sqrt(var +
    /// EPSILON) (dout - dbeta / rows - xhat dgamma / rows), where xhat is the forward's normalised
    /// input (from inp and stats) and dout the gradient before the ReLU; no dinp for a first
    /// layer.
    Backward {
        dinp: Option<TensorId>,
        dout: TensorId,
        inp: TensorId,
        gamma: TensorId,
        stats: TensorId,
        dgamma: TensorId,
        dbeta: TensorId,
    },
}
