//! The fast CPU path's convolution and pooling data movement: im2col (an image batch to the
//! (pixels, patch) matrix of a convolution's product), col2im (its transpose, the input
//! gradient's sums), and max pooling forward and backward.
//!
//! Contract: each function returns exactly what its namesake in `reference` returns for the same
//! inputs, bit for bit. im2col and the pools only select values; col2im sums, and keeps the
//! reference's order for every input value (zero, then the patches' values in ascending output
//! pixel order: one pixel's patch reaches an input value at most once, and patches of different
//! images never share one, so images may run in parallel). Work is split over `cpu_pool`'s
//! threads by output rows (im2col) or by whole images (the rest), up to
//! `cpu_sparse::MAX_CHUNKS` pieces. Nothing is allocated: the caller owns every buffer, each
//! sized as in `reference` (slices may be longer; only the leading part is read or written).

use std::sync::{Mutex, MutexGuard, TryLockError};

use super::cpu_fast;
use super::cpu_pool;
use super::cpu_sparse::{self, MAX_CHUNKS};
use super::ops::{ConvGeometry, PoolShape};

/// The least number of values moved worth a piece of its own when a loop is split over threads
/// (a hand-off costs about a microsecond, copying this many values some ten).
const SPLIT_MIN_VALUES: usize = 1 << 15;

/// Pieces to cut `units` (rows or images) into, for `values` values moved in all.
fn pieces(units: usize, values: usize) -> usize {
    (values / SPLIT_MIN_VALUES).clamp(1, cpu_sparse::chunk_count(units))
}

/// Run `work(first unit, its part of out)` over `out` cut into pieces of whole units of
/// `unit_len` values each (`unit_len` > 0), spread over the threads.
fn split_units(out: &mut [f32], unit_len: usize, values: usize, work: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let units = out.len() / unit_len;
    let per = units.div_ceil(pieces(units, values)).max(1);
    let mut parts = out.chunks_mut(per * unit_len).enumerate();
    let items: [_; MAX_CHUNKS] = std::array::from_fn(|_| parts.next());
    cpu_pool::for_each(items, &|(i, part): (usize, &mut [f32])| work(i * per, part));
}

/// The kernel columns kx0..kx1 of output column `ox` that fall inside the image (the others hang
/// over the padding); kx0 == kx1 when none do.
fn inside_columns(g: &ConvGeometry, ox: usize) -> (usize, usize) {
    let kx0 = g.pad.saturating_sub(ox).min(g.kw);
    let kx1 = (g.w + g.pad).saturating_sub(ox).min(g.kw).max(kx0);
    (kx0, kx1)
}

/// cols (pixels, patch) = every output pixel's patch of inp (images, h, w, in_ch), zeros over the
/// padding, as `reference::im2col`: for each kernel row the kw x in_ch values inside the image are
/// one contiguous run of the input.
pub fn im2col(cols: &mut [f32], inp: &[f32], g: &ConvGeometry) {
    let (pixels, patch) = (g.pixels(), g.patch());
    if pixels == 0 || patch == 0 {
        return;
    }
    let inp = &inp[..g.image_len()];
    split_units(&mut cols[..pixels * patch], patch, pixels * patch, &|first, part| {
        im2col_rows(part, inp, g, first)
    });
}

/// im2col of output pixels first.. into cols (whole rows of patch values).
fn im2col_rows(cols: &mut [f32], inp: &[f32], g: &ConvGeometry, first: usize) {
    let mut at = PixelWalk::at(g, first);
    for dst in cols.chunks_exact_mut(g.patch()) {
        patch_into(dst, inp, g, &at);
        at.advance();
    }
}

/// An output pixel's coordinates (b, oy, ox), then each next pixel's, without a division per
/// pixel.
#[derive(Clone, Copy)]
pub struct PixelWalk {
    b: usize,
    oy: usize,
    ox: usize,
    oh: usize,
    ow: usize,
}

impl PixelWalk {
    /// Output pixel `row` of `g`'s (at least one output pixel).
    pub fn at(g: &ConvGeometry, row: usize) -> PixelWalk {
        let (oh, ow) = (g.oh(), g.ow());
        PixelWalk {
            b: row / (oh * ow),
            oy: row % (oh * ow) / ow,
            ox: row % ow,
            oh,
            ow,
        }
    }

    #[inline(always)]
    pub fn advance(&mut self) {
        self.ox += 1;
        if self.ox == self.ow {
            self.ox = 0;
            self.oy += 1;
            if self.oy == self.oh {
                self.oy = 0;
                self.b += 1;
            }
        }
    }
}

/// The patch of output pixel `at` into dst (`g.patch()` values, in (ky, kx, c) order as
/// `ConvGeometry::source`), zeros over the padding: for each kernel row the kw x in_ch values
/// inside the image are one contiguous run of the input.
#[inline(always)]
pub fn patch_into(dst: &mut [f32], inp: &[f32], g: &ConvGeometry, at: &PixelWalk) {
    let (PixelWalk { b, oy, ox, .. }, c) = (*at, g.in_ch);
    if g.pad == 0 {
        // 'Valid': every kernel row is kw x in_ch values inside the image.
        for (ky, run) in dst.chunks_exact_mut(g.kw * c).enumerate() {
            let start = ((b * g.h + oy + ky) * g.w + ox) * c;
            copy_run(run, &inp[start..start + run.len()]);
        }
        return;
    }
    let (kx0, kx1) = inside_columns(g, ox);
    for (ky, run) in dst.chunks_exact_mut(g.kw * c).enumerate() {
        let y = (oy + ky).checked_sub(g.pad).filter(|&y| y < g.h);
        match y {
            Some(y) if kx1 > kx0 => {
                // kx0 >= pad - ox, so the first column inside is x = ox + kx0 - pad >= 0.
                let start = ((b * g.h + y) * g.w + ox + kx0 - g.pad) * c;
                run[..kx0 * c].fill(0.0);
                copy_run(&mut run[kx0 * c..kx1 * c], &inp[start..start + (kx1 - kx0) * c]);
                run[kx1 * c..].fill(0.0);
            }
            _ => run.fill(0.0),
        }
    }
}

/// dst = src, as fixed-size moves for the few values of a one-channel kernel row (LLVM turns a
/// copy loop of unknown length into a call to memcpy, which costs more than these copies), by
/// memcpy otherwise.
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    macro_rules! fixed {
        ($($n:literal)*) => {
            match dst.len() {
                $($n => {
                    if let (Some(d), Some(s)) = (dst.first_chunk_mut::<$n>(), src.first_chunk::<$n>()) {
                        *d = *s;
                        return;
                    }
                })*
                _ => {}
            }
        };
    }
    fixed!(1 2 3 4 5 6 7);
    dst.copy_from_slice(src);
}

/// dinp (images, h, w, in_ch) = zero, plus every value of dcols (pixels, patch) added into the
/// input value it came from, as `reference::col2im`, bit for bit (see the module's contract).
pub fn col2im(dinp: &mut [f32], dcols: &[f32], g: &ConvGeometry) {
    let image = g.h * g.w * g.in_ch;
    if g.images == 0 || image == 0 {
        return;
    }
    let per_image = g.oh() * g.ow() * g.patch();
    let dcols = &dcols[..g.images * per_image];
    split_units(
        &mut dinp[..g.image_len()],
        image,
        dcols.len() + g.image_len(),
        &|first, part| col2im_images(part, &dcols[first * per_image..], g),
    );
}

/// The patch gradients a block of `input_gradient` holds at most (256 KiB, with at least one
/// image): written by the product and read back by col2im while they are still in L2.
const BLOCK_VALUES: usize = 1 << 16;

/// dinp (images, h, w, in_ch) = col2im(the patches' gradient), then 0 where `mask` is not > 0,
/// with the patches' gradient computed a block of images at a time by `product(first pixel,
/// pixels, out)` (the rows of the (pixels, patch) matrix) into a block buffer: the values of
/// `col2im` over the whole matrix and the mask epilogue, bit for bit, without writing the whole
/// matrix out (9 MB a step for the book's second layer). `blocks` holds one buffer per thread
/// (grown here on the first call of a geometry); a piece borrows whichever is free, so that a
/// thread keeps reusing a buffer that sits in its cache.
pub fn input_gradient(
    (dinp, blocks): (&mut [f32], &mut Vec<f32>),
    mask: Option<&[f32]>,
    g: &ConvGeometry,
    product: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    let image = g.h * g.w * g.in_ch;
    if g.images == 0 || image == 0 {
        return;
    }
    let (ohw, patch) = (g.oh() * g.ow(), g.patch());
    let per_image = ohw * patch;
    let block_images = (BLOCK_VALUES / per_image.max(1)).max(1);
    let values = g.images * per_image + g.image_len();
    // Images a piece, as `split_units` cuts them; at most one piece a thread runs at once.
    let per = g.images.div_ceil(pieces(g.images, values)).max(1);
    let block = (block_images.min(per) * per_image).max(1);
    let buffers = cpu_pool::threads().min(g.images.div_ceil(per)).min(MAX_CHUNKS);
    if blocks.len() < buffers * block {
        blocks.resize(buffers * block, 0.0);
    }
    let mut free = blocks.chunks_mut(block).take(buffers);
    let slots: [Mutex<Option<&mut [f32]>>; MAX_CHUNKS] = std::array::from_fn(|_| Mutex::new(free.next()));
    split_units(&mut dinp[..g.image_len()], image, values, &|first, part| {
        let mut buffer = borrow_free(&slots);
        let Some(buffer) = buffer.as_deref_mut() else { return };
        for (b, d_block) in part.chunks_mut(block_images * image).enumerate() {
            let (images, at) = (d_block.len() / image, first + b * block_images);
            let dcols = &mut buffer[..images * per_image];
            product(at * ohw, images * ohw, dcols);
            col2im_images(d_block, dcols, g);
            if let Some(mask) = mask {
                let n = d_block.len();
                cpu_fast::matmul_epilogue(d_block, None, false, Some(&mask[at * image..][..n]), 1, n);
            }
        }
    });
}

/// The first buffer of `slots` no other piece holds. There is one a thread and a thread runs
/// one piece at a time, so one is always free; the loop only covers a look that raced another
/// thread's release. A buffer whose piece panicked is still a buffer: it is taken as it is.
fn borrow_free<'s, 'b>(slots: &'s [Mutex<Option<&'b mut [f32]>>]) -> MutexGuard<'s, Option<&'b mut [f32]>> {
    loop {
        for slot in slots {
            let guard = match slot.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            if guard.is_some() {
                return guard;
            }
        }
        std::hint::spin_loop();
    }
}

widest_vectors! {
    /// col2im of whole images: dinp holds them, dcols starts at the first one's patches.
    fn col2im_images(dinp: &mut [f32], dcols: &[f32], g: &ConvGeometry) => col2im_images_any
}

/// `col2im_images`' loops, compiled for each vector width.
#[inline(always)]
fn col2im_images_any(dinp: &mut [f32], dcols: &[f32], g: &ConvGeometry) {
    dinp.fill(0.0);
    let (ohw, ow, c, patch) = (g.oh() * g.ow(), g.ow(), g.in_ch, g.patch());
    if ohw == 0 || patch == 0 {
        return;
    }
    for (dimg, dc) in dinp
        .chunks_exact_mut(g.h * g.w * c)
        .zip(dcols.chunks_exact(ohw * patch))
    {
        for (r, src) in dc.chunks_exact(patch).enumerate() {
            let (oy, ox) = (r / ow, r % ow);
            let (kx0, kx1) = inside_columns(g, ox);
            if kx1 == kx0 {
                continue;
            }
            for (ky, run) in src.chunks_exact(g.kw * c).enumerate() {
                if let Some(y) = (oy + ky).checked_sub(g.pad).filter(|&y| y < g.h) {
                    let start = (y * g.w + ox + kx0 - g.pad) * c;
                    let acc = &mut dimg[start..start + (kx1 - kx0) * c];
                    for (a, &v) in acc.iter_mut().zip(&run[kx0 * c..kx1 * c]) {
                        *a += v;
                    }
                }
            }
        }
    }
}

/// out (images, oh, ow, ch) = the first maximum of each window of inp (images, h, w, ch), as
/// `reference::maxpool_forward`: per window, the channels of its first pixel, then each later
/// pixel's channels replace the maxima they strictly exceed.
pub fn maxpool_forward(out: &mut [f32], inp: &[f32], p: &PoolShape) {
    let out_image = p.oh() * p.ow() * p.ch;
    if p.images == 0 || out_image == 0 {
        return;
    }
    let (inp, in_image) = (&inp[..p.in_len()], p.h * p.w * p.ch);
    split_units(&mut out[..p.out_len()], out_image, p.in_len(), &|first, part| {
        maxpool_forward_images(part, &inp[first * in_image..], p)
    });
}

/// dinp (images, h, w, ch) = zero except at each window's first maximum of inp, which gets its
/// output's gradient from dout (images, oh, ow, ch) (with `relu`, only where that maximum is
/// > 0), as `reference::maxpool_backward`.
pub fn maxpool_backward(dinp: &mut [f32], dout: &[f32], inp: &[f32], p: &PoolShape, relu: bool) {
    let in_image = p.h * p.w * p.ch;
    if p.images == 0 || in_image == 0 {
        return;
    }
    let (inp, out_image) = (&inp[..p.in_len()], p.oh() * p.ow() * p.ch);
    let dout = &dout[..p.out_len()];
    split_units(&mut dinp[..p.in_len()], in_image, 2 * p.in_len(), &|first, part| {
        let images = (&inp[first * in_image..], &dout[first * out_image..]);
        maxpool_backward_images(part, images, p, relu)
    });
}

/// A window's layout in an image: (size, values from one input row to the next, channels).
type Window = (usize, usize, usize);

/// `$body` for each block of channels of one window, in blocks of 16, 8, 4 and then 1 channels
/// covering 0..$ch: `$c` is the block's first channel and `$l` its width, a constant, so that
/// the block's values sit in fixed-size arrays the compiler keeps in vector registers.
macro_rules! channel_blocks {
    ($ch:expr, |$c:ident, $l:ident| $body:expr) => {{
        let ch: usize = $ch;
        let mut $c = 0;
        while $c + 16 <= ch {
            const $l: usize = 16;
            $body;
            $c += $l;
        }
        if $c + 8 <= ch {
            const $l: usize = 8;
            $body;
            $c += $l;
        }
        if $c + 4 <= ch {
            const $l: usize = 4;
            $body;
            $c += $l;
        }
        while $c < ch {
            const $l: usize = 1;
            $body;
            $c += $l;
        }
    }};
}

widest_vectors! {
    /// maxpool_forward of whole images: out holds them, inp starts at the first one (the same
    /// selections at any vector width).
    fn maxpool_forward_images(out: &mut [f32], inp: &[f32], p: &PoolShape) => maxpool_forward_sized
}

/// maxpool_forward_images, with the common 2 x 2 windows unrolled.
#[inline(always)]
fn maxpool_forward_sized(out: &mut [f32], inp: &[f32], p: &PoolShape) {
    match p.size {
        2 => maxpool_forward_loops::<2>(out, inp, p),
        _ => maxpool_forward_loops::<0>(out, inp, p),
    }
}

/// maxpool_forward_images for windows of S x S (S = 0: of p.size).
#[inline(always)]
fn maxpool_forward_loops<const S: usize>(out: &mut [f32], inp: &[f32], p: &PoolShape) {
    let (s, ow, ch) = (p.size.max(1), p.ow(), p.ch);
    let window: Window = (s, p.w * ch, ch);
    let band = s * window.1;
    for (o_img, img) in out
        .chunks_exact_mut(p.oh() * ow * ch)
        .zip(inp.chunks_exact(p.h * window.1))
    {
        // One band of s input rows per output row; the rows below the last band are dropped.
        for (o_row, band) in o_img.chunks_exact_mut(ow * ch).zip(img.chunks_exact(band)) {
            for (ox, o) in o_row.chunks_exact_mut(ch).enumerate() {
                let pixels = &band[ox * s * ch..];
                channel_blocks!(ch, |c, L| {
                    let best = window_max::<L, S>(&pixels[c..], window).0;
                    o[c..c + L].copy_from_slice(&best);
                });
            }
        }
    }
}

/// The first maxima of channels c..c + L of one window of S x S (S = 0: of the window's size) and
/// their positions in it (ky s + kx): `pixels` starts at channel c of the window's first pixel.
#[inline(always)]
fn window_max<const L: usize, const S: usize>(pixels: &[f32], (s, row, ch): Window) -> ([f32; L], [u32; L]) {
    let s = if S > 0 { S } else { s };
    let pixels = &pixels[..(s - 1) * (row + ch) + L];
    // Every window holds its L channels (`pixels` was cut to the window above), so the chunks
    // below are always there.
    let Some(&(mut best)) = pixels.first_chunk::<L>() else {
        return ([0.0; L], [0; L]);
    };
    let mut arg = [0u32; L];
    for ky in 0..s {
        for kx in 0..s {
            let Some(v) = pixels[ky * row + kx * ch..].first_chunk::<L>() else {
                continue;
            };
            let pos = (ky * s + kx) as u32;
            for j in 0..L {
                let more = v[j] > best[j];
                best[j] = if more { v[j] } else { best[j] };
                arg[j] = if more { pos } else { arg[j] };
            }
        }
    }
    (best, arg)
}

widest_vectors! {
    /// maxpool_backward of whole images: dinp holds them, inp and dout start at the first one
    /// (the same selections at any vector width).
    fn maxpool_backward_images(dinp: &mut [f32], images: (&[f32], &[f32]), p: &PoolShape, relu: bool)
        => maxpool_backward_sized
}

/// maxpool_backward_images, with the common 2 x 2 windows unrolled.
#[inline(always)]
fn maxpool_backward_sized(dinp: &mut [f32], images: (&[f32], &[f32]), p: &PoolShape, relu: bool) {
    match p.size {
        2 => maxpool_backward_loops::<2>(dinp, images, p, relu),
        _ => maxpool_backward_loops::<0>(dinp, images, p, relu),
    }
}

/// maxpool_backward_images for windows of S x S (S = 0: of p.size). Each value of dinp is written
/// once: a window's pixels get their gradient or 0 as the window is handled, the dropped edge
/// rows and columns 0 (no separate pass clearing dinp).
#[inline(always)]
fn maxpool_backward_loops<const S: usize>(dinp: &mut [f32], (inp, dout): (&[f32], &[f32]), p: &PoolShape, relu: bool) {
    let (s, oh, ow, ch) = (p.size.max(1), p.oh(), p.ow(), p.ch);
    let out_image = oh * ow * ch;
    if out_image == 0 {
        dinp.fill(0.0);
        return;
    }
    let window: Window = (s, p.w * ch, ch);
    let (row, band) = (window.1, s * window.1);
    let images = dinp.chunks_exact_mut(p.h * row).zip(inp.chunks_exact(p.h * row));
    for ((d_img, img), d_out) in images.zip(dout.chunks_exact(out_image)) {
        let (d_bands, d_dropped) = d_img.split_at_mut(oh * band);
        d_dropped.fill(0.0);
        let bands = d_bands.chunks_exact_mut(band).zip(img.chunks_exact(band));
        for ((d_band, band), g_row) in bands.zip(d_out.chunks_exact(ow * ch)) {
            for (ox, g) in g_row.chunks_exact(ch).enumerate() {
                let (d_pixels, pixels) = (&mut d_band[ox * s * ch..], &band[ox * s * ch..]);
                channel_blocks!(ch, |c, L| {
                    window_backward::<L, S>(&mut d_pixels[c..], &pixels[c..], &g[c..], window, relu)
                });
            }
            for d_row in d_band.chunks_exact_mut(row) {
                d_row[ow * s * ch..].fill(0.0);
            }
        }
    }
}

/// The input gradient of channels c..c + L of one window of S x S (S = 0: of the window's size):
/// g (from dout) at each channel's first maximum, 0 at its other pixels. `d_pixels` and `pixels`
/// start at channel c of the window's first pixel, g at channel c of its output.
#[inline(always)]
fn window_backward<const L: usize, const S: usize>(
    d_pixels: &mut [f32],
    pixels: &[f32],
    g: &[f32],
    window: Window,
    relu: bool,
) {
    let (s, row, ch) = window;
    let s = if S > 0 { S } else { s };
    let (best, arg) = window_max::<L, S>(pixels, window);
    let Some(&(mut g)) = g.first_chunk::<L>() else {
        return;
    };
    if relu {
        for j in 0..L {
            g[j] = if best[j] > 0.0 { g[j] } else { 0.0 };
        }
    }
    let d_pixels = &mut d_pixels[..(s - 1) * (row + ch) + L];
    for ky in 0..s {
        for kx in 0..s {
            let Some(d) = d_pixels[ky * row + kx * ch..].first_chunk_mut::<L>() else {
                continue;
            };
            let pos = (ky * s + kx) as u32;
            for j in 0..L {
                d[j] = if arg[j] == pos { g[j] } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::reference as r;
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::time::Instant;

    /// Values of very different magnitudes (so that a change of summation order shows).
    fn spread(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-4..4)))
            .collect()
    }

    /// Small integers (many ties, zeros of both signs, negatives), with a NaN now and then.
    fn tied(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| match rng.random_range(0..40) {
                0 => f32::NAN,
                1 => -0.0,
                k => (k % 7) as f32 - 3.0,
            })
            .collect()
    }

    /// The number of values whose bits differ, and the largest difference among the numbers.
    fn compare(fast: &[f32], reference: &[f32]) -> (usize, f32) {
        assert_eq!(fast.len(), reference.len());
        let pairs = fast.iter().zip(reference);
        let differ = pairs.clone().filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let max = pairs
            .map(|(a, b)| (a - b).abs())
            .filter(|d| !d.is_nan())
            .fold(0.0, f32::max);
        (differ, max)
    }

    /// (images, h, w, in_ch, k, pad), a k x k kernel: batch 1 and 63, channels 1, 3, 5, 32, odd and square
    /// sides, 1x1, 3x3, 5x5 and non-square kernels, 'valid', 'same' and wider padding (windows
    /// wholly over the padding), a kernel wider than the image and one that does not fit.
    const CONVS: [(usize, usize, usize, usize, usize, usize); 16] = [
        (1, 7, 9, 1, 3, 1),
        (1, 7, 9, 3, 3, 0),
        (63, 7, 9, 5, 3, 1),
        (63, 9, 7, 32, 1, 0),
        (63, 28, 28, 1, 5, 2),
        (63, 28, 28, 1, 3, 0),
        (2, 28, 28, 32, 3, 1),
        (1, 28, 28, 32, 5, 0),
        (63, 13, 13, 32, 3, 0),
        (3, 7, 9, 3, 5, 2),
        (2, 4, 4, 3, 5, 2),
        (2, 5, 6, 2, 3, 3),
        (5, 7, 9, 3, 1, 1),
        (1, 2, 2, 1, 5, 0),
        (4, 6, 5, 3, 2, 1),
        (3, 7, 9, 5, 1, 0),
    ];

    fn geometries() -> impl Iterator<Item = ConvGeometry> {
        let mut all: Vec<ConvGeometry> = CONVS
            .iter()
            .map(|&(images, h, w, in_ch, k, pad)| ConvGeometry {
                images,
                h,
                w,
                in_ch,
                kh: k,
                kw: k,
                pad,
            })
            .collect();
        // Non-square kernels: 1x3 and 5x3.
        all.push(ConvGeometry { kh: 1, kw: 3, ..all[2] });
        all.push(ConvGeometry {
            kh: 5,
            kw: 3,
            pad: 2,
            ..all[9]
        });
        all.into_iter()
    }

    #[test]
    fn im2col_matches_reference() {
        for (i, g) in geometries().enumerate() {
            let inp = spread(g.image_len(), i as u64);
            let n = g.pixels() * g.patch();
            let (mut fast, mut expected) = (vec![f32::NAN; n + 3], vec![0.0f32; n]);
            im2col(&mut fast, &inp, &g);
            r::im2col(&mut expected, &inp, &g);
            assert!(fast[n..].iter().all(|v| v.is_nan()), "{g:?}: wrote past the end");
            let (differ, max) = compare(&fast[..n], &expected);
            println!("im2col {g:?}: {n} values, {differ} differ, max difference {max:e}");
            assert_eq!(differ, 0, "{g:?}");
        }
    }

    #[test]
    fn col2im_matches_reference_bit_for_bit() {
        for (i, g) in geometries().enumerate() {
            let dcols = spread(g.pixels() * g.patch(), 100 + i as u64);
            let n = g.image_len();
            let (mut fast, mut expected) = (vec![f32::NAN; n + 3], vec![0.0f32; n]);
            col2im(&mut fast, &dcols, &g);
            r::col2im(&mut expected, &dcols, &g);
            assert!(fast[n..].iter().all(|v| v.is_nan()), "{g:?}: wrote past the end");
            let (differ, max) = compare(&fast[..n], &expected);
            println!("col2im {g:?}: {n} values, {differ} differ, max difference {max:e}");
            assert_eq!(differ, 0, "{g:?}");
        }
    }

    /// (images, h, w, ch, size): odd sides (dropped edges), sizes 1 to 3 and one larger than the
    /// image, channels that take every mix of `channel_blocks`' blocks of 16, 8, 4 and 1.
    const POOLS: [(usize, usize, usize, usize, usize); 12] = [
        (1, 7, 9, 1, 2),
        (63, 7, 9, 3, 3),
        (63, 28, 28, 32, 2),
        (1, 26, 26, 32, 2),
        (2, 11, 11, 5, 3),
        (3, 5, 5, 69, 2),
        (2, 9, 7, 130, 3),
        (1, 2, 2, 3, 3),
        (2, 6, 6, 3, 1),
        (63, 11, 11, 64, 2),
        (3, 7, 5, 13, 2),
        (2, 8, 7, 24, 3),
    ];

    #[test]
    fn maxpool_matches_reference() {
        for (i, &(images, h, w, ch, size)) in POOLS.iter().enumerate() {
            let p = PoolShape { images, h, w, ch, size };
            let inp = tied(p.in_len(), 200 + i as u64);
            let dout = spread(p.out_len(), 300 + i as u64);
            let (mut fast, mut expected) = (vec![f32::NAN; p.out_len() + 3], vec![0.0f32; p.out_len()]);
            maxpool_forward(&mut fast, &inp, &p);
            r::maxpool_forward(&mut expected, &inp, &p);
            assert!(
                fast[p.out_len()..].iter().all(|v| v.is_nan()),
                "{p:?}: wrote past the end"
            );
            let (differ, max) = compare(&fast[..p.out_len()], &expected);
            println!(
                "maxpool forward {p:?}: {differ} of {} differ, max difference {max:e}",
                p.out_len()
            );
            assert_eq!(differ, 0, "{p:?}");
            for relu in [false, true] {
                let (mut fast, mut expected) = (vec![f32::NAN; p.in_len() + 3], vec![0.0f32; p.in_len()]);
                maxpool_backward(&mut fast, &dout, &inp, &p, relu);
                r::maxpool_backward(&mut expected, &dout, &inp, &p, relu);
                assert!(
                    fast[p.in_len()..].iter().all(|v| v.is_nan()),
                    "{p:?}: wrote past the end"
                );
                let (differ, max) = compare(&fast[..p.in_len()], &expected);
                println!("maxpool backward relu={relu} {p:?}: {differ} differ, max difference {max:e}");
                assert_eq!(differ, 0, "{p:?} relu={relu}");
            }
        }
    }

    /// The timing of im2col on the second convolution of the book's convnet at batch 64 (printed,
    /// not asserted; run with --nocapture, and in release for the real figure).
    #[test]
    fn im2col_timing() {
        let g = ConvGeometry {
            images: 64,
            h: 13,
            w: 13,
            in_ch: 32,
            kh: 3,
            kw: 3,
            pad: 0,
        };
        let inp = spread(g.image_len(), 7);
        let mut cols = vec![0.0f32; g.pixels() * g.patch()];
        im2col(&mut cols, &inp, &g);
        let reps = 50;
        let mut best = f64::INFINITY;
        let start = Instant::now();
        for _ in 0..reps {
            let t = Instant::now();
            im2col(&mut cols, &inp, &g);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let mean = start.elapsed().as_secs_f64() / reps as f64;
        let mb = (cols.len() * 4) as f64 / 1e6;
        println!(
            "im2col {g:?} ({} threads): {mb:.1} MB of columns, mean {:.3} ms, best {:.3} ms ({:.1} GB/s)",
            cpu_pool::threads(),
            mean * 1e3,
            best * 1e3,
            mb / 1e3 / best
        );
    }

    /// The timing of max pooling on the first pool of the book's convnet at batch 64 (printed,
    /// not asserted; run with --nocapture, and in release for the real figure).
    #[test]
    fn maxpool_timing() {
        let p = PoolShape {
            images: 64,
            h: 26,
            w: 26,
            ch: 32,
            size: 2,
        };
        let inp = spread(p.in_len(), 1);
        let dout = spread(p.out_len(), 2);
        let (mut out, mut dinp) = (vec![0.0f32; p.out_len()], vec![0.0f32; p.in_len()]);
        let best = |work: &mut dyn FnMut()| {
            (0..50)
                .map(|_| {
                    let t = Instant::now();
                    work();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let forward = best(&mut || maxpool_forward(&mut out, &inp, &p));
        let backward = best(&mut || maxpool_backward(&mut dinp, &dout, &inp, &p, true));
        println!(
            "maxpool {p:?} ({} threads): forward best {:.3} ms, backward best {:.3} ms",
            cpu_pool::threads(),
            forward * 1e3,
            backward * 1e3
        );
    }
}
