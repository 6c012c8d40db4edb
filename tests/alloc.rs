//! The fast CPU path allocates nothing in a training step of the book's model once the first
//! steps have sized its buffers: the first layer's products are sparse, the output layer's narrow
//! (neither goes through a GEMM), and every op keeps its scratch. A convnet step allocates nothing
//! either where the CPU has AVX-512 (the path's own GEMM keeps its packing buffers); elsewhere
//! `matrixmultiply` allocates one per call. (Its own file: the counting allocator is
//! process-wide.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use gpu_mnist::backend::Backend;
use gpu_mnist::data::{batches, epoch_order};
use gpu_mnist::model::{glorot_init, Batch, Graph, ModelSpec};
use gpu_mnist::optim::{Optimizer, OptimizerKind};

/// Counts every allocation and reallocation, on any thread.
struct CountingAlloc;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The counter is process-wide: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_cpu_training_step_allocates_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let data = mnist().train.first(40 * 128);
    let mut be = fast_cpu();
    let spec = ModelSpec::mnist(&[512]);
    let mut graph = Graph::new(&mut be, &spec, 128).unwrap();
    graph.set_params(&mut be, &glorot_init(&spec, 3)).unwrap();
    let ds = be.upload_dataset(&data).unwrap();
    be.set_order(ds, &epoch_order(data.len(), 3, 0)).unwrap();
    be.reserve_stats(1).unwrap();
    let opt = Optimizer::new(OptimizerKind::RmsProp, None).unwrap();
    let steps: Vec<(usize, usize)> = batches(data.len(), 128).collect();
    for &(start, rows) in &steps[..5] {
        graph
            .train_step(
                &mut be,
                Batch { ds, rows },
                gpu_mnist::backend::StepAt {
                    start,
                    slot: 0,
                    step: 0,
                },
                &opt,
            )
            .unwrap();
    }
    let counted = 30;
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for &(start, rows) in &steps[5..5 + counted] {
        graph
            .train_step(
                &mut be,
                Batch { ds, rows },
                gpu_mnist::backend::StepAt {
                    start,
                    slot: 0,
                    step: 0,
                },
                &opt,
            )
            .unwrap();
    }
    let per_step = (ALLOCATIONS.load(Ordering::SeqCst) - before) as f64 / counted as f64;
    println!("{per_step:.2} allocations a step ({})", be.name());
    assert_eq!(
        be.sparse_products(),
        2 * (5 + counted) as u64,
        "the first layer was not sparse"
    );
    assert_eq!(per_step, 0.0, "{per_step} allocations a step");
}

/// A convnet step on the fast CPU path, once the first steps have sized its patch matrices and
/// scratch, allocates nothing where the CPU path runs its own GEMM (AVX-512), and elsewhere only
/// `matrixmultiply`'s packing buffers: one per sgemm call, at most one call per piece of each
/// product (16 pieces at the most) and a K split's 8.
#[test]
fn a_cpu_convnet_step_allocates_nothing_but_foreign_gemm_packing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let data = mnist().train.first(20 * 64);
    let mut be = fast_cpu();
    let spec = ModelSpec::convnet();
    let mut graph = Graph::new(&mut be, &spec, 64).unwrap();
    graph.set_params(&mut be, &glorot_init(&spec, 3)).unwrap();
    let ds = be.upload_dataset(&data).unwrap();
    be.set_order(ds, &epoch_order(data.len(), 3, 0)).unwrap();
    be.reserve_stats(1).unwrap();
    let opt = Optimizer::new(OptimizerKind::RmsProp, None).unwrap();
    let steps: Vec<(usize, usize)> = batches(data.len(), 64).collect();
    let mut per_step = Vec::new();
    for (i, &(start, rows)) in steps.iter().enumerate() {
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        graph
            .train_step(
                &mut be,
                Batch { ds, rows },
                gpu_mnist::backend::StepAt {
                    start,
                    slot: 0,
                    step: 0,
                },
                &opt,
            )
            .unwrap();
        if i >= 3 {
            per_step.push(ALLOCATIONS.load(Ordering::SeqCst) - before);
        }
    }
    println!("allocations a convnet step: {per_step:?} ({})", be.name());
    if be.name().contains("avx512 gemm") {
        assert!(per_step.iter().all(|&n| n == 0), "allocations a step: {per_step:?}");
        return;
    }
    // 6 products and 3 weight gradients go through sgemm; none allocates more than its pieces.
    let most = per_step.iter().max().copied().unwrap_or(0);
    assert!(most <= 9 * 16, "{most} allocations in a step");
    assert!(
        per_step.windows(2).all(|w| w[0] == w[1]),
        "steps allocate differently: {per_step:?}"
    );
}
