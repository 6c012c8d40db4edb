//! The CPU path's single-threaded matrix product on AVX-512, C (m, n) = A (m, k) @ B (k, n),
//! with A and B read through any strides (a patch matrix, its transpose, a weight matrix or its
//! transpose), so that every product of a layer is this one call.
//!
//! How: B is copied once per call into 16-wide column panels on 64-byte boundaries, kept in a
//! per-thread buffer that grows to the largest B and is then reused (or, for a product cut into
//! row pieces, once for all pieces by `PackedB::pack`, its panels copied on the pool's threads,
//! and handed to `gemm_packed`); A is copied a tile at a
//! time (16 rows by at most KC columns, 24 KiB, on the stack) and each tile meets every panel of
//! B in a micro-kernel holding 16 x 16 sums in registers. `matrixmultiply` does the same, but
//! allocates its packing buffers on every call (52 allocations a convnet step); this runs at its
//! speed (benches/convnet-2026-11-30.md) without them.
//!
//! Contract: each element C[i][j] is one fused multiply-add chain over k = 0, 1, ..., k - 1 in
//! that order, whatever the tile it falls in, so results do not depend on how the caller cuts C
//! into pieces or on the thread count. Nothing is allocated once a thread's B buffer has grown
//! to the largest B it has multiplied. `available()` says whether this CPU (and
//! `GPU_MNIST_CPU_SIMD`) allows the kernel; the caller falls back to `matrixmultiply` otherwise.

// Elsewhere only `available()` (false) is reached.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::cell::RefCell;

use super::cpu_narrow::Strided;
use super::cpu_sparse::{simd, Simd};
use super::ops::MatmulShape;

/// Rows of C a micro-tile holds: 16 vectors of sums, half of the 32 registers.
const MR: usize = 16;
/// Columns of C a micro-tile holds: one AVX-512 vector.
const NR: usize = 16;
/// The longest run of k a micro-tile sums before its sums go back to C (k is cut into equal runs
/// of at most this): a tile of A (24 KiB) stays in L1, a panel of B (24 KiB) beside it.
const KC: usize = 384;

/// Whether `gemm` runs on this CPU.
pub fn available() -> bool {
    simd() == Simd::Avx512
}

thread_local! {
    /// B copied into NR-wide column panels (k rows of NR each, zero-padded); grows to the
    /// largest B this thread has multiplied and is then reused.
    static PACKED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// C (m, n) = A @ B, C row-major with rows of n.
///
/// # Safety
/// `available()` must hold; every element (i, kk) of A for i < m, kk < k must lie in the
/// allocation `a` points into (at `a + i * a_strides.0 + kk * a_strides.1`); B's first k rows of
/// n must lie in `b.data`; `c` must hold m rows of n.
pub unsafe fn gemm(shape: MatmulShape, a: *const f32, a_strides: (usize, usize), b: Strided, c: &mut [f32]) {
    let MatmulShape { m, n, k } = shape;
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    assert!(b.reaches(k - 1, n - 1));
    PACKED_B.with_borrow_mut(|packed| {
        let packed = pack_b(k, n, &b, packed);
        let a = Operand {
            ptr: a,
            row: a_strides.0,
            col: a_strides.1,
        };
        // SAFETY: the caller's contract for A and C; `packed` holds B's panels.
        unsafe { gemm_avx512(shape, a, packed, c.as_mut_ptr()) };
    });
}

/// The part of `packed` B's panels go in: n / NR panels (rounded up) of k rows of NR floats,
/// starting on a 64-byte boundary (a vector load from any other start straddles two cache lines);
/// `packed` grows by 16 floats more than the panels to allow for it.
fn panel_space(k: usize, n: usize, packed: &mut Vec<f32>) -> &mut [f32] {
    let len = n.div_ceil(NR) * k * NR;
    if packed.len() < len + 16 {
        packed.resize(len + 16, 0.0);
    }
    let skip = packed.as_ptr().align_offset(64).min(16);
    &mut packed[skip..][..len]
}

/// B (k, n) into `packed` as n / NR panels (rounded up), each k rows of NR contiguous floats.
fn pack_b<'p>(k: usize, n: usize, b: &Strided, packed: &'p mut Vec<f32>) -> &'p [f32] {
    let space = panel_space(k, n, packed);
    for (p, panel) in space.chunks_exact_mut(k * NR).enumerate() {
        pack_panel(p, k, n, b, panel);
    }
    space
}

/// Panel `p` of B (columns p NR.., zero-padded to NR) into `panel` (k rows of NR).
fn pack_panel(p: usize, k: usize, n: usize, b: &Strided, panel: &mut [f32]) {
    let (j0, cols) = (p * NR, NR.min(n - p * NR));
    if b.col == 1 {
        for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
            let from = &b.data[kk * b.row + j0..][..cols];
            row[..cols].copy_from_slice(from);
            row[cols..].fill(0.0);
        }
    } else {
        // A transposed B: read each column of B (a row in memory) in order.
        if cols < NR {
            panel.fill(0.0);
        }
        for j in 0..cols {
            let column = b.data[(j0 + j) * b.col..].iter().step_by(b.row);
            for (kk, &x) in column.take(k).enumerate() {
                panel[kk * NR + j] = x;
            }
        }
    }
}

/// B packed once for every row piece of a product (`gemm_packed`), instead of once per piece:
/// the weight gradient of the convnet's second layer would otherwise copy its 2 MB B four times
/// a step.
pub struct PackedB<'p> {
    panels: &'p [f32],
    k: usize,
    n: usize,
}

impl<'p> PackedB<'p> {
    /// Pack B (k, n) into `buffer`, panels spread over the pool's threads.
    pub fn pack(k: usize, n: usize, b: &Strided, buffer: &'p mut Vec<f32>) -> PackedB<'p> {
        assert!(k > 0 && n > 0 && b.reaches(k - 1, n - 1));
        let space = panel_space(k, n, buffer);
        let panels_per_item = n.div_ceil(NR).div_ceil(super::cpu_sparse::MAX_CHUNKS);
        let mut groups = space.chunks_mut(panels_per_item * k * NR).enumerate();
        let items: [_; super::cpu_sparse::MAX_CHUNKS] = std::array::from_fn(|_| groups.next());
        super::cpu_pool::for_each(items, &|(g, group): (usize, &mut [f32])| {
            for (i, panel) in group.chunks_exact_mut(k * NR).enumerate() {
                pack_panel(g * panels_per_item + i, k, n, b, panel);
            }
        });
        PackedB { panels: space, k, n }
    }
}

/// C (m, n) = A @ B with B already packed for all pieces (`PackedB::pack`); the same sums, in the
/// same order, as `gemm`.
///
/// # Safety
/// `available()` must hold; `shape` must have B's k and n; every element (i, kk) of A for i < m,
/// kk < k must lie in the allocation `a` points into; `c` must hold m rows of n.
pub unsafe fn gemm_packed(shape: MatmulShape, a: *const f32, a_strides: (usize, usize), b: &PackedB, c: &mut [f32]) {
    let MatmulShape { m, n, k } = shape;
    assert!(c.len() >= m * n && (k, n) == (b.k, b.n));
    if m == 0 {
        return;
    }
    let a = Operand {
        ptr: a,
        row: a_strides.0,
        col: a_strides.1,
    };
    // SAFETY: the caller's contract for A and C; `b.panels` holds B's panels.
    unsafe { gemm_avx512(shape, a, b.panels, c.as_mut_ptr()) };
}

/// A tile of A copied column by column, on a cache-line boundary.
#[repr(C, align(64))]
struct ATile([f32; MR * KC]);

/// A matrix read through a pointer and (row, column) strides in elements.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    row: usize,
    col: usize,
}

/// The loops around the micro-tile: k in runs of KC (outermost, so that C's tiles carry the
/// chain from one run to the next), then MR-row tiles of A (copied, k-major, into a small
/// aligned buffer), then B's NR-wide panels.
///
/// # Safety
/// As `gemm`, with `packed_b` holding B's panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemm_avx512(shape: MatmulShape, a: Operand, packed_b: &[f32], c: *mut f32) {
    let MatmulShape { m, n, k } = shape;
    let mut a_tile = ATile([0.0f32; MR * KC]);
    let a_tile = &mut a_tile.0;
    let run = k.div_ceil(k.div_ceil(KC));
    for k0 in (0..k).step_by(run) {
        let kc = run.min(k - k0);
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            // SAFETY: rows i0..i0 + rows and columns k0..k0 + kc of A lie inside it (the
            // caller's contract).
            unsafe {
                let first = a.ptr.add(i0 * a.row + k0 * a.col);
                if a.row == 1 {
                    for kk in 0..kc {
                        let from = std::slice::from_raw_parts(first.add(kk * a.col), rows);
                        a_tile[kk * MR..][..rows].copy_from_slice(from);
                    }
                } else {
                    for r in 0..rows {
                        let row = first.add(r * a.row);
                        for kk in 0..kc {
                            a_tile[kk * MR + r] = *row.add(kk * a.col);
                        }
                    }
                }
            }
            let (a_ptr, a_col) = (a_tile.as_ptr(), MR);
            for j0 in (0..n).step_by(NR) {
                let panel = &packed_b[(j0 / NR) * k * NR + k0 * NR..][..kc * NR];
                // SAFETY: the tile's rows of A are at `a_ptr` (stride 1, `a_col` per k), the
                // panel holds kc rows of NR, and C's rows i0..i0 + rows, columns j0.. (masked to
                // n) lie inside it.
                unsafe {
                    let tile = Tile {
                        a: a_ptr,
                        a_col,
                        b: panel.as_ptr(),
                        c: c.add(i0 * n + j0),
                        c_row: n,
                        kc,
                        mask: column_mask(NR.min(n - j0)),
                        carry: k0 > 0,
                    };
                    micro_tile(rows, &tile);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gemm_avx512(_: MatmulShape, _: Operand, _: &[f32], _: *mut f32) {
    unreachable!("gemm runs only where available() holds, which is x86-64 with AVX-512")
}

/// The lane mask of a panel's vector for `cols` (1..=16) columns of C.
fn column_mask(cols: usize) -> u16 {
    if cols >= 16 {
        u16::MAX
    } else {
        ((1u32 << cols) - 1) as u16
    }
}

/// One micro-tile's operands: `rows` (at most MR) rows of C by a panel's columns, summed over kc.
struct Tile {
    /// A's tile: element (r, kk) at `a + r + kk * a_col`.
    a: *const f32,
    a_col: usize,
    /// B's panel: kc rows of NR.
    b: *const f32,
    c: *mut f32,
    c_row: usize,
    kc: usize,
    /// Which of the panel's columns C has.
    mask: u16,
    /// Whether C already holds the chain's earlier terms (a later run of k).
    carry: bool,
}

/// Dispatch a tile of `rows` rows to the kernel compiled for exactly that many.
///
/// # Safety
/// As `gemm_avx512`, for the tile's rows, columns and run of k.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_tile(rows: usize, t: &Tile) {
    // SAFETY: the caller's contract; each kernel touches exactly its R rows.
    unsafe {
        match rows {
            16 => micro::<16>(t),
            15 => micro::<15>(t),
            14 => micro::<14>(t),
            13 => micro::<13>(t),
            12 => micro::<12>(t),
            11 => micro::<11>(t),
            10 => micro::<10>(t),
            9 => micro::<9>(t),
            8 => micro::<8>(t),
            7 => micro::<7>(t),
            6 => micro::<6>(t),
            5 => micro::<5>(t),
            4 => micro::<4>(t),
            3 => micro::<3>(t),
            2 => micro::<2>(t),
            _ => micro::<1>(t),
        }
    }
}

/// C[r][..] (+)= sum over kk of A[r][kk] * B[kk][..] for R rows and the panel's vector.
///
/// # Safety
/// As `micro_tile`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn micro<const R: usize>(t: &Tile) {
    use std::arch::x86_64::*;
    let m0 = t.mask;
    // SAFETY: every pointer below stays inside the tile (the caller's contract); masked-off
    // lanes of C are neither read nor written.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        if t.carry {
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_maskz_loadu_ps(m0, t.c.add(r * t.c_row));
            }
        }
        let mut a = t.a;
        let mut b = t.b;
        for _ in 0..t.kc {
            let b0 = _mm512_loadu_ps(b);
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r)), b0, *acc);
            }
            a = a.add(t.a_col);
            b = b.add(NR);
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(t.c.add(r * t.c_row), m0, *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain of the contract, in f32 with mul_add, for one element.
    fn expected(
        a: &[f32],
        (ar, ac): (usize, usize),
        b: &[f32],
        (br, bc): (usize, usize),
        k: usize,
        i: usize,
        j: usize,
    ) -> f32 {
        (0..k).fold(0.0f32, |s, kk| a[i * ar + kk * ac].mul_add(b[kk * br + j * bc], s))
    }

    #[test]
    fn every_element_is_the_same_fma_chain_at_awkward_shapes() {
        if !available() {
            eprintln!("cpu_gemm: no AVX-512 on this CPU, nothing to check");
            return;
        }
        let mut worst = 0.0f32;
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 33, 257),
            (12, 32, 256),
            (25, 17, 3),
            (7, 64, 600),
            (40, 5, 513),
        ] {
            for a_row_major in [true, false] {
                for b_row_major in [true, false] {
                    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 997) as f32 / 499.0 - 1.0).collect();
                    let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 991) as f32 / 491.0 - 1.0).collect();
                    let a_strides = if a_row_major { (k, 1) } else { (1, m) };
                    let b_strides = if b_row_major { (n, 1) } else { (1, k) };
                    let mut c = vec![f32::NAN; m * n];
                    // SAFETY: available() holds, and the strides cover exactly the vectors.
                    unsafe {
                        gemm(
                            MatmulShape { m, n, k },
                            a.as_ptr(),
                            a_strides,
                            Strided::new(&b, b_strides.0, b_strides.1),
                            &mut c,
                        )
                    };
                    // The same product in row pieces of 5 over B packed once for all of them.
                    let mut buffer = Vec::new();
                    let packed = PackedB::pack(k, n, &Strided::new(&b, b_strides.0, b_strides.1), &mut buffer);
                    let mut pieces = vec![f32::NAN; m * n];
                    for (p, c) in pieces.chunks_mut(5 * n).enumerate() {
                        let rows = c.len() / n;
                        // SAFETY: available() holds; rows 5p.. of A lie in `a`; B was packed
                        // with this k and n.
                        unsafe {
                            let a0 = a.as_ptr().add(5 * p * a_strides.0);
                            gemm_packed(MatmulShape { m: rows, n, k }, a0, a_strides, &packed, c)
                        };
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let want = expected(&a, a_strides, &b, b_strides, k, i, j);
                            worst = worst.max((c[i * n + j] - want).abs());
                            worst = worst.max((pieces[i * n + j] - want).abs());
                        }
                    }
                }
            }
        }
        eprintln!("cpu_gemm: max |gemm - fma chain| (whole, and in pieces over B packed once) = {worst:e} (tolerance 0: the same chain)");
        assert_eq!(worst, 0.0);
    }
}
