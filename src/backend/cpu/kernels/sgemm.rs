//! C (m, n) = A (m, k) @ B (k, n) over the fast CPU path's threads, A and B read through their
//! strides (or A through a convolution's patch layout): a product with a narrow side runs
//! `narrow` on the calling thread; a short, long-summed one is split along K into a fixed number
//! of pieces; any other has C's rows cut into pieces, each a single-threaded `gemm` (or
//! `matrixmultiply`'s sgemm without AVX-512) over B packed once for all pieces.
//!
//! Contract: every value of C is the same sum whatever the thread count (row pieces do not
//! change a value's chain; a K split has a fixed number of pieces added in order), equal to the
//! reference's product up to the summation order. `finish(first row, rows)` runs once on every
//! row of C after its product is done, on the thread that computed it. Nothing is allocated once
//! `ProductScratch` has grown to the largest product (without AVX-512, matrixmultiply packs its
//! operands in buffers of its own, allocated per call).

use super::gemm::{self, ALayout};
use super::narrow::{self, NarrowScratch};
use super::{Strided, Strides};
use crate::backend::cpu::threads::{self, chunk_count, MAX_CHUNKS};
use crate::backend::ops::MatmulShape;

/// The buffers of the products, kept between calls so that a step allocates nothing.
#[derive(Debug, Default)]
pub struct ProductScratch {
    /// The narrow products' repacked B and padded C.
    pub narrow: NarrowScratch,
    /// The partial products of a K split (`sgemm_split_k`).
    partials: Vec<f32>,
    /// B packed once for all row pieces of a product (`gemm::PackedB`).
    pub packed_b: Vec<f32>,
}

/// What runs on rows of C once their product is done: (index of the first row, the rows).
pub type Finish<'a> = dyn Fn(usize, &mut [f32]) + Sync + 'a;

/// The least work, in multiply-adds, worth a piece of its own when a dense product is split over
/// threads (a hand-off costs about a microsecond, this much work about five).
const SPLIT_MIN_MACS: usize = 1 << 18;

/// Rows of C a piece gets at least, so that packing B (k x n, once per piece) stays a small share
/// of a piece's work.
const PIECE_MIN_ROWS: usize = 64;

/// Products with fewer rows than this and a sum at least `SPLIT_K_MIN` long (a convolution's
/// weight gradient: a few patch values, summed over every pixel of the batch) are split along K.
const SPLIT_K_MAX_ROWS: usize = 32;
const SPLIT_K_MIN: usize = 4096;
/// The pieces of a K split: a constant, so that the sums do not depend on the thread count.
const SPLIT_K_PIECES: usize = 8;

/// The pieces `sgemm` cuts the sums of a product of m rows over k into: `SPLIT_K_PIECES` for a
/// short, long-summed product, else 1 (each sum in one run).
pub fn k_pieces(m: usize, k: usize) -> usize {
    if m < SPLIT_K_MAX_ROWS && k >= SPLIT_K_MIN {
        SPLIT_K_PIECES
    } else {
        1
    }
}

/// C (m, n) = A @ B with A and B read through their strides: the three products of a dense
/// layer are this one call with different strides. A product with a narrow side (the output
/// layer's) runs `narrow` on this thread; a short, long-summed one is split along K
/// (`sgemm_split_k`); otherwise C's rows are cut into pieces spread over `threads`'s threads,
/// each running a single-threaded GEMM on its share. `finish(first row, rows)` is called once on
/// every row of C after its product is done (on each piece, by the thread that computed it).
pub fn sgemm(shape: MatmulShape, a: Strided, b: Strided, c: &mut [f32], scratch: &mut ProductScratch, finish: &Finish) {
    let MatmulShape { m, n, k } = shape;
    if narrow::fits(k, n) {
        narrow::matmul(shape, a, b, c, &mut scratch.narrow);
        finish(0, &mut c[..m * n]);
        return;
    }
    let c = &mut c[..m * n];
    if m == 0 || n == 0 || k == 0 {
        c.fill(0.0);
        finish(0, c);
        return;
    }
    if k_pieces(m, k) > 1 {
        sgemm_split_k(shape, a, b, c, &mut scratch.partials);
        finish(0, c);
        return;
    }
    let (rows, items) = row_pieces(c, shape);
    if gemm::available() {
        // B packed once for every piece rather than once in each, into the backend's buffer
        // (sized by the first step, whichever thread runs a piece).
        let packed = gemm::PackedB::pack(k, n, &b, &mut scratch.packed_b);
        threads::for_each(items, &|(i, c): (usize, &mut [f32])| {
            let first = i * rows;
            let m = c.len() / n;
            // SAFETY (of `gemm_packed`): rows first..first + m of A are checked to lie inside
            // its slice, the CPU has AVX-512, B was packed with this k and n, and `c` holds this
            // piece's m rows of n.
            assert!(a.reaches(first + m - 1, k - 1));
            let a0 = unsafe { a.data.as_ptr().add(first * a.row) };
            unsafe { gemm::gemm_packed(MatmulShape { m, n, k }, a0, a.strides(), &packed, c) };
            finish(first, c);
        });
        return;
    }
    threads::for_each(items, &|(i, c): (usize, &mut [f32])| {
        let first = i * rows;
        let m = c.len() / n;
        // SAFETY (of `sgemm_unchecked`): rows first..first + m of A and all of B are checked to
        // lie inside their slices; `c` holds this piece's m rows of n.
        assert!(a.reaches(first + m - 1, k - 1) && b.reaches(k - 1, n - 1));
        unsafe {
            sgemm_unchecked(
                MatmulShape { m, n, k },
                a.data.as_ptr().add(first * a.row),
                a.strides(),
                b,
                c,
            )
        };
        finish(first, c);
    });
}

/// C (m rows of n) cut into pieces of whole rows for the threads of `threads`: a piece per
/// SPLIT_MIN_MACS of work, up to `chunk_count`, of at least PIECE_MIN_ROWS rows. Returns the rows
/// a piece holds (the last may hold fewer) and the pieces, numbered.
#[allow(clippy::type_complexity)]
fn row_pieces(c: &mut [f32], shape: MatmulShape) -> (usize, [Option<(usize, &mut [f32])>; MAX_CHUNKS]) {
    let MatmulShape { m, n, k } = shape;
    let chunks = (m * k * n / SPLIT_MIN_MACS)
        .clamp(1, chunk_count(m))
        .min((m / PIECE_MIN_ROWS).max(1));
    let rows = m.div_ceil(chunks);
    let mut pieces = c.chunks_mut(rows * n).enumerate();
    (rows, std::array::from_fn(|_| pieces.next()))
}

/// C (m, n) = A @ B with A read through its layout (`gemm::gemm_mapped`): C's rows cut into
/// pieces spread over `threads`'s threads, as `sgemm` does, over B made ready once; `finish` as
/// in `sgemm`.
pub fn sgemm_mapped(
    shape: MatmulShape,
    a: &[f32],
    layout: ALayout,
    b: Strided,
    c: &mut [f32],
    scratch: &mut ProductScratch,
    finish: &Finish,
) {
    let MatmulShape { m, n, k } = shape;
    assert!(gemm::available(), "a mapped A runs only on the AVX-512 product");
    let c = &mut c[..m * n];
    if m == 0 || n == 0 || k == 0 {
        c.fill(0.0);
        finish(0, c);
        return;
    }
    let (rows, items) = row_pieces(c, shape);
    let packed = gemm::PackedB::pack(k, n, &b, &mut scratch.packed_b);
    threads::for_each(items, &|(i, c): (usize, &mut [f32])| {
        let m = c.len() / n;
        // SAFETY (of `gemm_mapped`): the CPU has AVX-512 (asserted above); the call checks A's
        // layout against its slice, B's and C's shapes.
        unsafe { gemm::gemm_mapped(MatmulShape { m, n, k }, a, layout, i * rows, &packed, c) };
        finish(i * rows, c);
    });
}

/// C (m, n) = A @ B for a few rows of C and a long K: K is cut into `SPLIT_K_PIECES` fixed
/// pieces, each summed into its own partial C on the threads of `threads`, then the partials are added
/// in piece order (deterministic, whatever the thread count).
fn sgemm_split_k(shape: MatmulShape, a: Strided, b: Strided, c: &mut [f32], partials: &mut Vec<f32>) {
    let MatmulShape { m, n, k } = shape;
    let span = k.div_ceil(SPLIT_K_PIECES);
    if partials.len() < SPLIT_K_PIECES * m * n {
        partials.resize(SPLIT_K_PIECES * m * n, 0.0);
    }
    assert!(a.reaches(m - 1, k - 1) && b.reaches(k - 1, n - 1));
    let mut pieces = partials.chunks_mut(m * n).enumerate();
    let items: [_; SPLIT_K_PIECES] = std::array::from_fn(|_| pieces.next());
    threads::for_each(items, &|(p, part): (usize, &mut [f32])| {
        let (k0, k1) = (p * span, ((p + 1) * span).min(k));
        if k0 >= k1 {
            part.fill(0.0);
            return;
        }
        let piece = Strided::new(&b.data[k0 * b.row..], b.row, b.col);
        // SAFETY (of `sgemm_unchecked`): A's columns k0..k1 and B's rows k0..k1 lie inside their
        // slices (asserted for the whole product above); `part` holds m rows of n.
        unsafe {
            let a0 = a.data.as_ptr().add(k0 * a.col);
            sgemm_unchecked(MatmulShape { m, n, k: k1 - k0 }, a0, a.strides(), piece, part)
        };
    });
    c.copy_from_slice(&partials[..m * n]);
    for part in partials[m * n..SPLIT_K_PIECES * m * n].chunks_exact(m * n) {
        for (x, &y) in c.iter_mut().zip(part) {
            *x += y;
        }
    }
}

/// C (m, n) = A @ B on one thread, A at `a` read through `a_strides`: `gemm`
/// where the CPU has AVX-512, `matrixmultiply`'s sgemm otherwise.
///
/// # Safety
/// Every element (i, kk) of A for i < m, kk < k must lie in the allocation `a` points into, and
/// B's first k rows of n in `b.data`; `c` must hold m rows of n.
unsafe fn sgemm_unchecked(shape: MatmulShape, a: *const f32, a_strides: Strides, b: Strided, c: &mut [f32]) {
    if gemm::available() {
        // SAFETY: the caller's contract is `gemm`'s, and the CPU has AVX-512.
        unsafe { gemm::gemm(shape, a, a_strides, b, c) };
        return;
    }
    let MatmulShape { m, n, k } = shape;
    // SAFETY: the caller's contract.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a,
            a_strides.row as isize,
            a_strides.col as isize,
            b.data.as_ptr(),
            b.row as isize,
            b.col as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}
