//! Every op of the training step, on the GPU and on the fast CPU path, against the CPU reference
//! on random inputs at awkward shapes. Tolerances (f32, different summation orders): exact for
//! gather, relu and bias-add; atol 1e-5 + rtol 1e-4 for matmul and column sums, where rtol is
//! relative to the sum of the magnitudes of the terms (sum |a_k b_k|), the scale of f32 rounding
//! error; rtol 1e-4 for the softmax cross-entropy; rtol 1e-5 for the optimizer updates.

mod common;

use common::*;
use gpu_mnist::backend::reference as r;
use gpu_mnist::backend::wgpu::TileConfig;
use gpu_mnist::backend::{Backend, Epilogue};
use gpu_mnist::data::IMAGE_PIXELS;

/// (B, C, OC): the awkward shapes and the real layer-1 shape.
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
    be.matmul_forward(t_out, t_inp, t_w, Epilogue::default(), b, c, oc)
        .unwrap();
    be.matmul_backward_input(t_dinp, t_dout, t_w, Epilogue::default(), b, c, oc)
        .unwrap();
    be.matmul_backward_weight(t_dw, Some(t_db), t_inp, t_dout, b, c, oc)
        .unwrap();

    // The same products over absolute values: the scale of each sum's rounding error.
    let (abs_inp, abs_w, abs_dout): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        inp.iter().map(|v| v.abs()).collect(),
        weight.iter().map(|v| v.abs()).collect(),
        dout.iter().map(|v| v.abs()).collect(),
    );
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
            let fwd = Epilogue {
                bias: Some(t_bias),
                relu: true,
                relu_mask: None,
            };
            be.matmul_forward(t_out, t_inp, t_w, fwd, b, c, oc).unwrap();
            // The mask is the (random-signed) input itself, as if it were a ReLU's output.
            let bwd = Epilogue {
                bias: None,
                relu: false,
                relu_mask: Some(t_inp),
            };
            be.matmul_backward_input(t_dinp, t_dout, t_w, bwd, b, c, oc).unwrap();

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
            let t_relu = be.alloc(b * oc).unwrap();
            let t_drelu = be.alloc(b * oc).unwrap();
            let t_dbias = be.alloc(oc).unwrap();
            be.relu_forward(t_relu, t_x, b * oc).unwrap();
            be.relu_backward(t_drelu, t_dout, t_relu, b * oc).unwrap();
            be.bias_backward(t_dbias, t_dout, b, oc).unwrap();
            be.bias_add_forward(t_x, t_bias, b, oc).unwrap();

            let shape = format!("{b}x{oc}");
            let mut relu = vec![0.0; b * oc];
            r::relu_forward(&mut relu, &x);
            assert_close(
                &format!("{name} relu_forward {shape}"),
                &download(be, t_relu, b * oc),
                &relu,
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
            r::bias_backward(&mut scale, &dout.iter().map(|v| v.abs()).collect::<Vec<_>>(), b, oc);
            let got = download(be, t_dbias, oc);
            assert_close_scaled(
                &format!("{name} bias_backward {shape}"),
                &got,
                &dbias,
                &scale,
                1e-5,
                1e-4,
            );
            let mut biased = x.clone();
            r::bias_add_forward(&mut biased, &bias, b, oc);
            assert_close(
                &format!("{name} bias_add_forward {shape}"),
                &download(be, t_x, b * oc),
                &biased,
                0.0,
                0.0,
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
            be.gather_batch(t_x, ds, start, rows).unwrap();
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
            be.softmax_xent_forward_backward(Some(t_dlogits), t_logits, ds, start, rows, classes, slot)
                .unwrap();
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
            let stats = be.read_stats(slot + 1).unwrap()[slot];
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

#[test]
fn optimizer_updates_match_the_reference() {
    for mut be in devices_under_test() {
        let be = be.as_mut();
        let name = be.name();
        for n in [1usize, 7, 1000, 401_408] {
            let mut g = rng(n as u64);
            let param = random_vec(&mut g, n, 1.0);
            let grad = random_vec(&mut g, n, 1e-2);
            let velocity: Vec<f32> = random_vec(&mut g, n, 1e-4).iter().map(|v| v.abs()).collect();
            let (t_p, t_g, t_v, t_sgd) = (
                upload(be, &param),
                upload(be, &grad),
                upload(be, &velocity),
                upload(be, &param),
            );
            be.rmsprop_update(t_p, t_v, t_g, n, 1e-3, 0.9, 1e-7).unwrap();
            be.sgd_update(t_sgd, t_g, n, 0.05).unwrap();
            let (mut want_p, mut want_v, mut want_sgd) = (param.clone(), velocity.clone(), param.clone());
            r::rmsprop_update(&mut want_p, &mut want_v, &grad, 1e-3, 0.9, 1e-7);
            r::sgd_update(&mut want_sgd, &grad, 0.05);
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
        }
    }
}

#[test]
fn ops_reject_inconsistent_shapes_instead_of_panicking() {
    for mut be in devices_under_test() {
        let be = be.as_mut();
        let small = be.alloc(10).unwrap();
        let big = be.alloc(1000).unwrap();
        let err = be
            .matmul_forward(small, big, big, Epilogue::default(), 10, 10, 10)
            .unwrap_err();
        assert!(err.to_string().contains("matmul_forward"), "{err}");
        assert!(
            be.relu_forward(big, big, 100).is_err(),
            "output aliasing the input must be refused"
        );
        assert!(be.read_stats(1_000_000).is_err());
    }
}

/// Packed tensors (how the graph keeps its parameters): parts read and write at their offsets, one
/// update over the whole equals the updates of the parts, and an op that would write one part while
/// reading another of the same allocation is refused (wgpu forbids it within a dispatch).
#[test]
fn packed_tensors_update_in_one_op_and_refuse_aliasing() {
    for mut be in devices_under_test() {
        let be = be.as_mut();
        let name = be.name();
        let lens = [7usize, 1, 300, 10];
        let (params, grads, vels) = (
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
            let (mut wp, mut wv) = (p.clone(), vec![0.0; len]);
            r::rmsprop_update(&mut wp, &mut wv, &gr, 1e-3, 0.9, 1e-7);
            want.push((wp, wv));
        }
        be.rmsprop_update(params.whole, vels.whole, grads.whole, params.len, 1e-3, 0.9, 1e-7)
            .unwrap();
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
        // A matmul reading packed parts (weight: the first 70 values of part 2; bias: part 3)
        // works like one on plain tensors.
        let (b, c, oc) = (3, 7, 10);
        let x = random_vec(&mut g, b * c, 1.0);
        let (inp, out) = (upload(be, &x), be.alloc(b * oc).unwrap());
        let epi = Epilogue {
            bias: Some(params.parts[3]),
            relu: false,
            relu_mask: None,
        };
        be.matmul_forward(out, inp, params.parts[2], epi, b, c, oc).unwrap();
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
        let err = be.bias_backward(grads.parts[0], grads.parts[2], 1, 7).unwrap_err();
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

/// The first layer's forward product on a batch from the dataset against the reference ops
/// (gather_batch, then matmul_forward with bias and ReLU), on the fast CPU path, the GPU, and the
/// GPU reading the pixels straight into the product (GPU_MNIST_GATHER_FUSION=1, variant 2). The
/// gathered input must equal the reference's exactly; the product is judged as a matmul (atol
/// 1e-5 + rtol 1e-4 of sum |x w|).
#[test]
fn gathered_first_layer_matches_the_reference_ops() {
    let mut fused = gpu();
    fused.set_gather_fusion(true);
    let mut devices = devices_under_test();
    devices.push(Box::new(fused));
    for (d, be) in devices.iter_mut().enumerate() {
        let be = be.as_mut();
        let name = format!("{} (variant {d})", be.name());
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
            let epilogue = Epilogue {
                bias: Some(t_b),
                relu: true,
                relu_mask: None,
            };
            be.gather_matmul_forward(t_out, t_x, ds, start, t_w, epilogue, rows, oc)
                .unwrap();
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
/// forbids a buffer bound both ways in one dispatch): the gathered input sharing a packed buffer
/// with the weight.
#[test]
fn fused_ops_refuse_writing_what_they_read() {
    let mut be = gpu();
    be.set_gather_fusion(true);
    let mut g = rng(5);
    let data = random_dataset(&mut g, 20);
    let ds = be.upload_dataset(&data).unwrap();
    let (rows, oc) = (4, 3);
    let packed = be.alloc_packed(&[rows * IMAGE_PIXELS, IMAGE_PIXELS * oc]).unwrap();
    let out = be.alloc(rows * oc).unwrap();
    let err = be
        .gather_matmul_forward(
            out,
            packed.parts[0],
            ds,
            0,
            packed.parts[1],
            Epilogue::default(),
            rows,
            oc,
        )
        .unwrap_err();
    println!("{err}");
    assert!(err.to_string().contains("gather_matmul_forward"), "{err}");
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

/// One `output_layer_step` on `be` for an output layer of 10 classes packed after another layer
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
    use gpu_mnist::backend::OutputLayerStep;
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
    let step = OutputLayerStep {
        weight: param_of(&packed, 2),
        bias: param_of(&packed, 3),
        inp: t_inp,
        logits,
        dlogits,
        dinp,
        ds,
        start,
        slot: 0,
        b,
        c,
        classes,
    };
    let before = be.counters().dispatches;
    be.output_layer_step(&step, opt).unwrap();
    let dispatches = be.counters().dispatches - before;
    let stats = be.read_stats(1).unwrap()[0];
    let mut parts = vec![dlogits, dinp];
    for p in &packed {
        parts.extend(&p.parts);
    }
    (parts.iter().map(|&t| be.read(t).unwrap()).collect(), stats, dispatches)
}

/// The output layer's step as one dispatch (output_layer.wgsl, `set_output_layer_fusion`) and
/// as the other devices' ops, against the reference backend running its four ops in sequence,
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
    let mut devices: Vec<(Box<dyn Backend>, bool)> = devices_under_test().into_iter().map(|d| (d, false)).collect();
    devices.push((Box::new(fused), true));
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
                let name = format!("{}{}", be.name(), if *fuses { " (fused)" } else { "" });
                let (got, stats, dispatches) = run(be.as_mut());
                for (k, part) in OUTPUT_LAYER_PARTS.iter().enumerate() {
                    let what = format!("{name} output layer {kind:?} {part} {b}x{c}");
                    assert_close(&what, &got[k], &want[k], 1e-6, 1e-4);
                }
                let what = format!("{name} output layer {kind:?} loss sum {b}x{c}");
                assert_close(&what, &[stats.loss_sum], &[want_stats.loss_sum], 0.0, 1e-4);
                assert_eq!(stats.correct, want_stats.correct, "{name}: correct count, {b}x{c}");
                if *fuses {
                    // The limits of src/backend/wgpu/mod.rs: 1024 rows, 4 x 128 x 512 rows x inputs.
                    let one = available && b <= 1024 && b * c <= 4 * 128 * 512;
                    assert_eq!(dispatches, if one { 1 } else { 4 }, "{name}: dispatches, {b}x{c}");
                }
            }
        }
    }
}
