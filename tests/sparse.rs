//! The fast CPU path's sparse products (taken when an input is mostly zeros, as MNIST's pixels
//! are) against the CPU reference, through the backend's ops, at awkward shapes (outputs that
//! leave partial column blocks, one-row batches, empty rows and columns) and densities from 0 to
//! the switch-over (35 %): the forward product with bias and ReLU, the weight gradient with the
//! bias gradient, the fused RMSprop and SGD steps, the first layer gathered from a dataset, and
//! the rows the backend keeps of an input, which must be dropped when the input changes.
//! Tolerances as in kernels.rs: atol 1e-5 plus rtol 1e-4 of sum |a_k b_k| for products; atol
//! 1e-6 plus rtol 1e-4 for parameters after a step. Each comparison prints its max difference.
//! tests/run.sh runs this file again with GPU_MNIST_CPU_SIMD=avx2 and =portable, so that every
//! kernel variant is checked on a CPU with AVX-512.

mod common;

use common::*;
use gpu_mnist::backend::cpu::CpuBackend;
use gpu_mnist::backend::reference as r;
use gpu_mnist::backend::Backend;
use gpu_mnist::data::{Dataset, IMAGE_PIXELS};
use gpu_mnist::optim::{Optimizer, OptimizerKind};
use rand::RngExt;

/// (B, C, OC): outputs with no, one and several partial column blocks (64/128, 8, 1 wide).
const SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 64),
    (3, 5, 65),
    (7, 100, 137),
    (61, 784, 200),
    (127, 784, 521),
    (128, 784, 512),
];

/// n values of which floor(n * density) at random places are non-zero (uniform in [-1, 1], never
/// 0), the rest exactly 0: never denser than asked, so the sparse path's threshold is kept.
fn sparse_vec(g: &mut rand_chacha::ChaCha8Rng, n: usize, density: f64) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    let mut places: Vec<usize> = (0..n).collect();
    for i in 0..(n as f64 * density) as usize {
        let j = g.random_range(i..n);
        places.swap(i, j);
        let x: f32 = g.random_range(-1.0f32..1.0);
        v[places[i]] = if x == 0.0 { 0.5 } else { x };
    }
    v
}

#[test]
fn sparse_products_match_the_reference() {
    let mut be = fast_cpu();
    println!("{}", be.name());
    for (i, &(b, c, oc)) in SHAPES.iter().enumerate() {
        for (j, &density) in [0.0, 0.05, 0.19, 0.34].iter().enumerate() {
            let mut g = rng(100 + 10 * i as u64 + j as u64);
            let mut inp = sparse_vec(&mut g, b * c, density);
            // An empty first row and an empty last column, whatever the density.
            inp[..c].fill(0.0);
            for row in inp.chunks_mut(c) {
                row[c - 1] = 0.0;
            }
            let weight = random_vec(&mut g, c * oc, 1.0);
            let bias = random_vec(&mut g, oc, 1.0);
            let dout = random_vec(&mut g, b * oc, 1.0);
            let (t_inp, t_w, t_bias, t_dout) = (
                upload(&mut be, &inp),
                upload(&mut be, &weight),
                upload(&mut be, &bias),
                upload(&mut be, &dout),
            );
            let (t_out, t_dw, t_db) = (
                be.alloc(b * oc).unwrap(),
                be.alloc(c * oc).unwrap(),
                be.alloc(oc).unwrap(),
            );
            let before = be.sparse_products();
            ops::forward(&mut be, (t_out, t_inp, t_w), (Some(t_bias), true), (b, c, oc)).unwrap();
            ops::backward_weight(&mut be, (t_dw, Some(t_db)), (t_inp, t_dout), (b, c, oc)).unwrap();
            assert_eq!(
                be.sparse_products() - before,
                2,
                "{b}x{c}x{oc} at density {density}: the sparse path was not taken"
            );

            let what = format!("sparse {b}x{c}x{oc} density {density}");
            let (want, scale) = reference_dense_relu(&inp, &weight, &bias, (b, c, oc));
            let got = download(&mut be, t_out, b * oc);
            assert_close_scaled(&format!("{what} forward+bias+relu"), &got, &want, &scale, 1e-5, 1e-4);

            let (mut want, mut scale) = (vec![0.0; c * oc], vec![0.0; c * oc]);
            r::matmul_backward_weight(&mut want, &inp, &dout, b, c, oc);
            r::matmul_backward_weight(&mut scale, &abs(&inp), &abs(&dout), b, c, oc);
            let got = download(&mut be, t_dw, c * oc);
            assert_close_scaled(&format!("{what} dweight"), &got, &want, &scale, 1e-5, 1e-4);
            let (mut want, mut scale) = (vec![0.0; oc], vec![0.0; oc]);
            r::bias_backward(&mut want, &dout, b, oc);
            r::bias_backward(&mut scale, &abs(&dout), b, oc);
            let got = download(&mut be, t_db, oc);
            assert_close_scaled(&format!("{what} dbias"), &got, &want, &scale, 1e-5, 1e-4);
        }
    }
}

#[test]
fn dense_inputs_and_narrow_outputs_take_the_dense_path() {
    let mut be = fast_cpu();
    for (b, c, oc, density) in [(64, 100, 512, 0.5), (128, 784, 10, 0.1), (128, 512, 63, 0.0)] {
        let mut g = rng(7);
        let inp = sparse_vec(&mut g, b * c, density);
        let weight = random_vec(&mut g, c * oc, 1.0);
        let (t_inp, t_w, t_out) = (
            upload(&mut be, &inp),
            upload(&mut be, &weight),
            be.alloc(b * oc).unwrap(),
        );
        let before = be.sparse_products();
        ops::forward(&mut be, (t_out, t_inp, t_w), (None, false), (b, c, oc)).unwrap();
        assert_eq!(be.sparse_products(), before, "{b}x{c}x{oc} at density {density}");
        let (mut want, mut scale) = (vec![0.0; b * oc], vec![0.0; b * oc]);
        r::matmul_forward(&mut want, &inp, &weight, b, c, oc);
        r::matmul_forward(&mut scale, &abs(&inp), &abs(&weight), b, c, oc);
        let got = download(&mut be, t_out, b * oc);
        let what = format!("dense {b}x{c}x{oc} density {density}");
        assert_close_scaled(&what, &got, &want, &scale, 1e-5, 1e-4);
    }
}

/// The weight gradient with the optimizer step fused into it against the reference backend
/// running the parts in sequence, for a layer packed after another one (non-zero offsets).
#[test]
fn fused_sparse_step_matches_the_reference_ops() {
    for kind in [OptimizerKind::RmsProp, OptimizerKind::Sgd] {
        let opt = Optimizer::new(kind, Some(0.01)).unwrap();
        for (i, &(b, c, oc)) in SHAPES.iter().enumerate() {
            let mut g = rng(300 + i as u64);
            let lens = [11, 3, c * oc, oc];
            let values: Vec<Vec<f32>> = lens.iter().map(|&n| random_vec(&mut g, n, 0.5)).collect();
            let vels: Vec<Vec<f32>> = lens.iter().map(|&n| abs(&random_vec(&mut g, n, 1e-3))).collect();
            let inp = sparse_vec(&mut g, b * c, 0.2);
            let dout = random_vec(&mut g, b * oc, 0.1);
            let mut fast = fast_cpu();
            let want = fused_step(
                &mut CpuBackend::reference(),
                (&values, &vels),
                (&inp, &dout),
                (b, c, oc),
                &opt,
            );
            let got = fused_step(&mut fast, (&values, &vels), (&inp, &dout), (b, c, oc), &opt);
            assert_eq!(fast.sparse_products(), 1, "{b}x{c}x{oc}: the sparse path was not taken");
            for (k, name) in FUSED_STEP_PARTS.iter().enumerate() {
                let what = format!("sparse fused {kind:?} {name} {b}x{c}x{oc}");
                assert_close(&what, &got[k], &want[k], 1e-6, 1e-4);
            }
        }
    }
}

/// Images that are mostly black, as MNIST's: about `density` of the pixels lit.
fn sparse_dataset(g: &mut rand_chacha::ChaCha8Rng, n: usize, density: f64) -> Dataset {
    let images = (0..n * IMAGE_PIXELS)
        .map(|_| {
            if g.random_bool(density) {
                g.random_range(1..=255u8)
            } else {
                0
            }
        })
        .collect();
    let labels = (0..n).map(|_| g.random_range(0..10u8)).collect();
    Dataset::new(images, labels).expect("consistent sizes")
}

/// The first layer gathered from a dataset (pixels to x and to the sparse rows in one pass), then
/// its weight gradient from the rows kept of x; x must equal the reference's gather exactly.
#[test]
fn gathered_sparse_first_layer_matches_the_reference() {
    let mut be = fast_cpu();
    let mut g = rng(41);
    let n = 300;
    let data = sparse_dataset(&mut g, n, 0.19);
    let order = gpu_mnist::data::epoch_order(n, 3, 2);
    let ds = be.upload_dataset(&data).unwrap();
    be.set_order(ds, &order).unwrap();
    for &(start, rows, oc) in &[(0usize, 1usize, 64usize), (7, 61, 137), (172, 128, 512)] {
        let weight = random_vec(&mut g, IMAGE_PIXELS * oc, 0.1);
        let bias = random_vec(&mut g, oc, 0.1);
        let dout = random_vec(&mut g, rows * oc, 0.1);
        let (t_w, t_b, t_dout) = (upload(&mut be, &weight), upload(&mut be, &bias), upload(&mut be, &dout));
        let (t_x, t_out) = (be.alloc(rows * IMAGE_PIXELS).unwrap(), be.alloc(rows * oc).unwrap());
        let (t_dw, t_db) = (be.alloc(IMAGE_PIXELS * oc).unwrap(), be.alloc(oc).unwrap());
        let before = be.sparse_products();
        ops::gather(&mut be, t_x, ds, start, rows).unwrap();
        let shape = (rows, IMAGE_PIXELS, oc);
        ops::forward(&mut be, (t_out, t_x, t_w), (Some(t_b), true), shape).unwrap();
        ops::backward_weight(&mut be, (t_dw, Some(t_db)), (t_x, t_dout), shape).unwrap();
        assert_eq!(be.sparse_products() - before, 2, "rows {start}+{rows}");

        let c = IMAGE_PIXELS;
        let mut x = vec![0.0; rows * c];
        r::gather_batch(&mut x, &data.images, &order, start, rows, c);
        let what = format!("gathered sparse rows {start}+{rows}, {oc} outputs");
        assert_close(&format!("{what}: x"), &download(&mut be, t_x, x.len()), &x, 0.0, 0.0);
        let (want, scale) = reference_dense_relu(&x, &weight, &bias, (rows, c, oc));
        let got = download(&mut be, t_out, rows * oc);
        assert_close_scaled(&format!("{what}: out"), &got, &want, &scale, 1e-5, 1e-4);
        let (mut want, mut scale) = (vec![0.0; c * oc], vec![0.0; c * oc]);
        r::matmul_backward_weight(&mut want, &x, &dout, rows, c, oc);
        r::matmul_backward_weight(&mut scale, &x, &abs(&dout), rows, c, oc);
        let got = download(&mut be, t_dw, c * oc);
        assert_close_scaled(&format!("{what}: dweight"), &got, &want, &scale, 1e-5, 1e-4);
    }
}

/// The backend keeps the sparse rows of the last input it multiplied; every way of changing that
/// input (a write, an op that outputs into it, a gather) must make the next product use the new
/// values. Each product is compared with the reference on the input as it then is.
#[test]
fn rows_kept_of_an_input_are_dropped_when_it_changes() {
    let (b, c, oc) = (16, IMAGE_PIXELS, 64);
    let mut be = fast_cpu();
    let mut g = rng(55);
    let data = sparse_dataset(&mut g, 64, 0.19);
    let ds = be.upload_dataset(&data).unwrap();
    let weight = random_vec(&mut g, c * oc, 0.1);
    let t_w = upload(&mut be, &weight);
    let (t_x, t_out, t_dw) = (
        be.alloc(b * c).unwrap(),
        be.alloc(b * oc).unwrap(),
        be.alloc(c * oc).unwrap(),
    );
    let dout = random_vec(&mut g, b * oc, 1.0);
    let t_dout = upload(&mut be, &dout);
    let other = sparse_vec(&mut g, b * c, 0.2);
    let t_other = upload(&mut be, &other);
    let t_eye = upload(&mut be, &ops::identity(c));
    let check = |be: &mut CpuBackend, x: &[f32], what: &str| {
        let before = be.sparse_products();
        ops::backward_weight(be, (t_dw, None), (t_x, t_dout), (b, c, oc)).unwrap();
        assert_eq!(
            be.sparse_products(),
            before + 1,
            "{what}: the sparse path was not taken"
        );
        let (mut want, mut scale) = (vec![0.0; c * oc], vec![0.0; c * oc]);
        r::matmul_backward_weight(&mut want, x, &dout, b, c, oc);
        r::matmul_backward_weight(&mut scale, &abs(x), &abs(&dout), b, c, oc);
        let got = download(be, t_dw, c * oc);
        assert_close_scaled(what, &got, &want, &scale, 1e-5, 1e-4);
    };
    // Rows kept by the gather and the forward product, then x overwritten by a write.
    ops::gather(&mut be, t_x, ds, 0, b).unwrap();
    ops::forward(&mut be, (t_out, t_x, t_w), (None, false), (b, c, oc)).unwrap();
    let mut x = vec![0.0; b * c];
    r::gather_batch(&mut x, &data.images, &(0..64).collect::<Vec<u32>>(), 0, b, c);
    check(&mut be, &x, "after the gather");
    let written = sparse_vec(&mut g, b * c, 0.1);
    be.write(t_x, &written).unwrap();
    check(&mut be, &written, "after a write");
    // x as the output of another op: relu(other @ identity), which is relu(other) exactly.
    ops::forward(&mut be, (t_x, t_other, t_eye), (None, true), (b, c, c)).unwrap();
    let relu: Vec<f32> = other.iter().map(|v| v.max(0.0)).collect();
    check(&mut be, &relu, "after a matmul wrote it");
    // x gathered again from other rows, without a forward product.
    ops::gather(&mut be, t_x, ds, 16, b).unwrap();
    r::gather_batch(&mut x, &data.images, &(0..64).collect::<Vec<u32>>(), 16, b, c);
    check(&mut be, &x, "after a gather");
}

/// NaN and infinity in a sparse input reach the product as in a dense one (the rows they are in
/// become NaN or infinite); the other rows stay exact.
#[test]
fn non_finite_inputs_spread_as_in_the_reference() {
    let (b, c, oc) = (6, 100, 64);
    let mut be = fast_cpu();
    let mut g = rng(77);
    let mut inp = sparse_vec(&mut g, b * c, 0.2);
    inp[c + 3] = f32::NAN;
    inp[3 * c + 50] = f32::INFINITY;
    let weight: Vec<f32> = random_vec(&mut g, c * oc, 1.0).iter().map(|w| w.abs() + 0.1).collect();
    let (t_inp, t_w, t_out) = (
        upload(&mut be, &inp),
        upload(&mut be, &weight),
        be.alloc(b * oc).unwrap(),
    );
    let before = be.sparse_products();
    ops::forward(&mut be, (t_out, t_inp, t_w), (None, false), (b, c, oc)).unwrap();
    assert_eq!(be.sparse_products(), before + 1, "the sparse path was not taken");
    let got = download(&mut be, t_out, b * oc);
    let mut want = vec![0.0; b * oc];
    r::matmul_forward(&mut want, &inp, &weight, b, c, oc);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.is_nan(), w.is_nan(), "value {i}: got {g}, want {w}");
        assert_eq!(g.is_infinite(), w.is_infinite(), "value {i}: got {g}, want {w}");
    }
    assert!(got[oc..2 * oc].iter().all(|v| v.is_nan()) && got[3 * oc..4 * oc].iter().all(|v| v.is_infinite()));
    let finite: Vec<usize> = (0..b * oc).filter(|&i| want[i].is_finite()).collect();
    let pick = |v: &[f32]| finite.iter().map(|&i| v[i]).collect::<Vec<f32>>();
    let mut scale = vec![0.0; b * oc];
    r::matmul_forward(&mut scale, &abs(&inp), &weight, b, c, oc);
    assert_close_scaled(
        "finite rows beside NaN and inf",
        &pick(&got),
        &pick(&want),
        &pick(&scale),
        1e-5,
        1e-4,
    );
}
