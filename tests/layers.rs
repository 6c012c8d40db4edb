//! Batch normalisation, dropout and the lone optimizer step on the GPU (llvmpipe in CI) and the
//! fast CPU path against the reference loops, at awkward shapes (one row, one channel, odd and
//! prime counts, a convolution's real output); batch normalisation's gradients against central
//! differences in f64.
//!
//! Tolerances: dropout is exact (the same mask, one f32 product); batch normalisation's
//! statistics are sums, which the reference takes in f64 and the GPU in an f32 tree, so its
//! outputs are judged with atol 1e-4 + rtol 1e-4 (values of order 1), its parameter gradients
//! (sums over the rows) relative to the sum of the magnitudes summed; the lone optimizer step
//! with the optimizer tests' rtol 1e-5.

mod common;

use common::*;
use gpu_mnist::backend::ops::{
    dropout, BatchNorm, BatchNormKind, Dropout, DropoutKind, NormParams, Op, StepAt, Update, BATCH_NORM_EPSILON,
    BATCH_NORM_MOMENTUM,
};
use gpu_mnist::backend::reference as r;
use gpu_mnist::backend::{Backend, ParamTensors, TensorId};
use gpu_mnist::optim::{Optimizer, OptimizerKind};

/// (rows, channels): one row, one channel, odd and prime counts, more rows than a workgroup's
/// 256, and the first convolution of the book's convnet at batch 8 (26 x 26 pixels, 32 filters).
const NORM_SHAPES: [(usize, usize); 6] = [(1, 1), (1, 7), (3, 5), (37, 13), (1031, 3), (8 * 26 * 26, 32)];

/// What batch normalisation writes, read back: the forward output, stats, moving mean and
/// variance; the input gradient, dgamma and dbeta.
struct NormResults {
    out: Vec<f32>,
    stats: Vec<f32>,
    moving: Vec<f32>,
    eval: Vec<f32>,
    dx: Vec<f32>,
    dparams: Vec<f32>,
}

/// Run a training forward pass, an evaluation forward pass (with the moved averages) and the
/// backward pass on `be`.
fn run_norm(be: &mut dyn Backend, x: &[f32], dy: &[f32], params: &[f32], (rows, c): (usize, usize)) -> NormResults {
    let n = rows * c;
    let values = be.alloc_packed(&[5, c, c, c, c]).unwrap();
    let grads = be.alloc_packed(&[3, c, c]).unwrap();
    be.write(values.parts[0], &[0.25f32; 5]).unwrap();
    for k in 0..4 {
        be.write(values.parts[k + 1], &params[k * c..(k + 1) * c]).unwrap();
    }
    let p = NormParams {
        gamma: values.parts[1],
        beta: values.parts[2],
        moving_mean: values.parts[3],
        moving_variance: values.parts[4],
    };
    let (xt, dyt) = (upload(be, x), upload(be, dy));
    let (out, eval, dx, stats) = (
        be.alloc(n).unwrap(),
        be.alloc(n).unwrap(),
        be.alloc(n).unwrap(),
        be.alloc(2 * c).unwrap(),
    );
    let at = StepAt::default();
    let op = |kind| {
        Op::BatchNorm(BatchNorm {
            rows,
            channels: c,
            kind,
        })
    };
    be.run(
        &op(BatchNormKind::ForwardTrain {
            out,
            inp: xt,
            params: p,
            stats,
            relu: true,
        }),
        at,
    )
    .unwrap();
    be.run(
        &op(BatchNormKind::ForwardEval {
            out: eval,
            inp: xt,
            params: p,
            relu: false,
        }),
        at,
    )
    .unwrap();
    be.run(
        &op(BatchNormKind::Backward {
            dinp: Some(dx),
            dout: dyt,
            inp: xt,
            gamma: p.gamma,
            stats,
            dgamma: grads.parts[1],
            dbeta: grads.parts[2],
        }),
        at,
    )
    .unwrap();
    let neighbour = download(be, values.parts[0], 5);
    assert_eq!(
        neighbour,
        [0.25; 5],
        "{}: a neighbour in the packed values changed",
        be.name()
    );
    let mut read = |t| download(be, t, c);
    let moving = [read(values.parts[3]), read(values.parts[4])].concat();
    let dparams = [read(grads.parts[1]), read(grads.parts[2])].concat();
    NormResults {
        out: download(be, out, n),
        stats: download(be, stats, 2 * c),
        moving,
        eval: download(be, eval, n),
        dx: download(be, dx, n),
        dparams,
    }
}

/// The same, by the reference functions on the host.
fn want_norm(x: &[f32], dy: &[f32], params: &[f32], (rows, c): (usize, usize)) -> NormResults {
    let n = rows * c;
    let (gamma, beta) = (&params[..c], &params[c..2 * c]);
    let (mut mean, mut var, mut invstd) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
    r::batchnorm_stats(&mut mean, &mut var, x, rows, c);
    r::batchnorm_invstd(&mut invstd, &var, BATCH_NORM_EPSILON);
    let mut out = vec![0.0; n];
    r::batchnorm_forward(&mut out, x, (gamma, beta), (&mean, &invstd), rows, true);
    let (mut mm, mut mv) = (params[2 * c..3 * c].to_vec(), params[3 * c..].to_vec());
    r::batchnorm_moving(&mut mm, &mean, BATCH_NORM_MOMENTUM);
    r::batchnorm_moving(&mut mv, &var, BATCH_NORM_MOMENTUM);
    let mut eval_invstd = vec![0.0; c];
    r::batchnorm_invstd(&mut eval_invstd, &mv, BATCH_NORM_EPSILON);
    let mut eval = vec![0.0; n];
    r::batchnorm_forward(&mut eval, x, (gamma, beta), (&mm, &eval_invstd), rows, false);
    let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
    r::batchnorm_backward_params((&mut dg, &mut db), dy, x, (&mean, &invstd), rows);
    let channels = r::batchnorm_channels(gamma, (&mean, &invstd), (&dg, &db), rows);
    let mut dx = vec![0.0; n];
    r::batchnorm_backward_input(&mut dx, dy, x, &channels, rows);
    NormResults {
        out,
        stats: [mean, invstd].concat(),
        moving: [mm, mv].concat(),
        eval,
        dx,
        dparams: [dg, db].concat(),
    }
}

#[test]
fn batch_norm_matches_the_reference_on_every_device() {
    let mut devices = devices_under_test();
    devices.push(Box::new(gpu_mnist::backend::cpu::CpuBackend::reference()));
    for (rows, c) in NORM_SHAPES {
        let mut g = rng((rows * 31 + c) as u64);
        // Inputs off centre (a mean of 0.7), as a ReLU layer's outputs are.
        let x: Vec<f32> = random_vec(&mut g, rows * c, 1.0).iter().map(|v| v + 0.7).collect();
        let dy = random_vec(&mut g, rows * c, 1e-2);
        let mut params = random_vec(&mut g, 4 * c, 0.5);
        for v in &mut params[..c] {
            *v += 1.0; // gamma near 1
        }
        for v in &mut params[3 * c..] {
            *v = v.abs() + 0.5; // a positive moving variance
        }
        let want = want_norm(&x, &dy, &params, (rows, c));
        // The parameter gradients are sums over the rows: judged against the size of the terms.
        let dscale: Vec<f32> = (0..2 * c)
            .map(|k| (0..rows).map(|row| dy[row * c + k % c].abs()).sum::<f32>() * 4.0)
            .collect();
        for be in devices.iter_mut() {
            let be = be.as_mut();
            let what = format!("{} batch norm {rows}x{c}", be.name());
            let got = run_norm(be, &x, &dy, &params, (rows, c));
            assert_close(&format!("{what} stats"), &got.stats, &want.stats, 1e-5, 1e-4);
            assert_close(
                &format!("{what} moving averages"),
                &got.moving,
                &want.moving,
                1e-6,
                1e-5,
            );
            assert_close(&format!("{what} forward"), &got.out, &want.out, 1e-4, 1e-4);
            assert_close(&format!("{what} forward (moving)"), &got.eval, &want.eval, 1e-5, 1e-5);
            assert_close_scaled(
                &format!("{what} dgamma, dbeta"),
                &got.dparams,
                &want.dparams,
                &dscale,
                1e-6,
                1e-4,
            );
            assert_close(&format!("{what} dx"), &got.dx, &want.dx, 1e-4, 1e-3);
        }
    }
}

/// sum of w * batchnorm(x) in f64, and its analytic gradients with respect to x, gamma and beta.
fn norm_loss(x: &[f64], gamma: &[f64], beta: &[f64], w: &[f64], rows: usize) -> (f64, [Vec<f64>; 3]) {
    let c = gamma.len();
    let (mut mean, mut var, mut invstd) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
    r::batchnorm_stats(&mut mean, &mut var, x, rows, c);
    r::batchnorm_invstd(&mut invstd, &var, BATCH_NORM_EPSILON as f64);
    let mut y = vec![0.0; rows * c];
    r::batchnorm_forward(&mut y, x, (gamma, beta), (&mean, &invstd), rows, false);
    let loss = y.iter().zip(w).map(|(a, b)| a * b).sum();
    let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
    r::batchnorm_backward_params((&mut dg, &mut db), w, x, (&mean, &invstd), rows);
    let channels = r::batchnorm_channels(gamma, (&mean, &invstd), (&dg, &db), rows);
    let mut dx = vec![0.0; rows * c];
    r::batchnorm_backward_input(&mut dx, w, x, &channels, rows);
    (loss, [dx, dg, db])
}

/// The f64 reference's gradients of batch normalisation against central differences (h 1e-6):
/// relative error below 1e-6 for every input, scale and offset value.
#[test]
fn batch_norm_gradients_match_central_differences_in_f64() {
    let (rows, c) = (6, 3);
    let mut g = rng(5);
    let f = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let x = f(random_vec(&mut g, rows * c, 1.0));
    let gamma: Vec<f64> = f(random_vec(&mut g, c, 0.5)).iter().map(|v| v + 1.0).collect();
    let beta = f(random_vec(&mut g, c, 0.5));
    let w = f(random_vec(&mut g, rows * c, 1.0));
    let (_, analytic) = norm_loss(&x, &gamma, &beta, &w, rows);
    let h = 1e-6;
    let mut worst = 0.0f64;
    for (which, name) in ["x", "gamma", "beta"].iter().enumerate() {
        let base = [&x, &gamma, &beta][which].clone();
        for i in 0..base.len() {
            let at = |delta: f64| {
                let mut v = [x.clone(), gamma.clone(), beta.clone()];
                v[which][i] = base[i] + delta;
                norm_loss(&v[0], &v[1], &v[2], &w, rows).0
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let exact = analytic[which][i];
            let err = (numeric - exact).abs() / numeric.abs().max(exact.abs()).max(1e-3);
            worst = worst.max(err);
            assert!(
                err < 1e-6,
                "d{name}[{i}]: analytic {exact}, numeric {numeric} (relative error {err:e})"
            );
        }
    }
    println!("batch norm gradient check: largest relative error {worst:e} (limit 1e-6)");
}

/// Run dropout forward (training and evaluation) and backward on `be` at `at`.
fn run_dropout(be: &mut dyn Backend, x: &[f32], mask: &[f32], rate: f32, key: u32, at: StepAt) -> [Vec<f32>; 3] {
    let n = x.len();
    let (xt, mt) = (upload(be, x), upload(be, mask));
    let (out, eval, dx) = (be.alloc(n).unwrap(), be.alloc(n).unwrap(), be.alloc(n).unwrap());
    let op = |kind| {
        Op::Dropout(Dropout {
            len: n,
            rate,
            key,
            kind,
        })
    };
    for kind in [
        DropoutKind::Forward {
            out,
            inp: xt,
            train: true,
        },
        DropoutKind::Forward {
            out: eval,
            inp: xt,
            train: false,
        },
        DropoutKind::Backward {
            dinp: dx,
            dout: xt,
            relu_mask: Some(mt),
        },
    ] {
        be.run(&op(kind), at).unwrap();
    }
    [download(be, out, n), download(be, eval, n), download(be, dx, n)]
}

/// The same mask on every device, bit for bit, at a step past 2^32 / 2 and a slot other than 0
/// (the GPU's step base plus slot); evaluation passes the input through; another step drops
/// other values; about `rate` of the values are dropped.
#[test]
fn dropout_drops_the_same_values_on_every_device() {
    let mut devices = devices_under_test();
    for (n, rate) in [(1usize, 0.5f32), (7, 0.1), (1000, 0.25), (100_003, 0.5)] {
        let mut g = rng(n as u64);
        let x = random_vec(&mut g, n, 1.0);
        let mask = random_vec(&mut g, n, 1.0);
        let key = dropout::layer_key(42, 3);
        let at = StepAt {
            start: 0,
            slot: 5,
            step: 3_000_000_005,
        };
        let mut reference = gpu_mnist::backend::cpu::CpuBackend::reference();
        let want = run_dropout(&mut reference, &x, &mask, rate, key, at);
        assert_eq!(want[1], x, "evaluation changed the values");
        let kept = want[0].iter().filter(|v| **v != 0.0).count();
        if n > 1000 {
            let share = 1.0 - kept as f64 / n as f64;
            println!("n {n}: dropped {share:.4} of the values at rate {rate}");
            assert!((share - rate as f64).abs() < 0.01, "dropped {share}, rate {rate}");
            let other = run_dropout(
                &mut reference,
                &x,
                &mask,
                rate,
                key,
                StepAt {
                    step: at.step + 1,
                    ..at
                },
            );
            assert_ne!(other[0], want[0], "the next step drops the same values");
        }
        let scale = dropout::scale(rate);
        for (i, (&o, &v)) in want[0].iter().zip(&x).enumerate() {
            assert!(
                o == 0.0 || o == v * scale,
                "value {i}: {o} is neither 0 nor {v} x {scale}"
            );
        }
        for be in devices.iter_mut() {
            let got = run_dropout(be.as_mut(), &x, &mask, rate, key, at);
            for (part, (g, w)) in ["forward", "evaluation", "backward"].iter().zip(got.iter().zip(&want)) {
                let differ = g.iter().zip(w).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                println!(
                    "{} dropout {part} n {n}: {differ} values differ from the reference",
                    be.name()
                );
                assert_eq!(differ, 0, "{} dropout {part} n {n}", be.name());
            }
        }
    }
}

/// A lone optimizer step (`Op::Update`, batch normalisation's scale and offset) on every
/// device against the reference's `optimizer_update`: one step and twenty, RMSprop, SGD with
/// Nesterov momentum and AdamW with a one-cycle schedule, parameters and moments rtol 1e-5; the
/// packed neighbours untouched.
#[test]
fn a_lone_optimizer_step_matches_the_reference_on_every_device() {
    let mut adamw = Optimizer::new(OptimizerKind::AdamW, Some(0.01)).unwrap();
    adamw.weight_decay = 0.01;
    adamw.schedule = gpu_mnist::schedule::Schedule::parse("one-cycle", 40).unwrap();
    let mut nesterov = Optimizer::new(OptimizerKind::Sgd, Some(0.05)).unwrap();
    (nesterov.momentum, nesterov.nesterov) = (0.9, true);
    let rmsprop = Optimizer::new(OptimizerKind::RmsProp, Some(1e-3)).unwrap();
    let mut devices = devices_under_test();
    for n in [1usize, 7, 1001] {
        for opt in [rmsprop, nesterov, adamw] {
            for steps in [1usize, 20] {
                let mut g = rng(n as u64 + steps as u64);
                let init: Vec<Vec<f32>> = vec![
                    random_vec(&mut g, n, 1.0),
                    random_vec(&mut g, n, 1e-2),
                    abs(&random_vec(&mut g, n, 1e-4)),
                    random_vec(&mut g, n, 1e-3),
                ];
                let (mut p, mut v, mut m) = (init[0].clone(), init[2].clone(), init[3].clone());
                for step in 0..steps {
                    let k = r::OptimizerStep::<f32>::new(&opt, opt.scalars(step + 3));
                    r::optimizer_update(&mut p, &mut v, &mut m, &init[1], &k);
                }
                for be in devices.iter_mut() {
                    let be = be.as_mut();
                    let what = format!("{} lone {:?} n {n}, {steps} steps", be.name(), opt.kind);
                    let parts: Vec<_> = init.iter().map(|t| packed_with_neighbour(be, t)).collect();
                    let param = ParamTensors {
                        value: parts[0].1,
                        grad: parts[1].1,
                        velocity: parts[2].1,
                        momentum: parts[3].1,
                    };
                    for step in 0..steps {
                        let at = StepAt {
                            start: 0,
                            slot: step % 7,
                            step: step + 3,
                        };
                        be.run(&Op::Update(Update { param, len: n, opt }), at).unwrap();
                    }
                    let read = |be: &mut dyn Backend, (neighbour, part): (TensorId, TensorId)| {
                        assert_eq!(download(be, neighbour, 3), [0.5; 3], "{what}: a neighbour changed");
                        download(be, part, n)
                    };
                    assert_close(&format!("{what} param"), &read(be, parts[0]), &p, 1e-7, 1e-5);
                    assert_close(&format!("{what} velocity"), &read(be, parts[2]), &v, 1e-12, 1e-5);
                    assert_close(&format!("{what} momentum"), &read(be, parts[3]), &m, 1e-9, 1e-5);
                }
            }
        }
    }
}

/// `data` in a packed allocation after a neighbour of three values of 0.5: (neighbour, part).
fn packed_with_neighbour(be: &mut dyn Backend, data: &[f32]) -> (TensorId, TensorId) {
    let packed = be.alloc_packed(&[3, data.len()]).unwrap();
    be.write(packed.parts[0], &[0.5; 3]).unwrap();
    be.write(packed.parts[1], data).unwrap();
    (packed.parts[0], packed.parts[1])
}

/// A model with batch normalisation after a convolution and a dense layer and dropout after a
/// pool and before a dense layer: `steps` Adam steps through the layer graph, returning the last
/// step's statistics, gradients and parameters (the moving averages among them) and an
/// evaluation's statistics with the moving averages.
fn train_layers(be: &mut dyn Backend, batch: usize, steps: usize) -> (Vec<f32>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    use gpu_mnist::backend::read_stats;
    use gpu_mnist::data::{batches, epoch_order};
    use gpu_mnist::model::{glorot_init, Batch, Graph, ModelSpec};
    let spec = ModelSpec::parse(
        "--layers",
        "conv:5:3,batchnorm,pool:2,dropout:0.25,conv:7:3,batchnorm,flatten,dropout:0.5,dense:11,batchnorm,dense:10",
    )
    .unwrap();
    let data = mnist().train.first(batch * steps);
    let mut graph = Graph::new(be, &spec, batch).unwrap();
    graph.set_seed(7);
    graph.set_params(be, &glorot_init(&spec, 1)).unwrap();
    let ds = be.upload_dataset(&data).unwrap();
    be.set_order(ds, &epoch_order(data.len(), 1, 0)).unwrap();
    be.reserve_stats(steps + 1).unwrap();
    let mut opt = Optimizer::new(OptimizerKind::Adam, Some(0.01)).unwrap();
    opt.schedule = gpu_mnist::schedule::Schedule::parse("one-cycle", steps).unwrap();
    for (slot, (start, rows)) in batches(data.len(), batch).take(steps).enumerate() {
        let at = StepAt {
            start,
            slot,
            step: slot + 100,
        };
        graph.train_step(be, Batch { ds, rows }, at, &opt).unwrap();
    }
    let at = StepAt {
        start: 0,
        slot: steps,
        step: 0,
    };
    graph.eval_step(be, Batch { ds, rows: batch }, at).unwrap();
    let stats = pollster::block_on(read_stats(be, steps + 1)).unwrap();
    let last = [stats[steps - 1], stats[steps]];
    let host = |t: Vec<gpu_mnist::model::HostTensor>| t.into_iter().map(|t| t.data).collect::<Vec<_>>();
    (
        last.iter().flat_map(|s| [s.loss_sum, s.correct as f32]).collect(),
        host(pollster::block_on(graph.grads_to_host(be)).unwrap()),
        host(pollster::block_on(graph.params_to_host(be)).unwrap()),
    )
}

/// Whole training steps of a model with batch normalisation and dropout on the fast CPU path
/// and the GPU against the reference, at batch 1 and batch 5: the last step's and an
/// evaluation's loss (rtol 1e-3) and correct counts, every gradient and parameter (the moving
/// averages among them) within atol 1e-5 + rtol 1e-3 of the tensor's largest value (see below).
#[test]
fn training_steps_with_batch_norm_and_dropout_match_the_reference() {
    let mut devices = devices_under_test();
    for (batch, steps) in [(1usize, 3usize), (5, 4)] {
        let want = train_layers(&mut gpu_mnist::backend::cpu::CpuBackend::reference(), batch, steps);
        for be in devices.iter_mut() {
            let be = be.as_mut();
            let what = format!("{} batch {batch}", be.name());
            let got = train_layers(be, batch, steps);
            assert_close(
                &format!("{what}: losses and correct counts"),
                &got.0,
                &want.0,
                1e-5,
                1e-3,
            );
            for (kind, (g, w)) in [("gradient", (&got.1, &want.1)), ("parameter", (&got.2, &want.2))] {
                let largest = |t: &Vec<f32>| t.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (k, (g, w_k)) in g.iter().zip(w.iter()).enumerate() {
                    // A bias before batch normalisation has a gradient of 0 in exact arithmetic
                    // (the normalisation takes its mean away): what is left is rounding, so each
                    // tensor is judged against the largest value of itself and of the tensor
                    // before it (a bias against its kernel's gradient).
                    let before = if k > 0 { largest(&w[k - 1]) } else { 0.0 };
                    let scale = vec![largest(w_k).max(before); w_k.len()];
                    let w = w_k;
                    assert_close_scaled(&format!("{what}: {kind} {k}"), g, w, &scale, 1e-5, 1e-3);
                }
            }
        }
    }
}

/// The augmented gather on every device against the reference's `gather_augmented` (the CPU
/// paths exactly, the GPU within atol 1e-5: the same f32 operations, but a GPU may fuse a
/// multiply-add), at a slot other than 0 and a step
/// past 2^31; it moves the pictures, and without movement it is the plain gather exactly.
#[test]
fn the_augmented_batch_is_the_same_on_every_device() {
    use gpu_mnist::backend::ops::{augment, Augment, Gather};
    let data = mnist().train.first(40);
    let (start, rows) = (3usize, 29usize);
    let order: Vec<u32> = (0..40u32).rev().collect();
    let aug = Augment {
        key: augment::key_of(11),
        ..Augment::parse("shift:2.5,rotate:15,scale:0.15").unwrap()
    };
    let at = StepAt {
        start,
        slot: 6,
        step: 2_200_000_006,
    };
    let mut want = vec![0.0f32; rows * 784];
    r::gather_augmented(&mut want, &data.images, &order, (start, rows), &aug, at.step as u32);
    // The largest movement --augment takes: most samples fall outside the picture.
    let far = Augment {
        key: aug.key,
        ..Augment::parse("shift:14,rotate:45,scale:0.99").unwrap()
    };
    let mut want_far = vec![0.0f32; rows * 784];
    r::gather_augmented(&mut want_far, &data.images, &order, (start, rows), &far, at.step as u32);
    let mut plain = vec![0.0f32; rows * 784];
    r::gather_batch(&mut plain, &data.images, &order, start, rows, 784);
    let moved = want.iter().zip(&plain).filter(|(a, b)| (*a - *b).abs() > 0.1).count();
    println!(
        "augmented batch: {moved} of {} pixels moved by more than 0.1",
        want.len()
    );
    assert!(moved > want.len() / 50, "the augmentation hardly moved the pictures");
    let still = Augment {
        shift: 0.0,
        rotate: 0.0,
        scale: 0.0,
        ..aug
    };
    let mut devices = devices_under_test();
    devices.push(Box::new(gpu_mnist::backend::cpu::CpuBackend::reference()));
    for be in devices.iter_mut() {
        let be = be.as_mut();
        let ds = be.upload_dataset(&data).unwrap();
        be.set_order(ds, &order).unwrap();
        let x = be.alloc(rows * 784).unwrap();
        // The CPU paths compute the same bits; a GPU may fuse a multiply-add.
        let tol = if be.name().starts_with("cpu") { 0.0 } else { 1e-5f32 };
        for (augment, expected, tol) in [(aug, &want, tol), (far, &want_far, tol), (still, &plain, 0.0)] {
            let gather = Gather {
                x,
                ds,
                rows,
                augment: Some(augment),
            };
            be.run(&Op::Gather(gather), at).unwrap();
            let what = format!("{} gather with {}", be.name(), augment.describe());
            assert_close(&what, &download(be, x, rows * 784), expected, tol, 0.0);
        }
    }
}

/// With --augment, a training plan gathers augmented batches and evaluation and prediction
/// plans (validation and test images) never do.
#[test]
fn only_training_batches_are_augmented() {
    use gpu_mnist::backend::ops::Augment;
    use gpu_mnist::model::{Batch, Graph, ModelSpec};
    use gpu_mnist::plan::PlanKind;
    let mut be = gpu_mnist::backend::cpu::CpuBackend::reference();
    let spec = ModelSpec::parse("--layers", "conv:4:3,pool:2,flatten,dense:10").unwrap();
    let mut graph = Graph::new(&mut be, &spec, 8).unwrap();
    graph.set_augment(Some(Augment::parse("shift:2").unwrap()));
    let ds = be.upload_dataset(&mnist().test.first(8)).unwrap();
    let opt = Optimizer::new(OptimizerKind::Adam, None).unwrap();
    for (kind, augmented) in [
        (PlanKind::Train, true),
        (PlanKind::Evaluate, false),
        (PlanKind::Predict, false),
    ] {
        let opt = (kind == PlanKind::Train).then_some(opt);
        let plan = graph.plan(&mut be, kind, Batch { ds, rows: 8 }, opt).unwrap();
        let gathers: Vec<bool> = plan
            .iter()
            .filter_map(|op| match op {
                Op::Gather(g) => Some(g.augment.is_some()),
                _ => None,
            })
            .collect();
        assert_eq!(gathers, [augmented], "{kind:?}: {}", gpu_mnist::plan::describe(plan));
    }
}
