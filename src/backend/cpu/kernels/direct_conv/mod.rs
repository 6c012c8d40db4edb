//! A first convolution layer straight from the pixels, for a patch of at most
//! `DIRECT_MAX_PATCH` values (the book's first layer: 3 x 3 over one channel), where writing the
//! patch matrix would cost more than the products that read it; and, where a 2 x 2 max pool
//! follows it, the layer and the pool as one pass each way.
//!
//! Contract: `forward` gives the bits of the reference's product and epilogue over the patch
//! matrix (the same multiplications and additions, in patch order, without fused multiply-adds),
//! and `forward_pool` the bits of `forward` then `maxpool::maxpool_forward`, with each window's
//! choice kept instead of the layer's output. `weight_gradient` gives the bits of the fast path's
//! dense products over the patch matrix (the weight gradient's fused multiply-adds in pixel order,
//! in the same K pieces as `sgemm::sgemm`, and the bias gradient's sums in row order, as
//! `elementwise::bias_backward`), reading each pixel's patch from the images and each row of the
//! output's gradient once for both; from a pool's gradient (`Gradient::Pooled`, by the stored
//! output or the kept choices) it gives the bits of `maxpool::maxpool_backward` then the
//! product, forming the layer's output gradient as it goes instead of reading it from memory.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

mod pool;
mod rows;
#[cfg(test)]
mod tests;
mod weight_gradient;

pub use weight_gradient::{weight_gradient, Choices, Gradient, MAX_FILTERS};

use crate::backend::cpu::kernels::gemm;
use crate::backend::cpu::threads::{self, chunk_count, MAX_CHUNKS};
use crate::backend::ops::{ConvGeometry, PoolShape};
use pool::pool_band;
use rows::{output_rows, OutputPixels};

/// Patches of at most this many values go straight from the images.
pub const DIRECT_MAX_PATCH: usize = 16;

/// Filters the AVX-512 kernels take at a time: one vector (the pool's channels, a weight
/// gradient's columns).
const GROUP: usize = 16;

/// A layer's operands: the images (images, h, w, in_ch), the weight (patch, filters) and the
/// bias (filters), if any.
#[derive(Debug, Clone, Copy)]
pub struct ConvOperands<'a> {
    pub inp: &'a [f32],
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
}

/// `CpuBackend::direct_forward`'s arithmetic, split over the threads of `threads` by images: each
/// output pixel's patch (zeros over the padding) times the weight's rows, in patch order, then
/// + bias and ReLU, as the reference's product and epilogue do.
pub fn forward(out: &mut [f32], operands: ConvOperands, relu: bool, g: &ConvGeometry, filters: usize) {
    let per_image = g.oh() * g.ow() * filters;
    if per_image == 0 || g.images == 0 {
        return;
    }
    let chunks = chunk_count(g.images);
    let images = g.images.div_ceil(chunks);
    let mut pieces = out[..g.images * per_image].chunks_mut(images * per_image).enumerate();
    let items: [_; MAX_CHUNKS] = std::array::from_fn(|_| pieces.next());
    threads::for_each(items, &|(p, o): (usize, &mut [f32])| {
        let first = p * images * g.oh() * g.ow();
        output_rows(o, operands, relu, g, OutputPixels { first, filters });
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
    pooled: &mut [f32],
    codes: &mut [u8],
    operands: ConvOperands,
    relu: bool,
    g: &ConvGeometry,
    pool: &PoolShape,
    filters: usize,
) {
    assert!(pool.size == 2 && (pool.images, pool.h, pool.w, pool.ch) == (g.images, g.oh(), g.ow(), filters));
    assert!(gemm::available() && filters.is_multiple_of(GROUP));
    let (ph, pw) = (pool.oh(), pool.ow());
    // The pixels of a band's row that some window covers.
    let width = 2 * pw;
    assert!(2 * width * filters <= POOL_BAND_MAX);
    let per_image = ph * pw * filters;
    if per_image == 0 || g.images == 0 {
        return;
    }
    let images = g.images.div_ceil(chunk_count(g.images));
    let pooled = pooled[..g.images * per_image].chunks_mut(images * per_image);
    let mut pieces = pooled
        .zip(codes[..g.images * per_image].chunks_mut(images * per_image))
        .enumerate();
    let items: [_; MAX_CHUNKS] = std::array::from_fn(|_| pieces.next());
    threads::for_each(items, &|(p, (o, c)): (usize, (&mut [f32], &mut [u8]))| {
        let mut band = [0.0f32; POOL_BAND_MAX];
        let band = &mut band[..2 * width * filters];
        let rows = o.chunks_exact_mut(pw * filters).zip(c.chunks_exact_mut(pw * filters));
        for (k, (o_row, c_row)) in rows.enumerate() {
            let (image, py) = (p * images + k / ph, k % ph);
            for (dy, band_row) in band.chunks_exact_mut(width * filters).enumerate() {
                let first = (image * g.oh() + 2 * py + dy) * g.ow();
                output_rows(band_row, operands, relu, g, OutputPixels { first, filters });
            }
            // SAFETY: the CPU has AVX-512 (`forward_pool` asserts it), the band holds two rows of
            // `width` pixels.
            unsafe { pool_band(o_row, c_row, band, width * filters, filters) };
        }
    });
}
