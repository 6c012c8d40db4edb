//! The optimizers (Adam, AdamW, SGD with momentum and Nesterov's, with L2 decay and schedules) and
//! each step's learning rate on every device: the fast CPU path and the GPU (llvmpipe here)
//! against the reference's `optimizer_one`, one step and twenty, at awkward shapes, with the
//! weight gradient the op itself stored fed to the reference so that only the update is judged.
//! Tolerances: values atol 1e-6 + rtol 1e-5, moments atol 1e-9 + rtol 1e-5 (f32 rounding of the
//! same operations, which a GPU may contract into fused multiply-adds); the largest difference is
//! printed either way. The rates are compared bit for bit: every device reads the same f32 per
//! step (`Optimizer::scalars`).

mod common;

use common::*;
use gpu_mnist::backend::ops::StepAt;
use gpu_mnist::backend::reference as r;
use gpu_mnist::backend::Backend;
use gpu_mnist::optim::{Optimizer, OptimizerKind};
use gpu_mnist::schedule::Schedule;

/// The optimizers under test, each with a schedule whose rate changes every step.
fn optimizers() -> Vec<(&'static str, Optimizer)> {
    let with = |kind, lr, f: &dyn Fn(&mut Optimizer)| {
        let mut opt = Optimizer::new(kind, Some(lr)).unwrap();
        f(&mut opt);
        opt.validate().unwrap();
        opt
    };
    let warmup = Schedule::WarmupCosine {
        warmup: 5,
        total: 30_000,
        floor: 0.1,
    };
    vec![
        (
            "adam, one-cycle",
            with(OptimizerKind::Adam, 0.01, &|o| {
                (o.beta1, o.beta2, o.schedule) = (0.7, 0.9, Schedule::one_cycle(20));
            }),
        ),
        (
            "adamw, warm-up cosine",
            with(OptimizerKind::AdamW, 3e-3, &|o| {
                (o.weight_decay, o.schedule) = (0.05, warmup);
            }),
        ),
        (
            "adam with L2",
            with(OptimizerKind::Adam, 1e-3, &|o| o.weight_decay = 1e-3),
        ),
        (
            "sgd momentum, step decay",
            with(OptimizerKind::Sgd, 0.05, &|o| {
                (o.momentum, o.schedule) = (0.9, Schedule::Step { every: 3, gamma: 0.5 });
            }),
        ),
        (
            "sgd nesterov with L2, exponential",
            with(OptimizerKind::Sgd, 0.05, &|o| {
                (o.momentum, o.nesterov, o.weight_decay) = (0.8, true, 1e-2);
                o.schedule = Schedule::Exponential { gamma: 0.9 };
            }),
        ),
        (
            "rmsprop, warm-up cosine",
            with(OptimizerKind::RmsProp, 1e-3, &|o| o.schedule = warmup),
        ),
    ]
}

/// Steps as a run lays them out: chunks of 6 whose statistics slots alternate between two halves,
/// then a jump far ahead (past the GPU step table's rows, which it must rewrite).
fn steps(count: usize) -> Vec<StepAt> {
    let mut at: Vec<StepAt> = (0..count)
        .map(|step| StepAt {
            start: 0,
            slot: (step / 6) % 2 * 6 + step % 6,
            step,
        })
        .collect();
    if count > 2 {
        at[count - 1] = StepAt {
            start: 0,
            slot: 3,
            step: 20_000,
        };
    }
    at
}

/// `count` fused weight-gradient steps of a dense layer (b, c, oc) packed after another one on
/// `be`, each with fresh inputs, against the reference's update of the gradients the op stored.
fn check_steps(be: &mut dyn Backend, what: &str, opt: &Optimizer, (b, c, oc): (usize, usize, usize), count: usize) {
    let name = format!("{} {what} {b}x{c}x{oc}, {count} step(s)", be.name());
    let mut g = rng((b * 1000 + c * 10 + oc + count) as u64);
    let lens = [11, 3, c * oc, oc];
    let values: Vec<Vec<f32>> = lens.iter().map(|&n| random_vec(&mut g, n, 1.0)).collect();
    let vels: Vec<Vec<f32>> = lens.iter().map(|&n| abs(&random_vec(&mut g, n, 1e-4))).collect();
    let packed = packed_two_layers(be, (&values, &vels), (c, oc));
    let params = (param_of(&packed, 2), param_of(&packed, 3));
    let (t_inp, t_dout) = (be.alloc(b * c).unwrap(), be.alloc(b * oc).unwrap());
    // The reference's state of the weight (part 2) and bias (part 3).
    let mut want: Vec<[Vec<f32>; 3]> = [2, 3]
        .map(|k| [values[k].clone(), vels[k].clone(), momentum_of(&vels[k])])
        .into();
    for at in steps(count) {
        let (inp, dout) = (random_vec(&mut g, b * c, 1.0), random_vec(&mut g, b * oc, 1e-2));
        be.write(t_inp, &inp).unwrap();
        be.write(t_dout, &dout).unwrap();
        ops::backward_weight_update_at(be, params, (t_inp, t_dout), (b, c, oc), opt, at).unwrap();
        let k = r::OptimizerStep::<f32>::new(opt, opt.scalars(at.step));
        for (state, grad) in want.iter_mut().zip([params.0.grad, params.1.grad]) {
            let grad = ops::read(be, grad).unwrap();
            let [p, v, m] = state;
            r::optimizer_update(p, v, m, &grad, &k);
        }
    }
    for (i, (part, param)) in [("weight", params.0), ("bias", params.1)].into_iter().enumerate() {
        let [p, v, m] = &want[i];
        let mut got = |t| ops::read(be, t).unwrap();
        assert_close(&format!("{name} {part} value"), &got(param.value), p, 1e-6, 1e-5);
        assert_close(&format!("{name} {part} velocity"), &got(param.velocity), v, 1e-9, 1e-5);
        assert_close(&format!("{name} {part} momentum"), &got(param.momentum), m, 1e-9, 1e-5);
    }
    let other = ops::read(be, packed[0].parts[0]).unwrap();
    assert_eq!(other, values[0], "{name}: the other layer's weight changed");
}

const SHAPES: [(usize, usize, usize); 4] = [(1, 1, 1), (3, 7, 1), (5, 40, 25), (17, 97, 33)];

/// Every optimizer, shape and step count of this file on `be`.
fn check_every_optimizer(be: &mut dyn Backend) {
    for (what, opt) in optimizers() {
        for shape in SHAPES {
            for count in [1, 20] {
                check_steps(be, what, &opt, shape, count);
            }
        }
    }
}

#[test]
fn fast_cpu_optimizers_match_the_reference_over_one_and_twenty_steps() {
    check_every_optimizer(&mut fast_cpu());
}

#[test]
fn gpu_optimizers_match_the_reference_over_one_and_twenty_steps() {
    check_every_optimizer(&mut gpu());
}

/// Each step's rate as a device applies it, read back exactly: plain SGD of a 1x1 weight from 0
/// with gradient 1 (one input 1, one output gradient 1) leaves -rate in it, and the bias too.
fn applied_rates(be: &mut dyn Backend, opt: &Optimizer, at: &[StepAt]) -> Vec<f32> {
    let zero = vec![vec![0.0]; 4];
    let packed = packed_two_layers(be, (&zero, &zero), (1, 1));
    let params = (param_of(&packed, 2), param_of(&packed, 3));
    let (t_inp, t_dout) = (upload(be, &[1.0]), upload(be, &[1.0]));
    at.iter()
        .map(|&at| {
            be.write(params.0.value, &[0.0]).unwrap();
            be.write(params.1.value, &[0.0]).unwrap();
            ops::backward_weight_update_at(be, params, (t_inp, t_dout), (1, 1, 1), opt, at).unwrap();
            let (w, b) = (
                ops::read(be, params.0.value).unwrap()[0],
                ops::read(be, params.1.value).unwrap()[0],
            );
            assert_eq!(
                w,
                b,
                "{}: weight and bias took different rates at step {}",
                be.name(),
                at.step
            );
            -w
        })
        .collect()
}

/// Every schedule over a whole run of 40 steps in chunks (the first step, the warm-up's peak and
/// the last included), then a jump far ahead: each device applies at every step exactly the rate
/// the formula gives (`Schedule::rate` through `Optimizer::scalars`).
#[test]
fn every_device_applies_each_steps_scheduled_rate_exactly() {
    let total = 40;
    let schedules = [
        Schedule::Constant,
        Schedule::parse("step:every=7,gamma=0.5", total).unwrap(),
        Schedule::parse("exponential", total).unwrap(),
        Schedule::parse("cosine:warmup=8,floor=0.05", total).unwrap(),
        Schedule::one_cycle(total),
    ];
    let mut devices: Vec<Box<dyn Backend>> = vec![
        Box::new(gpu_mnist::backend::cpu::CpuBackend::reference()),
        Box::new(fast_cpu()),
        Box::new(gpu()),
    ];
    let at: Vec<StepAt> = steps(total + 1);
    for schedule in schedules {
        let mut opt = Optimizer::new(OptimizerKind::Sgd, Some(0.1)).unwrap();
        opt.schedule = schedule;
        let want: Vec<f32> = at.iter().map(|a| schedule.rate(0.1, a.step)).collect();
        for be in devices.iter_mut() {
            let got = applied_rates(be.as_mut(), &opt, &at);
            println!(
                "{} {}: rates {:?} .. {:?}",
                be.name(),
                schedule.describe(),
                &got[..3],
                &got[total - 2..]
            );
            assert_eq!(got, want, "{} {}", be.name(), schedule.describe());
        }
    }
}
