//! The CPU reference: plain loops for every op of the training step. This is the specification
//! that every other backend (the wgpu kernels, the fast CPU path) is tested against.
//!
//! Conventions (after llm.c): outputs first in the argument list, gradients prefixed `d`, shapes in
//! comments, row-major storage. A dense layer's weight is (C, OC), as in Keras, so the forward
//! product is `out = inp @ weight`. Functions are generic over `Real` so that the gradient check
//! runs the very same code in f64. Every function assigns its outputs (never accumulates), except
//! `bias_add_forward`, which adds in place.

mod layers;

pub use layers::*;

use super::ops::{ConvGeometry, PoolShape};
use crate::optim::{Optimizer, OptimizerKind, StepScalars};
use std::ops::{Add, Div, Mul, Neg, Sub};

/// The float operations the reference needs (implemented for f32 and f64).
pub trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + std::fmt::Debug
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// x (rows, 784) = images[order[start + r]] / 255, for r in 0..rows.
/// images is (N, 784) u8; order is a permutation of 0..N.
pub fn gather_batch<T: Real>(x: &mut [T], images: &[u8], order: &[u32], start: usize, rows: usize, pixels: usize) {
    let scale = T::from_f64(1.0 / 255.0);
    for r in 0..rows {
        let src = order[start + r] as usize * pixels;
        for p in 0..pixels {
            x[r * pixels + p] = T::from_f64(images[src + p] as f64) * scale;
        }
    }
}

/// labels_out (rows,) = labels[order[start + r]].
pub fn gather_labels(labels_out: &mut [u8], labels: &[u8], order: &[u32], start: usize, rows: usize) {
    for r in 0..rows {
        labels_out[r] = labels[order[start + r] as usize];
    }
}

/// out (B, OC) = inp (B, C) @ weight (C, OC).
pub fn matmul_forward<T: Real>(out: &mut [T], inp: &[T], weight: &[T], b: usize, c: usize, oc: usize) {
    for row in 0..b {
        for o in 0..oc {
            let mut acc = T::ZERO;
            for i in 0..c {
                acc = acc + inp[row * c + i] * weight[i * oc + o];
            }
            out[row * oc + o] = acc;
        }
    }
}

/// dinp (B, C) = dout (B, OC) @ weight^T, where weight is (C, OC).
pub fn matmul_backward_input<T: Real>(dinp: &mut [T], dout: &[T], weight: &[T], b: usize, c: usize, oc: usize) {
    for row in 0..b {
        for i in 0..c {
            let mut acc = T::ZERO;
            for o in 0..oc {
                acc = acc + dout[row * oc + o] * weight[i * oc + o];
            }
            dinp[row * c + i] = acc;
        }
    }
}

/// dweight (C, OC) = inp^T @ dout, where inp is (B, C) and dout is (B, OC).
pub fn matmul_backward_weight<T: Real>(dweight: &mut [T], inp: &[T], dout: &[T], b: usize, c: usize, oc: usize) {
    for i in 0..c {
        for o in 0..oc {
            let mut acc = T::ZERO;
            for row in 0..b {
                acc = acc + inp[row * c + i] * dout[row * oc + o];
            }
            dweight[i * oc + o] = acc;
        }
    }
}

/// out (B, OC) += bias (OC), broadcast over rows.
pub fn bias_add_forward<T: Real>(out: &mut [T], bias: &[T], b: usize, oc: usize) {
    for row in 0..b {
        for o in 0..oc {
            out[row * oc + o] = out[row * oc + o] + bias[o];
        }
    }
}

/// The fused epilogue of a matmul, on out (B, N): += bias (N) when given, then max(., 0) when
/// `relu`, then 0 where relu_mask (B, N) <= 0 when given.
pub fn matmul_epilogue<T: Real>(
    out: &mut [T],
    bias: Option<&[T]>,
    relu: bool,
    relu_mask: Option<&[T]>,
    b: usize,
    n: usize,
) {
    if let Some(bias) = bias {
        bias_add_forward(out, bias, b, n);
    }
    if relu {
        for x in out[..b * n].iter_mut() {
            *x = if *x > T::ZERO { *x } else { T::ZERO };
        }
    }
    if let Some(mask) = relu_mask {
        for (x, &m) in out[..b * n].iter_mut().zip(mask) {
            // Zero unless m > 0 (so a NaN mask zeroes too, as in relu_backward).
            if m.partial_cmp(&T::ZERO) != Some(std::cmp::Ordering::Greater) {
                *x = T::ZERO;
            }
        }
    }
}

/// dbias (OC) = column sums of dout (B, OC).
pub fn bias_backward<T: Real>(dbias: &mut [T], dout: &[T], b: usize, oc: usize) {
    for o in 0..oc {
        let mut acc = T::ZERO;
        for row in 0..b {
            acc = acc + dout[row * oc + o];
        }
        dbias[o] = acc;
    }
}

/// out (N) = max(inp, 0).
pub fn relu_forward<T: Real>(out: &mut [T], inp: &[T]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = if x > T::ZERO { x } else { T::ZERO };
    }
}

/// dinp (N) = dout where the relu's output was positive, else 0.
pub fn relu_backward<T: Real>(dinp: &mut [T], dout: &[T], out: &[T]) {
    for ((d, &g), &y) in dinp.iter_mut().zip(dout).zip(out) {
        *d = if y > T::ZERO { g } else { T::ZERO };
    }
}

/// probs (B, V) = softmax(logits (B, V)) per row; losses (B) = -log probs[label].
/// The loss is computed as logsumexp - logit[label] (stable for large logits).
pub fn softmax_xent_forward<T: Real>(
    probs: &mut [T],
    losses: &mut [T],
    logits: &[T],
    labels: &[u8],
    b: usize,
    v: usize,
) {
    for row in 0..b {
        let l = &logits[row * v..(row + 1) * v];
        let mut max = l[0];
        for &x in l {
            if x > max {
                max = x;
            }
        }
        let mut sum = T::ZERO;
        for (p, &x) in probs[row * v..(row + 1) * v].iter_mut().zip(l) {
            *p = (x - max).exp();
            sum = sum + *p;
        }
        for p in &mut probs[row * v..(row + 1) * v] {
            *p = *p / sum;
        }
        let label = labels[row] as usize;
        losses[row] = sum.ln() - (l[label] - max);
    }
}

/// dlogits (B, V) = (probs - onehot(labels)) / B: the gradient of the batch-mean loss.
pub fn softmax_xent_backward<T: Real>(dlogits: &mut [T], probs: &[T], labels: &[u8], b: usize, v: usize) {
    let inv_b = T::ONE / T::from_f64(b as f64);
    for row in 0..b {
        for j in 0..v {
            let onehot = if j == labels[row] as usize { T::ONE } else { T::ZERO };
            dlogits[row * v + j] = (probs[row * v + j] - onehot) * inv_b;
        }
    }
}

/// The predicted class of each row of probs or logits (B, V): the first index of the maximum.
pub fn argmax_rows<T: Real>(pred: &mut [u8], scores: &[T], b: usize, v: usize) {
    for row in 0..b {
        let s = &scores[row * v..(row + 1) * v];
        let mut best = 0;
        for j in 1..v {
            if s[j] > s[best] {
                best = j;
            }
        }
        pred[row] = best as u8;
    }
}

/// Keras's RMSprop step of one value, the one place its formula is written in Rust (every CPU
/// path calls it, so their updates are bit-identical): v = rho v + (1 - rho) g^2;
/// param -= lr g / sqrt(v + eps).
#[inline(always)]
pub fn rmsprop_one<T: Real>(param: &mut T, velocity: &mut T, g: T, lr: T, rho: T, eps: T) {
    *velocity = rho * *velocity + (T::ONE - rho) * g * g;
    *param = *param - lr * g / (*velocity + eps).sqrt();
}

/// Plain SGD's step of one value: param -= lr g.
#[inline(always)]
pub fn sgd_one<T: Real>(param: &mut T, g: T, lr: T) {
    *param = *param - lr * g;
}

/// One optimizer step's hyper-parameters and step scalars (`optim::StepScalars`) in `T`.
#[derive(Debug, Clone, Copy)]
pub struct OptimizerStep<T> {
    pub kind: OptimizerKind,
    pub lr: T,
    pub rho: T,
    pub eps: T,
    pub beta1: T,
    pub beta2: T,
    pub momentum: T,
    pub nesterov: bool,
    /// L2: l2 p is added to the gradient first (0: none).
    pub l2: T,
    pub adam_step: T,
    pub adam_norm: T,
    pub decay: T,
}

impl<T: Real> OptimizerStep<T> {
    /// The step of `opt` whose scalars (rate, bias corrections) are `s`.
    pub fn new(opt: &Optimizer, s: StepScalars) -> Self {
        let t = |x: f32| T::from_f64(x as f64);
        OptimizerStep {
            kind: opt.kind,
            lr: t(s.lr),
            rho: t(opt.rho),
            eps: t(opt.eps),
            beta1: t(opt.beta1),
            beta2: t(opt.beta2),
            momentum: t(opt.momentum),
            nesterov: opt.nesterov,
            l2: t(opt.l2()),
            adam_step: t(s.adam_step),
            adam_norm: t(s.adam_norm),
            decay: t(s.decay),
        }
    }
}

/// Every optimizer's step of one value, the one place the formulas are written in Rust (every
/// CPU path calls it; shaders/optimizer.wgsl is the same sequence of f32 operations). `velocity`
/// is the second moment (RMSprop, Adam), `momentum` the first (SGD's momentum buffer, Adam's m);
/// an optimizer leaves the one it does not use untouched.
///
/// - L2 (all but AdamW, when l2 > 0): g += l2 p
/// - RMSprop (Keras): v = rho v + (1 - rho) g^2; p -= lr g / sqrt(v + eps)
/// - SGD (PyTorch): p -= lr g; with momentum mu: m = mu m + g, p -= lr m (Nesterov: lr (g + mu m))
/// - Adam (PyTorch), AdamW: p -= decay p (AdamW: lr wd; Adam: 0); m = b1 m + (1 - b1) g;
///   v = b2 v + (1 - b2) g^2; p -= adam_step m / (sqrt(v) adam_norm + eps), where
///   adam_step = lr / (1 - b1^t) and adam_norm = 1 / sqrt(1 - b2^t) at step t (from 1).
#[inline(always)]
pub fn optimizer_one<T: Real>(param: &mut T, velocity: &mut T, momentum: &mut T, g: T, k: &OptimizerStep<T>) {
    let g = if k.l2 != T::ZERO { g + k.l2 * *param } else { g };
    match k.kind {
        OptimizerKind::RmsProp => rmsprop_one(param, velocity, g, k.lr, k.rho, k.eps),
        OptimizerKind::Sgd if k.momentum == T::ZERO => sgd_one(param, g, k.lr),
        OptimizerKind::Sgd => {
            *momentum = k.momentum * *momentum + g;
            let d = if k.nesterov {
                g + k.momentum * *momentum
            } else {
                *momentum
            };
            *param = *param - k.lr * d;
        }
        OptimizerKind::Adam | OptimizerKind::AdamW => {
            *param = *param - k.decay * *param;
            *momentum = k.beta1 * *momentum + (T::ONE - k.beta1) * g;
            *velocity = k.beta2 * *velocity + (T::ONE - k.beta2) * g * g;
            *param = *param - k.adam_step * *momentum / (velocity.sqrt() * k.adam_norm + k.eps);
        }
    }
}

/// `optimizer_one` on every value.
pub fn optimizer_update<T: Real>(
    param: &mut [T],
    velocity: &mut [T],
    momentum: &mut [T],
    grad: &[T],
    k: &OptimizerStep<T>,
) {
    let values = param.iter_mut().zip(velocity.iter_mut()).zip(momentum.iter_mut());
    for (((p, v), m), &g) in values.zip(grad) {
        optimizer_one(p, v, m, g, k);
    }
}

/// RMSprop on every value (`rmsprop_one`).
pub fn rmsprop_update<T: Real>(param: &mut [T], velocity: &mut [T], grad: &[T], lr: T, rho: T, eps: T) {
    for ((p, v), &g) in param.iter_mut().zip(velocity.iter_mut()).zip(grad) {
        rmsprop_one(p, v, g, lr, rho, eps);
    }
}

/// Plain SGD on every value (`sgd_one`).
pub fn sgd_update<T: Real>(param: &mut [T], grad: &[T], lr: T) {
    for (p, &g) in param.iter_mut().zip(grad) {
        sgd_one(p, g, lr);
    }
}

/// cols (pixels, patch) = the patch of every output pixel of `g` (im2col): cols[row * patch + kk]
/// = inp[g.source(row, kk)], or 0 over the padding. inp is (images, h, w, in_ch).
pub fn im2col<T: Real>(cols: &mut [T], inp: &[T], g: &ConvGeometry) {
    let patch = g.patch();
    for row in 0..g.pixels() {
        for kk in 0..patch {
            cols[row * patch + kk] = match g.source(row, kk) {
                Some(i) => inp[i],
                None => T::ZERO,
            };
        }
    }
}

/// dinp (images, h, w, in_ch) = every value of dcols (pixels, patch) summed into the input value
/// it was copied from by `im2col` (col2im); values over the padding are dropped. dinp is zeroed
/// first, then the sums run in row order, then kk order (the order every CPU path keeps).
pub fn col2im<T: Real>(dinp: &mut [T], dcols: &[T], g: &ConvGeometry) {
    let patch = g.patch();
    dinp[..g.image_len()].fill(T::ZERO);
    for row in 0..g.pixels() {
        for kk in 0..patch {
            if let Some(i) = g.source(row, kk) {
                dinp[i] = dinp[i] + dcols[row * patch + kk];
            }
        }
    }
}

/// out (pixels, out_ch) = im2col(inp) (pixels, patch) @ weight (patch, out_ch), where weight is
/// Keras's (kh, kw, in_ch, out_ch) kernel and out is (images, oh, ow, out_ch).
pub fn conv2d_forward<T: Real>(out: &mut [T], inp: &[T], weight: &[T], g: &ConvGeometry, out_ch: usize) {
    let mut cols = vec![T::ZERO; g.pixels() * g.patch()];
    im2col(&mut cols, inp, g);
    matmul_forward(out, &cols, weight, g.pixels(), g.patch(), out_ch);
}

/// dinp (images, h, w, in_ch) = col2im(dout (pixels, out_ch) @ weight^T), weight (patch, out_ch).
pub fn conv2d_backward_input<T: Real>(dinp: &mut [T], dout: &[T], weight: &[T], g: &ConvGeometry, out_ch: usize) {
    let mut dcols = vec![T::ZERO; g.pixels() * g.patch()];
    matmul_backward_input(&mut dcols, dout, weight, g.pixels(), g.patch(), out_ch);
    col2im(dinp, &dcols, g);
}

/// dweight (patch, out_ch) = im2col(inp)^T @ dout (pixels, out_ch).
pub fn conv2d_backward_weight<T: Real>(dweight: &mut [T], inp: &[T], dout: &[T], g: &ConvGeometry, out_ch: usize) {
    let mut cols = vec![T::ZERO; g.pixels() * g.patch()];
    im2col(&mut cols, inp, g);
    matmul_backward_weight(dweight, &cols, dout, g.pixels(), g.patch(), out_ch);
}

/// The input index of the first maximum of window (b, oy, ox) in channel c of inp (images, h, w,
/// ch): the window's values are visited in row-major order (ky, then kx) and the best is replaced
/// only by a strictly greater value (so a tie keeps the first, and a NaN first value stays).
fn pool_argmax<T: Real>(inp: &[T], p: &PoolShape, (b, oy, ox, c): (usize, usize, usize, usize)) -> usize {
    let s = p.size.max(1);
    let at = |y: usize, x: usize| ((b * p.h + y) * p.w + x) * p.ch + c;
    let mut best = at(oy * s, ox * s);
    for ky in 0..s {
        for kx in 0..s {
            let i = at(oy * s + ky, ox * s + kx);
            if inp[i] > inp[best] {
                best = i;
            }
        }
    }
    best
}

/// out (images, oh, ow, ch) = the maximum of each size x size window of inp (images, h, w, ch)
/// (its first maximum, see `pool_argmax`); partial windows at the right and bottom are dropped.
pub fn maxpool_forward<T: Real>(out: &mut [T], inp: &[T], p: &PoolShape) {
    let (oh, ow) = (p.oh(), p.ow());
    for b in 0..p.images {
        for oy in 0..oh {
            for ox in 0..ow {
                for c in 0..p.ch {
                    out[((b * oh + oy) * ow + ox) * p.ch + c] = inp[pool_argmax(inp, p, (b, oy, ox, c))];
                }
            }
        }
    }
}

/// dinp (images, h, w, ch) = zero, except at each window's first maximum of inp (the forward
/// input), which is assigned its output's gradient dout (images, oh, ow, ch); with `relu` it is
/// left 0 there too where that inp value is not > 0 (a ReLU before the pool, seen from its
/// output). Inputs in dropped edge rows and columns get 0.
pub fn maxpool_backward<T: Real>(dinp: &mut [T], dout: &[T], inp: &[T], p: &PoolShape, relu: bool) {
    let (oh, ow) = (p.oh(), p.ow());
    dinp[..p.in_len()].fill(T::ZERO);
    for b in 0..p.images {
        for oy in 0..oh {
            for ox in 0..ow {
                for c in 0..p.ch {
                    let i = pool_argmax(inp, p, (b, oy, ox, c));
                    if !relu || inp[i] > T::ZERO {
                        dinp[i] = dout[((b * oh + oy) * ow + ox) * p.ch + c];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
