//! The CPU backends' convolutions and max pooling.
//!
//! Contract: a convolution's product runs as a dense product over an explicit patch matrix held
//! in one scratch tensor of the backend (grown to the largest layer once, then reused, so a step
//! allocates nothing): the forward product and the weight gradient multiply `im2col(inp)`, the
//! input gradient computes the patches' gradient and sums it back into the pixels (`col2im`),
//! then applies the previous ReLU's mask. Every dense product, its epilogue and a fused update
//! are then exactly the dense layer's (`products`). The reference runs `reference`'s loops, the
//! fast path `cpu_conv`'s, which give the same values bit for bit.

use super::{CpuBackend, CpuKind};
use crate::backend::cpu_conv;
use crate::backend::cpu_fast;
use crate::backend::ops::{ConvGeometry, Matmul, MatmulKind, Pool, PoolKind, StepAt};
use crate::backend::reference as r;
use crate::backend::TensorId;
use crate::error::{Error, Result};

impl CpuBackend {
    /// One of a convolution layer's products (`m.conv` is `Some(g)`).
    pub(super) fn conv(&mut self, m: &Matmul, g: ConvGeometry, at: StepAt) -> Result<()> {
        if g.dense(m.shape.outputs) != m.shape {
            let reason = format!(
                "product {:?} is not the convolution's {:?}",
                m.shape,
                g.dense(m.shape.outputs)
            );
            return Err(Error::shape("convolution", reason));
        }
        let cols = self.patch_scratch(g.pixels() * g.patch())?;
        let dense = |kind| Matmul {
            shape: m.shape,
            kind,
            conv: None,
        };
        match m.kind {
            MatmulKind::Forward { inp, .. } | MatmulKind::BackwardWeight { inp, .. } => {
                self.im2col(cols, inp, g)?;
                let kind = match m.kind {
                    MatmulKind::Forward {
                        out,
                        weight,
                        bias,
                        relu,
                        ..
                    } => MatmulKind::Forward {
                        out,
                        inp: cols,
                        weight,
                        bias,
                        relu,
                    },
                    MatmulKind::BackwardWeight {
                        dweight,
                        dbias,
                        dout,
                        update,
                        ..
                    } => MatmulKind::BackwardWeight {
                        dweight,
                        dbias,
                        inp: cols,
                        dout,
                        update,
                    },
                    other => other,
                };
                self.matmul(&dense(kind), at)
            }
            MatmulKind::BackwardInput {
                dinp,
                dout,
                weight,
                relu_mask,
            } => {
                let kind = MatmulKind::BackwardInput {
                    dinp: cols,
                    dout,
                    weight,
                    relu_mask: None,
                };
                self.matmul(&dense(kind), at)?;
                self.col2im(dinp, cols, relu_mask, g)
            }
        }
    }

    /// The backend's patch scratch tensor, at least `len` values (grown, never shrunk).
    fn patch_scratch(&mut self, len: usize) -> Result<TensorId> {
        match self.patches {
            Some(t) if self.tensors[t.0].len >= len => Ok(t),
            _ => {
                let t = crate::backend::Backend::alloc(self, len)?;
                self.patches = Some(t);
                Ok(t)
            }
        }
    }

    /// cols (pixels, patch) = the patches of the images in `inp`.
    fn im2col(&mut self, cols: TensorId, inp: TensorId, g: ConvGeometry) -> Result<()> {
        let kind = self.kind;
        self.with_out(
            "im2col",
            (cols, g.pixels() * g.patch()),
            &[(inp, g.image_len())],
            |o, i| match kind {
                CpuKind::Reference => r::im2col(o, i[0], &g),
                CpuKind::Fast => cpu_conv::im2col(o, i[0], &g),
            },
        )
    }

    /// dinp (the images) = the patches' gradients in `dcols` summed into their pixels, then zero
    /// where `relu_mask` (the images the ReLU gave) is not > 0.
    fn col2im(&mut self, dinp: TensorId, dcols: TensorId, relu_mask: Option<TensorId>, g: ConvGeometry) -> Result<()> {
        let kind = self.kind;
        let n = g.image_len();
        let inputs = [(dcols, g.pixels() * g.patch()), (relu_mask.unwrap_or(dcols), n)];
        let inputs = &inputs[..if relu_mask.is_some() { 2 } else { 1 }];
        self.with_out("col2im", (dinp, n), inputs, |o, i| {
            match kind {
                CpuKind::Reference => r::col2im(o, i[0], &g),
                CpuKind::Fast => cpu_conv::col2im(o, i[0], &g),
            }
            if let Some(mask) = i.get(1) {
                match kind {
                    CpuKind::Reference => r::matmul_epilogue(o, None, false, Some(mask), 1, n),
                    CpuKind::Fast => cpu_fast::matmul_epilogue(o, None, false, Some(mask), 1, n),
                }
            }
        })
    }

    /// Max pooling forward or backward.
    pub(super) fn pool(&mut self, p: &Pool) -> Result<()> {
        let (kind, s) = (self.kind, p.shape);
        match p.kind {
            PoolKind::Forward { out, inp } => self.with_out(
                "max pool forward",
                (out, s.out_len()),
                &[(inp, s.in_len())],
                |o, i| match kind {
                    CpuKind::Reference => r::maxpool_forward(o, i[0], &s),
                    CpuKind::Fast => cpu_conv::maxpool_forward(o, i[0], &s),
                },
            ),
            PoolKind::Backward { dinp, dout, inp, relu } => {
                let inputs = [(dout, s.out_len()), (inp, s.in_len())];
                self.with_out("max pool backward", (dinp, s.in_len()), &inputs, |o, i| match kind {
                    CpuKind::Reference => r::maxpool_backward(o, i[0], i[1], &s, relu),
                    CpuKind::Fast => cpu_conv::maxpool_backward(o, i[0], i[1], &s, relu),
                })
            }
        }
    }
}
