//! The fast CPU path's kernels: loops over plain slices that know nothing of tensors or ops.
//! Each module states its contract against `reference`: the same bits where only values move or
//! element-wise operations run, the same sums up to their order where products are summed.
//!
//! - `gemm`: the AVX-512 single-threaded product (12 x 32 micro-tiles, A read through strides or
//!   a convolution's patch layout);
//! - `sgemm`: a product spread over the threads (row pieces, a K split, or `narrow`), with the
//!   fallback to `matrixmultiply` without AVX-512;
//! - `narrow`: products with at most 16 output columns or 16 terms per sum;
//! - `sparse`: the first layer's products over mostly-zero pixels;
//! - `im2col`: a convolution's patch matrix, col2im and the blocked input gradient;
//! - `maxpool`: max pooling forward and backward;
//! - `direct_conv`: a first convolution straight from the pixels, fused with its pool.

pub mod direct_conv;
pub mod gemm;
pub mod im2col;
pub mod maxpool;
pub mod narrow;
pub mod sgemm;
pub mod sparse;
#[cfg(test)]
mod test_values;

/// A matrix read through strides: element (i, j) at `data[i * row + j * col]`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub row: usize,
    pub col: usize,
}

impl<'a> Strided<'a> {
    pub fn new(data: &'a [f32], row: usize, col: usize) -> Self {
        Strided { data, row, col }
    }

    /// The (row, column) strides.
    pub fn strides(&self) -> Strides {
        Strides {
            row: self.row,
            col: self.col,
        }
    }

    /// Whether element (i, j) lies inside `data`.
    pub fn reaches(&self, i: usize, j: usize) -> bool {
        self.data.len() > i * self.row + j * self.col
    }
}

/// How a matrix is laid out in memory: element (i, j) at `i * row + j * col`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    pub row: usize,
    pub col: usize,
}
