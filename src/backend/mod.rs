//! The backend interface: the ops of a training step over device-resident tensors.
//!
//! Contract: the layer graph (`model`), its plans (`plan`) and the training loop (`train`) are
//! written once against `Backend`; the CPU reference, the fast CPU path and the wgpu device
//! implement it. Tensors are flat f32 buffers named by `TensorId`; the ops of a step are typed
//! values (`ops::Op`) with their shapes by name, and each implementation checks an op's tensors
//! before it runs it. An op may run at once (CPU) or be recorded for later submission (GPU):
//! results are only guaranteed visible through `read` and `collect_stats`, the synchronisation
//! points, which return futures (`Readback`): the one place where a caller waits for a device. A
//! native caller blocks on them (`pollster`); a browser awaits them.

mod checks;
pub mod cpu;
pub mod ops;
pub mod reference;
pub mod wgpu;

use crate::data::Dataset;
use std::future::Future;
use std::pin::Pin;

use crate::error::Result;

pub use ops::{Fusions, Op, StepAt};

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

/// The tensors of one parameter: its value, its gradient and the optimizer's state of it: the
/// second moment of the gradient (`velocity`: RMSprop's, Adam's v) and the first (`momentum`:
/// SGD's momentum buffer, Adam's m), named as Keras names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamTensors {
    pub value: TensorId,
    pub grad: TensorId,
    pub velocity: TensorId,
    pub momentum: TensorId,
}

/// The state of a parameter the optimizer changes: its value and the moments of its gradient
/// (see `ParamTensors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamState {
    pub value: TensorId,
    pub velocity: TensorId,
    pub momentum: TensorId,
}

impl ParamState {
    /// The parameter's tensors with gradient `grad`.
    pub fn with_grad(self, grad: TensorId) -> ParamTensors {
        ParamTensors {
            value: self.value,
            grad,
            velocity: self.velocity,
            momentum: self.momentum,
        }
    }
}

impl ParamTensors {
    /// What the optimizer changes.
    pub fn state(self) -> ParamState {
        ParamState {
            value: self.value,
            velocity: self.velocity,
            momentum: self.momentum,
        }
    }
}

/// Loss and accuracy of one batch, summed over its rows (written by the fused loss op).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Sum over the batch of the per-example cross-entropy.
    pub loss_sum: f32,
    /// Number of rows whose arg-max equals the label.
    pub correct: u32,
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

/// What `Backend::limits` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLimits {
    /// The most f32 values one tensor may hold.
    pub tensor_len: usize,
    /// The most rows (M) one product may have.
    pub product_rows: usize,
    /// The device, for errors.
    pub what: String,
}

/// A result that may wait for the device: the futures of `Backend::read`, `collect_stats`,
/// `sync` and `finish_profile`.
pub type Readback<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + 'a>>;

/// A result that is ready now, as a `Readback` (what the CPU backends return).
pub fn ready<'a, T: 'a>(result: Result<T>) -> Readback<'a, T> {
    Box::pin(std::future::ready(result))
}

/// The operations of a device. See the module contract.
pub trait Backend {
    /// A human-readable name of the device, e.g. "cpu (sparse + avx512 gemm, 2 threads)".
    fn name(&self) -> String;

    /// A zero-filled tensor of `len` f32 values.
    fn alloc(&mut self, len: usize) -> Result<TensorId>;
    /// Zero-filled tensors of the given lengths packed into one allocation, and `whole`, a tensor
    /// covering all of them (and any zero padding between them): the layer graph keeps its
    /// parameters, gradients and velocities this way, so that one transfer moves every parameter
    /// and a fused kernel updates a layer's weight and bias through one binding.
    fn alloc_packed(&mut self, lens: &[usize]) -> Result<Packed>;
    /// The largest tensor and product this backend runs (a GPU's largest storage binding and
    /// workgroup grid), so that a model too large for it is refused before anything is allocated.
    fn limits(&self) -> DeviceLimits {
        DeviceLimits {
            tensor_len: usize::MAX,
            product_rows: usize::MAX,
            what: "memory".to_string(),
        }
    }
    /// Copy `data` into the start of `t`.
    fn write(&mut self, t: TensorId, data: &[f32]) -> Result<()>;
    /// Wait for pending work and return the whole of `t`.
    fn read(&mut self, t: TensorId) -> Readback<'_, Vec<f32>>;

    /// Make a dataset resident (once); its visiting order starts as the identity.
    fn upload_dataset(&mut self, data: &Dataset) -> Result<DatasetId>;
    /// Set the visiting order of `ds` (a permutation of 0..len), once per epoch.
    fn set_order(&mut self, ds: DatasetId, order: &[u32]) -> Result<()>;
    /// Make room for `slots` step statistics (the most steps between two read-backs of them).
    fn reserve_stats(&mut self, slots: usize) -> Result<()>;

    /// The fused ops this backend runs as one kernel (`plan::fuse` merges only those).
    fn fusions(&self) -> Fusions;
    /// Get ready to run these ops (the GPU compiles their pipelines at once, in parallel, so
    /// that the first step does not wait for them one by one).
    fn prepare(&mut self, ops: &[Op]) -> Result<()> {
        let _ = ops;
        Ok(())
    }
    /// Run (or record) one op of the step at `at`.
    fn run(&mut self, op: &Op, at: StepAt) -> Result<()>;

    /// Submit the work issued so far and start copying step statistics `first..first + count`
    /// back, without waiting: `collect_stats` returns them. The training loop records the next
    /// chunk of steps meanwhile, so the device never waits for the host between chunks.
    fn request_stats(&mut self, first: usize, count: usize) -> Result<()>;
    /// The statistics of the oldest `request_stats` not yet collected, once they have arrived.
    fn collect_stats(&mut self) -> Readback<'_, Vec<StepStats>>;
    /// Whether ops run after they are issued (a GPU), so that the host gains by issuing the next
    /// chunk of steps before it collects the last one's statistics.
    fn runs_behind_host(&self) -> bool {
        false
    }
    /// Finish every op issued so far (for timing).
    fn sync(&mut self) -> Readback<'_, ()>;
    /// What the backend has done so far.
    fn counters(&self) -> Counters;

    /// Start timing each of the next `ops` dispatches on the device (for `bench`); false where
    /// the backend cannot.
    fn start_profile(&mut self, ops: u32) -> Result<bool> {
        let _ = ops;
        Ok(false)
    }
    /// The profiled dispatches: (kernel, device microseconds) of each since `start_profile`.
    fn finish_profile(&mut self) -> Readback<'_, Vec<(String, f64)>> {
        ready(Ok(Vec::new()))
    }
}

/// The first `slots` step statistics, once every op issued so far has run (with no other
/// `request_stats` pending).
pub async fn read_stats(be: &mut dyn Backend, slots: usize) -> Result<Vec<StepStats>> {
    be.request_stats(0, slots)?;
    be.collect_stats().await
}
