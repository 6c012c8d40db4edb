//! Finite-difference check, in f64, of the analytic gradients of the CPU reference: a 7-5-3
//! network (Dense, ReLU, Dense, fused softmax cross-entropy) on a batch of 4, every parameter
//! tensor, central differences with h = 1e-6, relative error below 1e-6.

use gpu_mnist::backend::reference as r;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: usize = 4;
const C: usize = 7;
const H: usize = 5;
const V: usize = 3;

struct Net {
    w1: Vec<f64>, // (C, H)
    b1: Vec<f64>, // (H)
    w2: Vec<f64>, // (H, V)
    b2: Vec<f64>, // (V)
}

/// Mean loss over the batch, and (when asked) the gradients of every parameter, by composing the
/// reference ops in the order the layer graph runs them.
fn loss_and_grads(net: &Net, x: &[f64], labels: &[u8]) -> (f64, [Vec<f64>; 4]) {
    let mut h = vec![0.0; B * H];
    r::matmul_forward(&mut h, x, &net.w1, B, C, H);
    r::bias_add_forward(&mut h, &net.b1, B, H);
    let mut a = vec![0.0; B * H];
    r::relu_forward(&mut a, &h);
    let mut logits = vec![0.0; B * V];
    r::matmul_forward(&mut logits, &a, &net.w2, B, H, V);
    r::bias_add_forward(&mut logits, &net.b2, B, V);
    let (mut probs, mut losses) = (vec![0.0; B * V], vec![0.0; B]);
    r::softmax_xent_forward(&mut probs, &mut losses, &logits, labels, B, V);
    let loss = losses.iter().sum::<f64>() / B as f64;

    let mut dlogits = vec![0.0; B * V];
    r::softmax_xent_backward(&mut dlogits, &probs, labels, B, V);
    let (mut dw2, mut db2, mut da) = (vec![0.0; H * V], vec![0.0; V], vec![0.0; B * H]);
    r::matmul_backward_weight(&mut dw2, &a, &dlogits, B, H, V);
    r::bias_backward(&mut db2, &dlogits, B, V);
    r::matmul_backward_input(&mut da, &dlogits, &net.w2, B, H, V);
    let mut dh = vec![0.0; B * H];
    r::relu_backward(&mut dh, &da, &a);
    let (mut dw1, mut db1) = (vec![0.0; C * H], vec![0.0; H]);
    r::matmul_backward_weight(&mut dw1, x, &dh, B, C, H);
    r::bias_backward(&mut db1, &dh, B, H);
    (loss, [dw1, db1, dw2, db2])
}

fn param_mut(net: &mut Net, i: usize) -> &mut Vec<f64> {
    match i {
        0 => &mut net.w1,
        1 => &mut net.b1,
        2 => &mut net.w2,
        _ => &mut net.b2,
    }
}

#[test]
fn analytic_gradients_match_central_differences_in_f64() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut uniform = |n: usize, s: f64| -> Vec<f64> { (0..n).map(|_| rng.random_range(-s..s)).collect() };
    let mut net = Net {
        w1: uniform(C * H, 1.0),
        b1: uniform(H, 0.5),
        w2: uniform(H * V, 1.0),
        b2: uniform(V, 0.5),
    };
    let x = uniform(B * C, 1.0);
    let labels = [0u8, 2, 1, 2];
    let (_, analytic) = loss_and_grads(&net, &x, &labels);
    let names = ["dw1", "db1", "dw2", "db2"];
    let h = 1e-6;
    let mut worst = 0.0f64;
    for (p, name) in names.iter().enumerate() {
        for (i, &a) in analytic[p].iter().enumerate() {
            let saved = param_mut(&mut net, p)[i];
            param_mut(&mut net, p)[i] = saved + h;
            let (up, _) = loss_and_grads(&net, &x, &labels);
            param_mut(&mut net, p)[i] = saved - h;
            let (down, _) = loss_and_grads(&net, &x, &labels);
            param_mut(&mut net, p)[i] = saved;
            let numeric = (up - down) / (2.0 * h);
            // Relative error, guarded for gradients that are (near) zero, such as dead ReLUs.
            let rel = (a - numeric).abs() / a.abs().max(numeric.abs()).max(1e-8);
            worst = worst.max(rel);
            assert!(
                rel < 1e-6,
                "{name}[{i}]: analytic {a:e}, numeric {numeric:e}, relative error {rel:e}"
            );
        }
    }
    println!("gradient check 7-5-3: worst relative error {worst:e} (limit 1e-6)");
    // The check must see live units: a network whose ReLUs were all dead would pass trivially.
    assert!(
        analytic[0].iter().filter(|g| g.abs() > 1e-6).count() > C * H / 4,
        "too few non-zero dw1 entries"
    );
}

// The book's convnet in miniature: 2 images of 7x6x2 -> Conv2D 3x3 'same' (pad 1) to 3 channels,
// bias and ReLU -> MaxPool 2 (7x6 -> 3x3, the last row dropped) -> Flatten (27) -> Dense 4 ->
// softmax cross-entropy. Checked: the conv's kernel and bias, the dense layer's, and the gradient
// of the input images (through the conv, the pool's routing and the ReLU).

use gpu_mnist::backend::ops::{ConvGeometry, PoolShape};

const CONV: ConvGeometry = ConvGeometry {
    images: 2,
    h: 7,
    w: 6,
    in_ch: 2,
    kh: 3,
    kw: 3,
    pad: 1,
};
const FILTERS: usize = 3;
const POOL: PoolShape = PoolShape {
    images: 2,
    h: 7,
    w: 6,
    ch: FILTERS,
    size: 2,
};
const CLASSES: usize = 4;

/// The convnet's parameters and its input, all perturbed by the check.
struct ConvNet {
    wc: Vec<f64>, // (3, 3, in_ch, FILTERS)
    bc: Vec<f64>, // (FILTERS)
    wd: Vec<f64>, // (27, CLASSES)
    bd: Vec<f64>, // (CLASSES)
    x: Vec<f64>,  // (images, h, w, in_ch)
}

impl ConvNet {
    fn tensor_mut(&mut self, i: usize) -> &mut Vec<f64> {
        match i {
            0 => &mut self.wc,
            1 => &mut self.bc,
            2 => &mut self.wd,
            3 => &mut self.bd,
            _ => &mut self.x,
        }
    }
}

/// Mean loss, and the gradients of wc, bc, wd, bd and x, composing the reference ops as the
/// layer graph runs them (the conv's bias and ReLU as a matmul epilogue over its pixel rows, the
/// ReLU's backward folded into the pool's).
fn conv_loss_and_grads(net: &ConvNet, labels: &[u8]) -> (f64, [Vec<f64>; 5]) {
    let (g, p) = (CONV, POOL);
    let (images, pixels, flat) = (g.images, g.pixels(), p.out_len() / g.images);
    let mut a = vec![0.0; pixels * FILTERS];
    r::conv2d_forward(&mut a, &net.x, &net.wc, &g, FILTERS);
    r::matmul_epilogue(&mut a, Some(&net.bc), true, None, pixels, FILTERS);
    let mut pooled = vec![0.0; p.out_len()];
    r::maxpool_forward(&mut pooled, &a, &p);
    let mut logits = vec![0.0; images * CLASSES];
    r::matmul_forward(&mut logits, &pooled, &net.wd, images, flat, CLASSES);
    r::bias_add_forward(&mut logits, &net.bd, images, CLASSES);
    let (mut probs, mut losses) = (vec![0.0; images * CLASSES], vec![0.0; images]);
    r::softmax_xent_forward(&mut probs, &mut losses, &logits, labels, images, CLASSES);
    let loss = losses.iter().sum::<f64>() / images as f64;

    let mut dlogits = vec![0.0; images * CLASSES];
    r::softmax_xent_backward(&mut dlogits, &probs, labels, images, CLASSES);
    let (mut dwd, mut dbd) = (vec![0.0; flat * CLASSES], vec![0.0; CLASSES]);
    r::matmul_backward_weight(&mut dwd, &pooled, &dlogits, images, flat, CLASSES);
    r::bias_backward(&mut dbd, &dlogits, images, CLASSES);
    let mut dpooled = vec![0.0; p.out_len()];
    r::matmul_backward_input(&mut dpooled, &dlogits, &net.wd, images, flat, CLASSES);
    let mut da = vec![0.0; p.in_len()];
    r::maxpool_backward(&mut da, &dpooled, &a, &p, true);
    let (mut dwc, mut dbc) = (vec![0.0; g.patch() * FILTERS], vec![0.0; FILTERS]);
    r::conv2d_backward_weight(&mut dwc, &net.x, &da, &g, FILTERS);
    r::bias_backward(&mut dbc, &da, pixels, FILTERS);
    let mut dx = vec![0.0; g.image_len()];
    r::conv2d_backward_input(&mut dx, &da, &net.wc, &g, FILTERS);
    (loss, [dwc, dbc, dwd, dbd, dx])
}

/// The distances of the convnet's loss from its kinks at `net`: the smallest |pre-activation| of
/// the conv (a ReLU's kink), and the smallest gap between a pool window's positive maximum and its
/// runner-up (where the pool's routing would switch).
fn conv_kink_margins(net: &ConvNet) -> (f64, f64) {
    let (g, p) = (CONV, POOL);
    let mut z = vec![0.0; g.pixels() * FILTERS];
    r::conv2d_forward(&mut z, &net.x, &net.wc, &g, FILTERS);
    r::bias_add_forward(&mut z, &net.bc, g.pixels(), FILTERS);
    let relu_margin = z.iter().fold(f64::INFINITY, |m, v| m.min(v.abs()));
    let mut pool_margin = f64::INFINITY;
    for b in 0..p.images {
        for (oy, ox) in (0..p.oh()).flat_map(|oy| (0..p.ow()).map(move |ox| (oy, ox))) {
            for c in 0..p.ch {
                let at = |ky: usize, kx: usize| z[((b * p.h + oy * 2 + ky) * p.w + ox * 2 + kx) * p.ch + c].max(0.0);
                let mut window = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
                window.sort_by(|a, b| b.total_cmp(a));
                if window[0] > 0.0 {
                    pool_margin = pool_margin.min(window[0] - window[1]);
                }
            }
        }
    }
    (relu_margin, pool_margin)
}

#[test]
fn convnet_gradients_match_central_differences_in_f64() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut uniform = |n: usize, s: f64| -> Vec<f64> { (0..n).map(|_| rng.random_range(-s..s)).collect() };
    let flat = POOL.out_len() / CONV.images;
    assert_eq!((flat, CONV.pixels(), CONV.patch()), (27, 84, 18));
    let mut net = ConvNet {
        wc: uniform(CONV.patch() * FILTERS, 0.5),
        bc: uniform(FILTERS, 0.2),
        wd: uniform(flat * CLASSES, 1.0),
        bd: uniform(CLASSES, 0.5),
        x: uniform(CONV.image_len(), 1.0),
    };
    let labels = [1u8, 3];
    let (_, analytic) = conv_loss_and_grads(&net, &labels);
    // Many of this net's gradients are small (1e-5 and less), and a loss evaluated in f64 carries a
    // few ulps of rounding, which a central difference turns into about 1e-16 / h of noise: h is
    // 1e-5 here (1e-6 left up to 5e-11), and gradients below 1e-4 are held to 1e-10 absolute
    // rather than to 1e-6 relative.
    let h = 1e-5;
    let floor = 1e-4;
    // Every value is in [-1, 1] and every weight in [-0.5, 0.5], so a step of h moves any
    // pre-activation by at most h: the differences stay on one side of every ReLU and pool tie.
    let (relu_margin, pool_margin) = conv_kink_margins(&net);
    assert!(
        relu_margin > 10.0 * h && pool_margin > 10.0 * h,
        "kinks within reach: {relu_margin:e}, {pool_margin:e}"
    );
    let names = ["dwc", "dbc", "dwd", "dbd", "dx"];
    let mut worst = 0.0f64;
    for (t, name) in names.iter().enumerate() {
        for (i, &a) in analytic[t].iter().enumerate() {
            let saved = net.tensor_mut(t)[i];
            net.tensor_mut(t)[i] = saved + h;
            let (up, _) = conv_loss_and_grads(&net, &labels);
            net.tensor_mut(t)[i] = saved - h;
            let (down, _) = conv_loss_and_grads(&net, &labels);
            net.tensor_mut(t)[i] = saved;
            let numeric = (up - down) / (2.0 * h);
            let rel = (a - numeric).abs() / a.abs().max(numeric.abs()).max(floor);
            worst = worst.max(rel);
            assert!(
                rel < 1e-6,
                "{name}[{i}]: analytic {a:e}, numeric {numeric:e}, relative error {rel:e}"
            );
        }
    }
    println!(
        "gradient check convnet: worst relative error {worst:e} (limit 1e-6); kink margins: ReLU \
         {relu_margin:e}, pool {pool_margin:e} (step {h:e})"
    );
    // Live units: the pool must route gradient to many pixels, and most of the kernel must learn.
    let live = |g: &[f64]| g.iter().filter(|g| g.abs() > 1e-6).count();
    assert!(
        live(&analytic[0]) > CONV.patch() * FILTERS / 2,
        "too few non-zero dwc entries"
    );
    assert!(live(&analytic[4]) > CONV.image_len() / 2, "too few non-zero dx entries");
}
