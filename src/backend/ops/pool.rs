//! Max pooling as an op: its shape and its two directions.

use super::TensorId;

/// Max pooling over non-overlapping size x size windows (stride = size, 'valid': a partial
/// window at the right or bottom edge is dropped) of a batch of h x w x ch images (NHWC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolShape {
    pub images: usize,
    pub h: usize,
    pub w: usize,
    pub ch: usize,
    pub size: usize,
}

impl PoolShape {
    pub fn oh(&self) -> usize {
        self.h / self.size.max(1)
    }
    pub fn ow(&self) -> usize {
        self.w / self.size.max(1)
    }
    pub fn in_len(&self) -> usize {
        self.images * self.h * self.w * self.ch
    }
    pub fn out_len(&self) -> usize {
        self.images * self.oh() * self.ow() * self.ch
    }
}

/// Max pooling, forward or backward. The maximum of a window is its first largest value in
/// row-major order (ky, then kx); the backward pass routes each output's gradient to that one
/// input, everywhere the same.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PoolKind {
    /// out (images, oh, ow, ch) = the maximum of each window of inp (images, h, w, ch).
    Forward { out: TensorId, inp: TensorId },
    /// dinp (images, h, w, ch) = dout at each window's maximum of `inp` (the forward input),
    /// zero elsewhere; with `relu`, also zero where inp <= 0 (the gradient of a ReLU before the
    /// pool, from its output).
    Backward {
        dinp: TensorId,
        dout: TensorId,
        inp: TensorId,
        relu: bool,
    },
}

/// A max-pooling op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pool {
    pub shape: PoolShape,
    pub kind: PoolKind,
}
