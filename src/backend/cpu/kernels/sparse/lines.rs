//! `SparseLines`: a mostly-zero matrix kept as its non-zero values, line by line (rows or
//! columns), each line cut into segments; built from a dense matrix (optionally gathered from the
//! images on the way) or from another `SparseLines`' rows (its columns).
//!
//! Guarantees: a line holds exactly the values that are not == 0.0 (NaN and infinity are kept,
//! -0.0 is dropped), in increasing position order, whichever of the scalar and AVX-512 compactions
//! runs; the buffers only grow, so rebuilding for the same or a smaller matrix allocates nothing.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::simd::{simd, Simd};

/// The images of a batch: images[order[start + r]] for each row r.
#[derive(Debug, Clone, Copy)]
pub struct GatherBatch<'a> {
    pub images: &'a [u8],
    pub order: &'a [u32],
    pub start: usize,
}

/// A sparse matrix stored line by line: the rows of a matrix (CSR) or its columns (CSC), each
/// line cut into segments of `segment` positions (so that a kernel can walk a cache-sized
/// stretch of the other operand for every line before it moves to the next stretch). Segment s of
/// line l holds the non-zero values `value[starts[l * segs + s]..starts[l * segs + s + 1]]`, at
/// positions `index[..]` along the line, in increasing order.
#[derive(Debug, Default)]
pub struct SparseLines {
    /// Positions per segment, and segments per line.
    segment: usize,
    segs: usize,
    starts: Vec<u32>,
    index: Vec<u32>,
    value: Vec<f32>,
    /// Scratch of `set_columns`: the next free slot of each segment.
    next: Vec<u32>,
}

impl SparseLines {
    /// The rows of x (rows, cols), in segments of `segment` columns.
    pub fn set_rows(&mut self, x: &[f32], rows: usize, cols: usize, segment: usize) {
        let x = &x[..rows * cols];
        // Positions and counts are u32 (the backends refuse tensors anywhere near this).
        assert!(x.len() <= u32::MAX as usize);
        let segment = segment.max(1);
        (self.segment, self.segs) = (segment, cols.div_ceil(segment));
        // Every value is written at the next free slot, which advances only past non-zeros
        // (`push_row`): no branch on the data, so no mispredicted one.
        if self.index.len() < x.len() {
            self.index.resize(x.len(), 0);
            self.value.resize(x.len(), 0.0);
        }
        self.starts.clear();
        let mut n = 0usize;
        for row in x.chunks_exact(cols.max(1)) {
            n = self.push_row(row, n);
        }
        self.starts.push(n as u32);
    }

    /// x (rows, pixels) = images[order[start + r]] / 255 (`reference::gather_batch`), and its rows,
    /// in segments of `segment` pixels: one pass over the pixels for both.
    pub fn set_rows_gathered(
        &mut self,
        x: &mut [f32],
        GatherBatch { images, order, start }: GatherBatch,
        rows: usize,
        pixels: usize,
        segment: usize,
    ) {
        let scale = (1.0f64 / 255.0) as f32;
        assert!(rows * pixels <= u32::MAX as usize);
        let segment = segment.max(1);
        (self.segment, self.segs) = (segment, pixels.div_ceil(segment));
        if self.index.len() < rows * pixels {
            self.index.resize(rows * pixels, 0);
            self.value.resize(rows * pixels, 0.0);
        }
        self.starts.clear();
        let mut n = 0usize;
        for (r, x_row) in x[..rows * pixels].chunks_exact_mut(pixels.max(1)).enumerate() {
            let src = order[start + r] as usize * pixels;
            for (xv, &p) in x_row.iter_mut().zip(&images[src..src + pixels]) {
                *xv = p as f32 * scale;
            }
            n = self.push_row(x_row, n);
        }
        self.starts.push(n as u32);
    }

    /// Append the segments of `row` from slot n; returns the next free slot.
    #[inline(always)]
    fn push_row(&mut self, row: &[f32], mut n: usize) -> usize {
        let segment = self.segment;
        #[cfg(target_arch = "x86_64")]
        let avx512 = simd() == Simd::Avx512;
        for (s, seg) in row.chunks(segment).enumerate() {
            self.starts.push(n as u32);
            let (index, value) = (&mut self.index[n..n + seg.len()], &mut self.value[n..n + seg.len()]);
            let first = (s * segment) as u32;
            #[cfg(target_arch = "x86_64")]
            {
                if avx512 {
                    // SAFETY: the CPU has AVX-512F (checked above).
                    n += unsafe { compact_avx512(seg, first, index, value) };
                    continue;
                }
            }
            n += compact(seg, first, index, value);
        }
        n
    }

    /// The columns of the matrix (rows, cols) whose rows `by_rows` holds, in segments of `segment`
    /// rows.
    pub fn set_columns(&mut self, by_rows: &SparseLines, rows: usize, cols: usize, segment: usize) {
        let scratch = by_rows;
        let nonzeros = scratch.nonzeros();
        let segment = segment.max(1);
        (self.segment, self.segs) = (segment, rows.div_ceil(segment));
        let segs = self.segs;
        // Count the values of each (column, row segment), then place them row by row: each
        // segment's list comes out in increasing row order.
        self.starts.clear();
        self.starts.resize(cols * segs + 1, 0);
        for row in 0..rows {
            for &i in scratch.line(row).0 {
                self.starts[i as usize * segs + row / segment + 1] += 1;
            }
        }
        for k in 0..cols * segs {
            self.starts[k + 1] += self.starts[k];
        }
        self.next.clear();
        self.next.extend_from_slice(&self.starts[..cols * segs]);
        if self.index.len() < nonzeros {
            self.index.resize(nonzeros, 0);
            self.value.resize(nonzeros, 0.0);
        }
        for row in 0..rows {
            let (index, value) = scratch.line(row);
            for (&i, &v) in index.iter().zip(value) {
                let slot = &mut self.next[i as usize * segs + row / segment];
                self.index[*slot as usize] = row as u32;
                self.value[*slot as usize] = v;
                *slot += 1;
            }
        }
    }

    /// Lines stored.
    #[cfg(test)]
    fn lines(&self) -> usize {
        self.starts.len().saturating_sub(1) / self.segs.max(1)
    }

    /// The line m inside `lines` (2 or more) such that lines.start..m holds about `fraction` of
    /// the work of `lines`, counted as the non-zeros plus one per segment.
    pub(super) fn split_point(&self, lines: Range<usize>, fraction: f64) -> usize {
        let cost = |l: usize| self.starts[l * self.segs] as usize + l * self.segs;
        let (first, last) = (cost(lines.start), cost(lines.end));
        let target = first + ((last - first) as f64 * fraction) as usize;
        let (mut lo, mut hi) = (lines.start, lines.end);
        while lo < hi {
            let m = (lo + hi) / 2;
            if cost(m) < target {
                lo = m + 1;
            } else {
                hi = m;
            }
        }
        lo.clamp(lines.start + 1, lines.end - 1)
    }

    /// Segments per line.
    pub(super) fn segments(&self) -> usize {
        self.segs
    }

    /// Non-zero values stored.
    pub fn nonzeros(&self) -> usize {
        self.starts.last().map_or(0, |&n| n as usize)
    }

    /// Line l's positions and values.
    fn line(&self, l: usize) -> (&[u32], &[f32]) {
        let range = self.starts[l * self.segs] as usize..self.starts[(l + 1) * self.segs] as usize;
        (&self.index[range.clone()], &self.value[range])
    }

    /// Segment s of line l's positions and values.
    #[inline]
    pub(super) fn segment(&self, l: usize, s: usize) -> (&[u32], &[f32]) {
        let at = l * self.segs + s;
        let range = self.starts[at] as usize..self.starts[at + 1] as usize;
        (&self.index[range.clone()], &self.value[range])
    }
}

/// Write the non-zero values of seg and their positions (first + their index in seg) to the
/// front of `value` and `index` (each at least seg's length); returns how many. Every value is
/// written at the next free slot, which advances only past non-zeros: no branch on the data, so
/// no mispredicted one.
#[inline(always)]
fn compact(seg: &[f32], first: u32, index: &mut [u32], value: &mut [f32]) -> usize {
    let (index, value) = (&mut index[..seg.len()], &mut value[..seg.len()]);
    let mut kept = 0;
    for (i, &v) in seg.iter().enumerate() {
        index[kept] = first + i as u32;
        value[kept] = v;
        // kept <= i here, so the write stays inside the slices.
        kept += (v != 0.0) as usize;
    }
    kept
}

/// `compact` 16 values at a time: compare with zero (NaN counts as non-zero, -0 as
/// zero, as in `compact`), squeeze the kept lanes together, store all 16 lanes at the next free
/// slot (the lanes past the kept ones are overwritten later or ignored).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn compact_avx512(seg: &[f32], first: u32, index: &mut [u32], value: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let (index, value) = (&mut index[..seg.len()], &mut value[..seg.len()]);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut kept = 0usize;
    let mut i = 0usize;
    while i + 16 <= seg.len() {
        // SAFETY: i + 16 <= seg.len(), and kept <= i, so the 16 lanes read from seg[i..] and
        // written to index[kept..] and value[kept..] are inside the three slices (each seg.len()).
        unsafe {
            let v = _mm512_loadu_ps(seg.as_ptr().add(i));
            let keep = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(v, _mm512_setzero_ps());
            let at = _mm512_add_epi32(_mm512_set1_epi32((first as usize + i) as i32), lanes);
            _mm512_storeu_ps(value.as_mut_ptr().add(kept), _mm512_maskz_compress_ps(keep, v));
            _mm512_storeu_si512(
                index.as_mut_ptr().add(kept).cast(),
                _mm512_maskz_compress_epi32(keep, at),
            );
            kept += keep.count_ones() as usize;
        }
        i += 16;
    }
    // The last values one by one, from where the vectors stopped.
    let tail = compact(&seg[i..], first + i as u32, &mut index[kept..], &mut value[kept..]);
    kept + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_columns_hold_exactly_the_non_zeros() {
        // (3, 4) with an empty row, a full row and an empty column; NaN counts as non-zero.
        let x = [0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, f32::NAN, 0.0, -4.0];
        let mut rows = SparseLines::default();
        rows.set_rows(&x, 3, 4, 4);
        assert_eq!(rows.lines(), 3);
        assert_eq!(rows.nonzeros(), 5);
        assert_eq!(rows.line(0), (&[1u32, 3][..], &[1.0f32, 2.0][..]));
        assert_eq!(rows.line(1).0, &[] as &[u32]);
        assert_eq!(rows.line(2).0, &[0u32, 1, 3]);
        assert!(rows.line(2).1[1].is_nan());
        let mut cols = SparseLines::default();
        cols.set_columns(&rows, 3, 4, 2);
        assert_eq!(cols.lines(), 4);
        assert_eq!(cols.line(0), (&[2u32][..], &[3.0f32][..]));
        assert_eq!(cols.line(2).0, &[] as &[u32]);
        assert_eq!(cols.line(3), (&[0u32, 2][..], &[2.0f32, -4.0][..]));
        // A full matrix: every value kept, and the buffers reused for a smaller one.
        let full = [1.0f32; 12];
        rows.set_rows(&full, 3, 4, 4);
        assert_eq!(rows.nonzeros(), 12);
        assert_eq!(rows.line(2), (&[0u32, 1, 2, 3][..], &[1.0f32; 4][..]));
        rows.set_rows(&x[..4], 1, 4, 4);
        assert_eq!((rows.lines(), rows.nonzeros()), (1, 2));
    }

    #[test]
    fn long_rows_keep_every_non_zero_in_order() {
        // Rows of 100 (6 vectors of 16 and a tail of 4), segments of 64 and 36: zeros, -0, NaN,
        // runs of non-zeros, every lane position.
        let (rows, cols) = (5, 100);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| match (i * 7919) % 11 {
                0 => f32::NAN,
                1 => -0.0,
                2..=6 => 0.0,
                k => k as f32 - 8.5,
            })
            .collect();
        let mut lines = SparseLines::default();
        lines.set_rows(&x, rows, cols, 64);
        let mut total = 0;
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let want: Vec<(u32, f32)> = (0..cols as u32)
                .zip(row.iter().copied())
                .filter(|&(_, v)| v != 0.0)
                .collect();
            let mut got = Vec::new();
            for s in 0..2 {
                let (index, value) = lines.segment(r, s);
                assert!(index.iter().all(|&i| (i as usize) / 64 == s), "row {r} segment {s}");
                got.extend(index.iter().copied().zip(value.iter().copied()));
            }
            assert_eq!(got.len(), want.len(), "row {r}");
            for ((gi, gv), (wi, wv)) in got.into_iter().zip(want) {
                assert!(
                    gi == wi && (gv == wv || gv.is_nan() && wv.is_nan()),
                    "row {r}: {gi} {gv} vs {wi} {wv}"
                );
            }
            total += lines.line(r).0.len();
        }
        assert_eq!(total, lines.nonzeros());
    }
}
