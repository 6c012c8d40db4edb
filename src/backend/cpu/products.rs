//! The CPU backends' matmuls: a dense layer's three products with their fused epilogues, as the
//! reference's plain loops, as sparse products (`cpu_sparse`) when the input is mostly zeros, as
//! small loops when a side is narrow (`cpu_narrow`), or as a GEMM on row pieces over the threads
//! (`cpu_gemm` on AVX-512, `matrixmultiply`'s sgemm elsewhere).
//!
//! Contract: every product here computes what `reference` does for the same op; the fast
//! variants differ only in the summation order. Nothing is allocated once the scratch buffers have
//! grown to the largest batch (on CPUs without AVX-512, matrixmultiply packs its operands in
//! buffers of its own, allocated per call).

use super::super::cpu_fast;
use super::super::cpu_gemm::{self, ALayout};
use super::super::cpu_narrow::{self, Strided};
use super::super::cpu_pool;
use super::super::cpu_sparse::{self, WeightStep};
use super::super::ops::{run_unfused, DenseShape, Matmul, MatmulKind, MatmulShape, Op, StepAt};
use super::super::reference as r;
use super::super::{ParamTensors, TensorId};
use super::{CpuBackend, CpuKind, View};
use crate::error::{Error, Result};
use crate::optim::{Optimizer, OptimizerKind};

/// What a matmul applies to its product before storing it: `+ bias` (broadcast over rows), then
/// `max(., 0)`, then zeroing where `relu_mask <= 0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Epilogue {
    pub bias: Option<TensorId>,
    pub relu: bool,
    pub relu_mask: Option<TensorId>,
}

impl CpuBackend {
    /// Run one of a dense layer's products.
    pub(super) fn matmul(&mut self, m: &Matmul, at: StepAt) -> Result<()> {
        match m.kind {
            MatmulKind::Forward {
                out,
                inp,
                weight,
                bias,
                relu,
            } => {
                let epilogue = Epilogue {
                    bias,
                    relu,
                    relu_mask: None,
                };
                self.matmul_forward(m.shape, out, inp, weight, epilogue, None)
            }
            MatmulKind::BackwardInput {
                dinp,
                dout,
                weight,
                relu_mask,
            } => self.matmul_backward_input(m.shape, dinp, dout, weight, relu_mask),
            MatmulKind::BackwardWeight {
                dweight,
                dbias,
                inp,
                dout,
                update: None,
            } => self.matmul_backward_weight(m.shape, dweight, dbias, inp, dout, None),
            MatmulKind::BackwardWeight {
                dbias: Some(_),
                update: Some(_),
                ..
            } => self.weight_update(m, at),
            MatmulKind::BackwardWeight { dbias: None, .. } => Err(Error::shape(
                "matmul backward weight + update",
                "a fused update needs the bias gradient".to_string(),
            )),
        }
    }

    /// out (B, OC) = epilogue(inp (B, C) @ weight (C, OC)); with `mapped`, inp is read through
    /// its layout (a convolution's images as their patch matrix).
    pub(super) fn matmul_forward(
        &mut self,
        shape: DenseShape,
        out: TensorId,
        inp: TensorId,
        weight: TensorId,
        epilogue: Epilogue,
        mapped: Option<Mapped>,
    ) -> Result<()> {
        let (b, c, oc) = shape.dims();
        let a_len = mapped.map_or(b * c, |m| m.len);
        let inputs = with_epilogue_inputs([(inp, a_len), (weight, c * oc)], epilogue, b * oc, oc);
        if mapped.is_none() && self.sparse_rows("matmul forward", inp, b, c, oc)? {
            let mut scratch = std::mem::take(&mut self.sparse);
            let result = self.with_out("matmul forward", (out, b * oc), &inputs, |o, i| {
                let (bias, mask) = epilogue_tensors(&i[2..], epilogue);
                cpu_sparse::matmul_forward(o, &mut scratch, i[1], (bias, epilogue.relu), (b, c, oc));
                cpu_fast::matmul_epilogue(o, None, false, mask, b, oc);
            });
            self.sparse = scratch;
            self.sparse_products += 1;
            return result;
        }
        let product = Dense {
            reference: r::matmul_forward::<f32>,
            dims: (b, c, oc),
            shape: MatmulShape { m: b, n: oc, k: c },
            strides: [(c, 1), (oc, 1)],
            mapped: mapped.map(|m| m.layout),
        };
        self.dense_product("matmul forward", (out, b * oc, oc), &inputs, epilogue, product)
    }

    /// dinp (B, C) = (dout (B, OC) @ weight (C, OC)^T) * (relu_mask > 0).
    fn matmul_backward_input(
        &mut self,
        shape: DenseShape,
        dinp: TensorId,
        dout: TensorId,
        weight: TensorId,
        relu_mask: Option<TensorId>,
    ) -> Result<()> {
        let (b, c, oc) = shape.dims();
        let epilogue = Epilogue {
            relu_mask,
            ..Epilogue::default()
        };
        let inputs = with_epilogue_inputs([(dout, b * oc), (weight, c * oc)], epilogue, b * c, c);
        // (B, OC) @ (OC, C) where weight^T is weight read with swapped strides.
        let product = Dense {
            reference: r::matmul_backward_input::<f32>,
            dims: (b, c, oc),
            shape: MatmulShape { m: b, n: c, k: oc },
            strides: [(oc, 1), (1, oc)],
            mapped: None,
        };
        self.dense_product("matmul backward input", (dinp, b * c, c), &inputs, epilogue, product)
    }

    /// dweight (C, OC) = inp (B, C)^T @ dout (B, OC); dbias (OC) = the column sums of dout; with
    /// `mapped`, inp^T is read through its layout (a convolution's images as their transposed
    /// patch matrix).
    pub(super) fn matmul_backward_weight(
        &mut self,
        shape: DenseShape,
        dweight: TensorId,
        dbias: Option<TensorId>,
        inp: TensorId,
        dout: TensorId,
        mapped: Option<Mapped>,
    ) -> Result<()> {
        let (b, c, oc) = shape.dims();
        if let Some(dbias) = dbias {
            self.bias_backward(dbias, dout, b, oc)?;
        }
        let a_len = mapped.map_or(b * c, |m| m.len);
        if mapped.is_none() && self.sparse_rows("matmul backward weight", inp, b, c, oc)? {
            let mut scratch = std::mem::take(&mut self.sparse);
            let result = self.with_out(
                "matmul backward weight",
                (dweight, c * oc),
                &[(inp, b * c), (dout, b * oc)],
                |o, i| {
                    let step = WeightStep::None;
                    cpu_sparse::matmul_backward_weight(o, &mut scratch, i[1], step, (b, c, oc));
                },
            );
            self.sparse = scratch;
            self.sparse_products += 1;
            return result;
        }
        // (C, B) @ (B, OC) where inp^T is inp read with swapped strides.
        let product = Dense {
            reference: r::matmul_backward_weight::<f32>,
            dims: (b, c, oc),
            shape: MatmulShape { m: c, n: oc, k: b },
            strides: [(1, c), (oc, 1)],
            mapped: mapped.map(|m| m.layout),
        };
        let inputs = with_epilogue_inputs([(inp, a_len), (dout, b * oc)], Epilogue::default(), 0, 0);
        self.dense_product(
            "matmul backward weight",
            (dweight, c * oc, oc),
            &inputs,
            Epilogue::default(),
            product,
        )
    }

    /// A dense product into `out` (its length and columns): the reference's loop or sgemm (with
    /// `cpu_narrow` for a narrow side), then the epilogue, whose tensors follow the operands in
    /// `inputs`.
    fn dense_product(
        &mut self,
        op: &'static str,
        (out, len, n): (TensorId, usize, usize),
        inputs: &Inputs,
        epilogue: Epilogue,
        product: Dense,
    ) -> Result<()> {
        let kind = self.kind;
        let mut narrow = std::mem::take(&mut self.narrow);
        let result = self.with_out(op, (out, len), inputs, |o, i| {
            let (b, c, oc) = product.dims;
            match kind {
                CpuKind::Reference => {
                    (product.reference)(o, i[0], i[1], b, c, oc);
                    let (bias, mask) = epilogue_tensors(&i[2..], epilogue);
                    r::matmul_epilogue(o, bias, epilogue.relu, mask, len / n.max(1), n);
                }
                CpuKind::Fast => {
                    let [(ra, ca), (rb, cb)] = product.strides;
                    let b = Strided::new(i[1], rb, cb);
                    // Each piece of C's rows gets its epilogue as soon as its product is done,
                    // on the thread that computed it, while the piece is still in its cache.
                    let (bias, mask) = epilogue_tensors(&i[2..], epilogue);
                    let finish = |first: usize, piece: &mut [f32]| {
                        let rows = piece.len() / n.max(1);
                        let mask = mask.map(|m| &m[first * n..]);
                        cpu_fast::matmul_epilogue(piece, bias, epilogue.relu, mask, rows, n)
                    };
                    match product.mapped {
                        Some(layout) => sgemm_mapped(product.shape, (i[0], layout), b, o, (&mut narrow, &finish)),
                        None => sgemm(product.shape, Strided::new(i[0], ra, ca), b, o, (&mut narrow, &finish)),
                    }
                }
            }
        });
        self.narrow = narrow;
        result
    }

    /// The weight gradient with the optimizer step of the weight and bias: on a sparse input in
    /// one pass (`sparse_weight_update`), else the ops in sequence (`run_unfused`).
    fn weight_update(&mut self, m: &Matmul, at: StepAt) -> Result<()> {
        let MatmulKind::BackwardWeight {
            dweight,
            dbias: Some(dbias),
            inp,
            dout,
            update: Some(u),
        } = m.kind
        else {
            return run_unfused(self, &Op::Matmul(*m), at);
        };
        let (b, c, oc) = m.shape.dims();
        if !self.sparse_rows("matmul backward weight + update", inp, b, c, oc)? {
            return run_unfused(self, &Op::Matmul(*m), at);
        }
        let weight = ParamTensors {
            value: u.weight.value,
            grad: dweight,
            velocity: u.weight.velocity,
        };
        let bias = ParamTensors {
            value: u.bias.value,
            grad: dbias,
            velocity: u.bias.velocity,
        };
        self.bias_backward(dbias, dout, b, oc)?;
        self.sparse_weight_update(m.shape, weight, inp, dout, &u.opt)?;
        self.update(bias, oc, &u.opt)
    }

    /// dbias (OC) = column sums of dout (B, OC).
    pub(super) fn bias_backward(&mut self, dbias: TensorId, dout: TensorId, b: usize, oc: usize) -> Result<()> {
        let kind = self.kind;
        self.with_out(
            "matmul backward weight",
            (dbias, oc),
            &[(dout, b * oc)],
            |o, i| match kind {
                CpuKind::Reference => r::bias_backward(o, i[0], b, oc),
                CpuKind::Fast => cpu_fast::bias_backward(o, i[0], b, oc),
            },
        )
    }

    /// Whether the fast path multiplies `inp` (rows, cols) as a sparse matrix into `out_cols`
    /// columns; if so, the sparse scratch holds its rows.
    fn sparse_rows(
        &mut self,
        op: &'static str,
        inp: TensorId,
        rows: usize,
        cols: usize,
        out_cols: usize,
    ) -> Result<bool> {
        // A convolution's patch matrix runs the dense products: the sparse ones are laid out for
        // a layer's pixels and wide outputs.
        let patches = self.patches.iter().any(|p| p.cols == inp);
        if self.kind != CpuKind::Fast || !cpu_sparse::may_pay(out_cols) || patches {
            return Ok(false);
        }
        let v = self.view(op, inp, rows * cols)?;
        let source = self.source(v, rows, cols);
        let x = &self.storage[v.storage][v.offset..v.offset + v.len];
        Ok(self.sparse.rows_if_sparse(x, source, out_cols))
    }

    /// The weight gradient of a dense layer with a sparse input and the optimizer step of its
    /// weight in one pass (`cpu_sparse::matmul_backward_weight`): dweight (C, OC) = inp (B, C)^T @
    /// dout (B, OC), each value applied to the weight as soon as it is summed.
    fn sparse_weight_update(
        &mut self,
        shape: DenseShape,
        weight: ParamTensors,
        inp: TensorId,
        dout: TensorId,
        opt: &Optimizer,
    ) -> Result<()> {
        let op = "matmul backward weight + update";
        let (b, c, oc) = shape.dims();
        let n = c * oc;
        let rmsprop = opt.kind == OptimizerKind::RmsProp;
        // The gradient, the value and (RMSprop) the velocity are written: each must have an array
        // of its own, shared with nothing the op reads or writes.
        let (grad_v, value_v) = (self.view(op, weight.grad, n)?, self.view(op, weight.value, n)?);
        let velocity_v = rmsprop.then(|| self.view(op, weight.velocity, n)).transpose()?;
        let read = [self.view(op, inp, b * c)?, self.view(op, dout, b * oc)?];
        let all = [Some(grad_v), Some(value_v), velocity_v, Some(read[0]), Some(read[1])];
        for (i, w) in all[..3].iter().enumerate() {
            let shared = |w: &View| {
                all.iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.is_some_and(|o| o.storage == w.storage))
            };
            if w.as_ref().is_some_and(shared) {
                return Err(Error::shape(
                    op,
                    "a written tensor shares its array with another tensor of the op".to_string(),
                ));
            }
        }
        let take = |s: &mut Self, v: View| {
            s.written(v.storage);
            std::mem::take(&mut s.storage[v.storage])
        };
        let (mut grad, mut value) = (take(self, grad_v), take(self, value_v));
        let mut velocity = velocity_v.map(|v| (take(self, v), v));
        // The rows of inp held since `sparse_rows`, unless an op since (the bias gradient, when
        // it shares inp's array) wrote it: then they are rebuilt here.
        let source = self.source(read[0], b, c);
        let x = &self.storage[read[0].storage][read[0].offset..read[0].offset + read[0].len];
        self.sparse.hold_rows(x, source);
        let mut scratch = std::mem::take(&mut self.sparse);
        let d = &self.storage[read[1].storage][read[1].offset..read[1].offset + read[1].len];
        let range = |v: View| v.offset..v.offset + v.len;
        let step = match velocity.as_mut() {
            Some((array, v)) => WeightStep::RmsProp {
                value: &mut value[range(value_v)],
                velocity: &mut array[range(*v)],
                lr: opt.lr,
                rho: opt.rho,
                eps: opt.eps,
            },
            None => WeightStep::Sgd {
                value: &mut value[range(value_v)],
                lr: opt.lr,
            },
        };
        cpu_sparse::matmul_backward_weight(&mut grad[range(grad_v)], &mut scratch, d, step, (b, c, oc));
        self.storage[grad_v.storage] = grad;
        self.storage[value_v.storage] = value;
        if let Some((array, v)) = velocity {
            self.storage[v.storage] = array;
        }
        self.sparse = scratch;
        self.sparse_products += 1;
        self.counters.dispatches += 1;
        Ok(())
    }
}

/// A reference loop of a dense layer's product: (out, a, b, rows, inputs, outputs).
type ReferenceProduct = fn(&mut [f32], &[f32], &[f32], usize, usize, usize);

/// One of a dense layer's products for `dense_product`: the reference's loop over (b, c, oc), and
/// the (m, n, k) product with the row and column strides of a and b that sgemm runs instead (or
/// A's layout, when it is mapped).
struct Dense {
    reference: ReferenceProduct,
    dims: (usize, usize, usize),
    shape: MatmulShape,
    strides: [(usize, usize); 2],
    mapped: Option<ALayout>,
}

/// A product's A read through a layout from a tensor of `len` values (`cpu_gemm::gemm_mapped`);
/// only the fast path on AVX-512 is given one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mapped {
    pub layout: ALayout,
    pub len: usize,
}

/// The most tensors an op reads: a matmul's two operands, its bias and its mask.
pub(super) const MAX_INPUTS: usize = 4;

/// The tensors (and lengths) an op reads, held without allocating.
#[derive(Debug, Clone, Copy)]
struct Inputs {
    list: [(TensorId, usize); MAX_INPUTS],
    len: usize,
}

impl std::ops::Deref for Inputs {
    type Target = [(TensorId, usize)];
    fn deref(&self) -> &Self::Target {
        &self.list[..self.len]
    }
}

/// The matmul's two operands followed by the epilogue's tensors (bias, then mask) that are present.
fn with_epilogue_inputs(base: [(TensorId, usize); 2], epilogue: Epilogue, out_len: usize, n: usize) -> Inputs {
    let mut inputs = Inputs {
        list: [base[0], base[1], base[0], base[0]],
        len: 2,
    };
    for extra in [epilogue.bias.map(|t| (t, n)), epilogue.relu_mask.map(|t| (t, out_len))]
        .into_iter()
        .flatten()
    {
        inputs.list[inputs.len] = extra;
        inputs.len += 1;
    }
    inputs
}

/// The bias and mask slices of `epilogue` among `extra` (those present, in that order).
fn epilogue_tensors<'a>(extra: &[&'a [f32]], epilogue: Epilogue) -> (Option<&'a [f32]>, Option<&'a [f32]>) {
    let mut extra = extra.iter();
    let bias = epilogue.bias.and_then(|_| extra.next().copied());
    let mask = epilogue.relu_mask.and_then(|_| extra.next().copied());
    (bias, mask)
}

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
pub(super) fn k_pieces(m: usize, k: usize) -> usize {
    if m < SPLIT_K_MAX_ROWS && k >= SPLIT_K_MIN {
        SPLIT_K_PIECES
    } else {
        1
    }
}

/// C (m, n) = A @ B with A and B read through their strides: the three products of a dense
/// layer are this one call with different strides. A product with a narrow side (the output
/// layer's) runs `cpu_narrow` on this thread; a short, long-summed one is split along K
/// (`sgemm_split_k`); otherwise C's rows are cut into pieces spread over `cpu_pool`'s threads,
/// each running a single-threaded GEMM on its share. `finish(first row, rows)` is called once on
/// every row of C after its product is done (on each piece, by the thread that computed it).
fn sgemm(
    shape: MatmulShape,
    a: Strided,
    b: Strided,
    c: &mut [f32],
    (narrow, finish): (&mut cpu_narrow::Scratch, &Finish),
) {
    let MatmulShape { m, n, k } = shape;
    if cpu_narrow::fits(k, n) {
        cpu_narrow::matmul(shape, a, b, c, narrow);
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
        sgemm_split_k(shape, (a, b), c, &mut narrow.partials);
        finish(0, c);
        return;
    }
    let (rows, items) = row_pieces(c, shape);
    if cpu_gemm::available() {
        // B packed once for every piece rather than once in each, into the backend's buffer
        // (sized by the first step, whichever thread runs a piece).
        let packed = cpu_gemm::PackedB::pack(k, n, &b, &mut narrow.packed_b);
        cpu_pool::for_each(items, &|(i, c): (usize, &mut [f32])| {
            let first = i * rows;
            let m = c.len() / n;
            // SAFETY (of `gemm_packed`): rows first..first + m of A are checked to lie inside
            // its slice, the CPU has AVX-512, B was packed with this k and n, and `c` holds this
            // piece's m rows of n.
            assert!(a.reaches(first + m - 1, k - 1));
            let a0 = unsafe { a.data.as_ptr().add(first * a.row) };
            unsafe { cpu_gemm::gemm_packed(MatmulShape { m, n, k }, a0, (a.row, a.col), &packed, c) };
            finish(first, c);
        });
        return;
    }
    cpu_pool::for_each(items, &|(i, c): (usize, &mut [f32])| {
        let first = i * rows;
        let m = c.len() / n;
        // SAFETY (of `sgemm_unchecked`): rows first..first + m of A and all of B are checked to
        // lie inside their slices; `c` holds this piece's m rows of n.
        assert!(a.reaches(first + m - 1, k - 1) && b.reaches(k - 1, n - 1));
        unsafe {
            sgemm_unchecked(
                MatmulShape { m, n, k },
                a.data.as_ptr().add(first * a.row),
                (a.row, a.col),
                b,
                c,
            )
        };
        finish(first, c);
    });
}

/// What runs on rows of C once their product is done: (index of the first row, the rows).
type Finish<'a> = dyn Fn(usize, &mut [f32]) + Sync + 'a;

/// C (m rows of n) cut into pieces of whole rows for the pool's threads: a piece per
/// SPLIT_MIN_MACS of work, up to `chunk_count`, of at least PIECE_MIN_ROWS rows. Returns the rows
/// a piece holds (the last may hold fewer) and the pieces, numbered.
#[allow(clippy::type_complexity)]
fn row_pieces(c: &mut [f32], shape: MatmulShape) -> (usize, [Option<(usize, &mut [f32])>; cpu_sparse::MAX_CHUNKS]) {
    let MatmulShape { m, n, k } = shape;
    let chunks = (m * k * n / SPLIT_MIN_MACS)
        .clamp(1, cpu_sparse::chunk_count(m))
        .min((m / PIECE_MIN_ROWS).max(1));
    let rows = m.div_ceil(chunks);
    let mut pieces = c.chunks_mut(rows * n).enumerate();
    (rows, std::array::from_fn(|_| pieces.next()))
}

/// C (m, n) = A @ B with A read through its layout (`cpu_gemm::gemm_mapped`): C's rows cut into
/// pieces spread over `cpu_pool`'s threads, as `sgemm` does, over B made ready once; `finish` as
/// in `sgemm`.
fn sgemm_mapped(
    shape: MatmulShape,
    (a, layout): (&[f32], ALayout),
    b: Strided,
    c: &mut [f32],
    (narrow, finish): (&mut cpu_narrow::Scratch, &Finish),
) {
    let MatmulShape { m, n, k } = shape;
    assert!(cpu_gemm::available(), "a mapped A runs only on the AVX-512 product");
    let c = &mut c[..m * n];
    if m == 0 || n == 0 || k == 0 {
        c.fill(0.0);
        finish(0, c);
        return;
    }
    let (rows, items) = row_pieces(c, shape);
    let packed = cpu_gemm::PackedB::pack(k, n, &b, &mut narrow.packed_b);
    cpu_pool::for_each(items, &|(i, c): (usize, &mut [f32])| {
        let m = c.len() / n;
        // SAFETY (of `gemm_mapped`): the CPU has AVX-512 (asserted above); the call checks A's
        // layout against its slice, B's and C's shapes.
        unsafe { cpu_gemm::gemm_mapped(MatmulShape { m, n, k }, a, layout, i * rows, &packed, c) };
        finish(i * rows, c);
    });
}

/// C (m, n) = A @ B for a few rows of C and a long K: K is cut into `SPLIT_K_PIECES` fixed
/// pieces, each summed into its own partial C on the pool's threads, then the partials are added
/// in piece order (deterministic, whatever the thread count).
fn sgemm_split_k(shape: MatmulShape, (a, b): (Strided, Strided), c: &mut [f32], partials: &mut Vec<f32>) {
    let MatmulShape { m, n, k } = shape;
    let span = k.div_ceil(SPLIT_K_PIECES);
    if partials.len() < SPLIT_K_PIECES * m * n {
        partials.resize(SPLIT_K_PIECES * m * n, 0.0);
    }
    assert!(a.reaches(m - 1, k - 1) && b.reaches(k - 1, n - 1));
    let mut pieces = partials.chunks_mut(m * n).enumerate();
    let items: [_; SPLIT_K_PIECES] = std::array::from_fn(|_| pieces.next());
    cpu_pool::for_each(items, &|(p, part): (usize, &mut [f32])| {
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
            sgemm_unchecked(MatmulShape { m, n, k: k1 - k0 }, a0, (a.row, a.col), piece, part)
        };
    });
    c.copy_from_slice(&partials[..m * n]);
    for part in partials[m * n..SPLIT_K_PIECES * m * n].chunks_exact(m * n) {
        for (x, &y) in c.iter_mut().zip(part) {
            *x += y;
        }
    }
}

/// C (m, n) = A @ B on one thread, A at `a` with (row, column) strides `a_strides`: `cpu_gemm`
/// where the CPU has AVX-512, `matrixmultiply`'s sgemm otherwise.
///
/// # Safety
/// Every element (i, kk) of A for i < m, kk < k must lie in the allocation `a` points into, and
/// B's first k rows of n in `b.data`; `c` must hold m rows of n.
unsafe fn sgemm_unchecked(shape: MatmulShape, a: *const f32, a_strides: (usize, usize), b: Strided, c: &mut [f32]) {
    if cpu_gemm::available() {
        // SAFETY: the caller's contract is `gemm`'s, and the CPU has AVX-512.
        unsafe { cpu_gemm::gemm(shape, a, a_strides, b, c) };
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
            a_strides.0 as isize,
            a_strides.1 as isize,
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
