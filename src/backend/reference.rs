//! The CPU reference: plain loops for every op of the training step. This is the specification
//! that every other backend (the wgpu kernels, the fast CPU path) is tested against.
//!
//! Conventions (after llm.c): outputs first in the argument list, gradients prefixed `d`, shapes in
//! comments, row-major storage. A dense layer's weight is (C, OC), as in Keras, so the forward
//! product is `out = inp @ weight`. Functions are generic over `Real` so that the gradient check
//! runs the very same code in f64. Every function assigns its outputs (never accumulates), except
//! `bias_add_forward`, which adds in place.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_known_values() {
        // (2,3) @ (3,2)
        let inp = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = [1.0f64, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut out = [0.0; 4];
        matmul_forward(&mut out, &inp, &w, 2, 3, 2);
        assert_eq!(out, [4.0, 5.0, 10.0, 11.0]);
        let mut probs = [0.0; 2];
        let mut loss = [0.0; 1];
        softmax_xent_forward(&mut probs, &mut loss, &[0.0f64, 0.0], &[1], 1, 2);
        assert!((probs[0] - 0.5).abs() < 1e-15 && (loss[0] - 2f64.ln()).abs() < 1e-15);
        let mut p = [1.0f64];
        let mut v = [0.0f64];
        rmsprop_update(&mut p, &mut v, &[2.0], 0.1, 0.9, 0.0);
        // v = 0.1 * 4 = 0.4; p = 1 - 0.1 * 2 / sqrt(0.4)
        assert!((p[0] - (1.0 - 0.2 / 0.4f64.sqrt())).abs() < 1e-15);
    }
}
