//! Whole training steps of the book's convnet (conv 3x3 x3 with max pooling, then dense) through
//! the layer graph: the fast CPU path and the GPU against the CPU reference for one step, GPU steps
//! against the fast CPU path, and repeatability. Small batches keep the GPU tests quick on a
//! software adapter.

mod common;

use common::*;
use gpu_mnist::backend::cpu::CpuBackend;
use gpu_mnist::backend::{read_stats, Backend, StepAt, StepStats};
use gpu_mnist::data::{batches, epoch_order, Dataset};
use gpu_mnist::model::{glorot_init, Batch, Graph, HostTensor, ModelSpec};
use gpu_mnist::optim::{Optimizer, OptimizerKind};

/// Run `steps` training steps of `spec` in batches of `batch` on `data` (epoch 0's order of seed
/// 1) and return each step's statistics, the final gradients and the final parameters.
fn run_steps(
    be: &mut dyn Backend,
    spec: &ModelSpec,
    (data, batch): (&Dataset, usize),
    steps: usize,
) -> (Vec<StepStats>, Vec<HostTensor>, Vec<HostTensor>) {
    let mut graph = Graph::new(be, spec, batch).unwrap();
    graph.set_params(be, &glorot_init(spec, 1)).unwrap();
    let ds = be.upload_dataset(data).unwrap();
    be.set_order(ds, &epoch_order(data.len(), 1, 0)).unwrap();
    be.reserve_stats(steps).unwrap();
    let opt = Optimizer::new(OptimizerKind::RmsProp, None).unwrap();
    for (slot, (start, rows)) in batches(data.len(), batch).take(steps).enumerate() {
        graph
            .train_step(
                be,
                Batch { ds, rows },
                StepAt {
                    start,
                    slot,
                    step: slot,
                },
                &opt,
            )
            .unwrap();
    }
    let stats = pollster::block_on(read_stats(be, steps)).unwrap();
    (
        stats,
        pollster::block_on(graph.grads_to_host(be)).unwrap(),
        pollster::block_on(graph.params_to_host(be)).unwrap(),
    )
}

/// One step of `be` against the CPU reference on the first `batch` MNIST images: the loss sum
/// (rtol 1e-4), the correct count (exact), every gradient (atol 1e-6 + rtol 1e-3 of the largest
/// value of the tensor, printed) and the updated parameters (atol 1e-6 + rtol 1e-3).
fn one_step_matches_the_reference(what: &str, be: &mut dyn Backend, batch: usize) {
    let spec = ModelSpec::convnet();
    let data = mnist().train.first(batch);
    let (stats, grads, params) = run_steps(be, &spec, (&data, batch), 1);
    let (want_stats, want_grads, want_params) = run_steps(&mut CpuBackend::reference(), &spec, (&data, batch), 1);
    assert_close(
        &format!("{what}: loss sum"),
        &[stats[0].loss_sum],
        &[want_stats[0].loss_sum],
        0.0,
        1e-4,
    );
    assert_eq!(stats[0].correct, want_stats[0].correct, "{what}: correct count");
    for (g, w) in grads.iter().zip(&want_grads) {
        assert_eq!(g.name, w.name);
        let scale = w.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        // NaN-aware: a NaN on either side makes `worst` NaN, which fails the check below.
        let worst = g
            .data
            .iter()
            .zip(&w.data)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0.0f32,
                |m, d| if m.is_nan() || d.is_nan() { f32::NAN } else { m.max(d) },
            );
        println!(
            "{what}: gradient {}: max |diff| {worst:e} (largest value {scale:e})",
            g.name
        );
        assert!(
            worst <= 1e-6 + 1e-3 * scale && scale.is_finite(),
            "{what}: gradient {} differs by {worst}",
            g.name
        );
    }
    for (p, w) in params.iter().zip(&want_params) {
        assert_close(&format!("{what}: updated {}", p.name), &p.data, &w.data, 1e-6, 1e-3);
    }
}

#[test]
fn one_fast_cpu_convnet_step_matches_the_reference() {
    one_step_matches_the_reference("fast cpu", &mut fast_cpu(), 64);
}

#[test]
fn one_gpu_convnet_step_matches_the_reference() {
    one_step_matches_the_reference("gpu", &mut gpu(), 6);
}

/// 20 steps of batch 8: the GPU's per-step losses track the fast CPU path's (within rtol 5e-3:
/// the two sum in different orders, and RMSprop, dividing by the root of a small running mean of
/// squared gradients, carries those last-bit differences forward, so they grow a little each
/// step; the first ten steps agree to 1e-6), and the loss falls.
#[test]
fn gpu_convnet_steps_track_the_cpu_path() {
    let spec = ModelSpec::convnet();
    let data = mnist().train.first(20 * 8);
    let (gpu_stats, _, _) = run_steps(&mut gpu(), &spec, (&data, 8), 20);
    let (cpu_stats, _, _) = run_steps(&mut fast_cpu(), &spec, (&data, 8), 20);
    let losses = |s: &[StepStats]| s.iter().map(|x| x.loss_sum / 8.0).collect::<Vec<f32>>();
    let (g, c) = (losses(&gpu_stats), losses(&cpu_stats));
    println!("gpu losses {g:?}\ncpu losses {c:?}");
    assert_close("20 convnet steps: per-step loss, gpu vs cpu path", &g, &c, 1e-4, 5e-3);
    assert_close("the first 10 of them", &g[..10], &c[..10], 1e-6, 1e-6);
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(mean(&g[15..]) < mean(&g[..5]), "the loss did not fall: {g:?}");
}

#[test]
fn seeded_convnet_runs_repeat_bit_for_bit_on_each_device() {
    let spec = ModelSpec::convnet();
    let data = mnist().train.first(6 * 8);
    let bits = |s: &[StepStats]| s.iter().map(|x| (x.loss_sum.to_bits(), x.correct)).collect::<Vec<_>>();
    let devices: [fn() -> Box<dyn Backend>; 2] = [|| Box::new(fast_cpu()), || Box::new(gpu())];
    for device in devices {
        let (mut a, mut b) = (device(), device());
        let name = a.name();
        let (sa, _, pa) = run_steps(a.as_mut(), &spec, (&data, 8), 6);
        let (sb, _, pb) = run_steps(b.as_mut(), &spec, (&data, 8), 6);
        assert_eq!(bits(&sa), bits(&sb), "{name}: losses differ between identical runs");
        assert_eq!(pa, pb, "{name}: parameters differ between identical runs");
    }
}

/// A convnet step allocates nothing on the fast CPU path once the first steps have sized its
/// scratch (checked in tests/alloc.rs for the dense model); here: a `--layers` model with 'same'
/// padding and a pool of 3 trains on the CPU paths and agrees with the reference.
#[test]
fn a_custom_stack_trains_on_the_cpu_paths() {
    let spec = ModelSpec::parse("--layers", "conv:5:5:same,pool:3,conv:7:3,flatten,dense:16,dense:10").unwrap();
    let data = mnist().train.first(3 * 10);
    let (fast, _, fast_params) = run_steps(&mut fast_cpu(), &spec, (&data, 10), 3);
    let (slow, _, slow_params) = run_steps(&mut CpuBackend::reference(), &spec, (&data, 10), 3);
    let loss = |s: &[StepStats]| s.iter().map(|x| x.loss_sum).collect::<Vec<f32>>();
    assert_close(
        "custom stack: losses, fast vs reference",
        &loss(&fast),
        &loss(&slow),
        1e-5,
        1e-3,
    );
    for (f, s) in fast_params.iter().zip(&slow_params) {
        assert_close(&format!("custom stack: {}", f.name), &f.data, &s.data, 1e-5, 1e-3);
    }
}

/// The fast CPU path runs a first layer's forward product and pool as one op (`ConvPool`) and the
/// pool's backward pass with the layer's weight gradient as another (`PoolWeightGradient`), where
/// its CPU has AVX-512: the book's plan starts and ends with them, a stack whose first layer is
/// not pooled has neither, and first layers the fused kernels do not take (16 filters, a narrow
/// product) or take with padding (48 filters, 'same') train as the reference does.
#[test]
fn a_first_layer_pool_and_weight_gradient_fuse_on_the_fast_cpu_path() {
    use gpu_mnist::backend::Op;
    use gpu_mnist::plan::PlanKind;
    let opt = Optimizer::new(OptimizerKind::RmsProp, None).unwrap();
    let data = mnist().train.first(3 * 10);
    let fused_ops = |spec: &ModelSpec| {
        let mut be = fast_cpu();
        let mut graph = Graph::new(&mut be, spec, 10).unwrap();
        let ds = be.upload_dataset(&data).unwrap();
        let plan = graph
            .plan(&mut be, PlanKind::Train, Batch { ds, rows: 10 }, Some(opt))
            .unwrap();
        let fused: Vec<usize> = (0..plan.len())
            .filter(|&i| matches!(plan[i], Op::PoolWeightGradient(_) | Op::ConvPool(_)))
            .collect();
        (fused, plan.len(), be.fusions().pool_weight_gradient)
    };
    let (fused, len, fuses) = fused_ops(&ModelSpec::convnet());
    println!("the book's plan: {len} ops, fused pool + weight gradient at {fused:?}");
    assert_eq!(fused, if fuses { vec![1, len - 1] } else { vec![] });
    let (fused, _, _) =
        fused_ops(&ModelSpec::parse("--layers", "conv:32:3,conv:32:3,pool:2,flatten,dense:10").unwrap());
    assert!(fused.is_empty(), "a first layer without a pool after it: {fused:?}");
    for layers in [
        "conv:16:3,pool:2,flatten,dense:10",
        "conv:48:3:same,pool:2,conv:8:3,flatten,dense:10",
    ] {
        let spec = ModelSpec::parse("--layers", layers).unwrap();
        let (fast, fast_grads, fast_params) = run_steps(&mut fast_cpu(), &spec, (&data, 10), 3);
        let (slow, slow_grads, slow_params) = run_steps(&mut CpuBackend::reference(), &spec, (&data, 10), 3);
        let loss = |s: &[StepStats]| s.iter().map(|x| x.loss_sum).collect::<Vec<f32>>();
        assert_close(
            &format!("{layers}: losses, fast vs reference"),
            &loss(&fast),
            &loss(&slow),
            1e-5,
            1e-3,
        );
        let pairs = fast_grads
            .iter()
            .zip(&slow_grads)
            .chain(fast_params.iter().zip(&slow_params));
        for (f, s) in pairs {
            assert_close(&format!("{layers}: {}", f.name), &f.data, &s.data, 1e-5, 1e-3);
        }
    }
}

/// A batch whose activations do not fit the GPU's largest storage binding is refused before
/// anything is allocated, with a usage error naming the layer and the limit (or, past what any
/// device holds, the activation count).
#[test]
fn a_batch_too_large_for_the_gpu_names_the_layer() {
    let adapter = gpu_mnist::backend::wgpu::list_adapters()
        .into_iter()
        .next()
        .expect("a wgpu adapter (install mesa-vulkan-drivers)");
    // The first layer's output: 26 x 26 x 32 values an image.
    let batch = (adapter.max_storage_buffer_binding_size / 4 / (26 * 26 * 32) + 1).to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["train", "--model", "convnet", "--device", "gpu", "--epochs", "1"])
        .args([
            "--batch-size",
            &batch,
            "--train-limit",
            "100",
            "--data",
            &data_arg(),
            "--out",
        ])
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("batch {batch}: {stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        (stderr.contains("layer conv2d_0 of conv:32:3") && stderr.contains("storage binding"))
            || stderr.contains("activation values"),
        "{stderr}"
    );
    assert!(!dir.path().join("run").exists(), "a refused run wrote its folder");
}
