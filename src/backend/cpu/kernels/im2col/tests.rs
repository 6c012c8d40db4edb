//! im2col and col2im against the reference, bit for bit, at awkward geometries; im2col's timing.

use super::super::test_values::{compare, spread};
use super::*;
use crate::backend::reference as r;
use std::time::Instant;

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
        threads::threads(),
        mean * 1e3,
        best * 1e3,
        mb / 1e3 / best
    );
}
