//! Whole training steps through the layer graph: the GPU and the fast CPU path against the CPU
//! reference for one step, 50 GPU steps against the CPU path, and repeatability of seeded runs.

mod common;

use common::*;
use gpu_mnist::backend::cpu::CpuBackend;
use gpu_mnist::backend::{Backend, StepStats};
use gpu_mnist::data::{batches, epoch_order, Dataset};
use gpu_mnist::model::{glorot_init, Batch, Graph, HostTensor, ModelSpec};
use gpu_mnist::optim::{Optimizer, OptimizerKind};

const BATCH: usize = 128;

/// Run `steps` training steps of the reference model on `data` (epoch 0's order of seed 1) and
/// return each step's statistics, the final gradients and the final parameters.
fn run_steps(be: &mut dyn Backend, data: &Dataset, steps: usize) -> (Vec<StepStats>, Vec<HostTensor>, Vec<HostTensor>) {
    let spec = ModelSpec::mnist(&[512]);
    let mut graph = Graph::new(be, &spec, BATCH).unwrap();
    graph.set_params(be, &glorot_init(&spec, 1)).unwrap();
    let ds = be.upload_dataset(data).unwrap();
    be.set_order(ds, &epoch_order(data.len(), 1, 0)).unwrap();
    be.reserve_stats(steps).unwrap();
    let opt = Optimizer::new(OptimizerKind::RmsProp, None).unwrap();
    for (slot, (start, rows)) in batches(data.len(), BATCH).take(steps).enumerate() {
        graph
            .train_step(
                be,
                Batch { ds, rows },
                gpu_mnist::backend::StepAt {
                    start,
                    slot,
                    step: slot,
                },
                &opt,
            )
            .unwrap();
    }
    let stats = pollster::block_on(gpu_mnist::backend::read_stats(be, steps)).unwrap();
    (
        stats,
        pollster::block_on(graph.grads_to_host(be)).unwrap(),
        pollster::block_on(graph.params_to_host(be)).unwrap(),
    )
}

fn flatten_compare(what: &str, got: &[HostTensor], want: &[HostTensor], atol: f32, rtol: f32) {
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.name, w.name);
        assert_close(&format!("{what} {}", g.name), &g.data, &w.data, atol, rtol);
    }
}

/// One step of `be` against the CPU reference on the first MNIST batch: the loss sum (rtol 1e-4),
/// the correct count (exact), the gradients (atol 1e-7 + rtol 1e-3) and the updated parameters
/// (atol 1e-6 + rtol 1e-3). Returns the updated parameters.
fn one_step_matches_the_reference(what: &str, be: &mut dyn Backend) -> Vec<HostTensor> {
    let data = mnist().train.first(BATCH);
    let (stats, grads, params) = run_steps(be, &data, 1);
    let (ref_stats, ref_grads, ref_params) = run_steps(&mut CpuBackend::reference(), &data, 1);
    assert_close(
        &format!("{what}: loss sum"),
        &[stats[0].loss_sum],
        &[ref_stats[0].loss_sum],
        0.0,
        1e-4,
    );
    assert_eq!(stats[0].correct, ref_stats[0].correct, "{what}: correct count");
    flatten_compare(&format!("{what}: gradient"), &grads, &ref_grads, 1e-7, 1e-3);
    flatten_compare(&format!("{what}: updated"), &params, &ref_params, 1e-6, 1e-3);
    params
}

#[test]
fn one_gpu_step_matches_the_cpu_reference() {
    let params = one_step_matches_the_reference("one step", &mut gpu());
    // The step must have done something: every tensor moved away from its initial value.
    let init = glorot_init(&ModelSpec::mnist(&[512]), 1);
    for (p, i) in params.iter().zip(&init) {
        assert!(
            p.data.iter().zip(&i.data).any(|(a, b)| a != b),
            "{} did not change",
            p.name
        );
    }
}

/// The GPU's step with the output layer fused into one dispatch (output_layer.wgsl): the same
/// tolerances, and 4 dispatches a step instead of 7.
#[test]
fn one_gpu_step_with_the_fused_output_layer_matches_the_cpu_reference() {
    let mut be = gpu();
    be.set_output_layer_fusion(true);
    assert!(
        be.output_layer_fusion_available(),
        "{} has fewer than 9 storage buffers a stage: the fused output layer can not be tested on it",
        be.name()
    );
    one_step_matches_the_reference("one fused-output step", &mut be);
    assert_eq!(
        be.counters().dispatches,
        4,
        "gather, layer 1 forward, output layer, layer 1 update"
    );
}

/// The fast CPU path's step (the first layer's products sparse, the optimizer step fused into the
/// weight gradient) against the reference on a real MNIST batch, with the same tolerances as the
/// GPU's step above; and it must have taken the sparse path.
#[test]
fn one_fast_cpu_step_matches_the_cpu_reference() {
    let mut fast = fast_cpu();
    one_step_matches_the_reference("one fast cpu step", &mut fast);
    assert_eq!(fast.sparse_products(), 2, "the first layer's products were not sparse");
}

#[test]
fn fifty_gpu_steps_lower_the_loss_and_track_the_cpu_path() {
    let data = mnist().train.first(50 * BATCH);
    let (gpu_stats, _, _) = run_steps(&mut gpu(), &data, 50);
    let (cpu_stats, _, _) = run_steps(&mut fast_cpu(), &data, 50);
    let mut fused = gpu();
    fused.set_output_layer_fusion(true);
    let (fused_stats, _, _) = run_steps(&mut fused, &data, 50);
    let mean = |s: &[StepStats]| s.iter().map(|x| x.loss_sum as f64 / BATCH as f64).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&gpu_stats[..5]), mean(&gpu_stats[45..]));
    println!("gpu mean loss, steps 1-5: {first:.4}, steps 46-50: {last:.4}");
    assert!(last < 0.6 * first, "the loss did not fall: {first} -> {last}");
    let gpu_losses: Vec<f32> = gpu_stats.iter().map(|s| s.loss_sum / BATCH as f32).collect();
    let cpu_losses: Vec<f32> = cpu_stats.iter().map(|s| s.loss_sum / BATCH as f32).collect();
    assert_close(
        "50 steps: per-step loss, gpu vs cpu path",
        &gpu_losses,
        &cpu_losses,
        1e-4,
        1e-3,
    );
    let fused_losses: Vec<f32> = fused_stats.iter().map(|s| s.loss_sum / BATCH as f32).collect();
    assert_close(
        "50 steps: per-step loss, gpu with the fused output layer vs cpu path",
        &fused_losses,
        &cpu_losses,
        1e-4,
        1e-3,
    );
}

#[test]
fn seeded_runs_repeat_bit_for_bit_on_each_device() {
    let data = mnist().train.first(20 * BATCH);
    let bits = |s: &[StepStats]| s.iter().map(|x| (x.loss_sum.to_bits(), x.correct)).collect::<Vec<_>>();
    let (a, _, pa) = run_steps(&mut gpu(), &data, 20);
    let (b, _, pb) = run_steps(&mut gpu(), &data, 20);
    assert_eq!(bits(&a), bits(&b), "gpu losses differ between identical runs");
    assert_eq!(pa, pb, "gpu parameters differ between identical runs");
    let fused = || {
        let mut be = gpu();
        be.set_output_layer_fusion(true);
        be
    };
    let (e, _, pe) = run_steps(&mut fused(), &data, 20);
    let (f, _, pf) = run_steps(&mut fused(), &data, 20);
    assert_eq!(
        bits(&e),
        bits(&f),
        "fused-output gpu losses differ between identical runs"
    );
    assert_eq!(pe, pf, "fused-output gpu parameters differ between identical runs");
    let (c, _, pc) = run_steps(&mut fast_cpu(), &data, 20);
    let (d, _, pd) = run_steps(&mut fast_cpu(), &data, 20);
    assert_eq!(bits(&c), bits(&d), "cpu losses differ between identical runs");
    assert_eq!(pc, pd, "cpu parameters differ between identical runs");
}
