//! Host side of pool.wgsl: max pooling forward and backward on the device.
//!
//! Contract: `pool` checks every tensor's length against the op's `PoolShape`, that the written
//! tensor shares no buffer with a tensor read (wgpu refuses a buffer bound both ways in one
//! dispatch) and that every index fits 32 bits, then records one dispatch of one invocation per
//! output value (forward) or per input value (backward, which writes every input value's
//! gradient, zeros included). A window size of 0 pools 1 x 1 windows, as `PoolShape` and the
//! reference do.

use super::params::{pool_flags, KernelParams, PoolParams};
use super::pipelines::{grid_1d, Kernel};
use super::{Bound, WgpuBackend};
use crate::backend::ops::{Op, Pool, PoolKind};
use crate::error::Result;

/// The pipeline of a pooling op (what `kernel_of` compiles ahead and `pool` dispatches).
pub(super) fn kernel(p: &Pool) -> Kernel {
    match p.kind {
        PoolKind::Forward { .. } => Kernel::MaxPoolForward,
        PoolKind::Backward { .. } => Kernel::MaxPoolBackward,
    }
}

impl WgpuBackend {
    /// Max pooling forward (out = each window's first maximum) or backward (dinp = dout at each
    /// window's first maximum of inp, zero elsewhere).
    pub(super) fn pool(&mut self, p: &Pool) -> Result<()> {
        let op = Op::Pool(*p).name();
        let s = p.shape;
        let (in_len, out_len) = (s.in_len(), s.out_len());
        let v = |what: &str, v: usize| Self::u32_of(op, what, v);
        v("the input's length", in_len)?;
        v("the output's length", out_len)?;
        let mut params = PoolParams {
            count: 0,
            h: v("h", s.h)?,
            w: v("w", s.w)?,
            ch: v("channels", s.ch)?,
            size: v("the window size", s.size.max(1))?,
            oh: v("oh", s.oh())?,
            ow: v("ow", s.ow())?,
            flags: 0,
        };
        let (count, bind) = match p.kind {
            PoolKind::Forward { out, inp } => {
                self.tensor(op, out, out_len)?;
                self.tensor(op, inp, in_len)?;
                self.distinct(op, &[out, inp])?;
                let bind = vec![(1, Bound::Tensor(inp)), (3, Bound::Tensor(out))];
                (out_len, bind)
            }
            PoolKind::Backward { dinp, dout, inp, relu } => {
                self.tensor(op, dinp, in_len)?;
                self.tensor(op, dout, out_len)?;
                self.tensor(op, inp, in_len)?;
                self.distinct(op, &[dinp, dout, inp])?;
                if relu {
                    params.flags |= pool_flags::RELU_BEFORE;
                }
                let bind = vec![
                    (1, Bound::Tensor(inp)),
                    (2, Bound::Tensor(dout)),
                    (3, Bound::Tensor(dinp)),
                ];
                (in_len, bind)
            }
        };
        params.count = v("the invocations", count)?;
        let grid = grid_1d(count, self.max_groups());
        self.record(kernel(p), params.words(), &bind, grid)
    }
}
