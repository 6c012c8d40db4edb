//! A first convolution layer straight from the pixels, for a patch of at most
//! `DIRECT_MAX_PATCH` values (the book's first layer: 3 x 3 over one channel), where writing the
//! patch matrix would cost more than the products that read it; and, where a 2 x 2 max pool
//! follows it, the layer and the pool as one pass each way.
//!
//! Contract: `forward` gives the bits of the reference's product and epilogue over the patch
//! matrix (the same multiplications and additions, in patch order, without fused multiply-adds),
//! and `forward_pool` the bits of `forward` then `cpu_conv::maxpool_forward`, with each window's
//! choice kept instead of the layer's output. `weight_gradient` gives the bits of the fast path's
//! dense products over the patch matrix (the weight gradient's fused multiply-adds in pixel order,
//! in the same K pieces as `products::sgemm`, and the bias gradient's sums in row order, as
//! `cpu_fast::bias_backward`), reading each pixel's patch from the images and each row of the
//! output's gradient once for both; from a pool's gradient (`Gradient::Pooled`, by the stored
//! output or the kept choices) it gives the bits of `cpu_conv::maxpool_backward` then the
//! product, forming the layer's output gradient as it goes instead of reading it from memory.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use crate::backend::cpu_conv::{self, PixelWalk};
use crate::backend::cpu_pool;
use crate::backend::cpu_sparse;
use crate::backend::ops::{ConvGeometry, PoolShape};

/// Patches of at most this many values go straight from the images.
pub const DIRECT_MAX_PATCH: usize = 16;

/// `CpuBackend::direct_forward`'s arithmetic, split over the pool's threads by images: each
/// output pixel's patch (zeros over the padding) times the weight's rows, in patch order, then
/// + bias and ReLU, as the reference's product and epilogue do.
pub fn forward(
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
    let chunks = cpu_sparse::chunk_count(g.images);
    let images = g.images.div_ceil(chunks);
    let mut pieces = out[..g.images * per_image].chunks_mut(images * per_image).enumerate();
    let items: [_; cpu_sparse::MAX_CHUNKS] = std::array::from_fn(|_| pieces.next());
    cpu_pool::for_each(items, &|(p, o): (usize, &mut [f32])| {
        let first = p * images * g.oh() * g.ow();
        output_rows(o, (inp, weight, bias), relu, g, (first, filters));
    });
}

/// The most values of two output rows `forward_pool` holds at once (on each thread's stack).
pub const POOL_BAND_MAX: usize = 4096;

/// pooled (images, oh / 2, ow / 2, filters) = a 2 x 2 max pool of `forward`'s output, and codes
/// (the same shape) each window's choice (`pool_band`), split over the pool's
/// threads by images: the output is computed two rows at a time, as `forward` computes it, and
/// pooled at once, never stored whole. The pool must be 2 x 2 over the layer's output, and two
/// rows of the windows' pixels at most `POOL_BAND_MAX` values, the filters a multiple of 16 and
/// the CPU must have AVX-512; otherwise this panics.
pub fn forward_pool(
    (pooled, codes): (&mut [f32], &mut [u8]),
    (inp, weight, bias): (&[f32], &[f32], Option<&[f32]>),
    relu: bool,
    (g, pool): (&ConvGeometry, &PoolShape),
    filters: usize,
) {
    assert!(pool.size == 2 && (pool.images, pool.h, pool.w, pool.ch) == (g.images, g.oh(), g.ow(), filters));
    assert!(crate::backend::cpu_gemm::available() && filters.is_multiple_of(GROUP));
    let (ph, pw) = (pool.oh(), pool.ow());
    // The pixels of a band's row that some window covers.
    let width = 2 * pw;
    assert!(2 * width * filters <= POOL_BAND_MAX);
    let per_image = ph * pw * filters;
    if per_image == 0 || g.images == 0 {
        return;
    }
    let images = g.images.div_ceil(cpu_sparse::chunk_count(g.images));
    let pooled = pooled[..g.images * per_image].chunks_mut(images * per_image);
    let mut pieces = pooled
        .zip(codes[..g.images * per_image].chunks_mut(images * per_image))
        .enumerate();
    let items: [_; cpu_sparse::MAX_CHUNKS] = std::array::from_fn(|_| pieces.next());
    cpu_pool::for_each(items, &|(p, (o, c)): (usize, (&mut [f32], &mut [u8]))| {
        let mut band = [0.0f32; POOL_BAND_MAX];
        let band = &mut band[..2 * width * filters];
        let rows = o.chunks_exact_mut(pw * filters).zip(c.chunks_exact_mut(pw * filters));
        for (k, (o_row, c_row)) in rows.enumerate() {
            let (image, py) = (p * images + k / ph, k % ph);
            for (dy, band_row) in band.chunks_exact_mut(width * filters).enumerate() {
                let first = (image * g.oh() + 2 * py + dy) * g.ow();
                output_rows(band_row, (inp, weight, bias), relu, g, (first, filters));
            }
            // SAFETY: the CPU has AVX-512 (`forward_pool` asserts it), the band holds two rows of
            // `width` pixels.
            unsafe { pool_band(o_row, c_row, band, (width * filters, filters)) };
        }
    });
}

/// What a 2 x 2 window's first maximum chose, one byte a channel: its position (ky 2 + kx) where
/// the maximum is > 0, else `NOT_POSITIVE` (the ReLU before the pool passes no gradient back).
pub const NOT_POSITIVE: u8 = 4;

/// One output row of a 2 x 2 max pool over `band` (the two rows of its windows' pixels, each
/// `row` values long, pixels of `filters` channels, a multiple of 16): out (width / 2, filters) =
/// each window's first maximum, as `cpu_conv::maxpool_forward` selects it (the first strictly
/// greater value in row-major order, NaN never greater), and codes its choice.
///
/// # Safety
/// AVX-512; `band` holds two rows of `row` values, out and codes at most row / 2 values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pool_band(out: &mut [f32], codes: &mut [u8], band: &[f32], (row, filters): (usize, usize)) {
    use std::arch::x86_64::*;
    assert!(band.len() >= 2 * row && out.len() <= row / 2 && codes.len() >= out.len() && filters % GROUP == 0);
    // SAFETY: window (ox, channels c..c + 16) reads band values 2 ox filters + c .. + 16 of both
    // rows, and writes out and codes at ox filters + c .. + 16, all inside (asserted above).
    unsafe {
        for at in (0..out.len()).step_by(GROUP) {
            let (ox, c) = (at / filters, at % filters);
            let (best, more) = window_max(band.as_ptr().add(2 * ox * filters + c), (filters, row));
            let mut choice = _mm512_setzero_si512();
            for (pos, more) in (1..).zip(more) {
                choice = _mm512_mask_mov_epi32(choice, more, _mm512_set1_epi32(pos));
            }
            let not_positive = !_mm512_cmp_ps_mask::<_CMP_GT_OQ>(best, _mm512_setzero_ps());
            choice = _mm512_mask_mov_epi32(choice, not_positive, _mm512_set1_epi32(NOT_POSITIVE as i32));
            _mm512_storeu_ps(out.as_mut_ptr().add(at), best);
            _mm_storeu_si128(codes.as_mut_ptr().add(at).cast(), _mm512_cvtepi32_epi8(choice));
        }
    }
}

/// The first maxima of the 16 channels of a 2 x 2 window whose top-left values start at
/// `top_left` (its right neighbour `right` values on, the row below `down` on), and for positions
/// 1, 2, 3 (ky 2 + kx) the lanes where that value was strictly greater than every one before it
/// (NaN never is): the first maximum of a lane is at the last position whose mask holds it, or
/// at 0. The same selections as `cpu_conv::maxpool_forward`.
///
/// # Safety
/// AVX-512; the window's 4 x 16 values lie inside one allocation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn window_max(top_left: *const f32, (right, down): (usize, usize)) -> (std::arch::x86_64::__m512, [u16; 3]) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let mut best = _mm512_loadu_ps(top_left);
        let mut more = [0u16; 3];
        for (mask, offset) in more.iter_mut().zip([right, down, down + right]) {
            let value = _mm512_loadu_ps(top_left.add(offset));
            *mask = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(value, best);
            best = _mm512_mask_mov_ps(best, *mask, value);
        }
        (best, more)
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pool_band(_: &mut [f32], _: &mut [u8], _: &[f32], _: (usize, usize)) {
    unreachable!("forward_pool runs only where cpu_gemm::available() holds, which is x86-64 with AVX-512")
}

/// `direct_rows` with AVX-512 or AVX2 where the CPU has it (the same multiplications and
/// additions, never fused, so the same bits either way; AVX-512 takes a row of 32 sums in two
/// instructions instead of four), or `valid_rows_avx512`'s register-held rows where it takes the
/// layer.
fn output_rows(
    out: &mut [f32],
    operands: (&[f32], &[f32], Option<&[f32]>),
    relu: bool,
    g: &ConvGeometry,
    at: (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::backend::cpu_gemm::available() {
            // SAFETY: the CPU has AVX-512 (checked just above).
            if unsafe { valid_rows_avx512(out, operands, relu, g, at) } {
                return;
            }
            // SAFETY: as above.
            unsafe { direct_rows_avx512(out, operands, relu, g, at) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { direct_rows_avx2(out, operands, relu, g, at) };
            return;
        }
    }
    direct_rows(out, operands, relu, g, at);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn direct_rows_avx512(
    out: &mut [f32],
    operands: (&[f32], &[f32], Option<&[f32]>),
    relu: bool,
    g: &ConvGeometry,
    at: (usize, usize),
) {
    direct_rows(out, operands, relu, g, at)
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
unsafe fn valid_rows_avx512(
    out: &mut [f32],
    operands: (&[f32], &[f32], Option<&[f32]>),
    relu: bool,
    g: &ConvGeometry,
    at: (usize, usize),
) -> bool {
    if g.pad != 0 || g.in_ch != 1 || g.kh != g.kw {
        return false;
    }
    // SAFETY: the CPU has AVX-512 (the caller's contract); the geometry is the kernels' own.
    unsafe {
        match (g.patch(), at.1) {
            (9, 32) => valid_rows_fixed::<9, 2>(out, operands, relu, g, at.0),
            (9, 16) => valid_rows_fixed::<9, 1>(out, operands, relu, g, at.0),
            (4, 32) => valid_rows_fixed::<4, 2>(out, operands, relu, g, at.0),
            (4, 16) => valid_rows_fixed::<4, 1>(out, operands, relu, g, at.0),
            (1, 32) => valid_rows_fixed::<1, 2>(out, operands, relu, g, at.0),
            (1, 16) => valid_rows_fixed::<1, 1>(out, operands, relu, g, at.0),
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
    (inp, weight, bias): (&[f32], &[f32], Option<&[f32]>),
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

/// Output pixels first.. (as many as `out` holds) of `forward`: with a filter count the
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

/// Columns of the output's gradient one item of `weight_gradient` sums: an AVX-512 vector.
const GROUP: usize = 16;

/// The most filters `weight_gradient` takes: a group per item of `cpu_pool::for_each`.
pub const MAX_FILTERS: usize = GROUP * cpu_sparse::MAX_CHUNKS;

/// One group's sums: the patch's rows of the weight gradient, then the bias gradient.
type GroupSums = [f32; (DIRECT_MAX_PATCH + 1) * GROUP];

/// dweight (patch, filters) = patches^T @ dout and dbias (filters) = the column sums of dout, for
/// dout (pixels, filters) as `source` gives it, in one pass: the pool's threads each take groups
/// of 16 filters (whole cache lines of dout's rows), read every pixel's patch from the images and
/// multiply-add it into the group's sums. Each weight sum runs in pixel order within each of
/// `pieces` equal runs of the pixels, and the runs' sums are added in order (the split over K of
/// `products::sgemm`); each bias sum adds the rows in order from 0. Whatever the source, dout's
/// values, and so the bits, are those of the stored gradient.
///
/// The CPU must have AVX-512 (`cpu_gemm::available`), `filters` must be a multiple of 16 up to
/// `MAX_FILTERS`, the patch at most `DIRECT_MAX_PATCH` values and the source's operands as large
/// as `Gradient` says; otherwise this panics.
pub fn weight_gradient(
    (dweight, dbias): (&mut [f32], &mut [f32]),
    (inp, source): (&[f32], Gradient),
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
    assert!(crate::backend::cpu_gemm::available() && filters.is_multiple_of(GROUP) && filters <= MAX_FILTERS);
    assert!(patch <= DIRECT_MAX_PATCH && inp.len() >= g.image_len());
    let mut sums = [[0.0f32; (DIRECT_MAX_PATCH + 1) * GROUP]; cpu_sparse::MAX_CHUNKS];
    let mut groups = sums.iter_mut().take(filters / GROUP).enumerate();
    let items: [_; cpu_sparse::MAX_CHUNKS] = std::array::from_fn(|_| groups.next());
    cpu_pool::for_each(items, &|(group, out): (usize, &mut GroupSums)| {
        // SAFETY: the CPU has AVX-512; the gradient's operands cover the pixels (or the pool's
        // windows) and the group's columns lie inside a row; inp holds the images (all asserted
        // above).
        unsafe { group_sums(out, (inp, source), g, (filters, group * GROUP), pieces.max(1)) }
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
    /// 0 elsewhere, as `cpu_conv::maxpool_backward` writes it.
    Pooled {
        dpool: &'a [f32],
        pool: PoolShape,
        choices: Choices<'a>,
    },
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
    operands: (&[f32], Gradient),
    g: &ConvGeometry,
    at: (usize, usize),
    pieces: usize,
) {
    // SAFETY: the caller's contract.
    unsafe {
        if let (
            inp,
            Gradient::Pooled {
                dpool,
                pool,
                choices: Choices::Codes(codes),
            },
        ) = operands
        {
            let valid_3x3 = (g.kh, g.kw, g.in_ch, g.pad) == (3, 3, 1, 0);
            if valid_3x3 && pool.size == 2 {
                return group_sums_coded_3x3(out, inp, (dpool, &pool, codes), g, at, pieces);
            }
        }
        match g.patch() {
            1 => group_sums_fixed::<1>(out, operands, g, at, pieces),
            4 => group_sums_fixed::<4>(out, operands, g, at, pieces),
            9 => group_sums_fixed::<9>(out, operands, g, at, pieces),
            16 => group_sums_fixed::<16>(out, operands, g, at, pieces),
            _ => group_sums_fixed::<DIRECT_MAX_PATCH>(out, operands, g, at, pieces),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn group_sums(_: &mut GroupSums, _: (&[f32], Gradient), _: &ConvGeometry, _: (usize, usize), _: usize) {
    unreachable!("weight_gradient runs only where cpu_gemm::available() holds, which is x86-64 with AVX-512")
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
    (dpool, pool, codes): (&[f32], &PoolShape, &[u8]),
    g: &ConvGeometry,
    (filters, j0): (usize, usize),
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
    (inp, source): (&[f32], Gradient),
    g: &ConvGeometry,
    (filters, j0): (usize, usize),
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
                fill_row(&mut row, source, (b, oy, ox, len), (oh, ow, filters, j0));
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
                        cpu_conv::patch_into(&mut patch[..k], inp, g, &at);
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
/// `cpu_conv::maxpool_backward` finds it (the first strictly greater value in row-major order,
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
    (b, y, x0, len): (usize, usize, usize, usize),
    (oh, ow, filters, j0): (usize, usize, usize, usize),
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
                                let (best, more) = window_max(out.as_ptr().add(top_left), (filters, pool.w * filters));
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn gradients(
        source: Gradient,
        inp: &[f32],
        g: &ConvGeometry,
        filters: usize,
        pieces: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (mut dweight, mut dbias) = (vec![f32::NAN; g.patch() * filters], vec![f32::NAN; filters]);
        weight_gradient((&mut dweight, &mut dbias), (inp, source), g, filters, pieces);
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

    /// The register-held 'valid' rows (`valid_rows_avx512`) give `direct_rows_any`'s bits for every
    /// patch and filter count they take, from a pixel inside a row through the ends of rows and
    /// images, with and without bias and ReLU, NaN and negative zero among the pixels.
    #[test]
    fn valid_rows_give_the_generic_rows_bits() {
        if !crate::backend::cpu_gemm::available() {
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
                    let mut any = vec![f32::NAN; pixels * filters];
                    let operands = (&inp[..], &weight[..], bias);
                    // SAFETY: the CPU has AVX-512 (checked above).
                    taken += usize::from(unsafe { valid_rows_avx512(&mut fast, operands, relu, &g, (first, filters)) });
                    direct_rows_any(&mut any, operands, relu, &g, (first, filters));
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
        let operands = (&[0.0; 100][..], &[0.0; 9 * 16][..], None);
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
            assert!(!unsafe { valid_rows_avx512(&mut out, operands, false, &g, (0, 16)) });
        }
    }

    /// The weight gradient in one pass gives the bits of the patch matrix's split-K product (each
    /// piece's sums as single-rounding multiply-adds in pixel order, the pieces added in order)
    /// and the bias gradient the bits of the reference's row-order sums, and both agree with f64;
    /// at patches with a register-held path (1, 4, 9, 16) and without (12), with and without
    /// padding, over 16 to 48 filters, with one piece and eight (the last ones short or empty).
    #[test]
    fn weight_gradient_gives_the_patch_products_bits() {
        if !crate::backend::cpu_gemm::available() {
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
                cpu_conv::patch_into(row, &inp, &g, &PixelWalk::at(&g, p));
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
                    weight_gradient((&mut dweight, &mut dbias), (&inp, source), &g, filters, pieces);
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
        if !crate::backend::cpu_gemm::available() {
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
                cpu_conv::maxpool_backward(&mut dout, &dpool, &out, &pool, true);
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

    /// The fused forward pass gives the bits of `forward` then `cpu_conv::maxpool_forward`, and its
    /// choices give the backward pass the bits it gets from the stored output: with ties (weights
    /// and pixels on a coarse grid), maxima <= 0 (a negative bias), a NaN pixel, odd outputs and
    /// padding, over 16 and 48 filters.
    #[test]
    fn forward_pool_and_its_choices_give_the_unfused_bits() {
        if !crate::backend::cpu_gemm::available() {
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
                let operands = (&inp[..], &weight[..], Some(&bias[..]));
                let mut out = vec![f32::NAN; pool.in_len()];
                forward(&mut out, operands, true, &g, filters);
                let mut want = vec![f32::NAN; pool.out_len()];
                cpu_conv::maxpool_forward(&mut want, &out, &pool);
                let (mut pooled, mut codes) = (vec![f32::NAN; pool.out_len()], vec![0u8; pool.out_len()]);
                forward_pool((&mut pooled, &mut codes), operands, true, (&g, &pool), filters);
                let what = format!("{h}x{w} pad {pad}, filters {filters}");
                assert!(same_bits(&pooled, &want), "pooled output, {what}");
                let ties = out
                    .iter()
                    .zip(&out[filters..])
                    .filter(|(a, b)| a == b && **a > 0.0)
                    .count();
                let not_positive = codes.iter().filter(|&&c| c == NOT_POSITIVE).count();
                println!(
                    "{what}: {ties} positive values equal to their right neighbour's, {not_positive} windows <= 0"
                );
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
}
