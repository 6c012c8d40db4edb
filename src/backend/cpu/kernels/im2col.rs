//! The fast CPU path's convolution data movement: im2col (an image batch to the (pixels, patch)
//! matrix of a convolution's product), col2im (its transpose, the input gradient's sums), and
//! the blocked input gradient that runs the product and col2im a block of images at a time.
//!
//! Contract: each function returns exactly what its namesake in `reference` returns for the same
//! inputs, bit for bit. im2col only selects values; col2im sums, and keeps the
//! reference's order for every input value (zero, then the patches' values in ascending output
//! pixel order: one pixel's patch reaches an input value at most once, and patches of different
//! images never share one, so images may run in parallel). Work is split over `threads`'s
//! threads by output rows (im2col) or by whole images (col2im), up to
//! `MAX_CHUNKS` pieces. Nothing is allocated: the caller owns every buffer, each
//! sized as in `reference` (slices may be longer; only the leading part is read or written).

use std::sync::{Mutex, MutexGuard, TryLockError};

use crate::backend::cpu::elementwise;
use crate::backend::cpu::threads::{self, pieces, split_units, MAX_CHUNKS};
use crate::backend::ops::ConvGeometry;

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
    dinp: &mut [f32],
    blocks: &mut Vec<f32>,
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
    let buffers = threads::threads().min(g.images.div_ceil(per)).min(MAX_CHUNKS);
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
                elementwise::matmul_epilogue(d_block, None, false, Some(&mask[at * image..][..n]), 1, n);
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

simd_variants! {
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

#[cfg(test)]
mod tests;
