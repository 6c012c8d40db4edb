//! The GPU's convolution products (matmul.wgsl's implicit-GEMM operand maps) and max pooling
//! (pool.wgsl) against the CPU reference (`reference::conv2d_*`, `maxpool_*`, `matmul_epilogue`,
//! `bias_backward`) on random inputs at awkward shapes: batches of 1 and 63, 1 to 64 channels,
//! odd and unequal image sides, 1x1, 3x3, 5x5 and 3x5 kernels, 'valid' and 'same' padding, a
//! kernel as large as the image or larger (no output pixel at all), and the book's convnet's three layers (28x28x1 -> 32, 13x13x32
//! -> 64, 5x5x64 -> 128, each 3x3 'valid') at batch 2. Tolerances: the products atol 1e-5 + rtol
//! 1e-4 of the sum of the magnitudes of the terms (the same products over absolute values; see
//! `assert_close_scaled`); the fused optimizer step judged against the gradient the same op stored,
//! as in tests/kernels.rs (parameters 1e-7 + 1e-5, velocities 1e-12 + 1e-5); pooling exact. Every
//! output starts as a sentinel, so that a value the kernel forgets to write fails.

mod common;

use common::*;
use gpu_mnist::backend::ops::{ConvGeometry, FusedUpdate, Matmul, MatmulKind, Op, Pool, PoolKind, PoolShape, StepAt};
use gpu_mnist::backend::reference as r;
use gpu_mnist::backend::wgpu::{TileConfig, WgpuBackend};
use gpu_mnist::backend::{Backend, TensorId};
use gpu_mnist::optim::{Optimizer, OptimizerKind};

/// What every output tensor holds before an op writes it.
const SENTINEL: f32 = 7.25;

/// A convolution layer: its geometry and its filters.
#[derive(Debug, Clone, Copy)]
struct Conv {
    g: ConvGeometry,
    out_ch: usize,
}

impl std::fmt::Display for Conv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.g;
        write!(
            f,
            "{} x {}x{}x{} k{}x{} pad {} -> {}",
            g.images, g.h, g.w, g.in_ch, g.kh, g.kw, g.pad, self.out_ch
        )
    }
}

/// (images, h, w, in_ch, kh, kw, pad, out_ch).
fn conv(
    (images, h, w, in_ch): (usize, usize, usize, usize),
    (kh, kw, pad): (usize, usize, usize),
    out_ch: usize,
) -> Conv {
    Conv {
        g: ConvGeometry {
            images,
            h,
            w,
            in_ch,
            kh,
            kw,
            pad,
        },
        out_ch,
    }
}

/// Awkward convolutions, each product small enough for a software adapter.
fn awkward() -> Vec<Conv> {
    vec![
        conv((1, 7, 9, 1), (3, 3, 0), 5),
        conv((63, 7, 9, 3), (3, 3, 1), 5),
        conv((2, 13, 13, 5), (5, 5, 2), 3),
        conv((63, 13, 13, 5), (5, 5, 0), 7),
        conv((3, 7, 9, 3), (1, 1, 0), 32),
        conv((5, 9, 7, 32), (3, 3, 1), 6),
        conv((2, 7, 9, 3), (3, 5, 1), 4),
        // The kernel covers the whole image: one output pixel.
        conv((1, 5, 5, 3), (5, 5, 0), 2),
        // A kernel larger than the image, padded: every patch hangs over the padding.
        conv((2, 3, 3, 1), (5, 5, 2), 1),
        // A kernel larger than the image, unpadded: no output pixel; zero gradients.
        conv((1, 2, 2, 1), (3, 3, 0), 2),
        // 'Valid', with output rows of 8 and 15 pixels and kernel rows of 12 and 15 values: the
        // fast CPU path reads these patch matrices from the images (tiles cut at 12 rows, a
        // second vector of filters partly filled).
        conv((3, 12, 17, 5), (3, 3, 0), 40),
        conv((2, 11, 10, 4), (5, 3, 0), 33),
    ]
}

/// The book's convnet's three convolutions at batch 2.
fn book() -> [Conv; 3] {
    [
        conv((2, 28, 28, 1), (3, 3, 0), 32),
        conv((2, 13, 13, 32), (3, 3, 0), 64),
        conv((2, 5, 5, 64), (3, 3, 0), 128),
    ]
}

/// Run one product of `c` on `be`.
fn run_conv(be: &mut dyn Backend, c: Conv, kind: MatmulKind) -> gpu_mnist::Result<()> {
    let op = Op::Matmul(Matmul {
        shape: c.g.dense(c.out_ch),
        kind,
        conv: Some(c.g),
    });
    be.run(&op, StepAt::default())
}

/// A tensor of `n` sentinels (at least one value).
fn output(be: &mut dyn Backend, n: usize) -> TensorId {
    upload(be, &vec![SENTINEL; n.max(1)])
}

/// A layer's random data: input image, kernel, bias, output gradient and a ReLU mask (an image
/// of random sign, as if the previous layer's ReLU output).
struct Data {
    inp: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    dout: Vec<f32>,
    mask: Vec<f32>,
}

fn data(c: Conv, seed: u64) -> Data {
    let mut g = rng(seed);
    let (image, out) = (c.g.image_len(), c.g.pixels() * c.out_ch);
    Data {
        inp: random_vec(&mut g, image, 1.0),
        weight: random_vec(&mut g, c.g.patch() * c.out_ch, 1.0),
        bias: random_vec(&mut g, c.out_ch, 1.0),
        dout: random_vec(&mut g, out, 1.0),
        mask: random_vec(&mut g, image, 1.0),
    }
}

/// A backend's results for `c`: forward with bias and ReLU, input gradient without and with the
/// mask, weight gradient and bias gradient.
fn backend_products(be: &mut dyn Backend, c: Conv, d: &Data) -> [Vec<f32>; 5] {
    let (image, out, wlen) = (c.g.image_len(), c.g.pixels() * c.out_ch, c.g.patch() * c.out_ch);
    let [t_inp, t_w, t_bias, t_dout, t_mask] = [&d.inp, &d.weight, &d.bias, &d.dout, &d.mask].map(|v| upload(be, v));
    let (t_out, t_dinp, t_dinp_masked) = (output(be, out), output(be, image), output(be, image));
    let (t_dw, t_db) = (output(be, wlen), output(be, c.out_ch));
    let forward = MatmulKind::Forward {
        out: t_out,
        inp: t_inp,
        weight: t_w,
        bias: Some(t_bias),
        relu: true,
    };
    let input = |dinp, relu_mask| MatmulKind::BackwardInput {
        dinp,
        dout: t_dout,
        weight: t_w,
        relu_mask,
    };
    let weight = MatmulKind::BackwardWeight {
        dweight: t_dw,
        dbias: Some(t_db),
        inp: t_inp,
        dout: t_dout,
        update: None,
    };
    let ops = [forward, input(t_dinp, None), input(t_dinp_masked, Some(t_mask)), weight].map(|kind| {
        Op::Matmul(Matmul {
            shape: c.g.dense(c.out_ch),
            kind,
            conv: Some(c.g),
        })
    });
    // As a training plan runs them: the pipelines compiled ahead, then the dispatches.
    be.prepare(&ops).unwrap();
    for op in &ops {
        be.run(op, StepAt::default()).unwrap_or_else(|e| panic!("{c}: {e}"));
    }
    [
        (t_out, out),
        (t_dinp, image),
        (t_dinp_masked, image),
        (t_dw, wlen),
        (t_db, c.out_ch),
    ]
    .map(|(t, n)| download(be, t, n))
}

/// The reference's results for `backend_products`, each with the scale of its rounding error.
fn reference_products(c: Conv, d: &Data) -> [(Vec<f32>, Vec<f32>); 5] {
    let (g, oc) = (&c.g, c.out_ch);
    let (image, pixels, wlen) = (g.image_len(), g.pixels(), g.patch() * oc);
    let (abs_inp, abs_w, abs_dout) = (abs(&d.inp), abs(&d.weight), abs(&d.dout));
    let forward = |inp: &[f32], w: &[f32], bias: &[f32], relu| {
        let mut out = vec![0.0; pixels * oc];
        r::conv2d_forward(&mut out, inp, w, g, oc);
        r::matmul_epilogue(&mut out, Some(bias), relu, None, pixels, oc);
        out
    };
    let input = |dout: &[f32], w: &[f32], mask: Option<&[f32]>| {
        let mut dinp = vec![0.0; image];
        r::conv2d_backward_input(&mut dinp, dout, w, g, oc);
        r::matmul_epilogue(&mut dinp, None, false, mask, image, 1);
        dinp
    };
    let weight = |inp: &[f32], dout: &[f32]| {
        let mut dw = vec![0.0; wlen];
        r::conv2d_backward_weight(&mut dw, inp, dout, g, oc);
        dw
    };
    let dbias = |dout: &[f32]| {
        let mut db = vec![0.0; oc];
        r::bias_backward(&mut db, dout, pixels, oc);
        db
    };
    [
        (
            forward(&d.inp, &d.weight, &d.bias, true),
            forward(&abs_inp, &abs_w, &abs(&d.bias), false),
        ),
        (input(&d.dout, &d.weight, None), input(&abs_dout, &abs_w, None)),
        (input(&d.dout, &d.weight, Some(&d.mask)), input(&abs_dout, &abs_w, None)),
        (weight(&d.inp, &d.dout), weight(&abs_inp, &abs_dout)),
        (dbias(&d.dout), dbias(&abs_dout)),
    ]
}

const PRODUCTS: [&str; 5] = [
    "conv forward + bias + relu",
    "conv input gradient",
    "conv input gradient * relu mask",
    "conv weight gradient",
    "conv bias gradient",
];

/// `c`'s five results on a backend (the GPU, or the fast CPU path) against the reference.
fn check_products(be: &mut dyn Backend, c: Conv, seed: u64, tiles: &str) {
    let d = data(c, seed);
    let got = backend_products(be, c, &d);
    let want = reference_products(c, &d);
    for ((name, got), (want, scale)) in PRODUCTS.iter().zip(&got).zip(&want) {
        assert_close_scaled(&format!("{name} {c}{tiles}"), got, want, scale, 1e-5, 1e-4);
    }
    // The mask zeroes exactly where it is not > 0.
    assert!(
        got[2].iter().zip(&d.mask).all(|(g, m)| *m > 0.0 || *g == 0.0),
        "{c}: mask not applied"
    );
}

#[test]
fn conv_products_match_the_reference_at_awkward_shapes() {
    let mut be = gpu();
    for (i, c) in awkward().into_iter().enumerate() {
        check_products(&mut be, c, 100 + i as u64, "");
    }
}

/// The fast CPU path's products (patch matrices written out, or read from the images, direct
/// first layers) at the same shapes and tolerances.
#[test]
fn fast_cpu_conv_products_match_the_reference_at_awkward_and_book_shapes() {
    let mut be = fast_cpu();
    let shapes = awkward().into_iter().chain(book());
    let book_64 = book().map(|c| Conv {
        g: ConvGeometry { images: 64, ..c.g },
        ..c
    });
    for (i, c) in shapes.chain(book_64).enumerate() {
        check_products(&mut be, c, 600 + i as u64, " (fast cpu)");
    }
}

#[test]
fn conv_products_match_the_reference_at_the_book_shapes() {
    let mut be = gpu();
    for (i, c) in book().into_iter().enumerate() {
        check_products(&mut be, c, 200 + i as u64, "");
    }
}

/// Every product of a convolution under tilings the shader is built with: partial tiles,
/// partial chunks, slices without a chunk, the software tiling and what `TileConfig::for_shape`
/// picks for the book's products at batch 64.
#[test]
fn conv_products_match_the_reference_under_every_tiling() {
    let mut be = gpu();
    let mut tilings = vec![
        TileConfig::SOFTWARE,
        TileConfig::new(32, 32, 16, 4).unwrap(),
        TileConfig::new(64, 32, 8, 2).unwrap(),
        TileConfig::new(16, 16, 32, 4).unwrap(),
        TileConfig::new(8, 32, 8, 2).unwrap(),
    ];
    // (m, n, k) of the book's products at batch 64: forward, input gradient, weight gradient.
    for c in book() {
        let g = ConvGeometry { images: 64, ..c.g };
        let (pixels, patch, oc) = g.dense(c.out_ch).dims();
        let input = (g.images * g.h * g.w, g.in_ch, g.kh * g.kw * oc);
        for (m, n, k) in [(pixels, oc, patch), input, (patch, oc, pixels)] {
            let t = TileConfig::for_shape(m, n, k);
            if !tilings.contains(&t) {
                tilings.push(t);
            }
        }
    }
    let c = conv((3, 13, 11, 5), (3, 3, 1), 20);
    for (i, &tiles) in tilings.iter().enumerate() {
        be.set_matmul_tiles(Some(tiles));
        let label = format!(" (tiles {},{},{},{})", tiles.tm, tiles.tn, tiles.kc, tiles.s);
        check_products(&mut be, c, 300 + i as u64, &label);
    }
}

/// The weight gradient with RMSprop's step fused in, for a layer packed after another one (so
/// that its parameters sit at non-zero offsets): the gradients as the products, the step against
/// `rmsprop_update` on the gradients the same op stored, the other layer untouched.
#[test]
fn conv_weight_gradient_with_a_fused_rmsprop_step_matches_the_reference() {
    let mut be = gpu();
    let opt = Optimizer::new(OptimizerKind::RmsProp, Some(1e-3)).unwrap();
    for (i, c) in [conv((3, 7, 9, 3), (3, 3, 1), 5), book()[1]].into_iter().enumerate() {
        let (patch, oc, pixels) = (c.g.patch(), c.out_ch, c.g.pixels());
        let mut g = rng(400 + i as u64);
        let lens = [11, 3, patch * oc, oc];
        let values: Vec<Vec<f32>> = lens.iter().map(|&n| random_vec(&mut g, n, 1.0)).collect();
        let vels: Vec<Vec<f32>> = lens.iter().map(|&n| abs(&random_vec(&mut g, n, 1e-4))).collect();
        let inp = random_vec(&mut g, c.g.image_len(), 1.0);
        let dout = random_vec(&mut g, pixels * oc, 1e-2);
        let packed = packed_two_layers(&mut be, (&values, &vels), (patch, oc));
        let (w, b) = (param_of(&packed, 2), param_of(&packed, 3));
        let (t_inp, t_dout) = (upload(&mut be, &inp), upload(&mut be, &dout));
        let kind = MatmulKind::BackwardWeight {
            dweight: w.grad,
            dbias: Some(b.grad),
            inp: t_inp,
            dout: t_dout,
            update: Some(FusedUpdate {
                weight: w.state(),
                bias: b.state(),
                opt,
            }),
        };
        run_conv(&mut be, c, kind).unwrap();
        let [dw, db, weight, bias, weight_vel, bias_vel, other] = [
            w.grad,
            b.grad,
            w.value,
            b.value,
            w.velocity,
            b.velocity,
            packed[0].parts[0],
        ]
        .map(|t| ops::read(&mut be, t).unwrap());

        let (mut want_dw, mut scale_dw) = (vec![0.0; patch * oc], vec![0.0; patch * oc]);
        r::conv2d_backward_weight(&mut want_dw, &inp, &dout, &c.g, oc);
        r::conv2d_backward_weight(&mut scale_dw, &abs(&inp), &abs(&dout), &c.g, oc);
        assert_close_scaled(
            &format!("fused conv weight gradient {c}"),
            &dw,
            &want_dw,
            &scale_dw,
            1e-5,
            1e-4,
        );
        let (mut want_db, mut scale_db) = (vec![0.0; oc], vec![0.0; oc]);
        r::bias_backward(&mut want_db, &dout, pixels, oc);
        r::bias_backward(&mut scale_db, &abs(&dout), pixels, oc);
        assert_close_scaled(
            &format!("fused conv bias gradient {c}"),
            &db,
            &want_db,
            &scale_db,
            1e-5,
            1e-4,
        );
        for (part, grad, k, got_value, got_vel) in [
            ("weight", &dw, 2, &weight, &weight_vel),
            ("bias", &db, 3, &bias, &bias_vel),
        ] {
            let (mut want_p, mut want_v) = (values[k].clone(), vels[k].clone());
            r::rmsprop_update(&mut want_p, &mut want_v, grad, opt.lr, opt.rho, opt.eps);
            let what = format!("fused conv RMSprop {part} {c}");
            assert_ne!(got_value, &values[k], "{what}: the step changed nothing");
            assert_close(&format!("{what} param"), got_value, &want_p, 1e-7, 1e-5);
            assert_close(&format!("{what} velocity"), got_vel, &want_v, 1e-12, 1e-5);
        }
        assert_eq!(other, values[0], "{c}: the other layer's weight changed");
    }
}

/// (images, h, w, ch, size): odd sides (dropped edge rows and columns), windows of 1, 2 and 3,
/// 1 to 64 channels, batches of 1, 2, 3 and 63, and an image narrower than a window.
const POOLS: [(usize, usize, usize, usize, usize); 8] = [
    (1, 7, 9, 1, 2),
    (63, 13, 13, 5, 2),
    (2, 26, 26, 32, 2),
    (3, 5, 7, 3, 3),
    (2, 11, 11, 64, 2),
    (2, 4, 5, 3, 1),
    (1, 3, 1, 2, 2),
    (2, 3, 3, 5, 0),
];

fn pool_shape((images, h, w, ch, size): (usize, usize, usize, usize, usize)) -> PoolShape {
    PoolShape { images, h, w, ch, size }
}

/// The GPU's max pool forward and backward (relu off and on) of inp.
fn gpu_pool(be: &mut WgpuBackend, p: PoolShape, inp: &[f32], dout: &[f32]) -> [Vec<f32>; 3] {
    let (t_inp, t_dout) = (upload(be, inp), upload(be, dout));
    let t_out = output(be, p.out_len());
    let (t_dinp, t_dinp_relu) = (output(be, p.in_len()), output(be, p.in_len()));
    let backward = |dinp, relu| PoolKind::Backward {
        dinp,
        dout: t_dout,
        inp: t_inp,
        relu,
    };
    let forward = PoolKind::Forward { out: t_out, inp: t_inp };
    let ops =
        [forward, backward(t_dinp, false), backward(t_dinp_relu, true)].map(|kind| Op::Pool(Pool { shape: p, kind }));
    // As a training plan runs them: the pipelines compiled ahead, then the dispatches.
    be.prepare(&ops).unwrap();
    for op in &ops {
        be.run(op, StepAt::default()).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    }
    [(t_out, p.out_len()), (t_dinp, p.in_len()), (t_dinp_relu, p.in_len())].map(|(t, n)| download(be, t, n))
}

fn reference_pool(p: PoolShape, inp: &[f32], dout: &[f32]) -> [Vec<f32>; 3] {
    let mut out = vec![0.0; p.out_len()];
    r::maxpool_forward(&mut out, inp, &p);
    let backward = |relu| {
        let mut dinp = vec![0.0; p.in_len()];
        r::maxpool_backward(&mut dinp, dout, inp, &p, relu);
        dinp
    };
    [out, backward(false), backward(true)]
}

/// Exact equality, bit for bit.
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let bad = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits());
    println!("{what}: {} values, exact: {}", got.len(), bad.is_none());
    if let Some(i) = bad {
        panic!("{what}: [{i}] got {} want {}", got[i], want[i]);
    }
}

/// Values on a coarse grid of 7 levels in [-1, 1] (zeros and negative zeros among them), so
/// that windows hold ties and the ReLU flag matters.
fn coarse(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    random_vec(rng, n, 1.0)
        .iter()
        .map(|v| (v * 3.0).round() / 3.0)
        .collect()
}

#[test]
fn maxpool_matches_the_reference_exactly() {
    let mut be = gpu();
    for (i, &shape) in POOLS.iter().enumerate() {
        let p = pool_shape(shape);
        let mut g = rng(500 + i as u64);
        let inp = coarse(&mut g, p.in_len());
        let dout = random_vec(&mut g, p.out_len(), 1.0);
        let got = gpu_pool(&mut be, p, &inp, &dout);
        let want = reference_pool(p, &inp, &dout);
        for (name, (got, want)) in ["max pool forward", "max pool backward", "max pool backward relu"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            assert_bits(&format!("{name} {shape:?}"), got, want);
        }
    }
}

/// A tie goes to the window's first maximum in row-major order; the ReLU flag drops a maximum
/// that is not > 0; a dropped edge column gets 0.
#[test]
fn maxpool_breaks_ties_to_the_first_maximum() {
    let mut be = gpu();
    // One image 2 x 3, one channel, 2 x 2 windows: one window (columns 0-1), column 2 dropped.
    let p = pool_shape((1, 2, 3, 1, 2));
    let inp = [1.0, 3.0, 9.0, 3.0, 2.0, 9.0];
    let [out, dinp, dinp_relu] = gpu_pool(&mut be, p, &inp, &[0.5]);
    assert_eq!(out, [3.0]);
    assert_eq!(dinp, [0.0, 0.5, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(dinp_relu, dinp);
    // Every value of the window is -1 and 0: the first 0 wins, and the ReLU flag drops it.
    let inp = [-1.0, 0.0, 5.0, 0.0, -1.0, 5.0];
    let [out, dinp, dinp_relu] = gpu_pool(&mut be, p, &inp, &[0.5]);
    assert_eq!(out, [0.0]);
    assert_eq!(dinp, [0.0, 0.5, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(dinp_relu, [0.0; 6]);
    let want = reference_pool(p, &inp, &[0.5]);
    assert_eq!([out, dinp, dinp_relu], want);
}

/// Two runs of every kernel on the same inputs give the same bits: every sum is taken in a
/// fixed order and nothing is scattered.
#[test]
fn conv_and_pool_results_are_bit_identical_across_runs() {
    let mut be = gpu();
    for (i, c) in [awkward()[3], book()[1]].into_iter().enumerate() {
        let d = data(c, 600 + i as u64);
        let first = backend_products(&mut be, c, &d);
        let second = backend_products(&mut be, c, &d);
        for (name, (a, b)) in PRODUCTS.iter().zip(first.iter().zip(&second)) {
            assert_bits(&format!("{name} {c}, run 2 against run 1"), b, a);
        }
    }
    let p = pool_shape(POOLS[1]);
    let mut g = rng(700);
    let (inp, dout) = (coarse(&mut g, p.in_len()), random_vec(&mut g, p.out_len(), 1.0));
    let first = gpu_pool(&mut be, p, &inp, &dout);
    let second = gpu_pool(&mut be, p, &inp, &dout);
    for (a, b) in first.iter().zip(&second) {
        assert_bits("max pool, run 2 against run 1", b, a);
    }
}

/// A product whose shape is not its geometry's, a short input image, a pool whose output shares
/// a buffer with its input and a short pool gradient are refused with an error naming the op.
#[test]
fn conv_and_pool_ops_refuse_bad_arguments() {
    let mut be = gpu();
    let c = conv((2, 7, 9, 3), (3, 3, 1), 5);
    let d = data(c, 800);
    let [t_w, t_dout] = [&d.weight, &d.dout].map(|v| upload(&mut be, v));
    let t_out = output(&mut be, c.g.pixels() * c.out_ch);
    let short = upload(&mut be, &d.inp[..d.inp.len() - 1]);
    let forward = |inp| MatmulKind::Forward {
        out: t_out,
        inp,
        weight: t_w,
        bias: None,
        relu: false,
    };
    let err = run_conv(&mut be, c, forward(short)).unwrap_err();
    println!("short image: {err}");
    assert!(err.to_string().contains("matmul forward"), "{err}");
    let t_inp = upload(&mut be, &d.inp);
    let mut shape = c.g.dense(c.out_ch);
    shape.rows += 1;
    let wrong = Op::Matmul(Matmul {
        shape,
        kind: forward(t_inp),
        conv: Some(c.g),
    });
    let err = be.run(&wrong, StepAt::default()).unwrap_err();
    println!("shape not the geometry's: {err}");
    assert!(err.to_string().contains("does not fit the convolution"), "{err}");
    let input = MatmulKind::BackwardInput {
        dinp: t_inp,
        dout: t_dout,
        weight: t_w,
        relu_mask: Some(short),
    };
    let err = run_conv(&mut be, c, input).unwrap_err();
    println!("short relu mask: {err}");
    assert!(err.to_string().contains("matmul backward input"), "{err}");

    let p = pool_shape((2, 4, 4, 3, 2));
    let packed = be.alloc_packed(&[p.in_len(), p.out_len()]).unwrap();
    let (inp, out) = (packed.parts[0], packed.parts[1]);
    let err = be
        .run(
            &Op::Pool(Pool {
                shape: p,
                kind: PoolKind::Forward { out, inp },
            }),
            StepAt::default(),
        )
        .unwrap_err();
    println!("pool into its input's buffer: {err}");
    assert!(err.to_string().contains("shares its buffer"), "{err}");
    let (t_inp, t_dinp, short) = (
        output(&mut be, p.in_len()),
        output(&mut be, p.in_len()),
        output(&mut be, 3),
    );
    let backward = PoolKind::Backward {
        dinp: t_dinp,
        dout: short,
        inp: t_inp,
        relu: true,
    };
    let err = be
        .run(
            &Op::Pool(Pool {
                shape: p,
                kind: backward,
            }),
            StepAt::default(),
        )
        .unwrap_err();
    println!("short pool gradient: {err}");
    assert!(err.to_string().contains("max pool backward"), "{err}");
}
