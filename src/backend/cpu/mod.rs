//! The CPU backends: the plain-loop reference, and the fast path that replaces its three matmuls
//! with sparse products that skip the zeros and fuse the optimizer step into the weight gradient
//! when the input matrix is mostly zeros (the first layer's pixels, `kernels::sparse`), small
//! loops when a side is at most 16 (the output layer's, `kernels::narrow`), and a blocked GEMM on
//! row pieces over the threads otherwise (`kernels::sgemm` over `kernels::gemm`, or
//! `matrixmultiply` without AVX-512).
//!
//! Layout: this file holds the tensors, datasets, the gather, the loss and the updates; `dense`
//! the dense layers' products, `conv` the convolutions' (over patch matrices, mapped or written,
//! or a first layer straight from the pixels), `pool` max pooling and a first layer fused with
//! its pool, `layers` batch normalisation and dropout, `elementwise` the element-wise loops;
//! `threads` is the thread pool, `simd` the run-time choice of vector instructions, and
//! `kernels` the loops over plain slices.
//!
//! Contract: `CpuBackend::reference()` runs exactly the functions of `reference` (the spec), and
//! every fused op as its composition (`ops::run_unfused`); `CpuBackend::fast` differs only in the
//! summation order of the matmuls, and is tested against the reference. Ops run immediately; the
//! futures of `read` and `collect_stats` are ready at once.

#[macro_use]
mod simd;
mod conv;
mod dense;
mod elementwise;
mod kernels;
mod layers;
mod pool;
mod threads;

use dense::MAX_INPUTS;

use std::collections::VecDeque;

use super::checks;
use super::ops::{run_unfused, Fusions, Gather, Loss, Op, StepAt};
use super::reference as r;
use super::{ready, Backend, Counters, DatasetId, Packed, ParamTensors, Readback, StepStats, TensorId};
use crate::data::{Dataset, IMAGE_PIXELS};
use crate::error::{Error, Result};
use crate::optim::Optimizer;
use kernels::gemm;
use kernels::sgemm::ProductScratch;
use kernels::sparse::{self, Source};
pub use simd::SimdLimit;

/// The fast CPU path's knobs for this process, read from the environment by the caller
/// (`settings`) and handed to `CpuBackend::fast`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSettings {
    /// Threads of the parallel loops (None: one per core).
    pub threads: Option<usize>,
    /// The widest vector instructions the kernels may use.
    pub simd: SimdLimit,
}

/// Which implementation of the matmuls to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuKind {
    /// The plain loops of `reference`: slow, obviously right.
    Reference,
    /// A blocked GEMM on all cores, or `sparse` on mostly-zero inputs.
    Fast,
}

/// `len` values at `offset` of backing array `storage`.
#[derive(Debug, Clone, Copy)]
struct View {
    storage: usize,
    offset: usize,
    len: usize,
}

struct CpuDataset {
    data: Dataset,
    order: Vec<u32>,
}

pub struct CpuBackend {
    kind: CpuKind,
    /// Backing arrays; a tensor is a view of one (several for a packed group).
    storage: Vec<Vec<f32>>,
    /// For each backing array, the count of writes (to any array) at its last write: the sparse
    /// products know from it whether the rows they hold of a matrix are still its rows.
    versions: Vec<u64>,
    writes: u64,
    tensors: Vec<View>,
    datasets: Vec<CpuDataset>,
    stats: Vec<StepStats>,
    /// Statistics copied by `request_stats`, oldest first, until `collect_stats` takes them.
    requested: VecDeque<Vec<StepStats>>,
    counters: Counters,
    /// Scratch for the loss op: probabilities, per-row losses, labels, predictions.
    probs: Vec<f32>,
    losses: Vec<f32>,
    labels: Vec<u8>,
    preds: Vec<u8>,
    /// Buffers of the sparse products, and how many have run; buffers of the other products.
    sparse: sparse::SparseScratch,
    products: ProductScratch,
    sparse_products: u64,
    /// The convolutions' patch matrices, one per (input, geometry), and the scratch of their
    /// gradient (see `conv`).
    patches: Vec<Patches>,
    dpatches: Option<TensorId>,
    /// A block of images' patch gradients for each piece of a blocked input gradient.
    gradient_blocks: Vec<f32>,
    /// The choices of the first layer's pool, kept by `Op::ConvPool` for its backward pass.
    pool_codes: Vec<PoolCodes>,
}

/// The 2 x 2 pool's choices over `product` (a first layer's output, not stored), one byte a pool
/// output (`direct_conv::pool_band`), made when the write count was `version`: they stand
/// for `product` while its array has not been written since.
#[derive(Debug, Clone)]
struct PoolCodes {
    product: TensorId,
    shape: crate::backend::ops::PoolShape,
    version: u64,
    codes: Vec<u8>,
}

/// The patch matrix `cols` of input `inp` under `geometry`, built when `inp`'s array was at write
/// count `version`.
#[derive(Debug, Clone, Copy)]
struct Patches {
    inp: TensorId,
    geometry: crate::backend::ops::ConvGeometry,
    version: u64,
    cols: TensorId,
}

impl CpuBackend {
    pub fn new(kind: CpuKind) -> Self {
        CpuBackend {
            kind,
            storage: Vec::new(),
            versions: Vec::new(),
            writes: 0,
            tensors: Vec::new(),
            datasets: Vec::new(),
            stats: Vec::new(),
            requested: VecDeque::new(),
            counters: Counters::default(),
            probs: Vec::new(),
            losses: Vec::new(),
            labels: Vec::new(),
            preds: Vec::new(),
            sparse: sparse::SparseScratch::default(),
            products: ProductScratch::default(),
            sparse_products: 0,
            patches: Vec::new(),
            dpatches: None,
            gradient_blocks: Vec::new(),
            pool_codes: Vec::new(),
        }
    }

    pub fn reference() -> Self {
        Self::new(CpuKind::Reference)
    }

    /// The fast path. Its threads and vector width are the process's: the first backend's
    /// `settings` fix them (before any loop has run), later ones share them.
    pub fn fast(settings: &CpuSettings) -> Self {
        threads::configure(settings.threads);
        simd::configure(settings.simd);
        Self::new(CpuKind::Fast)
    }

    /// Products the fast path has run as sparse ones (`sparse`), for tests and `--verbose`.
    pub fn sparse_products(&self) -> u64 {
        self.sparse_products
    }

    fn view(&self, op: &'static str, t: TensorId, need: usize) -> Result<View> {
        let v = *self
            .tensors
            .get(t.0)
            .ok_or_else(|| Error::shape(op, format!("no tensor {}", t.0)))?;
        if v.len < need {
            let reason = format!("tensor {} holds {} values, the op needs {need}", t.0, v.len);
            return Err(Error::shape(op, reason));
        }
        Ok(View { len: need, ..v })
    }

    fn tensor(&self, op: &'static str, t: TensorId, need: usize) -> Result<&[f32]> {
        let v = self.view(op, t, need)?;
        Ok(&self.storage[v.storage][v.offset..v.offset + v.len])
    }

    fn tensor_mut(&mut self, op: &'static str, t: TensorId, need: usize) -> Result<&mut [f32]> {
        let v = self.view(op, t, need)?;
        self.written(v.storage);
        Ok(&mut self.storage[v.storage][v.offset..v.offset + v.len])
    }

    /// Record a write to backing array `storage` (every mutable access goes through here, or
    /// through `tensor_mut` and `with_out`, which call it).
    fn written(&mut self, storage: usize) {
        self.writes += 1;
        self.versions[storage] = self.writes;
    }

    /// The matrix (rows, cols) at view v, as the sparse products name it.
    fn source(&self, v: View, rows: usize, cols: usize) -> Source {
        Source {
            key: (v.storage, v.offset, self.versions[v.storage]),
            rows,
            cols,
        }
    }

    /// x (rows, 784) = images[order[start..start + rows]] / 255 (`reference::gather_batch`, or
    /// `gather_augmented` for a training batch with augmentation), and, on the fast path, x's
    /// rows held for the sparse products, built in the same pass.
    fn gather(&mut self, g: &Gather, at: StepAt) -> Result<()> {
        let Gather { x, ds, rows, augment } = *g;
        let start = at.start;
        let op = "gather";
        // On the fast path the pixels become x and the rows of the sparse products in one pass.
        let sparse_rows = self.kind == CpuKind::Fast;
        self.dataset(op, ds, start, rows)?;
        let v = self.view(op, x, rows * IMAGE_PIXELS)?;
        self.written(v.storage);
        let source = self.source(v, rows, IMAGE_PIXELS);
        let d = &self.datasets[ds.0];
        let xs = &mut self.storage[v.storage][v.offset..v.offset + v.len];
        if let Some(aug) = augment {
            let step = at.step as u32;
            if sparse_rows {
                layers::gather_augmented_fast(xs, &d.data.images, &d.order, (start, rows), &aug, step);
                self.sparse.hold_rows(xs, source);
            } else {
                r::gather_augmented(xs, &d.data.images, &d.order, (start, rows), &aug, step);
            }
        } else if sparse_rows {
            self.sparse.gather(xs, &d.data.images, &d.order, start, source);
        } else {
            r::gather_batch(xs, &d.data.images, &d.order, start, rows, IMAGE_PIXELS);
        }
        self.counters.dispatches += 1;
        Ok(())
    }

    fn dataset(&self, op: &'static str, ds: DatasetId, start: usize, rows: usize) -> Result<&CpuDataset> {
        let d = self
            .datasets
            .get(ds.0)
            .ok_or_else(|| Error::shape(op, format!("no dataset {}", ds.0)))?;
        checks::rows(op, start, rows, d.data.len())?;
        Ok(d)
    }

    /// Run `f(out, inputs)` with `out`'s backing array taken out of the arena, so that no input
    /// can alias it (an input that shares the output's array is refused). Allocates nothing.
    fn with_out(
        &mut self,
        op: &'static str,
        out: (TensorId, usize),
        inputs: &[(TensorId, usize)],
        f: impl FnOnce(&mut [f32], &[&[f32]]),
    ) -> Result<()> {
        let o = self.view(op, out.0, out.1)?;
        if inputs.len() > MAX_INPUTS {
            return Err(Error::shape(
                op,
                format!("{} inputs, at most {MAX_INPUTS}", inputs.len()),
            ));
        }
        for &(t, n) in inputs {
            if self.view(op, t, n)?.storage == o.storage {
                return Err(Error::shape(
                    op,
                    format!("input tensor {} shares its array with the output", t.0),
                ));
            }
        }
        self.written(o.storage);
        let mut array = std::mem::take(&mut self.storage[o.storage]);
        let mut ins: [&[f32]; MAX_INPUTS] = [&[]; MAX_INPUTS];
        for (slot, &(t, n)) in ins.iter_mut().zip(inputs) {
            // Checked above: every input is a valid view of another array.
            let v = self.tensors[t.0];
            *slot = &self.storage[v.storage][v.offset..v.offset + n];
        }
        f(&mut array[o.offset..o.offset + o.len], &ins[..inputs.len()]);
        self.storage[o.storage] = array;
        self.counters.dispatches += 1;
        Ok(())
    }

    /// The fused softmax + cross-entropy (`Loss`).
    fn loss(&mut self, l: &Loss, at: StepAt) -> Result<()> {
        let Loss {
            logits,
            dlogits,
            ds,
            rows,
            classes,
        } = *l;
        let StepAt { start, slot, .. } = at;
        let op = "softmax cross-entropy";
        checks::loss(op, classes, slot, self.stats.len())?;
        self.dataset(op, ds, start, rows)?;
        let n = rows * classes;
        // Every argument is checked before anything is written.
        let lv = self.view(op, logits, n)?;
        let dv = dlogits.map(|dl| self.view(op, dl, n)).transpose()?;
        if dv.is_some_and(|dv| dv.storage == lv.storage) {
            return Err(Error::shape(op, "dlogits shares its array with the logits".to_string()));
        }
        self.probs.resize(n, 0.0);
        self.losses.resize(rows, 0.0);
        self.labels.resize(rows, 0);
        self.preds.resize(rows, 0);
        let d = &self.datasets[ds.0];
        r::gather_labels(&mut self.labels, &d.data.labels, &d.order, start, rows);
        let l = &self.storage[lv.storage][lv.offset..lv.offset + n];
        r::softmax_xent_forward(&mut self.probs, &mut self.losses, l, &self.labels, rows, classes);
        r::argmax_rows(&mut self.preds, l, rows, classes);
        let loss_sum: f64 = self.losses.iter().map(|&x| x as f64).sum();
        let correct = self.preds.iter().zip(&self.labels).filter(|(p, l)| p == l).count() as u32;
        self.stats[slot] = StepStats {
            loss_sum: loss_sum as f32,
            correct,
        };
        if let Some(dv) = dv {
            self.written(dv.storage);
            let out = &mut self.storage[dv.storage][dv.offset..dv.offset + n];
            r::softmax_xent_backward(out, &self.probs, &self.labels, rows, classes);
        }
        self.counters.dispatches += 1;
        Ok(())
    }

    /// `opt`'s step `at.step` of the n values of parameter `p` with its stored gradient
    /// (`reference::optimizer_one` on every value; through `elementwise` on the fast path, the
    /// same bits).
    fn update(&mut self, p: ParamTensors, n: usize, opt: &Optimizer, at: StepAt) -> Result<()> {
        let op = "optimizer update";
        let step = r::OptimizerStep::<f32>::new(opt, opt.scalars(at.step));
        // The moments are written too, so their arrays are taken out: each must alias nothing.
        let (vv, mv) = (self.view(op, p.velocity, n)?, self.view(op, p.momentum, n)?);
        let others = [self.view(op, p.value, n)?.storage, self.view(op, p.grad, n)?.storage];
        if others.contains(&vv.storage) || others.contains(&mv.storage) || vv.storage == mv.storage {
            return Err(Error::shape(
                op,
                "an optimizer moment shares its array with the parameter, its gradient or the other moment".to_string(),
            ));
        }
        self.written(vv.storage);
        self.written(mv.storage);
        let mut varray = std::mem::take(&mut self.storage[vv.storage]);
        let mut marray = std::mem::take(&mut self.storage[mv.storage]);
        let v = &mut varray[vv.offset..vv.offset + n];
        let m = &mut marray[mv.offset..mv.offset + n];
        let kind = self.kind;
        let result = self.with_out(op, (p.value, n), &[(p.grad, n)], |value, g| match kind {
            CpuKind::Reference => r::optimizer_update(value, v, m, g[0], &step),
            CpuKind::Fast => elementwise::optimizer_update(value, v, m, g[0], &step),
        });
        self.storage[vv.storage] = varray;
        self.storage[mv.storage] = marray;
        result
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        match self.kind {
            CpuKind::Reference => "cpu reference (plain loops, 1 thread)".to_string(),
            CpuKind::Fast => {
                let threads = threads::threads();
                let gemm = if gemm::available() {
                    "avx512 gemm"
                } else {
                    "matrixmultiply"
                };
                format!("cpu (sparse + {gemm}, {threads} threads)")
            }
        }
    }

    fn alloc(&mut self, len: usize) -> Result<TensorId> {
        let mut array = Vec::new();
        array.try_reserve_exact(len).map_err(|_| {
            Error::Numerical(format!(
                "out of memory: could not allocate {len} values ({} MiB)",
                len / (1 << 18)
            ))
        })?;
        array.resize(len, 0.0);
        self.storage.push(array);
        self.versions.push(0);
        self.tensors.push(View {
            storage: self.storage.len() - 1,
            offset: 0,
            len,
        });
        Ok(TensorId(self.tensors.len() - 1))
    }

    fn alloc_packed(&mut self, lens: &[usize]) -> Result<Packed> {
        let len = lens.iter().sum();
        let whole = self.alloc(len)?;
        let storage = self.tensors[whole.0].storage;
        let mut offset = 0;
        let mut offsets = Vec::with_capacity(lens.len());
        let parts = lens
            .iter()
            .map(|&len| {
                offsets.push(offset);
                self.tensors.push(View { storage, offset, len });
                offset += len;
                TensorId(self.tensors.len() - 1)
            })
            .collect();
        Ok(Packed {
            whole,
            len,
            parts,
            offsets,
        })
    }

    fn write(&mut self, t: TensorId, data: &[f32]) -> Result<()> {
        self.tensor("write", t, data.len())?;
        self.tensor_mut("write", t, data.len())?.copy_from_slice(data);
        self.counters.uploads += 1;
        Ok(())
    }

    fn read(&mut self, t: TensorId) -> Readback<'_, Vec<f32>> {
        let result = self.view("read", t, 0).and_then(|_| {
            let values = self.tensor("read", t, self.tensors[t.0].len)?.to_vec();
            self.counters.readbacks += 1;
            Ok(values)
        });
        ready(result)
    }

    fn upload_dataset(&mut self, data: &Dataset) -> Result<DatasetId> {
        let order = (0..data.len() as u32).collect();
        self.datasets.push(CpuDataset {
            data: data.clone(),
            order,
        });
        Ok(DatasetId(self.datasets.len() - 1))
    }

    fn set_order(&mut self, ds: DatasetId, order: &[u32]) -> Result<()> {
        let d = self
            .datasets
            .get_mut(ds.0)
            .ok_or_else(|| Error::shape("set_order", format!("no dataset {}", ds.0)))?;
        checks::order(order, d.data.len())?;
        d.order.clear();
        d.order.extend_from_slice(order);
        Ok(())
    }

    fn reserve_stats(&mut self, slots: usize) -> Result<()> {
        if self.stats.len() < slots {
            self.stats.resize(slots, StepStats::default());
        }
        Ok(())
    }

    fn fusions(&self) -> Fusions {
        // The fast path fuses the weight step into a sparse weight gradient; the reference runs
        // every fusion as its composition.
        Fusions {
            weight_update: self.kind == CpuKind::Fast,
            // A first layer's gradients straight from its pool's gradient (`kernels::direct_conv`), on AVX-512.
            pool_weight_gradient: self.kind == CpuKind::Fast && gemm::available(),
            ..Fusions::default()
        }
    }

    fn run(&mut self, op: &Op, at: StepAt) -> Result<()> {
        match op {
            Op::Gather(g) => self.gather(g, at),
            Op::Matmul(m) => match m.conv {
                Some(g) => self.conv(m, g, at),
                None => self.matmul(m, at),
            },
            Op::Loss(l) => self.loss(l, at),
            Op::Update(u) => self.update(u.param, u.len, &u.opt, at),
            Op::Pool(p) => self.pool(p),
            Op::OutputLayer(_) => run_unfused(self, op, at),
            Op::PoolWeightGradient(f) => self.pool_weight_gradient(f, at),
            Op::ConvPool(f) => self.conv_pool(f, at),
            Op::Dropout(d) => self.dropout(d, at),
            Op::BatchNorm(b) => self.batch_norm(b),
        }
    }

    fn request_stats(&mut self, first: usize, count: usize) -> Result<()> {
        checks::stats_read(first, count, self.stats.len())?;
        self.counters.readbacks += 1;
        self.requested.push_back(self.stats[first..first + count].to_vec());
        Ok(())
    }

    fn collect_stats(&mut self) -> Readback<'_, Vec<StepStats>> {
        ready(
            self.requested
                .pop_front()
                .ok_or_else(|| Error::shape("collect_stats", "no statistics were requested".to_string())),
        )
    }

    fn sync(&mut self) -> Readback<'_, ()> {
        ready(Ok(()))
    }

    fn counters(&self) -> Counters {
        let tensors: usize = self.storage.iter().map(|t| t.len() * 4).sum();
        let datasets: usize = self.datasets.iter().map(|d| d.order.len() * 4).sum();
        Counters {
            allocated_bytes: (tensors + datasets) as u64,
            ..self.counters
        }
    }
}
