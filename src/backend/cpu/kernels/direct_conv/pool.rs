//! The 2 x 2 max pool fused into a first layer's forward pass (`forward_pool`): a band of two
//! output rows pooled at once on AVX-512, each window's choice kept in a byte a channel, and the
//! window maximum that the pooled weight gradient finds again from the layer's output.
//!
//! Contract: the same selections as `maxpool::maxpool_forward` (the first strictly greater value
//! in row-major order, NaN never greater).

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
use super::GROUP;

/// What a 2 x 2 window's first maximum chose, one byte a channel: its position (ky 2 + kx) where
/// the maximum is > 0, else `NOT_POSITIVE` (the ReLU before the pool passes no gradient back).
pub const NOT_POSITIVE: u8 = 4;

/// One output row of a 2 x 2 max pool over `band` (the two rows of its windows' pixels, each
/// `row` values long, pixels of `filters` channels, a multiple of 16): out (width / 2, filters) =
/// each window's first maximum, as `maxpool::maxpool_forward` selects it (the first strictly
/// greater value in row-major order, NaN never greater), and codes its choice.
///
/// # Safety
/// AVX-512; `band` holds two rows of `row` values, out and codes at most row / 2 values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pool_band(out: &mut [f32], codes: &mut [u8], band: &[f32], row: usize, filters: usize) {
    use std::arch::x86_64::*;
    assert!(band.len() >= 2 * row && out.len() <= row / 2 && codes.len() >= out.len() && filters.is_multiple_of(GROUP));
    // SAFETY: window (ox, channels c..c + 16) reads band values 2 ox filters + c .. + 16 of both
    // rows, and writes out and codes at ox filters + c .. + 16, all inside (asserted above).
    unsafe {
        for at in (0..out.len()).step_by(GROUP) {
            let (ox, c) = (at / filters, at % filters);
            let (best, more) = window_max(band.as_ptr().add(2 * ox * filters + c), filters, row);
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
/// at 0. The same selections as `maxpool::maxpool_forward`.
///
/// # Safety
/// AVX-512; the window's 4 x 16 values lie inside one allocation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn window_max(
    top_left: *const f32,
    right: usize,
    down: usize,
) -> (std::arch::x86_64::__m512, [u16; 3]) {
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
pub(super) unsafe fn pool_band(_: &mut [f32], _: &mut [u8], _: &[f32], _: usize, _: usize) {
    unreachable!("forward_pool runs only where gemm::available() holds, which is x86-64 with AVX-512")
}
