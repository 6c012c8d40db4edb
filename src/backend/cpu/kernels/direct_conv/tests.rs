//! The direct first layer's kernels against the generic rows, the patch products and the
//! unfused pool, bit for bit, at awkward geometries.

use super::pool::NOT_POSITIVE;
#[cfg(target_arch = "x86_64")]
use super::rows::valid_rows_avx512;
use super::rows::{direct_rows, direct_rows_any, OutputPixels};
use super::*;
use crate::backend::cpu::kernels::im2col::{self, PixelWalk};
use crate::backend::cpu::kernels::maxpool;
use crate::backend::cpu::kernels::test_values::max_abs_diff;

/// A NaN other than `f32::NAN`, for a buffer compared bit for bit with one filled with that: a
/// value left unwritten on both sides then differs.
const UNWRITTEN: f32 = f32::from_bits(0x7fc0_0001);

/// A fixed, irregular value in [-1, 1) for index i.
fn value(i: usize) -> f32 {
    ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0
}

/// Whether a and b hold the same bits.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// First layers of 3 x 3 over one channel for the fused kernels: even and odd outputs (rows
/// and columns no 2 x 2 window covers), 'same' padding, and the book's 28 x 28.
fn first_layers() -> impl Iterator<Item = ConvGeometry> {
    [(10, 10, 0, 3), (9, 11, 0, 2), (8, 7, 1, 2), (28, 28, 0, 2)]
        .into_iter()
        .map(|(h, w, pad, images)| ConvGeometry {
            images,
            h,
            w,
            in_ch: 1,
            kh: 3,
            kw: 3,
            pad,
        })
}

/// (dweight, dbias) from `weight_gradient` with `source` (NaN where it writes nothing).
fn gradients(source: Gradient, inp: &[f32], g: &ConvGeometry, filters: usize, pieces: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut dweight, mut dbias) = (vec![f32::NAN; g.patch() * filters], vec![f32::NAN; filters]);
    weight_gradient(&mut dweight, &mut dbias, inp, source, g, filters, pieces);
    (dweight, dbias)
}

/// The 2 x 2 pool over g's output of `filters` channels.
fn pool_after(g: &ConvGeometry, filters: usize) -> PoolShape {
    PoolShape {
        images: g.images,
        h: g.oh(),
        w: g.ow(),
        ch: filters,
        size: 2,
    }
}

/// out (pixels, filters) = relu(patch @ weight + bias) in f64, for comparison.
fn reference(inp: &[f32], weight: &[f32], bias: &[f32], g: &ConvGeometry, filters: usize) -> Vec<f32> {
    let mut out = Vec::new();
    let mut patch = [0.0f32; DIRECT_MAX_PATCH];
    for row in 0..g.pixels() {
        im2col::patch_into(&mut patch[..g.patch()], inp, g, &PixelWalk::at(g, row));
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
            // Two different NaNs: a value both kernels leave unwritten differs in its bits.
            let mut fixed = vec![f32::NAN; g.pixels() * filters];
            let mut any = vec![UNWRITTEN; g.pixels() * filters];
            let operands = ConvOperands {
                inp: &inp[..],
                weight: &weight[..],
                bias: Some(&bias[..]),
            };
            direct_rows(&mut fixed, operands, true, &g, OutputPixels { first: 0, filters });
            direct_rows_any(&mut any, operands, true, &g, OutputPixels { first: 0, filters });
            let want = reference(&inp, &weight, &bias, &g, filters);
            // NaN-aware: a value never written stays NaN, and fails.
            let diff = max_abs_diff(&fixed, &want);
            println!("in {in_ch}, k {k}, pad {pad}, filters {filters}: max diff from f64 {diff:.2e}");
            assert!(diff < 1e-5, "filters {filters}: {diff}");
            assert!(
                fixed.iter().zip(&any).all(|(a, b)| a.to_bits() == b.to_bits()),
                "filters {filters}"
            );
        }
    }
}

/// The register-held 'valid' rows (`valid_rows_avx512`) give `direct_rows_any`'s bits for every
/// patch and filter count they take, from a pixel inside a row through the ends of rows and
/// images, with and without bias and ReLU, NaN and negative zero among the pixels.
#[test]
fn valid_rows_give_the_generic_rows_bits() {
    if !gemm::available() {
        println!("no AVX-512: the register-held rows are not used on this CPU");
        return;
    }
    let mut taken = 0;
    for k in [1, 2, 3] {
        let g = ConvGeometry {
            images: 3,
            h: 9,
            w: 7,
            in_ch: 1,
            kh: k,
            kw: k,
            pad: 0,
        };
        let mut inp: Vec<f32> = (0..g.image_len()).map(|i| value(i + 3)).collect();
        inp[11] = f32::NAN;
        inp[20] = -0.0;
        for filters in [16, 32] {
            let weight: Vec<f32> = (0..g.patch() * filters).map(|i| value(i + 41)).collect();
            let bias: Vec<f32> = (0..filters).map(|i| value(i + 977) / 4.0).collect();
            for (bias, relu) in [(Some(&bias[..]), true), (None, false)] {
                // From inside the first image's second row, through the batch's last pixel.
                let (first, pixels) = (g.ow() + 2, g.pixels() - g.ow() - 2);
                let mut fast = vec![f32::NAN; pixels * filters];
                let mut any = vec![UNWRITTEN; pixels * filters];
                let operands = ConvOperands {
                    inp: &inp[..],
                    weight: &weight[..],
                    bias,
                };
                // SAFETY: the CPU has AVX-512 (checked above).
                taken += usize::from(unsafe {
                    valid_rows_avx512(&mut fast, operands, relu, &g, OutputPixels { first, filters })
                });
                direct_rows_any(&mut any, operands, relu, &g, OutputPixels { first, filters });
                let what = format!("kernel {k}, filters {filters}, relu {relu}");
                assert!(same_bits(&fast, &any), "{what}");
                // A NaN pixel gives NaN sums, which a ReLU turns into 0.
                assert_eq!(fast.iter().any(|x| x.is_nan()), !relu, "{what}");
                assert!(
                    fast.iter().any(|&x| x > 0.0) && fast.iter().any(|&x| x <= 0.0),
                    "{what}"
                );
            }
        }
    }
    assert_eq!(taken, 12, "every case above has a register-held path");
    let padded = ConvGeometry {
        images: 1,
        h: 5,
        w: 5,
        in_ch: 1,
        kh: 3,
        kw: 3,
        pad: 1,
    };
    let mut out = vec![0.0; 16];
    let operands = ConvOperands {
        inp: &[0.0; 100][..],
        weight: &[0.0; 9 * 16][..],
        bias: None,
    };
    // A patch of a taken size from another geometry: padding, four channels, a 1 x 4 kernel.
    let four_channels = ConvGeometry {
        in_ch: 4,
        kh: 1,
        kw: 1,
        pad: 0,
        ..padded
    };
    let one_by_four = ConvGeometry {
        kh: 1,
        kw: 4,
        pad: 0,
        ..padded
    };
    for g in [padded, four_channels, one_by_four] {
        // SAFETY: as above.
        assert!(!unsafe { valid_rows_avx512(&mut out, operands, false, &g, OutputPixels { first: 0, filters: 16 }) });
    }
}

/// The weight gradient in one pass gives the bits of the patch matrix's split-K product (each
/// piece's sums as single-rounding multiply-adds in pixel order, the pieces added in order)
/// and the bias gradient the bits of the reference's row-order sums, and both agree with f64;
/// at patches with a register-held path (1, 4, 9, 16) and without (12), with and without
/// padding, over 16 to 48 filters, with one piece and eight (the last ones short or empty).
#[test]
fn weight_gradient_gives_the_patch_products_bits() {
    if !gemm::available() {
        println!("no AVX-512: the direct weight gradient is not used on this CPU");
        return;
    }
    for (in_ch, k, pad, images) in [
        (1, 3, 0, 5),
        (1, 3, 1, 3),
        (1, 1, 0, 2),
        (1, 4, 0, 3),
        (3, 2, 0, 4),
        (3, 2, 1, 1),
    ] {
        let g = ConvGeometry {
            images,
            h: 9,
            w: 7,
            in_ch,
            kh: k,
            kw: k,
            pad,
        };
        let (patch, pixels) = (g.patch(), g.pixels());
        let inp: Vec<f32> = (0..g.image_len()).map(|i| value(i + 3).abs()).collect();
        let mut cols = vec![0.0f32; pixels * patch];
        for (p, row) in cols.chunks_exact_mut(patch).enumerate() {
            im2col::patch_into(row, &inp, &g, &PixelWalk::at(&g, p));
        }
        for filters in [16, 32, 48] {
            let dout: Vec<f32> = (0..pixels * filters).map(|i| value(i + 11)).collect();
            let mut want_bias = vec![0.0f32; filters];
            crate::backend::reference::bias_backward(&mut want_bias, &dout, pixels, filters);
            for pieces in [1, 8] {
                let span = pixels.div_ceil(pieces);
                let mut want = vec![0.0f32; patch * filters];
                let mut diff = 0.0f64;
                for kk in 0..patch {
                    for f in 0..filters {
                        let mut total = 0.0f32;
                        for piece in 0..pieces {
                            let (first, end) = ((piece * span).min(pixels), ((piece + 1) * span).min(pixels));
                            let sum = (first..end)
                                .fold(0.0f32, |s, p| cols[p * patch + kk].mul_add(dout[p * filters + f], s));
                            total = if piece == 0 { sum } else { total + sum };
                        }
                        want[kk * filters + f] = total;
                        let exact: f64 = (0..pixels)
                            .map(|p| cols[p * patch + kk] as f64 * dout[p * filters + f] as f64)
                            .sum();
                        diff = diff.max((exact - total as f64).abs());
                    }
                }
                let (mut dweight, mut dbias) = (vec![f32::NAN; patch * filters], vec![f32::NAN; filters]);
                let source = Gradient::Rows { dout: &dout };
                weight_gradient(&mut dweight, &mut dbias, &inp, source, &g, filters, pieces);
                println!(
                    "in {in_ch}, k {k}, pad {pad}, filters {filters}, pieces {pieces}: max diff from f64 {diff:.2e}"
                );
                assert!(diff < 1e-4, "the emulated sums are off: {diff}");
                assert!(
                    same_bits(&dweight, &want),
                    "weight gradient, filters {filters}, pieces {pieces}"
                );
                assert!(
                    same_bits(&dbias, &want_bias),
                    "bias gradient, filters {filters}, pieces {pieces}"
                );
            }
        }
    }
}

/// The pooled weight gradient gives the bits of `maxpool_backward` (through the ReLU) then
/// `weight_gradient`: at even and odd layer outputs (rows and columns no window covers), with
/// ties, maxima <= 0 and a NaN in the layer's output, with and without padding, over 16 and 48
/// filters, in one piece and eight.
#[test]
fn pool_weight_gradient_gives_the_unfused_bits() {
    if !gemm::available() {
        println!("no AVX-512: the direct weight gradient is not used on this CPU");
        return;
    }
    for g in first_layers() {
        let (h, w, pad) = (g.h, g.w, g.pad);
        let inp: Vec<f32> = (0..g.image_len()).map(|i| value(i + 5).abs()).collect();
        for filters in [16, 48] {
            let pool = pool_after(&g, filters);
            // Layer outputs in steps of 0.25 (ties), half of them <= 0, and one NaN.
            let mut out: Vec<f32> = (0..pool.in_len())
                .map(|i| (value(i + 17) * 4.0).round() / 4.0)
                .collect();
            out[filters + 3] = f32::NAN;
            let dpool: Vec<f32> = (0..pool.out_len()).map(|i| value(i + 29)).collect();
            let mut dout = vec![f32::NAN; pool.in_len()];
            maxpool::maxpool_backward(&mut dout, &dpool, &out, &pool, true);
            for pieces in [1, 8] {
                let want = gradients(Gradient::Rows { dout: &dout }, &inp, &g, filters, pieces);
                let source = Gradient::Pooled {
                    dpool: &dpool,
                    pool,
                    choices: Choices::Output(&out),
                };
                let got = gradients(source, &inp, &g, filters, pieces);
                let what = format!("{h}x{w} pad {pad}, filters {filters}, pieces {pieces}");
                assert!(same_bits(&got.0, &want.0), "weight gradient, {what}");
                assert!(same_bits(&got.1, &want.1), "bias gradient, {what}");
                assert!(
                    got.0.iter().any(|&x| x != 0.0),
                    "{what}: an all-zero gradient proves nothing"
                );
            }
        }
    }
}

/// The fused forward pass gives the bits of `forward` then `maxpool::maxpool_forward`, and its
/// choices give the backward pass the bits it gets from the stored output: with ties (weights
/// and pixels on a coarse grid), maxima <= 0 (a negative bias), a NaN pixel, odd outputs and
/// padding, over 16 and 48 filters.
#[test]
fn forward_pool_and_its_choices_give_the_unfused_bits() {
    if !gemm::available() {
        println!("no AVX-512: the fused first layer is not used on this CPU");
        return;
    }
    for g in first_layers() {
        let (h, w, pad) = (g.h, g.w, g.pad);
        let mut inp: Vec<f32> = (0..g.image_len())
            .map(|i| (value(i + 5).abs() * 2.0).round() / 2.0)
            .collect();
        inp[w + 2] = f32::NAN;
        for filters in [16, 48] {
            let pool = pool_after(&g, filters);
            let weight: Vec<f32> = (0..g.patch() * filters)
                .map(|i| (value(i + 13) * 4.0).round() / 4.0)
                .collect();
            let bias: Vec<f32> = (0..filters)
                .map(|i| (value(i + 41) * 2.0).round() / 2.0 - 0.5)
                .collect();
            let operands = ConvOperands {
                inp: &inp[..],
                weight: &weight[..],
                bias: Some(&bias[..]),
            };
            let mut out = vec![f32::NAN; pool.in_len()];
            forward(&mut out, operands, true, &g, filters);
            let mut want = vec![f32::NAN; pool.out_len()];
            maxpool::maxpool_forward(&mut want, &out, &pool);
            let (mut pooled, mut codes) = (vec![f32::NAN; pool.out_len()], vec![0u8; pool.out_len()]);
            forward_pool(&mut pooled, &mut codes, operands, true, &g, &pool, filters);
            let what = format!("{h}x{w} pad {pad}, filters {filters}");
            assert!(same_bits(&pooled, &want), "pooled output, {what}");
            let ties = out
                .iter()
                .zip(&out[filters..])
                .filter(|(a, b)| a == b && **a > 0.0)
                .count();
            let not_positive = codes.iter().filter(|&&c| c == NOT_POSITIVE).count();
            println!("{what}: {ties} positive values equal to their right neighbour's, {not_positive} windows <= 0");
            assert!(
                ties > 0 && not_positive > 0,
                "{what}: the data lack ties or maxima <= 0"
            );

            let dpool: Vec<f32> = (0..pool.out_len()).map(|i| value(i + 29)).collect();
            let source = Gradient::Pooled {
                dpool: &dpool,
                pool,
                choices: Choices::Codes(&codes),
            };
            // The NaN pixel makes most weight sums NaN, where NaN equals NaN: compare them on
            // the same images without it too.
            let clean: Vec<f32> = inp.iter().map(|&x| if x.is_nan() { 0.5 } else { x }).collect();
            for (pieces, images) in [(1, &inp), (3, &inp), (8, &inp), (1, &clean), (3, &clean), (8, &clean)] {
                let by_output = Gradient::Pooled {
                    dpool: &dpool,
                    pool,
                    choices: Choices::Output(&out),
                };
                let stored = gradients(by_output, images, &g, filters, pieces);
                let coded = gradients(source, images, &g, filters, pieces);
                if images == &clean {
                    assert!(
                        coded.0.iter().all(|x| x.is_finite()),
                        "{what}: a NaN-free input gives finite sums"
                    );
                }
                assert!(
                    same_bits(&coded.0, &stored.0) && same_bits(&coded.1, &stored.1),
                    "gradients from the choices, {what}, {pieces} pieces"
                );
            }
        }
    }
}
