//! A first layer's output rows straight from the images (`forward`'s and `forward_pool`'s
//! arithmetic): each output pixel's patch times the weight's rows in patch order, + bias, ReLU,
//! with the sums held in registers for the common filter counts and, on AVX-512, the weights held
//! in registers for a 'valid' one-channel layer with a 1 x 1, 2 x 2 or 3 x 3 kernel.
//!
//! Contract: every kernel here gives the same bits (the same multiplications and additions, never
//! fused, in patch order) as `direct_rows_any` and so as the reference's product and epilogue.

use super::{ConvOperands, DIRECT_MAX_PATCH};
use crate::backend::cpu::kernels::im2col::{self, PixelWalk};
#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::simd::{simd, Simd};
use crate::backend::ops::ConvGeometry;

/// A run of output pixels: the first, and the filters each has.
#[derive(Debug, Clone, Copy)]
pub(super) struct OutputPixels {
    pub first: usize,
    pub filters: usize,
}

/// `direct_rows` at the widest vectors the CPU has (`direct_rows_simd`: the same
/// multiplications and additions, never fused, so the same bits at any width; AVX-512 takes a row
/// of 32 sums in two instructions instead of four), or `valid_rows_avx512`'s register-held rows
/// where it takes the layer.
pub(super) fn output_rows(out: &mut [f32], operands: ConvOperands, relu: bool, g: &ConvGeometry, at: OutputPixels) {
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512 {
        // SAFETY: the CPU has AVX-512 (checked just above).
        if unsafe { valid_rows_avx512(out, operands, relu, g, at) } {
            return;
        }
    }
    direct_rows_simd(out, operands, relu, g, at);
}

simd_variants! {
    /// `direct_rows` compiled for the widest vectors the CPU has.
    fn direct_rows_simd(out: &mut [f32], operands: ConvOperands, relu: bool, g: &ConvGeometry, at: OutputPixels) => direct_rows
}

/// `direct_rows` for a 'valid' layer over one channel with a common patch (1 x 1, 2 x 2, 3 x 3)
/// and 16 or 32 filters, on AVX-512: each pixel's patch values are broadcast straight from the
/// image (no patch copied out, no per-pixel walk), the weights held in registers, the same
/// multiplications and additions in the same order as `direct_rows_fixed` (so the same bits).
/// Returns false, having written nothing, for any other layer.
///
/// # Safety
/// AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn valid_rows_avx512(
    out: &mut [f32],
    operands: ConvOperands,
    relu: bool,
    g: &ConvGeometry,
    at: OutputPixels,
) -> bool {
    if g.pad != 0 || g.in_ch != 1 || g.kh != g.kw {
        return false;
    }
    // SAFETY: the CPU has AVX-512 (the caller's contract); the geometry is the kernels' own.
    unsafe {
        match (g.patch(), at.filters) {
            (9, 32) => valid_rows_fixed::<9, 2>(out, operands, relu, g, at.first),
            (9, 16) => valid_rows_fixed::<9, 1>(out, operands, relu, g, at.first),
            (4, 32) => valid_rows_fixed::<4, 2>(out, operands, relu, g, at.first),
            (4, 16) => valid_rows_fixed::<4, 1>(out, operands, relu, g, at.first),
            (1, 32) => valid_rows_fixed::<1, 2>(out, operands, relu, g, at.first),
            (1, 16) => valid_rows_fixed::<1, 1>(out, operands, relu, g, at.first),
            _ => return false,
        }
    }
    true
}

/// `valid_rows_avx512` for a patch of P values and V vectors of filters.
///
/// # Safety
/// AVX-512; 'valid' padding over one channel, P = the patch, 16 V = the filters.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn valid_rows_fixed<const P: usize, const V: usize>(
    out: &mut [f32],
    ConvOperands { inp, weight, bias }: ConvOperands,
    relu: bool,
    g: &ConvGeometry,
    first: usize,
) {
    use std::arch::x86_64::*;
    // The geometry `valid_rows_avx512` chose this kernel for: the reads below rely on it.
    assert!(g.pad == 0 && g.in_ch == 1 && g.kh == g.kw && g.kh * g.kw == P);
    let filters = 16 * V;
    let pixels = out.len() / filters;
    let (oh, ow) = (g.oh(), g.ow());
    // Every pixel read lies in the images, every weight and bias in its operand.
    assert!(weight.len() >= P * filters && bias.is_none_or(|b| b.len() >= filters));
    assert!(pixels == 0 || first + pixels <= g.pixels() && inp.len() >= g.image_len());
    // Patch value kk's offset from the patch's first pixel.
    let offsets: [usize; P] = std::array::from_fn(|kk| kk / g.kw * g.w + kk % g.kw);
    // SAFETY: weight and bias hold P x filters and filters values (asserted above); pixel
    // first + done lies in the images, so its row's run of `len` pixels and their patches
    // ('valid') do too, and its `len` outputs in `out`.
    unsafe {
        let w: [[__m512; V]; P] = std::array::from_fn(|kk| {
            std::array::from_fn(|v| _mm512_loadu_ps(weight.as_ptr().add(kk * filters + 16 * v)))
        });
        let b: Option<[__m512; V]> = bias.map(|b| std::array::from_fn(|v| _mm512_loadu_ps(b.as_ptr().add(16 * v))));
        let zero = _mm512_setzero_ps();
        let mut dst = out.as_mut_ptr();
        let mut done = 0;
        while done < pixels {
            let p = first + done;
            let (image, oy, ox) = (p / (oh * ow), p % (oh * ow) / ow, p % ow);
            let len = (ow - ox).min(pixels - done);
            let mut src = inp.as_ptr().add((image * g.h + oy) * g.w + ox);
            for _ in 0..len {
                let mut acc = [zero; V];
                for (kk, &offset) in offsets.iter().enumerate() {
                    let x = _mm512_set1_ps(*src.add(offset));
                    for v in 0..V {
                        acc[v] = _mm512_add_ps(acc[v], _mm512_mul_ps(x, w[kk][v]));
                    }
                }
                for v in 0..V {
                    if let Some(b) = &b {
                        acc[v] = _mm512_add_ps(acc[v], b[v]);
                    }
                    if relu {
                        acc[v] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(acc[v], zero), acc[v]);
                    }
                    _mm512_storeu_ps(dst.add(16 * v), acc[v]);
                }
                src = src.add(1);
                dst = dst.add(filters);
            }
            done += len;
        }
    }
}

/// Output pixels first.. (as many as `out` holds) of `forward`: with a filter count the
/// accumulators can be registers for (the book's 32, and 8, 16, 64), through `direct_rows_fixed`.
#[inline(always)]
pub(super) fn direct_rows(out: &mut [f32], operands: ConvOperands, relu: bool, g: &ConvGeometry, at: OutputPixels) {
    let first = at.first;
    match at.filters {
        8 => direct_rows_fixed::<8>(out, operands, relu, g, first),
        16 => direct_rows_fixed::<16>(out, operands, relu, g, first),
        32 => direct_rows_fixed::<32>(out, operands, relu, g, first),
        64 => direct_rows_fixed::<64>(out, operands, relu, g, first),
        _ => direct_rows_any(out, operands, relu, g, at),
    }
}

/// `direct_rows` for `F` filters: the same operations in the same order as `direct_rows_any`
/// (so the same bits), with the F sums held in registers instead of the output row.
#[inline(always)]
fn direct_rows_fixed<const F: usize>(
    out: &mut [f32],
    ConvOperands { inp, weight, bias }: ConvOperands,
    relu: bool,
    g: &ConvGeometry,
    first: usize,
) {
    let k = g.patch();
    let mut patch = [0.0f32; DIRECT_MAX_PATCH];
    let mut at = PixelWalk::at(g, first);
    for o in out.chunks_exact_mut(F) {
        im2col::patch_into(&mut patch[..k], inp, g, &at);
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
pub(super) fn direct_rows_any(
    out: &mut [f32],
    ConvOperands { inp, weight, bias }: ConvOperands,
    relu: bool,
    g: &ConvGeometry,
    OutputPixels { first, filters }: OutputPixels,
) {
    let k = g.patch();
    let mut patch = [0.0f32; DIRECT_MAX_PATCH];
    let mut at = PixelWalk::at(g, first);
    for o in out.chunks_exact_mut(filters) {
        im2col::patch_into(&mut patch[..k], inp, g, &at);
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
