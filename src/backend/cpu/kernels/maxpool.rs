//! The fast CPU path's max pooling, forward and backward, over whole images (images, h, w, ch).
//!
//! Contract: each function returns exactly what its namesake in `reference` returns for the same
//! inputs, bit for bit (pooling only selects values: the first maximum of each window, NaN and
//! -0.0 as the reference treats them). Work is split over `threads` by whole images. Nothing is
//! allocated.

use crate::backend::cpu::threads::split_units;
use crate::backend::ops::PoolShape;

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
        maxpool_backward_images(part, &inp[first * in_image..], &dout[first * out_image..], p, relu)
    });
}

/// A window's layout in an image: its side, the values from one input row to the next, and the
/// channels (the values from one pixel to the next).
#[derive(Debug, Clone, Copy)]
struct Window {
    size: usize,
    row: usize,
    ch: usize,
}

impl Window {
    /// The windows of pool `p`.
    fn of(p: &PoolShape) -> Window {
        Window {
            size: p.size.max(1),
            row: p.w * p.ch,
            ch: p.ch,
        }
    }
}

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

simd_variants! {
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
    let window = Window::of(p);
    let band = s * window.row;
    for (o_img, img) in out
        .chunks_exact_mut(p.oh() * ow * ch)
        .zip(inp.chunks_exact(p.h * window.row))
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
fn window_max<const L: usize, const S: usize>(
    pixels: &[f32],
    Window { size: s, row, ch }: Window,
) -> ([f32; L], [u32; L]) {
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

simd_variants! {
    /// maxpool_backward of whole images: dinp holds them, inp and dout start at the first one
    /// (the same selections at any vector width).
    fn maxpool_backward_images(dinp: &mut [f32], inp: &[f32], dout: &[f32], p: &PoolShape, relu: bool)
        => maxpool_backward_sized
}

/// maxpool_backward_images, with the common 2 x 2 windows unrolled.
#[inline(always)]
fn maxpool_backward_sized(dinp: &mut [f32], inp: &[f32], dout: &[f32], p: &PoolShape, relu: bool) {
    match p.size {
        2 => maxpool_backward_loops::<2>(dinp, inp, dout, p, relu),
        _ => maxpool_backward_loops::<0>(dinp, inp, dout, p, relu),
    }
}

/// maxpool_backward_images for windows of S x S (S = 0: of p.size). Each value of dinp is written
/// once: a window's pixels get their gradient or 0 as the window is handled, the dropped edge
/// rows and columns 0 (no separate pass clearing dinp).
#[inline(always)]
fn maxpool_backward_loops<const S: usize>(dinp: &mut [f32], inp: &[f32], dout: &[f32], p: &PoolShape, relu: bool) {
    let (s, oh, ow, ch) = (p.size.max(1), p.oh(), p.ow(), p.ch);
    let out_image = oh * ow * ch;
    if out_image == 0 {
        dinp.fill(0.0);
        return;
    }
    let window = Window::of(p);
    let (row, band) = (window.row, s * window.row);
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
    let Window { size: s, row, ch } = window;
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
    use super::super::test_values::{best_seconds, compare, spread, tied};
    use super::*;
    use crate::backend::cpu::threads;
    use crate::backend::reference as r;

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
        let forward = best_seconds(50, &mut || maxpool_forward(&mut out, &inp, &p));
        let backward = best_seconds(50, &mut || maxpool_backward(&mut dinp, &dout, &inp, &p, true));
        println!(
            "maxpool {p:?} ({} threads): forward best {:.3} ms, backward best {:.3} ms",
            threads::threads(),
            forward * 1e3,
            backward * 1e3
        );
    }
}
