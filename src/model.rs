//! The layer graph: Dense layers (ReLU-activated, the last linear) ending in a fused softmax +
//! cross-entropy, run through any `Backend`.
//!
//! Contract: `ModelSpec` describes an MLP 784 -> hidden... -> 10 (ReLU after every hidden Dense);
//! `Graph::new` allocates its parameters, gradients, optimizer state and activations on the
//! backend once, for batches of up to `max_batch` rows; `train_step` and `eval_step` then only
//! dispatch ops. A training step is the hidden layers' forward products, the output layer's
//! whole step (`Backend::output_layer_step`: its forward product, the loss, its input gradient and
//! update), then the hidden layers' backward products and updates, last layer first.
//! Parameters are initialised as Keras does: Glorot-uniform weights, zero biases.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::{Backend, DatasetId, Epilogue, OutputLayerStep, Packed, ParamTensors, TensorId};
use crate::data::{CLASSES, IMAGE_PIXELS};
use crate::error::{Error, Result};
use crate::optim::Optimizer;

/// The shape of the network: input width, hidden widths, class count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub inputs: usize,
    pub hidden: Vec<usize>,
    pub classes: usize,
}

impl ModelSpec {
    /// 784 -> hidden... -> 10.
    pub fn mnist(hidden: &[usize]) -> Self {
        ModelSpec {
            inputs: IMAGE_PIXELS,
            hidden: hidden.to_vec(),
            classes: CLASSES,
        }
    }

    /// (in, out) of each Dense layer, in order.
    pub fn dense_dims(&self) -> Vec<(usize, usize)> {
        let mut widths = vec![self.inputs];
        widths.extend(&self.hidden);
        widths.push(self.classes);
        widths.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Total number of trainable values.
    pub fn param_count(&self) -> usize {
        self.dense_dims().iter().map(|(c, oc)| c * oc + oc).sum()
    }

    /// Refuse a model or batch too large to allocate, before anything is allocated: at most
    /// 2^28 parameters (each also has a gradient and a velocity) and 2^30 activation values.
    pub fn check_size(&self, max_batch: usize) -> Result<()> {
        if let Some(bad) = self.hidden.iter().find(|&&h| h == 0) {
            return Err(Error::usage(
                "--hidden",
                format!("layer width {bad} must be at least 1"),
            ));
        }
        let params = self.dense_dims().iter().try_fold(0usize, |acc, &(c, oc)| {
            c.checked_mul(oc)
                .and_then(|w| w.checked_add(oc))
                .and_then(|n| acc.checked_add(n))
        });
        match params {
            Some(n) if n <= MAX_PARAMS => {}
            _ => {
                let reason = format!("{} has more than {MAX_PARAMS} parameters", self.describe());
                return Err(Error::usage("--hidden", reason));
            }
        }
        let width: usize = self.inputs + self.hidden.iter().sum::<usize>() + self.classes;
        match width.checked_mul(max_batch).and_then(|v| v.checked_mul(2)) {
            Some(v) if v <= MAX_ACTIVATIONS => Ok(()),
            _ => Err(Error::usage(
                "--batch-size",
                format!(
                    "batches of {max_batch} through {} need more than {MAX_ACTIVATIONS} activation values",
                    self.describe()
                ),
            )),
        }
    }

    /// One text line, e.g. "784-512-10".
    pub fn describe(&self) -> String {
        let mut w = vec![self.inputs];
        w.extend(&self.hidden);
        w.push(self.classes);
        w.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("-")
    }
}

/// The most parameters a model may have (values, gradients and velocities: 3 GiB in f32).
pub const MAX_PARAMS: usize = 1 << 28;
/// The most activation values (and as many gradients) a graph may hold for one batch.
pub const MAX_ACTIVATIONS: usize = 1 << 30;

/// A named parameter tensor on the host (initial values, checkpoints).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// e.g. "dense_0.kernel", "dense_0.bias".
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Glorot-uniform kernels (limit sqrt(6 / (in + out))) and zero biases, seeded.
pub fn glorot_init(spec: &ModelSpec, seed: u64) -> Vec<HostTensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (i, (c, oc)) in spec.dense_dims().into_iter().enumerate() {
        let limit = (6.0 / (c + oc) as f64).sqrt() as f32;
        let kernel = (0..c * oc).map(|_| rng.random_range(-limit..limit)).collect();
        out.push(HostTensor {
            name: format!("dense_{i}.kernel"),
            shape: vec![c, oc],
            data: kernel,
        });
        out.push(HostTensor {
            name: format!("dense_{i}.bias"),
            shape: vec![oc],
            data: vec![0.0; oc],
        });
    }
    out
}

/// A parameter on the backend: value, gradient and optimizer state (RMSprop's velocity).
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: TensorId,
    pub grad: TensorId,
    pub velocity: TensorId,
}

impl Param {
    /// Its value, gradient and velocity tensors.
    pub fn tensors(&self) -> ParamTensors {
        ParamTensors {
            value: self.value,
            grad: self.grad,
            velocity: self.velocity,
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The activation that follows a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// None: the layer's output goes to the loss as logits.
    Linear,
}

/// Which tensor of a parameter: its value, its gradient, or RMSprop's velocity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamPart {
    Value,
    Grad,
    Velocity,
}

impl ParamPart {
    /// Index into `Graph::packed`.
    fn index(self) -> usize {
        self as usize
    }
}

/// A layer of the graph: `Dense(oc, activation)` as in Keras. The activation runs in the matmul's
/// epilogue, and its gradient in the next layer's backward product, so it costs no pass of its own.
/// Indices point into `Graph::params`.
#[derive(Debug, Clone)]
struct Dense {
    kernel: usize,
    bias: usize,
    c: usize,
    oc: usize,
    activation: Activation,
}

/// The network on a backend, with buffers for batches of up to `max_batch` rows.
pub struct Graph {
    pub spec: ModelSpec,
    pub params: Vec<Param>,
    layers: Vec<Dense>,
    /// acts[0] is the input batch (B, 784); acts[i + 1] is the activated output of layer i.
    acts: Vec<TensorId>,
    /// dacts[i + 1] is the gradient of the loss with respect to layer i's output before its
    /// activation (for the last layer: the logits); dacts[0] is never written.
    dacts: Vec<TensorId>,
    /// The packed allocations of the values, gradients and velocities (in `ParamPart` order), so
    /// that reading or writing one part of every parameter is one transfer.
    packed: [Packed; 3],
    max_batch: usize,
}

impl Graph {
    /// Allocate everything the graph needs on `be`. Parameters start at zero: call `set_params`.
    pub fn new(be: &mut dyn Backend, spec: &ModelSpec, max_batch: usize) -> Result<Graph> {
        if max_batch == 0 {
            return Err(Error::usage("--batch-size", "must be at least 1"));
        }
        if let Some(bad) = spec.hidden.iter().find(|&&h| h == 0) {
            return Err(Error::usage(
                "--hidden",
                format!("layer width {bad} must be at least 1"),
            ));
        }
        // Values, gradients and velocities each live in one packed allocation, in this order:
        // dense_0.kernel, dense_0.bias, dense_1.kernel, ..., so that a GPU kernel updating a
        // layer's weight and bias binds one buffer of each.
        let dims = spec.dense_dims();
        let shapes: Vec<(String, Vec<usize>)> = dims
            .iter()
            .enumerate()
            .flat_map(|(i, &(c, oc))| {
                [
                    (format!("dense_{i}.kernel"), vec![c, oc]),
                    (format!("dense_{i}.bias"), vec![oc]),
                ]
            })
            .collect();
        let lens: Vec<usize> = shapes.iter().map(|(_, s)| s.iter().product()).collect();
        let (values, grads, velocities) = (
            be.alloc_packed(&lens)?,
            be.alloc_packed(&lens)?,
            be.alloc_packed(&lens)?,
        );
        let params: Vec<Param> = shapes
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape))| Param {
                name,
                shape,
                value: values.parts[k],
                grad: grads.parts[k],
                velocity: velocities.parts[k],
            })
            .collect();
        let layers: Vec<Dense> = dims
            .iter()
            .enumerate()
            .map(|(i, &(c, oc))| Dense {
                kernel: 2 * i,
                bias: 2 * i + 1,
                c,
                oc,
                activation: if i + 1 < dims.len() {
                    Activation::Relu
                } else {
                    Activation::Linear
                },
            })
            .collect();
        // The products of a step: per layer forward (B, OC, C) and weight gradient (C, OC, B), past
        // the first the input gradient (B, C, OC).
        let products: Vec<(usize, usize, usize)> = layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                let mut p = vec![(max_batch, l.oc, l.c), (l.c, l.oc, max_batch)];
                if i > 0 {
                    p.push((max_batch, l.c, l.oc));
                }
                p
            })
            .collect();
        be.prepare(&products)?;
        let mut acts = vec![be.alloc(max_batch * spec.inputs)?];
        let mut dacts = vec![acts[0]];
        for layer in &layers {
            acts.push(be.alloc(max_batch * layer.oc)?);
            dacts.push(be.alloc(max_batch * layer.oc)?);
        }
        Ok(Graph {
            spec: spec.clone(),
            params,
            layers,
            acts,
            dacts,
            packed: [values, grads, velocities],
            max_batch,
        })
    }

    /// The input batch tensor (max_batch, 784).
    pub fn input(&self) -> TensorId {
        self.acts[0]
    }

    /// The logits tensor (max_batch, classes).
    pub fn logits(&self) -> TensorId {
        self.acts[self.acts.len() - 1]
    }

    /// Copy parameter values to the backend; names and shapes must match the graph's.
    pub fn set_params(&self, be: &mut dyn Backend, values: &[HostTensor]) -> Result<()> {
        self.write_part(be, ParamPart::Value, values)
    }

    /// Read the parameter values back from the backend.
    pub fn params_to_host(&self, be: &mut dyn Backend) -> Result<Vec<HostTensor>> {
        self.read_part(be, ParamPart::Value)
    }

    /// Read the gradients of the last backward pass (named like their parameters).
    pub fn grads_to_host(&self, be: &mut dyn Backend) -> Result<Vec<HostTensor>> {
        self.read_part(be, ParamPart::Grad)
    }

    /// Copy one part (values, gradients or velocities) of every parameter to the backend, in one
    /// write of the packed allocation.
    pub fn write_part(&self, be: &mut dyn Backend, part: ParamPart, values: &[HostTensor]) -> Result<()> {
        if values.len() != self.params.len() {
            let reason = format!("{} tensors for {} parameters", values.len(), self.params.len());
            return Err(Error::shape("set_params", reason));
        }
        let packed = &self.packed[part.index()];
        let mut whole = vec![0.0f32; packed.len];
        for ((p, v), &offset) in self.params.iter().zip(values).zip(&packed.offsets) {
            if p.name != v.name || p.shape != v.shape || v.data.len() != p.len() {
                let reason = format!("{} {:?} given for {} {:?}", v.name, v.shape, p.name, p.shape);
                return Err(Error::shape("set_params", reason));
            }
            whole[offset..offset + p.len()].copy_from_slice(&v.data);
        }
        be.write(packed.whole, &whole)
    }

    /// Read one part (values, gradients or velocities) of every parameter back from the backend,
    /// in one read of the packed allocation.
    pub fn read_part(&self, be: &mut dyn Backend, part: ParamPart) -> Result<Vec<HostTensor>> {
        let packed = &self.packed[part.index()];
        let whole = be.read(packed.whole)?;
        self.params
            .iter()
            .zip(&packed.offsets)
            .map(|(p, &offset)| {
                let data = whole.get(offset..offset + p.len()).ok_or_else(|| {
                    Error::shape(
                        "read_part",
                        format!(
                            "{} values read, {} needs {}..{}",
                            whole.len(),
                            p.name,
                            offset,
                            offset + p.len()
                        ),
                    )
                })?;
                Ok(HostTensor {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    data: data.to_vec(),
                })
            })
            .collect()
    }

    fn check_rows(&self, rows: usize) -> Result<()> {
        if rows == 0 || rows > self.max_batch {
            return Err(Error::shape(
                "graph",
                format!("batch of {rows} rows, buffers hold 1 to {}", self.max_batch),
            ));
        }
        Ok(())
    }

    /// Forward pass over the `rows` examples already in `input()`; logits land in `logits()`.
    pub fn forward(&self, be: &mut dyn Backend, rows: usize) -> Result<()> {
        self.forward_layers(be, rows, None, self.layers.len())
    }

    /// Forward pass over rows start..start+rows of `ds` (in its current order): the first layer
    /// gathers them into `input()` as it multiplies (`gather_matmul_forward`).
    pub fn forward_batch(&self, be: &mut dyn Backend, ds: DatasetId, start: usize, rows: usize) -> Result<()> {
        self.forward_layers(be, rows, Some((ds, start)), self.layers.len())
    }

    /// Run the first `count` layers.
    fn forward_layers(
        &self,
        be: &mut dyn Backend,
        rows: usize,
        gather: Option<(DatasetId, usize)>,
        count: usize,
    ) -> Result<()> {
        self.check_rows(rows)?;
        for (i, layer) in self.layers.iter().enumerate().take(count) {
            // acts[i] (rows, c) -> acts[i + 1] (rows, oc) = activation(acts[i] @ kernel + bias)
            let epilogue = Epilogue {
                bias: Some(self.params[layer.bias].value),
                relu: layer.activation == Activation::Relu,
                relu_mask: None,
            };
            let (out, inp, weight) = (self.acts[i + 1], self.acts[i], self.params[layer.kernel].value);
            match gather {
                Some((ds, start)) if i == 0 => {
                    be.gather_matmul_forward(out, inp, ds, start, weight, epilogue, rows, layer.oc)?
                }
                _ => be.matmul_forward(out, inp, weight, epilogue, rows, layer.c, layer.oc)?,
            }
        }
        Ok(())
    }

    /// Backward pass from the logits' gradient in dacts[last] and the optimizer step: fills every
    /// parameter's grad and updates its value (and velocity). Layer by layer from the last, the
    /// input gradient is taken before the weight gradient and update, which change the weights it
    /// reads.
    pub fn backward_update(&self, be: &mut dyn Backend, rows: usize, opt: &Optimizer) -> Result<()> {
        self.backward_layers(be, rows, opt, self.layers.len())
    }

    /// `backward_update` of the first `count` layers, from dacts[count].
    fn backward_layers(&self, be: &mut dyn Backend, rows: usize, opt: &Optimizer, count: usize) -> Result<()> {
        self.check_rows(rows)?;
        for (i, layer) in self.layers.iter().enumerate().take(count).rev() {
            // dout (rows, oc) -> dacts[i] (rows, c) for i > 0; dkernel (c, oc), dbias (oc), update
            let (inp, dout) = (self.acts[i], self.dacts[i + 1]);
            if i > 0 {
                // The previous layer's ReLU gradient, from its output: zero where it was clipped.
                let relu_mask = (self.layers[i - 1].activation == Activation::Relu).then_some(inp);
                let epilogue = Epilogue {
                    bias: None,
                    relu: false,
                    relu_mask,
                };
                be.matmul_backward_input(
                    self.dacts[i],
                    dout,
                    self.params[layer.kernel].value,
                    epilogue,
                    rows,
                    layer.c,
                    layer.oc,
                )?;
            }
            let (kernel, bias) = (self.params[layer.kernel].tensors(), self.params[layer.bias].tensors());
            be.matmul_backward_weight_update(kernel, bias, inp, dout, rows, layer.c, layer.oc, opt)?;
        }
        Ok(())
    }

    /// One training step on rows start..start+rows of `ds` (in its current order): forward (the
    /// first layer gathering the batch), fused loss (stats into `slot`), backward with the update.
    pub fn train_step(
        &self,
        be: &mut dyn Backend,
        ds: DatasetId,
        start: usize,
        rows: usize,
        slot: usize,
        opt: &Optimizer,
    ) -> Result<()> {
        let last = self.layers.len() - 1;
        if last == 0 {
            // No hidden layer: the output layer reads the gathered pixels and has no input gradient.
            self.forward_batch(be, ds, start, rows)?;
            be.softmax_xent_forward_backward(
                Some(self.dacts[1]),
                self.acts[1],
                ds,
                start,
                rows,
                self.spec.classes,
                slot,
            )?;
            return self.backward_update(be, rows, opt);
        }
        self.forward_layers(be, rows, Some((ds, start)), last)?;
        // acts[last] (rows, c) -> logits (rows, classes); the loss; dacts[last] (rows, c), update
        let layer = &self.layers[last];
        be.output_layer_step(
            &OutputLayerStep {
                weight: self.params[layer.kernel].tensors(),
                bias: self.params[layer.bias].tensors(),
                inp: self.acts[last],
                logits: self.acts[last + 1],
                dlogits: self.dacts[last + 1],
                dinp: self.dacts[last],
                ds,
                start,
                slot,
                b: rows,
                c: layer.c,
                classes: layer.oc,
            },
            opt,
        )?;
        self.backward_layers(be, rows, opt, last)
    }

    /// Forward and loss only (stats into `slot`), for evaluation.
    pub fn eval_step(&self, be: &mut dyn Backend, ds: DatasetId, start: usize, rows: usize, slot: usize) -> Result<()> {
        self.forward_batch(be, ds, start, rows)?;
        let last = self.acts.len() - 1;
        be.softmax_xent_forward_backward(None, self.acts[last], ds, start, rows, self.spec.classes, slot)
    }

    /// The most rows a batch may have.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}
