//! The fast CPU path's products with a mostly-zero input matrix: MNIST's pixels are about 81 %
//! zero, so the first layer's two large products, out = x @ W1 (forward) and dW1 = x^T @ dh
//! (weight gradient), need only a fifth of a dense product's multiply-adds when the zero terms are
//! skipped. Those two products are 98 % of a reference step's arithmetic.
//!
//! Contract: `matmul_forward` returns what `reference::matmul_forward` followed by
//! `reference::matmul_epilogue` (bias, ReLU) returns, and `matmul_backward_weight` what
//! `reference::matmul_backward_weight` returns, up to the summation order (zero terms are left out,
//! the others are added in the reference's order, fused multiply-add where the CPU has it). The
//! optimizer step fused into `matmul_backward_weight` is the arithmetic of `cpu_fast`'s
//! (bit-identical for the same gradient). A non-finite input value is kept as a non-zero, so NaN
//! and infinity in the input spread as in a dense product; a non-finite weight meets only the
//! non-zero inputs (a dense product would also multiply it by the zeros, making NaN). Work is
//! split over rows on `cpu_pool`, each output value summed whole by one thread, so results do
//! not depend on the thread count; nothing is allocated once the scratch has grown to the
//! largest batch.

use std::ops::Range;

use super::cpu_pool;

/// Columns of the output handled by one register block: 8 vectors (128 columns with AVX-512, 64
/// with AVX2 or none), then 8, then 1. Eight independent sums keep the multiply-add units busy
/// (with 4, measured here: 1.5x slower); 128 columns at a time measured 10 % faster a step than 64.
const WIDE_AVX512: usize = 128;
const WIDE: usize = 64;
const NARROW: usize = 8;

/// The vector instructions the kernels use, chosen once at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Simd {
    Avx512,
    Avx2,
    Portable,
}

impl Simd {
    /// The best this CPU has, or less when `GPU_MNIST_CPU_SIMD` asks for `avx2` or `portable`
    /// (so that the tests can check every variant on one machine).
    fn detect() -> Simd {
        let asked = std::env::var("GPU_MNIST_CPU_SIMD").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            let fma = std::is_x86_feature_detected!("fma");
            let allowed = |level: &str| match asked.as_str() {
                "portable" => false,
                "avx2" => level == "avx2",
                _ => true,
            };
            let avx512 = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl");
            if fma && avx512 && allowed("avx512") {
                return Simd::Avx512;
            }
            if fma && std::is_x86_feature_detected!("avx2") && allowed("avx2") {
                return Simd::Avx2;
            }
        }
        let _ = asked;
        Simd::Portable
    }

    /// The width of the wide column blocks.
    fn wide(self) -> usize {
        match self {
            Simd::Avx512 => WIDE_AVX512,
            _ => WIDE,
        }
    }
}
/// Input columns per segment of the forward product (the weight's panel rows per stretch: 64 rows
/// of a 64-wide panel are 16 KB, half the L1 cache), and batch rows per segment of the weight
/// gradient (dout's panel rows).
const FORWARD_SEGMENT: usize = 64;
const DWEIGHT_SEGMENT: usize = 32;

/// Use the sparse products when at most this fraction of the input is non-zero: each skipped zero
/// saves a multiply-add, while a kept one costs about twice a dense GEMM's (measured here: sparse
/// and `matrixmultiply` break even near 45 % non-zero on 128x784x512).
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
    #[allow(clippy::too_many_arguments)]
    pub fn set_rows_gathered(
        &mut self,
        x: &mut [f32],
        images: &[u8],
        order: &[u32],
        start: usize,
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
    fn split_point(&self, lines: Range<usize>, fraction: f64) -> usize {
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
    fn segments(&self) -> usize {
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
    fn segment(&self, l: usize, s: usize) -> (&[u32], &[f32]) {
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

/// A dense matrix (rows, cols) stored as column panels: the columns are cut in blocks as the
/// kernels take them (64 wide, then 8, then 1), and the block starting at column c0 with width w is
/// stored whole, row after row, at rows * c0: value (r, c0 + j) at rows * c0 + r * w + j. A kernel
/// that reads one block for many rows then walks one contiguous stretch of memory; read in place,
/// the same rows lie a row stride apart (2 KB for 512 columns), so that they fall into a few cache
/// sets and evict each other (measured here: 3x slower).
#[derive(Debug, Default)]
pub struct Panels {
    data: Vec<f32>,
}

impl Panels {
    /// Pack x (rows, cols) in blocks of `wide` columns (then 8, then 1), the wide blocks spread
    /// over `cpu_pool`'s threads.
    fn pack(&mut self, x: &[f32], rows: usize, cols: usize, wide_cols: usize) {
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
        cpu_pool::for_each(items, &|(i, panels): (usize, &mut [f32])| {
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

/// The most pieces a parallel loop is cut into.
pub const MAX_CHUNKS: usize = 16;

/// Pieces to cut `units` of work into: about 4 per thread (so that a thread that falls behind
/// takes fewer), one per unit at most.
pub fn chunk_count(units: usize) -> usize {
    (4 * cpu_pool::threads()).min(MAX_CHUNKS).min(units).max(1)
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

/// The optimizer step fused into the weight gradient, applied to each gradient value as soon as it
/// is computed (`cpu_fast::rmsprop_update` / `reference::sgd_update` per value).
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

/// Names the dense matrix whose rows a `Scratch` holds: any key that changes whenever the matrix
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
pub struct Scratch {
    rows: SparseLines,
    rows_of: Option<Source>,
    columns: SparseLines,
    panels: Panels,
}

impl Scratch {
    /// Gather x (source.rows, source.cols) = images[order[start + r]] / 255 and hold its rows.
    pub fn gather(&mut self, x: &mut [f32], images: &[u8], order: &[u32], start: usize, source: Source) {
        let (rows, pixels) = (source.rows, source.cols);
        self.rows
            .set_rows_gathered(x, images, order, start, rows, pixels, FORWARD_SEGMENT);
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
/// where x's rows are those `scratch` holds (`Scratch::gather` or `Scratch::rows_if_sparse`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward(
    out: &mut [f32],
    scratch: &mut Scratch,
    weight: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    b: usize,
    c: usize,
    oc: usize,
) {
    assert!(out.len() >= b * oc && weight.len() >= c * oc);
    assert!(bias.is_none_or(|bias| bias.len() >= oc));
    assert!(scratch.rows_of.is_some_and(|s| (s.rows, s.cols) == (b, c)));
    // The weight is read in place: packing it (1.6 MB a step for the first layer) measured no
    // faster, as each row's block of 64 values is a few whole cache lines either way.
    let x = &scratch.rows;
    let weight = &weight[..c * oc];
    let simd = simd();
    let parts = RowParts {
        first: out,
        second: None,
        third: None,
        width: oc,
    };
    cpu_pool::for_each(split_lines(0..b, parts, x), &|(rows, mut parts)| {
        match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` found AVX-512F and FMA.
            Simd::Avx512 => unsafe { forward_rows_avx512(&mut parts, rows, x, weight, bias, relu, oc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` found AVX2 and FMA.
            Simd::Avx2 => unsafe { forward_rows_avx2(&mut parts, rows, x, weight, bias, relu, oc) },
            _ => forward_rows::<false, WIDE>(&mut parts, rows, x, weight, bias, relu, oc),
        }
    });
}

/// dweight (C, OC) = x (B, C)^T @ dout (B, OC), then `step` on the weight, where x's rows are
/// those `scratch` holds.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_weight(
    dweight: &mut [f32],
    scratch: &mut Scratch,
    dout: &[f32],
    step: WeightStep<'_>,
    b: usize,
    c: usize,
    oc: usize,
) {
    assert!(dweight.len() >= c * oc && dout.len() >= b * oc);
    assert!(scratch.rows_of.is_some_and(|s| (s.rows, s.cols) == (b, c)));
    scratch.columns.set_columns(&scratch.rows, b, c, DWEIGHT_SEGMENT);
    let simd = simd();
    scratch.panels.pack(dout, b, oc, simd.wide());
    let (x, dout) = (&scratch.columns, &scratch.panels);
    let (second, third, update) = match step {
        WeightStep::None => (None, None, Update::None),
        WeightStep::RmsProp {
            value,
            velocity,
            lr,
            rho,
            eps,
        } => (Some(value), Some(velocity), Update::RmsProp { lr, rho, eps }),
        WeightStep::Sgd { value, lr } => (Some(value), None, Update::Sgd { lr }),
    };
    assert!(second.as_ref().is_none_or(|v| v.len() >= c * oc));
    assert!(third.as_ref().is_none_or(|v| v.len() >= c * oc));
    let parts = RowParts {
        first: dweight,
        second,
        third,
        width: oc,
    };
    cpu_pool::for_each(split_lines(0..c, parts, x), &|(rows, mut parts)| {
        match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` found AVX-512F and FMA.
            Simd::Avx512 => unsafe { dweight_rows_avx512(&mut parts, rows, x, dout, update, b, oc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` found AVX2 and FMA.
            Simd::Avx2 => unsafe { dweight_rows_avx2(&mut parts, rows, x, dout, update, b, oc) },
            _ => dweight_rows::<false, WIDE>(&mut parts, rows, x, dout, update, b, oc),
        }
    });
}

/// Why `GPU_MNIST_CPU_SIMD` holds no variant the kernels know (unset or empty is fine).
pub fn simd_setting() -> Result<(), String> {
    match std::env::var("GPU_MNIST_CPU_SIMD") {
        Ok(v) if !["", "avx512", "avx2", "portable"].contains(&v.as_str()) => {
            Err(format!("'{v}' is not one of avx512, avx2, portable"))
        }
        _ => Ok(()),
    }
}

/// The vector instructions of this CPU (detected once).
pub(super) fn simd() -> Simd {
    static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *SIMD.get_or_init(Simd::detect)
}

/// The optimizer step's hyper-parameters (its tensors travel in `RowParts`).
#[derive(Clone, Copy)]
enum Update {
    None,
    RmsProp { lr: f32, rho: f32, eps: f32 },
    Sgd { lr: f32 },
}

/// Up to three row-major matrices of `width` columns cut at the same rows: the output, and the
/// weight's value and velocity that the fused step writes.
struct RowParts<'a> {
    first: &'a mut [f32],
    second: Option<&'a mut [f32]>,
    third: Option<&'a mut [f32]>,
    width: usize,
}

impl<'a> RowParts<'a> {
    /// The first `rows` rows and the rest.
    fn split_at(self, rows: usize) -> (RowParts<'a>, RowParts<'a>) {
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

/// a + x * y, fused where the CPU has FMA (a call to a software fma would be far slower).
#[inline(always)]
pub(super) fn mul_add<const FMA: bool>(x: f32, y: f32, a: f32) -> f32 {
    if FMA {
        x.mul_add(y, a)
    } else {
        a + x * y
    }
}

/// `$avx512` and `$avx2`: `$generic::<true, W>` compiled for AVX-512 (W = 128) and for AVX2
/// (W = 64), both with FMA; callers check the CPU first (`simd()`).
macro_rules! simd_variants {
    ($avx512:ident, $avx2:ident, $generic:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,fma")]
        unsafe fn $avx512($($arg: $ty),*) {
            $generic::<true, WIDE_AVX512>($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) {
            $generic::<true, WIDE>($($arg),*)
        }
    };
}

simd_variants!(
    forward_rows_avx512,
    forward_rows_avx2,
    forward_rows,
    (
        parts: &mut RowParts<'_>,
        rows: Range<usize>,
        x: &SparseLines,
        weight: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        oc: usize
    )
);

/// Rows `rows` of the forward product into parts.first (which starts at row rows.start), one
/// block of columns at a time, so that the block's panel of the weight stays in cache.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_rows<const FMA: bool, const W: usize>(
    parts: &mut RowParts<'_>,
    rows: Range<usize>,
    x: &SparseLines,
    weight: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    oc: usize,
) {
    for (col, width) in column_blocks(oc, W) {
        let panel = Block {
            data: &weight[col..],
            stride: oc,
        };
        let bias = bias.map(|bias| &bias[col..col + width]);
        let out = Strided {
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
struct Strided<'a> {
    data: &'a mut [f32],
    first_row: usize,
    stride: usize,
    col: usize,
}

impl Strided<'_> {
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
    mut out: Strided<'_>,
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

simd_variants!(
    dweight_rows_avx512,
    dweight_rows_avx2,
    dweight_rows,
    (
        parts: &mut RowParts<'_>,
        rows: Range<usize>,
        x: &SparseLines,
        dout: &Panels,
        update: Update,
        b: usize,
        oc: usize
    )
);

/// Rows `rows` of the weight gradient (and of the step on the weight) into `parts`, one block of
/// columns at a time (dout's panel of the block stays in cache).
#[inline(always)]
fn dweight_rows<const FMA: bool, const W: usize>(
    parts: &mut RowParts<'_>,
    rows: Range<usize>,
    x: &SparseLines,
    dout: &Panels,
    update: Update,
    b: usize,
    oc: usize,
) {
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
    update: Update,
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
            (Update::RmsProp { lr, rho, eps }, Some(value), Some(velocity)) => {
                let (p, vel) = (&mut value[at..at + W], &mut velocity[at..at + W]);
                for ((p, vel), &g) in p.iter_mut().zip(vel.iter_mut()).zip(grad) {
                    *vel = rho * *vel + (1.0 - rho) * g * g;
                    *p -= lr * g / (*vel + eps).sqrt();
                }
            }
            (Update::Sgd { lr }, Some(value), _) => {
                for (p, &g) in value[at..at + W].iter_mut().zip(grad) {
                    *p -= lr * g;
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

    #[test]
    fn the_decision_needs_sparse_input_and_wide_output() {
        assert!(pays(19_000, 128, 784, 512));
        assert!(!pays(60_000, 128, 784, 512));
        assert!(!pays(19_000, 128, 784, 10));
        assert!(may_pay(64) && !may_pay(63));
    }
}
