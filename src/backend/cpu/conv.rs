//! The CPU backends' convolutions and max pooling.
//!
//! Contract: a convolution's product runs as a dense product over its patch matrix. On the fast
//! path with AVX-512 a 'valid' convolution with long enough rows reads that matrix (for the
//! forward product) and its transpose (for the weight gradient) straight from the images through
//! `cpu_gemm`'s run layouts, never writing it; otherwise the forward product and the weight
//! gradient multiply `im2col(inp)`, kept per layer so that the weight gradient reuses the forward
//! product's while the input is unchanged. A first layer with a patch of at most 16 values runs
//! straight from the pixels (`direct_forward`). The input gradient computes the patches' gradient
//! into one scratch tensor and sums it back into the pixels (`col2im`), then applies the previous
//! ReLU's mask. The tensors are allocated by the first step of each batch size and reused (one
//! patch matrix per layer and batch size, within `spec::MAX_PATCH_VALUES` each), so later steps
//! allocate nothing. Every dense product, its epilogue and a fused update are then exactly the
//! dense layer's (`products`), and a product over the mapped patches sums the same terms in the
//! same order as over the written ones, so both give the same bits. The reference runs
//! `reference`'s loops, the fast path `cpu_conv`'s, which give the same values bit for bit.

use super::direct::{self, DIRECT_MAX_PATCH};
use super::products::{self, Epilogue, Mapped};
use super::{CpuBackend, CpuKind, Patches, PoolCodes};
use crate::backend::cpu_conv;
use crate::backend::cpu_fast;
use crate::backend::cpu_gemm::{self, ALayout, Runs};
use crate::backend::cpu_narrow::{self, Strided};
use crate::backend::ops::{
    run_unfused, ConvGeometry, ConvPool, Matmul, MatmulKind, MatmulShape, Op, Pool, PoolKind, PoolShape,
    PoolWeightGradient, StepAt,
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
        let dense = |kind| Matmul {
            shape: m.shape,
            kind,
            conv: None,
        };
        match m.kind {
            // A first layer straight from the pixels, or the patches read from the images.
            MatmulKind::Forward {
                out,
                inp,
                weight,
                bias,
                relu,
            } if self.direct(g) || self.maps_patches(g) => {
                if self.direct(g) {
                    return self.direct_forward((out, inp, weight, bias), relu, g, m.shape.outputs);
                }
                let epilogue = Epilogue {
                    bias,
                    relu,
                    relu_mask: None,
                };
                self.matmul_forward(m.shape, out, inp, weight, epilogue, Some(mapped_patches(&g, false)))
            }
            // The weight step runs after the gradient, which comes back here without it.
            MatmulKind::BackwardWeight { update: Some(_), .. }
                if self.maps_patches(g) || self.direct_weights(g, m.shape.outputs) =>
            {
                run_unfused(self, &Op::Matmul(*m), at)
            }
            MatmulKind::BackwardWeight {
                dweight,
                dbias,
                inp,
                dout,
                update: None,
            } if self.maps_patches(g) => {
                let mapped = mapped_patches(&g, true);
                self.matmul_backward_weight(m.shape, dweight, dbias, inp, dout, Some(mapped))
            }
            MatmulKind::BackwardWeight {
                dweight,
                dbias,
                inp,
                dout,
                update: None,
            } if self.direct_weights(g, m.shape.outputs) => {
                let from = (inp, GradientFrom::Rows(dout));
                self.direct_weight_gradient("matmul backward weight", (dweight, dbias), from, g, m.shape.outputs)
            }
            MatmulKind::Forward { inp, .. } | MatmulKind::BackwardWeight { inp, .. } => {
                let cols = self.patches_of(inp, g)?;
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
            } if self.kind == CpuKind::Fast && cpu_gemm::available() => {
                self.blocked_input_gradient((dinp, dout, weight, relu_mask), g, m.shape.outputs)
            }
            MatmulKind::BackwardInput {
                dinp,
                dout,
                weight,
                relu_mask,
            } => {
                let cols = self.gradient_scratch(g.pixels() * g.patch())?;
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

    /// Whether the fast path runs this convolution's forward product straight from the pixels
    /// (`direct_forward`).
    fn direct(&self, g: ConvGeometry) -> bool {
        self.kind == CpuKind::Fast && g.patch() <= DIRECT_MAX_PATCH
    }

    /// Whether the fast path reads this convolution's patch matrix (and its transpose) straight
    /// from the images instead of writing it out (`cpu_gemm::gemm_mapped`): with 'valid' padding
    /// every patch value is a pixel, and output rows of at least 8 pixels and kernel rows of at
    /// least 12 values fill most of a micro-tile's 12 rows.
    fn maps_patches(&self, g: ConvGeometry) -> bool {
        self.kind == CpuKind::Fast && cpu_gemm::available() && g.pad == 0 && g.ow() >= 8 && g.kw * g.in_ch >= 12
    }

    /// Whether the fast path computes this convolution's weight and bias gradients straight from
    /// the images (`direct_weight_gradient`): a patch of at most `DIRECT_MAX_PATCH` values, filters
    /// in groups of 16 (up to `direct::MAX_FILTERS`), on AVX-512, where the patch matrix's product
    /// would be `products::sgemm`'s (not a narrow one), whose bits it gives.
    fn direct_weights(&self, g: ConvGeometry, filters: usize) -> bool {
        self.kind == CpuKind::Fast
            && cpu_gemm::available()
            && g.patch() <= DIRECT_MAX_PATCH
            && filters.is_multiple_of(16)
            && filters <= direct::MAX_FILTERS
            && !cpu_narrow::fits(g.pixels(), filters)
    }

    /// dweight (patch, filters) = patches^T @ dout and dbias (filters) = the column sums of dout,
    /// straight from the images in one pass over dout (`direct::weight_gradient`): no patch
    /// matrix, and dout (a first layer's: megabytes) read once for both; `from` says where dout
    /// comes from.
    fn direct_weight_gradient(
        &mut self,
        op: &'static str,
        (dweight, dbias): (TensorId, Option<TensorId>),
        (inp, from): (TensorId, GradientFrom),
        g: ConvGeometry,
        filters: usize,
    ) -> Result<()> {
        let (patch, pixels) = (g.patch(), g.pixels());
        let pieces = products::k_pieces(patch, pixels);
        let mut bias_sums = [0.0f32; direct::MAX_FILTERS];
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
                (GradientFrom::Rows(_), _) => direct::Gradient::Rows { dout: i[1] },
                (GradientFrom::Pool { pool, .. }, codes) => direct::Gradient::Pooled {
                    dpool: i[1],
                    pool,
                    choices: match codes {
                        Some(codes) => direct::Choices::Codes(codes),
                        None => direct::Choices::Output(i[2]),
                    },
                },
            };
            direct::weight_gradient((o, &mut bias_sums[..filters]), (i[0], source), &g, filters, pieces)
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

    /// Whether the fast path runs a first layer and the 2 x 2 pool after it as one op forward
    /// (`conv_pool`, the layer's output never stored) and backward (`pool_weight_gradient`):
    /// the same rule for both, so that a backward pass never looks for an output that was not
    /// stored.
    fn fuses_first_layer(&self, g: ConvGeometry, pool: &PoolShape, filters: usize) -> bool {
        self.direct(g)
            && self.direct_weights(g, filters)
            && (pool.images, pool.h, pool.w, pool.ch, pool.size) == (g.images, g.oh(), g.ow(), filters, 2)
            && 4 * pool.ow() * filters <= direct::POOL_BAND_MAX
    }

    /// A first layer's forward product and its pool as one op (`direct::forward_pool`): the pool's
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
            let operands = (i[0], i[1], i.get(2).copied());
            direct::forward_pool((o, &mut codes[..pool.out_len()]), operands, true, (&g, &pool), filters)
        });
        let kept = &mut self.pool_codes[slot];
        (kept.codes, kept.shape, kept.version) = (codes, pool, self.writes);
        result
    }

    /// A first layer's pool backward pass and weight gradient with its update as one op: the
    /// gradients straight from the pool's gradient (`direct`) and its choices kept by `conv_pool`,
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
        self.direct_weight_gradient(op, (dweight, dbias), (inp, from), g, filters)?;
        for step in u.steps(f.weight.shape, (dweight, dbias)).into_iter().flatten() {
            crate::backend::Backend::run(self, &step, at)?;
        }
        Ok(())
    }

    /// out (pixels, filters) = relu?(patches @ weight + bias) straight from the images, for a patch
    /// of at most `DIRECT_MAX_PATCH` values (a first layer over one channel), where building the
    /// patch matrix would cost more than the product.
    fn direct_forward(
        &mut self,
        (out, inp, weight, bias): (TensorId, TensorId, TensorId, Option<TensorId>),
        relu: bool,
        g: ConvGeometry,
        filters: usize,
    ) -> Result<()> {
        let k = g.patch();
        let inputs = [
            (inp, g.image_len()),
            (weight, k * filters),
            (bias.unwrap_or(weight), filters),
        ];
        let inputs = &inputs[..if bias.is_some() { 3 } else { 2 }];
        self.with_out("matmul forward", (out, g.pixels() * filters), inputs, |o, i| {
            let bias = i.get(2).copied();
            direct::forward(o, (i[0], i[1], bias), relu, &g, filters)
        })
    }

    /// dinp (the images) = col2im(dout (pixels, oc) @ weight (patch, oc)^T), then 0 where
    /// `relu_mask` is not > 0: the same products and sums as the patches' gradient matrix and
    /// `col2im`, a block of images at a time on each thread (`cpu_conv::input_gradient`, into
    /// `gradient_blocks`), so that the matrix stays in the cache.
    fn blocked_input_gradient(
        &mut self,
        (dinp, dout, weight, relu_mask): (TensorId, TensorId, TensorId, Option<TensorId>),
        g: ConvGeometry,
        oc: usize,
    ) -> Result<()> {
        let (pixels, patch) = (g.pixels(), g.patch());
        let inputs = [
            (dout, pixels * oc),
            (weight, patch * oc),
            (relu_mask.unwrap_or(dout), g.image_len()),
        ];
        let inputs = &inputs[..if relu_mask.is_some() { 3 } else { 2 }];
        let mut packed_b = std::mem::take(&mut self.narrow.packed_b);
        let mut blocks = std::mem::take(&mut self.gradient_blocks);
        let result = self.with_out("matmul backward input", (dinp, g.image_len()), inputs, |o, i| {
            let (dout, weight, mask) = (i[0], i[1], i.get(2).copied());
            if pixels == 0 || patch == 0 || oc == 0 {
                cpu_conv::input_gradient((o, &mut blocks), mask, &g, &|_, _, dcols| dcols.fill(0.0));
                return;
            }
            // B = weight^T (oc, patch): element (f, j) at j oc + f.
            let b = cpu_gemm::PackedB::pack(oc, patch, &Strided::new(weight, 1, oc), &mut packed_b);
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
                unsafe { cpu_gemm::gemm_packed(shape, dout[first * oc..].as_ptr(), (oc, 1), &b, dcols) };
            };
            cpu_conv::input_gradient((o, &mut blocks), mask, &g, &product);
        });
        self.narrow.packed_b = packed_b;
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

/// Where `direct_weight_gradient` forms a first layer's output gradient from.
#[derive(Debug, Clone, Copy)]
enum GradientFrom {
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
