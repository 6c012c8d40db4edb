//! The CPU backends' max pooling, and a first convolution fused with the 2 x 2 pool after it.
//!
//! Contract: `pool` runs `reference`'s loops or `maxpool`'s, which give the same bits. On the
//! fast path with AVX-512, a first layer straight from the pixels and its pool run as one op each
//! way (`conv_pool`, `pool_weight_gradient`) under one rule (`fuses_first_layer`): forward, the
//! pool's output and each window's choice, the layer's output never stored; backward, the
//! weight and bias gradients from the pool's gradient and those choices. Each gives the bits of
//! the two ops it replaces (`ops::run_unfused`), which run wherever the rule does not hold.

use super::conv::{GradientFrom, WeightGradients};
use super::kernels::direct_conv::{self, ConvOperands};
use super::kernels::maxpool;
use super::{CpuBackend, CpuKind, PoolCodes};
use crate::backend::ops::{
    run_unfused, ConvGeometry, ConvPool, MatmulKind, Op, Pool, PoolKind, PoolShape, PoolWeightGradient, StepAt,
};
use crate::backend::reference as r;
use crate::error::{Error, Result};

impl CpuBackend {
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
                    CpuKind::Fast => maxpool::maxpool_forward(o, i[0], &s),
                },
            ),
            PoolKind::Backward { dinp, dout, inp, relu } => {
                let inputs = [(dout, s.out_len()), (inp, s.in_len())];
                self.with_out("max pool backward", (dinp, s.in_len()), &inputs, |o, i| match kind {
                    CpuKind::Reference => r::maxpool_backward(o, i[0], i[1], &s, relu),
                    CpuKind::Fast => maxpool::maxpool_backward(o, i[0], i[1], &s, relu),
                })
            }
        }
    }

    /// Whether the fast path runs a first layer and the 2 x 2 pool after it as one op forward
    /// (`conv_pool`, the layer's output never stored) and backward (`pool_weight_gradient`):
    /// the same rule for both, so that a backward pass never looks for an output that was not
    /// stored.
    fn fuses_first_layer(&self, g: ConvGeometry, pool: &PoolShape, filters: usize) -> bool {
        self.direct(g)
            && self.direct_weights(g, filters)
            && (pool.images, pool.h, pool.w, pool.ch, pool.size) == (g.images, g.oh(), g.ow(), filters, 2)
            && 4 * pool.ow() * filters <= direct_conv::POOL_BAND_MAX
    }

    /// A first layer's forward product and its pool as one op (`direct_conv::forward_pool`): the pool's
    /// output and its choices, kept in `pool_codes` for the backward pass, without storing the
    /// layer's output; where `fuses_first_layer` does not hold, the two ops.
    pub(super) fn conv_pool(&mut self, f: &ConvPool, at: StepAt) -> Result<()> {
        let (
            MatmulKind::Forward {
                out: product,
                inp,
                weight,
                bias,
                relu: true,
            },
            Some(g),
            PoolKind::Forward {
                out: pooled,
                inp: pooled_from,
            },
        ) = (f.conv.kind, f.conv.conv, f.pool.kind)
        else {
            return run_unfused(self, &Op::ConvPool(*f), at);
        };
        let (pool, filters) = (f.pool.shape, f.conv.shape.outputs);
        if product != pooled_from || f.conv.shape != g.dense(filters) || !self.fuses_first_layer(g, &pool, filters) {
            return run_unfused(self, &Op::ConvPool(*f), at);
        }
        let slot = match self.pool_codes.iter().position(|c| c.product == product) {
            Some(slot) => slot,
            None => {
                self.pool_codes.push(PoolCodes {
                    product,
                    shape: pool,
                    version: 0,
                    codes: Vec::new(),
                });
                self.pool_codes.len() - 1
            }
        };
        let mut codes = std::mem::take(&mut self.pool_codes[slot].codes);
        if codes.len() < pool.out_len() {
            codes.resize(pool.out_len(), 0);
        }
        let inputs = [
            (inp, g.image_len()),
            (weight, g.patch() * filters),
            (bias.unwrap_or(weight), filters),
        ];
        let inputs = &inputs[..if bias.is_some() { 3 } else { 2 }];
        let op = "matmul forward + max pool forward";
        let result = self.with_out(op, (pooled, pool.out_len()), inputs, |o, i| {
            let operands = ConvOperands {
                inp: i[0],
                weight: i[1],
                bias: i.get(2).copied(),
            };
            direct_conv::forward_pool(o, &mut codes[..pool.out_len()], operands, true, &g, &pool, filters)
        });
        let kept = &mut self.pool_codes[slot];
        (kept.codes, kept.shape, kept.version) = (codes, pool, self.writes);
        result
    }

    /// A first layer's pool backward pass and weight gradient with its update as one op: the
    /// gradients straight from the pool's gradient (`kernels::direct_conv`) and its choices kept by `conv_pool`,
    /// or the layer's output where that was stored since; the layer's output gradient is never
    /// written. Where `fuses_first_layer` does not hold, the two ops.
    pub(super) fn pool_weight_gradient(&mut self, f: &PoolWeightGradient, at: StepAt) -> Result<()> {
        let op = "max pool backward + weight gradient";
        let (
            PoolKind::Backward {
                dinp,
                dout: dpool,
                inp: out,
                relu: true,
            },
            MatmulKind::BackwardWeight {
                dweight,
                dbias,
                inp,
                dout,
                update: Some(u),
            },
            Some(g),
        ) = (f.pool.kind, f.weight.kind, f.weight.conv)
        else {
            return run_unfused(self, &Op::PoolWeightGradient(*f), at);
        };
        let (pool, filters) = (f.pool.shape, f.weight.shape.outputs);
        let out_version = self.versions[self.view(op, out, pool.in_len())?.storage];
        let coded = self
            .pool_codes
            .iter()
            .position(|c| c.product == out && c.shape == pool && c.version >= out_version);
        if dout != dinp || f.weight.shape != g.dense(filters) || !self.fuses_first_layer(g, &pool, filters) {
            if coded.is_some() {
                let reason = "the layer's output was pooled without being stored".to_string();
                return Err(Error::shape(op, reason));
            }
            return run_unfused(self, &Op::PoolWeightGradient(*f), at);
        }
        let from = GradientFrom::Pool {
            dpool,
            pool,
            out,
            kept: coded,
        };
        self.direct_weight_gradient(op, WeightGradients { dweight, dbias }, inp, from, g, filters)?;
        for step in u.steps(f.weight.shape, dweight, dbias).into_iter().flatten() {
            crate::backend::Backend::run(self, &step, at)?;
        }
        Ok(())
    }
}
