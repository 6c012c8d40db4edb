//! Every op of the training step (`backend::ops::Op`), on the GPU and on the fast CPU path,
//! against the CPU reference on random inputs at awkward shapes, and the plans that string them
//! together (`plan::train_ops`, `plan::fuse`). Tolerances (f32, different summation orders): exact
//! for gather and for the matmul epilogue's bias-add, ReLU and ReLU mask (checked through a
//! product with the identity, which is exact); atol 1e-5 + rtol 1e-4 for matmul and column sums,
//! where rtol is relative to the sum of the magnitudes of the terms (sum |a_k b_k|), the scale of
//! f32 rounding error; rtol 1e-4 for the softmax cross-entropy; rtol 1e-5 for the optimizer
//! updates.

mod common;

use common::*;
use gpu_mnist::backend::ops::{Fusions, MatmulKind, Op, OutputLayer, StepAt};
use gpu_mnist::backend::reference as r;
use gpu_mnist::backend::wgpu::TileConfig;
use gpu_mnist::backend::Backend;
use gpu_mnist::data::IMAGE_PIXELS;
use gpu_mnist::model::Batch;

/// (B, C, OC): awkward shapes (1, odd, prime, just under a tile) and the real layer-1 shape.
const SHAPES: [(usize, usize, usize); 5] = [(1, 1, 1), (3, 5, 7), (61, 100, 36), (127, 784, 65), (128, 784, 512)];

fn matmul_ops(be: &mut dyn Backend, (b, c, oc): (usize, usize, usize), seed: u64) {
    let name = be.name();
    let mut g = rng(seed);
    let inp = random_vec(&mut g, b * c, 1.0);
    let weight = random_vec(&mut g, c * oc, 1.0);
    let dout = random_vec(&mut g, b * oc, 1.0);
    let (t_inp, t_w, t_dout) = (upload(be, &inp), upload(be, &weight), upload(be, &dout));
    let t_out = be.alloc(b * oc).unwrap();
    let t_dinp = be.alloc(b * c).unwrap();
    let t_dw = be.alloc(c * oc).unwrap();
    let t_db = be.alloc(oc).unwrap();
    ops::forward(be, (t_out, t_inp, t_w), (None, false), (b, c, oc)).unwrap();
    ops::backward_input(be, (t_dinp, t_dout, t_w), None, (b, c, oc)).unwrap();
    ops::backward_weight(be, (t_dw, Some(t_db)), (t_inp, t_dout), (b, c, oc)).unwrap();

    // The same products over absolute values: the scale of each sum's rounding error.
    let (abs_inp, abs_w, abs_dout) = (abs(&inp), abs(&weight), abs(&dout));
    let shape = format!("{b}x{c}x{oc}");
    let (mut want, mut scale) = (vec![0.0; b * oc], vec![0.0; b * oc]);
    r::matmul_forward(&mut want, &inp, &weight, b, c, oc);
    r::matmul_forward(&mut scale, &abs_inp, &abs_w, b, c, oc);
    let got = download(be, t_out, b * oc);
    assert_close_scaled(
        &format!("{name} matmul_forward {shape}"),
        &got,
        &want,
        &scale,
        1e-5,
        1e-4,
    );
    let (mut want, mut scale) = (vec![0.0; b * c], vec![0.0; b * c]);
    r::matmul_backward_input(&mut want, &dout, &weight, b, c, oc);
    r::matmul_backward_input(&mut scale, &abs_dout, &abs_w, b, c, oc);
    let got = download(be, t_dinp, b * c);
    assert_close_scaled(
        &format!("{name} matmul_backward_input {shape}"),
        &got,
        &want,
        &scale,
        1e-5,
        1e-4,
    );
    let (mut want, mut scale) = (vec![0.0; c * oc], vec![0.0; c * oc]);
    r::matmul_backward_weight(&mut want, &inp, &dout, b, c, oc);
    r::matmul_backward_weight(&mut scale, &abs_inp, &abs_dout, b, c, oc);
    let got = download(be, t_dw, c * oc);
    assert_close_scaled(
        &format!("{name} matmul_backward_weight {shape}"),
        &got,
        &want,
        &scale,
        1e-5,
        1e-4,
    );
    let (mut want, mut scale) = (vec![0.0; oc], vec![0.0; oc]);
    r::bias_backward(&mut want, &dout, b, oc);
    r::bias_backward(&mut scale, &abs_dout, b, oc);
    let got = download(be, t_db, oc);
    assert_close_scaled(
        &format!("{name} matmul_backward_weight's bias gradient {shape}"),
        &got,
        &want,
        &scale,
        1e-5,
        1e-4,
    );
}

/// Every tiling the matmul shader is built with (tile sizes, chunk lengths, K slices), at shapes
/// that leave partial tiles, partial chunks and slices with no chunk at all.
#[test]
fn every_matmul_tiling_matches_the_reference() {
    let mut be = gpu();
    let mut tilings = vec![
        (32, 32, 16, 4),
        (32, 16, 8, 8),
        (16, 32, 8, 8),
        (64, 64, 16, 1),
        (64, 32, 8, 2),
        (16, 16, 32, 4),
        (8, 8, 4, 16),
        (8, 32, 8, 2),
    ];
    // What hardware GPUs and software adapters get for the model's products.
    let software = TileConfig::SOFTWARE;
    let chosen = [
        (128, 512, 784),
        (784, 512, 128),
        (128, 10, 512),
        (512, 10, 128),
        (128, 512, 10),
    ]
    .map(|(m, n, k)| TileConfig::for_shape(m, n, k));
    for t in chosen.iter().chain([&software]) {
        if !tilings.contains(&(t.tm, t.tn, t.kc, t.s)) {
            tilings.push((t.tm, t.tn, t.kc, t.s));
        }
    }
    for (i, &(tm, tn, kc, s)) in tilings.iter().enumerate() {
        let tiles = TileConfig::new(tm, tn, kc, s).unwrap();
        be.set_matmul_tiles(Some(tiles));
        for (j, &shape) in SHAPES[..4].iter().enumerate() {
            matmul_ops(&mut be, shape, 700 + (10 * i + j) as u64);
        }
    }
    // The adapter's own choice (llvmpipe: the software tiling) at more shapes.
    be.set_matmul_tiles(None);
    for (j, &shape) in [(130, 33, 10), (128, 512, 10), (5, 1000, 3)].iter().enumerate() {
        matmul_ops(&mut be, shape, 800 + j as u64);
    }
}

#[test]
fn matmuls_match_the_reference_at_awkward_shapes() {
    for mut be in devices_under_test() {
        for (i, &shape) in SHAPES.iter().enumerate() {
            matmul_ops(be.as_mut(), shape, 10 + i as u64);
        }
    }
}

/// The fused epilogues the layer graph uses: forward + bias + ReLU, and the backward-input product
/// masked by the previous layer's ReLU output. Compared with the reference ops run one by one.
#[test]
fn fused_epilogues_match_the_reference_ops_in_sequence() {
    for mut be in devices_under_test() {
        let be = be.as_mut();
        let name = be.name();
        for (i, &(b, c, oc)) in SHAPES.iter().enumerate() {
            let mut g = rng(200 + i as u64);
            let inp = random_vec(&mut g, b * c, 1.0);
            let weight = random_vec(&mut g, c * oc, 1.0);
            let bias = random_vec(&mut g, oc, 1.0);
            let dout = random_vec(&mut g, b * oc, 1.0);
            let (t_inp, t_w, t_bias, t_dout) = (
                upload(be, &inp),
                upload(be, &weight),
                upload(be, &bias),
                upload(be, &dout),
            );
            let (t_out, t_dinp) = (be.alloc(b * oc).unwrap(), be.alloc(b * c).unwrap());
            ops::forward(be, (t_out, t_inp, t_w), (Some(t_bias), true), (b, c, oc)).unwrap();
            // The mask is the (random-signed) input itself, as if it were a ReLU's output.
            ops::backward_input(be, (t_dinp, t_dout, t_w), Some(t_inp), (b, c, oc)).unwrap();

            let (want, scale) = reference_dense_relu(&inp, &weight, &bias, (b, c, oc));
            let shape = format!("{b}x{c}x{oc}");
            let got = download(be, t_out, b * oc);
            assert_close_scaled(
                &format!("{name} matmul+bias+relu {shape}"),
                &got,
                &want,
                &scale,
                1e-5,
                1e-4,
            );

            let (mut prod, mut scale) = (vec![0.0; b * c], vec![0.0; b * c]);
            r::matmul_backward_input(&mut prod, &dout, &weight, b, c, oc);
            r::matmul_backward_input(&mut scale, &abs(&dout), &abs(&weight), b, c, oc);
            let mut want = vec![0.0; b * c];
            r::relu_backward(&mut want, &prod, &inp);
            let got = download(be, t_dinp, b * c);
            assert_close_scaled(
                &format!("{name} matmul_backward_input*mask {shape}"),
                &got,
                &want,
                &scale,
                1e-5,
                1e-4,
            );
            assert!(
                got.iter().zip(&inp).all(|(g, x)| *x > 0.0 || *g == 0.0),
                "{name}: mask not applied"
            );
        }
    }
}

/// Bias-add, ReLU, the ReLU gradient's mask and the bias gradient, which run only inside the
/// matmul's epilogue, against the reference's plain loops (`bias_add_forward`, `relu_forward`,
/// `relu_backward`, `bias_backward`): the products are with the identity, which is exact, so
/// that the epilogue is judged exactly; the bias gradient is a
/// column sum (atol 1e-5 + rtol 1e-4 of sum |dout|).
#[test]
fn bias_and_relu_match_the_reference() {
    for mut be in devices_under_test() {
        let be = be.as_mut();
        let name = be.name();
        for (i, &(b, _, oc)) in SHAPES.iter().enumerate() {
            let mut g = rng(100 + i as u64);
            let x = random_vec(&mut g, b * oc, 2.0);
            let bias = random_vec(&mut g, oc, 1.0);
            let dout = random_vec(&mut g, b * oc, 1.0);
            let (t_x, t_bias, t_dout) = (upload(be, &x), upload(be, &bias), upload(be, &dout));
            let t_eye = upload(be, &ops::identity(oc));
            let [t_biased, t_relu, t_biased_relu, t_drelu] = [(); 4].map(|_| be.alloc(b * oc).unwrap());
            let (t_dw, t_dbias) = (be.alloc(oc * oc).unwrap(), be.alloc(oc).unwrap());
            // A layer of `oc` inputs and `oc` outputs whose weight is the identity.
            let shape = (b, oc, oc);
            ops::forward(be, (t_biased, t_x, t_eye), (Some(t_bias), false), shape).unwrap();
            ops::forward(be, (t_relu, t_x, t_eye), (None, true), shape).unwrap();
            ops::forward(be, (t_biased_relu, t_x, t_eye), (Some(t_bias), true), shape).unwrap();
            ops::backward_input(be, (t_drelu, t_dout, t_eye), Some(t_relu), shape).unwrap();
            ops::backward_weight(be, (t_dw, Some(t_dbias)), (t_x, t_dout), shape).unwrap();

            let shape = format!("{b}x{oc}");
            let mut biased = x.clone();
            r::bias_add_forward(&mut biased, &bias, b, oc);
            assert_close(
                &format!("{name} bias_add_forward {shape}"),
                &download(be, t_biased, b * oc),
                &biased,
                0.0,
                0.0,
            );
            let mut relu = vec![0.0; b * oc];
            r::relu_forward(&mut relu, &x);
            assert_close(
                &format!("{name} relu_forward {shape}"),
                &download(be, t_relu, b * oc),
                &relu,
                0.0,
                0.0,
            );
            let mut biased_relu = vec![0.0; b * oc];
            r::relu_forward(&mut biased_relu, &biased);
            assert_close(
                &format!("{name} bias_add_forward then relu_forward {shape}"),
                &download(be, t_biased_relu, b * oc),
                &biased_relu,
                0.0,
                0.0,
            );
            let mut drelu = vec![0.0; b * oc];
            r::relu_backward(&mut drelu, &dout, &relu);
            assert_close(
                &format!("{name} relu_backward {shape}"),
                &download(be, t_drelu, b * oc),
                &drelu,
                0.0,
                0.0,
            );
            let (mut dbias, mut scale) = (vec![0.0; oc], vec![0.0; oc]);
            r::bias_backward(&mut dbias, &dout, b, oc);
            r::bias_backward(&mut scale, &abs(&dout), b, oc);
            let got = download(be, t_dbias, oc);
            assert_close_scaled(
                &format!("{name} bias_backward {shape}"),
                &got,
                &dbias,
                &scale,
                1e-5,
                1e-4,
            );
        }
    }
}

#[test]
fn gather_and_softmax_cross_entropy_match_the_reference() {
    for mut be in devices_under_test() {
        let be = be.as_mut();
        let name = be.name();
        let mut g = rng(7);
        let n = 300;
        let data = random_dataset(&mut g, n);
        let order = gpu_mnist::data::epoch_order(n, 3, 0);
        let ds = be.upload_dataset(&data).unwrap();
        be.set_order(ds, &order).unwrap();
        be.reserve_stats(4).unwrap();
        // Row counts around the loss kernel's 256 invocations, and a batch at the end of the set.
        let classes = 10;
        let cases = [(0usize, 1usize), (5, 97), (20, 256), (1, 299)];
        for (slot, &(start, rows)) in cases.iter().enumerate() {
            let t_x = be.alloc(rows * IMAGE_PIXELS).unwrap();
            ops::gather(be, t_x, ds, start, rows).unwrap();
            let mut want_x = vec![0.0; rows * IMAGE_PIXELS];
            r::gather_batch(&mut want_x, &data.images, &order, start, rows, IMAGE_PIXELS);
            assert_close(
                &format!("{name} gather_batch rows {start}+{rows}"),
                &download(be, t_x, rows * IMAGE_PIXELS),
                &want_x,
                0.0,
                0.0,
            );

            // Large logits check the max-subtraction; ties check the first-arg-max rule.
            let mut logits = random_vec(&mut g, rows * classes, 30.0);
            logits[3] = logits[2];
            let t_logits = upload(be, &logits);
            let t_dlogits = be.alloc(rows * classes).unwrap();
            ops::loss(be, (Some(t_dlogits), t_logits), ds, (start, rows, classes), slot).unwrap();
            let mut labels = vec![0u8; rows];
            r::gather_labels(&mut labels, &data.labels, &order, start, rows);
            let (mut probs, mut losses, mut dlogits) =
                (vec![0.0; rows * classes], vec![0.0; rows], vec![0.0; rows * classes]);
            r::softmax_xent_forward(&mut probs, &mut losses, &logits, &labels, rows, classes);
            r::softmax_xent_backward(&mut dlogits, &probs, &labels, rows, classes);
            let mut preds = vec![0u8; rows];
            r::argmax_rows(&mut preds, &logits, rows, classes);
            let want_correct = preds.iter().zip(&labels).filter(|(p, l)| p == l).count() as u32;
            let want_loss: f32 = losses.iter().sum();
            assert_close(
                &format!("{name} softmax_xent dlogits rows {rows}"),
                &download(be, t_dlogits, rows * classes),
                &dlogits,
                1e-7,
                1e-4,
            );
            let stats = ops::stats(be, slot + 1).unwrap()[slot];
            assert_close(
                &format!("{name} softmax_xent loss sum rows {rows}"),
                &[stats.loss_sum],
                &[want_loss],
                0.0,
                1e-4,
            );
            assert_eq!(stats.correct, want_correct, "{name} correct count, rows {rows}");
        }
    }
}

/// RMSprop (lr 1e-3, rho 0.9, eps 1e-7) and SGD (lr 0.05).
fn update_optimizers() -> [gpu_mnist::optim::Optimizer; 2] {
    use gpu_mnist::optim::{Optimizer, OptimizerKind};
    [
        Optimizer::new(OptimizerKind::RmsProp, Some(1e-3)).unwrap(),
        Optimizer::new(OptimizerKind::Sgd, Some(0.05)).unwrap(),
    ]
}

/// `Op::Update` on the CPU backends (the reference and the fast path) against the reference's
/// `rmsprop_update` and `sgd_update`: parameters atol 1e-7 + rtol 1e-5 (SGD rtol 1e-6),
/// velocities atol 1e-12 + rtol 1e-5.
#[test]
fn cpu_optimizer_updates_match_the_reference() {
    use gpu_mnist::backend::cpu::CpuBackend;
    use gpu_mnist::backend::ParamTensors;
    let [rmsprop, sgd] = update_optimizers();
    let devices: [Box<dyn Backend>; 2] = [Box::new(fast_cpu()), Box::new(CpuBackend::reference())];
    for mut be in devices {
        let be = be.as_mut();
        let name = be.name();
        for n in [1usize, 7, 1000, 401_408] {
            let mut g = rng(n as u64);
            let param = random_vec(&mut g, n, 1.0);
            let grad = random_vec(&mut g, n, 1e-2);
            let velocity = abs(&random_vec(&mut g, n, 1e-4));
            let (t_p, t_g, t_v, t_sgd, t_sgd_v) = (
                upload(be, &param),
                upload(be, &grad),
                upload(be, &velocity),
                upload(be, &param),
                upload(be, &velocity),
            );
            let (t_m, t_sgd_m) = (upload(be, &velocity), upload(be, &velocity));
            let p = |value, velocity, momentum| ParamTensors {
                value,
                grad: t_g,
                velocity,
                momentum,
            };
            ops::update(be, p(t_p, t_v, t_m), n, &rmsprop).unwrap();
            ops::update(be, p(t_sgd, t_sgd_v, t_sgd_m), n, &sgd).unwrap();
            let (mut want_p, mut want_v, mut want_sgd) = (param.clone(), velocity.clone(), param.clone());
            r::rmsprop_update(&mut want_p, &mut want_v, &grad, rmsprop.lr, rmsprop.rho, rmsprop.eps);
            r::sgd_update(&mut want_sgd, &grad, sgd.lr);
            assert_close(
                &format!("{name} rmsprop param n={n}"),
                &download(be, t_p, n),
                &want_p,
                1e-7,
                1e-5,
            );
            assert_close(
                &format!("{name} rmsprop velocity n={n}"),
                &download(be, t_v, n),
                &want_v,
                1e-12,
                1e-5,
            );
            assert_close(
                &format!("{name} sgd param n={n}"),
                &download(be, t_sgd, n),
                &want_sgd,
                1e-7,
                1e-6,
            );
            assert_eq!(download(be, t_sgd_v, n), velocity, "{name}: SGD changed the velocity");
        }
    }
}

/// The GPU runs a weight's optimizer step fused into the weight gradient: the step of a layer's
/// weight (n values) and bias against the reference's `rmsprop_update` and `sgd_update` applied
/// to the gradients the same op stored (so that only the update is judged, with the CPU test's
/// tolerances), the other layer of the packed buffers untouched (a lone `Op::Update`: tests/layers.rs).
#[test]
fn gpu_optimizer_updates_match_the_reference_through_the_fused_weight_gradient() {
    let mut be = gpu();
    let name = be.name();
    // (B, C, OC): weights of 1, 7, 1000 and 401 408 values.
    for (b, c, oc) in [(1usize, 1usize, 1usize), (3, 7, 1), (5, 40, 25), (2, 784, 512)] {
        for opt in update_optimizers() {
            let n = c * oc;
            let mut g = rng(n as u64);
            let lens = [11, 3, n, oc];
            let values: Vec<Vec<f32>> = lens.iter().map(|&len| random_vec(&mut g, len, 1.0)).collect();
            let vels: Vec<Vec<f32>> = lens.iter().map(|&len| abs(&random_vec(&mut g, len, 1e-4))).collect();
            let inp = random_vec(&mut g, b * c, 1.0);
            let dout = random_vec(&mut g, b * oc, 1e-2);
            let got = fused_step(&mut be, (&values, &vels), (&inp, &dout), (b, c, oc), &opt);
            let [dweight, dbias, weight, bias, weight_vel, bias_vel, other] = &got;
            let kind = opt.kind;
            for (part, grad, k, got_value, got_vel) in [
                ("weight", dweight, 2, weight, weight_vel),
                ("bias", dbias, 3, bias, bias_vel),
            ] {
                let (mut want_p, mut want_v) = (values[k].clone(), vels[k].clone());
                let what = format!("{name} fused {kind:?} {part} n={}", want_p.len());
                assert_ne!(got_value, &values[k], "{what}: the step changed nothing");
                match kind {
                    gpu_mnist::optim::OptimizerKind::RmsProp => {
                        r::rmsprop_update(&mut want_p, &mut want_v, grad, opt.lr, opt.rho, opt.eps);
                        assert_close(&format!("{what} param"), got_value, &want_p, 1e-7, 1e-5);
                        assert_close(&format!("{what} velocity"), got_vel, &want_v, 1e-12, 1e-5);
                    }
                    gpu_mnist::optim::OptimizerKind::Sgd => {
                        r::sgd_update(&mut want_p, grad, opt.lr);
                        assert_close(&format!("{what} param"), got_value, &want_p, 1e-7, 1e-6);
                        assert_eq!(got_vel, &want_v, "{what}: SGD changed the velocity");
                    }
                    other => panic!("{other:?} is not one of update_optimizers"),
                }
            }
            assert_eq!(other, &values[0], "{name}: the other layer's weight changed");
        }
    }
}

/// A product whose output is short, one whose output aliases an input, a loss into a statistics
/// slot not reserved and a read of more slots than reserved are refused with an error naming the
/// op, not a panic.
#[test]
fn ops_reject_inconsistent_shapes_instead_of_panicking() {
    for mut be in devices_under_test() {
        let be = be.as_mut();
        let name = be.name();
        let small = be.alloc(10).unwrap();
        let big = be.alloc(1000).unwrap();
        let weight = be.alloc(100).unwrap();
        let err = ops::forward(be, (small, big, big), (None, false), (10, 10, 10)).unwrap_err();
        println!("{name}: short output: {err}");
        assert!(err.to_string().contains("matmul forward"), "{err}");
        // out (10, 10) = big (10, 10) @ weight, written into the input it reads.
        let err = ops::forward(be, (big, big, weight), (None, true), (10, 10, 10)).unwrap_err();
        println!("{name}: output aliasing the input: {err}");
        assert!(err.to_string().contains("share"), "{name}: {err}");
        // The same through the epilogue's mask: dinp written into the mask it reads.
        let err = ops::backward_input(be, (big, small, weight), Some(big), (10, 10, 1)).unwrap_err();
        assert!(err.to_string().contains("share"), "{name}: {err}");

        let mut g = rng(3);
        let ds = be.upload_dataset(&random_dataset(&mut g, 20)).unwrap();
        be.reserve_stats(2).unwrap();
        let (logits, dlogits) = (be.alloc(40).unwrap(), be.alloc(40).unwrap());
        let err = ops::loss(be, (Some(dlogits), logits), ds, (0, 4, 10), 2).unwrap_err();
        println!("{name}: stats slot not reserved: {err}");
        assert!(err.to_string().contains("slot"), "{err}");
        assert!(
            ops::loss(be, (Some(dlogits), logits), ds, (17, 4, 10), 0).is_err(),
            "{name}: rows past the set"
        );
        assert!(ops::stats(be, 3).is_err(), "{name}: more slots than reserved");
        assert!(ops::stats(be, 1_000_000).is_err());
    }
}

/// Packed tensors (how the graph keeps its parameters): parts read and write at their offsets, one
/// update over the whole equals the updates of the parts, and an op that would write one part while reading another of the same allocation is
/// refused (wgpu forbids it within a dispatch).
#[test]
fn packed_tensors_update_in_one_op_and_refuse_aliasing() {
    use gpu_mnist::backend::ParamTensors;
    let [rmsprop, _] = update_optimizers();
    for mut be in devices_under_test() {
        let be = be.as_mut();
        let name = be.name();
        let lens = [7usize, 1, 300, 10];
        let (params, grads, vels, moms) = (
            be.alloc_packed(&lens).unwrap(),
            be.alloc_packed(&lens).unwrap(),
            be.alloc_packed(&lens).unwrap(),
            be.alloc_packed(&lens).unwrap(),
        );
        let mut g = rng(77);
        let mut want = Vec::new();
        for (k, &len) in lens.iter().enumerate() {
            let (p, gr) = (random_vec(&mut g, len, 1.0), random_vec(&mut g, len, 0.1));
            be.write(params.parts[k], &p).unwrap();
            be.write(grads.parts[k], &gr).unwrap();
            assert_eq!(download(be, params.parts[k], len), p, "{name}: part {k} read back");
            let (mut wp, mut wv) = (p.clone(), vec![0.0; len]);
            r::rmsprop_update(&mut wp, &mut wv, &gr, rmsprop.lr, rmsprop.rho, rmsprop.eps);
            want.push((wp, wv));
        }
        {
            let whole = ParamTensors {
                value: params.whole,
                grad: grads.whole,
                velocity: vels.whole,
                momentum: moms.whole,
            };
            ops::update(be, whole, params.len, &rmsprop).unwrap();
            for (k, &len) in lens.iter().enumerate() {
                assert_close(
                    &format!("{name} packed part {k} param"),
                    &download(be, params.parts[k], len),
                    &want[k].0,
                    1e-7,
                    1e-5,
                );
                assert_close(
                    &format!("{name} packed part {k} velocity"),
                    &download(be, vels.parts[k], len),
                    &want[k].1,
                    1e-12,
                    1e-5,
                );
            }
        }
        // A matmul reading packed parts (weight: the first 70 values of part 2; bias: part 3)
        // works like one on plain tensors.
        let (b, c, oc) = (3, 7, 10);
        let x = random_vec(&mut g, b * c, 1.0);
        let (inp, out) = (upload(be, &x), be.alloc(b * oc).unwrap());
        ops::forward(
            be,
            (out, inp, params.parts[2]),
            (Some(params.parts[3]), false),
            (b, c, oc),
        )
        .unwrap();
        let (w, bias) = (download(be, params.parts[2], c * oc), download(be, params.parts[3], oc));
        let mut expect = vec![0.0; b * oc];
        r::matmul_forward(&mut expect, &x, &w, b, c, oc);
        r::bias_add_forward(&mut expect, &bias, b, oc);
        assert_close(
            &format!("{name} matmul over packed parts"),
            &download(be, out, b * oc),
            &expect,
            1e-6,
            1e-5,
        );
        // The bias gradient into part 0 of a packed group from dout in its part 2.
        let err = ops::backward_weight(
            be,
            (params.parts[2], Some(grads.parts[0])),
            (inp, grads.parts[2]),
            (1, 1, 7),
        )
        .unwrap_err();
        println!("{name}: {err}");
        assert!(err.to_string().contains("share"), "{name}: {err}");
    }
}

/// The weight-gradient product with the optimizer step fused into it (what a GPU training step
/// runs; the fast CPU path runs it unfused here, its input being half non-zero) against the
/// reference backend running the same op as its parts in sequence (the matmul, the column sum,
/// then `rmsprop_update` / `sgd_update`), for a layer packed after another one so that its
/// parameters sit at non-zero offsets. Tolerances: the gradients as for the matmul; parameters
/// and velocities after the step rtol 1e-4 (they inherit the gradient's rounding).
#[test]
fn fused_optimizer_step_matches_the_reference_ops() {
    use gpu_mnist::backend::cpu::CpuBackend;
    use gpu_mnist::optim::{Optimizer, OptimizerKind};
    for kind in [OptimizerKind::RmsProp, OptimizerKind::Sgd] {
        let opt = Optimizer::new(kind, Some(0.01)).unwrap();
        for (i, &(b, c, oc)) in [(3usize, 5usize, 7usize), (61, 100, 36), (128, 512, 10), (128, 784, 512)]
            .iter()
            .enumerate()
        {
            let mut g = rng(900 + i as u64);
            let lens = [11, 3, c * oc, oc];
            let values: Vec<Vec<f32>> = lens.iter().map(|&n| random_vec(&mut g, n, 0.5)).collect();
            let vels: Vec<Vec<f32>> = lens
                .iter()
                .map(|&n| random_vec(&mut g, n, 1e-3).iter().map(|v| v.abs()).collect())
                .collect();
            let inp: Vec<f32> = random_vec(&mut g, b * c, 1.0).iter().map(|v| v.max(0.0)).collect();
            let dout = random_vec(&mut g, b * oc, 0.1);
            let mut reference = CpuBackend::reference();
            let want = fused_step(&mut reference, (&values, &vels), (&inp, &dout), (b, c, oc), &opt);
            for mut device in devices_under_test() {
                let name = device.name();
                let got = fused_step(device.as_mut(), (&values, &vels), (&inp, &dout), (b, c, oc), &opt);
                for (k, name_k) in FUSED_STEP_PARTS.iter().enumerate() {
                    let what = format!("{name} fused {kind:?} {name_k} {b}x{c}x{oc}");
                    assert_close(&what, &got[k], &want[k], 1e-6, 1e-4);
                }
            }
        }
    }
}

/// The first layer's forward product on a batch gathered from the dataset, as a step runs it
/// (`Op::Gather`, then the forward product with bias and ReLU; the fast CPU path builds the sparse
/// rows of x in the gather and multiplies from them), against the reference's `gather_batch` and
/// `matmul_forward` + bias + ReLU, on the fast CPU path and the GPU. The gathered input must
/// equal the reference's exactly; the product is judged as a matmul (atol 1e-5 + rtol 1e-4 of
/// sum |x w|).
#[test]
fn gathered_first_layer_matches_the_reference_ops() {
    for mut be in devices_under_test() {
        let be = be.as_mut();
        let name = be.name();
        let mut g = rng(31);
        let n = 300;
        let data = random_dataset(&mut g, n);
        let order = gpu_mnist::data::epoch_order(n, 5, 1);
        let ds = be.upload_dataset(&data).unwrap();
        be.set_order(ds, &order).unwrap();
        for &(start, rows, oc) in &[(0usize, 1usize, 1usize), (7, 61, 36), (172, 128, 512), (3, 297, 10)] {
            let weight = random_vec(&mut g, IMAGE_PIXELS * oc, 0.1);
            let bias = random_vec(&mut g, oc, 0.1);
            let (t_w, t_b) = (upload(be, &weight), upload(be, &bias));
            let (t_x, t_out) = (be.alloc(rows * IMAGE_PIXELS).unwrap(), be.alloc(rows * oc).unwrap());
            ops::gather(be, t_x, ds, start, rows).unwrap();
            ops::forward(be, (t_out, t_x, t_w), (Some(t_b), true), (rows, IMAGE_PIXELS, oc)).unwrap();
            let mut x = vec![0.0; rows * IMAGE_PIXELS];
            r::gather_batch(&mut x, &data.images, &order, start, rows, IMAGE_PIXELS);
            let shape = format!("rows {start}+{rows}, {oc} outputs");
            assert_close(
                &format!("{name} gathered x {shape}"),
                &download(be, t_x, x.len()),
                &x,
                0.0,
                0.0,
            );
            let (want, scale) = reference_dense_relu(&x, &weight, &bias, (rows, IMAGE_PIXELS, oc));
            assert_close_scaled(
                &format!("{name} gathered forward {shape}"),
                &download(be, t_out, rows * oc),
                &want,
                &scale,
                1e-5,
                1e-4,
            );
        }
    }
}

/// A fused dispatch that would write a buffer it also reads is refused with the op named (wgpu
/// forbids a buffer bound both ways in one dispatch): a weight gradient with its fused update
/// whose input shares the packed buffer of the weight it updates.
#[test]
fn fused_ops_refuse_writing_what_they_read() {
    use gpu_mnist::backend::ParamTensors;
    let mut be = gpu();
    let (b, c, oc) = (4, 6, 3);
    let values = be.alloc_packed(&[b * c, c * oc, oc]).unwrap();
    let (grads, vels, moms) = (
        be.alloc_packed(&[c * oc, oc]).unwrap(),
        be.alloc_packed(&[c * oc, oc]).unwrap(),
        be.alloc_packed(&[c * oc, oc]).unwrap(),
    );
    let dout = be.alloc(b * oc).unwrap();
    let param = |k: usize| ParamTensors {
        value: values.parts[k + 1],
        grad: grads.parts[k],
        velocity: vels.parts[k],
        momentum: moms.parts[k],
    };
    let [rmsprop, _] = update_optimizers();
    let err = ops::backward_weight_update(
        &mut be,
        (param(0), param(1)),
        (values.parts[0], dout),
        (b, c, oc),
        &rmsprop,
    )
    .unwrap_err();
    println!("{err}");
    assert!(err.to_string().contains("matmul backward weight + update"), "{err}");
}

/// What `output_layer` reads back after the step, in order: the two activation gradients, then
/// the four parts (another layer's weight and bias, then this layer's) of the packed values,
/// gradients and velocities, so that a write to the wrong part shows.
const OUTPUT_LAYER_PARTS: [&str; 14] = [
    "dlogits",
    "dinp",
    "other weight",
    "other bias",
    "weight",
    "bias",
    "other dweight",
    "other dbias",
    "dweight",
    "dbias",
    "other weight velocity",
    "other bias velocity",
    "weight velocity",
    "bias velocity",
];

/// One `Op::OutputLayer` on `be` for an output layer of 10 classes packed after another layer
/// (parts [11, 3, C*10, 10], so that its parameters sit at non-zero offsets), on rows
/// 7..7 + B of `data` in `order`: the tensors named in `OUTPUT_LAYER_PARTS`, the step's
/// statistics and the dispatches it took.
fn output_layer(
    be: &mut dyn Backend,
    (data, order): (&gpu_mnist::data::Dataset, &[u32]),
    (values, vels): (&[Vec<f32>], &[Vec<f32>]),
    inp: &[f32],
    (b, c): (usize, usize),
    opt: &gpu_mnist::optim::Optimizer,
) -> (Vec<Vec<f32>>, gpu_mnist::backend::StepStats, u64) {
    let (start, classes) = (7, 10);
    let ds = be.upload_dataset(data).unwrap();
    be.set_order(ds, order).unwrap();
    be.reserve_stats(1).unwrap();
    let packed = packed_two_layers(be, (values, vels), (c, classes));
    let t_inp = upload(be, inp);
    let (logits, dlogits, dinp) = (
        be.alloc(b * classes).unwrap(),
        be.alloc(b * classes).unwrap(),
        be.alloc(b * c).unwrap(),
    );
    let step = OutputLayer {
        shape: ops::dense(b, c, classes),
        weight: param_of(&packed, 2),
        bias: param_of(&packed, 3),
        inp: t_inp,
        logits,
        dlogits,
        dinp,
        ds,
        opt: *opt,
    };
    let before = be.counters().dispatches;
    ops::output_layer(
        be,
        step,
        StepAt {
            start,
            ..StepAt::default()
        },
    )
    .unwrap();
    let dispatches = be.counters().dispatches - before;
    let stats = ops::stats(be, 1).unwrap()[0];
    let mut parts = vec![dlogits, dinp];
    // Values, gradients, velocities (neither optimizer here keeps momenta).
    for p in &packed[..3] {
        parts.extend(&p.parts);
    }
    (
        parts.iter().map(|&t| ops::read(be, t).unwrap()).collect(),
        stats,
        dispatches,
    )
}

/// The output layer's step (`Op::OutputLayer`) as one dispatch (output_layer.wgsl,
/// `set_output_layer_fusion`), as the GPU's four dispatches (fusion off) and as the fast CPU
/// path's ops, against the reference backend running its four ops in sequence,
/// for both optimizers, at awkward shapes: one row, one input, a batch over 128 rows (the first
/// phase without the split of K), inputs narrower and wider than the workgroup's 256 invocations,
/// and 1100 rows (past 1024 the GPU runs the four dispatches instead, checked by the count).
/// Tolerances as the fused optimizer step's: atol 1e-6 + rtol 1e-4 for every tensor, the loss sum
/// rtol 1e-4, the correct count exact.
#[test]
fn fused_output_layer_matches_the_reference_ops() {
    use gpu_mnist::backend::cpu::CpuBackend;
    use gpu_mnist::optim::{Optimizer, OptimizerKind};
    let mut fused = gpu();
    fused.set_output_layer_fusion(true);
    // An adapter with fewer than 9 storage buffers a stage runs the four dispatches.
    let available = fused.output_layer_fusion_available();
    println!("fused output layer available on {}: {available}", fused.name());
    let mut unfused = gpu();
    unfused.set_output_layer_fusion(false);
    // The GPU's (fused: true, or not: false); the CPU's dispatches are not counted.
    let mut devices: Vec<(Box<dyn Backend>, Option<bool>)> = vec![
        (Box::new(fast_cpu()), None),
        (Box::new(unfused), Some(false)),
        (Box::new(fused), Some(true)),
    ];
    let shapes = [
        (1usize, 1usize),
        (3, 5),
        (61, 100),
        (128, 512),
        (129, 37),
        (200, 300),
        (300, 70),
        (1024, 33),
        (1025, 3),
        (200, 2000),
    ];
    for kind in [OptimizerKind::RmsProp, OptimizerKind::Sgd] {
        let opt = Optimizer::new(kind, Some(0.01)).unwrap();
        for (i, &(b, c)) in shapes.iter().enumerate() {
            let mut g = rng(1200 + i as u64);
            let data = random_dataset(&mut g, b + 20);
            let order = gpu_mnist::data::epoch_order(b + 20, 9, 0);
            let lens = [11, 3, c * 10, 10];
            let values: Vec<Vec<f32>> = lens.iter().map(|&n| random_vec(&mut g, n, 0.5)).collect();
            let vels: Vec<Vec<f32>> = lens.iter().map(|&n| abs(&random_vec(&mut g, n, 1e-3))).collect();
            // Half the inputs are ReLU zeros, which mask their gradient.
            let inp: Vec<f32> = random_vec(&mut g, b * c, 1.0).iter().map(|v| v.max(0.0)).collect();
            let setup = ((&data, &order[..]), (&values[..], &vels[..]), &inp[..], (b, c));
            let run = |be: &mut dyn Backend| output_layer(be, setup.0, setup.1, setup.2, setup.3, &opt);
            let (want, want_stats, _) = run(&mut CpuBackend::reference());
            assert_eq!(want.len(), OUTPUT_LAYER_PARTS.len());
            for (be, fuses) in devices.iter_mut() {
                let variant = match *fuses {
                    Some(true) => " (fused)",
                    Some(false) => " (unfused)",
                    None => "",
                };
                let name = format!("{}{variant}", be.name());
                let (got, stats, dispatches) = run(be.as_mut());
                for (k, part) in OUTPUT_LAYER_PARTS.iter().enumerate() {
                    let what = format!("{name} output layer {kind:?} {part} {b}x{c}");
                    assert_close(&what, &got[k], &want[k], 1e-6, 1e-4);
                }
                let what = format!("{name} output layer {kind:?} loss sum {b}x{c}");
                assert_close(&what, &[stats.loss_sum], &[want_stats.loss_sum], 0.0, 1e-4);
                assert_eq!(stats.correct, want_stats.correct, "{name}: correct count, {b}x{c}");
                if let Some(fuses) = *fuses {
                    // The limits of src/backend/wgpu/mod.rs: 1024 rows, 4 x 128 x 512 rows x inputs.
                    let one = fuses && available && b <= 1024 && b * c <= 4 * 128 * 512;
                    assert_eq!(dispatches, if one { 1 } else { 4 }, "{name}: dispatches, {b}x{c}");
                }
            }
        }
    }
}

/// The reference model, 784-512-10, and its batch.
const PLAN_ROWS: usize = 128;

/// A graph of the reference model on `be`, its parameters from seed 4, with a synthetic dataset
/// of 2 batches in epoch 0's order of seed 4 and one statistics slot per step.
fn reference_graph(be: &mut dyn Backend, steps: usize) -> (gpu_mnist::model::Graph, gpu_mnist::backend::DatasetId) {
    use gpu_mnist::model::{glorot_init, Graph, ModelSpec};
    let spec = ModelSpec::mnist(&[512]);
    let graph = Graph::new(be, &spec, PLAN_ROWS).unwrap();
    graph.set_params(be, &glorot_init(&spec, 4)).unwrap();
    let mut g = rng(4);
    let n = 2 * PLAN_ROWS;
    let ds = be.upload_dataset(&random_dataset(&mut g, n)).unwrap();
    be.set_order(ds, &gpu_mnist::data::epoch_order(n, 4, 0)).unwrap();
    be.reserve_stats(steps).unwrap();
    (graph, ds)
}

fn rmsprop() -> gpu_mnist::optim::Optimizer {
    gpu_mnist::optim::Optimizer::new(gpu_mnist::optim::OptimizerKind::RmsProp, None).unwrap()
}

/// How many of `plan`'s ops are updates, weight gradients with a fused update, output layers.
fn fused_counts(plan: &[Op]) -> (usize, usize, usize) {
    let count = |f: &dyn Fn(&Op) -> bool| plan.iter().filter(|op| f(op)).count();
    (
        count(&|op| matches!(op, Op::Update(_))),
        count(
            &|op| matches!(op, Op::Matmul(m) if matches!(m.kind, MatmulKind::BackwardWeight { update: Some(_), .. })),
        ),
        count(&|op| matches!(op, Op::OutputLayer(_))),
    )
}

/// The training plan of the reference model (784-512-10, batch 128): the graph's plan on the GPU
/// is `plan::fuse(plan::train_ops(..), gpu.fusions())` of its layers, of at most 7 ops; with
/// `Fusions::default()` nothing merges (11 ops: gather, 2 forward products, the loss, one input
/// gradient, 2 weight gradients and 4 updates); fusing the weight updates drops the count by 4
/// (the two updates of each layer go into its weight gradient), and the output layer's fusion by 3
/// more (its forward product, the loss, its input gradient and its weight gradient become one op).
#[test]
fn train_plans_fuse_to_at_most_seven_ops() {
    use gpu_mnist::backend::ops::Update;
    use gpu_mnist::plan::{self, PlanKind};
    let mut be = gpu();
    let (mut graph, ds) = reference_graph(&mut be, 1);
    let opt = rmsprop();
    let fused = graph
        .plan(&mut be, PlanKind::Train, Batch { ds, rows: PLAN_ROWS }, Some(opt))
        .unwrap()
        .to_vec();
    println!("{} on {}", plan::describe(&fused), be.name());
    let layers = graph.layers().to_vec();
    assert_eq!(layers.len(), 2);
    let plain = plan::train_ops(&layers, ds, PLAN_ROWS, opt);
    println!("unfused: {}", plan::describe(&plain));
    // (a) The graph's plan is the fusion pass over the plain ops, with the GPU's fusions.
    let fusions = be.fusions();
    println!("{fusions:?}");
    assert_eq!(
        plan::fuse(plain.clone(), fusions),
        fused,
        "the graph's plan is not fuse(train_ops)"
    );
    assert!(fused.len() <= 7, "{} ops on the GPU", fused.len());
    assert_eq!(fused_counts(&fused).0, 0, "the GPU runs no lone update");

    // (b) Nothing merges without fusions.
    assert_eq!(plain.len(), 11);
    assert_eq!(fused_counts(&plain), (4, 0, 0));
    assert_eq!(plan::fuse(plain.clone(), Fusions::default()), plain);

    // (c) The weight updates: two fewer ops per layer.
    let weight_update = Fusions {
        weight_update: true,
        ..Fusions::default()
    };
    let merged = plan::fuse(plain.clone(), weight_update);
    assert_eq!(merged.len(), plain.len() - 4, "{}", plan::describe(&merged));
    assert_eq!(fused_counts(&merged), (0, 2, 0));
    // The output layer too: one op for its 4.
    let everything = Fusions {
        weight_update: true,
        output_layer_max_rows: usize::MAX,
        output_layer_max_work: usize::MAX,
        pool_weight_gradient: true,
    };
    let merged = plan::fuse(plain.clone(), everything);
    assert_eq!(merged.len(), plain.len() - 7, "{}", plan::describe(&merged));
    assert_eq!(fused_counts(&merged), (0, 1, 1));
    // The output layer's fusion needs the weight update's, and its own shape limits.
    assert_eq!(
        plan::fuse(
            plain.clone(),
            Fusions {
                weight_update: false,
                ..everything
            }
        ),
        plain
    );
    let too_small = Fusions {
        output_layer_max_rows: PLAN_ROWS - 1,
        ..everything
    };
    assert_eq!(fused_counts(&plan::fuse(plain.clone(), too_small)), (0, 2, 0));
    // Updates that do not match the gradient (another optimizer for the bias) stay apart.
    let mut odd = plain.clone();
    let sgd = gpu_mnist::optim::Optimizer::new(gpu_mnist::optim::OptimizerKind::Sgd, None).unwrap();
    let last_bias_update = odd.iter().rposition(|op| matches!(op, Op::Update(_))).unwrap();
    if let Op::Update(u) = odd[last_bias_update] {
        odd[last_bias_update] = Op::Update(Update { opt: sgd, ..u });
    }
    assert_eq!(fused_counts(&plan::fuse(odd, weight_update)), (2, 1, 0));
}

/// (d) The fused plan computes exactly what the plain one does: 3 training steps of the reference
/// model on the CPU reference (whose `run` executes a fused op as its composition,
/// `ops::run_unfused`), one backend running the graph's own plan (plain: the reference fuses
/// nothing) and the other that plan with every fusion, give bit-identical parameters, gradients,
/// velocities and statistics.
#[test]
fn a_fused_plan_computes_exactly_what_the_plain_one_does() {
    use gpu_mnist::backend::cpu::CpuBackend;
    use gpu_mnist::model::ParamPart;
    use gpu_mnist::plan::{self, PlanKind};
    let steps = 3;
    let opt = rmsprop();
    let everything = Fusions {
        weight_update: true,
        output_layer_max_rows: usize::MAX,
        output_layer_max_work: usize::MAX,
        pool_weight_gradient: true,
    };
    let mut results = Vec::new();
    for fuse in [false, true] {
        let mut be = CpuBackend::reference();
        assert_eq!(be.fusions(), Fusions::default());
        let (mut graph, ds) = reference_graph(&mut be, steps);
        let plain = graph
            .plan(&mut be, PlanKind::Train, Batch { ds, rows: PLAN_ROWS }, Some(opt))
            .unwrap()
            .to_vec();
        assert_eq!(plain, plan::train_ops(graph.layers(), ds, PLAN_ROWS, opt));
        let step = if fuse {
            plan::fuse(plain.clone(), everything)
        } else {
            plain
        };
        println!("{}", plan::describe(&step));
        assert_eq!(step.len(), if fuse { 4 } else { 11 });
        // Steps over batches 0, 1, 0 of the order.
        for slot in 0..steps {
            let start = slot % 2 * PLAN_ROWS;
            for op in &step {
                be.run(
                    op,
                    StepAt {
                        start,
                        slot,
                        step: slot,
                    },
                )
                .unwrap();
            }
        }
        let stats = ops::stats(&mut be, steps).unwrap();
        let parts = [ParamPart::Value, ParamPart::Grad, ParamPart::Velocity]
            .map(|part| pollster::block_on(graph.read_part(&mut be, part)).unwrap());
        results.push((stats, parts));
    }
    let (plain, fused) = (&results[0], &results[1]);
    assert_eq!(plain.0, fused.0, "statistics");
    println!("statistics of the {steps} steps: {:?}", fused.0);
    for (part, (p, f)) in ["value", "gradient", "velocity"]
        .iter()
        .zip(plain.1.iter().zip(&fused.1))
    {
        for (p, f) in p.iter().zip(f) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            let differ = p
                .data
                .iter()
                .zip(&f.data)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            println!("{} {part}: {} values, {differ} differ", p.name, p.data.len());
            assert!(
                bits(&p.data) == bits(&f.data),
                "{} {part}: {differ} values differ",
                p.name
            );
        }
    }
    // The steps did something.
    let init = gpu_mnist::model::glorot_init(&gpu_mnist::model::ModelSpec::mnist(&[512]), 4);
    assert!(fused.1[0].iter().zip(&init).all(|(p, i)| p.data != i.data));
}

/// (e) A training step of the reference model on the GPU is one dispatch per op of its plan, at
/// most 7: 7 with the output layer's fusion off, 4 with it on (where the adapter has it).
#[test]
fn a_gpu_training_step_takes_at_most_seven_dispatches() {
    use gpu_mnist::plan::{self, PlanKind};
    for fuse_output_layer in [false, true] {
        let mut be = gpu();
        be.set_output_layer_fusion(fuse_output_layer);
        let (mut graph, ds) = reference_graph(&mut be, 1);
        let opt = rmsprop();
        let planned = graph
            .plan(&mut be, PlanKind::Train, Batch { ds, rows: PLAN_ROWS }, Some(opt))
            .unwrap();
        let planned_len = planned.len();
        println!("{}", plan::describe(planned));
        let before = be.counters();
        graph
            .train_step(
                &mut be,
                Batch { ds, rows: PLAN_ROWS },
                StepAt {
                    start: PLAN_ROWS,
                    slot: 0,
                    step: 0,
                },
                &opt,
            )
            .unwrap();
        let stats = ops::stats(&mut be, 1).unwrap()[0];
        let after = be.counters();
        let dispatches = after.dispatches - before.dispatches;
        println!(
            "{} (output layer fusion {fuse_output_layer}): {dispatches} dispatches, {} submits, {} read-backs for a step; loss sum {}",
            be.name(),
            after.submits - before.submits,
            after.readbacks - before.readbacks,
            stats.loss_sum
        );
        assert!(stats.loss_sum.is_finite() && stats.loss_sum > 0.0);
        assert!(dispatches <= 7, "{dispatches} dispatches");
        assert_eq!(dispatches, planned_len as u64, "one dispatch per op of the plan");
        if !fuse_output_layer {
            assert_eq!(dispatches, 7);
        }
    }
}
