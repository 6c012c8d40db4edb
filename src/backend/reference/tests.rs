//! The reference's loops on small inputs worked out by hand.

use super::*;

#[test]
fn small_known_values() {
    // (2,3) @ (3,2)
    let inp = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
    let w = [1.0f64, 0.0, 0.0, 1.0, 1.0, 1.0];
    let mut out = [0.0; 4];
    matmul_forward(&mut out, &inp, &w, 2, 3, 2);
    assert_eq!(out, [4.0, 5.0, 10.0, 11.0]);
    let mut probs = [0.0; 2];
    let mut loss = [0.0; 1];
    softmax_xent_forward(&mut probs, &mut loss, &[0.0f64, 0.0], &[1], 1, 2);
    assert!((probs[0] - 0.5).abs() < 1e-15 && (loss[0] - 2f64.ln()).abs() < 1e-15);
    let mut p = [1.0f64];
    let mut v = [0.0f64];
    rmsprop_update(&mut p, &mut v, &[2.0], 0.1, 0.9, 0.0);
    // v = 0.1 * 4 = 0.4; p = 1 - 0.1 * 2 / sqrt(0.4)
    assert!((p[0] - (1.0 - 0.2 / 0.4f64.sqrt())).abs() < 1e-15);
}

fn geometry(images: usize, (h, w, in_ch): (usize, usize, usize), (kh, kw, pad): (usize, usize, usize)) -> ConvGeometry {
    ConvGeometry {
        images,
        h,
        w,
        in_ch,
        kh,
        kw,
        pad,
    }
}

#[test]
fn im2col_orders_patches_ky_kx_c() {
    // One 2x3 image of 2 channels, value 100 y + 10 x + c; a 2x2 kernel, no padding: 1x2 outputs.
    let g = geometry(1, (2, 3, 2), (2, 2, 0));
    let inp: Vec<f64> = (0..12)
        .map(|i| (100 * (i / 6) + 10 * (i / 2 % 3) + i % 2) as f64)
        .collect();
    let mut cols = vec![-1.0; g.pixels() * g.patch()];
    im2col(&mut cols, &inp, &g);
    let expected = [[0, 1, 10, 11, 100, 101, 110, 111], [10, 11, 20, 21, 110, 111, 120, 121]];
    let expected: Vec<f64> = expected.iter().flatten().map(|&v| v as f64).collect();
    assert_eq!(cols, expected);
}

#[test]
fn conv2d_same_padding_by_hand() {
    // One 4x4 image of 1 channel, 1..16 row by row; a 3x3 kernel, 'same' padding 1, two
    // filters: all ones (sums of the 3x3 neighbourhood) and a one at (ky, kx) = (0, 0) only
    // (the image shifted down and right by one, zeros coming in).
    let g = geometry(1, (4, 4, 1), (3, 3, 1));
    assert_eq!((g.oh(), g.ow(), g.patch(), g.pixels()), (4, 4, 9, 16));
    let inp: Vec<f64> = (1..=16).map(f64::from).collect();
    let mut weight = vec![0.0f64; 9 * 2];
    for kk in 0..9 {
        weight[kk * 2] = 1.0;
    }
    weight[1] = 1.0;
    let mut out = vec![0.0; 16 * 2];
    conv2d_forward(&mut out, &inp, &weight, &g, 2);
    let sums: Vec<f64> = out.iter().step_by(2).copied().collect();
    let shifted: Vec<f64> = out.iter().skip(1).step_by(2).copied().collect();
    #[rustfmt::skip]
    let expected_sums = [
        14.0, 24.0, 30.0, 22.0,
        33.0, 54.0, 63.0, 45.0,
        57.0, 90.0, 99.0, 69.0,
        46.0, 72.0, 78.0, 54.0,
    ];
    #[rustfmt::skip]
    let expected_shifted = [
        0.0, 0.0, 0.0, 0.0,
        0.0, 1.0, 2.0, 3.0,
        0.0, 5.0, 6.0, 7.0,
        0.0, 9.0, 10.0, 11.0,
    ];
    assert_eq!(sums, expected_sums);
    assert_eq!(shifted, expected_shifted);

    // With a gradient of one at every output of the all-ones filter (0 for the other), each
    // input's gradient is the number of windows that cover it: 4 at corners, 6 on edges, 9
    // inside; the weight gradient at (ky, kx) is the sum of the inputs that tap sees.
    let dout: Vec<f64> = (0..32).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect();
    let mut dinp = vec![-1.0; 16];
    conv2d_backward_input(&mut dinp, &dout, &weight, &g, 2);
    #[rustfmt::skip]
    let covers = [
        4.0, 6.0, 6.0, 4.0,
        6.0, 9.0, 9.0, 6.0,
        6.0, 9.0, 9.0, 6.0,
        4.0, 6.0, 6.0, 4.0,
    ];
    assert_eq!(dinp, covers);
    let mut dweight = vec![-1.0; 18];
    conv2d_backward_weight(&mut dweight, &inp, &dout, &g, 2);
    let taps: Vec<f64> = dweight.iter().step_by(2).copied().collect();
    // Tap (0, 0) sees rows 0..3 and columns 0..3 (54); the centre sees everything (136).
    assert_eq!(taps, [54.0, 78.0, 63.0, 96.0, 136.0, 108.0, 90.0, 126.0, 99.0]);
    assert!(dweight.iter().skip(1).step_by(2).all(|&d| d == 0.0));
}

#[test]
fn maxpool_first_maximum_wins_and_edges_drop() {
    // One 5x5 image of 1 channel, 2x2 windows: the last row and column are dropped.
    let p = PoolShape {
        images: 1,
        h: 5,
        w: 5,
        ch: 1,
        size: 2,
    };
    assert_eq!((p.oh(), p.ow(), p.in_len(), p.out_len()), (2, 2, 25, 4));
    #[rustfmt::skip]
    let inp = [
        3.0f64, 3.0, 1.0, 0.0, 9.0,
        1.0, 2.0, 4.0, 4.0, 9.0,
        0.0, -1.0, -2.0, -3.0, 9.0,
        -1.0, -5.0, -4.0, -2.0, 9.0,
        9.0, 9.0, 9.0, 9.0, 9.0,
    ];
    let mut out = [0.0; 4];
    maxpool_forward(&mut out, &inp, &p);
    assert_eq!(out, [3.0, 4.0, 0.0, -2.0]);
    let dout = [10.0, 20.0, 30.0, 40.0];
    let mut dinp = [-1.0; 25];
    maxpool_backward(&mut dinp, &dout, &inp, &p, false);
    // Ties go to the first in (ky, kx) order: (0, 0) over (0, 1), (1, 2) over (1, 3),
    // (2, 2) over (3, 3).
    let mut expected = [0.0; 25];
    for (i, d) in [(0, 10.0), (7, 20.0), (10, 30.0), (12, 40.0)] {
        expected[i] = d;
    }
    assert_eq!(dinp, expected);
    // Behind a ReLU, maxima that are not > 0 pass no gradient (0 and -2 here).
    maxpool_backward(&mut dinp, &dout, &inp, &p, true);
    expected[10] = 0.0;
    expected[12] = 0.0;
    assert_eq!(dinp, expected);
}

#[test]
fn maxpool_channels_and_images_are_separate() {
    // Two images of 3x3 with 2 channels, 3x3 windows: one window per image and channel.
    let p = PoolShape {
        images: 2,
        h: 3,
        w: 3,
        ch: 2,
        size: 3,
    };
    let inp: Vec<f32> = (0..36).map(|i| ((i * 7) % 36) as f32).collect();
    let mut out = [0.0f32; 4];
    maxpool_forward(&mut out, &inp, &p);
    for (k, &o) in out.iter().enumerate() {
        let (b, c) = (k / 2, k % 2);
        let window = (0..9).map(|j| inp[b * 18 + j * 2 + c]);
        assert_eq!(o, window.fold(f32::MIN, f32::max));
    }
}

/// An optimizer's f64 step from its hyper-parameters, with the scalars of step `step` (from 0)
/// computed here in f64 from their definitions (not through `Optimizer::scalars`).
fn f64_step(opt: &Optimizer, lr: f64, step: usize) -> OptimizerStep<f64> {
    let t = step as i32 + 1;
    let (b1, b2) = (opt.beta1 as f64, opt.beta2 as f64);
    let adam = matches!(opt.kind, OptimizerKind::Adam | OptimizerKind::AdamW);
    OptimizerStep {
        kind: opt.kind,
        lr,
        rho: opt.rho as f64,
        eps: opt.eps as f64,
        beta1: b1,
        beta2: b2,
        momentum: opt.momentum as f64,
        nesterov: opt.nesterov,
        l2: opt.l2() as f64,
        adam_step: if adam { lr / (1.0 - b1.powi(t)) } else { 0.0 },
        adam_norm: if adam { 1.0 / (1.0 - b2.powi(t)).sqrt() } else { 0.0 },
        decay: if opt.kind == OptimizerKind::AdamW {
            lr * opt.weight_decay as f64
        } else {
            0.0
        },
    }
}

/// `steps` f64 steps of one value from p0 with the constant gradient g: (p, v, m) at the end.
fn run_f64(opt: &Optimizer, p0: f64, g: f64, steps: usize) -> (f64, f64, f64) {
    let (mut p, mut v, mut m) = (p0, 0.0, 0.0);
    for step in 0..steps {
        optimizer_one(&mut p, &mut v, &mut m, g, &f64_step(opt, 0.01, step));
    }
    (p, v, m)
}

/// The f64 reference against each formula's closed form under a constant gradient.
#[test]
fn optimizer_formulas_have_their_closed_forms() {
    let new = |kind| Optimizer::new(kind, Some(0.01)).unwrap();
    let (lr, g, p0) = (0.01f64, 0.3f64, 1.5f64);
    let close = |what: &str, got: f64, want: f64| {
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{what}: {got} against {want}"
        );
    };
    for t in [1usize, 2, 7, 50] {
        // Adam: the bias-corrected moments of a constant gradient are g and g^2, so every step
        // moves p by lr g / (|g| + eps).
        let mut adam = new(OptimizerKind::Adam);
        (adam.beta1, adam.beta2) = (0.7, 0.9);
        let (p, v, m) = run_f64(&adam, p0, g, t);
        let (b1, b2) = (0.7f32 as f64, 0.9f32 as f64);
        close("adam m", m, (1.0 - b1.powi(t as i32)) * g);
        close("adam v", v, (1.0 - b2.powi(t as i32)) * g * g);
        close("adam p", p, p0 - t as f64 * lr * g / (g.abs() + 1e-8f32 as f64));
        // AdamW with no gradient: only the decoupled decay, (1 - lr wd)^t.
        let mut adamw = new(OptimizerKind::AdamW);
        adamw.weight_decay = 0.1;
        let wd = 0.1f32 as f64;
        close(
            "adamw decay",
            run_f64(&adamw, p0, 0.0, t).0,
            p0 * (1.0 - lr * wd).powi(t as i32),
        );
        // SGD with momentum mu: m_k = g (1 - mu^k) / (1 - mu); p moves by lr m_k each step, or
        // with Nesterov's by lr (g + mu m_k).
        let mut sgd = new(OptimizerKind::Sgd);
        sgd.momentum = 0.9;
        let mu = 0.9f32 as f64;
        let m_k = |k: usize| g * (1.0 - mu.powi(k as i32)) / (1.0 - mu);
        let (p, _, m) = run_f64(&sgd, p0, g, t);
        close("momentum m", m, m_k(t));
        close("momentum p", p, p0 - lr * (1..=t).map(m_k).sum::<f64>());
        sgd.nesterov = true;
        let p = run_f64(&sgd, p0, g, t).0;
        close("nesterov p", p, p0 - lr * (1..=t).map(|k| g + mu * m_k(k)).sum::<f64>());
        // L2 on plain SGD with no gradient: p (1 - lr wd)^t.
        let mut l2 = new(OptimizerKind::Sgd);
        l2.weight_decay = 0.1;
        close(
            "sgd l2",
            run_f64(&l2, p0, 0.0, t).0,
            p0 * (1.0 - lr * wd).powi(t as i32),
        );
    }
    // The f32 path takes the same steps: Adam's first step from Optimizer::scalars.
    let mut adam = new(OptimizerKind::Adam);
    (adam.beta1, adam.beta2) = (0.7, 0.9);
    let (mut p, mut v, mut m) = (1.5f32, 0.0f32, 0.0f32);
    optimizer_one(&mut p, &mut v, &mut m, 0.3, &OptimizerStep::new(&adam, adam.scalars(0)));
    assert!((p as f64 - (1.5 - 0.01 * 0.3 / (0.3 + 1e-8))).abs() < 1e-6, "{p}");
}
