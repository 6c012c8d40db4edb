//! im2col and col2im against the reference, bit for bit, at awkward geometries; im2col's timing.

use super::super::test_values::{best_seconds, compare, spread};
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

/// `fast` and `reference` each fill a slice of n values from the same input: the same bits, and
/// nothing written past the n values.
fn check_bits(what: &str, g: &ConvGeometry, n: usize, fast: &dyn Fn(&mut [f32]), reference: &dyn Fn(&mut [f32])) {
    let (mut got, mut expected) = (vec![f32::NAN; n + 3], vec![0.0f32; n]);
    fast(&mut got);
    reference(&mut expected);
    assert!(got[n..].iter().all(|v| v.is_nan()), "{what} {g:?}: wrote past the end");
    let (differ, max) = compare(&got[..n], &expected);
    println!("{what} {g:?}: {n} values, {differ} differ, max difference {max:e}");
    assert_eq!(differ, 0, "{what} {g:?}");
}

#[test]
fn im2col_matches_reference() {
    for (i, g) in geometries().enumerate() {
        let inp = spread(g.image_len(), i as u64);
        let n = g.pixels() * g.patch();
        check_bits("im2col", &g, n, &|o| im2col(o, &inp, &g), &|o| r::im2col(o, &inp, &g));
    }
}

#[test]
fn col2im_matches_reference_bit_for_bit() {
    for (i, g) in geometries().enumerate() {
        let dcols = spread(g.pixels() * g.patch(), 100 + i as u64);
        let n = g.image_len();
        check_bits("col2im", &g, n, &|o| col2im(o, &dcols, &g), &|o| {
            r::col2im(o, &dcols, &g)
        });
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
    let start = Instant::now();
    let best = best_seconds(50, &mut || im2col(&mut cols, &inp, &g));
    let mean = start.elapsed().as_secs_f64() / 50.0;
    let mb = (cols.len() * 4) as f64 / 1e6;
    println!(
        "im2col {g:?} ({} threads): {mb:.1} MB of columns, mean {:.3} ms, best {:.3} ms ({:.1} GB/s)",
        threads::threads(),
        mean * 1e3,
        best * 1e3,
        mb / 1e3 / best
    );
}
