//! A first layer's weight and bias gradients straight from the images (`weight_gradient`), from
//! its output's gradient or from its pool's (`Gradient::Pooled`, by the stored output or the
//! choices `forward_pool` kept), on AVX-512: each thread takes groups of 16 filters and sums them
//! in registers over every pixel's patch.
//!
//! Contract: the bits of the fast path's dense products over the patch matrix (fused
//! multiply-adds in pixel order, in the K pieces of `sgemm::sgemm`) and of
//! `elementwise::bias_backward` (row order); from a pool's gradient, the bits of
//! `maxpool::maxpool_backward` then those products.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
use super::pool::window_max;
use super::{DIRECT_MAX_PATCH, GROUP};
use crate::backend::cpu::kernels::gemm;
#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::kernels::im2col::{self, PixelWalk};
use crate::backend::cpu::threads::{self, MAX_CHUNKS};
use crate::backend::ops::{ConvGeometry, PoolShape};

/// 16 columns of the output's gradient from `j0`, in rows of `filters`.
#[derive(Debug, Clone, Copy)]
struct FilterGroup {
    filters: usize,
    j0: usize,
}

/// The images (images, h, w, in_ch) and where the layer's output gradient comes from.
#[derive(Clone, Copy)]
struct GroupOperands<'a> {
    inp: &'a [f32],
    source: Gradient<'a>,
}

/// `len` output pixels of image `image`'s row `y` from column `x0`, in images of oh x ow pixels.
#[derive(Debug, Clone, Copy)]
struct RowRun {
    image: usize,
    y: usize,
    x0: usize,
    len: usize,
    oh: usize,
    ow: usize,
}

/// The most filters `weight_gradient` takes: a group per item of `threads::for_each`.
pub const MAX_FILTERS: usize = GROUP * MAX_CHUNKS;

/// One group's sums: the patch's rows of the weight gradient, then the bias gradient.
type GroupSums = [f32; (DIRECT_MAX_PATCH + 1) * GROUP];

/// dweight (patch, filters) = patches^T @ dout and dbias (filters) = the column sums of dout, for
/// dout (pixels, filters) as `source` gives it, in one pass: the threads of `threads` each take groups
/// of 16 filters (whole cache lines of dout's rows), read every pixel's patch from the images and
/// multiply-add it into the group's sums. Each weight sum runs in pixel order within each of
/// `pieces` equal runs of the pixels, and the runs' sums are added in order (the split over K of
/// `sgemm::sgemm`); each bias sum adds the rows in order from 0. Whatever the source, dout's
/// values, and so the bits, are those of the stored gradient.
///
/// The CPU must have AVX-512 (`gemm::available`), `filters` must be a multiple of 16 up to
/// `MAX_FILTERS`, the patch at most `DIRECT_MAX_PATCH` values and the source's operands as large
/// as `Gradient` says; otherwise this panics.
pub fn weight_gradient(
    dweight: &mut [f32],
    dbias: &mut [f32],
    inp: &[f32],
    source: Gradient,
    g: &ConvGeometry,
    filters: usize,
    pieces: usize,
) {
    let fits = match source {
        Gradient::Rows { dout } => dout.len() >= g.pixels() * filters,
        Gradient::Pooled { dpool, pool, choices } => {
            let chosen = match choices {
                Choices::Output(out) => out.len() >= pool.in_len(),
                Choices::Codes(codes) => codes.len() >= pool.out_len(),
            };
            let over_layer = (pool.images, pool.h, pool.w, pool.ch) == (g.images, g.oh(), g.ow(), filters);
            pool.size == 2 && over_layer && dpool.len() >= pool.out_len() && chosen
        }
    };
    assert!(fits, "the output gradient's operands do not fit the layer");
    let patch = g.patch();
    assert!(gemm::available() && filters.is_multiple_of(GROUP) && filters <= MAX_FILTERS);
    assert!(patch <= DIRECT_MAX_PATCH && inp.len() >= g.image_len());
    let mut sums = [[0.0f32; (DIRECT_MAX_PATCH + 1) * GROUP]; MAX_CHUNKS];
    let mut groups = sums.iter_mut().take(filters / GROUP).enumerate();
    let items: [_; MAX_CHUNKS] = std::array::from_fn(|_| groups.next());
    threads::for_each(items, &|(group, out): (usize, &mut GroupSums)| {
        let columns = FilterGroup {
            filters,
            j0: group * GROUP,
        };
        // SAFETY: the CPU has AVX-512; the gradient's operands cover the pixels (or the pool's
        // windows) and the group's columns lie inside a row; inp holds the images (all asserted
        // above).
        unsafe { group_sums(out, GroupOperands { inp, source }, g, columns, pieces.max(1)) }
    });
    for (group, sums) in sums.iter().take(filters / GROUP).enumerate() {
        let j0 = group * GROUP;
        for (kk, row) in sums.chunks_exact(GROUP).take(patch).enumerate() {
            dweight[kk * filters + j0..][..GROUP].copy_from_slice(row);
        }
        dbias[j0..j0 + GROUP].copy_from_slice(&sums[patch * GROUP..][..GROUP]);
    }
}

/// Where a first layer's output gradient dout (pixels, filters) comes from.
#[derive(Clone, Copy)]
pub enum Gradient<'a> {
    /// dout as it lies.
    Rows { dout: &'a [f32] },
    /// The gradient dpool of a 2 x 2 max pool (`pool`) over the layer's output, passed back
    /// through the layer's ReLU: dpool at each window's first maximum where that maximum is > 0,
    /// 0 elsewhere, as `maxpool::maxpool_backward` writes it.
    Pooled {
        dpool: &'a [f32],
        pool: PoolShape,
        choices: Choices<'a>,
    },
}

/// A pool's gradient and the choices `forward_pool` kept, for `group_sums_coded_3x3`.
#[derive(Clone, Copy)]
struct Coded<'a> {
    dpool: &'a [f32],
    pool: &'a PoolShape,
    codes: &'a [u8],
}

/// How a pool's backward pass finds each window's first maximum.
#[derive(Clone, Copy)]
pub enum Choices<'a> {
    /// Again, in the layer's output (pixels, filters).
    Output(&'a [f32]),
    /// As `forward_pool` kept them: one byte a pool output.
    Codes(&'a [u8]),
}

/// `weight_gradient`'s sums for the group of 16 filters from `j0`, into `out`, with the patch
/// length a constant where it is a common one (the sums then stay in registers).
///
/// # Safety
/// As `weight_gradient` asserts: AVX-512, the gradient's rows of `filters` cover the images'
/// pixels and j0 + 16 <= filters.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn group_sums(
    out: &mut GroupSums,
    operands: GroupOperands,
    g: &ConvGeometry,
    group: FilterGroup,
    pieces: usize,
) {
    let GroupOperands { inp, source } = operands;
    // SAFETY: the caller's contract.
    unsafe {
        if let Gradient::Pooled {
            dpool,
            pool,
            choices: Choices::Codes(codes),
        } = source
        {
            let valid_3x3 = (g.kh, g.kw, g.in_ch, g.pad) == (3, 3, 1, 0);
            if valid_3x3 && pool.size == 2 {
                return group_sums_coded_3x3(
                    out,
                    inp,
                    Coded {
                        dpool,
                        pool: &pool,
                        codes,
                    },
                    g,
                    group,
                    pieces,
                );
            }
        }
        match g.patch() {
            1 => group_sums_fixed::<1>(out, operands, g, group, pieces),
            4 => group_sums_fixed::<4>(out, operands, g, group, pieces),
            9 => group_sums_fixed::<9>(out, operands, g, group, pieces),
            16 => group_sums_fixed::<16>(out, operands, g, group, pieces),
            _ => group_sums_fixed::<DIRECT_MAX_PATCH>(out, operands, g, group, pieces),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn group_sums(_: &mut GroupSums, _: GroupOperands, _: &ConvGeometry, _: FilterGroup, _: usize) {
    unreachable!("weight_gradient runs only where gemm::available() holds, which is x86-64 with AVX-512")
}

/// `group_sums` for the book's first layer (3 x 3, 'valid', one channel) under a 2 x 2 pool whose
/// choices `forward_pool` kept: the same sums in the same order as `group_sums_fixed::<9>` over
/// `fill_row`'s gradients, with each pixel's gradient formed as it is used (a window's choice
/// and gradient loaded at its left pixel, or at a run's first pixel) and the patch read through three row pointers at fixed
/// displacements, so that nothing goes through memory between the two.
///
/// # Safety
/// As `group_sums`, with the pool over the layer's output (`weight_gradient` asserts it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn group_sums_coded_3x3(
    out: &mut GroupSums,
    inp: &[f32],
    Coded { dpool, pool, codes }: Coded,
    g: &ConvGeometry,
    FilterGroup { filters, j0 }: FilterGroup,
    pieces: usize,
) {
    use std::arch::x86_64::*;
    // The geometry `group_sums` chose this kernel for, and `weight_gradient`'s operand checks:
    // the reads below rely on them.
    assert!((g.kh, g.kw, g.in_ch, g.pad) == (3, 3, 1, 0) && pool.size == 2);
    assert!((pool.images, pool.h, pool.w, pool.ch) == (g.images, g.oh(), g.ow(), filters) && j0 + GROUP <= filters);
    assert!(dpool.len() >= pool.out_len() && codes.len() >= pool.out_len() && inp.len() >= g.image_len());
    let (pixels, (oh, ow), (ph, pw)) = (g.pixels(), (g.oh(), g.ow()), (pool.oh(), pool.ow()));
    let span = pixels.div_ceil(pieces);
    // SAFETY: pixel p < pixels lies in its image, and so do the 3 x 3 pixels of its patch
    // ('valid'); window (b, wy, wx) with wy < ph, wx < pw has its gradient and code at `at`,
    // inside dpool and codes (the caller's contract), and j0 + 16 <= filters.
    unsafe {
        let zero = _mm512_setzero_ps();
        let mut total = [zero; 9];
        let mut bias = zero;
        for piece in 0..pieces {
            let (first, end) = ((piece * span).min(pixels), ((piece + 1) * span).min(pixels));
            let mut sums = [zero; 9];
            let mut p = first;
            while p < end {
                // A run of output row (b, oy) from column ox.
                let (b, oy, ox) = (p / (oh * ow), p % (oh * ow) / ow, p % ow);
                let len = (ow - ox).min(end - p);
                let r0 = inp.as_ptr().add((b * g.h + oy) * g.w + ox);
                let (r1, r2) = (r0.add(g.w), r0.add(2 * g.w));
                let wy = oy / 2;
                // This row's positions in a window (ky 2 + kx): 0 and 1, or 2 and 3.
                let left_at = _mm512_set1_epi32(2 * (oy % 2) as i32);
                let right_at = _mm512_set1_epi32(2 * (oy % 2) as i32 + 1);
                let (mut left, mut right, mut gradient) = (0u16, 0u16, zero);
                for i in 0..len {
                    let x = ox + i;
                    if i == 0 || x % 2 == 0 {
                        let wx = x / 2;
                        (left, right) = (0, 0);
                        if wy < ph && wx < pw {
                            let at = ((b * ph + wy) * pw + wx) * filters + j0;
                            let chosen = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(at).cast()));
                            left = _mm512_cmpeq_epi32_mask(chosen, left_at);
                            right = _mm512_cmpeq_epi32_mask(chosen, right_at);
                            gradient = _mm512_loadu_ps(dpool.as_ptr().add(at));
                        }
                    }
                    let d = _mm512_maskz_mov_ps(if x % 2 == 0 { left } else { right }, gradient);
                    bias = _mm512_add_ps(bias, d);
                    for (t, row) in [r0, r1, r2].into_iter().enumerate() {
                        for kx in 0..3 {
                            let x = _mm512_set1_ps(*row.add(i + kx));
                            sums[3 * t + kx] = _mm512_fmadd_ps(x, d, sums[3 * t + kx]);
                        }
                    }
                }
                p += len;
            }
            for (t, s) in total.iter_mut().zip(sums) {
                *t = if piece == 0 { s } else { _mm512_add_ps(*t, s) };
            }
        }
        for (kk, t) in total.iter().enumerate() {
            _mm512_storeu_ps(out[kk * GROUP..].as_mut_ptr(), *t);
        }
        _mm512_storeu_ps(out[9 * GROUP..].as_mut_ptr(), bias);
    }
}

/// `group_sums` for a patch of P values (P = `DIRECT_MAX_PATCH`: of the geometry's patch, with the
/// values past it zero and their sums unused). With 'valid' padding every patch value is a pixel
/// at a fixed offset from the patch's first, so the FMAs read the images directly, a run of an
/// output row at a time; with padding each patch is copied out first (`patch_into`, zeros over
/// the padding), as the patch matrix holds it.
///
/// # Safety
/// As `group_sums`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn group_sums_fixed<const P: usize>(
    out: &mut GroupSums,
    GroupOperands { inp, source }: GroupOperands,
    g: &ConvGeometry,
    group: FilterGroup,
    pieces: usize,
) {
    use std::arch::x86_64::*;
    let (k, pixels, (oh, ow)) = (g.patch(), g.pixels(), (g.oh(), g.ow()));
    let span = pixels.div_ceil(pieces);
    // Patch value kk's offset from the patch's first value in the images ('valid' padding): its
    // kernel row's start plus its place in that row's run of kw x in_ch values.
    let run = g.kw * g.in_ch;
    let offsets: [usize; P] = std::array::from_fn(|kk| if kk < k { kk / run * g.w * g.in_ch + kk % run } else { 0 });
    let mut patch = [0.0f32; P];
    let mut row = [_mm512_setzero_ps(); ROW_RUN];
    // SAFETY: `fill_row` reads inside the gradient's operands for a pixel p < pixels (the
    // caller's contract); with 'valid' padding, the patch values of pixel p lie inside its image
    // (the last at the kernel's last row and column).
    unsafe {
        let mut total = [_mm512_setzero_ps(); P];
        let mut bias = _mm512_setzero_ps();
        for piece in 0..pieces {
            let (first, end) = ((piece * span).min(pixels), ((piece + 1) * span).min(pixels));
            let mut sums = [_mm512_setzero_ps(); P];
            let mut p = first;
            while p < end {
                // A run of output row (b, oy) from column ox, its gradients in `row`.
                let (b, oy, ox) = (p / (oh * ow), p % (oh * ow) / ow, p % ow);
                let len = (ow - ox).min(end - p).min(ROW_RUN);
                let run = RowRun {
                    image: b,
                    y: oy,
                    x0: ox,
                    len,
                    oh,
                    ow,
                };
                fill_row(&mut row, source, run, group);
                let mut at = PixelWalk::at(g, p);
                let mut first_value = inp.as_ptr().add(((b * g.h + oy) * g.w + ox) * g.in_ch);
                for &d in &row[..len] {
                    bias = _mm512_add_ps(bias, d);
                    if g.pad == 0 {
                        for (sum, &offset) in sums.iter_mut().zip(&offsets) {
                            *sum = _mm512_fmadd_ps(_mm512_set1_ps(*first_value.add(offset)), d, *sum);
                        }
                        first_value = first_value.add(g.in_ch);
                    } else {
                        im2col::patch_into(&mut patch[..k], inp, g, &at);
                        at.advance();
                        for (sum, &v) in sums.iter_mut().zip(&patch) {
                            *sum = _mm512_fmadd_ps(_mm512_set1_ps(v), d, *sum);
                        }
                    }
                }
                p += len;
            }
            for (t, s) in total.iter_mut().zip(sums) {
                *t = if piece == 0 { s } else { _mm512_add_ps(*t, s) };
            }
        }
        for (kk, t) in total.iter().enumerate().take(k) {
            _mm512_storeu_ps(out[kk * GROUP..].as_mut_ptr(), *t);
        }
        _mm512_storeu_ps(out[k * GROUP..].as_mut_ptr(), bias);
    }
}

/// The most pixels of an output row `group_sums_fixed` takes at a time.
const ROW_RUN: usize = 32;

/// row[..len] = the output gradient of pixels (b, y, x0..x0 + len) (of images of oh x ow pixels)
/// at filters j0..j0 + 16. Pooled: each window's maximum is found as
/// `maxpool::maxpool_backward` finds it (the first strictly greater value in row-major order,
/// NaN never greater), and a pixel gets the window's gradient if it is that maximum and the
/// maximum is > 0; pixels outside every window get 0.
///
/// # Safety
/// AVX-512; the pixels lie in the images, len <= ROW_RUN and j0 + 16 <= filters.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fill_row(
    row: &mut [std::arch::x86_64::__m512; ROW_RUN],
    source: Gradient,
    RowRun {
        image: b,
        y,
        x0,
        len,
        oh,
        ow,
    }: RowRun,
    FilterGroup { filters, j0 }: FilterGroup,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract; a window's four pixels and its gradient lie inside `out`
    // and `dpool` (their lengths asserted by `weight_gradient`).
    unsafe {
        match source {
            Gradient::Rows { dout } => {
                let mut d = dout.as_ptr().add(((b * oh + y) * ow + x0) * filters + j0);
                for slot in &mut row[..len] {
                    *slot = _mm512_loadu_ps(d);
                    d = d.add(filters);
                }
            }
            Gradient::Pooled { dpool, pool, choices } => {
                let (wy, (ph, pw)) = (y / 2, (pool.oh(), pool.ow()));
                // This row's positions in a window (ky 2 + kx): 0 and 1, or 2 and 3.
                let first = 2 * (y % 2);
                // The lanes whose window maximum is this row's left and right pixel, and the
                // window's gradient where the maximum is > 0.
                let (mut left, mut right, mut gradient) = (0u16, 0u16, _mm512_setzero_ps());
                for (x, slot) in (x0..x0 + len).zip(row.iter_mut()) {
                    let wx = x / 2;
                    if wy >= ph || wx >= pw {
                        *slot = _mm512_setzero_ps();
                        continue;
                    }
                    if x == x0 || x % 2 == 0 {
                        let at = ((b * ph + wy) * pw + wx) * filters + j0;
                        (left, right) = match choices {
                            Choices::Output(out) => {
                                let top_left = ((b * pool.h + 2 * wy) * pool.w + 2 * wx) * filters + j0;
                                let (best, more) = window_max(out.as_ptr().add(top_left), filters, pool.w * filters);
                                let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(best, _mm512_setzero_ps());
                                // Position p holds the maximum where p's mask does and no later one.
                                let (m1, m2, m3) = (more[0], more[1], more[2]);
                                let holds = [!(m1 | m2 | m3), m1 & !(m2 | m3), m2 & !m3, m3];
                                (holds[first] & positive, holds[first + 1] & positive)
                            }
                            Choices::Codes(codes) => {
                                let chosen = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(at).cast()));
                                let position = |p: usize| _mm512_cmpeq_epi32_mask(chosen, _mm512_set1_epi32(p as i32));
                                (position(first), position(first + 1))
                            }
                        };
                        gradient = _mm512_loadu_ps(dpool.as_ptr().add(at));
                    }
                    let here = if x % 2 == 0 { left } else { right };
                    *slot = _mm512_maskz_mov_ps(here, gradient);
                }
            }
        }
    }
}
