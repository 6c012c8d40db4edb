//! Host side of matmul.wgsl: every product of a dense or a convolution layer as one dispatch,
//! with its epilogue (bias, ReLU, ReLU-gradient mask), the bias gradient and the optimizer step
//! fused in.
//!
//! Contract: `matmul` maps a `Matmul` op to the kernel's operands: a dense product to strides
//! (the pipeline `Kernel::Matmul`), a convolution's to matmul.wgsl's implicit-GEMM operand maps
//! (`Kernel::Conv` with its `ConvProduct`, whose geometry travels in the parameter block after
//! the dense fields; the input image is never copied into patches, and the input gradient sums
//! each input value in place, so there is no scatter). It checks that a convolution's shape is
//! its geometry's, every tensor's length and that it fits 32-bit indices, that a fused update has
//! its bias gradient, that no written buffer is also read (wgpu refuses a buffer bound both ways
//! in one dispatch) and that the grid fits the adapter, then records one dispatch with the
//! tiling of the product it computes (`tiles_for`; for a convolution M, N, K are its output
//! pixels, out channels and patch, or for the input gradient its input pixels, in channels and
//! kh * kw * out channels). The tilings and operand maps a pipeline is compiled with are in
//! `tiling`.

use super::params::{matmul_flags, KernelParams, MatmulParams};
use super::pipelines::Kernel;
use super::tiling::{ConvProduct, TileConfig};
use super::{Bound, WgpuBackend};
use crate::backend::ops::{ConvGeometry, FusedUpdate, Matmul, MatmulKind, Op, StepAt};
use crate::backend::TensorId;
use crate::error::{Error, Result};

/// One dispatch of matmul.wgsl: c (M, N) = epilogue(a @ b) through strides or a convolution's
/// operand maps, and what it does besides.
struct Call {
    c: TensorId,
    a: TensorId,
    b: TensorId,
    /// [m, n, k, a_row_stride, a_col_stride, b_row_stride, b_col_stride] (a convolution's maps
    /// ignore the strides of the operands they read; those are 0).
    dims: [usize; 7],
    /// Values needed in c, a and b.
    lens: [usize; 3],
    bias: Option<TensorId>,
    relu: bool,
    /// (M, N), like c.
    relu_mask: Option<TensorId>,
    /// (N): the column sums of b.
    colsum: Option<TensorId>,
    /// Treat c and colsum as the gradients of this weight (M, N) and bias (N) and step them.
    update: Option<FusedUpdate>,
    /// For a convolution's product: which, its geometry and its output channels.
    conv: Option<(ConvProduct, ConvGeometry, usize)>,
}

impl Call {
    /// c = a @ b with nothing besides.
    fn plain((c, a, b): (TensorId, TensorId, TensorId), dims: [usize; 7], lens: [usize; 3]) -> Call {
        Call {
            c,
            a,
            b,
            dims,
            lens,
            bias: None,
            relu: false,
            relu_mask: None,
            colsum: None,
            update: None,
            conv: None,
        }
    }

    /// `mm`'s dispatch: a dense layer's product (`dense`) or a convolution's (`conv`).
    fn of(op: &'static str, mm: &Matmul) -> Result<Call> {
        match mm.conv {
            None => Ok(Call::dense(mm)),
            Some(g) => Call::conv(op, mm, g),
        }
    }

    /// A dense layer's product: a and b through strides.
    fn dense(mm: &Matmul) -> Call {
        let (b, c, oc) = mm.shape.dims();
        match mm.kind {
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
                ..Call::plain((out, inp, weight), [b, oc, c, c, 1, oc, 1], [b * oc, b * c, c * oc])
            },
            // dinp (B, C) = epilogue(dout (B, OC) @ weight^T); weight^T (OC, C) read with strides (1, OC)
            MatmulKind::BackwardInput {
                dinp,
                dout,
                weight,
                relu_mask,
            } => Call {
                relu_mask,
                ..Call::plain((dinp, dout, weight), [b, c, oc, oc, 1, 1, oc], [b * c, b * oc, c * oc])
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
                ..Call::plain((dweight, inp, dout), [c, oc, b, 1, c, oc, 1], [c * oc, b * c, b * oc])
            },
        }
    }

    /// A convolution's product (implicit GEMM, matmul.wgsl's operand maps) with the dense
    /// layer's epilogue, column sums and update: forward (pixels, out_ch, patch) and weight
    /// gradient (patch, out_ch, pixels) read the input image through the im2col map; the input
    /// gradient is the product (images*h*w, in_ch, kh*kw*out_ch) of dout's taps and the flipped
    /// kernel, whose c and mask are images.
    fn conv(op: &'static str, mm: &Matmul, g: ConvGeometry) -> Result<Call> {
        let (pixels, patch, oc) = mm.shape.dims();
        if pixels != g.pixels() || patch != g.patch() || g.kh == 0 || g.kw == 0 || g.in_ch == 0 {
            return Err(Error::shape(
                op,
                format!(
                    "product {pixels}x{patch}x{oc} does not fit the convolution of {} images {}x{}x{} with a {}x{} kernel, pad {}",
                    g.images, g.h, g.w, g.in_ch, g.kh, g.kw, g.pad
                ),
            ));
        }
        let (image, out_len, weight_len) = (g.image_len(), pixels * oc, patch * oc);
        let conv = |product| Some((product, g, oc));
        Ok(match mm.kind {
            MatmulKind::Forward {
                out,
                inp,
                weight,
                bias,
                relu,
            } => Call {
                bias,
                relu,
                conv: conv(ConvProduct::Forward),
                ..Call::plain(
                    (out, inp, weight),
                    [pixels, oc, patch, 0, 0, oc, 1],
                    [out_len, image, weight_len],
                )
            },
            MatmulKind::BackwardInput {
                dinp,
                dout,
                weight,
                relu_mask,
            } => {
                let dims = [g.images * g.h * g.w, g.in_ch, g.kh * g.kw * oc, 0, 0, 0, 0];
                Call {
                    relu_mask,
                    conv: conv(ConvProduct::BackwardInput),
                    ..Call::plain((dinp, dout, weight), dims, [image, out_len, weight_len])
                }
            }
            MatmulKind::BackwardWeight {
                dweight,
                dbias,
                inp,
                dout,
                update,
            } => Call {
                colsum: dbias,
                update,
                conv: conv(ConvProduct::BackwardWeight),
                ..Call::plain(
                    (dweight, inp, dout),
                    [patch, oc, pixels, 0, 0, oc, 1],
                    [weight_len, image, out_len],
                )
            },
        })
    }
}

impl WgpuBackend {
    /// The tiling of an (m, n, k) product: the override, else the tuned choice per shape on a
    /// hardware GPU, else (a software adapter: CPU threads run the workgroups, and each barrier
    /// costs them a switch) one 64x64 slice per workgroup.
    pub(super) fn tiles_for(&self, m: usize, n: usize, k: usize) -> TileConfig {
        match self.tiles_override {
            Some(t) => t,
            None if self.ctx.summary.is_hardware() => TileConfig::for_shape(m, n, k),
            None => TileConfig::SOFTWARE,
        }
    }

    /// Record one of a dense or a convolution layer's products (a fused update steps as step
    /// `at.step` of the run).
    pub(super) fn matmul(&mut self, mm: &Matmul, at: StepAt) -> Result<()> {
        let op = Op::Matmul(*mm).name();
        let call = Call::of(op, mm)?;
        let kernel = self.matmul_kernel(mm)?;
        self.check_matmul(op, &call)?;
        if let Some(u) = call.update {
            self.select_step(op, &u.opt, at)?;
        }
        self.record_matmul(op, &call, kernel, at.slot)
    }

    /// The pipeline `mm` runs: its operand maps and the tiling of the product it computes (for
    /// a convolution's input gradient not `mm.product()`, see `Call::conv`). `matmul` and
    /// `kernel_of` both take it from here, so that `prepare` compiles what runs.
    pub(super) fn matmul_kernel(&self, mm: &Matmul) -> Result<Kernel> {
        let call = Call::of(Op::Matmul(*mm).name(), mm)?;
        let tiles = self.tiles_for(call.dims[0], call.dims[1], call.dims[2]);
        Ok(match call.conv {
            None => Kernel::Matmul(tiles),
            Some((product, ..)) => Kernel::Conv(tiles, product),
        })
    }

    fn record_matmul(&mut self, op: &'static str, call: &Call, kernel: Kernel, slot: usize) -> Result<()> {
        let mut params = self.matmul_params(op, call)?;
        if call.update.is_some() {
            params.slot = Self::u32_of(op, "slot", slot)?;
        }
        let (m, n) = (call.dims[0], call.dims[1]);
        let (Kernel::Matmul(tiles) | Kernel::Conv(tiles, _)) = kernel else {
            return Err(Error::Gpu(format!("{op}: {} is not a matmul pipeline", kernel.label())));
        };
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
            .filter(|u| u.opt.kind.uses_velocity())
            .map_or(Bound::DummyOut, |u| Bound::BufferOf(u.weight.velocity));
        let momentum = call
            .update
            .filter(|u| u.opt.uses_momentum())
            .map_or(Bound::DummyOut, |u| Bound::BufferOf(u.weight.momentum));
        // Binding 4 holds whichever of the bias, the mask and the step table the dispatch uses
        // (`check_matmul` refuses two).
        let side = match (call.bias, call.relu_mask, call.update) {
            (Some(bias), ..) => Bound::Tensor(bias),
            (_, Some(mask), _) => Bound::Tensor(mask),
            (.., Some(_)) => Bound::StepTable,
            _ => Bound::Dummy,
        };
        let bind = [
            (1, Bound::Tensor(call.a)),
            (2, Bound::Tensor(call.b)),
            (3, Bound::Tensor(call.c)),
            (4, side),
            (5, call.colsum.map_or(Bound::DummyOut, Bound::Tensor)),
            (
                6,
                call.update.map_or(Bound::DummyOut, |u| Bound::BufferOf(u.weight.value)),
            ),
            (7, velocity),
            (8, momentum),
        ];
        self.record(kernel, params.words(), &bind, grid)
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
        let sides = [call.bias.is_some(), call.relu_mask.is_some(), call.update.is_some()];
        if sides.into_iter().filter(|&s| s).count() > 1 {
            return Err(Error::shape(
                op,
                "one product takes at most one of a bias, a mask and an update".to_string(),
            ));
        }
        let read = [Some(call.b), call.bias, call.relu_mask, Some(call.a)];
        let velocity = call
            .update
            .and_then(|u| u.opt.kind.uses_velocity().then_some(u.weight.velocity));
        let momentum = call
            .update
            .and_then(|u| u.opt.uses_momentum().then_some(u.weight.momentum));
        let value = call.update.map(|u| u.weight.value);
        let written = [Some(call.c), call.colsum, value, velocity, momentum];
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
            let step = self.step_words(op, u.weight, u.bias, (call.dims[0], call.dims[1]), &u.opt)?;
            params.flags |= step.flags;
            (params.rho, params.eps, params.l2) = (step.rho, step.eps, step.l2);
            (params.beta1, params.beta2, params.momentum) = (step.beta1, step.beta2, step.momentum);
            [params.w_value, params.b_value] = step.value;
            [params.w_velocity, params.b_velocity] = step.velocity;
            [params.w_momentum, params.b_momentum] = step.moment;
        }
        if let Some((_, g, out_ch)) = call.conv {
            let v = |what: &str, v: usize| Self::u32_of(op, what, v);
            (params.h, params.w, params.in_ch, params.out_ch) =
                (v("h", g.h)?, v("w", g.w)?, v("in_ch", g.in_ch)?, v("out_ch", out_ch)?);
            (params.kh, params.kw, params.pad) = (v("kh", g.kh)?, v("kw", g.kw)?, v("pad", g.pad)?);
            (params.oh, params.ow) = (v("oh", g.oh())?, v("ow", g.ow())?);
        }
        Ok(params)
    }
}
