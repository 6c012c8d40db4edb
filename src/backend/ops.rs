//! The ops of a training step as typed values: what a layer graph's plan holds and what
//! `Backend::run` executes.
//!
//! Contract: every op names its tensors and its shape by field; an op that reads the dataset's
//! rows (the gather, the loss) takes the batch's place in the epoch's order and its statistics slot
//! from the `StepAt` it runs with, so that one plan serves every step of an epoch. Two ops are
//! fusions of others, and their meaning is that composition (`run_unfused`): a weight gradient
//! with an `update` is the gradient followed by the `Update` of its weight and bias, and an
//! `OutputLayer` is its layer's forward product, the loss, the input gradient and the weight
//! gradient with its update. A backend runs a fused op natively only when its `Fusions` say so;
//! `plan::fuse` merges ops only then.

pub mod augment;
mod batch_norm;
pub mod dropout;
mod pool;

pub use super::ParamState;
use super::{Backend, DatasetId, ParamTensors, TensorId};
use crate::error::Result;
use crate::optim::{Optimizer, OptimizerKind};
use crate::schedule::Schedule;
pub use augment::Augment;
pub use batch_norm::{
    BatchNorm, BatchNormKind, NormParams, EPSILON as BATCH_NORM_EPSILON, MOMENTUM as BATCH_NORM_MOMENTUM,
};
pub use dropout::{Dropout, DropoutKind};
pub use pool::{Pool, PoolKind, PoolShape};

/// Where a step is: its batch is rows `start..start + rows` of the dataset's current order, its
/// loss and correct count go to statistics slot `slot`, and it is optimizer step `step` of the
/// run (from 0, over every epoch: what its learning rate and Adam's bias corrections depend on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepAt {
    pub start: usize,
    pub slot: usize,
    pub step: usize,
}

/// A dense layer's three products: a batch of `rows`, `inputs` in, `outputs` out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DenseShape {
    pub rows: usize,
    pub inputs: usize,
    pub outputs: usize,
}

/// c (m, n) = a (m, k) @ b (k, n): the product a matmul kernel computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatmulShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// x (rows, 784) = images[order[start..start + rows]] / 255; with `augment` (training only), each
/// image moved by its own random transform of the step (`augment`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gather {
    pub x: TensorId,
    pub ds: DatasetId,
    pub rows: usize,
    pub augment: Option<Augment>,
}

/// The optimizer step a weight gradient applies as it stores the gradients: `opt` on the weight
/// (whose gradient is the product) and on the bias (whose gradient is `dbias`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedUpdate {
    pub weight: ParamState,
    pub bias: ParamState,
    pub opt: Optimizer,
}

impl FusedUpdate {
    /// The optimizer steps this update stands for after a weight gradient of `shape` into
    /// `dweight` and `dbias`: the weight's, then the bias's (when there is one).
    pub fn steps(&self, shape: DenseShape, dweight: TensorId, dbias: Option<TensorId>) -> [Option<Op>; 2] {
        let weight = self.weight.with_grad(dweight);
        let bias = dbias.map(|grad| self.bias.with_grad(grad));
        [
            Some(update(weight, shape.inputs * shape.outputs, self.opt)),
            bias.map(|bias| update(bias, shape.outputs, self.opt)),
        ]
    }
}

/// Which of a dense layer's products, and what it applies on the way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MatmulKind {
    /// out (rows, outputs) = inp (rows, inputs) @ weight (inputs, outputs), then + bias
    /// (outputs,) when given, then max(., 0) when `relu`.
    Forward {
        out: TensorId,
        inp: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
        relu: bool,
    },
    /// dinp (rows, inputs) = dout (rows, outputs) @ weight^T, then 0 where `relu_mask` (rows,
    /// inputs) is not > 0 (the previous layer's ReLU gradient, from its output).
    BackwardInput {
        dinp: TensorId,
        dout: TensorId,
        weight: TensorId,
        relu_mask: Option<TensorId>,
    },
    /// dweight (inputs, outputs) = inp^T @ dout, dbias (outputs,) = the column sums of dout when
    /// given, then `update`'s step of the weight and bias with those gradients (needs `dbias`).
    BackwardWeight {
        dweight: TensorId,
        dbias: Option<TensorId>,
        inp: TensorId,
        dout: TensorId,
        update: Option<FusedUpdate>,
    },
}

/// One product of a dense or a convolution layer. A convolution is a dense product over its
/// output pixels (implicit GEMM): `shape` is then (pixels, patch, out channels), and `conv` says
/// how the layer's input image maps to the patches (see `ConvGeometry`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matmul {
    pub shape: DenseShape,
    pub kind: MatmulKind,
    /// For a convolution: `inp` (forward and weight gradient), `dinp` and its `relu_mask` (input
    /// gradient) are images of this geometry, read and written through the im2col map; the
    /// input gradient sums every patch's gradient back into the pixels it came from (col2im).
    pub conv: Option<ConvGeometry>,
}

/// A batch of `images` images of h x w x in_ch (NHWC, channels last as Keras), convolved with a
/// kh x kw kernel (Keras layout (kh, kw, in_ch, out_ch)), stride 1, `pad` zero rows and columns
/// on every side ('valid': 0; 'same' with an odd kernel: (k - 1) / 2). Output pixel (oy, ox) of
/// image b sees input pixels (oy + ky - pad, ox + kx - pad); its patch is ordered (ky, kx, c).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    pub images: usize,
    pub h: usize,
    pub w: usize,
    pub in_ch: usize,
    pub kh: usize,
    pub kw: usize,
    pub pad: usize,
}

impl ConvGeometry {
    /// Output rows: h + 2 pad - kh + 1 (0 when the kernel does not fit).
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad + 1).saturating_sub(self.kh)
    }
    /// Output columns: w + 2 pad - kw + 1.
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad + 1).saturating_sub(self.kw)
    }
    /// Values in one patch: kh x kw x in_ch (the product's inputs).
    pub fn patch(&self) -> usize {
        self.kh * self.kw * self.in_ch
    }
    /// Output pixels of the batch (the product's rows).
    pub fn pixels(&self) -> usize {
        self.images * self.oh() * self.ow()
    }
    /// Values in the batch of input images.
    pub fn image_len(&self) -> usize {
        self.images * self.h * self.w * self.in_ch
    }
    /// The product of a layer with `out_ch` filters: (pixels, patch, out_ch).
    pub fn dense(&self, out_ch: usize) -> DenseShape {
        DenseShape {
            rows: self.pixels(),
            inputs: self.patch(),
            outputs: out_ch,
        }
    }
    /// Where value `kk` of output pixel `row`'s patch comes from in the input images, or None
    /// where the kernel hangs over the zero padding.
    pub fn source(&self, row: usize, kk: usize) -> Option<usize> {
        let (ohw, ow) = (self.oh() * self.ow(), self.ow());
        let (b, oy, ox) = (row / ohw, row % ohw / ow, row % ow);
        let (ky, kx, c) = (kk / (self.kw * self.in_ch), kk / self.in_ch % self.kw, kk % self.in_ch);
        let y = (oy + ky).checked_sub(self.pad).filter(|&y| y < self.h)?;
        let x = (ox + kx).checked_sub(self.pad).filter(|&x| x < self.w)?;
        Some(((b * self.h + y) * self.w + x) * self.in_ch + c)
    }
}

impl DenseShape {
    /// (rows, inputs, outputs).
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.rows, self.inputs, self.outputs)
    }
}

impl Matmul {
    /// The (m, n, k) of the product: forward (rows, outputs, inputs), input gradient (rows,
    /// inputs, outputs), weight gradient (inputs, outputs, rows).
    pub fn product(&self) -> MatmulShape {
        let (rows, inputs, outputs) = self.shape.dims();
        match self.kind {
            MatmulKind::Forward { .. } => MatmulShape {
                m: rows,
                n: outputs,
                k: inputs,
            },
            MatmulKind::BackwardInput { .. } => MatmulShape {
                m: rows,
                n: inputs,
                k: outputs,
            },
            MatmulKind::BackwardWeight { .. } => MatmulShape {
                m: inputs,
                n: outputs,
                k: rows,
            },
        }
    }
}

/// Fused softmax + sparse categorical cross-entropy over logits (rows, classes) whose labels are
/// those of `ds` at order[start..start + rows]: the batch's loss sum and correct count go to the
/// step's statistics slot and, when `dlogits` is given, (softmax - onehot) / rows into it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loss {
    pub logits: TensorId,
    pub dlogits: Option<TensorId>,
    pub ds: DatasetId,
    pub rows: usize,
    pub classes: usize,
}

/// `opt`'s step of the `len` values of a parameter with its stored gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    pub param: ParamTensors,
    pub len: usize,
    pub opt: Optimizer,
}

/// The output layer's whole step, for a layer whose input is the previous layer's ReLU output:
/// logits = inp @ weight + bias, the loss (statistics and dlogits), dinp = (dlogits @ weight^T) *
/// (inp > 0) with the weight before the step, then the weight and bias gradients and `opt`'s step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputLayer {
    /// rows, inputs (the previous layer's width), outputs (the classes).
    pub shape: DenseShape,
    pub weight: ParamTensors,
    pub bias: ParamTensors,
    /// (rows, inputs).
    pub inp: TensorId,
    /// (rows, classes); what it holds afterwards is unspecified (a fused kernel may not write it).
    pub logits: TensorId,
    /// (rows, classes).
    pub dlogits: TensorId,
    /// (rows, inputs).
    pub dinp: TensorId,
    pub ds: DatasetId,
    pub opt: Optimizer,
}

/// A first convolution layer's last two ops of a step: the backward pass of the max pool after it
/// (through its ReLU), then its weight gradient with the update. The pool's `dinp` is that
/// gradient's `dout` and nothing else reads it, so a backend that runs the pair as one op may
/// leave it unwritten.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolWeightGradient {
    pub pool: Pool,
    pub weight: Matmul,
}

/// A first convolution layer's forward product (with its ReLU) and the max pool after it, as one
/// op: the pool's `inp` is the product's `out` and nothing but the pool's backward pass (fused
/// into `PoolWeightGradient`) reads it, so a backend that runs the pair as one op may leave it
/// unwritten, keeping what its backward pass needs of the pool's choices instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvPool {
    pub conv: Matmul,
    pub pool: Pool,
}

/// An op of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Gather(Gather),
    Matmul(Matmul),
    Pool(Pool),
    Loss(Loss),
    Update(Update),
    OutputLayer(OutputLayer),
    PoolWeightGradient(PoolWeightGradient),
    ConvPool(ConvPool),
    Dropout(Dropout),
    BatchNorm(BatchNorm),
}

impl Op {
    /// A short name for `--verbose`, profiles and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Gather(_) => "gather",
            Op::Matmul(m) => match m.kind {
                MatmulKind::Forward { .. } => "matmul forward",
                MatmulKind::BackwardInput { .. } => "matmul backward input",
                MatmulKind::BackwardWeight { update: None, .. } => "matmul backward weight",
                MatmulKind::BackwardWeight { update: Some(_), .. } => "matmul backward weight + update",
            },
            Op::Pool(p) => match p.kind {
                PoolKind::Forward { .. } => "max pool forward",
                PoolKind::Backward { .. } => "max pool backward",
            },
            Op::Loss(_) => "softmax cross-entropy",
            Op::Update(_) => "optimizer update",
            Op::OutputLayer(_) => "output layer step",
            Op::PoolWeightGradient(_) => "max pool backward + weight gradient",
            Op::ConvPool(_) => "matmul forward + max pool forward",
            Op::Dropout(d) => match d.kind {
                DropoutKind::Forward { .. } => "dropout forward",
                DropoutKind::Backward { .. } => "dropout backward",
            },
            Op::BatchNorm(b) => match b.kind {
                BatchNormKind::ForwardTrain { .. } => "batch norm forward (batch statistics)",
                BatchNormKind::ForwardEval { .. } => "batch norm forward (moving statistics)",
                BatchNormKind::Backward { .. } => "batch norm backward",
            },
        }
    }

    /// One line: the op and its shape, e.g. "matmul forward 128x512x784 +bias relu".
    pub fn describe(&self) -> String {
        match self {
            Op::Gather(g) => format!(
                "gather {}x784 from the u8 dataset{}",
                g.rows,
                if g.augment.is_some() { " (augmented)" } else { "" }
            ),
            Op::Matmul(m) => {
                let MatmulShape { m: rows, n, k } = m.product();
                let extra = match m.kind {
                    MatmulKind::Forward { bias, relu, .. } => {
                        format!(
                            "{}{}",
                            if bias.is_some() { " +bias" } else { "" },
                            if relu { " relu" } else { "" }
                        )
                    }
                    MatmulKind::BackwardInput { relu_mask, .. } => {
                        if relu_mask.is_some() { " relu-mask" } else { "" }.to_string()
                    }
                    MatmulKind::BackwardWeight { dbias, .. } => {
                        if dbias.is_some() { " +dbias" } else { "" }.to_string()
                    }
                };
                let conv = m.conv.map_or(String::new(), |g| {
                    format!(" conv {}x{}x{} k{}x{} pad {}", g.h, g.w, g.in_ch, g.kh, g.kw, g.pad)
                });
                format!("{} (m {rows}, n {n}, k {k}){conv}{extra}", self.name())
            }
            Op::Pool(p) => {
                let s = p.shape;
                format!("{} {}x{}x{} /{}", self.name(), s.h, s.w, s.ch, s.size)
            }
            Op::Loss(l) => format!(
                "{} {}x{}{}",
                self.name(),
                l.rows,
                l.classes,
                if l.dlogits.is_some() { " +dlogits" } else { "" }
            ),
            Op::Update(u) => format!("{} of {} values", self.name(), u.len),
            Op::OutputLayer(o) => format!(
                "{} {}x{} -> {} (forward, loss, input gradient, weight gradient + update)",
                self.name(),
                o.shape.rows,
                o.shape.inputs,
                o.shape.outputs
            ),
            Op::PoolWeightGradient(f) => {
                format!("{} + {}", Op::Pool(f.pool).describe(), Op::Matmul(f.weight).describe())
            }
            Op::ConvPool(f) => format!("{} + {}", Op::Matmul(f.conv).describe(), Op::Pool(f.pool).describe()),
            Op::Dropout(d) => format!("{} of {} values, rate {}", self.name(), d.len, d.rate),
            Op::BatchNorm(b) => format!("{} {}x{}", self.name(), b.rows, b.channels),
        }
    }
}

/// The fused ops a backend runs natively (else `run_unfused` runs their composition).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fusions {
    /// `MatmulKind::BackwardWeight` with an `update`.
    pub weight_update: bool,
    /// `Op::OutputLayer` of this shape or smaller: rows at most `output_layer_max_rows` and rows x
    /// inputs at most `output_layer_max_work` (0: never).
    pub output_layer_max_rows: usize,
    pub output_layer_max_work: usize,
    /// `Op::PoolWeightGradient`, and with it `Op::ConvPool` (whose pool's input only the fused
    /// backward pass may read).
    pub pool_weight_gradient: bool,
}

impl Fusions {
    /// Whether `Op::OutputLayer` of `shape` stepping `opt` runs natively: its kernel steps
    /// RMSprop and plain SGD at a constant rate (output_layer.wgsl); other optimizers run it as
    /// its composition.
    pub fn output_layer(&self, shape: DenseShape, opt: &Optimizer) -> bool {
        let steps = match opt.kind {
            OptimizerKind::RmsProp => true,
            OptimizerKind::Sgd => opt.momentum == 0.0,
            OptimizerKind::Adam | OptimizerKind::AdamW => false,
        };
        steps
            && opt.schedule == Schedule::Constant
            && opt.weight_decay == 0.0
            && shape.rows <= self.output_layer_max_rows
            && shape.rows * shape.inputs <= self.output_layer_max_work
    }
}

/// A fused op as the ops it stands for, each run through `be.run`: the specification of every
/// fusion, and what a backend runs when it has no kernel of its own for one. An op that is not a
/// fusion is run as it is.
pub fn run_unfused<B: Backend + ?Sized>(be: &mut B, op: &Op, at: StepAt) -> Result<()> {
    match *op {
        Op::Matmul(Matmul {
            shape,
            kind:
                MatmulKind::BackwardWeight {
                    dweight,
                    dbias,
                    inp,
                    dout,
                    update: Some(u),
                },
            conv,
        }) => {
            let plain = MatmulKind::BackwardWeight {
                dweight,
                dbias,
                inp,
                dout,
                update: None,
            };
            be.run(
                &Op::Matmul(Matmul {
                    shape,
                    kind: plain,
                    conv,
                }),
                at,
            )?;
            for op in u.steps(shape, dweight, dbias).into_iter().flatten() {
                be.run(&op, at)?;
            }
            Ok(())
        }
        Op::OutputLayer(o) => {
            for op in output_layer_ops(&o) {
                be.run(&op, at)?;
            }
            Ok(())
        }
        Op::PoolWeightGradient(f) => {
            be.run(&Op::Pool(f.pool), at)?;
            be.run(&Op::Matmul(f.weight), at)
        }
        Op::ConvPool(f) => {
            be.run(&Op::Matmul(f.conv), at)?;
            be.run(&Op::Pool(f.pool), at)
        }
        _ => be.run(op, at),
    }
}

/// The ops an `OutputLayer` stands for, its weight gradient's update fused (each backend runs a
/// fused update natively or through `run_unfused` in turn).
fn output_layer_ops(o: &OutputLayer) -> Vec<Op> {
    // inp (rows, inputs) -> logits (rows, classes) -> dlogits -> dinp (rows, inputs); dW, dbias
    let mut ops = vec![
        Op::Matmul(Matmul {
            shape: o.shape,
            kind: MatmulKind::Forward {
                out: o.logits,
                inp: o.inp,
                weight: o.weight.value,
                bias: Some(o.bias.value),
                relu: false,
            },
            conv: None,
        }),
        Op::Loss(Loss {
            logits: o.logits,
            dlogits: Some(o.dlogits),
            ds: o.ds,
            rows: o.shape.rows,
            classes: o.shape.outputs,
        }),
        Op::Matmul(Matmul {
            shape: o.shape,
            kind: MatmulKind::BackwardInput {
                dinp: o.dinp,
                dout: o.dlogits,
                weight: o.weight.value,
                relu_mask: Some(o.inp),
            },
            conv: None,
        }),
    ];
    let layer = LayerGradient {
        shape: o.shape,
        conv: None,
        weight: o.weight,
        bias: o.bias,
        inp: o.inp,
        dout: o.dlogits,
    };
    ops.extend(weight_gradient_ops(layer, o.opt, true));
    ops
}

/// A layer's weight gradient: its product's shape and, for a convolution, its geometry; its
/// parameters; the layer's input and its output's gradient.
#[derive(Debug, Clone, Copy)]
pub struct LayerGradient {
    pub shape: DenseShape,
    pub conv: Option<ConvGeometry>,
    pub weight: ParamTensors,
    pub bias: ParamTensors,
    pub inp: TensorId,
    pub dout: TensorId,
}

/// A layer's weight gradient and the optimizer step of its weight and bias: one op with a fused
/// update, or the gradient and two `Update`s.
pub fn weight_gradient_ops(layer: LayerGradient, opt: Optimizer, fuse_update: bool) -> Vec<Op> {
    let (weight, bias, shape) = (layer.weight, layer.bias, layer.shape);
    let fused = FusedUpdate {
        weight: weight.state(),
        bias: bias.state(),
        opt,
    };
    let gradient = |update| {
        Op::Matmul(Matmul {
            shape,
            kind: MatmulKind::BackwardWeight {
                dweight: weight.grad,
                dbias: Some(bias.grad),
                inp: layer.inp,
                dout: layer.dout,
                update,
            },
            conv: layer.conv,
        })
    };
    if fuse_update {
        return vec![gradient(Some(fused))];
    }
    vec![
        gradient(None),
        update(weight, shape.inputs * shape.outputs, opt),
        update(bias, shape.outputs, opt),
    ]
}

fn update(param: ParamTensors, len: usize, opt: Optimizer) -> Op {
    Op::Update(Update { param, len, opt })
}
