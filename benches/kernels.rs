//! Criterion benchmarks of each op of the training step and of a whole step, per device (the fast
//! CPU path, the CPU reference where affordable, and the wgpu adapter when there is one). Every
//! timed iteration ends with `Backend::sync`, so the GPU has finished before the clock stops.
//!
//!   cargo bench --bench kernels            (add `-- matmul` to run one group)

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gpu_mnist::backend::cpu::CpuBackend;
use gpu_mnist::backend::wgpu::WgpuBackend;
use gpu_mnist::backend::{Backend, Epilogue};
use gpu_mnist::data::{epoch_order, Dataset, IMAGE_PIXELS};
use gpu_mnist::model::{glorot_init, Graph, ModelSpec};
use gpu_mnist::optim::{Optimizer, OptimizerKind};

const B: usize = 128;
const C: usize = 784;
const OC: usize = 512;

/// The devices to measure; a machine without a GPU adapter measures the CPU only (and says so).
fn devices() -> Vec<Box<dyn Backend>> {
    let mut out: Vec<Box<dyn Backend>> = vec![Box::new(CpuBackend::fast())];
    match WgpuBackend::open(None, false) {
        Ok(gpu) => out.push(Box::new(gpu)),
        Err(e) => eprintln!("benches: no GPU adapter ({e}); measuring the CPU only"),
    }
    out
}

fn short(name: &str) -> String {
    name.split(" (").next().unwrap_or(name).replace(['\'', ' '], "_")
}

/// n synthetic images as sparse as MNIST's (about 19 % of the pixels lit), which the CPU path's
/// first layer exploits.
fn synthetic(n: usize) -> Dataset {
    let lit = |i: usize| (i.wrapping_mul(2_654_435_761) >> 7) % 100 < 19;
    let images = (0..n * IMAGE_PIXELS)
        .map(|i| if lit(i) { (1 + i * 131 % 255) as u8 } else { 0 })
        .collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Dataset::new(images, labels).expect("consistent sizes")
}

fn ops(c: &mut Criterion) {
    for mut be in devices() {
        let be = be.as_mut();
        let dev = short(&be.name());
        let t = |be: &mut dyn Backend, n: usize, v: f32| {
            let id = be.alloc(n).expect("alloc");
            be.write(id, &vec![v; n]).expect("write");
            id
        };
        let (inp, w, bias, out) = (
            t(be, B * C, 0.5),
            t(be, C * OC, 0.01),
            t(be, OC, 0.1),
            t(be, B * OC, 0.1),
        );
        let (dinp, dw, grad, vel) = (
            t(be, B * C, 0.0),
            t(be, C * OC, 0.0),
            t(be, C * OC, 1e-3),
            t(be, C * OC, 0.0),
        );
        let data = synthetic(1024);
        let ds = be.upload_dataset(&data).expect("dataset");
        be.set_order(ds, &epoch_order(data.len(), 0, 0)).expect("order");
        be.reserve_stats(1).expect("stats");
        let logits = t(be, B * 10, 0.3);
        let dlogits = t(be, B * 10, 0.0);

        let mut group = c.benchmark_group(format!("ops/{dev}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        let fwd = Epilogue {
            bias: Some(bias),
            relu: true,
            relu_mask: None,
        };
        let mut bench = |name: &str, f: &mut dyn FnMut(&mut dyn Backend)| {
            group.bench_function(name, |bench| {
                bench.iter(|| {
                    f(&mut *be);
                    be.sync().expect("sync");
                })
            });
        };
        bench("matmul_forward+bias+relu 128x784x512", &mut |be| {
            be.matmul_forward(out, inp, w, fwd, B, C, OC).expect("op")
        });
        bench("matmul_backward_input 128x512x784", &mut |be| {
            be.matmul_backward_input(dinp, out, w, Epilogue::default(), B, C, OC)
                .expect("op")
        });
        bench("matmul_backward_weight 784x128x512", &mut |be| {
            be.matmul_backward_weight(dw, None, inp, out, B, C, OC).expect("op")
        });
        bench("bias_backward 128x512", &mut |be| {
            be.bias_backward(bias, out, B, OC).expect("op")
        });
        bench("gather_batch 128", &mut |be| {
            be.gather_batch(inp, ds, 0, B).expect("op")
        });
        // The first layer's products on MNIST-like pixels (mostly zeros), as a step runs them.
        bench("gather+matmul_forward+bias+relu 128x784x512 sparse pixels", &mut |be| {
            be.gather_matmul_forward(out, inp, ds, 0, w, fwd, B, OC).expect("op")
        });
        bench("matmul_backward_weight 784x128x512 sparse pixels", &mut |be| {
            be.matmul_backward_weight(dw, None, inp, out, B, C, OC).expect("op")
        });
        bench("softmax_xent 128x10", &mut |be| {
            be.softmax_xent_forward_backward(Some(dlogits), logits, ds, 0, B, 10, 0)
                .expect("op")
        });
        bench("rmsprop_update 401408", &mut |be| {
            be.rmsprop_update(w, vel, grad, C * OC, 1e-3, 0.9, 1e-7).expect("op")
        });
        group.finish();
        black_box(be.read(out).expect("read"));
    }
}

fn training_step(c: &mut Criterion) {
    for mut be in devices() {
        let be = be.as_mut();
        let dev = short(&be.name());
        let spec = ModelSpec::mnist(&[512]);
        let graph = Graph::new(be, &spec, B).expect("graph");
        graph.set_params(be, &glorot_init(&spec, 0)).expect("params");
        let data = synthetic(4096);
        let ds = be.upload_dataset(&data).expect("dataset");
        be.set_order(ds, &epoch_order(data.len(), 0, 0)).expect("order");
        be.reserve_stats(1).expect("stats");
        let opt = Optimizer::new(OptimizerKind::RmsProp, None).expect("optimizer");
        let mut group = c.benchmark_group(format!("step/{dev}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(3));
        let mut start = 0;
        group.bench_function("train_step 784-512-10 batch 128", |bench| {
            bench.iter(|| {
                graph.train_step(be, ds, start, B, 0, &opt).expect("step");
                be.sync().expect("sync");
                start = (start + B) % (data.len() - B);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, ops, training_step);
criterion_main!(benches);
