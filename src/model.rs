//! The layer graph: the layers of a `ModelSpec` (dense, convolution, max pooling; ReLU after all
//! but the last) ending in a fused softmax + cross-entropy, run through any `Backend`.
//!
//! Contract: `Graph::new` allocates its parameters, gradients, optimizer state and activations on the
//! backend once, for batches of up to `max_batch` rows; a step then runs the ops of its plan
//! (`plan`), built and fused for the backend once per (kind, dataset, rows, optimizer) and cached, so that a
//! step dispatches ops and nothing else. Parameters are initialised as Keras does:
//! Glorot-uniform weights, zero biases.

use crate::backend::ops::StepAt;
use crate::backend::{Backend, DatasetId, Op, Packed, ParamTensors, TensorId};
use crate::error::{Error, Result};
use crate::optim::Optimizer;
use crate::plan::{self, LayerOp, LayerTensors, PlanKind};

use crate::backend::ops::{dropout, Augment};
pub use crate::spec::{glorot_init, layer_names, HostTensor, Layer, LayerSpec, ModelSpec, MAX_ACTIVATIONS, MAX_PARAMS};

/// A parameter on the backend: value, gradient and optimizer state (the moments of its
/// gradient, `ParamTensors`).
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: TensorId,
    pub grad: TensorId,
    pub velocity: TensorId,
    pub momentum: TensorId,
}

impl Param {
    /// Its value, gradient and velocity tensors.
    pub fn tensors(&self) -> ParamTensors {
        ParamTensors {
            value: self.value,
            grad: self.grad,
            velocity: self.velocity,
            momentum: self.momentum,
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The optimizer's state of every parameter on the host: the second and first moments of the
/// gradients (`ParamTensors`), each named like its parameter; empty where the optimizer keeps none
/// (RMSprop has no momenta).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimizerState {
    pub velocities: Vec<HostTensor>,
    pub momenta: Vec<HostTensor>,
}

/// Which tensor of a parameter: its value, its gradient, or a moment of the gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamPart {
    Value,
    Grad,
    Velocity,
    Momentum,
}

impl ParamPart {
    /// Index into `Graph::packed`.
    fn index(self) -> usize {
        self as usize
    }
}

/// Refuse, naming the layer, a batch one of whose layers does not fit the device (its output in
/// one tensor, its products' rows in one grid), before anything is allocated.
fn check_fits(be: &dyn Backend, spec: &ModelSpec, layers: &[Layer], max_batch: usize) -> Result<()> {
    let limits = be.limits();
    for (layer, name) in layers.iter().zip(layer_names(layers)) {
        // Rows of the layer's largest product: a convolution's input gradient (a row per input
        // pixel), a dense layer's batch.
        let rows = match layer {
            Layer::Conv { geometry: g, .. } => max_batch.saturating_mul(g.h * g.w),
            _ => max_batch,
        };
        let need = max_batch.saturating_mul(layer.out_len());
        if need > limits.tensor_len || rows > limits.product_rows {
            let reason = format!(
                "layer {name} of {} needs {need} values and products of up to {rows} rows for a batch of \
                 {max_batch}, more than {}",
                spec.describe(),
                limits.what
            );
            return Err(Error::usage("--batch-size", reason));
        }
    }
    Ok(())
}

/// What a cached plan was built for.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PlanKey {
    kind: PlanKind,
    ds: DatasetId,
    rows: usize,
    opt: Option<Optimizer>,
}

/// The rows a step takes from a resident dataset: `rows` of `ds`, from the step's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub ds: DatasetId,
    pub rows: usize,
}

/// The network on a backend, with buffers for batches of up to `max_batch` rows.
pub struct Graph {
    pub spec: ModelSpec,
    pub params: Vec<Param>,
    /// Each layer's tensors (dense, convolution, pooling), in order.
    layers: Vec<LayerTensors>,
    /// The packed allocations of the values, gradients, velocities and momenta (in `ParamPart`
    /// order), so that reading or writing one part of every parameter is one transfer.
    packed: [Packed; 4],
    /// The plans built so far, fused for the backend.
    plans: Vec<(PlanKey, Vec<Op>)>,
    /// How training batches are augmented (None: as they are).
    augment: Option<Augment>,
    max_batch: usize,
}

impl Graph {
    /// Allocate everything the graph needs on `be`. Parameters start at zero: call `set_params`.
    pub fn new(be: &mut dyn Backend, spec: &ModelSpec, max_batch: usize) -> Result<Graph> {
        if max_batch == 0 {
            return Err(Error::usage("--batch-size", "must be at least 1"));
        }
        let resolved = spec.resolve()?;
        check_fits(be, spec, &resolved, max_batch)?;
        // Values, gradients, velocities and momenta each live in one packed allocation, in layer
        // order (each layer's kernel, then its bias), so that a GPU kernel updating a layer's
        // weight and bias binds one buffer of each.
        let shapes = spec.param_shapes()?;
        let lens: Vec<usize> = shapes.iter().map(|(_, s)| s.iter().product()).collect();
        let packed = [
            be.alloc_packed(&lens)?,
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
                momentum: packed[3].parts[k],
            })
            .collect();
        // Activations: the batch (max_batch, 28, 28, 1), then each layer's output and the
        // gradient with respect to it.
        let mut inp = be.alloc(max_batch * crate::data::IMAGE_PIXELS)?;
        let mut layers: Vec<LayerTensors> = Vec::with_capacity(resolved.len());
        // Each layer takes its parameters in order: a conv or dense layer its weight and bias,
        // a batch normalisation its four.
        let mut next_params = params.iter().map(Param::tensors);
        for (index, layer) in resolved.into_iter().enumerate() {
            let n = max_batch * layer.out_len();
            let (out, dout) = (be.alloc(n)?, be.alloc(n)?);
            let mut take = || {
                next_params
                    .next()
                    .ok_or_else(|| Error::shape("graph", "a layer without its parameters".to_string()))
            };
            let mut next = || Ok::<_, Error>((take()?, take()?));
            let op = match layer {
                Layer::Pool { shape } => LayerOp::Pool { shape },
                Layer::BatchNorm { channels, len, .. } => {
                    let (gamma, beta) = next()?;
                    let (moving_mean, moving_variance) = next()?;
                    LayerOp::BatchNorm {
                        gamma,
                        beta,
                        moving_mean: moving_mean.value,
                        moving_variance: moving_variance.value,
                        stats: be.alloc(2 * channels)?,
                        channels,
                        len,
                    }
                }
                Layer::Dropout { len, rate } => LayerOp::Dropout {
                    len,
                    rate,
                    key: dropout::layer_key(0, index),
                },
                Layer::Conv { geometry, filters, .. } => {
                    let (weight, bias) = next()?;
                    LayerOp::Conv {
                        weight,
                        bias,
                        geometry,
                        filters,
                    }
                }
                Layer::Dense { inputs, outputs, .. } => {
                    let (weight, bias) = next()?;
                    LayerOp::Dense {
                        weight,
                        bias,
                        inputs,
                        outputs,
                    }
                }
            };
            // A layer's input gradient is the gradient of the previous layer's output.
            let dinp = layers.last().map(|l| l.dout);
            let relu = layer.relu();
            layers.push(LayerTensors {
                op,
                inp,
                out,
                dout,
                dinp,
                relu,
            });
            inp = out;
        }
        Ok(Graph {
            spec: spec.clone(),
            params,
            layers,
            packed,
            plans: Vec::new(),
            augment: None,
            max_batch,
        })
    }

    /// Draw dropout's masks from `seed` (they start from seed 0): the run's seed, so that a
    /// seeded run drops the same values every time.
    pub fn set_seed(&mut self, seed: u64) {
        for (index, l) in self.layers.iter_mut().enumerate() {
            if let LayerOp::Dropout { key, .. } = &mut l.op {
                *key = dropout::layer_key(seed, index);
            }
        }
        self.plans.clear();
    }

    /// Augment every training batch with `augment` from now on (evaluation never is).
    pub fn set_augment(&mut self, augment: Option<Augment>) {
        self.augment = augment;
        self.plans.clear();
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

    /// Copy one part (values, gradients, velocities or momenta) of every parameter to the backend, in one
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

    /// Read one part (values, gradients, velocities or momenta) of every parameter back from the backend,
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
        Batch { ds, rows }: Batch,
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
            (PlanKind::Train, Some(opt)) => {
                let ops = plan::train_ops(&self.layers, key.ds, key.rows, opt);
                match self.augment {
                    Some(augment) => plan::augmented(ops, augment),
                    None => ops,
                }
            }
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
        Batch { ds, rows }: Batch,
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
    pub fn train_step(&mut self, be: &mut dyn Backend, batch: Batch, at: StepAt, opt: &Optimizer) -> Result<()> {
        self.step(be, PlanKind::Train, batch, at, Some(*opt))
    }

    /// Forward and loss only (statistics into `at.slot`), for evaluation.
    pub fn eval_step(&mut self, be: &mut dyn Backend, batch: Batch, at: StepAt) -> Result<()> {
        self.step(be, PlanKind::Evaluate, batch, at, None)
    }

    /// The layers' tensors, in order.
    pub fn layers(&self) -> &[LayerTensors] {
        &self.layers
    }

    /// The most rows a batch may have.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}
