//! The wgpu backend: every op of the training step as a WGSL compute kernel.
//!
//! Contract: implements `Backend` on one wgpu device. Ops are recorded into one command encoder
//! and one compute pass and submitted only at a synchronisation point (`read`, `request_stats`)
//! or before an upload, so a chunk of training steps is one submit with one read-back. Several
//! ops of the graph run fused into one matmul dispatch (see `Fusions` and shaders/matmul.wgsl),
//! and with `GPU_MNIST_OUTPUT_FUSION=1` the output layer's whole step is one dispatch
//! (shaders/output_layer.wgsl). Datasets are uploaded once as u8 (4 pixels a word) with labels as
//! u32; per epoch only the shuffled order is uploaded. All wgpu calls of the crate live in this
//! module and its children.

mod buffers;
mod context;
mod kernels;
mod profile;

pub use context::{list_adapters, AdapterSummary};

use std::collections::VecDeque;
use std::rc::Rc;

use buffers::{GpuBuffer, PendingRead, Slice};
use context::GpuContext;
pub use kernels::TileConfig;
use kernels::{bits, grid_1d, Kernel, Kernels, ParamWords};
use profile::Profile;

use super::checks;
use super::{Backend, Counters, DatasetId, Epilogue, OutputLayerStep, Packed, ParamTensors, StepStats, TensorId};
use crate::data::{Dataset, IMAGE_PIXELS};
use crate::error::{Error, Result};
use crate::optim::{Optimizer, OptimizerKind};

/// The largest batch the fused output layer takes, and the most (rows x inputs): it runs in one
/// workgroup, whose time grows with both (4x the reference job's 128 x 512 at most); larger
/// steps run the four dispatches.
const OUTPUT_LAYER_MAX_ROWS: usize = 1024;
const OUTPUT_LAYER_MAX_WORK: usize = 4 * 128 * 512;

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

/// The encoder being recorded and its open compute pass.
struct Recording {
    encoder: wgpu::CommandEncoder,
    pass: Option<wgpu::ComputePass<'static>>,
}

pub struct WgpuBackend {
    ctx: GpuContext,
    kernels: Kernels,
    tensors: Vec<GpuTensor>,
    datasets: Vec<GpuDataset>,
    stats: Option<GpuBuffer>,
    stats_slots: usize,
    /// Bound as an unused read-only input (a matmul without bias or mask).
    dummy: GpuBuffer,
    /// Bound as an unused output (`dlogits` when the loss op is asked not to write it, a matmul's
    /// `colsum`): separate from `dummy`, since wgpu refuses a buffer bound both read and written.
    dummy_out: GpuBuffer,
    recording: Option<Recording>,
    counters: Counters,
    /// Testing aid: `GPU_MNIST_INJECT_DEVICE_LOSS=N` makes every `read_stats` from the N-th
    /// read-back on report a lost device, to exercise the recovery paths without a failing GPU.
    inject_loss_at: Option<u64>,
    /// Tuning aid: every matmul uses this tiling instead of `TileConfig::for_shape`'s
    /// (`GPU_MNIST_MATMUL_TILES=TM,TN,KC,S`, or `set_matmul_tiles`).
    tiles_override: Option<TileConfig>,
    /// While set, each dispatch runs in a pass of its own that writes timestamps.
    profile: Option<Profile>,
    /// Gather the first layer's batch inside its product (`GPU_MNIST_GATHER_FUSION=1`) instead of
    /// in a dispatch of its own: one dispatch fewer, but measured slower on an H200 (an epoch in
    /// 0.046 s against 0.039 s: the product's loads wait on the order and then the pixels).
    fuse_gather: bool,
    /// Run the output layer's step as one dispatch (output_layer.wgsl) instead of four
    /// (`GPU_MNIST_OUTPUT_FUSION=1`, or `set_output_layer_fusion`). Off by default: written
    /// without a hardware GPU to time it on; the H200 profile puts the four at 48 us of 105.
    fuse_output_layer: bool,
    /// Statistics read-backs on their way (oldest first) and how many slots each holds.
    pending_stats: VecDeque<(buffers::PendingRead, usize)>,
    /// Read-back buffers no read is using, reused by the next one.
    free_staging: Vec<wgpu::Buffer>,
}

impl WgpuBackend {
    /// Open the best adapter matching `filter` (see `GpuContext::open`).
    pub fn open(filter: Option<&str>, hardware_only: bool) -> Result<Self> {
        let ctx = GpuContext::open(filter, hardware_only)?;
        let tiles_override = match std::env::var("GPU_MNIST_MATMUL_TILES") {
            Ok(v) if !v.is_empty() => {
                Some(TileConfig::parse(&v).map_err(|e| Error::Gpu(format!("GPU_MNIST_MATMUL_TILES: {e}")))?)
            }
            _ => None,
        };
        let dummy = buffers::create(&ctx, 4, "unused input")?;
        let dummy_out = buffers::create(&ctx, 4, "unused output")?;
        Ok(WgpuBackend {
            ctx,
            kernels: Kernels::default(),
            tensors: Vec::new(),
            datasets: Vec::new(),
            stats: None,
            stats_slots: 0,
            dummy,
            dummy_out,
            recording: None,
            counters: Counters::default(),
            inject_loss_at: std::env::var("GPU_MNIST_INJECT_DEVICE_LOSS")
                .ok()
                .and_then(|v| v.parse().ok()),
            tiles_override,
            profile: None,
            fuse_gather: std::env::var("GPU_MNIST_GATHER_FUSION").as_deref() == Ok("1"),
            fuse_output_layer: std::env::var("GPU_MNIST_OUTPUT_FUSION").as_deref() == Ok("1"),
            pending_stats: VecDeque::new(),
            free_staging: Vec::new(),
        })
    }

    /// The tiling of an (m, n, k) product: the override, else the H200-tuned choice per shape on a
    /// hardware GPU, else (a software adapter: CPU threads run the workgroups, and each barrier
    /// costs them a switch) one 64x64 slice per workgroup, measured fastest on llvmpipe.
    fn tiles_for(&self, m: usize, n: usize, k: usize) -> TileConfig {
        match self.tiles_override {
            Some(t) => t,
            None if self.ctx.summary.is_hardware() => TileConfig::for_shape(m, n, k),
            None => TileConfig::SOFTWARE,
        }
    }

    /// Gather the first layer's batch inside its product or not (see `fuse_gather`).
    pub fn set_gather_fusion(&mut self, fuse: bool) {
        self.fuse_gather = fuse;
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

    /// Whether `output_layer_step` runs `s` as one dispatch: available, and a step the single
    /// workgroup handles in reasonable time.
    fn fuses_output_layer(&self, s: &OutputLayerStep) -> bool {
        self.output_layer_fusion_available() && s.b <= OUTPUT_LAYER_MAX_ROWS && s.b * s.c <= OUTPUT_LAYER_MAX_WORK
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

    /// Record one dispatch, opening an encoder and pass if none is open.
    fn record(&mut self, kernel: Kernel, words: &[u32], bind: &[(u32, Bound)], grid: (u32, u32, u32)) -> Result<()> {
        let mut params: ParamWords = [0; 16];
        params[..words.len()].copy_from_slice(words);
        let recording = self.recording.get_or_insert_with(|| Recording {
            encoder: self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("steps") }),
            pass: None,
        });
        if recording.pass.is_none() || self.profile.is_some() {
            // One pass for everything, or, while profiling, one pass per dispatch.
            drop(recording.pass.take());
            let timestamp_writes = self.profile.as_mut().and_then(|p| p.next(kernel.label()));
            let pass = recording
                .encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("steps"),
                    timestamp_writes,
                })
                .forget_lifetime();
            recording.pass = Some(pass);
        }
        let buffers: Vec<(u32, Slice)> = bind
            .iter()
            .map(|&(binding, b)| {
                let slice = match b {
                    Bound::Tensor(t) => self.tensors[t.0].slice(),
                    Bound::Images(d) => self.datasets[d.0].images.whole(),
                    Bound::Labels(d) => self.datasets[d.0].labels.whole(),
                    Bound::Order(d) => self.datasets[d.0].order.whole(),
                    // Callers check the slot against stats_slots, so stats exists here.
                    Bound::Stats => self.stats.as_ref().unwrap_or(&self.dummy).whole(),
                    Bound::Dummy => self.dummy.whole(),
                    Bound::DummyOut => self.dummy_out.whole(),
                    Bound::BufferOf(t) => self.tensors[t.0].buf.whole(),
                };
                (binding, slice)
            })
            .collect();
        let pass = recording
            .pass
            .as_mut()
            .ok_or_else(|| Error::Gpu("no open compute pass".to_string()))?;
        self.kernels.dispatch(&self.ctx, pass, kernel, params, &buffers, grid)?;
        self.counters.dispatches += 1;
        Ok(())
    }

    /// Close the pass, let `copy` add copies, and submit everything recorded.
    fn submit(&mut self, copy: impl FnOnce(&mut Self, &mut wgpu::CommandEncoder)) -> Result<wgpu::SubmissionIndex> {
        let mut encoder = match self.recording.take() {
            Some(mut r) => {
                drop(r.pass.take());
                r.encoder
            }
            None => self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("copy") }),
        };
        copy(self, &mut encoder);
        let index = self.ctx.queue.submit([encoder.finish()]);
        self.counters.submits += 1;
        self.ctx.errors.check("running the recorded GPU work")?;
        Ok(index)
    }

    /// Submit pending work (if any) so that a queue write lands after it.
    fn flush(&mut self) -> Result<()> {
        if self.recording.is_some() {
            self.submit(|_, _| {})?;
        }
        Ok(())
    }

    /// Submit pending work with a copy of `buf`'s first `bytes` and return them.
    /// A free read-back buffer of at least `bytes`, or a new one.
    fn take_staging(&mut self, bytes: u64) -> wgpu::Buffer {
        match self.free_staging.iter().position(|b| b.size() >= bytes) {
            Some(i) => self.free_staging.swap_remove(i),
            None => buffers::create_staging(&self.ctx, bytes),
        }
    }

    /// Submit pending work with a copy of the first `bytes` of tensor `t`; wait and return them.
    fn read_bytes(&mut self, t: TensorId, bytes: u64) -> Result<Vec<u8>> {
        let bytes = bytes.max(4);
        let staging = self.take_staging(bytes);
        let index = self.submit(|me, encoder| {
            let src = me.tensors[t.0].slice();
            encoder.copy_buffer_to_buffer(&src.buf.buffer, src.offset, &staging, 0, bytes.min(src.size));
        })?;
        let (data, staging) = PendingRead::start(staging, bytes, index).finish(&self.ctx)?;
        self.free_staging.push(staging);
        self.counters.readbacks += 1;
        Ok(data)
    }

    /// A weight (`c * n` values) and its bias (`n`) that a fused optimizer step updates through
    /// one binding of their packed buffer: checked to be that long and to share the buffer;
    /// returns their offsets in it in f32 words, which the shaders index by.
    fn packed_pair(&self, op: &'static str, weight: TensorId, bias: TensorId, c: usize, n: usize) -> Result<[u32; 2]> {
        self.tensor(op, weight, c * n)?;
        self.tensor(op, bias, n)?;
        if self.tensors[weight.0].buf.id != self.tensors[bias.0].buf.id {
            return Err(Error::shape(
                op,
                "the weight and the bias must share a packed buffer (alloc_packed)".to_string(),
            ));
        }
        let word = |t: TensorId| Self::u32_of(op, "a parameter offset", (self.tensors[t.0].offset / 4) as usize);
        Ok([word(weight)?, word(bias)?])
    }

    fn max_groups(&self) -> u32 {
        self.ctx.limits.max_compute_workgroups_per_dimension
    }

    fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32> {
        u32::try_from(v).map_err(|_| Error::shape(op, format!("{what} = {v} does not fit the GPU's 32-bit indices")))
    }
}

/// What a matmul dispatch does besides its product and epilogue.
#[derive(Default)]
struct Fusions<'a> {
    /// (N): the column sums of b.
    colsum: Option<TensorId>,
    /// Treat c and colsum as the gradients of this weight (M, N) and bias (N) and step them.
    update: Option<&'a FusedUpdate>,
    /// Read a as images[order[start..start + M]] / 255 of this dataset, writing it to the `a`
    /// tensor as it goes (the first layer's input, which its weight gradient reads later).
    gather: Option<(DatasetId, usize)>,
}

/// The optimizer step a weight-gradient product applies in its epilogue.
struct FusedUpdate {
    weight: ParamTensors,
    bias: ParamTensors,
    opt: Optimizer,
}

/// What a binding of a dispatch refers to.
#[derive(Clone, Copy)]
enum Bound {
    Tensor(TensorId),
    Images(DatasetId),
    Labels(DatasetId),
    Order(DatasetId),
    Stats,
    Dummy,
    DummyOut,
    /// The whole buffer that holds this tensor (a packed group).
    BufferOf(TensorId),
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

    fn read(&mut self, t: TensorId) -> Result<Vec<f32>> {
        let len = self.tensor("read", t, 0).map(|_| self.tensors[t.0].len)?;
        let bytes = self.read_bytes(t, len as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[..len * 4]))
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

    fn gather_batch(&mut self, x: TensorId, ds: DatasetId, start: usize, rows: usize) -> Result<()> {
        let op = "gather_batch";
        self.dataset(op, ds, start, rows)?;
        self.tensor(op, x, rows * IMAGE_PIXELS)?;
        let words = IMAGE_PIXELS / 4;
        let params = [
            Self::u32_of(op, "start", start)?,
            rows as u32,
            words as u32,
            0,
            0,
            0,
            0,
            0,
        ];
        let grid = grid_1d(rows * words, self.max_groups());
        self.record(
            Kernel::Gather,
            &params,
            &[(1, Bound::Images(ds)), (2, Bound::Order(ds)), (3, Bound::Tensor(x))],
            grid,
        )
    }

    fn matmul_forward(
        &mut self,
        out: TensorId,
        inp: TensorId,
        weight: TensorId,
        epilogue: Epilogue,
        b: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        // out (B, OC) = epilogue(inp (B, C) @ weight (C, OC))
        let dims = [b, oc, c, c, 1, oc, 1];
        self.matmul(
            "matmul_forward",
            out,
            inp,
            weight,
            epilogue,
            Fusions::default(),
            dims,
            [b * oc, b * c, c * oc],
        )
    }

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
        // Fused: one dispatch, the pixels go from the dataset straight into the product's tiles,
        // and the workgroups of the first column of tiles write x (rows, 784) on the way.
        let c = IMAGE_PIXELS;
        if !self.fuse_gather {
            self.gather_batch(x, ds, start, rows)?;
            return self.matmul_forward(out, x, weight, epilogue, rows, c, oc);
        }
        let dims = [rows, oc, c, c, 1, oc, 1];
        self.matmul(
            "gather_matmul_forward",
            out,
            x,
            weight,
            epilogue,
            Fusions {
                gather: Some((ds, start)),
                ..Fusions::default()
            },
            dims,
            [rows * oc, rows * c, c * oc],
        )
    }

    fn matmul_backward_input(
        &mut self,
        dinp: TensorId,
        dout: TensorId,
        weight: TensorId,
        epilogue: Epilogue,
        b: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        // dinp (B, C) = epilogue(dout (B, OC) @ weight^T); weight^T (OC, C) read with strides (1, OC)
        let dims = [b, c, oc, oc, 1, 1, oc];
        self.matmul(
            "matmul_backward_input",
            dinp,
            dout,
            weight,
            epilogue,
            Fusions::default(),
            dims,
            [b * c, b * oc, c * oc],
        )
    }

    fn matmul_backward_weight(
        &mut self,
        dweight: TensorId,
        dbias: Option<TensorId>,
        inp: TensorId,
        dout: TensorId,
        b: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        // dweight (C, OC) = inp^T @ dout; inp^T (C, B) read with strides (1, C);
        // dbias (OC) = column sums of dout, from the same tiles of dout
        let dims = [c, oc, b, 1, c, oc, 1];
        self.matmul(
            "matmul_backward_weight",
            dweight,
            inp,
            dout,
            Epilogue::default(),
            Fusions {
                colsum: dbias,
                ..Fusions::default()
            },
            dims,
            [c * oc, b * c, b * oc],
        )
    }

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
        // One dispatch: dweight, dbias, and the optimizer step in the epilogue.
        let dims = [c, oc, b, 1, c, oc, 1];
        let update = FusedUpdate {
            weight,
            bias,
            opt: *opt,
        };
        self.matmul(
            "matmul_backward_weight_update",
            weight.grad,
            inp,
            dout,
            Epilogue::default(),
            Fusions {
                colsum: Some(bias.grad),
                update: Some(&update),
                gather: None,
            },
            dims,
            [c * oc, b * c, b * oc],
        )
    }

    fn output_layer_step(&mut self, s: &OutputLayerStep, opt: &Optimizer) -> Result<()> {
        if !self.fuses_output_layer(s) {
            return super::output_layer_in_sequence(self, s, opt);
        }
        let op = "output_layer_step";
        checks::loss(op, s.classes, s.slot, self.stats_slots)?;
        self.dataset(op, s.ds, s.start, s.b)?;
        let (b, c, k) = (s.b, s.c, s.classes);
        for (t, len) in [(s.inp, b * c), (s.dinp, b * c), (s.dlogits, b * k)] {
            self.tensor(op, t, len)?;
        }
        let rmsprop = opt.kind == OptimizerKind::RmsProp;
        let value_words = self.packed_pair(op, s.weight.value, s.bias.value, c, k)?;
        let grad_words = self.packed_pair(op, s.weight.grad, s.bias.grad, c, k)?;
        let velocity_words = if rmsprop {
            self.packed_pair(op, s.weight.velocity, s.bias.velocity, c, k)?
        } else {
            [0, 0]
        };
        // Each written buffer once, and none of them the input (wgpu refuses a buffer bound twice
        // when one binding writes it); SGD binds no velocity.
        let bound = [
            s.inp,
            s.dlogits,
            s.dinp,
            s.weight.value,
            s.weight.grad,
            s.weight.velocity,
        ];
        let bound = &bound[..if rmsprop { 6 } else { 5 }];
        for i in 0..bound.len() {
            self.distinct(op, &bound[i..])?;
        }
        let params = [
            Self::u32_of(op, "rows", b)?,
            k as u32,
            Self::u32_of(op, "start", s.start)?,
            s.slot as u32,
            1,
            Self::u32_of(op, "inputs", c)?,
            rmsprop as u32,
            value_words[0],
            value_words[1],
            velocity_words[0],
            velocity_words[1],
            grad_words[0],
            grad_words[1],
            bits(opt.lr),
            bits(opt.rho),
            bits(opt.eps),
        ];
        Self::u32_of(op, "rows * inputs", b * c)?;
        let velocity = if rmsprop {
            Bound::BufferOf(s.weight.velocity)
        } else {
            Bound::DummyOut
        };
        let bind = [
            (2, Bound::Labels(s.ds)),
            (3, Bound::Order(s.ds)),
            (4, Bound::Tensor(s.dlogits)),
            (5, Bound::Stats),
            (6, Bound::Tensor(s.inp)),
            (7, Bound::BufferOf(s.weight.value)),
            (8, velocity),
            (9, Bound::BufferOf(s.weight.grad)),
            (10, Bound::Tensor(s.dinp)),
        ];
        self.record(Kernel::OutputLayer, &params, &bind, (1, 1, 1))
    }

    fn bias_add_forward(&mut self, out: TensorId, bias: TensorId, b: usize, oc: usize) -> Result<()> {
        let op = "bias_add_forward";
        self.tensor(op, out, b * oc)?;
        self.tensor(op, bias, oc)?;
        self.distinct(op, &[out, bias])?;
        let params = [
            Self::u32_of(op, "rows", b)?,
            Self::u32_of(op, "cols", oc)?,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        Self::u32_of(op, "rows * cols", b * oc)?;
        let grid = grid_1d(b * oc, self.max_groups());
        self.record(
            Kernel::BiasAdd,
            &params,
            &[(1, Bound::Tensor(bias)), (2, Bound::Tensor(out))],
            grid,
        )
    }

    fn bias_backward(&mut self, dbias: TensorId, dout: TensorId, b: usize, oc: usize) -> Result<()> {
        let op = "bias_backward";
        self.tensor(op, dbias, oc)?;
        self.tensor(op, dout, b * oc)?;
        self.distinct(op, &[dbias, dout])?;
        let params = [
            Self::u32_of(op, "rows", b)?,
            Self::u32_of(op, "cols", oc)?,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let grid = grid_1d(oc, self.max_groups());
        self.record(
            Kernel::BiasBackward,
            &params,
            &[(1, Bound::Tensor(dout)), (2, Bound::Tensor(dbias))],
            grid,
        )
    }

    fn relu_forward(&mut self, out: TensorId, inp: TensorId, n: usize) -> Result<()> {
        let op = "relu_forward";
        self.tensor(op, out, n)?;
        self.tensor(op, inp, n)?;
        self.distinct(op, &[out, inp])?;
        let params = [Self::u32_of(op, "n", n)?, 0, 0, 0, 0, 0, 0, 0];
        let grid = grid_1d(n, self.max_groups());
        self.record(
            Kernel::ReluForward,
            &params,
            &[(1, Bound::Tensor(inp)), (2, Bound::Tensor(out))],
            grid,
        )
    }

    fn relu_backward(&mut self, dinp: TensorId, dout: TensorId, out: TensorId, n: usize) -> Result<()> {
        let op = "relu_backward";
        self.tensor(op, dinp, n)?;
        self.tensor(op, dout, n)?;
        self.tensor(op, out, n)?;
        self.distinct(op, &[dinp, dout, out])?;
        let params = [Self::u32_of(op, "n", n)?, 0, 0, 0, 0, 0, 0, 0];
        let grid = grid_1d(n, self.max_groups());
        let bind = [
            (3, Bound::Tensor(dout)),
            (4, Bound::Tensor(out)),
            (5, Bound::Tensor(dinp)),
        ];
        self.record(Kernel::ReluBackward, &params, &bind, grid)
    }

    fn softmax_xent_forward_backward(
        &mut self,
        dlogits: Option<TensorId>,
        logits: TensorId,
        ds: DatasetId,
        start: usize,
        rows: usize,
        classes: usize,
        slot: usize,
    ) -> Result<()> {
        let op = "softmax_xent_forward_backward";
        checks::loss(op, classes, slot, self.stats_slots)?;
        self.dataset(op, ds, start, rows)?;
        self.tensor(op, logits, rows * classes)?;
        let dl = match dlogits {
            Some(d) => {
                self.tensor(op, d, rows * classes)?;
                self.distinct(op, &[d, logits])?;
                Bound::Tensor(d)
            }
            None => Bound::DummyOut,
        };
        let params = [
            Self::u32_of(op, "rows", rows)?,
            classes as u32,
            Self::u32_of(op, "start", start)?,
            slot as u32,
            dlogits.is_some() as u32,
            0,
            0,
            0,
        ];
        let bind = [
            (1, Bound::Tensor(logits)),
            (2, Bound::Labels(ds)),
            (3, Bound::Order(ds)),
            (4, dl),
            (5, Bound::Stats),
        ];
        self.record(Kernel::SoftmaxXent, &params, &bind, (1, 1, 1))
    }

    fn rmsprop_update(
        &mut self,
        param: TensorId,
        velocity: TensorId,
        grad: TensorId,
        n: usize,
        lr: f32,
        rho: f32,
        eps: f32,
    ) -> Result<()> {
        let op = "rmsprop_update";
        self.tensor(op, param, n)?;
        self.tensor(op, velocity, n)?;
        self.tensor(op, grad, n)?;
        self.distinct(op, &[param, velocity, grad])?;
        self.distinct(op, &[velocity, grad])?;
        let params = [Self::u32_of(op, "n", n)?, bits(lr), bits(rho), bits(eps), 0, 0, 0, 0];
        let grid = grid_1d(n.div_ceil(4), self.max_groups());
        let bind = [
            (1, Bound::Tensor(grad)),
            (2, Bound::Tensor(param)),
            (3, Bound::Tensor(velocity)),
        ];
        self.record(Kernel::RmsProp, &params, &bind, grid)
    }

    fn sgd_update(&mut self, param: TensorId, grad: TensorId, n: usize, lr: f32) -> Result<()> {
        let op = "sgd_update";
        self.tensor(op, param, n)?;
        self.tensor(op, grad, n)?;
        self.distinct(op, &[param, grad])?;
        let params = [Self::u32_of(op, "n", n)?, bits(lr), 0, 0, 0, 0, 0, 0];
        let grid = grid_1d(n, self.max_groups());
        self.record(
            Kernel::Sgd,
            &params,
            &[(1, Bound::Tensor(grad)), (2, Bound::Tensor(param))],
            grid,
        )
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

    fn collect_stats(&mut self) -> Result<Vec<StepStats>> {
        let (read, count) = self
            .pending_stats
            .pop_front()
            .ok_or_else(|| Error::shape("collect_stats", "no statistics were requested".to_string()))?;
        let (bytes, staging) = read.finish(&self.ctx)?;
        self.free_staging.push(staging);
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes[..count * 8]);
        Ok(words
            .chunks_exact(2)
            .map(|w| StepStats {
                loss_sum: f32::from_bits(w[0]),
                correct: w[1],
            })
            .collect())
    }

    fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.ctx.wait("waiting for the GPU")
    }

    fn prepare(&mut self, matmuls: &[(usize, usize, usize)]) -> Result<()> {
        let mut kernels: Vec<Kernel> = matmuls
            .iter()
            .map(|&(m, n, k)| Kernel::Matmul(self.tiles_for(m, n, k)))
            .collect();
        kernels.push(Kernel::SoftmaxXent);
        if self.output_layer_fusion_available() {
            kernels.push(Kernel::OutputLayer);
        }
        if !self.fuse_gather {
            kernels.push(Kernel::Gather);
        }
        kernels.sort_by_key(|k| k.label());
        self.kernels.prepare(&self.ctx, &kernels)
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

    fn finish_profile(&mut self) -> Result<Vec<(String, f64)>> {
        let Some(profile) = self.profile.take() else {
            return Ok(Vec::new());
        };
        self.submit(|_, encoder| profile.resolve(encoder))?;
        profile.read(&self.ctx)
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

impl WgpuBackend {
    /// c (M, N) = epilogue(a @ b) through strides: dims = [m, n, k, a_row, a_col, b_row, b_col];
    /// lens = values needed in [c, a, b]; see `Fusions` for what else the dispatch does.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &mut self,
        op: &'static str,
        c: TensorId,
        a: TensorId,
        b: TensorId,
        epilogue: Epilogue,
        fusions: Fusions,
        dims: [usize; 7],
        lens: [usize; 3],
    ) -> Result<()> {
        let Fusions { colsum, update, gather } = fusions;
        let (m, n) = (dims[0], dims[1]);
        self.tensor(op, c, lens[0])?;
        self.tensor(op, a, lens[1])?;
        self.tensor(op, b, lens[2])?;
        if let Some(bias) = epilogue.bias {
            self.tensor(op, bias, n)?;
        }
        if let Some(mask) = epilogue.relu_mask {
            self.tensor(op, mask, m * n)?;
        }
        if let Some(colsum) = colsum {
            self.tensor(op, colsum, n)?;
        }
        let mut params = [0u32; 16];
        for (p, &d) in params.iter_mut().zip(&dims) {
            *p = Self::u32_of(op, "a dimension", d)?;
        }
        params[7] = epilogue.bias.is_some() as u32
            | (epilogue.relu as u32) << 1
            | (epilogue.relu_mask.is_some() as u32) << 2
            | (colsum.is_some() as u32) << 3;
        let (mut a_buf, mut mask_buf, mut side_buf) = (
            Bound::Tensor(a),
            epilogue.relu_mask.map_or(Bound::Dummy, Bound::Tensor),
            colsum.map_or(Bound::DummyOut, Bound::Tensor),
        );
        if let Some((ds, start)) = gather {
            if colsum.is_some() || epilogue.relu_mask.is_some() || dims[4] != 1 {
                return Err(Error::shape(
                    op,
                    "gather reads a row-major a without mask or colsum".to_string(),
                ));
            }
            self.dataset(op, ds, start, m)?;
            if dims[2] != IMAGE_PIXELS {
                return Err(Error::shape(
                    op,
                    format!("gather needs K = {IMAGE_PIXELS} pixels, got {}", dims[2]),
                ));
            }
            params[15] = Self::u32_of(op, "start", start)?;
            params[7] |= 64;
            a_buf = Bound::Images(ds);
            mask_buf = Bound::Order(ds);
            side_buf = Bound::Tensor(a);
        }
        let (mut param_buf, mut velocity_buf) = (Bound::DummyOut, Bound::DummyOut);
        if let Some(u) = update {
            if colsum.is_none() {
                return Err(Error::shape(op, "a fused update needs the bias gradient".to_string()));
            }
            let (w, bias) = (u.weight, u.bias);
            [params[11], params[13]] = self.packed_pair(op, w.value, bias.value, m, n)?;
            params[8] = bits(u.opt.lr);
            params[9] = bits(u.opt.rho);
            params[10] = bits(u.opt.eps);
            match u.opt.kind {
                OptimizerKind::RmsProp => {
                    [params[12], params[14]] = self.packed_pair(op, w.velocity, bias.velocity, m, n)?;
                    params[7] |= 16;
                    velocity_buf = Bound::BufferOf(w.velocity);
                }
                OptimizerKind::Sgd => params[7] |= 32,
            }
            param_buf = Bound::BufferOf(w.value);
        }
        for &len in &lens {
            Self::u32_of(op, "a tensor length", len)?;
        }
        let tiles = self.tiles_for(m, n, dims[2]);
        let grid = (
            n.div_ceil(tiles.tn as usize) as u32,
            m.div_ceil(tiles.tm as usize) as u32,
            1,
        );
        if grid.0 > self.max_groups() || grid.1 > self.max_groups() {
            return Err(Error::shape(
                op,
                format!("{m}x{n} output needs more workgroups than the adapter allows"),
            ));
        }
        // Every written buffer must differ from every buffer read (wgpu refuses a buffer bound both
        // ways in one dispatch): say so here, naming the op, rather than as a validation error.
        let read = [
            Some(b),
            epilogue.bias,
            epilogue.relu_mask,
            gather.is_none().then_some(a),
        ];
        let velocity = update.and_then(|u| (u.opt.kind == OptimizerKind::RmsProp).then_some(u.weight.velocity));
        let written = [
            Some(c),
            colsum,
            gather.map(|_| a),
            update.map(|u| u.weight.value),
            velocity,
        ];
        for w in written.into_iter().flatten() {
            for r in read.into_iter().flatten() {
                self.distinct(op, &[w, r])?;
            }
        }
        let bias = epilogue.bias.map_or(Bound::Dummy, Bound::Tensor);
        let bind = [
            (1, a_buf),
            (2, Bound::Tensor(b)),
            (3, Bound::Tensor(c)),
            (4, bias),
            (5, mask_buf),
            (6, side_buf),
            (7, param_buf),
            (8, velocity_buf),
        ];
        self.record(Kernel::Matmul(tiles), &params, &bind, grid)
    }
}
