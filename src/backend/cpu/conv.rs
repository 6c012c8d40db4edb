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

use super::products::{Epilogue, Mapped};
use super::{CpuBackend, CpuKind, Patches};
use crate::backend::cpu_conv::{self, PixelWalk};
use crate::backend::cpu_fast;
use crate::backend::cpu_gemm::{self, ALayout, Runs};
use crate::backend::cpu_narrow::Strided;
use crate::backend::ops::{run_unfused, ConvGeometry, Matmul, MatmulKind, MatmulShape, Op, Pool, PoolKind, StepAt};
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
            MatmulKind::BackwardWeight { update: Some(_), .. } if self.maps_patches(g) => {
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
            cpu_conv_direct(o, (i[0], i[1], bias), relu, &g, filters)
        })
    }

    /// dinp (the images) = col2im(dout (pixels, oc) @ weight (patch, oc)^T), then 0 where
    /// `relu_mask` is not > 0: the same products and sums as the patches' gradient matrix and
    /// `col2im`, a block of images at a time on each thread (`cpu_conv::input_gradient`), so that
    /// the matrix stays in the cache.
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
        let result = self.with_out("matmul backward input", (dinp, g.image_len()), inputs, |o, i| {
            let (dout, weight, mask) = (i[0], i[1], i.get(2).copied());
            if pixels == 0 || patch == 0 || oc == 0 {
                cpu_conv::input_gradient(o, mask, &g, &|_, _, dcols| dcols.fill(0.0));
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
            cpu_conv::input_gradient(o, mask, &g, &product);
        });
        self.narrow.packed_b = packed_b;
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

/// Patches of at most this many values go straight from the images (`direct_forward`).
const DIRECT_MAX_PATCH: usize = 16;

/// `CpuBackend::direct_forward`'s arithmetic, split over the pool's threads by images: each
/// output pixel's patch (zeros over the padding) times the weight's rows, in patch order, then
/// + bias and ReLU, as the reference's product and epilogue do.
fn cpu_conv_direct(
    out: &mut [f32],
    (inp, weight, bias): (&[f32], &[f32], Option<&[f32]>),
    relu: bool,
    g: &ConvGeometry,
    filters: usize,
) {
    let per_image = g.oh() * g.ow() * filters;
    if per_image == 0 || g.images == 0 {
        return;
    }
    let chunks = crate::backend::cpu_sparse::chunk_count(g.images);
    let images = g.images.div_ceil(chunks);
    let mut pieces = out[..g.images * per_image].chunks_mut(images * per_image).enumerate();
    let items: [_; crate::backend::cpu_sparse::MAX_CHUNKS] = std::array::from_fn(|_| pieces.next());
    crate::backend::cpu_pool::for_each(items, &|(p, o): (usize, &mut [f32])| {
        let first = p * images * g.oh() * g.ow();
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                unsafe { direct_rows_avx2(o, (inp, weight, bias), relu, g, (first, filters)) };
                return;
            }
        }
        direct_rows(o, (inp, weight, bias), relu, g, (first, filters));
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn direct_rows_avx2(
    out: &mut [f32],
    operands: (&[f32], &[f32], Option<&[f32]>),
    relu: bool,
    g: &ConvGeometry,
    at: (usize, usize),
) {
    direct_rows(out, operands, relu, g, at)
}

/// Output pixels first.. (as many as `out` holds) of `cpu_conv_direct`: with a filter count the
/// accumulators can be registers for (the book's 32, and 8, 16, 64), through `direct_rows_fixed`.
#[inline(always)]
fn direct_rows(
    out: &mut [f32],
    operands: (&[f32], &[f32], Option<&[f32]>),
    relu: bool,
    g: &ConvGeometry,
    (first, filters): (usize, usize),
) {
    match filters {
        8 => direct_rows_fixed::<8>(out, operands, relu, g, first),
        16 => direct_rows_fixed::<16>(out, operands, relu, g, first),
        32 => direct_rows_fixed::<32>(out, operands, relu, g, first),
        64 => direct_rows_fixed::<64>(out, operands, relu, g, first),
        _ => direct_rows_any(out, operands, relu, g, (first, filters)),
    }
}

/// `direct_rows` for `F` filters: the same operations in the same order as `direct_rows_any`
/// (so the same bits), with the F sums held in registers instead of the output row.
#[inline(always)]
fn direct_rows_fixed<const F: usize>(
    out: &mut [f32],
    (inp, weight, bias): (&[f32], &[f32], Option<&[f32]>),
    relu: bool,
    g: &ConvGeometry,
    first: usize,
) {
    let k = g.patch();
    let mut patch = [0.0f32; DIRECT_MAX_PATCH];
    let mut at = PixelWalk::at(g, first);
    for o in out.chunks_exact_mut(F) {
        cpu_conv::patch_into(&mut patch[..k], inp, g, &at);
        at.advance();
        let mut acc = [0.0f32; F];
        for (&v, w) in patch[..k].iter().zip(weight.as_chunks::<F>().0) {
            for j in 0..F {
                acc[j] += v * w[j];
            }
        }
        // A bias holds F values (checked with the operands by `with_out`).
        if let Some(bias) = bias.and_then(|b| b.first_chunk::<F>()) {
            for j in 0..F {
                acc[j] += bias[j];
            }
        }
        if relu {
            for a in acc.iter_mut() {
                *a = if *a > 0.0 { *a } else { 0.0 };
            }
        }
        o.copy_from_slice(&acc);
    }
}

/// `direct_rows` for any filter count, summing in the output row.
#[inline(always)]
fn direct_rows_any(
    out: &mut [f32],
    (inp, weight, bias): (&[f32], &[f32], Option<&[f32]>),
    relu: bool,
    g: &ConvGeometry,
    (first, filters): (usize, usize),
) {
    let k = g.patch();
    let mut patch = [0.0f32; DIRECT_MAX_PATCH];
    let mut at = PixelWalk::at(g, first);
    for o in out.chunks_exact_mut(filters) {
        cpu_conv::patch_into(&mut patch[..k], inp, g, &at);
        at.advance();
        o.fill(0.0);
        for (kk, &v) in patch[..k].iter().enumerate() {
            for (acc, &w) in o.iter_mut().zip(&weight[kk * filters..(kk + 1) * filters]) {
                *acc += v * w;
            }
        }
        if let Some(bias) = bias {
            for (acc, &b) in o.iter_mut().zip(bias) {
                *acc += b;
            }
        }
        if relu {
            for acc in o.iter_mut() {
                *acc = if *acc > 0.0 { *acc } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// out (pixels, filters) = relu(patch @ weight + bias) in f64, for comparison.
    fn reference(inp: &[f32], weight: &[f32], bias: &[f32], g: &ConvGeometry, filters: usize) -> Vec<f32> {
        let mut out = Vec::new();
        let mut patch = [0.0f32; DIRECT_MAX_PATCH];
        for row in 0..g.pixels() {
            cpu_conv::patch_into(&mut patch[..g.patch()], inp, g, &PixelWalk::at(g, row));
            for f in 0..filters {
                let sum: f64 = (0..g.patch())
                    .map(|kk| patch[kk] as f64 * weight[kk * filters + f] as f64)
                    .sum::<f64>()
                    + bias[f] as f64;
                out.push(sum.max(0.0) as f32);
            }
        }
        out
    }

    /// The register-held sums give the same bits as the sums in the output row, and both agree
    /// with an f64 reference, at every filter count with a fixed path and one without, with and
    /// without padding, over one and three channels.
    #[test]
    fn direct_rows_fixed_and_any_agree_bit_for_bit() {
        let value = |i: usize| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0;
        for (in_ch, k, pad) in [(1, 3, 0), (1, 3, 1), (1, 1, 0), (3, 2, 1), (3, 2, 0)] {
            let g = ConvGeometry {
                images: 3,
                h: 7,
                w: 5,
                in_ch,
                kh: k,
                kw: k,
                pad,
            };
            let inp: Vec<f32> = (0..g.image_len()).map(|i| value(i + 7)).collect();
            for filters in [5, 8, 16, 32, 64] {
                let weight: Vec<f32> = (0..g.patch() * filters).map(|i| value(i + 101)).collect();
                let bias: Vec<f32> = (0..filters).map(|i| value(i + 977) / 4.0).collect();
                let mut fixed = vec![f32::NAN; g.pixels() * filters];
                let mut any = vec![f32::NAN; g.pixels() * filters];
                let operands = (&inp[..], &weight[..], Some(&bias[..]));
                direct_rows(&mut fixed, operands, true, &g, (0, filters));
                direct_rows_any(&mut any, operands, true, &g, (0, filters));
                let want = reference(&inp, &weight, &bias, &g, filters);
                let diff = fixed
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                println!("in {in_ch}, k {k}, pad {pad}, filters {filters}: max diff from f64 {diff:.2e}");
                assert!(diff < 1e-5, "filters {filters}: {diff}");
                assert!(
                    fixed.iter().zip(&any).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "filters {filters}"
                );
            }
        }
    }
}
