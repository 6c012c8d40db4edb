//! The CPU backends' matmuls: a dense layer's three products with their fused epilogues, as the
//! reference's plain loops, as sparse products (`sparse`) when the input is mostly zeros, as
//! small loops when a side is narrow (`narrow`), or as a GEMM on row pieces over the threads
//! (`gemm` on AVX-512, `matrixmultiply`'s sgemm elsewhere).
//!
//! Contract: every product here computes what `reference` does for the same op; the fast
//! variants differ only in the summation order. Nothing is allocated once the scratch buffers have
//! grown to the largest batch (on CPUs without AVX-512, matrixmultiply packs its operands in
//! buffers of its own, allocated per call).

use super::elementwise;
use super::kernels::gemm::ALayout;
use super::kernels::sgemm::{sgemm, sgemm_mapped};
use super::kernels::sparse::{self, BiasRelu, WeightStep};
use super::kernels::Strided;
use super::{CpuBackend, CpuKind, View};
use crate::backend::ops::{run_unfused, DenseShape, Matmul, MatmulKind, MatmulShape, Op, StepAt};
use crate::backend::reference as r;
use crate::backend::{ParamTensors, TensorId};
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
                let bias_relu = BiasRelu {
                    bias,
                    relu: epilogue.relu,
                };
                sparse::matmul_forward(o, &mut scratch, i[1], bias_relu, shape);
                elementwise::matmul_epilogue(o, None, false, mask, b, oc);
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
        self.dense_product("matmul forward", out, &inputs, epilogue, product)
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
        self.dense_product("matmul backward input", dinp, &inputs, epilogue, product)
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
                    sparse::matmul_backward_weight(o, &mut scratch, i[1], step, shape);
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
        self.dense_product("matmul backward weight", dweight, &inputs, Epilogue::default(), product)
    }

    /// A dense product into `out` (product.shape's m rows of n): the reference's loop or sgemm
    /// (with `narrow` for a narrow side), then the epilogue, whose tensors follow the operands in
    /// `inputs`.
    fn dense_product(
        &mut self,
        op: &'static str,
        out: TensorId,
        inputs: &Inputs,
        epilogue: Epilogue,
        product: Dense,
    ) -> Result<()> {
        let n = product.shape.n;
        let len = product.shape.m * n;
        let kind = self.kind;
        let mut scratch = std::mem::take(&mut self.products);
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
                        elementwise::matmul_epilogue(piece, bias, epilogue.relu, mask, rows, n)
                    };
                    match product.mapped {
                        Some(layout) => sgemm_mapped(product.shape, i[0], layout, b, o, &mut scratch, &finish),
                        None => sgemm(product.shape, Strided::new(i[0], ra, ca), b, o, &mut scratch, &finish),
                    }
                }
            }
        });
        self.products = scratch;
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
        // The sparse pass applies RMSprop and plain SGD as it sums; the others step afterwards.
        let fusable = match u.opt.kind {
            OptimizerKind::RmsProp => true,
            OptimizerKind::Sgd => u.opt.momentum == 0.0,
            OptimizerKind::Adam | OptimizerKind::AdamW => false,
        };
        if !fusable || u.opt.l2() != 0.0 || !self.sparse_rows("matmul backward weight + update", inp, b, c, oc)? {
            return run_unfused(self, &Op::Matmul(*m), at);
        }
        let (weight, bias) = (u.weight.with_grad(dweight), u.bias.with_grad(dbias));
        self.bias_backward(dbias, dout, b, oc)?;
        let rate = u.opt.scalars(at.step).lr;
        self.sparse_weight_update(m.shape, weight, inp, dout, &Optimizer { lr: rate, ..u.opt })?;
        self.update(bias, oc, &u.opt, at)
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
                CpuKind::Fast => elementwise::bias_backward(o, i[0], b, oc),
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
        if self.kind != CpuKind::Fast || !sparse::may_pay(out_cols) || patches {
            return Ok(false);
        }
        let v = self.view(op, inp, rows * cols)?;
        let source = self.source(v, rows, cols);
        let x = &self.storage[v.storage][v.offset..v.offset + v.len];
        Ok(self.sparse.rows_if_sparse(x, source, out_cols))
    }

    /// The weight gradient of a dense layer with a sparse input and the optimizer step of its
    /// weight in one pass (`sparse::matmul_backward_weight`): dweight (C, OC) = inp (B, C)^T @
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
        sparse::matmul_backward_weight(&mut grad[range(grad_v)], &mut scratch, d, step, shape);
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

/// A product's A read through a layout from a tensor of `len` values (`gemm::gemm_mapped`);
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
