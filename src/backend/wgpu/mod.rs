//! The wgpu backend: every op of a training step as a WGSL compute kernel.
//!
//! Contract: implements `Backend` on one wgpu device. Ops are recorded into one command encoder
//! and one compute pass and submitted only at a synchronisation point (`read`, `request_stats`)
//! or before an upload, so a chunk of training steps is one submit with one read-back. Each op
//! family has a host module, named after its shader file, that checks an op's tensors and records
//! its dispatch: `gather`, `matmul` (every product of a dense or convolution layer, with its
//! epilogue and the fused optimizer step, whose encoding is in `optimizer`), `pool` (max pooling),
//! `softmax_xent` (the loss) and `output_layer` (the output layer's whole step in one dispatch,
//! used where the device binds 9 storage buffers). Datasets are uploaded once as u8
//! (4 pixels a word) with labels as u32; per epoch only the shuffled order is uploaded. All wgpu
//! calls of the crate live in this module and its children.

// Infrastructure: the device, buffers, pipelines, the recording of a chunk, profiling, the
// shaders' parameter blocks and text, and the matmul's tilings.
mod buffers;
mod context;
pub mod params;
mod pipelines;
mod profile;
mod recording;
mod shader_text;
mod tiling;

// One host module per shader family, named after its file in `shaders/`.
mod batch_norm;
mod dropout;
mod gather;
mod matmul;
mod optimizer;
mod output_layer;
mod pool;
mod softmax_xent;
mod update;

#[cfg(not(target_arch = "wasm32"))]
pub use context::list_adapters;
pub use context::AdapterSummary;
pub use shader_text::{expand_unrolls, fill_placeholders};
pub use tiling::TileConfig;

use std::collections::VecDeque;
use std::rc::Rc;

use buffers::{GpuBuffer, PendingRead, Slice};
use context::GpuContext;
use pipelines::{Kernel, Pipelines};
use profile::Profile;
use recording::{Bound, Recording};

use super::checks;
use super::ops::{self, run_unfused, Fusions, Op, StepAt};
use super::{Backend, Counters, DatasetId, DeviceLimits, Packed, Readback, StepStats, TensorId};
use crate::data::Dataset;
use crate::error::{Error, Result};

/// The fused output layer runs in one workgroup, whose time grows with the rows and the rows x
/// inputs: it takes batches of at most this many rows and 4x the reference job's 128 x 512 rows x
/// inputs; larger steps run the four dispatches.
const OUTPUT_LAYER_MAX_ROWS: usize = 1024;
/// One more than the highest binding number any shader uses (an unused output per number).
const MAX_BINDINGS: usize = 12;
const OUTPUT_LAYER_MAX_WORK: usize = 4 * 128 * 512;

/// Whether the output layer's step runs as one dispatch when `GPU_MNIST_OUTPUT_FUSION` does not
/// say: on software adapters, where it is faster than the four dispatches it replaces
/// (benches/llvmpipe.md); not on hardware GPUs, where it has not been timed yet.
fn default_output_layer_fusion(adapter: &AdapterSummary) -> bool {
    !adapter.is_hardware()
}

/// A tensor: `len` f32 values at byte `offset` of a buffer that other tensors may share (a packed
/// group, see `alloc_packed`).
struct GpuTensor {
    buf: Rc<GpuBuffer>,
    offset: u64,
    len: usize,
}

impl GpuTensor {
    fn slice(&self) -> Slice<'_> {
        Slice {
            buf: &self.buf,
            offset: self.offset,
            size: (self.len as u64 * 4).max(4),
        }
    }
}

struct GpuDataset {
    images: GpuBuffer,
    labels: GpuBuffer,
    order: GpuBuffer,
    len: usize,
}

pub struct WgpuBackend {
    ctx: GpuContext,
    pipelines: Pipelines,
    tensors: Vec<GpuTensor>,
    datasets: Vec<GpuDataset>,
    stats: Option<GpuBuffer>,
    stats_slots: usize,
    /// Bound as an unused read-only input (a matmul without bias or mask).
    dummy: GpuBuffer,
    /// Bound as unused outputs (`dlogits` when the loss op is asked not to write it, a matmul's
    /// `colsum`), one per binding number: separate from `dummy` and from each other, since
    /// WebGPU refuses a buffer bound twice in one dispatch when either binding is writable.
    dummy_out: Vec<GpuBuffer>,
    recording: Option<Recording>,
    counters: Counters,
    /// From `GpuSettings`: every `request_stats` from this read-back on reports a lost device.
    inject_loss_at: Option<u64>,
    /// Every matmul uses this tiling instead of `TileConfig::for_shape`'s (`GpuSettings`, or
    /// `set_matmul_tiles`).
    tiles_override: Option<TileConfig>,
    /// While set, each dispatch runs in a pass of its own that writes timestamps.
    profile: Option<Profile>,
    /// Run the output layer's step as one dispatch (output_layer.wgsl) instead of four, where
    /// the device can bind its buffers (`output_layer_fusion_available`).
    fuse_output_layer: bool,
    /// Statistics read-backs on their way (oldest first) and how many slots each holds.
    pending_stats: VecDeque<(buffers::PendingRead, usize)>,
    /// The optimizer's scalars of the steps around the current one (`optimizer::select_step`).
    step_table: Option<optimizer::StepTable>,
    /// Dropout's step of statistics slot 0 (`dropout::select_step_base`).
    step_base: Option<dropout::StepBase>,
    /// Read-back buffers no read is using, reused by the next one.
    free_staging: Vec<wgpu::Buffer>,
}

/// The GPU path's knobs, read from the environment by the caller (`settings`) and handed to
/// `WgpuBackend::open`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuSettings {
    /// One tiling for every matmul instead of `TileConfig::for_shape`'s.
    pub matmul_tiles: Option<TileConfig>,
    /// Run the output layer's step as one dispatch or not (None: the adapter's default, see
    /// `default_output_layer_fusion`).
    pub output_layer_fusion: Option<bool>,
    /// Testing aid: report a lost device from this read-back on, so that the recovery paths can
    /// be tested without a failing GPU.
    pub inject_device_loss: Option<u64>,
}

impl WgpuBackend {
    /// Open the best adapter matching `filter` (see `GpuContext::open_async`).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(filter: Option<&str>, hardware_only: bool, settings: &GpuSettings) -> Result<Self> {
        pollster::block_on(Self::open_async(filter, hardware_only, settings))
    }

    /// `open`, awaiting the device (what a browser must do).
    pub async fn open_async(filter: Option<&str>, hardware_only: bool, settings: &GpuSettings) -> Result<Self> {
        let ctx = GpuContext::open_async(filter, hardware_only).await?;
        let fuse_output_layer = settings
            .output_layer_fusion
            .unwrap_or_else(|| default_output_layer_fusion(&ctx.summary));
        let dummy = buffers::create(&ctx, 4, "unused input")?;
        let dummy_out = (0..MAX_BINDINGS)
            .map(|_| buffers::create(&ctx, 4, "unused output"))
            .collect::<Result<Vec<_>>>()?;
        Ok(WgpuBackend {
            ctx,
            pipelines: Pipelines::default(),
            tensors: Vec::new(),
            datasets: Vec::new(),
            stats: None,
            stats_slots: 0,
            dummy,
            dummy_out,
            recording: None,
            counters: Counters::default(),
            inject_loss_at: settings.inject_device_loss,
            tiles_override: settings.matmul_tiles,
            profile: None,
            fuse_output_layer,
            pending_stats: VecDeque::new(),
            free_staging: Vec::new(),
            step_table: None,
            step_base: None,
        })
    }

    /// Run the output layer's step as one dispatch or as four (see `fuse_output_layer`).
    pub fn set_output_layer_fusion(&mut self, fuse: bool) {
        self.fuse_output_layer = fuse;
    }

    /// Whether the fused output layer is asked for and the device has the storage buffers it binds.
    pub fn output_layer_fusion_available(&self) -> bool {
        self.fuse_output_layer
            && self.ctx.limits.max_storage_buffers_per_shader_stage >= context::OUTPUT_LAYER_STORAGE_BUFFERS
    }

    /// Make every matmul use `tiles` (None: choose per shape), for tests and tuning.
    pub fn set_matmul_tiles(&mut self, tiles: Option<TileConfig>) {
        self.tiles_override = tiles;
    }

    /// The adapter this backend runs on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.ctx.summary
    }

    fn tensor(&self, op: &'static str, t: TensorId, need: usize) -> Result<Slice<'_>> {
        let g = self
            .tensors
            .get(t.0)
            .ok_or_else(|| Error::shape(op, format!("no tensor {}", t.0)))?;
        if g.len < need {
            return Err(Error::shape(
                op,
                format!("tensor {} holds {} values, the op needs {need}", t.0, g.len),
            ));
        }
        Ok(g.slice())
    }

    fn dataset(&self, op: &'static str, ds: DatasetId, start: usize, rows: usize) -> Result<&GpuDataset> {
        let d = self
            .datasets
            .get(ds.0)
            .ok_or_else(|| Error::shape(op, format!("no dataset {}", ds.0)))?;
        checks::rows(op, start, rows, d.len)?;
        Ok(d)
    }

    /// `ids[0]` is written by the op: it must not share a buffer with any other binding (wgpu
    /// forbids a buffer bound both writable and read in one dispatch, whatever the ranges).
    fn distinct(&self, op: &'static str, ids: &[TensorId]) -> Result<()> {
        let written = self.tensors[ids[0].0].buf.id;
        if let Some(other) = ids[1..].iter().find(|t| self.tensors[t.0].buf.id == written) {
            return Err(Error::shape(
                op,
                format!("tensor {} shares its buffer with the output {}", other.0, ids[0].0),
            ));
        }
        Ok(())
    }

    fn max_groups(&self) -> u32 {
        self.ctx.limits.max_compute_workgroups_per_dimension
    }

    fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32> {
        u32::try_from(v).map_err(|_| Error::shape(op, format!("{what} = {v} does not fit the GPU's 32-bit indices")))
    }
}

impl WgpuBackend {
    /// The kernel an op dispatches (None for an op the device never runs alone).
    fn kernel_of(&self, op: &Op) -> Option<Kernel> {
        match op {
            Op::Gather(g) if g.augment.is_some() => Some(Kernel::GatherAugmented),
            Op::Gather(_) => Some(Kernel::Gather),
            Op::Matmul(m) => self.matmul_kernel(m).ok(),
            Op::Loss(_) => Some(Kernel::SoftmaxXent),
            Op::OutputLayer(_) => Some(Kernel::OutputLayer),
            Op::Pool(p) => Some(pool::kernel(p)),
            Op::Update(_) => Some(Kernel::Update),
            Op::Dropout(_) => Some(Kernel::Dropout),
            Op::BatchNorm(b) => Some(match b.kind {
                ops::BatchNormKind::Backward { .. } => Kernel::BatchNormBackwardInput,
                _ => Kernel::BatchNormForward,
            }),
            Op::PoolWeightGradient(_) | Op::ConvPool(_) => None,
        }
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> String {
        let s = &self.ctx.summary;
        format!("gpu '{}' ({}, {})", s.name, s.backend, s.device_type)
    }

    fn alloc(&mut self, len: usize) -> Result<TensorId> {
        let bytes = (len as u64)
            .checked_mul(4)
            .ok_or_else(|| Error::shape("alloc", format!("{len} values")))?;
        let buf = Rc::new(buffers::create(&self.ctx, bytes, "tensor")?);
        self.tensors.push(GpuTensor { buf, offset: 0, len });
        Ok(TensorId(self.tensors.len() - 1))
    }

    fn limits(&self) -> DeviceLimits {
        let binding = self
            .ctx
            .limits
            .max_storage_buffer_binding_size
            .min(self.ctx.limits.max_buffer_size);
        // A product's rows are tiled over the grid's y dimension, TM rows a workgroup (16 at the
        // least on a hardware GPU).
        let tm = match (self.tiles_override, self.ctx.summary.is_hardware()) {
            (Some(t), _) => t.tm,
            (None, true) => 16,
            (None, false) => TileConfig::SOFTWARE.tm,
        };
        DeviceLimits {
            tensor_len: usize::try_from(binding / 4).unwrap_or(usize::MAX),
            product_rows: self.max_groups() as usize * tm as usize,
            what: format!(
                "adapter '{}' ({} MiB a storage binding, {} workgroups of {tm} rows a product)",
                self.ctx.summary.name,
                binding >> 20,
                self.max_groups()
            ),
        }
    }

    fn alloc_packed(&mut self, lens: &[usize]) -> Result<Packed> {
        // Each part starts at a multiple of the device's binding-offset alignment.
        let align = (self.ctx.limits.min_storage_buffer_offset_alignment.max(4) / 4) as usize;
        let mut offsets = Vec::with_capacity(lens.len());
        let mut total = 0usize;
        for &len in lens {
            offsets.push(total);
            total = (total + len).div_ceil(align) * align;
        }
        let whole = self.alloc(total)?;
        let buf = self.tensors[whole.0].buf.clone();
        let parts = offsets
            .iter()
            .zip(lens)
            .map(|(&off, &len)| {
                self.tensors.push(GpuTensor {
                    buf: buf.clone(),
                    offset: off as u64 * 4,
                    len,
                });
                TensorId(self.tensors.len() - 1)
            })
            .collect();
        Ok(Packed {
            whole,
            len: total,
            parts,
            offsets,
        })
    }

    fn write(&mut self, t: TensorId, data: &[f32]) -> Result<()> {
        self.tensor("write", t, data.len())?;
        self.flush()?;
        let g = &self.tensors[t.0];
        self.ctx
            .queue
            .write_buffer(&g.buf.buffer, g.offset, bytemuck::cast_slice(data));
        self.counters.uploads += 1;
        Ok(())
    }

    fn read(&mut self, t: TensorId) -> Readback<'_, Vec<f32>> {
        Box::pin(async move {
            let len = self.tensor("read", t, 0).map(|_| self.tensors[t.0].len)?;
            let bytes = self.read_bytes(t, len as u64 * 4).await?;
            Ok(bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[..len * 4]))
        })
    }

    fn upload_dataset(&mut self, data: &Dataset) -> Result<DatasetId> {
        let n = data.len();
        Self::u32_of("upload_dataset", "dataset length", data.images.len())?;
        self.flush()?;
        let images = buffers::create(&self.ctx, data.images.len() as u64, "dataset images")?;
        let labels = buffers::create(&self.ctx, n as u64 * 4, "dataset labels")?;
        let order = buffers::create(&self.ctx, n as u64 * 4, "dataset order")?;
        // 784 pixels per image: the bytes are already whole little-endian u32 words.
        self.ctx.queue.write_buffer(&images.buffer, 0, &data.images);
        let labels32: Vec<u32> = data.labels.iter().map(|&l| l as u32).collect();
        self.ctx
            .queue
            .write_buffer(&labels.buffer, 0, bytemuck::cast_slice(&labels32));
        let identity: Vec<u32> = (0..n as u32).collect();
        self.ctx
            .queue
            .write_buffer(&order.buffer, 0, bytemuck::cast_slice(&identity));
        self.counters.uploads += 3;
        self.ctx.errors.check("uploading the dataset")?;
        self.datasets.push(GpuDataset {
            images,
            labels,
            order,
            len: n,
        });
        Ok(DatasetId(self.datasets.len() - 1))
    }

    fn set_order(&mut self, ds: DatasetId, order: &[u32]) -> Result<()> {
        let d = self.dataset("set_order", ds, 0, 0)?;
        checks::order(order, d.len)?;
        self.flush()?;
        self.ctx
            .queue
            .write_buffer(&self.datasets[ds.0].order.buffer, 0, bytemuck::cast_slice(order));
        self.counters.uploads += 1;
        Ok(())
    }

    fn reserve_stats(&mut self, slots: usize) -> Result<()> {
        if slots > self.stats_slots {
            self.flush()?;
            self.stats = Some(buffers::create(&self.ctx, slots as u64 * 8, "step statistics")?);
            self.stats_slots = slots;
        }
        Ok(())
    }

    fn fusions(&self) -> Fusions {
        let output_layer = self.output_layer_fusion_available();
        Fusions {
            weight_update: true,
            output_layer_max_rows: if output_layer { OUTPUT_LAYER_MAX_ROWS } else { 0 },
            output_layer_max_work: if output_layer { OUTPUT_LAYER_MAX_WORK } else { 0 },
            pool_weight_gradient: false,
        }
    }

    fn prepare(&mut self, ops: &[Op]) -> Result<()> {
        let mut kernels: Vec<Kernel> = ops.iter().filter_map(|op| self.kernel_of(op)).collect();
        kernels.sort_by_key(|k| k.label());
        kernels.dedup();
        self.pipelines.prepare(&self.ctx, &kernels)
    }

    fn run(&mut self, op: &Op, at: StepAt) -> Result<()> {
        match op {
            Op::Gather(g) => self.gather(g, at),
            Op::Matmul(m) => self.matmul(m, at),
            Op::Loss(l) => self.loss(l, at),
            Op::OutputLayer(o) if self.fusions().output_layer(o.shape, &o.opt) => self.output_layer(o, at),
            // An output layer the device does not run as one dispatch runs as its composition.
            Op::OutputLayer(_) => run_unfused(self, op, at),
            // Only the CPU's plans fuse a first layer with its pool.
            Op::PoolWeightGradient(_) | Op::ConvPool(_) => run_unfused(self, op, at),
            Op::Pool(p) => self.pool(p),
            // Weights step inside their gradient's kernel (the plan fuses those updates); a lone
            // update (batch normalisation's scale and offset) has a kernel of its own.
            Op::Update(u) => self.update(u, at),
            Op::Dropout(d) => self.dropout(d, at),
            Op::BatchNorm(b) => self.batch_norm(b),
        }
    }

    fn runs_behind_host(&self) -> bool {
        true
    }

    fn request_stats(&mut self, first: usize, count: usize) -> Result<()> {
        checks::stats_read(first, count, self.stats_slots)?;
        if self.inject_loss_at.is_some_and(|n| self.counters.readbacks + 1 >= n) {
            return Err(Error::Gpu(
                "the GPU device was lost (injected by GPU_MNIST_INJECT_DEVICE_LOSS)".to_string(),
            ));
        }
        let bytes = (count as u64 * 8).max(8);
        let capacity = (self.stats_slots as u64 * 8).max(bytes);
        let staging = self.take_staging(capacity);
        let index = self.submit(|me, encoder| {
            if let Some(stats) = &me.stats {
                encoder.copy_buffer_to_buffer(&stats.buffer, first as u64 * 8, &staging, 0, count as u64 * 8);
            }
        })?;
        let read = PendingRead::start(staging, bytes, index);
        self.pending_stats.push_back((read, count));
        self.counters.readbacks += 1;
        Ok(())
    }

    fn collect_stats(&mut self) -> Readback<'_, Vec<StepStats>> {
        Box::pin(async move {
            let (read, count) = self
                .pending_stats
                .pop_front()
                .ok_or_else(|| Error::shape("collect_stats", "no statistics were requested".to_string()))?;
            let (bytes, staging) = read.finish(&self.ctx).await?;
            self.free_staging.push(staging);
            let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes[..count * 8]);
            Ok(words
                .chunks_exact(2)
                .map(|w| StepStats {
                    loss_sum: f32::from_bits(w[0]),
                    correct: w[1],
                })
                .collect())
        })
    }

    fn sync(&mut self) -> Readback<'_, ()> {
        Box::pin(async move {
            self.flush()?;
            self.ctx.wait("waiting for the GPU")
        })
    }

    /// Time each of the next `dispatches` dispatches on the device (see `profile.rs`).
    fn start_profile(&mut self, dispatches: u32) -> Result<bool> {
        if !self.ctx.timestamps {
            return Ok(false);
        }
        self.flush()?;
        self.profile = Some(Profile::new(&self.ctx, dispatches)?);
        Ok(true)
    }

    fn finish_profile(&mut self) -> Readback<'_, Vec<(String, f64)>> {
        Box::pin(async move {
            let Some(profile) = self.profile.take() else {
                return Ok(Vec::new());
            };
            self.submit(|_, encoder| profile.resolve(encoder))?;
            profile.read(&self.ctx)
        })
    }

    fn counters(&self) -> Counters {
        let mut ids: Vec<(u64, u64)> = self.tensors.iter().map(|t| (t.buf.id, t.buf.buffer.size())).collect();
        ids.sort_unstable();
        ids.dedup();
        let tensors: u64 = ids.iter().map(|&(_, size)| size).sum();
        let datasets: u64 = self
            .datasets
            .iter()
            .map(|d| d.images.buffer.size() + d.labels.buffer.size() + d.order.buffer.size())
            .sum();
        let stats = self.stats.as_ref().map_or(0, |s| s.buffer.size());
        Counters {
            allocated_bytes: tensors + datasets + stats,
            ..self.counters
        }
    }
}
