//! The reference of batch normalisation, dropout and the augmented gather: plain loops, generic over `Real` so that
//! the gradient check runs them in f64 (`reference` conventions: outputs first, gradients
//! prefixed `d`, row-major (rows, channels) with the channel last).
//!
//! Sums over a channel are taken in f64 in row order whatever `T` is, so that the f32 reference
//! is as close to exact as the statistics allow; every per-value formula is one fixed sequence
//! of `T` operations, which the fast CPU path repeats.

use super::Real;
use crate::backend::ops::augment::{self, Augment};
use crate::backend::ops::dropout;

/// Whether v > 0 (false for a NaN, so that a ReLU zeroes it).
#[inline(always)]
fn positive<T: Real>(v: T) -> bool {
    v.partial_cmp(&T::ZERO) == Some(std::cmp::Ordering::Greater)
}

/// mean (C) and var (C), the biased variance, of x (rows, C): two passes, the second over
/// (x - mean)^2.
pub fn batchnorm_stats<T: Real>(mean: &mut [T], var: &mut [T], x: &[T], rows: usize, c: usize) {
    let mut sums = vec![0.0f64; c];
    for row in x[..rows * c].chunks_exact(c) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v.to_f64();
        }
    }
    for (m, s) in mean.iter_mut().zip(&sums) {
        *m = T::from_f64(s / rows as f64);
    }
    sums.fill(0.0);
    for row in x[..rows * c].chunks_exact(c) {
        for ((s, &v), &m) in sums.iter_mut().zip(row).zip(mean.iter()) {
            let d = (v - m).to_f64();
            *s += d * d;
        }
    }
    for (v, s) in var.iter_mut().zip(&sums) {
        *v = T::from_f64(s / rows as f64);
    }
}

/// 1 / sqrt(var + eps) of each channel.
pub fn batchnorm_invstd<T: Real>(invstd: &mut [T], var: &[T], eps: T) {
    for (i, &v) in invstd.iter_mut().zip(var) {
        *i = T::ONE / (v + eps).sqrt();
    }
}

/// moving (C) = moving momentum + batch (1 - momentum): a moving average's step.
pub fn batchnorm_moving<T: Real>(moving: &mut [T], batch: &[T], momentum: T) {
    for (m, &b) in moving.iter_mut().zip(batch) {
        *m = *m * momentum + b * (T::ONE - momentum);
    }
}

/// One value of the forward pass: gamma ((x - mean) invstd) + beta, then max(., 0) with `relu`.
#[inline(always)]
pub fn batchnorm_one<T: Real>(x: T, gamma: T, beta: T, mean: T, invstd: T, relu: bool) -> T {
    let y = gamma * ((x - mean) * invstd) + beta;
    if relu && !positive(y) {
        T::ZERO
    } else {
        y
    }
}

/// out (rows, C) = batchnorm_one of every value of x (rows, C) with its channel's numbers.
pub fn batchnorm_forward<T: Real>(
    out: &mut [T],
    x: &[T],
    (gamma, beta): (&[T], &[T]),
    (mean, invstd): (&[T], &[T]),
    rows: usize,
    relu: bool,
) {
    let c = gamma.len();
    for (o_row, x_row) in out[..rows * c].chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for ch in 0..c {
            o_row[ch] = batchnorm_one(x_row[ch], gamma[ch], beta[ch], mean[ch], invstd[ch], relu);
        }
    }
}

/// dgamma (C) = sum over rows of dy xhat and dbeta (C) = sum of dy, where xhat = (x - mean)
/// invstd (sums in f64).
pub fn batchnorm_backward_params<T: Real>(
    (dgamma, dbeta): (&mut [T], &mut [T]),
    dy: &[T],
    x: &[T],
    (mean, invstd): (&[T], &[T]),
    rows: usize,
) {
    let c = mean.len();
    let (mut sg, mut sb) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (dy_row, x_row) in dy[..rows * c].chunks_exact(c).zip(x.chunks_exact(c)) {
        for ch in 0..c {
            let xhat = (x_row[ch] - mean[ch]) * invstd[ch];
            sg[ch] += (dy_row[ch] * xhat).to_f64();
            sb[ch] += dy_row[ch].to_f64();
        }
    }
    for ch in 0..c {
        dgamma[ch] = T::from_f64(sg[ch]);
        dbeta[ch] = T::from_f64(sb[ch]);
    }
}

/// One value of the input gradient: gamma invstd (dy - dbeta / n - xhat dgamma / n), where
/// n = rows; `mean_dbeta` = dbeta / n and `mean_dgamma` = dgamma / n.
#[inline(always)]
pub fn batchnorm_dx_one<T: Real>(dy: T, x: T, k: BatchNormChannel<T>) -> T {
    let xhat = (x - k.mean) * k.invstd;
    k.gamma * k.invstd * (dy - k.mean_dbeta - xhat * k.mean_dgamma)
}

/// A channel's numbers for `batchnorm_dx_one`.
#[derive(Debug, Clone, Copy)]
pub struct BatchNormChannel<T> {
    pub gamma: T,
    pub mean: T,
    pub invstd: T,
    pub mean_dbeta: T,
    pub mean_dgamma: T,
}

/// The channels' numbers of the input gradient, from the parameters' gradients of `rows` rows.
pub fn batchnorm_channels<T: Real>(
    gamma: &[T],
    (mean, invstd): (&[T], &[T]),
    (dgamma, dbeta): (&[T], &[T]),
    rows: usize,
) -> Vec<BatchNormChannel<T>> {
    let n = T::from_f64(rows as f64);
    (0..gamma.len())
        .map(|ch| BatchNormChannel {
            gamma: gamma[ch],
            mean: mean[ch],
            invstd: invstd[ch],
            mean_dbeta: dbeta[ch] / n,
            mean_dgamma: dgamma[ch] / n,
        })
        .collect()
}

/// dx (rows, C) = batchnorm_dx_one of every value.
pub fn batchnorm_backward_input<T: Real>(
    dx: &mut [T],
    dy: &[T],
    x: &[T],
    channels: &[BatchNormChannel<T>],
    rows: usize,
) {
    let c = channels.len();
    for ((d_row, dy_row), x_row) in dx[..rows * c]
        .chunks_exact_mut(c)
        .zip(dy.chunks_exact(c))
        .zip(x.chunks_exact(c))
    {
        for ch in 0..c {
            d_row[ch] = batchnorm_dx_one(dy_row[ch], x_row[ch], channels[ch]);
        }
    }
}

/// Whether value `i` survives the step whose key is `step_key` (`dropout::step_key`).
#[inline(always)]
pub fn dropout_keeps(step_key: u32, i: usize, threshold: u32) -> bool {
    dropout::mask_bits(step_key, i as u32) >= threshold
}

/// out (n) = inp x scale where the mask keeps the value, else 0 (and dropout's backward pass,
/// with dout for inp: the same mask, the same product). With `relu_mask`, also 0 where it is not
/// > 0.
pub fn dropout_apply<T: Real>(out: &mut [T], inp: &[T], relu_mask: Option<&[T]>, step_key: u32, rate: f32) {
    let (threshold, scale) = (dropout::threshold(rate), T::from_f64(dropout::scale(rate) as f64));
    for (i, (o, &x)) in out.iter_mut().zip(inp).enumerate() {
        let masked = relu_mask.is_some_and(|m| !positive(m[i]));
        *o = if !masked && dropout_keeps(step_key, i, threshold) {
            x * scale
        } else {
            T::ZERO
        };
    }
}

/// x (rows, 784) = image order[start + r] of `images` (N, 28 x 28 u8) under its transform of
/// step `step` (`ops::augment`): bilinear, zero outside, / 255.
pub fn gather_augmented(
    x: &mut [f32],
    images: &[u8],
    order: &[u32],
    (start, rows): (usize, usize),
    aug: &Augment,
    step: u32,
) {
    const SIDE: usize = 28;
    for r in 0..rows {
        let src = &images[order[start + r] as usize * SIDE * SIDE..][..SIDE * SIDE];
        let t = augment::transform(aug, step, r as u32);
        for oy in 0..SIDE {
            for ox in 0..SIDE {
                x[(r * SIDE + oy) * SIDE + ox] = augment::sample(&t, ox, oy, |sx, sy| src[sy * SIDE + sx]);
            }
        }
    }
}
