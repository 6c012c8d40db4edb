//! The layer graph: Dense layers (ReLU-activated, the last linear) ending in a fused softmax +
//! cross-entropy, run through any `Backend`.
//!
//! Contract: `ModelSpec` describes an MLP 784 -> hidden... -> 10 (ReLU after every hidden Dense);
//! `Graph::new` allocates its parameters, gradients, optimizer state and activations on the
//! backend once, for batches of up to `max_batch` rows; a step then runs the ops of its plan
//! (`plan`), built and fused for the backend once per (kind, dataset, rows) and cached, so that a
//! step dispatches ops and nothing else. Parameters are initialised as Keras does:
//! Glorot-uniform weights, zero biases.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::ops::StepAt;
use crate::backend::{Backend, DatasetId, Op, Packed, ParamTensors, TensorId};
use crate::data::{CLASSES, IMAGE_PIXELS};
use crate::error::{Error, Result};
use crate::optim::Optimizer;
use crate::plan::{self, LayerTensors, PlanKind};

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

/// What a cached plan was built for.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PlanKey {
    kind: PlanKind,
    ds: DatasetId,
    rows: usize,
    opt: Option<Optimizer>,
}

/// The network on a backend, with buffers for batches of up to `max_batch` rows.
pub struct Graph {
    pub spec: ModelSpec,
    pub params: Vec<Param>,
    /// Each dense layer's tensors, in order.
    layers: Vec<LayerTensors>,
    /// The packed allocations of the values, gradients and velocities (in `ParamPart` order), so
    /// that reading or writing one part of every parameter is one transfer.
    packed: [Packed; 3],
    /// The plans built so far, fused for the backend.
    plans: Vec<(PlanKey, Vec<Op>)>,
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
        let packed = [
            be.alloc_packed(&lens)?,
            be.alloc_packed(&lens)?,
            be.alloc_packed(&lens)?,
        ];
        let params: Vec<Param> = shapes
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape))| Param {
                name,
                shape,
                value: packed[0].parts[k],
                grad: packed[1].parts[k],
                velocity: packed[2].parts[k],
            })
            .collect();
        // Activations: the batch (max_batch, 784), then each layer's output (max_batch, oc) and
        // the gradient with respect to it.
        let mut inp = be.alloc(max_batch * spec.inputs)?;
        let mut layers: Vec<LayerTensors> = Vec::with_capacity(dims.len());
        for (i, &(c, oc)) in dims.iter().enumerate() {
            let (out, dout) = (be.alloc(max_batch * oc)?, be.alloc(max_batch * oc)?);
            // Layer i's input gradient is the gradient of layer i - 1's output.
            let dinp = (i > 0).then(|| layers[i - 1].dout);
            layers.push(LayerTensors {
                weight: params[2 * i].tensors(),
                bias: params[2 * i + 1].tensors(),
                inputs: c,
                outputs: oc,
                inp,
                out,
                dout,
                dinp,
                relu: i + 1 < dims.len(),
            });
            inp = out;
        }
        Ok(Graph {
            spec: spec.clone(),
            params,
            layers,
            packed,
            plans: Vec::new(),
            max_batch,
        })
    }

    /// The input batch tensor (max_batch, 784).
    pub fn input(&self) -> TensorId {
        self.layers[0].inp
    }

    /// The logits tensor (max_batch, classes).
    pub fn logits(&self) -> TensorId {
        self.layers[self.layers.len() - 1].out
    }

    /// Copy parameter values to the backend; names and shapes must match the graph's.
    pub fn set_params(&self, be: &mut dyn Backend, values: &[HostTensor]) -> Result<()> {
        self.write_part(be, ParamPart::Value, values)
    }

    /// Read the parameter values back from the backend.
    pub async fn params_to_host(&self, be: &mut dyn Backend) -> Result<Vec<HostTensor>> {
        self.read_part(be, ParamPart::Value).await
    }

    /// Read the gradients of the last backward pass (named like their parameters).
    pub async fn grads_to_host(&self, be: &mut dyn Backend) -> Result<Vec<HostTensor>> {
        self.read_part(be, ParamPart::Grad).await
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
    pub async fn read_part(&self, be: &mut dyn Backend, part: ParamPart) -> Result<Vec<HostTensor>> {
        let packed = &self.packed[part.index()];
        let whole = be.read(packed.whole).await?;
        self.params
            .iter()
            .zip(&packed.offsets)
            .map(|(p, &offset)| {
                let data = whole.get(offset..offset + p.len()).ok_or_else(|| {
                    let reason = format!(
                        "{} values read, {} needs {offset}..{}",
                        whole.len(),
                        p.name,
                        offset + p.len()
                    );
                    Error::shape("read_part", reason)
                })?;
                Ok(HostTensor {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    data: data.to_vec(),
                })
            })
            .collect()
    }

    /// The plan of a step of `kind` over `rows` rows of `ds` (with `opt` when training), built
    /// and fused for `be` the first time it is asked for, its kernels prepared.
    pub fn plan(
        &mut self,
        be: &mut dyn Backend,
        kind: PlanKind,
        (ds, rows): (DatasetId, usize),
        opt: Option<Optimizer>,
    ) -> Result<&[Op]> {
        let index = self.plan_index(be, PlanKey { kind, ds, rows, opt })?;
        Ok(&self.plans[index].1)
    }

    fn plan_index(&mut self, be: &mut dyn Backend, key: PlanKey) -> Result<usize> {
        if key.rows == 0 || key.rows > self.max_batch {
            return Err(Error::shape(
                "graph",
                format!("batch of {} rows, buffers hold 1 to {}", key.rows, self.max_batch),
            ));
        }
        if let Some(i) = self.plans.iter().position(|(k, _)| *k == key) {
            return Ok(i);
        }
        let ops = match (key.kind, key.opt) {
            (PlanKind::Train, Some(opt)) => plan::train_ops(&self.layers, key.ds, key.rows, opt),
            (PlanKind::Train, None) => {
                return Err(Error::shape("graph", "a training plan needs an optimizer".to_string()))
            }
            (kind, _) => plan::eval_ops(&self.layers, key.ds, key.rows, kind),
        };
        let ops = plan::fuse(ops, be.fusions());
        be.prepare(&ops)?;
        self.plans.push((key, ops));
        Ok(self.plans.len() - 1)
    }

    /// Run the plan of `kind` for the step at `at` (rows at.start.. of `ds`).
    pub fn step(
        &mut self,
        be: &mut dyn Backend,
        kind: PlanKind,
        (ds, rows): (DatasetId, usize),
        at: StepAt,
        opt: Option<Optimizer>,
    ) -> Result<()> {
        let index = self.plan_index(be, PlanKey { kind, ds, rows, opt })?;
        for op in &self.plans[index].1 {
            be.run(op, at)?;
        }
        Ok(())
    }

    /// One training step on rows start..start+rows of `ds` (in its current order): forward, the
    /// loss (statistics into `slot`), backward and the optimizer step.
    pub fn train_step(
        &mut self,
        be: &mut dyn Backend,
        (ds, rows): (DatasetId, usize),
        at: StepAt,
        opt: &Optimizer,
    ) -> Result<()> {
        self.step(be, PlanKind::Train, (ds, rows), at, Some(*opt))
    }

    /// Forward and loss only (statistics into `at.slot`), for evaluation.
    pub fn eval_step(&mut self, be: &mut dyn Backend, (ds, rows): (DatasetId, usize), at: StepAt) -> Result<()> {
        self.step(be, PlanKind::Evaluate, (ds, rows), at, None)
    }

    /// The most rows a batch may have.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}
