//! The CPU backends: the plain-loop reference, and the fast path that replaces its three matmuls
//! with sparse products that skip the zeros and fuse the optimizer step into the weight gradient
//! when the input matrix is mostly zeros (the first layer's pixels, `cpu_sparse`), small loops when
//! a side is at most 16 (the output layer's, `cpu_narrow`), and a blocked GEMM on row pieces over
//! the threads otherwise (`matrixmultiply`).
//!
//! Contract: `CpuBackend::reference()` runs exactly the functions of `reference` (the spec);
//! `CpuBackend::fast()` differs only in the summation order of the matmuls, and is tested against
//! the reference. Ops run immediately; `read` and `collect_stats` never wait.

use std::collections::VecDeque;

use super::checks;
use super::cpu_fast;
use super::cpu_narrow;
use super::cpu_pool;
use super::cpu_sparse::{self, Source, WeightStep};
use super::reference as r;
use super::{param_step, weight_update_in_sequence};
use super::{Backend, Counters, DatasetId, Epilogue, Packed, ParamTensors, StepStats, TensorId};
use crate::data::{Dataset, IMAGE_PIXELS};
use crate::error::{Error, Result};
use crate::optim::{Optimizer, OptimizerKind};

/// Which implementation of the matmuls to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuKind {
    /// The plain loops of `reference`: slow, obviously right.
    Reference,
    /// `matrixmultiply`'s sgemm on all cores, or `cpu_sparse` on mostly-zero inputs.
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
    /// Buffers of the sparse products, and how many have run; buffers of the narrow ones.
    sparse: cpu_sparse::Scratch,
    narrow: cpu_narrow::Scratch,
    sparse_products: u64,
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
            sparse: cpu_sparse::Scratch::default(),
            narrow: cpu_narrow::Scratch::default(),
            sparse_products: 0,
        }
    }

    pub fn reference() -> Self {
        Self::new(CpuKind::Reference)
    }

    pub fn fast() -> Self {
        Self::new(CpuKind::Fast)
    }

    /// Check the fast path's environment knobs (`GPU_MNIST_CPU_THREADS`, `GPU_MNIST_CPU_SIMD`):
    /// a value they can not take is a usage error naming the variable.
    pub fn check_settings() -> Result<()> {
        cpu_pool::threads_setting().map_err(|e| Error::usage("GPU_MNIST_CPU_THREADS", e))?;
        cpu_sparse::simd_setting().map_err(|e| Error::usage("GPU_MNIST_CPU_SIMD", e))
    }

    /// Products the fast path has run as sparse ones (`cpu_sparse`), for tests and `--verbose`.
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

    /// x (rows, 784) = images[order[start..start + rows]] / 255 (`reference::gather_batch`), and,
    /// with `sparse_rows`, x's rows held for the sparse products, built in the same pass.
    fn gather(
        &mut self,
        op: &'static str,
        x: TensorId,
        ds: DatasetId,
        start: usize,
        rows: usize,
        sparse_rows: bool,
    ) -> Result<()> {
        self.dataset(op, ds, start, rows)?;
        let v = self.view(op, x, rows * IMAGE_PIXELS)?;
        self.written(v.storage);
        let source = self.source(v, rows, IMAGE_PIXELS);
        let d = &self.datasets[ds.0];
        let xs = &mut self.storage[v.storage][v.offset..v.offset + v.len];
        if sparse_rows {
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

    /// Whether the fast path multiplies `inp` (rows, cols) as a sparse matrix into `out_cols`
    /// columns; if so, the sparse scratch holds its rows.
    fn sparse_rows(
        &mut self,
        op: &'static str,
        inp: TensorId,
        rows: usize,
        cols: usize,
        out_cols: usize,
    ) -> Result<bool> {
        if self.kind != CpuKind::Fast || !cpu_sparse::may_pay(out_cols) {
            return Ok(false);
        }
        let v = self.view(op, inp, rows * cols)?;
        let source = self.source(v, rows, cols);
        let x = &self.storage[v.storage][v.offset..v.offset + v.len];
        Ok(self.sparse.rows_if_sparse(x, source, out_cols))
    }

    /// The weight gradient of a dense layer with a sparse input and the optimizer step of its
    /// weight in one pass (`cpu_sparse::matmul_backward_weight`): dweight (C, OC) = inp (B, C)^T @
    /// dout (B, OC), each value applied to the weight as soon as it is summed.
    #[allow(clippy::too_many_arguments)]
    fn sparse_weight_update(
        &mut self,
        weight: ParamTensors,
        inp: TensorId,
        dout: TensorId,
        b: usize,
        c: usize,
        oc: usize,
        opt: &Optimizer,
    ) -> Result<()> {
        let op = "matmul_backward_weight_update";
        let n = c * oc;
        let rmsprop = opt.kind == OptimizerKind::RmsProp;
        // The gradient, the value and (RMSprop) the velocity are written: each must have an array
        // of its own, shared with nothing the op reads or writes.
        let (grad_v, value_v) = (self.view(op, weight.grad, n)?, self.view(op, weight.value, n)?);
        let velocity_v = rmsprop.then(|| self.view(op, weight.velocity, n)).transpose()?;
        let read = [self.view(op, inp, b * c)?, self.view(op, dout, b * oc)?];
        let all = [Some(grad_v), Some(value_v), velocity_v, Some(read[0]), Some(read[1])];
        for (i, w) in all[..3].iter().enumerate() {
            let shared = |w: &View| {
                all.iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.is_some_and(|o| o.storage == w.storage))
            };
            if w.as_ref().is_some_and(shared) {
                return Err(Error::shape(
                    op,
                    "a written tensor shares its array with another tensor of the op".to_string(),
                ));
            }
        }
        let take = |s: &mut Self, v: View| {
            s.written(v.storage);
            std::mem::take(&mut s.storage[v.storage])
        };
        let (mut grad, mut value) = (take(self, grad_v), take(self, value_v));
        let mut velocity = velocity_v.map(|v| (take(self, v), v));
        // The rows of inp held since `sparse_rows`, unless an op since (the bias gradient, when
        // it shares inp's array) wrote it: then they are rebuilt here.
        let source = self.source(read[0], b, c);
        let x = &self.storage[read[0].storage][read[0].offset..read[0].offset + read[0].len];
        self.sparse.hold_rows(x, source);
        let mut scratch = std::mem::take(&mut self.sparse);
        let d = &self.storage[read[1].storage][read[1].offset..read[1].offset + read[1].len];
        let range = |v: View| v.offset..v.offset + v.len;
        let step = match velocity.as_mut() {
            Some((array, v)) => WeightStep::RmsProp {
                value: &mut value[range(value_v)],
                velocity: &mut array[range(*v)],
                lr: opt.lr,
                rho: opt.rho,
                eps: opt.eps,
            },
            None => WeightStep::Sgd {
                value: &mut value[range(value_v)],
                lr: opt.lr,
            },
        };
        cpu_sparse::matmul_backward_weight(&mut grad[range(grad_v)], &mut scratch, d, step, b, c, oc);
        self.storage[grad_v.storage] = grad;
        self.storage[value_v.storage] = value;
        if let Some((array, v)) = velocity {
            self.storage[v.storage] = array;
        }
        self.sparse = scratch;
        self.sparse_products += 1;
        self.counters.dispatches += 1;
        Ok(())
    }
}

/// The most tensors an op reads: a matmul's two operands, its bias and its mask.
const MAX_INPUTS: usize = 4;

/// The tensors (and lengths) an op reads, held without allocating.
#[derive(Debug, Clone, Copy)]
struct Inputs {
    list: [(TensorId, usize); MAX_INPUTS],
    len: usize,
}

impl std::ops::Deref for Inputs {
    type Target = [(TensorId, usize)];
    fn deref(&self) -> &Self::Target {
        &self.list[..self.len]
    }
}

/// The matmul's two operands followed by the epilogue's tensors (bias, then mask) that are present.
fn with_epilogue_inputs(base: [(TensorId, usize); 2], epilogue: Epilogue, out_len: usize, n: usize) -> Inputs {
    let mut inputs = Inputs {
        list: [base[0], base[1], base[0], base[0]],
        len: 2,
    };
    for extra in [epilogue.bias.map(|t| (t, n)), epilogue.relu_mask.map(|t| (t, out_len))]
        .into_iter()
        .flatten()
    {
        inputs.list[inputs.len] = extra;
        inputs.len += 1;
    }
    inputs
}

/// The bias and mask slices of `epilogue` among `extra` (those present, in that order).
fn epilogue_tensors<'a>(extra: &[&'a [f32]], epilogue: Epilogue) -> (Option<&'a [f32]>, Option<&'a [f32]>) {
    let mut extra = extra.iter();
    let bias = epilogue.bias.and_then(|_| extra.next().copied());
    let mask = epilogue.relu_mask.and_then(|_| extra.next().copied());
    (bias, mask)
}

/// Run the epilogue on out (b, n); `extra` holds the bias and mask slices present, in that order.
fn apply_epilogue(kind: CpuKind, out: &mut [f32], extra: &[&[f32]], epilogue: Epilogue, b: usize, n: usize) {
    let (bias, mask) = epilogue_tensors(extra, epilogue);
    match kind {
        CpuKind::Reference => r::matmul_epilogue(out, bias, epilogue.relu, mask, b, n),
        CpuKind::Fast => cpu_fast::matmul_epilogue(out, bias, epilogue.relu, mask, b, n),
    }
}

/// The least work, in multiply-adds, worth a piece of its own when a dense product is split over
/// threads (a hand-off costs about a microsecond, this much work about five).
const SPLIT_MIN_MACS: usize = 1 << 18;

/// C (m, n) = A @ B with A given by (row stride, col stride) and B likewise: the three matmuls of
/// the step are this one call with different strides. A product with a narrow side (the output
/// layer's) runs `cpu_narrow` on this thread; otherwise C's rows are cut into pieces spread over
/// `cpu_pool`'s threads, each running `matrixmultiply`'s single-threaded sgemm on its share.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    c: &mut [f32],
    narrow: &mut cpu_narrow::Scratch,
) {
    if cpu_narrow::fits(k, n) {
        cpu_narrow::matmul(m, k, n, a, (rsa, csa), b, (rsb, csb), c, narrow);
        return;
    }
    let c = &mut c[..m * n];
    if m == 0 || n == 0 || k == 0 {
        c.fill(0.0);
        return;
    }
    // A piece per SPLIT_MIN_MACS of work, up to `chunk_count` (each piece is one sgemm call).
    let chunks = (m * k * n / SPLIT_MIN_MACS).clamp(1, cpu_sparse::chunk_count(m));
    let rows = m.div_ceil(chunks);
    let mut pieces = c.chunks_mut(rows * n).enumerate();
    let items: [_; cpu_sparse::MAX_CHUNKS] = std::array::from_fn(|_| pieces.next());
    cpu_pool::for_each(items, &|(i, c): (usize, &mut [f32])| {
        let first = i * rows;
        let m = c.len() / n;
        assert!(a.len() > (first + m - 1) * rsa + (k - 1) * csa && b.len() > (k - 1) * rsb + (n - 1) * csb);
        // SAFETY: the assert above checks that every index the strides reach from row `first` of
        // A, and in B, is inside `a` and `b`; `c` holds this piece's m rows of n.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr().add(first * rsa),
                rsa as isize,
                csa as isize,
                b.as_ptr(),
                rsb as isize,
                csb as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    });
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        match self.kind {
            CpuKind::Reference => "cpu reference (plain loops, 1 thread)".to_string(),
            CpuKind::Fast => {
                let threads = cpu_pool::threads();
                format!("cpu (sparse + matrixmultiply, {threads} threads)")
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

    fn read(&mut self, t: TensorId) -> Result<Vec<f32>> {
        let len = self.view("read", t, 0).map(|_| self.tensors[t.0].len)?;
        let v = self.tensor("read", t, len)?.to_vec();
        self.counters.readbacks += 1;
        Ok(v)
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

    fn gather_batch(&mut self, x: TensorId, ds: DatasetId, start: usize, rows: usize) -> Result<()> {
        self.gather("gather_batch", x, ds, start, rows, false)
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
        // On the fast path the pixels become x and the rows of the sparse product in one pass.
        let sparse = self.kind == CpuKind::Fast && cpu_sparse::may_pay(oc);
        self.gather("gather_matmul_forward", x, ds, start, rows, sparse)?;
        self.matmul_forward(out, x, weight, epilogue, rows, IMAGE_PIXELS, oc)
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
        let kind = self.kind;
        let inputs = with_epilogue_inputs([(inp, b * c), (weight, c * oc)], epilogue, b * oc, oc);
        if self.sparse_rows("matmul_forward", inp, b, c, oc)? {
            let mut scratch = std::mem::take(&mut self.sparse);
            let result = self.with_out("matmul_forward", (out, b * oc), &inputs, |o, i| {
                let (bias, mask) = epilogue_tensors(&i[2..], epilogue);
                cpu_sparse::matmul_forward(o, &mut scratch, i[1], bias, epilogue.relu, b, c, oc);
                cpu_fast::matmul_epilogue(o, None, false, mask, b, oc);
            });
            self.sparse = scratch;
            self.sparse_products += 1;
            return result;
        }
        let mut narrow = std::mem::take(&mut self.narrow);
        let result = self.with_out("matmul_forward", (out, b * oc), &inputs, |o, i| {
            match kind {
                CpuKind::Reference => r::matmul_forward(o, i[0], i[1], b, c, oc),
                CpuKind::Fast => sgemm(b, c, oc, i[0], c, 1, i[1], oc, 1, o, &mut narrow),
            }
            apply_epilogue(kind, o, &i[2..], epilogue, b, oc);
        });
        self.narrow = narrow;
        result
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
        let kind = self.kind;
        let inputs = with_epilogue_inputs([(dout, b * oc), (weight, c * oc)], epilogue, b * c, c);
        let mut narrow = std::mem::take(&mut self.narrow);
        let result = self.with_out("matmul_backward_input", (dinp, b * c), &inputs, |o, i| {
            match kind {
                CpuKind::Reference => r::matmul_backward_input(o, i[0], i[1], b, c, oc),
                // (B, OC) @ (OC, C) where weight^T is weight read with swapped strides.
                CpuKind::Fast => sgemm(b, oc, c, i[0], oc, 1, i[1], 1, oc, o, &mut narrow),
            }
            apply_epilogue(kind, o, &i[2..], epilogue, b, c);
        });
        self.narrow = narrow;
        result
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
        if let Some(dbias) = dbias {
            self.bias_backward(dbias, dout, b, oc)?;
        }
        if self.sparse_rows("matmul_backward_weight", inp, b, c, oc)? {
            let mut scratch = std::mem::take(&mut self.sparse);
            let result = self.with_out(
                "matmul_backward_weight",
                (dweight, c * oc),
                &[(inp, b * c), (dout, b * oc)],
                |o, i| {
                    let step = WeightStep::None;
                    cpu_sparse::matmul_backward_weight(o, &mut scratch, i[1], step, b, c, oc);
                },
            );
            self.sparse = scratch;
            self.sparse_products += 1;
            return result;
        }
        let kind = self.kind;
        let mut narrow = std::mem::take(&mut self.narrow);
        let result = self.with_out(
            "matmul_backward_weight",
            (dweight, c * oc),
            &[(inp, b * c), (dout, b * oc)],
            |o, i| match kind {
                CpuKind::Reference => r::matmul_backward_weight(o, i[0], i[1], b, c, oc),
                // (C, B) @ (B, OC) where inp^T is inp read with swapped strides.
                CpuKind::Fast => sgemm(c, b, oc, i[0], 1, c, i[1], oc, 1, o, &mut narrow),
            },
        );
        self.narrow = narrow;
        result
    }

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
        if !self.sparse_rows("matmul_backward_weight_update", inp, b, c, oc)? {
            return weight_update_in_sequence(self, weight, bias, inp, dout, b, c, oc, opt);
        }
        self.bias_backward(bias.grad, dout, b, oc)?;
        self.sparse_weight_update(weight, inp, dout, b, c, oc, opt)?;
        param_step(self, bias, oc, opt)
    }

    fn bias_add_forward(&mut self, out: TensorId, bias: TensorId, b: usize, oc: usize) -> Result<()> {
        self.with_out("bias_add_forward", (out, b * oc), &[(bias, oc)], |o, i| {
            r::bias_add_forward(o, i[0], b, oc)
        })
    }

    fn bias_backward(&mut self, dbias: TensorId, dout: TensorId, b: usize, oc: usize) -> Result<()> {
        let kind = self.kind;
        self.with_out("bias_backward", (dbias, oc), &[(dout, b * oc)], |o, i| match kind {
            CpuKind::Reference => r::bias_backward(o, i[0], b, oc),
            CpuKind::Fast => cpu_fast::bias_backward(o, i[0], b, oc),
        })
    }

    fn relu_forward(&mut self, out: TensorId, inp: TensorId, n: usize) -> Result<()> {
        self.with_out("relu_forward", (out, n), &[(inp, n)], |o, i| r::relu_forward(o, i[0]))
    }

    fn relu_backward(&mut self, dinp: TensorId, dout: TensorId, out: TensorId, n: usize) -> Result<()> {
        self.with_out("relu_backward", (dinp, n), &[(dout, n), (out, n)], |o, i| {
            r::relu_backward(o, i[0], i[1])
        })
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
        // The velocity's array is taken out too: it is written, and must alias nothing.
        let vv = self.view(op, velocity, n)?;
        if vv.storage == self.view(op, param, n)?.storage || vv.storage == self.view(op, grad, n)?.storage {
            return Err(Error::shape(
                op,
                "velocity shares its array with the parameter or gradient".to_string(),
            ));
        }
        self.written(vv.storage);
        let mut varray = std::mem::take(&mut self.storage[vv.storage]);
        let v = &mut varray[vv.offset..vv.offset + n];
        let kind = self.kind;
        let result = self.with_out(op, (param, n), &[(grad, n)], |p, g| match kind {
            CpuKind::Reference => r::rmsprop_update(p, v, g[0], lr, rho, eps),
            CpuKind::Fast => cpu_fast::rmsprop_update(p, v, g[0], lr, rho, eps),
        });
        self.storage[vv.storage] = varray;
        result
    }

    fn sgd_update(&mut self, param: TensorId, grad: TensorId, n: usize, lr: f32) -> Result<()> {
        self.with_out("sgd_update", (param, n), &[(grad, n)], |p, g| {
            r::sgd_update(p, g[0], lr)
        })
    }

    fn request_stats(&mut self, first: usize, count: usize) -> Result<()> {
        checks::stats_read(first, count, self.stats.len())?;
        self.counters.readbacks += 1;
        self.requested.push_back(self.stats[first..first + count].to_vec());
        Ok(())
    }

    fn collect_stats(&mut self) -> Result<Vec<StepStats>> {
        self.requested
            .pop_front()
            .ok_or_else(|| Error::shape("collect_stats", "no statistics were requested".to_string()))
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
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
