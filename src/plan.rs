//! Plans: the ops of one step of a layer graph, in order, and the fusion pass that merges them.
//!
//! Contract: `train_ops` and `eval_ops` build a step from the graph's layers as plain ops (every
//! op its own kernel); `fuse` then merges the runs of ops that the backend's `Fusions` run as one
//! kernel, and nothing else: a fused plan computes exactly what the plain one does (see
//! `backend::ops::run_unfused`). A plan is built once per (kind, dataset, rows, optimizer) and run for every
//! step with that batch size; only the `StepAt` differs between steps. Adding a layer type means
//! adding it to `LayerOp` and its ops here; the training loop does not change. A ReLU's gradient
//! is applied by the op that takes the gradient back through it: the next layer's input gradient
//! (its mask is the ReLU's output) or, when a pool follows, the pool's backward op.

use crate::backend::ops::{
    weight_gradient_ops, Augment, BatchNorm, BatchNormKind, ConvGeometry, ConvPool, DenseShape, Dropout, DropoutKind,
    Fusions, Gather, LayerGradient, Loss, Matmul, MatmulKind, NormParams, Op, OutputLayer, Pool, PoolKind, PoolShape,
    PoolWeightGradient, Update,
};
use crate::backend::{DatasetId, ParamTensors, TensorId};
use crate::optim::Optimizer;

/// What a layer of the graph computes, with its parameters and its shapes per image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerOp {
    /// out = inp @ weight + bias, weight (inputs, outputs).
    Dense {
        weight: ParamTensors,
        bias: ParamTensors,
        inputs: usize,
        outputs: usize,
    },
    /// out = conv(inp, weight) + bias, weight (kh, kw, in_ch, filters); `geometry.images` is 1.
    Conv {
        weight: ParamTensors,
        bias: ParamTensors,
        geometry: ConvGeometry,
        filters: usize,
    },
    /// out = the maximum of each window of inp; `shape.images` is 1.
    Pool { shape: PoolShape },
    /// out = inp normalised per channel (`channels` of them in the `len` values of an image) and
    /// scaled; `stats` (2, channels) keeps a training step's batch statistics for its backward
    /// pass.
    BatchNorm {
        gamma: ParamTensors,
        beta: ParamTensors,
        moving_mean: TensorId,
        moving_variance: TensorId,
        stats: TensorId,
        channels: usize,
        len: usize,
    },
    /// out = inp with values dropped at `rate` in training (`len` values an image; `key` from
    /// the run's seed and the layer, `ops::dropout::layer_key`).
    Dropout { len: usize, rate: f32, key: u32 },
}

/// A layer's tensors in the graph: `out = activation(op(inp))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerTensors {
    pub op: LayerOp,
    /// The batch or the previous layer's output.
    pub inp: TensorId,
    /// The activated output (for the last layer, the logits).
    pub out: TensorId,
    /// The gradient of the loss with respect to the output before activation.
    pub dout: TensorId,
    /// The gradient with respect to the input, for every layer but the first.
    pub dinp: Option<TensorId>,
    /// ReLU after the op (every convolution and dense layer but the last).
    pub relu: bool,
}

impl LayerTensors {
    /// The layer's product over a batch of `rows` images: its shape and, for a convolution, its
    /// geometry; None for pooling.
    fn product(&self, rows: usize) -> Option<(DenseShape, Option<ConvGeometry>, ParamTensors, ParamTensors)> {
        match self.op {
            LayerOp::Dense {
                weight,
                bias,
                inputs,
                outputs,
            } => {
                let shape = DenseShape { rows, inputs, outputs };
                Some((shape, None, weight, bias))
            }
            LayerOp::Conv {
                weight,
                bias,
                geometry,
                filters,
            } => {
                let g = ConvGeometry {
                    images: rows,
                    ..geometry
                };
                Some((g.dense(filters), Some(g), weight, bias))
            }
            LayerOp::Pool { .. } | LayerOp::BatchNorm { .. } | LayerOp::Dropout { .. } => None,
        }
    }

    /// The number of classes, for the last layer.
    pub fn outputs(&self) -> usize {
        match self.op {
            LayerOp::Dense { outputs, .. } => outputs,
            LayerOp::Conv { filters, .. } => filters,
            LayerOp::Pool { shape } => shape.ch,
            LayerOp::BatchNorm { channels, .. } => channels,
            LayerOp::Dropout { len, .. } => len,
        }
    }

    /// A batch normalisation layer's forward op over a batch of `rows` images.
    fn batch_norm_forward(&self, rows: usize, kind: PlanKind) -> Option<Op> {
        let LayerOp::BatchNorm {
            gamma,
            beta,
            moving_mean,
            moving_variance,
            stats,
            channels,
            len,
        } = self.op
        else {
            return None;
        };
        let (out, inp, relu) = (self.out, self.inp, self.relu);
        let params = NormParams {
            gamma: gamma.value,
            beta: beta.value,
            moving_mean,
            moving_variance,
        };
        let kind = match kind {
            PlanKind::Train => BatchNormKind::ForwardTrain {
                out,
                inp,
                params,
                stats,
                relu,
            },
            _ => BatchNormKind::ForwardEval { out, inp, params, relu },
        };
        Some(Op::BatchNorm(BatchNorm {
            rows: rows * len / channels,
            channels,
            kind,
        }))
    }

    /// A batch normalisation layer's backward op and the updates of its scale and offset.
    fn batch_norm_backward(&self, rows: usize, opt: Optimizer) -> Vec<Op> {
        let LayerOp::BatchNorm {
            gamma,
            beta,
            stats,
            channels,
            len,
            ..
        } = self.op
        else {
            return Vec::new();
        };
        // dout (rows, channels) -> dinp, dgamma, dbeta (channels)
        let backward = Op::BatchNorm(BatchNorm {
            rows: rows * len / channels,
            channels,
            kind: BatchNormKind::Backward {
                dinp: self.dinp,
                dout: self.dout,
                inp: self.inp,
                gamma: gamma.value,
                stats,
                dgamma: gamma.grad,
                dbeta: beta.grad,
            },
        });
        let update = |param| {
            Op::Update(Update {
                param,
                len: channels,
                opt,
            })
        };
        vec![backward, update(gamma), update(beta)]
    }
}

/// What a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    /// Forward, loss with its gradient, backward and the optimizer step.
    Train,
    /// Forward and the loss's statistics.
    Evaluate,
    /// Forward only: the logits.
    Predict,
}

/// A training step as plain ops: the batch gathered from `ds`, every layer's forward op, the
/// loss, then from the last layer to the first its input gradient (taken before the update
/// changes the weight it reads), its weight gradient and the updates of its weight and bias.
pub fn train_ops(layers: &[LayerTensors], ds: DatasetId, rows: usize, opt: Optimizer) -> Vec<Op> {
    let mut ops = eval_ops(layers, ds, rows, PlanKind::Train);
    for (i, l) in layers.iter().enumerate().rev() {
        // A ReLU before this layer whose gradient this layer's input gradient applies: the
        // previous layer's, read from its output, unless a pool between applies it.
        let prev_relu = i > 0 && layers[i - 1].relu;
        match l.op {
            LayerOp::BatchNorm { .. } => {
                // Resolving a model moves the ReLU before a batch normalisation after it.
                debug_assert!(!prev_relu, "a ReLU before a batch normalisation");
                ops.extend(l.batch_norm_backward(rows, opt));
                continue;
            }
            LayerOp::Dropout { len, rate, key } => {
                if let Some(dinp) = l.dinp {
                    ops.push(Op::Dropout(Dropout {
                        len: rows * len,
                        rate,
                        key,
                        kind: DropoutKind::Backward {
                            dinp,
                            dout: l.dout,
                            relu_mask: prev_relu.then_some(l.inp),
                        },
                    }));
                }
                continue;
            }
            _ => {}
        }
        if let LayerOp::Pool { shape } = l.op {
            if let Some(dinp) = l.dinp {
                ops.push(Op::Pool(Pool {
                    shape: PoolShape { images: rows, ..shape },
                    kind: PoolKind::Backward {
                        dinp,
                        dout: l.dout,
                        inp: l.inp,
                        relu: prev_relu,
                    },
                }));
            }
            continue;
        }
        let Some((shape, conv, weight, bias)) = l.product(rows) else {
            continue;
        };
        // dout (rows, outputs) -> dinp (rows, inputs); dweight (inputs, outputs), dbias (outputs)
        if let Some(dinp) = l.dinp {
            ops.push(Op::Matmul(Matmul {
                shape,
                kind: MatmulKind::BackwardInput {
                    dinp,
                    dout: l.dout,
                    weight: weight.value,
                    relu_mask: prev_relu.then_some(l.inp),
                },
                conv,
            }));
        }
        let layer = LayerGradient {
            shape,
            conv,
            weight,
            bias,
            inp: l.inp,
            dout: l.dout,
        };
        ops.extend(weight_gradient_ops(layer, opt, false));
    }
    ops
}

/// The forward half of a step: the batch gathered from `ds`, every layer's op, and (unless
/// predicting) the loss, with its gradient when training.
pub fn eval_ops(layers: &[LayerTensors], ds: DatasetId, rows: usize, kind: PlanKind) -> Vec<Op> {
    let (Some(first), Some(last)) = (layers.first(), layers.last()) else {
        return Vec::new();
    };
    let mut ops = vec![Op::Gather(Gather {
        x: first.inp,
        ds,
        rows,
        augment: None,
    })];
    for l in layers {
        // inp -> out = activation(op(inp))
        match (l.op, l.product(rows)) {
            (LayerOp::Pool { shape }, _) => ops.push(Op::Pool(Pool {
                shape: PoolShape { images: rows, ..shape },
                kind: PoolKind::Forward { out: l.out, inp: l.inp },
            })),
            (LayerOp::BatchNorm { .. }, _) => ops.extend(l.batch_norm_forward(rows, kind)),
            (LayerOp::Dropout { len, rate, key }, _) => ops.push(Op::Dropout(Dropout {
                len: rows * len,
                rate,
                key,
                kind: DropoutKind::Forward {
                    out: l.out,
                    inp: l.inp,
                    train: kind == PlanKind::Train,
                },
            })),
            (_, Some((shape, conv, weight, bias))) => ops.push(Op::Matmul(Matmul {
                shape,
                kind: MatmulKind::Forward {
                    out: l.out,
                    inp: l.inp,
                    weight: weight.value,
                    bias: Some(bias.value),
                    relu: l.relu,
                },
                conv,
            })),
            _ => {}
        }
    }
    if kind != PlanKind::Predict {
        let rows_out = rows;
        ops.push(Op::Loss(Loss {
            logits: last.out,
            dlogits: (kind == PlanKind::Train).then_some(last.dout),
            ds,
            rows: rows_out,
            classes: last.outputs(),
        }));
    }
    ops
}

/// A training plan whose gather moves each image by `augment`'s random transforms.
pub fn augmented(mut ops: Vec<Op>, augment: Augment) -> Vec<Op> {
    for op in &mut ops {
        if let Op::Gather(g) = op {
            g.augment = Some(augment);
        }
    }
    ops
}

/// Merge what `fusions` allows: a weight gradient and the updates of its weight and bias into
/// one op; then a layer's forward product, the loss, its input gradient through the previous ReLU
/// and its weight gradient with the update into one `OutputLayer`.
pub fn fuse(ops: Vec<Op>, fusions: Fusions) -> Vec<Op> {
    let ops = if fusions.weight_update {
        merge(ops, 3, fuse_weight_update)
    } else {
        ops
    };
    let mut ops = merge(ops, 4, |w| fuse_output_layer(w, fusions));
    if fusions.pool_weight_gradient {
        fuse_pool_weight_gradient(&mut ops);
        fuse_conv_pool(&mut ops);
    }
    ops
}

/// [a convolution's forward product with ReLU, the max pool of its output] -> one `ConvPool`,
/// where nothing else reads the product's output: no op but the pool reads it, except a fused
/// `PoolWeightGradient` (whose backend keeps the pool's choices for it).
fn fuse_conv_pool(ops: &mut Vec<Op>) {
    let Some(i) = ops.windows(2).position(|w| {
        matches!(
            w,
            [Op::Matmul(Matmul {
                kind: MatmulKind::Forward { relu: true, out, .. },
                conv: Some(_),
                ..
            }), Op::Pool(Pool {
                kind: PoolKind::Forward { inp, .. },
                ..
            })] if out == inp
        )
    }) else {
        return;
    };
    let (Op::Matmul(conv), Op::Pool(pool)) = (ops[i], ops[i + 1]) else {
        return;
    };
    let PoolKind::Forward { inp: product, .. } = pool.kind else {
        return;
    };
    let read_elsewhere = ops.iter().enumerate().any(|(j, op)| {
        j != i + 1
            && match op {
                Op::Pool(p) => matches!(p.kind, PoolKind::Backward { inp, .. } if inp == product),
                Op::Matmul(m) => match m.kind {
                    MatmulKind::Forward { inp, .. } | MatmulKind::BackwardWeight { inp, .. } => inp == product,
                    MatmulKind::BackwardInput { relu_mask, .. } => relu_mask == Some(product),
                },
                Op::OutputLayer(o) => o.inp == product,
                Op::Loss(l) => l.logits == product,
                Op::Dropout(d) => match d.kind {
                    DropoutKind::Forward { inp, .. } => inp == product,
                    DropoutKind::Backward { relu_mask, .. } => relu_mask == Some(product),
                },
                Op::BatchNorm(b) => match b.kind {
                    BatchNormKind::ForwardTrain { inp, .. }
                    | BatchNormKind::ForwardEval { inp, .. }
                    | BatchNormKind::Backward { inp, .. } => inp == product,
                },
                Op::Gather(_) | Op::Update(_) | Op::PoolWeightGradient(_) | Op::ConvPool(_) => false,
            }
    });
    if !read_elsewhere {
        ops.splice(i..i + 2, [Op::ConvPool(ConvPool { conv, pool })]);
    }
}

/// [max pool backward through a ReLU, the weight gradient with its update of the convolution
/// before it] as the step's last two ops (the first layer's: nothing after them reads the pool's
/// input gradient) -> one `PoolWeightGradient`.
fn fuse_pool_weight_gradient(ops: &mut Vec<Op>) {
    let n = ops.len();
    let Some(&[Op::Pool(pool), Op::Matmul(weight)]) = ops.get(n.saturating_sub(2)..) else {
        return;
    };
    let (PoolKind::Backward { dinp, relu: true, .. }, Some(g)) = (pool.kind, weight.conv) else {
        return;
    };
    let MatmulKind::BackwardWeight {
        dout, update: Some(_), ..
    } = weight.kind
    else {
        return;
    };
    let s = pool.shape;
    if dout != dinp || (s.images, s.h, s.w, s.ch) != (g.images, g.oh(), g.ow(), weight.shape.outputs) {
        return;
    }
    ops.truncate(n - 2);
    ops.push(Op::PoolWeightGradient(PoolWeightGradient { pool, weight }));
}

/// Replace every window of `width` ops that `rule` merges by its result, left to right.
fn merge(ops: Vec<Op>, width: usize, rule: impl Fn(&[Op]) -> Option<Op>) -> Vec<Op> {
    let mut out = Vec::with_capacity(ops.len());
    let mut i = 0;
    while i < ops.len() {
        if let Some(fused) = ops.get(i..i + width).and_then(&rule) {
            out.push(fused);
            i += width;
        } else {
            out.push(ops[i]);
            i += 1;
        }
    }
    out
}

/// [weight gradient with dbias, update of the weight, update of the bias] -> one op.
fn fuse_weight_update(w: &[Op]) -> Option<Op> {
    let [Op::Matmul(Matmul {
        shape,
        kind:
            MatmulKind::BackwardWeight {
                dweight,
                dbias: Some(dbias),
                inp,
                dout,
                update: None,
            },
        conv,
    }), Op::Update(Update { param: weight, opt, .. }), Op::Update(Update {
        param: bias,
        opt: bias_opt,
        ..
    })] = *w
    else {
        return None;
    };
    if weight.grad != dweight || bias.grad != dbias || opt != bias_opt {
        return None;
    }
    let layer = LayerGradient {
        shape,
        conv,
        weight,
        bias,
        inp,
        dout,
    };
    weight_gradient_ops(layer, opt, true).pop()
}

/// [forward with bias, loss with dlogits, input gradient through the ReLU, weight gradient with
/// its update] of one layer -> `OutputLayer`, when the backend runs one of that shape.
fn fuse_output_layer(w: &[Op], fusions: Fusions) -> Option<Op> {
    let [Op::Matmul(Matmul {
        shape,
        kind:
            MatmulKind::Forward {
                out: logits,
                inp,
                weight,
                bias: Some(bias),
                relu: false,
            },
        conv: None,
    }), Op::Loss(Loss {
        logits: loss_logits,
        dlogits: Some(dlogits),
        ds,
        ..
    }), Op::Matmul(Matmul {
        kind:
            MatmulKind::BackwardInput {
                dinp,
                dout,
                weight: input_weight,
                relu_mask: Some(mask),
            },
        conv: None,
        ..
    }), Op::Matmul(Matmul {
        kind:
            MatmulKind::BackwardWeight {
                dweight,
                dbias: Some(dbias),
                inp: weight_inp,
                dout: weight_dout,
                update: Some(u),
            },
        conv: None,
        ..
    })] = *w
    else {
        return None;
    };
    let same_layer = loss_logits == logits
        && dout == dlogits
        && weight_dout == dlogits
        && input_weight == weight
        && mask == inp
        && weight_inp == inp
        && u.weight.value == weight
        && u.bias.value == bias;
    if !same_layer || !fusions.output_layer(shape, &u.opt) {
        return None;
    }
    Some(Op::OutputLayer(OutputLayer {
        shape,
        weight: u.weight.with_grad(dweight),
        bias: u.bias.with_grad(dbias),
        inp,
        logits,
        dlogits,
        dinp,
        ds,
        opt: u.opt,
    }))
}

/// The plan as text, one op a line, for `train --verbose`.
pub fn describe(ops: &[Op]) -> String {
    let lines: Vec<String> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| format!("  {}. {}", i + 1, op.describe()))
        .collect();
    format!("{} dispatches a step:\n{}", ops.len(), lines.join("\n"))
}
