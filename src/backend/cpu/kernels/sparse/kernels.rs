//! The sparse products' kernels: each cuts the output into blocks of columns (`column_blocks`)
//! and sums one block of a range of rows in registers, over the non-zeros of `SparseLines`
//! segment by segment; `simd_variants!` compiles each kernel for AVX-512 and for AVX2 (both with
//! FMA) and for the baseline without. Also the packed dense operand (`Panels`) and the output rows a kernel writes (`RowParts`).
//!
//! Guarantees: every output value is summed whole by one call, over the non-zeros in increasing
//! position order, starting from zero; the forward kernel then adds the bias and applies ReLU, the
//! weight-gradient kernel then applies the optimizer step per value (`reference::rmsprop_one`,
//! `reference::sgd_one`). Kernels write only the rows they are given.

use std::ops::Range;

use super::lines::SparseLines;
use crate::backend::cpu::simd::mul_add;
use crate::backend::cpu::threads::{self, chunk_count, MAX_CHUNKS};
use crate::backend::reference::{rmsprop_one, sgd_one};

/// Columns of the output handled by one register block: 8 vectors (128 columns with AVX-512, 64
/// with AVX2 or none), then 8, then 1. Eight independent sums keep the multiply-add units busy.
pub(super) const WIDE_AVX512: usize = 128;
pub(super) const WIDE: usize = 64;
const NARROW: usize = 8;

/// A dense matrix (rows, cols) stored as column panels: the columns are cut in blocks as the
/// kernels take them (64 wide, then 8, then 1), and the block starting at column c0 with width w is
/// stored whole, row after row, at rows * c0: value (r, c0 + j) at rows * c0 + r * w + j. A kernel
/// that reads one block for many rows then walks one contiguous stretch of memory; read in place,
/// the same rows lie a row stride apart (2 KB for 512 columns), so that they fall into a few cache
/// sets and evict each other.
#[derive(Debug, Default)]
pub struct Panels {
    data: Vec<f32>,
}

impl Panels {
    /// Pack x (rows, cols) in blocks of `wide` columns (then 8, then 1), the wide blocks spread
    /// over `threads`'s threads.
    pub(super) fn pack(&mut self, x: &[f32], rows: usize, cols: usize, wide_cols: usize) {
        let w = wide_cols;
        let x = &x[..rows * cols];
        if self.data.len() < x.len() {
            self.data.resize(x.len(), 0.0);
        }
        let wide = cols / w * w;
        let (head, tail) = self.data[..x.len()].split_at_mut(rows * wide);
        let blocks = head.len() / (rows * w).max(1);
        let per_chunk = blocks.div_ceil(chunk_count(blocks)).max(1);
        let mut panels = head.chunks_mut((rows * w * per_chunk).max(1)).enumerate();
        let items: [_; MAX_CHUNKS] = std::array::from_fn(|_| panels.next());
        threads::for_each(items, &|(i, panels): (usize, &mut [f32])| {
            for (j, panel) in panels.chunks_exact_mut((rows * w).max(1)).enumerate() {
                pack_block(panel, x, cols, (i * per_chunk + j) * w, w);
            }
        });
        let mut col = wide;
        let mut offset = 0;
        for width in column_blocks(cols, w).map(|(_, bw)| bw).filter(|&bw| bw < w) {
            pack_block(&mut tail[offset..offset + rows * width], x, cols, col, width);
            offset += rows * width;
            col += width;
        }
    }

    /// The block at column c0, width w, of a matrix of `rows` rows.
    fn block(&self, rows: usize, c0: usize, w: usize) -> Block<'_> {
        Block {
            data: &self.data[rows * c0..rows * (c0 + w)],
            stride: w,
        }
    }
}

/// A block of columns of a dense matrix: its row i starts at data[i * stride].
#[derive(Clone, Copy)]
struct Block<'a> {
    data: &'a [f32],
    stride: usize,
}

/// Copy columns c0..c0+w of x (rows, cols) into panel (rows, w).
fn pack_block(panel: &mut [f32], x: &[f32], cols: usize, c0: usize, w: usize) {
    for (dst, src) in panel.chunks_exact_mut(w).zip(x.chunks_exact(cols)) {
        dst.copy_from_slice(&src[c0..c0 + w]);
    }
}

/// The column blocks (first column, width) of a matrix of `cols` columns, as the kernels and
/// `Panels` cut them: `w` wide while w remain, then 64 wide (when w is wider), then 8, then 1.
fn column_blocks(cols: usize, w: usize) -> impl Iterator<Item = (usize, usize)> {
    let wide = cols / w * w;
    let mid = wide + (cols - wide) / WIDE * WIDE;
    let narrow = mid + (cols - mid) / NARROW * NARROW;
    (0..wide)
        .step_by(w)
        .map(move |c| (c, w))
        .chain((wide..mid).step_by(WIDE).map(|c| (c, WIDE)))
        .chain((mid..narrow).step_by(NARROW).map(|c| (c, NARROW)))
        .chain((narrow..cols).map(|c| (c, 1)))
}

/// What the forward product applies to its sums: + bias (OC) when given, then max(., 0) when
/// `relu`.
#[derive(Debug, Clone, Copy)]
pub struct BiasRelu<'a> {
    pub bias: Option<&'a [f32]>,
    pub relu: bool,
}

/// The optimizer step's hyper-parameters (its tensors travel in `RowParts`).
#[derive(Clone, Copy)]
pub(super) enum UpdateRule {
    None,
    RmsProp { lr: f32, rho: f32, eps: f32 },
    Sgd { lr: f32 },
}

/// Up to three row-major matrices of `width` columns cut at the same rows: the output, and the
/// weight's value and velocity that the fused step writes.
pub(super) struct RowParts<'a> {
    pub(super) first: &'a mut [f32],
    pub(super) second: Option<&'a mut [f32]>,
    pub(super) third: Option<&'a mut [f32]>,
    pub(super) width: usize,
}

impl<'a> RowParts<'a> {
    /// The first `rows` rows and the rest.
    pub(super) fn split_at(self, rows: usize) -> (RowParts<'a>, RowParts<'a>) {
        let at = rows * self.width;
        let split = |s: Option<&'a mut [f32]>| match s {
            Some(s) => {
                let (lo, hi) = s.split_at_mut(at.min(s.len()));
                (Some(lo), Some(hi))
            }
            None => (None, None),
        };
        let (first_lo, first_hi) = self.first.split_at_mut(at.min(self.first.len()));
        let (second_lo, second_hi) = split(self.second);
        let (third_lo, third_hi) = split(self.third);
        let width = self.width;
        (
            RowParts {
                first: first_lo,
                second: second_lo,
                third: third_lo,
                width,
            },
            RowParts {
                first: first_hi,
                second: second_hi,
                third: third_hi,
                width,
            },
        )
    }
}

simd_variants! {
    /// `forward_rows` at `level`: with FMA and 128-column blocks on AVX-512, FMA and 64-column
    /// blocks on AVX2, separate multiplies and adds otherwise.
    pub(super) fn forward_rows_simd(
        level: Simd,
        parts: &mut RowParts<'_>,
        rows: Range<usize>,
        x: &SparseLines,
        weight: &[f32],
        epilogue: BiasRelu,
        oc: usize
    ) => {
        avx512: forward_rows::<true, WIDE_AVX512>,
        avx2: forward_rows::<true, WIDE>,
        portable: forward_rows::<false, WIDE>,
    }
}

/// Rows `rows` of the forward product into parts.first (which starts at row rows.start), one
/// block of columns at a time, so that the block's panel of the weight stays in cache.
#[inline(always)]
pub(super) fn forward_rows<const FMA: bool, const W: usize>(
    parts: &mut RowParts<'_>,
    rows: Range<usize>,
    x: &SparseLines,
    weight: &[f32],
    BiasRelu { bias, relu }: BiasRelu,
    oc: usize,
) {
    for (col, width) in column_blocks(oc, W) {
        let panel = Block {
            data: &weight[col..],
            stride: oc,
        };
        let bias = bias.map(|bias| &bias[col..col + width]);
        let out = ColumnBlock {
            data: &mut *parts.first,
            first_row: rows.start,
            stride: oc,
            col,
        };
        match width {
            w if w == W => forward_block::<W, FMA>(out, rows.clone(), x, panel, bias, relu),
            WIDE => forward_block::<WIDE, FMA>(out, rows.clone(), x, panel, bias, relu),
            NARROW => forward_block::<NARROW, FMA>(out, rows.clone(), x, panel, bias, relu),
            _ => forward_block::<1, FMA>(out, rows.clone(), x, panel, bias, relu),
        }
    }
}

/// Columns col.. of a row-major matrix (`stride` columns) whose slice starts at row `first_row`.
struct ColumnBlock<'a> {
    data: &'a mut [f32],
    first_row: usize,
    stride: usize,
    col: usize,
}

impl ColumnBlock<'_> {
    /// The w values of row `row` from column `col`.
    fn row(&mut self, row: usize, w: usize) -> &mut [f32] {
        let at = (row - self.first_row) * self.stride + self.col;
        &mut self.data[at..at + w]
    }
}

/// One block of W columns of rows `rows`, segment by segment of the input's columns: each row's
/// partial sum over the segment's non-zeros is held in W registers; `panel` (C, W) is the
/// weight's block, `bias` (W) its bias.
#[inline(always)]
fn forward_block<const W: usize, const FMA: bool>(
    mut out: ColumnBlock<'_>,
    rows: Range<usize>,
    x: &SparseLines,
    panel: Block<'_>,
    bias: Option<&[f32]>,
    relu: bool,
) {
    for row in rows.clone() {
        out.row(row, W).fill(0.0);
    }
    for s in 0..x.segments() {
        for row in rows.clone() {
            let (index, value) = x.segment(row, s);
            if !index.is_empty() {
                accumulate::<W, FMA>(out.row(row, W), index, value, panel);
            }
        }
    }
    for row in rows {
        let o = out.row(row, W);
        if let Some(bias) = bias {
            for (a, &bv) in o.iter_mut().zip(bias) {
                *a += bv;
            }
        }
        if relu {
            for a in o.iter_mut() {
                *a = if *a > 0.0 { *a } else { 0.0 };
            }
        }
    }
}

/// sum (W) += value[n] * panel row index[n] (W values), over n, in W registers.
#[inline(always)]
fn accumulate<const W: usize, const FMA: bool>(sum: &mut [f32], index: &[u32], value: &[f32], panel: Block<'_>) {
    let mut acc = [0.0f32; W];
    acc.copy_from_slice(&sum[..W]);
    for (&i, &v) in index.iter().zip(value) {
        let p = &panel.data[i as usize * panel.stride..][..W];
        for (a, &p) in acc.iter_mut().zip(p) {
            *a = mul_add::<FMA>(v, p, *a);
        }
    }
    sum[..W].copy_from_slice(&acc);
}

simd_variants! {
    /// `dweight_rows` at `level`, as `forward_rows_simd`.
    pub(super) fn dweight_rows_simd(
        level: Simd,
        parts: &mut RowParts<'_>,
        rows: Range<usize>,
        x: &SparseLines,
        dout: &Panels,
        update: UpdateRule,
        b: usize
    ) => {
        avx512: dweight_rows::<true, WIDE_AVX512>,
        avx2: dweight_rows::<true, WIDE>,
        portable: dweight_rows::<false, WIDE>,
    }
}

/// Rows `rows` of the weight gradient (and of the step on the weight) into `parts`, one block of
/// columns at a time (dout's panel of the block stays in cache).
#[inline(always)]
pub(super) fn dweight_rows<const FMA: bool, const W: usize>(
    parts: &mut RowParts<'_>,
    rows: Range<usize>,
    x: &SparseLines,
    dout: &Panels,
    update: UpdateRule,
    b: usize,
) {
    let oc = parts.width;
    for (col, width) in column_blocks(oc, W) {
        let panel = dout.block(b, col, width);
        match width {
            w if w == W => dweight_block::<W, FMA>(parts, rows.clone(), x, panel, update, oc, col),
            WIDE => dweight_block::<WIDE, FMA>(parts, rows.clone(), x, panel, update, oc, col),
            NARROW => dweight_block::<NARROW, FMA>(parts, rows.clone(), x, panel, update, oc, col),
            _ => dweight_block::<1, FMA>(parts, rows.clone(), x, panel, update, oc, col),
        }
    }
}

/// Columns col..col+W of gradient rows `rows`, segment by segment of the batch (weight row i
/// sums the rows of dout's `panel` (B, W) where column i of x is non-zero), then the step on the
/// same values of the weight.
#[inline(always)]
fn dweight_block<const W: usize, const FMA: bool>(
    parts: &mut RowParts<'_>,
    rows: Range<usize>,
    x: &SparseLines,
    panel: Block<'_>,
    update: UpdateRule,
    oc: usize,
    col: usize,
) {
    let at = |row: usize| (row - rows.start) * oc + col;
    for row in rows.clone() {
        parts.first[at(row)..at(row) + W].fill(0.0);
    }
    for s in 0..x.segments() {
        for row in rows.clone() {
            let (index, value) = x.segment(row, s);
            if !index.is_empty() {
                accumulate::<W, FMA>(&mut parts.first[at(row)..], index, value, panel);
            }
        }
    }
    for row in rows.clone() {
        let (at, grad) = (at(row), &parts.first[at(row)..at(row) + W]);
        match (update, parts.second.as_deref_mut(), parts.third.as_deref_mut()) {
            (UpdateRule::RmsProp { lr, rho, eps }, Some(value), Some(velocity)) => {
                let (p, vel) = (&mut value[at..at + W], &mut velocity[at..at + W]);
                for ((p, vel), &g) in p.iter_mut().zip(vel.iter_mut()).zip(grad) {
                    rmsprop_one(p, vel, g, lr, rho, eps);
                }
            }
            (UpdateRule::Sgd { lr }, Some(value), _) => {
                for (p, &g) in value[at..at + W].iter_mut().zip(grad) {
                    sgd_one(p, g, lr);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_blocks_cover_every_column_once() {
        for w in [WIDE, WIDE_AVX512] {
            for cols in [1, 7, 8, 63, 64, 65, 127, 128, 137, 200, 512, 521] {
                let mut next = 0;
                for (c0, width) in column_blocks(cols, w) {
                    assert_eq!(c0, next, "{cols} columns, blocks of {w}");
                    assert!([w, WIDE, NARROW, 1].contains(&width));
                    next += width;
                }
                assert_eq!(next, cols, "{cols} columns, blocks of {w}");
            }
        }
    }
}
