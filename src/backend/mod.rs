//! The backend interface: the ops of a training step over device-resident tensors.
//!
//! Contract: the layer graph (`model`) and the training loop (`train`) are written once against
//! `Backend`; the CPU reference, the fast CPU path and the wgpu device implement it. Tensors are
//! flat f32 buffers named by `TensorId`; shapes are passed explicitly to every op, outputs first
//! (llm.c style), and each implementation checks them before it runs. An op may run at once (CPU)
//! or be recorded for later submission (GPU): results are only guaranteed visible through `read`
//! and `collect_stats` (or `read_stats`), which are the synchronisation points.

mod checks;
pub mod cpu;
mod cpu_fast;
mod cpu_narrow;
mod cpu_pool;
mod cpu_sparse;
pub mod reference;
pub mod wgpu;

use crate::data::Dataset;
use crate::error::Result;
use crate::optim::{Optimizer, OptimizerKind};

/// A flat f32 tensor owned by a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorId(pub usize);

/// A dataset (u8 images, labels and a visiting order) resident on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DatasetId(pub usize);

/// Tensors packed into one allocation (see `Backend::alloc_packed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// All the parts and the padding between them.
    pub whole: TensorId,
    /// Values in `whole`.
    pub len: usize,
    pub parts: Vec<TensorId>,
    /// Where each part starts in `whole`, in values.
    pub offsets: Vec<usize>,
}

/// The tensors of one parameter: its value, its gradient and RMSprop's velocity of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamTensors {
    pub value: TensorId,
    pub grad: TensorId,
    pub velocity: TensorId,
}

/// Loss and accuracy of one batch, summed over its rows (written by the fused loss op).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Sum over the batch of the per-example cross-entropy.
    pub loss_sum: f32,
    /// Number of rows whose arg-max equals the label.
    pub correct: u32,
}

/// What a matmul applies to its product before storing it, fused so it costs no extra pass:
/// `+ bias` (broadcast over rows), then `max(., 0)`, then zeroing where `relu_mask <= 0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Epilogue {
    /// (N,) added to every row.
    pub bias: Option<TensorId>,
    /// Apply ReLU.
    pub relu: bool,
    /// (M, N): keep the product only where this is > 0 (the ReLU gradient, given the ReLU output).
    pub relu_mask: Option<TensorId>,
}

/// The output layer's training step (`Backend::output_layer_step`): a dense layer of `classes`
/// outputs whose input is the previous layer's ReLU output, feeding the fused loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLayerStep {
    pub weight: ParamTensors,
    pub bias: ParamTensors,
    /// (B, C): the previous layer's ReLU output.
    pub inp: TensorId,
    /// (B, classes): the logits; what it holds afterwards is unspecified (the GPU may not write it).
    pub logits: TensorId,
    /// (B, classes): written with the logits' gradient, (softmax - onehot) / B.
    pub dlogits: TensorId,
    /// (B, C): written with the input's gradient through the previous ReLU.
    pub dinp: TensorId,
    /// The batch's labels: those of `ds` at order[start..start + B].
    pub ds: DatasetId,
    pub start: usize,
    /// The stats slot that gets the batch's loss sum and correct count.
    pub slot: usize,
    pub b: usize,
    pub c: usize,
    pub classes: usize,
}

/// What a backend did, for `--verbose` and `bench`: the GPU's costly round trips are visible.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Kernels launched (or ops run, on the CPU).
    pub dispatches: u64,
    /// Command buffers submitted to the device queue.
    pub submits: u64,
    /// Device-to-host read-backs.
    pub readbacks: u64,
    /// Host-to-device copies (uploads).
    pub uploads: u64,
    /// Bytes held in tensors, datasets and statistics on the device.
    pub allocated_bytes: u64,
}

/// The ops of the training step. See the module contract.
pub trait Backend {
    /// A human-readable name of the device, e.g. "cpu (fast, 2 threads)".
    fn name(&self) -> String;

    /// A zero-filled tensor of `len` f32 values.
    fn alloc(&mut self, len: usize) -> Result<TensorId>;
    /// Zero-filled tensors of the given lengths packed into one allocation, and `whole`, a tensor
    /// covering all of them (and any zero padding between them), so that one elementwise op over
    /// `whole` updates every part: the layer graph keeps its parameters, gradients and velocities
    /// this way so that a step's optimizer update is one dispatch.
    fn alloc_packed(&mut self, lens: &[usize]) -> Result<Packed>;
    /// Copy `data` into the start of `t`.
    fn write(&mut self, t: TensorId, data: &[f32]) -> Result<()>;
    /// Wait for pending work and return the whole of `t`.
    fn read(&mut self, t: TensorId) -> Result<Vec<f32>>;

    /// Make a dataset resident (once); its visiting order starts as the identity.
    fn upload_dataset(&mut self, data: &Dataset) -> Result<DatasetId>;
    /// Set the visiting order of `ds` (a permutation of 0..len), once per epoch.
    fn set_order(&mut self, ds: DatasetId, order: &[u32]) -> Result<()>;
    /// Make room for `slots` step statistics (the most steps between two `read_stats`).
    fn reserve_stats(&mut self, slots: usize) -> Result<()>;

    /// x (rows, 784) = images[order[start..start + rows]] / 255.
    fn gather_batch(&mut self, x: TensorId, ds: DatasetId, start: usize, rows: usize) -> Result<()>;
    /// The first layer's forward product on a batch from a dataset: x (rows, 784) =
    /// images[order[start..start + rows]] / 255 (`gather_batch`), then out (rows, OC) =
    /// epilogue(x @ weight (784, OC)) (`matmul_forward`). The GPU can fuse the two (the pixels go
    /// straight into the product's tiles, and x is written on the way for the weight gradient).
    #[allow(clippy::too_many_arguments)]
    fn gather_matmul_forward(
        &mut self,
        out: TensorId,
        x: TensorId,
        ds: DatasetId,
        start: usize,
        weight: TensorId,
        epilogue: Epilogue,
        rows: usize,
        oc: usize,
    ) -> Result<()> {
        self.gather_batch(x, ds, start, rows)?;
        self.matmul_forward(out, x, weight, epilogue, rows, crate::data::IMAGE_PIXELS, oc)
    }
    /// out (B, OC) = epilogue(inp (B, C) @ weight (C, OC)); forward uses `bias` and `relu`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &mut self,
        out: TensorId,
        inp: TensorId,
        weight: TensorId,
        epilogue: Epilogue,
        b: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    /// dinp (B, C) = epilogue(dout (B, OC) @ weight (C, OC)^T); backward uses `relu_mask`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_input(
        &mut self,
        dinp: TensorId,
        dout: TensorId,
        weight: TensorId,
        epilogue: Epilogue,
        b: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    /// dweight (C, OC) = inp (B, C)^T @ dout (B, OC), and when `dbias` is given, dbias (OC) = the
    /// column sums of dout (`bias_backward`), fused because both read every value of dout.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_weight(
        &mut self,
        dweight: TensorId,
        dbias: Option<TensorId>,
        inp: TensorId,
        dout: TensorId,
        b: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    /// A dense layer's weight gradient and the optimizer step of its two parameters: dweight =
    /// inp^T @ dout and dbias = colsum(dout) (`matmul_backward_weight`), then `opt` applied to the
    /// weight and to the bias with those gradients (`rmsprop_update` / `sgd_update`). The GPU fuses
    /// the step into the product's epilogue; by default it is the ops in sequence.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_weight_update(
        &mut self,
        weight: ParamTensors,
        bias: ParamTensors,
        inp: TensorId,
        dout: TensorId,
        b: usize,
        c: usize,
        oc: usize,
        opt: &Optimizer,
    ) -> Result<()> {
        weight_update_in_sequence(self, weight, bias, inp, dout, b, c, oc, opt)
    }
    /// The output layer's whole step: logits = inp @ weight + bias, the fused loss (stats and
    /// dlogits), dinp = (dlogits @ weight^T) * (inp > 0) with the weight before the step, then the
    /// weight and bias gradients and `opt`'s step of both. The GPU can run it as one dispatch; by
    /// default it is the ops in sequence (`output_layer_in_sequence`).
    fn output_layer_step(&mut self, step: &OutputLayerStep, opt: &Optimizer) -> Result<()> {
        output_layer_in_sequence(self, step, opt)
    }
    /// out (B, OC) += bias (OC).
    fn bias_add_forward(&mut self, out: TensorId, bias: TensorId, b: usize, oc: usize) -> Result<()>;
    /// dbias (OC) = column sums of dout (B, OC).
    fn bias_backward(&mut self, dbias: TensorId, dout: TensorId, b: usize, oc: usize) -> Result<()>;
    /// out (N) = max(inp, 0).
    fn relu_forward(&mut self, out: TensorId, inp: TensorId, n: usize) -> Result<()>;
    /// dinp (N) = dout * (out > 0).
    fn relu_backward(&mut self, dinp: TensorId, dout: TensorId, out: TensorId, n: usize) -> Result<()>;
    /// Fused softmax + sparse categorical cross-entropy over logits (rows, classes) whose labels
    /// are those of `ds` at order[start..start + rows]. Writes the batch's loss sum and correct
    /// count to stats slot `slot` and, when `dlogits` is given, (probs - onehot) / rows into it.
    #[allow(clippy::too_many_arguments)]
    fn softmax_xent_forward_backward(
        &mut self,
        dlogits: Option<TensorId>,
        logits: TensorId,
        ds: DatasetId,
        start: usize,
        rows: usize,
        classes: usize,
        slot: usize,
    ) -> Result<()>;
    /// Keras RMSprop on n values: v = rho v + (1-rho) g^2; param -= lr g / sqrt(v + eps).
    #[allow(clippy::too_many_arguments)]
    fn rmsprop_update(
        &mut self,
        param: TensorId,
        velocity: TensorId,
        grad: TensorId,
        n: usize,
        lr: f32,
        rho: f32,
        eps: f32,
    ) -> Result<()>;
    /// param -= lr grad, on n values.
    fn sgd_update(&mut self, param: TensorId, grad: TensorId, n: usize, lr: f32) -> Result<()>;

    /// Submit the work issued so far and start copying step statistics `first..first + count`
    /// back, without waiting: `collect_stats` returns them. The training loop records the next
    /// chunk of steps meanwhile, so the device never waits for the host between chunks.
    fn request_stats(&mut self, first: usize, count: usize) -> Result<()>;
    /// Wait for the oldest `request_stats` not yet collected and return its statistics.
    fn collect_stats(&mut self) -> Result<Vec<StepStats>>;
    /// Whether ops run after they are issued (a GPU), so that the host gains by issuing the next
    /// chunk of steps before it collects the last one's statistics.
    fn runs_behind_host(&self) -> bool {
        false
    }
    /// Wait for pending work and return the first `slots` step statistics (with no other
    /// `request_stats` pending: `collect_stats` returns the oldest).
    fn read_stats(&mut self, slots: usize) -> Result<Vec<StepStats>> {
        self.request_stats(0, slots)?;
        self.collect_stats()
    }
    /// Wait until every op issued so far has finished (for timing).
    fn sync(&mut self) -> Result<()>;
    /// What the backend has done so far.
    fn counters(&self) -> Counters;

    /// Get ready to run the matmuls of these (M, N, K) shapes and the loss (the GPU compiles their
    /// pipelines in parallel, so that the first step does not wait for them one by one).
    fn prepare(&mut self, matmuls: &[(usize, usize, usize)]) -> Result<()> {
        let _ = matmuls;
        Ok(())
    }

    /// Start timing each op on the device (for `bench`); false where the backend cannot.
    fn start_profile(&mut self, ops: u32) -> Result<bool> {
        let _ = ops;
        Ok(false)
    }
    /// Wait for the profiled ops: (op, device microseconds) of each since `start_profile`.
    fn finish_profile(&mut self) -> Result<Vec<(String, f64)>> {
        Ok(Vec::new())
    }
}

/// `Backend::matmul_backward_weight_update` as the ops in sequence: the weight and bias gradients
/// (`matmul_backward_weight`), then the optimizer step of the weight and of the bias.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_update_in_sequence<B: Backend + ?Sized>(
    be: &mut B,
    weight: ParamTensors,
    bias: ParamTensors,
    inp: TensorId,
    dout: TensorId,
    b: usize,
    c: usize,
    oc: usize,
    opt: &Optimizer,
) -> Result<()> {
    be.matmul_backward_weight(weight.grad, Some(bias.grad), inp, dout, b, c, oc)?;
    for (p, n) in [(weight, c * oc), (bias, oc)] {
        param_step(be, p, n, opt)?;
    }
    Ok(())
}

/// `Backend::output_layer_step` as the ops in sequence: the forward product with the bias, the
/// fused loss, the input gradient through the ReLU (before the weight changes), then the weight
/// gradient and update.
pub(crate) fn output_layer_in_sequence<B: Backend + ?Sized>(
    be: &mut B,
    s: &OutputLayerStep,
    opt: &Optimizer,
) -> Result<()> {
    // inp (B, C) -> logits (B, classes) -> dlogits (B, classes) -> dinp (B, C); dW (C, classes)
    let forward = Epilogue {
        bias: Some(s.bias.value),
        relu: false,
        relu_mask: None,
    };
    be.matmul_forward(s.logits, s.inp, s.weight.value, forward, s.b, s.c, s.classes)?;
    be.softmax_xent_forward_backward(Some(s.dlogits), s.logits, s.ds, s.start, s.b, s.classes, s.slot)?;
    let through_relu = Epilogue {
        bias: None,
        relu: false,
        relu_mask: Some(s.inp),
    };
    be.matmul_backward_input(s.dinp, s.dlogits, s.weight.value, through_relu, s.b, s.c, s.classes)?;
    be.matmul_backward_weight_update(s.weight, s.bias, s.inp, s.dlogits, s.b, s.c, s.classes, opt)
}

/// `opt`'s step of the n values of parameter `p` with its stored gradient.
pub(crate) fn param_step<B: Backend + ?Sized>(be: &mut B, p: ParamTensors, n: usize, opt: &Optimizer) -> Result<()> {
    match opt.kind {
        OptimizerKind::RmsProp => be.rmsprop_update(p.value, p.velocity, p.grad, n, opt.lr, opt.rho, opt.eps),
        OptimizerKind::Sgd => be.sgd_update(p.value, p.grad, n, opt.lr),
    }
}
