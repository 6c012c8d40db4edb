//! The ops of `gpu_mnist::backend::ops` built from positional arguments, for tests that call one
//! op at a time: each helper builds the typed op and runs it at `StepAt { start, slot }`.

use gpu_mnist::backend::ops::{
    DenseShape, FusedUpdate, Gather, Loss, Matmul, MatmulKind, Op, OutputLayer, StepAt, Update,
};
use gpu_mnist::backend::{Backend, DatasetId, ParamTensors, TensorId};
use gpu_mnist::optim::Optimizer;
use gpu_mnist::Result;

/// (rows, inputs, outputs) as a `DenseShape`.
pub fn dense(b: usize, c: usize, oc: usize) -> DenseShape {
    DenseShape {
        rows: b,
        inputs: c,
        outputs: oc,
    }
}

/// Wait for a read-back (the native way: block on it).
pub fn read(be: &mut dyn Backend, t: TensorId) -> Result<Vec<f32>> {
    pollster::block_on(be.read(t))
}

pub fn gather(be: &mut dyn Backend, x: TensorId, ds: DatasetId, start: usize, rows: usize) -> Result<()> {
    be.run(
        &Op::Gather(Gather {
            x,
            ds,
            rows,
            augment: None,
        }),
        StepAt {
            start,
            ..StepAt::default()
        },
    )
}

/// out = relu?(inp @ weight + bias?).
pub fn forward(
    be: &mut dyn Backend,
    (out, inp, weight): (TensorId, TensorId, TensorId),
    (bias, relu): (Option<TensorId>, bool),
    (b, c, oc): (usize, usize, usize),
) -> Result<()> {
    let kind = MatmulKind::Forward {
        out,
        inp,
        weight,
        bias,
        relu,
    };
    be.run(
        &Op::Matmul(Matmul {
            shape: dense(b, c, oc),
            kind,
            conv: None,
        }),
        StepAt::default(),
    )
}

/// dinp = (dout @ weight^T) * (mask > 0)?.
pub fn backward_input(
    be: &mut dyn Backend,
    (dinp, dout, weight): (TensorId, TensorId, TensorId),
    relu_mask: Option<TensorId>,
    (b, c, oc): (usize, usize, usize),
) -> Result<()> {
    let kind = MatmulKind::BackwardInput {
        dinp,
        dout,
        weight,
        relu_mask,
    };
    be.run(
        &Op::Matmul(Matmul {
            shape: dense(b, c, oc),
            kind,
            conv: None,
        }),
        StepAt::default(),
    )
}

/// dweight = inp^T @ dout, dbias = colsum(dout)?.
pub fn backward_weight(
    be: &mut dyn Backend,
    (dweight, dbias): (TensorId, Option<TensorId>),
    (inp, dout): (TensorId, TensorId),
    (b, c, oc): (usize, usize, usize),
) -> Result<()> {
    let kind = MatmulKind::BackwardWeight {
        dweight,
        dbias,
        inp,
        dout,
        update: None,
    };
    be.run(
        &Op::Matmul(Matmul {
            shape: dense(b, c, oc),
            kind,
            conv: None,
        }),
        StepAt::default(),
    )
}

/// The weight gradient with `opt`'s step of the weight and bias fused in, as the run's first step.
pub fn backward_weight_update(
    be: &mut dyn Backend,
    params: (ParamTensors, ParamTensors),
    tensors: (TensorId, TensorId),
    dims: (usize, usize, usize),
    opt: &Optimizer,
) -> Result<()> {
    backward_weight_update_at(be, params, tensors, dims, opt, StepAt::default())
}

/// `backward_weight_update` as the step at `at` (its rate and bias corrections are step
/// `at.step`'s, its row of the GPU's step table that of slot `at.slot`).
pub fn backward_weight_update_at(
    be: &mut dyn Backend,
    (weight, bias): (ParamTensors, ParamTensors),
    (inp, dout): (TensorId, TensorId),
    (b, c, oc): (usize, usize, usize),
    opt: &Optimizer,
    at: StepAt,
) -> Result<()> {
    let kind = MatmulKind::BackwardWeight {
        dweight: weight.grad,
        dbias: Some(bias.grad),
        inp,
        dout,
        update: Some(FusedUpdate {
            weight: weight.state(),
            bias: bias.state(),
            opt: *opt,
        }),
    };
    be.run(
        &Op::Matmul(Matmul {
            shape: dense(b, c, oc),
            kind,
            conv: None,
        }),
        at,
    )
}

/// The fused loss over logits (rows, classes) of rows start.. of `ds`, statistics into `slot`.
pub fn loss(
    be: &mut dyn Backend,
    (dlogits, logits): (Option<TensorId>, TensorId),
    ds: DatasetId,
    (start, rows, classes): (usize, usize, usize),
    slot: usize,
) -> Result<()> {
    let op = Op::Loss(Loss {
        logits,
        dlogits,
        ds,
        rows,
        classes,
    });
    be.run(&op, StepAt { start, slot, step: 0 })
}

/// `opt`'s step of n values of a parameter.
pub fn update(be: &mut dyn Backend, param: ParamTensors, n: usize, opt: &Optimizer) -> Result<()> {
    be.run(
        &Op::Update(Update {
            param,
            len: n,
            opt: *opt,
        }),
        StepAt::default(),
    )
}

/// The output layer's whole step (`Op::OutputLayer`).
pub fn output_layer(be: &mut dyn Backend, o: OutputLayer, at: StepAt) -> Result<()> {
    be.run(&Op::OutputLayer(o), at)
}

/// The first `slots` step statistics (`backend::read_stats`, blocked on).
pub fn stats(be: &mut dyn Backend, slots: usize) -> Result<Vec<gpu_mnist::backend::StepStats>> {
    pollster::block_on(gpu_mnist::backend::read_stats(be, slots))
}

/// The n x n identity matrix: a product with it is exact, so that a matmul's epilogue (bias,
/// ReLU, mask) can be checked exactly against the reference's plain loops.
pub fn identity(n: usize) -> Vec<f32> {
    let mut m = vec![0.0; n * n];
    for i in 0..n {
        m[i * n + i] = 1.0;
    }
    m
}
