//! The fast CPU path's dense products with a narrow side: at most 16 output columns (the output
//! layer's forward product and weight gradient, 10 classes) or at most 16 terms per sum (its input
//! gradient). At these sizes a blocked GEMM spends more on packing and thread hand-offs than on
//! arithmetic, and allocates a packing buffer per call; these repack B once into buffers kept
//! between calls and split C's rows over `threads`.
//!
//! Contract: `matmul` returns C (m, n) = A (m, k) @ B (k, n), with A and B read through (row,
//! column) strides as in `sgemm`, equal to the reference's products up to rounding: each value
//! sums its k terms in increasing order of k, with fused multiply-adds where the CPU has them.
//! Nothing is allocated once `NarrowScratch` has grown to the largest product.

use std::ops::Range;

use super::Strided;
use crate::backend::cpu::simd::{mul_add, simd, Simd};
use crate::backend::cpu::threads::{self, chunk_count, MAX_CHUNKS};
use crate::backend::ops::MatmulShape;

/// The widest side that counts as narrow.
const NARROW: usize = 16;
/// Rows of A multiplied together, whatever A's strides: eight independent sums in flight.
const ROWS: usize = 8;
/// The least work, in multiply-adds, worth a piece of its own on another thread.
const PIECE_MACS: usize = 1 << 17;

/// Whether `matmul` takes a product with k terms per sum and n output columns.
pub fn fits(k: usize, n: usize) -> bool {
    n <= NARROW || k <= NARROW
}

/// B repacked (k rows of 16 zero-padded columns, or transposed k x n), and C's padded rows.
#[derive(Debug, Default)]
pub struct NarrowScratch {
    b: Vec<f32>,
    c: Vec<f32>,
}

/// C (m, n) = A (m, k) @ B (k, n); `fits(k, n)` must hold.
pub fn matmul(shape: MatmulShape, a: Strided, b: Strided, c: &mut [f32], scratch: &mut NarrowScratch) {
    matmul_at(simd(), shape, a, b, c, scratch);
}

/// `matmul` with the vector instructions of `level` (at most `simd()`'s).
fn matmul_at(level: Simd, shape: MatmulShape, a: Strided, b: Strided, c: &mut [f32], scratch: &mut NarrowScratch) {
    let MatmulShape { m, n, k } = shape;
    let (a, rsa, csa) = (a.data, a.row, a.col);
    let (b, rsb, csb) = (b.data, b.row, b.col);
    assert!(fits(k, n) && c.len() >= m * n);
    let c = &mut c[..m * n];
    if m == 0 || n == 0 || k == 0 {
        c.fill(0.0);
        return;
    }
    assert!(a.len() > (m - 1) * rsa + (k - 1) * csa && b.len() > (k - 1) * rsb + (n - 1) * csb);
    let p = Product { k, n, a, rsa, csa };
    if n <= NARROW {
        // B as k rows of 16 columns, zero beyond n: every row of C is one 16-lane sum.
        // Every value of the k rows is written (the padding too), so the buffers only grow.
        if scratch.b.len() < k * NARROW {
            scratch.b.resize(k * NARROW, 0.0);
        }
        for (kk, row) in scratch.b[..k * NARROW].chunks_exact_mut(NARROW).enumerate() {
            for (j, v) in row[..n].iter_mut().enumerate() {
                *v = b[kk * rsb + j * csb];
            }
            row[n..].fill(0.0);
        }
        if scratch.c.len() < m * NARROW {
            scratch.c.resize(m * NARROW, 0.0);
        }
        let bp = &scratch.b[..k * NARROW];
        let rows = rows_per_piece(m, k, n);
        let mut pieces = scratch.c[..m * NARROW].chunks_mut(rows * NARROW).enumerate();
        let items: [_; MAX_CHUNKS] = std::array::from_fn(|_| pieces.next());
        threads::for_each(items, &|(i, cp): (usize, &mut [f32])| {
            let range = i * rows..i * rows + cp.len() / NARROW;
            narrow_out_simd(level, &p, range, bp, cp)
        });
        for (row, padded) in c.chunks_exact_mut(n).zip(scratch.c.chunks_exact(NARROW)) {
            row.copy_from_slice(&padded[..n]);
        }
    } else {
        // Few terms per sum: B's k rows contiguous, read 128 columns at a time by each row of C.
        if scratch.b.len() < k * n {
            scratch.b.resize(k * n, 0.0);
        }
        for (kk, row) in scratch.b[..k * n].chunks_exact_mut(n).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = b[kk * rsb + j * csb];
            }
        }
        let bt = &scratch.b[..];
        let rows = rows_per_piece(m, k, n);
        let mut pieces = c.chunks_mut(rows * n).enumerate();
        let items: [_; MAX_CHUNKS] = std::array::from_fn(|_| pieces.next());
        threads::for_each(items, &|(i, c): (usize, &mut [f32])| {
            let range = i * rows..i * rows + c.len() / n;
            narrow_terms_simd(level, &p, range, bt, c)
        });
    }
}

/// Rows of C a piece: one piece per PIECE_MACS of work, at most `chunk_count` pieces.
fn rows_per_piece(m: usize, k: usize, n: usize) -> usize {
    let pieces = (m * k * n.max(NARROW) / PIECE_MACS).clamp(1, chunk_count(m));
    m.div_ceil(pieces)
}

/// A's shape and strides.
struct Product<'a> {
    k: usize,
    n: usize,
    a: &'a [f32],
    rsa: usize,
    csa: usize,
}

impl Product<'_> {
    #[inline(always)]
    fn a(&self, i: usize, kk: usize) -> f32 {
        self.a[i * self.rsa + kk * self.csa]
    }
}

simd_variants! {
    /// `narrow_out` at `level`: fused multiply-adds on AVX-512 and AVX2, separate ones otherwise.
    fn narrow_out_simd(level: Simd, p: &Product<'_>, rows: Range<usize>, bp: &[f32], cp: &mut [f32]) => {
        avx512: narrow_out::<true>,
        avx2: narrow_out::<true>,
        portable: narrow_out::<false>,
    }
}

simd_variants! {
    /// `narrow_terms` at `level`, as `narrow_out_simd`.
    fn narrow_terms_simd(level: Simd, p: &Product<'_>, rows: Range<usize>, bt: &[f32], c: &mut [f32]) => {
        avx512: narrow_terms::<true>,
        avx2: narrow_terms::<true>,
        portable: narrow_terms::<false>,
    }
}

/// Rows `rows` of cp (m, 16) = A @ bp (k, 16), into `cp` (those rows only): 8 rows at a time
/// hold their sums in registers over all k, whatever A's strides (the weight gradient's x^T gives
/// a block's 8 values of a step side by side; summed in memory, k outermost, each term waited on
/// a store and a load).
#[inline(always)]
fn narrow_out<const FMA: bool>(p: &Product<'_>, rows: Range<usize>, bp: &[f32], cp: &mut [f32]) {
    let first = rows.start;
    let count = rows.len();
    let full = count / ROWS * ROWS;
    for (block, out) in cp[..full * NARROW].chunks_exact_mut(ROWS * NARROW).enumerate() {
        let i0 = first + block * ROWS;
        let mut acc = [[0.0f32; NARROW]; ROWS];
        for kk in 0..p.k {
            let brow = &bp[kk * NARROW..][..NARROW];
            for (r, sum) in acc.iter_mut().enumerate() {
                let v = p.a(i0 + r, kk);
                for (s, &w) in sum.iter_mut().zip(brow) {
                    *s = mul_add::<FMA>(v, w, *s);
                }
            }
        }
        for (dst, sum) in out.chunks_exact_mut(NARROW).zip(&acc) {
            dst.copy_from_slice(sum);
        }
    }
    for local in full..count {
        let mut sum = [0.0f32; NARROW];
        for kk in 0..p.k {
            let v = p.a(first + local, kk);
            for (s, &w) in sum.iter_mut().zip(&bp[kk * NARROW..][..NARROW]) {
                *s = mul_add::<FMA>(v, w, *s);
            }
        }
        cp[local * NARROW..][..NARROW].copy_from_slice(&sum);
    }
}

/// Columns of a row `narrow_terms` sums in registers at a time, over all k.
const TERMS_COLUMNS: usize = 128;

/// Rows `rows` of c (m, n) = A @ bt (k, n) for k of at most 16, into `c` (those rows only): each
/// row's sums, TERMS_COLUMNS at a time, get the row's k scaled rows of bt in turn while they sit
/// in registers (summed in memory they waited on a store and a load per term), and are written
/// once.
#[inline(always)]
fn narrow_terms<const FMA: bool>(p: &Product<'_>, rows: Range<usize>, bt: &[f32], c: &mut [f32]) {
    // `matmul` takes this path only for k <= 16 (`fits`), with bt exactly k rows of n.
    assert!(p.k <= NARROW && bt.len() >= p.k * p.n);
    let k = p.k;
    for (i, row) in rows.zip(c.chunks_exact_mut(p.n)) {
        let mut v = [0.0f32; NARROW];
        for (kk, x) in v[..k].iter_mut().enumerate() {
            *x = p.a(i, kk);
        }
        let mut j0 = 0;
        while j0 < p.n {
            let width = TERMS_COLUMNS.min(p.n - j0);
            if width == TERMS_COLUMNS {
                let mut acc = [0.0f32; TERMS_COLUMNS];
                for (kk, &x) in v[..k].iter().enumerate() {
                    for (s, &w) in acc.iter_mut().zip(&bt[kk * p.n + j0..][..TERMS_COLUMNS]) {
                        *s = mul_add::<FMA>(x, w, *s);
                    }
                }
                row[j0..j0 + TERMS_COLUMNS].copy_from_slice(&acc);
            } else {
                let sums = &mut row[j0..j0 + width];
                sums.fill(0.0);
                for (kk, &x) in v[..k].iter().enumerate() {
                    for (s, &w) in sums.iter_mut().zip(&bt[kk * p.n + j0..][..width]) {
                        *s = mul_add::<FMA>(x, w, *s);
                    }
                }
            }
            j0 += width;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::kernels::test_values::max_abs_diff;
    use crate::backend::reference as r;

    /// Every layout the CPU backend passes (forward, input gradient, weight gradient) at narrow
    /// shapes, with rows left over from the blocks of 8, against the reference, at every vector
    /// width this CPU has. A NaN anywhere fails.
    #[test]
    fn narrow_products_match_the_reference() {
        for level in crate::backend::cpu::simd::levels() {
            println!("{level:?}");
            narrow_products_match_the_reference_at(level);
        }
    }

    /// A product as the backend passes it: (what, C (m, n) = A @ B, the reference's loop).
    type Case<'a> = (&'a str, MatmulShape, Strided<'a>, Strided<'a>, &'a dyn Fn(&mut [f32]));

    fn narrow_products_match_the_reference_at(level: Simd) {
        let mut scratch = NarrowScratch::default();
        for &(b, c, oc) in &[(1, 1, 1), (9, 16, 16), (130, 512, 10), (13, 40, 3), (17, 5, 300)] {
            let inp: Vec<f32> = (0..b * c).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
            let w: Vec<f32> = (0..c * oc).map(|i| ((i * 53) % 97) as f32 / 48.0 - 1.0).collect();
            let dout: Vec<f32> = (0..b * oc).map(|i| ((i * 29) % 89) as f32 / 44.0 - 1.0).collect();
            let forward = |o: &mut [f32]| r::matmul_forward(o, &inp, &w, b, c, oc);
            let input_gradient = |o: &mut [f32]| r::matmul_backward_input(o, &dout, &w, b, c, oc);
            let weight_gradient = |o: &mut [f32]| r::matmul_backward_weight(o, &inp, &dout, b, c, oc);
            let products: [Case; 3] = [
                (
                    "forward",
                    MatmulShape { m: b, n: oc, k: c },
                    Strided::new(&inp, c, 1),
                    Strided::new(&w, oc, 1),
                    &forward,
                ),
                (
                    "input gradient",
                    MatmulShape { m: b, n: c, k: oc },
                    Strided::new(&dout, oc, 1),
                    Strided::new(&w, 1, oc),
                    &input_gradient,
                ),
                (
                    "weight gradient",
                    MatmulShape { m: c, n: oc, k: b },
                    Strided::new(&inp, 1, c),
                    Strided::new(&dout, oc, 1),
                    &weight_gradient,
                ),
            ];
            for (what, shape, a, bm, reference) in products {
                if !fits(shape.k, shape.n) {
                    continue;
                }
                let (mut got, mut expected) = (vec![f32::NAN; shape.m * shape.n], vec![0.0; shape.m * shape.n]);
                matmul_at(level, shape, a, bm, &mut got, &mut scratch);
                reference(&mut expected);
                // NaN-aware: a value never written stays NaN and fails.
                let worst = max_abs_diff(&got, &expected);
                println!("{what} {b}x{c}x{oc}: max |diff| {worst}");
                assert!(worst <= 1e-4, "{what} {b}x{c}x{oc}: max |diff| {worst}");
            }
        }
    }
}
