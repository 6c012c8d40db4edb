//! The fast CPU path's products with a mostly-zero input matrix: MNIST's pixels are about 81 %
//! zero, so the first layer's two large products, out = x @ W1 (forward) and dW1 = x^T @ dh
//! (weight gradient), need only a fifth of a dense product's multiply-adds when the zero terms are
//! skipped. Those two products are 98 % of a reference step's arithmetic.
//!
//! Contract: `matmul_forward` returns what `reference::matmul_forward` followed by
//! `reference::matmul_epilogue` (bias, ReLU) returns, and `matmul_backward_weight` what
//! `reference::matmul_backward_weight` returns, up to the summation order (zero terms are left out,
//! the others are added in the reference's order, fused multiply-add where the CPU has it). The
//! optimizer step fused into `matmul_backward_weight` is `reference::rmsprop_one` /
//! `reference::sgd_one` per value, as in `elementwise` (bit-identical for the same gradient). A non-finite input value is kept as a non-zero, so NaN
//! and infinity in the input spread as in a dense product; a non-finite weight meets only the
//! non-zero inputs (a dense product would also multiply it by the zeros, making NaN). Work is
//! split over rows on `threads`, each output value summed whole by one thread, so results do
//! not depend on the thread count; nothing is allocated once the scratch has grown to the
//! largest batch.
//!
//! Layout: `lines` holds the sparse input (`SparseLines`), `kernels` the per-block products; this
//! file holds the entry points, the decision whether a product pays, and the split of the work
//! over threads.

mod kernels;
mod lines;

use std::ops::Range;

use crate::backend::cpu::simd::{simd, Simd};
use crate::backend::cpu::threads::{self, chunk_count, MAX_CHUNKS};
use crate::backend::ops::DenseShape;
pub use kernels::BiasRelu;
use kernels::{dweight_rows_simd, forward_rows_simd};
use kernels::{Panels, RowParts, UpdateRule, WIDE, WIDE_AVX512};
use lines::GatherBatch;
use lines::SparseLines;

/// Input columns per segment of the forward product (the weight's panel rows per stretch: 64 rows
/// of a 64-wide panel are 16 KB, half the L1 cache), and batch rows per segment of the weight
/// gradient (dout's panel rows).
const FORWARD_SEGMENT: usize = 64;
const DWEIGHT_SEGMENT: usize = 32;

/// Use the sparse products when at most this fraction of the input is non-zero: each skipped zero
/// saves a multiply-add, while a kept one costs about twice a dense GEMM's, so the two break even
/// a little under half non-zero; 0.35 leaves a margin.
const MAX_DENSITY: f64 = 0.35;
/// ... and the output has at least this many columns (narrower outputs leave the vector units idle).
const MIN_COLUMNS: usize = WIDE;

/// Whether the sparse products pay for an input (rows, cols) with `nonzeros` non-zero values whose
/// product has `out_cols` columns.
pub fn pays(nonzeros: usize, rows: usize, cols: usize, out_cols: usize) -> bool {
    may_pay(out_cols) && (nonzeros as f64) <= MAX_DENSITY * (rows * cols) as f64
}

/// Whether the sparse products can pay for a product with `out_cols` columns, whatever the input.
pub fn may_pay(out_cols: usize) -> bool {
    out_cols >= MIN_COLUMNS
}

/// The optimizer step fused into the weight gradient, applied to each gradient value as soon as it
/// is computed (`reference::rmsprop_one` / `reference::sgd_one` per value).
pub enum WeightStep<'a> {
    /// Only the gradient is written.
    None,
    /// Keras RMSprop on `value` (C, OC) with `velocity` (C, OC).
    RmsProp {
        value: &'a mut [f32],
        velocity: &'a mut [f32],
        lr: f32,
        rho: f32,
        eps: f32,
    },
    /// Plain SGD on `value` (C, OC).
    Sgd { value: &'a mut [f32], lr: f32 },
}

/// Names the dense matrix whose rows a `SparseScratch` holds: any key that changes whenever the matrix
/// may have changed (the CPU backend gives its array, offset and write count), and the shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub key: (usize, usize, u64),
    pub rows: usize,
    pub cols: usize,
}

/// The buffers of the sparse products, kept between calls so that a step allocates nothing: the
/// sparse input's rows (and which matrix they are of), its columns, and a packed dense operand.
/// The first layer's input is turned into rows once, as it is gathered, and the weight gradient
/// builds its columns from those rows.
#[derive(Debug, Default)]
pub struct SparseScratch {
    rows: SparseLines,
    rows_of: Option<Source>,
    columns: SparseLines,
    panels: Panels,
}

impl SparseScratch {
    /// Gather x (source.rows, source.cols) = images[order[start + r]] / 255 and hold its rows.
    pub fn gather(&mut self, x: &mut [f32], images: &[u8], order: &[u32], start: usize, source: Source) {
        let (rows, pixels) = (source.rows, source.cols);
        self.rows
            .set_rows_gathered(x, GatherBatch { images, order, start }, rows, pixels, FORWARD_SEGMENT);
        self.rows_of = Some(source);
    }

    /// Hold the rows of x (source.rows, source.cols), built unless held already.
    pub fn hold_rows(&mut self, x: &[f32], source: Source) {
        if self.rows_of != Some(source) {
            self.rows.set_rows(x, source.rows, source.cols, FORWARD_SEGMENT);
            self.rows_of = Some(source);
        }
    }

    /// Whether a product of x (source.rows, source.cols) into `out_cols` columns pays as a
    /// sparse one (`pays`); if so, hold x's rows (built unless held already). A dense input is
    /// only counted, so that the rows held of another input (the first layer's, which its weight
    /// gradient needs again) are kept.
    pub fn rows_if_sparse(&mut self, x: &[f32], source: Source, out_cols: usize) -> bool {
        let (rows, cols) = (source.rows, source.cols);
        if self.rows_of != Some(source) {
            let nonzeros = x[..rows * cols].iter().map(|&v| (v != 0.0) as usize).sum();
            if !pays(nonzeros, rows, cols, out_cols) {
                return false;
            }
            self.hold_rows(x, source);
        }
        pays(self.rows.nonzeros(), rows, cols, out_cols)
    }
}

/// out (B, OC) = x (B, C) @ weight (C, OC), + bias (OC) when given, then max(., 0) when `relu`,
/// where x's rows are those `scratch` holds (`SparseScratch::gather` or `SparseScratch::rows_if_sparse`).
pub fn matmul_forward(
    out: &mut [f32],
    scratch: &mut SparseScratch,
    weight: &[f32],
    epilogue: BiasRelu,
    shape: DenseShape,
) {
    let (b, c, oc) = shape.dims();
    let bias = epilogue.bias;
    assert!(out.len() >= b * oc && weight.len() >= c * oc);
    assert!(bias.is_none_or(|bias| bias.len() >= oc));
    assert!(scratch.rows_of.is_some_and(|s| (s.rows, s.cols) == (b, c)));
    // The weight is read in place, not packed: each row's block of 64 values is a few whole cache
    // lines either way.
    let x = &scratch.rows;
    let weight = &weight[..c * oc];
    let level = simd();
    let parts = RowParts {
        first: out,
        second: None,
        third: None,
        width: oc,
    };
    threads::for_each(split_lines(0..b, parts, x), &|(rows, mut parts)| {
        forward_rows_simd(level, &mut parts, rows, x, weight, epilogue, oc)
    });
}

/// dweight (C, OC) = x (B, C)^T @ dout (B, OC), then `step` on the weight, where x's rows are
/// those `scratch` holds.
pub fn matmul_backward_weight(
    dweight: &mut [f32],
    scratch: &mut SparseScratch,
    dout: &[f32],
    step: WeightStep<'_>,
    shape: DenseShape,
) {
    let (b, c, oc) = shape.dims();
    assert!(dweight.len() >= c * oc && dout.len() >= b * oc);
    assert!(scratch.rows_of.is_some_and(|s| (s.rows, s.cols) == (b, c)));
    scratch.columns.set_columns(&scratch.rows, b, c, DWEIGHT_SEGMENT);
    let level = simd();
    scratch.panels.pack(dout, b, oc, wide(level));
    let (x, dout) = (&scratch.columns, &scratch.panels);
    let (second, third, update) = match step {
        WeightStep::None => (None, None, UpdateRule::None),
        WeightStep::RmsProp {
            value,
            velocity,
            lr,
            rho,
            eps,
        } => (Some(value), Some(velocity), UpdateRule::RmsProp { lr, rho, eps }),
        WeightStep::Sgd { value, lr } => (Some(value), None, UpdateRule::Sgd { lr }),
    };
    assert!(second.as_ref().is_none_or(|v| v.len() >= c * oc));
    assert!(third.as_ref().is_none_or(|v| v.len() >= c * oc));
    let parts = RowParts {
        first: dweight,
        second,
        third,
        width: oc,
    };
    threads::for_each(split_lines(0..c, parts, x), &|(rows, mut parts)| {
        dweight_rows_simd(level, &mut parts, rows, x, dout, update, b)
    });
}

/// The width of the wide column blocks at `level`.
fn wide(level: Simd) -> usize {
    match level {
        Simd::Avx512 => WIDE_AVX512,
        _ => WIDE,
    }
}

/// `lines` of x and their `parts`, cut into `chunk_count` ranges of about equal work (each
/// `parts` starting at its range's first line).
fn split_lines<'a>(
    lines: Range<usize>,
    parts: RowParts<'a>,
    x: &SparseLines,
) -> [Option<(Range<usize>, RowParts<'a>)>; MAX_CHUNKS] {
    let chunks = chunk_count(lines.len());
    let mut rest = Some((lines, parts));
    std::array::from_fn(|i| {
        let (lines, parts) = rest.take()?;
        if i + 1 == chunks || lines.len() <= 1 {
            return Some((lines, parts));
        }
        let mid = x.split_point(lines.clone(), 1.0 / (chunks - i) as f64);
        let (lo, hi) = parts.split_at(mid - lines.start);
        rest = Some((mid..lines.end, hi));
        Some((lines.start..mid, lo))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_needs_sparse_input_and_wide_output() {
        assert!(pays(19_000, 128, 784, 512));
        assert!(!pays(60_000, 128, 784, 512));
        assert!(!pays(19_000, 128, 784, 10));
        assert!(may_pay(64) && !may_pay(63));
    }
}
