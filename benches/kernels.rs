//! Criterion benchmarks of each op of the training step (`backend::ops::Op`, run with
//! `Backend::run`) and of a whole step, per device (the fast CPU path and the wgpu adapter when
//! there is one). Every timed iteration ends with `Backend::sync` (blocked on), so the GPU has
//! finished before the clock stops.
//!
//!   cargo bench --bench kernels            (add `-- matmul` to run one group)

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gpu_mnist::backend::cpu::CpuBackend;
use gpu_mnist::backend::ops::{DenseShape, FusedUpdate, Gather, Loss, Matmul, MatmulKind, Op, StepAt, Update};
use gpu_mnist::backend::wgpu::WgpuBackend;
use gpu_mnist::backend::{Backend, ParamTensors};
use gpu_mnist::data::{epoch_order, Dataset, IMAGE_PIXELS};
use gpu_mnist::model::{glorot_init, Batch, Graph, ModelSpec};
use gpu_mnist::optim::{Optimizer, OptimizerKind};

const B: usize = 128;
const C: usize = 784;
const OC: usize = 512;

/// The devices to measure; a machine without a GPU adapter measures the CPU only (and says so).
fn devices() -> Vec<Box<dyn Backend>> {
    let mut out: Vec<Box<dyn Backend>> = vec![Box::new(CpuBackend::fast(&gpu_mnist::settings::settings().cpu))];
    match WgpuBackend::open(None, false, &gpu_mnist::settings::settings().gpu) {
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

/// Block on a read-back (`Backend::sync`, `read`).
fn wait<T>(r: gpu_mnist::backend::Readback<'_, T>) -> T {
    pollster::block_on(r).expect("device")
}

/// A dense layer's product of `kind` over a batch of B, C inputs and OC outputs.
fn product(kind: MatmulKind) -> Op {
    let shape = DenseShape {
        rows: B,
        inputs: C,
        outputs: OC,
    };
    Op::Matmul(Matmul {
        shape,
        kind,
        conv: None,
    })
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
        let (inp, out, dinp) = (t(be, B * C, 0.5), t(be, B * OC, 0.1), t(be, B * C, 0.0));
        // The layer's parameters as the graph keeps them: packed values, gradients, velocities,
        // momenta.
        let packed = [0.01, 1e-3, 0.0, 0.0].map(|v| {
            let p = be.alloc_packed(&[C * OC, OC]).expect("alloc");
            let whole = vec![v; p.len];
            be.write(p.whole, &whole).expect("write");
            p
        });
        let param = |k: usize| ParamTensors {
            value: packed[0].parts[k],
            grad: packed[1].parts[k],
            velocity: packed[2].parts[k],
            momentum: packed[3].parts[k],
        };
        let (weight, bias) = (param(0), param(1));
        let data = synthetic(1024);
        let ds = be.upload_dataset(&data).expect("dataset");
        be.set_order(ds, &epoch_order(data.len(), 0, 0)).expect("order");
        be.reserve_stats(1).expect("stats");
        let logits = t(be, B * 10, 0.3);
        let dlogits = t(be, B * 10, 0.0);
        let opt = Optimizer::new(OptimizerKind::RmsProp, None).expect("optimizer");

        let forward = product(MatmulKind::Forward {
            out,
            inp,
            weight: weight.value,
            bias: Some(bias.value),
            relu: true,
        });
        let backward_input = product(MatmulKind::BackwardInput {
            dinp,
            dout: out,
            weight: weight.value,
            relu_mask: None,
        });
        let backward_weight = |dbias, update| {
            product(MatmulKind::BackwardWeight {
                dweight: weight.grad,
                dbias,
                inp,
                dout: out,
                update,
            })
        };
        let fused_update = FusedUpdate {
            weight: weight.state(),
            bias: bias.state(),
            opt,
        };
        let gather = Op::Gather(Gather {
            x: inp,
            ds,
            rows: B,
            augment: None,
        });
        let loss = Op::Loss(Loss {
            logits,
            dlogits: Some(dlogits),
            ds,
            rows: B,
            classes: 10,
        });
        let update = Op::Update(Update {
            param: weight,
            len: C * OC,
            opt,
        });
        // The GPU runs updates only fused into the weight gradient: a lone one is measured where
        // it runs (the CPU).
        let lone_update = be.run(&update, StepAt::default()).is_ok();

        let mut group = c.benchmark_group(format!("ops/{dev}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        let mut bench = |name: &str, ops: &[Op]| {
            group.bench_function(name, |bench| {
                bench.iter(|| {
                    for op in ops {
                        be.run(op, StepAt::default()).expect("op");
                    }
                    wait(be.sync());
                })
            });
        };
        bench("matmul_forward+bias+relu 128x784x512", &[forward]);
        bench("matmul_backward_input 128x512x784", &[backward_input]);
        bench("matmul_backward_weight 784x128x512", &[backward_weight(None, None)]);
        bench(
            "matmul_backward_weight+dbias 784x128x512",
            &[backward_weight(Some(bias.grad), None)],
        );
        bench("gather_batch 128", &[gather]);
        // The first layer's products on MNIST-like pixels (mostly zeros), as a step runs them:
        // inp holds the gathered batch from here on.
        bench(
            "gather+matmul_forward+bias+relu 128x784x512 sparse pixels",
            &[gather, forward],
        );
        bench(
            "matmul_backward_weight 784x128x512 sparse pixels",
            &[backward_weight(None, None)],
        );
        bench(
            "matmul_backward_weight+dbias+rmsprop 784x128x512 sparse pixels",
            &[backward_weight(Some(bias.grad), Some(fused_update))],
        );
        bench("softmax_xent 128x10", &[loss]);
        if lone_update {
            bench("rmsprop_update 401408", &[update]);
        }
        group.finish();
        black_box(wait(be.read(out)));
    }
}

fn training_step(c: &mut Criterion) {
    for mut be in devices() {
        let be = be.as_mut();
        let dev = short(&be.name());
        let spec = ModelSpec::mnist(&[512]);
        let mut graph = Graph::new(be, &spec, B).expect("graph");
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
                graph
                    .train_step(
                        be,
                        Batch { ds, rows: B },
                        StepAt {
                            start,
                            ..StepAt::default()
                        },
                        &opt,
                    )
                    .expect("step");
                wait(be.sync());
                start = (start + B) % (data.len() - B);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, ops, training_step);
criterion_main!(benches);
