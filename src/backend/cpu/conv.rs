//! The CPU backends' convolutions (max pooling, and the first layer fused with it, are in `pool`).
//!
//! Contract: a convolution's product runs as a dense product over its patch matrix. On the fast
//! path with AVX-512 a 'valid' convolution with long enough rows reads that matrix (for the
//! forward product) and its transpose (for the weight gradient) straight from the images through
//! `gemm`'s run layouts, never writing it; otherwise the forward product and the weight
//! gradient multiply `im2col(inp)`, kept per layer so that the weight gradient reuses the forward
//! product's while the input is unchanged. A first layer with a patch of at most 16 values runs
//! straight from the pixels (`direct_forward`). The input gradient computes the patches' gradient
//! into one scratch tensor and sums it back into the pixels (`col2im`), then applies the previous
//! ReLU's mask. The tensors are allocated by the first step of each batch size and reused (one
//! patch matrix per layer and batch size, within `spec::MAX_PATCH_VALUES` each), so later steps
//! allocate nothing. Every dense product, its epilogue and a fused update are then exactly the
//! dense layer's (`dense`), and a product over the mapped patches sums the same terms in the
//! same order as over the written ones, so both give the same bits. The reference runs
//! `reference`'s loops, the fast path `im2col`'s, which give the same values bit for bit.

use super::dense::{Epilogue, Mapped};
use super::elementwise;
use super::kernels::direct_conv::{self, ConvOperands, DIRECT_MAX_PATCH};
use super::kernels::gemm::{self, ALayout, Runs};
use super::kernels::im2col;
use super::kernels::narrow;
use super::kernels::sgemm;
use super::kernels::{Strided, Strides};
use super::{CpuBackend, CpuKind, Patches};
use crate::backend::ops::{
    run_unfused, ConvGeometry, DenseShape, Matmul, MatmulKind, MatmulShape, Op, PoolShape, StepAt,
};
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
        match m.kind {
            MatmulKind::Forward { .. } => self.conv_forward(m, g, at),
            MatmulKind::BackwardWeight { .. } => self.conv_backward_weight(m, g, at),
            MatmulKind::BackwardInput {
                dinp,
                dout,
                weight,
                relu_mask,
            } => {
                let tensors = InputGradient {
                    dinp,
                    dout,
                    weight,
                    relu_mask,
                };
                self.conv_backward_input(tensors, g, m.shape, at)
            }
        }
    }

    /// The forward product: a first layer straight from the pixels, the patches read from the
    /// images, or the product over the patch matrix.
    fn conv_forward(&mut self, m: &Matmul, g: ConvGeometry, at: StepAt) -> Result<()> {
        let MatmulKind::Forward {
            out,
            inp,
            weight,
            bias,
            relu,
        } = m.kind
        else {
            return self.over_patch_matrix(m, g, at);
        };
        if self.direct(g) {
            let tensors = DirectForward { out, inp, weight, bias };
            return self.direct_forward(tensors, relu, g, m.shape.outputs);
        }
        if !self.maps_patches(g) {
            return self.over_patch_matrix(m, g, at);
        }
        let epilogue = Epilogue {
            bias,
            relu,
            relu_mask: None,
        };
        self.matmul_forward(m.shape, out, inp, weight, epilogue, Some(mapped_patches(&g, false)))
    }

    /// The weight gradient (and a fused update): through the mapped patches, straight from the
    /// images, or over the patch matrix.
    fn conv_backward_weight(&mut self, m: &Matmul, g: ConvGeometry, at: StepAt) -> Result<()> {
        let MatmulKind::BackwardWeight {
            dweight,
            dbias,
            inp,
            dout,
            update,
        } = m.kind
        else {
            return self.over_patch_matrix(m, g, at);
        };
        let filters = m.shape.outputs;
        let (mapped, direct) = (self.maps_patches(g), self.direct_weights(g, filters));
        match update {
            // The weight step runs after the gradient, which comes back here without it.
            Some(_) if mapped || direct => run_unfused(self, &Op::Matmul(*m), at),
            None if mapped => {
                let layout = Some(mapped_patches(&g, true));
                self.matmul_backward_weight(m.shape, dweight, dbias, inp, dout, layout)
            }
            None if direct => {
                let out = WeightGradients { dweight, dbias };
                let from = GradientFrom::Rows(dout);
                self.direct_weight_gradient("matmul backward weight", out, inp, from, g, filters)
            }
            _ => self.over_patch_matrix(m, g, at),
        }
    }

    /// The input gradient: a block of images at a time on AVX-512, else the patches' gradient
    /// matrix summed back into the pixels (`col2im`).
    fn conv_backward_input(&mut self, t: InputGradient, g: ConvGeometry, shape: DenseShape, at: StepAt) -> Result<()> {
        if self.kind == CpuKind::Fast && gemm::available() {
            return self.blocked_input_gradient(t, g, shape.outputs);
        }
        let cols = self.gradient_scratch(g.pixels() * g.patch())?;
        let kind = MatmulKind::BackwardInput {
            dinp: cols,
            dout: t.dout,
            weight: t.weight,
            relu_mask: None,
        };
        let dense = Matmul {
            shape,
            kind,
            conv: None,
        };
        self.matmul(&dense, at)?;
        self.col2im(t.dinp, cols, t.relu_mask, g)
    }

    /// A forward product or weight gradient as the dense layer's, over the patch matrix of its
    /// input (`patches_of`).
    fn over_patch_matrix(&mut self, m: &Matmul, g: ConvGeometry, at: StepAt) -> Result<()> {
        let mut dense = Matmul { conv: None, ..*m };
        if let MatmulKind::Forward { inp, .. } | MatmulKind::BackwardWeight { inp, .. } = &mut dense.kind {
            *inp = self.patches_of(*inp, g)?;
        }
        self.matmul(&dense, at)
    }

    /// Whether the fast path runs this convolution's forward product straight from the pixels
    /// (`direct_forward`).
    pub(super) fn direct(&self, g: ConvGeometry) -> bool {
        self.kind == CpuKind::Fast && g.patch() <= DIRECT_MAX_PATCH
    }

    /// Whether the fast path reads this convolution's patch matrix (and its transpose) straight
    /// from the images instead of writing it out (`gemm::gemm_mapped`): with 'valid' padding
    /// every patch value is a pixel, and output rows of at least 8 pixels and kernel rows of at
    /// least 12 values fill most of a micro-tile's 12 rows.
    fn maps_patches(&self, g: ConvGeometry) -> bool {
        self.kind == CpuKind::Fast && gemm::available() && g.pad == 0 && g.ow() >= 8 && g.kw * g.in_ch >= 12
    }

    /// Whether the fast path computes this convolution's weight and bias gradients straight from
    /// the images (`direct_weight_gradient`): a patch of at most `DIRECT_MAX_PATCH` values, filters
    /// in groups of 16 (up to `direct_conv::MAX_FILTERS`), on AVX-512, where the patch matrix's product
    /// would be `sgemm::sgemm`'s (not a narrow one), whose bits it gives.
    pub(super) fn direct_weights(&self, g: ConvGeometry, filters: usize) -> bool {
        self.kind == CpuKind::Fast
            && gemm::available()
            && g.patch() <= DIRECT_MAX_PATCH
            && filters.is_multiple_of(16)
            && filters <= direct_conv::MAX_FILTERS
            && !narrow::fits(g.pixels(), filters)
    }

    /// dweight (patch, filters) = patches^T @ dout and dbias (filters) = the column sums of dout,
    /// straight from the images in one pass over dout (`direct_conv::weight_gradient`): no patch
    /// matrix, and dout (a first layer's: megabytes) read once for both; `from` says where dout
    /// comes from.
    pub(super) fn direct_weight_gradient(
        &mut self,
        op: &'static str,
        out: WeightGradients,
        inp: TensorId,
        from: GradientFrom,
        g: ConvGeometry,
        filters: usize,
    ) -> Result<()> {
        let WeightGradients { dweight, dbias } = out;
        let (patch, pixels) = (g.patch(), g.pixels());
        let pieces = sgemm::k_pieces(patch, pixels);
        let mut bias_sums = [0.0f32; direct_conv::MAX_FILTERS];
        let (inputs, kept) = match from {
            GradientFrom::Rows(dout) => ([(inp, g.image_len()), (dout, pixels * filters), (dout, 0)], None),
            GradientFrom::Pool { dpool, pool, out, kept } => (
                [(inp, g.image_len()), (dpool, pool.out_len()), (out, pool.in_len())],
                kept,
            ),
        };
        // The choices kept by `conv_pool`, or (as the third input) the stored output.
        let codes = kept.map(|slot| std::mem::take(&mut self.pool_codes[slot].codes));
        let read = match from {
            GradientFrom::Pool { kept: None, .. } => 3,
            _ => 2,
        };
        let result = self.with_out(op, (dweight, patch * filters), &inputs[..read], |o, i| {
            let source = match (from, &codes) {
                (GradientFrom::Rows(_), _) => direct_conv::Gradient::Rows { dout: i[1] },
                (GradientFrom::Pool { pool, .. }, codes) => direct_conv::Gradient::Pooled {
                    dpool: i[1],
                    pool,
                    choices: match codes {
                        Some(codes) => direct_conv::Choices::Codes(codes),
                        None => direct_conv::Choices::Output(i[2]),
                    },
                },
            };
            direct_conv::weight_gradient(o, &mut bias_sums[..filters], i[0], source, &g, filters, pieces)
        });
        if let (Some(slot), Some(codes)) = (kept, codes) {
            self.pool_codes[slot].codes = codes;
        }
        result?;
        match dbias {
            Some(dbias) => self.with_out(op, (dbias, filters), &[], |o, _| {
                o.copy_from_slice(&bias_sums[..filters])
            }),
            None => Ok(()),
        }
    }

    /// out (pixels, filters) = relu?(patches @ weight + bias) straight from the images, for a patch
    /// of at most `DIRECT_MAX_PATCH` values (a first layer over one channel), where building the
    /// patch matrix would cost more than the product.
    fn direct_forward(&mut self, t: DirectForward, relu: bool, g: ConvGeometry, filters: usize) -> Result<()> {
        let DirectForward { out, inp, weight, bias } = t;
        let k = g.patch();
        let inputs = [
            (inp, g.image_len()),
            (weight, k * filters),
            (bias.unwrap_or(weight), filters),
        ];
        let inputs = &inputs[..if bias.is_some() { 3 } else { 2 }];
        self.with_out("matmul forward", (out, g.pixels() * filters), inputs, |o, i| {
            let operands = ConvOperands {
                inp: i[0],
                weight: i[1],
                bias: i.get(2).copied(),
            };
            direct_conv::forward(o, operands, relu, &g, filters)
        })
    }

    /// dinp (the images) = col2im(dout (pixels, oc) @ weight (patch, oc)^T), then 0 where
    /// `relu_mask` is not > 0: the same products and sums as the patches' gradient matrix and
    /// `col2im`, a block of images at a time on each thread (`im2col::input_gradient`, into
    /// `gradient_blocks`), so that the matrix stays in the cache.
    fn blocked_input_gradient(&mut self, t: InputGradient, g: ConvGeometry, oc: usize) -> Result<()> {
        let InputGradient {
            dinp,
            dout,
            weight,
            relu_mask,
        } = t;
        let (pixels, patch) = (g.pixels(), g.patch());
        let inputs = [
            (dout, pixels * oc),
            (weight, patch * oc),
            (relu_mask.unwrap_or(dout), g.image_len()),
        ];
        let inputs = &inputs[..if relu_mask.is_some() { 3 } else { 2 }];
        let mut packed_b = std::mem::take(&mut self.products.packed_b);
        let mut blocks = std::mem::take(&mut self.gradient_blocks);
        let result = self.with_out("matmul backward input", (dinp, g.image_len()), inputs, |o, i| {
            let (dout, weight, mask) = (i[0], i[1], i.get(2).copied());
            if pixels == 0 || patch == 0 || oc == 0 {
                im2col::input_gradient(o, &mut blocks, mask, &g, &|_, _, dcols| dcols.fill(0.0));
                return;
            }
            // B = weight^T (oc, patch): element (f, j) at j oc + f.
            let b = gemm::PackedB::pack(oc, patch, &Strided::new(weight, 1, oc), &mut packed_b);
            let product = |first: usize, rows: usize, dcols: &mut [f32]| {
                assert!((first + rows) * oc <= dout.len() && dcols.len() >= rows * patch);
                let shape = MatmulShape {
                    m: rows,
                    n: patch,
                    k: oc,
                };
                // SAFETY: the CPU has AVX-512 (checked by the caller), rows first.. of dout lie
                // inside it and dcols holds their rows of the product (asserted above); B was
                // packed with this k and n.
                unsafe {
                    gemm::gemm_packed(
                        shape,
                        dout[first * oc..].as_ptr(),
                        Strides { row: oc, col: 1 },
                        &b,
                        dcols,
                    )
                };
            };
            im2col::input_gradient(o, &mut blocks, mask, &g, &product);
        });
        self.products.packed_b = packed_b;
        self.gradient_blocks = blocks;
        result
    }

    /// The patch matrix of the images in `inp`: built by `im2col` into a tensor kept for this
    /// (input, geometry), or, when `inp` has not been written since it was built (the weight
    /// gradient after the forward product of the same step), reused as it is.
    fn patches_of(&mut self, inp: TensorId, g: ConvGeometry) -> Result<TensorId> {
        let storage = self.view("convolution", inp, g.image_len())?.storage;
        let version = self.versions[storage];
        let len = g.pixels() * g.patch();
        match self.patches.iter().position(|p| p.inp == inp && p.geometry == g) {
            Some(i) if self.patches[i].version == version => Ok(self.patches[i].cols),
            Some(i) => {
                let cols = self.patches[i].cols;
                self.im2col(cols, inp, g)?;
                self.patches[i].version = version;
                Ok(cols)
            }
            None => {
                let cols = crate::backend::Backend::alloc(self, len)?;
                self.im2col(cols, inp, g)?;
                self.patches.push(Patches {
                    inp,
                    geometry: g,
                    version,
                    cols,
                });
                Ok(cols)
            }
        }
    }

    /// The scratch tensor of the patches' gradient, at least `len` values (grown, never shrunk).
    fn gradient_scratch(&mut self, len: usize) -> Result<TensorId> {
        match self.dpatches {
            Some(t) if self.tensors[t.0].len >= len => Ok(t),
            _ => {
                let t = crate::backend::Backend::alloc(self, len)?;
                self.dpatches = Some(t);
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
                CpuKind::Fast => im2col::im2col(o, i[0], &g),
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
                CpuKind::Fast => im2col::col2im(o, i[0], &g),
            }
            if let Some(mask) = i.get(1) {
                match kind {
                    CpuKind::Reference => r::matmul_epilogue(o, None, false, Some(mask), 1, n),
                    CpuKind::Fast => elementwise::matmul_epilogue(o, None, false, Some(mask), 1, n),
                }
            }
        })
    }
}

/// Where a layer's weight gradient (patch, filters) and bias gradient (filters), if any, go.
#[derive(Debug, Clone, Copy)]
pub(super) struct WeightGradients {
    pub dweight: TensorId,
    pub dbias: Option<TensorId>,
}

/// The tensors of a first layer's forward product straight from the pixels.
#[derive(Debug, Clone, Copy)]
struct DirectForward {
    out: TensorId,
    inp: TensorId,
    weight: TensorId,
    bias: Option<TensorId>,
}

/// The tensors of a convolution's input gradient (`MatmulKind::BackwardInput`'s).
#[derive(Debug, Clone, Copy)]
struct InputGradient {
    dinp: TensorId,
    dout: TensorId,
    weight: TensorId,
    relu_mask: Option<TensorId>,
}

/// Where `direct_weight_gradient` forms a first layer's output gradient from.
#[derive(Debug, Clone, Copy)]
pub(super) enum GradientFrom {
    /// The gradient as stored.
    Rows(TensorId),
    /// The gradient of the 2 x 2 pool after the layer (`dpool`), routed through the ReLU by the
    /// choices kept by `conv_pool` (in `pool_codes[kept]`) or else by the stored output `out`.
    Pool {
        dpool: TensorId,
        pool: PoolShape,
        out: TensorId,
        kept: Option<usize>,
    },
}

/// Where a 'valid' convolution's patch matrix lies in its images (images, h, w, in_ch): the
/// pixels (rows) in runs of an output row, `in_ch` apart, each output row a kernel row below the
/// one before, each image h rows below; the patch values (columns) in runs of a kernel row (kw x
/// in_ch contiguous values), each an image row below the one before. Value (p, kk) of the matrix
/// is the images' value at the sum of the two offsets.
fn patch_runs(g: &ConvGeometry) -> (Runs, Runs) {
    let (row, image) = (g.w * g.in_ch, g.h * g.w * g.in_ch);
    let pixels = Runs {
        count: g.pixels(),
        len: g.ow(),
        stride: g.in_ch,
        per_group: g.oh(),
        run_stride: row,
        group_stride: image,
    };
    let patch = Runs {
        count: g.patch(),
        len: g.kw * g.in_ch,
        stride: 1,
        per_group: g.kh,
        run_stride: row,
        group_stride: 0,
    };
    (pixels, patch)
}

/// The patch matrix of a 'valid' convolution's images, or (`transposed`) its transpose, as the
/// products read it from the images (`patch_runs`).
fn mapped_patches(g: &ConvGeometry, transposed: bool) -> Mapped {
    let (pixels, patch) = patch_runs(g);
    let layout = match transposed {
        false => ALayout {
            rows: pixels,
            ks: patch,
        },
        true => ALayout {
            rows: patch,
            ks: pixels,
        },
    };
    Mapped {
        layout,
        len: g.image_len(),
    }
}
