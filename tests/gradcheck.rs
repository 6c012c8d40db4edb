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
