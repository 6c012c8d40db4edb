//! The CPU path's single-threaded matrix product on AVX-512, C (m, n) = A (m, k) @ B (k, n),
//! with A and B read through any strides (a patch matrix, its transpose, a weight matrix or its
//! transpose), so that every product of a layer is this one call.
//!
//! How: C is cut into micro-tiles of MR rows by NR (two AVX-512 vectors) columns, each holding
//! its 2 x MR vectors of sums in registers while it runs through a run of k (at most KC long),
//! two steps at a time: every step loads B's two vectors and broadcasts MR values of A. A is read
//! where it lies, through its strides (its MR values of a step are contiguous when A is a
//! transposed patch or gradient matrix, MR rows read in step otherwise); `gemm_mapped` reads a
//! convolution's patch matrix, or its transpose, straight from the images through `Runs` of rows
//! and of k. A B stored row by row (the gradients and weights) is read in place too; only a B
//! read across its rows (a transposed weight matrix) is copied first, into NR-wide column panels
//! on 64-byte boundaries, in a per-thread buffer that grows to the largest such B and is then
//! reused (or, for a product cut into row pieces, once for all pieces by `PackedB::pack`, its
//! panels copied on the threads of `threads`). Copying the large operands (a patch matrix, a batch's
//! gradients) cost more than the products' arithmetic lost to reading them in place.
//!
//! Contract: each element C[i][j] is one fused multiply-add chain over k = 0, 1, ..., k - 1 in
//! that order, whatever the tile it falls in, so results do not depend on how the caller cuts C
//! into pieces, on the tile sizes or on the thread count. Nothing is allocated once a thread's
//! panel buffer has grown to the largest transposed B it has multiplied. `available()` says
//! whether this CPU (and `GPU_MNIST_CPU_SIMD`) allows the kernel; the caller falls back to
//! `matrixmultiply` otherwise.

// Elsewhere only `available()` (false) is reached.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::cell::RefCell;

use super::{Strided, Strides};
use crate::backend::cpu::simd::{simd, Simd};
use crate::backend::cpu::threads::{self, MAX_CHUNKS};
use crate::backend::ops::MatmulShape;

/// Rows of C a micro-tile holds: 2 x 12 vectors of sums, with B's two vectors and a broadcast
/// value 27 of the 32 registers.
const MR: usize = 12;
/// Columns of C a micro-tile holds: two AVX-512 vectors.
const NR: usize = 32;
/// The longest run of k a micro-tile sums before its sums go back to C (k is cut into equal runs
/// of at most this): the run's A values of a tile (18 KiB) stay in L1 while it meets every panel.
const KC: usize = 384;

/// Whether `gemm` runs on this CPU.
pub fn available() -> bool {
    simd() == Simd::Avx512
}

thread_local! {
    /// A transposed B copied into NR-wide column panels (k rows of NR each, zero-padded); grows
    /// to the largest such B this thread has multiplied and is then reused.
    static PACKED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// C (m, n) = A @ B, C row-major with rows of n.
///
/// # Safety
/// `available()` must hold; every element (i, kk) of A for i < m, kk < k must lie in the
/// allocation `a` points into (at `a + i * a_strides.row + kk * a_strides.col`); B's first k rows of
/// n must lie in `b.data`; `c` must hold m rows of n.
pub unsafe fn gemm(shape: MatmulShape, a: *const f32, a_strides: Strides, b: Strided, c: &mut [f32]) {
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
    let a = Operand::strided(a, a_strides, m, k);
    if b.col == 1 {
        // SAFETY: the caller's contract for A and C; B's k rows of n lie in `b.data`.
        unsafe { gemm_avx512(shape, a, BView::rows(&b), c.as_mut_ptr()) };
        return;
    }
    PACKED_B.with_borrow_mut(|packed| {
        let space = panel_space(k, n, packed);
        for (p, panel) in space.chunks_exact_mut(k * NR).enumerate() {
            pack_panel(p, k, n, &b, panel);
        }
        // SAFETY: the caller's contract for A and C; `space` holds B's panels.
        unsafe { gemm_avx512(shape, a, BView::panels(space, k), c.as_mut_ptr()) };
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

simd_variants! {
    /// Panel `p` of a transposed B (columns p NR.., zero-padded to NR) into `panel` (k rows of
    /// NR), reading each column of B (a row in memory) in order.
    fn pack_panel(p: usize, k: usize, n: usize, b: &Strided, panel: &mut [f32]) => pack_panel_any
}

#[inline(always)]
fn pack_panel_any(p: usize, k: usize, n: usize, b: &Strided, panel: &mut [f32]) {
    let (j0, cols) = (p * NR, NR.min(n - p * NR));
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

/// B ready for every row piece of a product (`gemm_packed`): a B stored row by row as it is, a
/// transposed B packed once for all pieces instead of once in each.
pub struct PackedB<'p> {
    data: &'p [f32],
    /// Floats from one step of k to the next, and from one NR-wide panel to the next.
    row: usize,
    panel: usize,
    k: usize,
    n: usize,
}

impl<'p> PackedB<'p> {
    fn view(&self) -> BView {
        BView {
            ptr: self.data.as_ptr(),
            row: self.row,
            panel: self.panel,
        }
    }

    /// B (k, n) for `gemm_packed`: read in place if its rows are contiguous, else packed into
    /// `buffer`, panels spread over the threads of `threads`.
    pub fn pack(k: usize, n: usize, b: &Strided<'p>, buffer: &'p mut Vec<f32>) -> PackedB<'p> {
        assert!(k > 0 && n > 0 && b.reaches(k - 1, n - 1));
        if b.col == 1 {
            return PackedB {
                data: b.data,
                row: b.row,
                panel: NR,
                k,
                n,
            };
        }
        let space = panel_space(k, n, buffer);
        let panels_per_item = n.div_ceil(NR).div_ceil(MAX_CHUNKS);
        let mut groups = space.chunks_mut(panels_per_item * k * NR).enumerate();
        let items: [_; MAX_CHUNKS] = std::array::from_fn(|_| groups.next());
        threads::for_each(items, &|(g, group): (usize, &mut [f32])| {
            for (i, panel) in group.chunks_exact_mut(k * NR).enumerate() {
                pack_panel(g * panels_per_item + i, k, n, b, panel);
            }
        });
        PackedB {
            data: space,
            row: NR,
            panel: k * NR,
            k,
            n,
        }
    }
}

/// C (m, n) = A @ B with B made ready for all pieces (`PackedB::pack`); the same sums, in the
/// same order, as `gemm`.
///
/// # Safety
/// `available()` must hold; `shape` must have B's k and n; every element (i, kk) of A for i < m,
/// kk < k must lie in the allocation `a` points into; `c` must hold m rows of n.
pub unsafe fn gemm_packed(shape: MatmulShape, a: *const f32, a_strides: Strides, b: &PackedB, c: &mut [f32]) {
    let MatmulShape { m, n, k } = shape;
    assert!(c.len() >= m * n && (k, n) == (b.k, b.n));
    if m == 0 {
        return;
    }
    let a = Operand::strided(a, a_strides, m, k);
    // SAFETY: the caller's contract for A and C; `b` covers B's k rows of n (checked by `pack`).
    unsafe { gemm_avx512(shape, a, b.view(), c.as_mut_ptr()) };
}

/// C (m, n) = A @ B for rows first..first + m of an A laid out by `layout` in `a` (a patch matrix
/// read from the images, or its transpose), with B made ready by `PackedB::pack`; the same sums,
/// in the same order, as `gemm` over A written out.
///
/// # Safety
/// `available()` must hold.
pub unsafe fn gemm_mapped(shape: MatmulShape, a: &[f32], layout: ALayout, first: usize, b: &PackedB, c: &mut [f32]) {
    let MatmulShape { m, n, k } = shape;
    assert!(c.len() >= m * n && (k, n) == (b.k, b.n));
    assert!(first + m <= layout.rows.count && k == layout.ks.count);
    if m == 0 {
        return;
    }
    assert!(layout.rows.bound() + layout.ks.bound() < a.len());
    let a = Operand {
        ptr: a.as_ptr(),
        rows: layout.rows,
        ks: layout.ks,
        first,
    };
    // SAFETY: every element of A lies below the bound checked above, `b` covers B's k rows of n
    // and `c` its m rows.
    unsafe { gemm_avx512(shape, a, b.view(), c.as_mut_ptr()) };
}

/// Where the elements of one side of A lie: `count` indices in runs of `len`, element t of a run
/// `stride` after the one before; run j of each group of `per_group` runs `run_stride` after the
/// group's first, and group g `group_stride` after the first group's. A matrix's rows (or
/// columns) are one run; the rows of a convolution's patch matrix are its output rows, runs of
/// pixels in the images; its columns are the kernel's rows, runs of (kx, channel) values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    pub count: usize,
    pub len: usize,
    pub stride: usize,
    pub per_group: usize,
    pub run_stride: usize,
    pub group_stride: usize,
}

impl Runs {
    /// `count` indices `stride` apart.
    pub fn uniform(count: usize, stride: usize) -> Runs {
        Runs {
            count,
            len: count.max(1),
            stride,
            per_group: 1,
            run_stride: 0,
            group_stride: 0,
        }
    }

    /// The offset of index i.
    fn offset(&self, i: usize) -> usize {
        let (run, t) = (i / self.len, i % self.len);
        (run / self.per_group) * self.group_stride + (run % self.per_group) * self.run_stride + t * self.stride
    }

    /// Indices from i to the end of its run.
    fn left_in_run(&self, i: usize) -> usize {
        self.len - i % self.len
    }

    /// An offset no index's offset exceeds.
    fn bound(&self) -> usize {
        if self.count == 0 {
            return 0;
        }
        let runs = self.count.div_ceil(self.len);
        let groups = runs.div_ceil(self.per_group);
        (groups - 1) * self.group_stride
            + (self.per_group.min(runs) - 1) * self.run_stride
            + (self.len.min(self.count) - 1) * self.stride
    }
}

/// A read through `Runs` for its rows and for its k: element (i, kk) at `rows(i) + ks(kk)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ALayout {
    pub rows: Runs,
    pub ks: Runs,
}

/// A as the loops read it: element (first + i, kk) at `ptr + rows(first + i) + ks(kk)`.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    rows: Runs,
    ks: Runs,
    first: usize,
}

impl Operand {
    /// An (m, k) matrix read through (row, column) strides.
    fn strided(ptr: *const f32, Strides { row, col }: Strides, m: usize, k: usize) -> Operand {
        Operand {
            ptr,
            rows: Runs::uniform(m, row),
            ks: Runs::uniform(k, col),
            first: 0,
        }
    }
}

/// A stretch of k within one run of A's k: `count` values, the first `offset` from the tile's.
#[derive(Clone, Copy, Default)]
struct Segment {
    offset: usize,
    count: usize,
}

/// B as the micro-tiles read it: element (kk, j) of panel p (columns p NR + j) at
/// `ptr + p * panel + kk * row + j`; columns at or past n are never loaded.
#[derive(Clone, Copy)]
struct BView {
    ptr: *const f32,
    row: usize,
    panel: usize,
}

impl BView {
    /// A B stored row by row, read in place.
    fn rows(b: &Strided) -> BView {
        BView {
            ptr: b.data.as_ptr(),
            row: b.row,
            panel: NR,
        }
    }

    /// B packed into panels of k rows of NR.
    fn panels(space: &[f32], k: usize) -> BView {
        BView {
            ptr: space.as_ptr(),
            row: NR,
            panel: k * NR,
        }
    }
}

/// The loops around the micro-tile: k in runs of KC (outermost, so that C's tiles carry the
/// chain from one run to the next; each run a list of A's stretches of k), then tiles of at most
/// MR rows of A within one of its runs of rows, then B's NR-wide panels.
///
/// # Safety
/// As `gemm`, with `b` covering B's k rows of n and `a` every element it maps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemm_avx512(shape: MatmulShape, a: Operand, b: BView, c: *mut f32) {
    let MatmulShape { m, n, k } = shape;
    let run = k.div_ceil(k.div_ceil(KC));
    let mut segments = [Segment::default(); KC];
    for k0 in (0..k).step_by(run) {
        let kc = run.min(k - k0);
        let mut used = 0;
        let mut kk = k0;
        while kk < k0 + kc {
            let count = a.ks.left_in_run(kk).min(k0 + kc - kk);
            segments[used] = Segment {
                offset: a.ks.offset(kk),
                count,
            };
            used += 1;
            kk += count;
        }
        let mut i0 = 0;
        while i0 < m {
            let rows = MR.min(m - i0).min(a.rows.left_in_run(a.first + i0));
            for j0 in (0..n).step_by(NR) {
                let cols = NR.min(n - j0);
                // SAFETY: rows i0..i0 + rows and the run's stretches of k of A lie inside it, B's
                // rows k0..k0 + kc and columns j0..j0 + cols in `b`, and C's rows i0..i0 + rows,
                // columns j0..j0 + cols inside C (the caller's contract); the masks keep every
                // load and store to those columns.
                unsafe {
                    let tile = Tile {
                        a: a.ptr.add(a.rows.offset(a.first + i0)),
                        a_row: a.rows.stride,
                        a_col: a.ks.stride,
                        segments: &segments[..used],
                        b: b.ptr.add((j0 / NR) * b.panel + k0 * b.row),
                        b_row: b.row,
                        c: c.add(i0 * n + j0),
                        c_row: n,
                        masks: [column_mask(cols), column_mask(cols.saturating_sub(16))],
                        carry: k0 > 0,
                    };
                    micro_tile(rows, a.rows.stride == 1, &tile);
                }
            }
            i0 += rows;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gemm_avx512(_: MatmulShape, _: Operand, _: BView, _: *mut f32) {
    unreachable!("gemm runs only where available() holds, which is x86-64 with AVX-512")
}

/// The lane mask of a vector for `cols` (0..) of its 16 columns.
fn column_mask(cols: usize) -> u16 {
    if cols >= 16 {
        u16::MAX
    } else {
        ((1u32 << cols) - 1) as u16
    }
}

/// One micro-tile's operands: `rows` (at most MR) rows of C by a panel's columns, summed over a
/// run of k.
struct Tile<'s> {
    /// A's rows: element (r, t) of a stretch at `a + r * a_row + stretch.offset + t * a_col`.
    a: *const f32,
    a_row: usize,
    a_col: usize,
    segments: &'s [Segment],
    /// B's panel: element (kk, j) at `b + kk * b_row + j`.
    b: *const f32,
    b_row: usize,
    c: *mut f32,
    c_row: usize,
    /// Which columns of the panel's two vectors C has.
    masks: [u16; 2],
    /// Whether C already holds the chain's earlier terms (a later run of k).
    carry: bool,
}

/// Dispatch a tile of `rows` rows to the kernel compiled for exactly that many, and for A's
/// values of a step lying side by side (`packed_rows`: A's row stride is 1) or not.
///
/// # Safety
/// As `gemm_avx512`, for the tile's rows, columns and run of k.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_tile(rows: usize, packed_rows: bool, t: &Tile) {
    macro_rules! dispatch {
        ($($r:literal)*) => {
            match (rows, packed_rows) {
                $(($r, true) => micro::<$r, true>(t), ($r, false) => micro::<$r, false>(t),)*
                (_, true) => micro::<1, true>(t),
                (_, false) => micro::<1, false>(t),
            }
        };
    }
    // SAFETY: the caller's contract; each kernel touches exactly its R rows.
    unsafe { dispatch!(12 11 10 9 8 7 6 5 4 3 2) }
}

/// C[r][..] (+)= sum over kk of A[r][kk] * B[kk][..] for R rows and the panel's two vectors;
/// `PACKED_ROWS`: A's row stride is 1, so a step's R values are one run of memory.
///
/// # Safety
/// As `micro_tile`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn micro<const R: usize, const PACKED_ROWS: bool>(t: &Tile) {
    use std::arch::x86_64::*;
    let [m0, m1] = t.masks;
    let a_row = if PACKED_ROWS { 1 } else { t.a_row };
    // SAFETY: every pointer read or written through stays inside the tile (the caller's
    // contract); masked-off lanes of B and C are neither read nor written. A second vector that
    // is wholly masked off, and the pointers stepped past a run's last step, may lie beyond the
    // allocations: they are formed with wrapping arithmetic.
    unsafe {
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        if t.carry {
            for r in 0..R {
                acc0[r] = _mm512_maskz_loadu_ps(m0, t.c.add(r * t.c_row));
                acc1[r] = _mm512_maskz_loadu_ps(m1, t.c.wrapping_add(r * t.c_row + 16));
            }
        }
        let mut b = t.b;
        for segment in t.segments {
            let mut a = t.a.add(segment.offset);
            // Two steps of k at a time: each row's address is worked out once for both (the
            // compiler steps from row to row with one add each, a chain as long as the FMAs'
            // issue time per step), and the loop's overhead is paid half as often. Each sum
            // still takes its steps in order.
            for _ in 0..segment.count / 2 {
                let b0 = _mm512_maskz_loadu_ps(m0, b);
                let b1 = _mm512_maskz_loadu_ps(m1, b.wrapping_add(16));
                let b2 = _mm512_maskz_loadu_ps(m0, b.add(t.b_row));
                let b3 = _mm512_maskz_loadu_ps(m1, b.wrapping_add(t.b_row + 16));
                for r in 0..R {
                    let row = a.add(r * a_row);
                    let x = _mm512_set1_ps(*row);
                    let y = _mm512_set1_ps(*row.add(t.a_col));
                    acc0[r] = _mm512_fmadd_ps(x, b0, acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(x, b1, acc1[r]);
                    acc0[r] = _mm512_fmadd_ps(y, b2, acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(y, b3, acc1[r]);
                }
                a = a.wrapping_add(2 * t.a_col);
                b = b.wrapping_add(2 * t.b_row);
            }
            if segment.count % 2 == 1 {
                let b0 = _mm512_maskz_loadu_ps(m0, b);
                let b1 = _mm512_maskz_loadu_ps(m1, b.wrapping_add(16));
                for r in 0..R {
                    let x = _mm512_set1_ps(*a.add(r * a_row));
                    acc0[r] = _mm512_fmadd_ps(x, b0, acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(x, b1, acc1[r]);
                }
                b = b.wrapping_add(t.b_row);
            }
        }
        for r in 0..R {
            _mm512_mask_storeu_ps(t.c.add(r * t.c_row), m0, acc0[r]);
            _mm512_mask_storeu_ps(t.c.wrapping_add(r * t.c_row + 16), m1, acc1[r]);
        }
    }
}

#[cfg(test)]
mod tests;
