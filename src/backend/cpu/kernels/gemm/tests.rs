//! The AVX-512 product against the contract's FMA chain, element by element, at awkward shapes,
//! whole and in row pieces, and over a convolution's patch layouts against the written matrix.

use super::*;

/// The chain of the contract, in f32 with mul_add, for one element.
fn expected(a: &Strided, b: &Strided, k: usize, i: usize, j: usize) -> f32 {
    (0..k).fold(0.0f32, |s, kk| {
        a.data[i * a.row + kk * a.col].mul_add(b.data[kk * b.row + j * b.col], s)
    })
}

#[test]
fn every_element_is_the_same_fma_chain_at_awkward_shapes() {
    if !available() {
        eprintln!("gemm: no AVX-512 on this CPU, nothing to check");
        return;
    }
    // NaN-aware: an element never written stays NaN and fails.
    let mut worst = 0.0f32;
    let mut unwritten = 0usize;
    for &(m, n, k) in &[
        (1, 1, 1),
        (13, 33, 257),
        (12, 32, 256),
        (25, 17, 3),
        (7, 64, 600),
        (40, 5, 513),
        (25, 40, 37),
        (24, 48, 800),
        (13, 16, 5),
        (30, 96, 385),
        (17, 64, 2),
    ] {
        for a_row_major in [true, false] {
            for b_row_major in [true, false] {
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 997) as f32 / 499.0 - 1.0).collect();
                let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 991) as f32 / 491.0 - 1.0).collect();
                let a_strides = if a_row_major {
                    Strides { row: k, col: 1 }
                } else {
                    Strides { row: 1, col: m }
                };
                let (b_row, b_col) = if b_row_major { (n, 1) } else { (1, k) };
                let b_matrix = Strided::new(&b, b_row, b_col);
                let mut c = vec![f32::NAN; m * n];
                // SAFETY: available() holds, and the strides cover exactly the vectors.
                unsafe { gemm(MatmulShape { m, n, k }, a.as_ptr(), a_strides, b_matrix, &mut c) };
                // The same product in row pieces of 5 over B packed once for all of them.
                let mut buffer = Vec::new();
                let packed = PackedB::pack(k, n, &b_matrix, &mut buffer);
                let mut pieces = vec![f32::NAN; m * n];
                for (p, c) in pieces.chunks_mut(5 * n).enumerate() {
                    let rows = c.len() / n;
                    // SAFETY: available() holds; rows 5p.. of A lie in `a`; B was packed
                    // with this k and n.
                    unsafe {
                        let a0 = a.as_ptr().add(5 * p * a_strides.row);
                        gemm_packed(MatmulShape { m: rows, n, k }, a0, a_strides, &packed, c)
                    };
                }
                for i in 0..m {
                    for j in 0..n {
                        let a_matrix = Strided::new(&a, a_strides.row, a_strides.col);
                        let want = expected(&a_matrix, &b_matrix, k, i, j);
                        for got in [c[i * n + j], pieces[i * n + j]] {
                            unwritten += got.is_nan() as usize;
                            worst = worst.max((got - want).abs());
                        }
                    }
                }
            }
        }
    }
    eprintln!("gemm: max |gemm - fma chain| (whole, and in pieces over B packed once) = {worst:e} (tolerance 0: the same chain), {unwritten} NaN");
    assert_eq!((worst, unwritten), (0.0, 0));
}

/// A patch matrix read through run layouts (rows: pixels in runs of an output row; k: patch
/// values in runs of a kernel row), and its transpose, give the same bits as the matrix
/// written out, in row pieces over B made ready once, at awkward sizes.
#[test]
fn mapped_patches_give_the_bits_of_the_written_matrix() {
    if !available() {
        eprintln!("gemm: no AVX-512 on this CPU, nothing to check");
        return;
    }
    // (images, h, w, channels, kernel side, filters).
    for &(images, h, w, ch, kside, filters) in &[(2, 7, 9, 5, 3, 40), (3, 13, 13, 32, 3, 64), (1, 6, 14, 4, 2, 17)] {
        let (oh, ow) = (h - kside + 1, w - kside + 1);
        let (pixels, patch) = (images * oh * ow, kside * kside * ch);
        let image: Vec<f32> = (0..images * h * w * ch)
            .map(|i| ((i * 7919) % 997) as f32 / 499.0 - 1.0)
            .collect();
        let mut cols = vec![0.0f32; pixels * patch];
        for p in 0..pixels {
            let (b, oy, ox) = (p / (oh * ow), p % (oh * ow) / ow, p % ow);
            for kk in 0..patch {
                let (ky, kx, c) = (kk / (kside * ch), kk / ch % kside, kk % ch);
                cols[p * patch + kk] = image[((b * h + oy + ky) * w + ox + kx) * ch + c];
            }
        }
        let runs_of_pixels = Runs {
            count: pixels,
            len: ow,
            stride: ch,
            per_group: oh,
            run_stride: w * ch,
            group_stride: h * w * ch,
        };
        let runs_of_patch = Runs {
            count: patch,
            len: kside * ch,
            stride: 1,
            per_group: kside,
            run_stride: w * ch,
            group_stride: 0,
        };
        let weight: Vec<f32> = (0..patch * filters)
            .map(|i| ((i * 104_729) % 991) as f32 / 491.0 - 1.0)
            .collect();
        let dout: Vec<f32> = (0..pixels * filters)
            .map(|i| ((i * 31) % 89) as f32 / 44.0 - 1.0)
            .collect();
        // Forward: (pixels, patch) @ (patch, filters); weight gradient: (patch, pixels) @
        // (pixels, filters).
        let products = [
            (
                MatmulShape {
                    m: pixels,
                    n: filters,
                    k: patch,
                },
                Strides { row: patch, col: 1 },
                &weight,
                ALayout {
                    rows: runs_of_pixels,
                    ks: runs_of_patch,
                },
            ),
            (
                MatmulShape {
                    m: patch,
                    n: filters,
                    k: pixels,
                },
                Strides { row: 1, col: patch },
                &dout,
                ALayout {
                    rows: runs_of_patch,
                    ks: runs_of_pixels,
                },
            ),
        ];
        for (shape, a_strides, b, layout) in products {
            let b = Strided::new(b, shape.n, 1);
            let mut written = vec![f32::NAN; shape.m * shape.n];
            // SAFETY: available() holds and the strides cover exactly the matrices.
            unsafe {
                gemm(
                    shape,
                    cols.as_ptr(),
                    a_strides,
                    Strided::new(b.data, b.row, b.col),
                    &mut written,
                )
            };
            let mut buffer = Vec::new();
            let packed = PackedB::pack(shape.k, shape.n, &b, &mut buffer);
            let mut mapped = vec![f32::NAN; shape.m * shape.n];
            for (p, c) in mapped.chunks_mut(7 * shape.n).enumerate() {
                let rows = c.len() / shape.n;
                // SAFETY: available() holds; the call checks the layout against the images.
                unsafe { gemm_mapped(MatmulShape { m: rows, ..shape }, &image, layout, 7 * p, &packed, c) };
            }
            let same = written
                .iter()
                .zip(&mapped)
                .all(|(x, y)| x.to_bits() == y.to_bits() && !x.is_nan());
            eprintln!("gemm: mapped {shape:?}: the same bits as written out: {same}");
            assert!(same, "{shape:?}");
        }
    }
}
