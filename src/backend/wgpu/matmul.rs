//! Host side of matmul.wgsl: every product of a dense layer as one dispatch, with its epilogue
//! (bias, ReLU, ReLU-gradient mask), the bias gradient and the optimizer step fused in, and the
//! tilings the kernel is compiled with.
//!
//! Contract: `matmul` maps a `Matmul` op to the kernel's strides, checks every tensor's length,
//! that a fused update has its bias gradient, that no written buffer is also read (wgpu refuses a
//! buffer bound both ways in one dispatch) and that the grid fits the adapter, then records one
//! dispatch with the op's tiling (`tiles_for`).

use super::kernels::{expand_unrolls, fill_placeholders, Kernel};
use super::params::{matmul_flags, KernelParams, MatmulParams};
use super::{Bound, WgpuBackend};
use crate::backend::ops::{FusedUpdate, Matmul, MatmulKind, Op};
use crate::backend::TensorId;
use crate::error::{Error, Result};
use crate::optim::OptimizerKind;

/// The tiling of one matmul pipeline (see the contract of `shaders/matmul.wgsl`): a workgroup
/// computes a `tm` x `tn` tile of c with `s` slices of (tm/4) x (tn/4) threads splitting K in
/// chunks of `kc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileConfig {
    pub tm: u32,
    pub tn: u32,
    pub kc: u32,
    pub s: u32,
}

/// Workgroup memory the shader may use (WebGPU's guaranteed minimum, requested from the device).
pub const WORKGROUP_BYTES: u32 = 16384;
/// Threads per workgroup the shaders may use (WebGPU's guaranteed minimum).
pub const WORKGROUP_THREADS: u32 = 256;

impl TileConfig {
    /// The tiling for software adapters, whose workgroups run on CPU threads that pay for every
    /// barrier: one 64x64 slice per workgroup.
    pub const SOFTWARE: TileConfig = TileConfig {
        tm: 64,
        tn: 64,
        kc: 16,
        s: 1,
    };

    /// Parse "TM,TN,KC,S" (the `GPU_MNIST_MATMUL_TILES` tuning aid), checked like `new`.
    pub fn parse(text: &str) -> std::result::Result<TileConfig, String> {
        let v: Vec<u32> = text
            .split(',')
            .map(|p| p.trim().parse::<u32>().map_err(|_| format!("'{p}' is not a number")))
            .collect::<std::result::Result<_, _>>()?;
        match v[..] {
            [tm, tn, kc, s] => TileConfig::new(tm, tn, kc, s),
            _ => Err(format!("'{text}' is not TM,TN,KC,S")),
        }
    }

    /// A tiling the shader supports: tm, tn in {8, 16, 32, 64}, kc in {4, 8, 16, 32}, s in {1, 2,
    /// 4, 8, 16}, at most 256 threads and at least tn, whole copies per thread and at most 16 KiB of
    /// workgroup memory.
    pub fn new(tm: u32, tn: u32, kc: u32, s: u32) -> std::result::Result<TileConfig, String> {
        let cfg = TileConfig { tm, tn, kc, s };
        let pow2 = |v: u32, lo: u32, hi: u32| v.is_power_of_two() && (lo..=hi).contains(&v);
        if !(pow2(tm, 8, 64) && pow2(tn, 8, 64) && pow2(kc, 4, 32) && pow2(s, 1, 16)) {
            return Err(format!(
                "tiles {tm},{tn},{kc},{s}: need TM, TN in 8..64, KC in 4..32 (powers of 2), S in 1..16 (all powers of 2)"
            ));
        }
        // The column sums are finished by one thread a column: a workgroup needs TN threads or more.
        if tm * s < 16 {
            return Err(format!("tiles {tm},{tn},{kc},{s}: TM x S must be at least 16"));
        }
        let threads = cfg.threads_per_slice() * s;
        if threads > WORKGROUP_THREADS
            || !(tm * kc).is_multiple_of(cfg.threads_per_slice())
            || !(kc * tn).is_multiple_of(cfg.threads_per_slice())
        {
            return Err(format!(
                "tiles {tm},{tn},{kc},{s}: {threads} threads, or copies that do not divide evenly"
            ));
        }
        if cfg.smem_vec4s() * 16 > WORKGROUP_BYTES {
            return Err(format!(
                "tiles {tm},{tn},{kc},{s}: needs {} bytes of workgroup memory",
                cfg.smem_vec4s() * 16
            ));
        }
        Ok(cfg)
    }

    fn threads_per_slice(self) -> u32 {
        (self.tm / 4) * (self.tn / 4)
    }

    /// The shader's SMEM: the chunks of a and b of every slice, or the sums of every slice.
    fn smem_vec4s(self) -> u32 {
        let chunks = self.s * self.kc * (self.tm + self.tn);
        let sums = self.s * self.tm * self.tn;
        chunks.max(sums) / 4
    }

    /// The tiling for an (m, n, k) product on a hardware GPU, from a sweep of every tiling
    /// (benches/h200-2026-11-27.md):
    /// - n <= 16 (the output layer): 16x16 tiles, K in chunks of 8 spread over 16 slices (also when
    ///   K is short, so that an epoch's last, partial batch needs no pipeline of its own);
    /// - outputs of 256 or more 32x32 tiles (a weight gradient): 32x64 tiles, 2 slices;
    /// - smaller outputs: 16x32 tiles and 8 slices, which spread a long K over the workgroup and,
    ///   when K is short, share the epilogue among more threads.
    pub fn for_shape(m: usize, n: usize, k: usize) -> TileConfig {
        let chunks = |kc: usize| k.div_ceil(kc).max(1);
        let (tm, tn, kc, s) = if n <= 16 {
            (16, 16, 8, 16)
        } else if m.div_ceil(32) * n.div_ceil(32) >= 256 {
            (32, 64, 16, if chunks(16) >= 4 { 2 } else { 1 })
        } else {
            (16, 32, 8, 8)
        };
        // Every tiling above passes `new`; fall back to the plainest one if a change breaks that.
        TileConfig::new(tm, tn, kc, s).unwrap_or(TileConfig {
            tm: 32,
            tn: 32,
            kc: 16,
            s: 1,
        })
    }

    /// matmul.wgsl (`template`, its includes expanded) with this tiling's values in its
    /// placeholders and its `//!unroll` lines expanded.
    pub(super) fn source(self, template: &str) -> String {
        let t = self.threads_per_slice();
        let filled = fill_placeholders(
            template,
            &[
                ("TM", self.tm),
                ("TN", self.tn),
                ("KC", self.kc),
                ("S", self.s),
                ("SMEM", self.smem_vec4s()),
            ],
        );
        expand_unrolls(&filled, |name| match name {
            "LA" => Some(self.tm * self.kc / t),
            "LB" => Some(self.kc * self.tn / t),
            "KC" => Some(self.kc),
            "S" => Some(self.s),
            "E" => Some(self.tm * self.tn / (t * self.s)),
            _ => None,
        })
    }
}

/// One dispatch of matmul.wgsl: c (M, N) = epilogue(a @ b) through strides, and what it does
/// besides.
struct Call {
    c: TensorId,
    a: TensorId,
    b: TensorId,
    /// [m, n, k, a_row_stride, a_col_stride, b_row_stride, b_col_stride].
    dims: [usize; 7],
    /// Values needed in c, a and b.
    lens: [usize; 3],
    bias: Option<TensorId>,
    relu: bool,
    relu_mask: Option<TensorId>,
    /// (N): the column sums of b.
    colsum: Option<TensorId>,
    /// Treat c and colsum as the gradients of this weight (M, N) and bias (N) and step them.
    update: Option<FusedUpdate>,
}

impl WgpuBackend {
    /// Record one of a dense layer's products.
    pub(super) fn matmul(&mut self, mm: &Matmul) -> Result<()> {
        let (b, c, oc) = mm.shape.dims();
        let plain = |c_t, a, b_t, dims, lens| Call {
            c: c_t,
            a,
            b: b_t,
            dims,
            lens,
            bias: None,
            relu: false,
            relu_mask: None,
            colsum: None,
            update: None,
        };
        let call = match mm.kind {
            // out (B, OC) = epilogue(inp (B, C) @ weight (C, OC))
            MatmulKind::Forward {
                out,
                inp,
                weight,
                bias,
                relu,
            } => Call {
                bias,
                relu,
                ..plain(out, inp, weight, [b, oc, c, c, 1, oc, 1], [b * oc, b * c, c * oc])
            },
            // dinp (B, C) = epilogue(dout (B, OC) @ weight^T); weight^T (OC, C) read with strides (1, OC)
            MatmulKind::BackwardInput {
                dinp,
                dout,
                weight,
                relu_mask,
            } => Call {
                relu_mask,
                ..plain(dinp, dout, weight, [b, c, oc, oc, 1, 1, oc], [b * c, b * oc, c * oc])
            },
            // dweight (C, OC) = inp^T @ dout; inp^T (C, B) read with strides (1, C); dbias (OC) =
            // column sums of dout, from the same tiles of dout; then the optimizer step of both
            MatmulKind::BackwardWeight {
                dweight,
                dbias,
                inp,
                dout,
                update,
            } => Call {
                colsum: dbias,
                update,
                ..plain(dweight, inp, dout, [c, oc, b, 1, c, oc, 1], [c * oc, b * c, b * oc])
            },
        };
        self.record_matmul(Op::Matmul(*mm).name(), &call)
    }

    fn record_matmul(&mut self, op: &'static str, call: &Call) -> Result<()> {
        self.check_matmul(op, call)?;
        let params = self.matmul_params(op, call)?;
        let (m, n) = (call.dims[0], call.dims[1]);
        let tiles = self.tiles_for(m, n, call.dims[2]);
        let grid = (
            n.div_ceil(tiles.tn as usize) as u32,
            m.div_ceil(tiles.tm as usize) as u32,
            1,
        );
        if grid.0 > self.max_groups() || grid.1 > self.max_groups() {
            return Err(Error::shape(
                op,
                format!("{m}x{n} output needs more workgroups than the adapter allows"),
            ));
        }
        let velocity = call
            .update
            .filter(|u| u.opt.kind == OptimizerKind::RmsProp)
            .map_or(Bound::DummyOut, |u| Bound::BufferOf(u.weight.velocity));
        let bind = [
            (1, Bound::Tensor(call.a)),
            (2, Bound::Tensor(call.b)),
            (3, Bound::Tensor(call.c)),
            (4, call.bias.map_or(Bound::Dummy, Bound::Tensor)),
            (5, call.relu_mask.map_or(Bound::Dummy, Bound::Tensor)),
            (6, call.colsum.map_or(Bound::DummyOut, Bound::Tensor)),
            (
                7,
                call.update.map_or(Bound::DummyOut, |u| Bound::BufferOf(u.weight.value)),
            ),
            (8, velocity),
        ];
        self.record(Kernel::Matmul(tiles), params.words(), &bind, grid)
    }

    /// Every tensor long enough, a fused update with its bias gradient, and every written buffer
    /// apart from every buffer read.
    fn check_matmul(&self, op: &'static str, call: &Call) -> Result<()> {
        let (m, n) = (call.dims[0], call.dims[1]);
        for (t, len) in [call.c, call.a, call.b].into_iter().zip(call.lens) {
            self.tensor(op, t, len)?;
            Self::u32_of(op, "a tensor length", len)?;
        }
        for (t, len) in [(call.bias, n), (call.relu_mask, m * n), (call.colsum, n)] {
            if let Some(t) = t {
                self.tensor(op, t, len)?;
            }
        }
        if call.update.is_some() && call.colsum.is_none() {
            return Err(Error::shape(op, "a fused update needs the bias gradient".to_string()));
        }
        let read = [Some(call.b), call.bias, call.relu_mask, Some(call.a)];
        let velocity = call
            .update
            .and_then(|u| (u.opt.kind == OptimizerKind::RmsProp).then_some(u.weight.velocity));
        let written = [Some(call.c), call.colsum, call.update.map(|u| u.weight.value), velocity];
        for w in written.into_iter().flatten() {
            for r in read.into_iter().flatten() {
                self.distinct(op, &[w, r])?;
            }
        }
        Ok(())
    }

    /// The kernel's parameter block for `call`.
    fn matmul_params(&self, op: &'static str, call: &Call) -> Result<MatmulParams> {
        let d = |i: usize| Self::u32_of(op, "a dimension", call.dims[i]);
        let mut flags = 0;
        for (on, flag) in [
            (call.bias.is_some(), matmul_flags::ADD_BIAS),
            (call.relu, matmul_flags::RELU),
            (call.relu_mask.is_some(), matmul_flags::MASK),
            (call.colsum.is_some(), matmul_flags::COLSUM),
        ] {
            if on {
                flags |= flag;
            }
        }
        let mut params = MatmulParams {
            m: d(0)?,
            n: d(1)?,
            k: d(2)?,
            a_row_stride: d(3)?,
            a_col_stride: d(4)?,
            b_row_stride: d(5)?,
            b_col_stride: d(6)?,
            flags,
            ..MatmulParams::default()
        };
        if let Some(u) = call.update {
            let step = self.step_words(op, (u.weight, u.bias), (call.dims[0], call.dims[1]), &u.opt)?;
            params.flags |= step.flags;
            (params.lr, params.rho, params.eps) = (step.lr, step.rho, step.eps);
            [params.w_value, params.b_value] = step.value;
            [params.w_velocity, params.b_velocity] = step.velocity;
        }
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::TileConfig;

    #[test]
    fn tilings_follow_the_sweep() {
        let t = |m, n, k| {
            let c = TileConfig::for_shape(m, n, k);
            (c.tm, c.tn, c.kc, c.s)
        };
        assert_eq!(t(128, 512, 784), (16, 32, 8, 8)); // layer 1 forward
        assert_eq!(t(784, 512, 128), (32, 64, 16, 2)); // layer 1 weight gradient
        assert_eq!(t(128, 10, 512), (16, 16, 8, 16)); // layer 2 forward
        assert_eq!(t(512, 10, 128), (16, 16, 8, 16)); // layer 2 weight gradient
        assert_eq!(t(128, 512, 10), (16, 32, 8, 8)); // layer 2 input gradient
        let s = TileConfig::SOFTWARE;
        assert!(TileConfig::new(s.tm, s.tn, s.kc, s.s).is_ok());
        // Too few threads to finish every column's sum.
        assert!(TileConfig::new(8, 8, 4, 1).is_err());
        assert!(TileConfig::new(8, 64, 8, 1).is_err());
        // The last partial batch of an epoch (96 rows) gets the tilings of a full one.
        assert_eq!(t(512, 10, 96), t(512, 10, 128));
        assert_eq!(t(784, 512, 96), t(784, 512, 128));
        assert_eq!(t(96, 512, 784), t(128, 512, 784));
        for m in [1, 7, 100, 5000] {
            for n in [1, 10, 17, 600] {
                for k in [1, 9, 300, 70000] {
                    let c = TileConfig::for_shape(m, n, k);
                    assert!(TileConfig::new(c.tm, c.tn, c.kc, c.s).is_ok(), "{m}x{n}x{k}: {c:?}");
                }
            }
        }
    }
}
