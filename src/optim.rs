//! Optimizer settings (RMSprop, SGD with or without momentum, Adam, AdamW) and the numbers each
//! step of a run uses (`StepScalars`).
//!
//! Contract: the update formulas live in `backend::reference` (`optimizer_one`, which every CPU
//! path calls) and in shaders/optimizer.wgsl; this module holds and validates the
//! hyper-parameters, and turns (optimizer, schedule, step) into the f32 scalars that step uses:
//! its learning rate and Adam's bias corrections, computed in f64 and rounded once, so that the
//! reference, the CPU path and a GPU (which reads them from a table) use the same numbers for the
//! same step, and a resumed run continues the same sequence.

use crate::error::{Error, Result};
use crate::schedule::Schedule;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// Keras's RMSprop: v = rho v + (1 - rho) g^2; p -= lr g / sqrt(v + eps).
    RmsProp,
    /// PyTorch's SGD: with momentum mu, m = mu m + g and p -= lr m (Nesterov: p -= lr (g + mu m)).
    Sgd,
    /// PyTorch's Adam (L2 weight decay added to the gradient).
    Adam,
    /// PyTorch's AdamW (decoupled weight decay: p -= lr wd p before the Adam step).
    AdamW,
}

impl OptimizerKind {
    /// The name on the command line and in checkpoints.
    pub fn key(self) -> &'static str {
        match self {
            OptimizerKind::RmsProp => "rmsprop",
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::AdamW => "adamw",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        [Self::RmsProp, Self::Sgd, Self::Adam, Self::AdamW]
            .into_iter()
            .find(|k| k.key() == key)
    }

    /// Whether it keeps a second moment of the gradient (the `velocity` tensors).
    pub fn uses_velocity(self) -> bool {
        matches!(self, Self::RmsProp | Self::Adam | Self::AdamW)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    /// The base learning rate: every step's rate is `schedule`'s at that step from it.
    pub lr: f32,
    /// RMSprop's decay of the squared-gradient average.
    pub rho: f32,
    /// RMSprop's epsilon (inside the square root, as Keras), or Adam's (outside, as PyTorch).
    pub eps: f32,
    /// Adam's decays of the first and second moments.
    pub beta1: f32,
    pub beta2: f32,
    /// SGD's momentum (0: plain SGD) and whether it is Nesterov's.
    pub momentum: f32,
    pub nesterov: bool,
    /// AdamW: decoupled decay (p -= lr wd p); the others: L2, wd p added to the gradient.
    pub weight_decay: f32,
    pub schedule: Schedule,
}

/// What one step of an optimizer uses besides its hyper-parameters, for the step at hand.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub struct StepScalars {
    /// The step's learning rate (the schedule's).
    pub lr: f32,
    /// Adam: lr / (1 - beta1^t), t = step + 1.
    pub adam_step: f32,
    /// Adam: 1 / sqrt(1 - beta2^t).
    pub adam_norm: f32,
    /// AdamW: lr wd, the fraction of each value decayed before the step.
    pub decay: f32,
}

/// A hyper-parameter checked to be finite and in a range, or a usage error naming its flag.
fn check(flag: &str, value: f32, ok: bool, range: &str) -> Result<()> {
    match value.is_finite() && ok {
        true => Ok(()),
        false => Err(Error::usage(flag, format!("{value} is not {range}"))),
    }
}

impl Optimizer {
    /// Defaults: RMSprop as Keras (lr 1e-3, rho 0.9, eps 1e-7); SGD lr 1e-2; Adam and AdamW as
    /// PyTorch (lr 1e-3, betas 0.9 and 0.999, eps 1e-8; AdamW weight decay 0.01); constant rate.
    pub fn new(kind: OptimizerKind, lr: Option<f32>) -> Result<Self> {
        let default_lr = match kind {
            OptimizerKind::Sgd => 1e-2,
            _ => 1e-3,
        };
        let adam = matches!(kind, OptimizerKind::Adam | OptimizerKind::AdamW);
        let opt = Optimizer {
            kind,
            lr: lr.unwrap_or(default_lr),
            rho: 0.9,
            eps: if adam { 1e-8 } else { 1e-7 },
            beta1: 0.9,
            beta2: 0.999,
            momentum: 0.0,
            nesterov: false,
            weight_decay: if kind == OptimizerKind::AdamW { 0.01 } else { 0.0 },
            schedule: Schedule::Constant,
        };
        opt.validate()?;
        Ok(opt)
    }

    /// Refuse hyper-parameters no step can use, naming the flag.
    pub fn validate(&self) -> Result<()> {
        check("--lr", self.lr, self.lr > 0.0, "a positive finite number")?;
        check("--eps", self.eps, self.eps > 0.0, "a positive finite number")?;
        let unit = "a number from 0 up to (not including) 1";
        check("--rho", self.rho, (0.0..1.0).contains(&self.rho), unit)?;
        check("--beta1", self.beta1, (0.0..1.0).contains(&self.beta1), unit)?;
        check("--beta2", self.beta2, (0.0..1.0).contains(&self.beta2), unit)?;
        check("--momentum", self.momentum, (0.0..1.0).contains(&self.momentum), unit)?;
        check(
            "--weight-decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "0 or more",
        )?;
        if self.nesterov && self.momentum == 0.0 {
            return Err(Error::usage("--nesterov", "needs --momentum above 0"));
        }
        if (self.momentum > 0.0 || self.nesterov) && self.kind != OptimizerKind::Sgd {
            return Err(Error::usage("--momentum", "applies to --optimizer sgd only"));
        }
        Ok(())
    }

    /// Whether it keeps a first moment (Adam's m, SGD's momentum buffer: the `momentum` tensors).
    pub fn uses_momentum(&self) -> bool {
        match self.kind {
            OptimizerKind::Adam | OptimizerKind::AdamW => true,
            OptimizerKind::Sgd => self.momentum > 0.0,
            OptimizerKind::RmsProp => false,
        }
    }

    /// The L2 coefficient added to the gradient (wd p): the weight decay of every optimizer but
    /// AdamW, whose decay is decoupled (`StepScalars::decay`).
    pub fn l2(&self) -> f32 {
        match self.kind {
            OptimizerKind::AdamW => 0.0,
            _ => self.weight_decay,
        }
    }

    /// The scalars of step `step` (0-based over the whole run): see `StepScalars`.
    pub fn scalars(&self, step: usize) -> StepScalars {
        let lr = self.schedule.rate_f64(self.lr as f64, step);
        let t = step.saturating_add(1).min(i32::MAX as usize) as i32;
        let (adam_step, adam_norm) = match self.kind {
            OptimizerKind::Adam | OptimizerKind::AdamW => {
                let bc1 = 1.0 - (self.beta1 as f64).powi(t);
                let bc2 = 1.0 - (self.beta2 as f64).powi(t);
                (lr / bc1, 1.0 / bc2.sqrt())
            }
            _ => (0.0, 0.0),
        };
        let decay = match self.kind {
            OptimizerKind::AdamW => lr * self.weight_decay as f64,
            _ => 0.0,
        };
        StepScalars {
            lr: lr as f32,
            adam_step: adam_step as f32,
            adam_norm: adam_norm as f32,
            decay: decay as f32,
        }
    }

    pub fn describe(&self) -> String {
        let decay = match self.weight_decay {
            0.0 => String::new(),
            wd => format!(", weight decay {wd}"),
        };
        let schedule = match self.schedule {
            Schedule::Constant => String::new(),
            s => format!(", {}", s.describe()),
        };
        let body = match self.kind {
            OptimizerKind::RmsProp => format!("rmsprop (lr {}, rho {}, eps {:e}", self.lr, self.rho, self.eps),
            OptimizerKind::Sgd if self.momentum > 0.0 => format!(
                "sgd (lr {}, {}momentum {}",
                self.lr,
                if self.nesterov { "nesterov " } else { "" },
                self.momentum
            ),
            OptimizerKind::Sgd => format!("sgd (lr {}", self.lr),
            OptimizerKind::Adam | OptimizerKind::AdamW => format!(
                "{} (lr {}, betas {} {}, eps {:e}",
                self.kind.key(),
                self.lr,
                self.beta1,
                self.beta2,
                self.eps
            ),
        };
        format!("{body}{decay}{schedule})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_scalars_are_the_bias_corrections_of_each_step() {
        let mut adam = Optimizer::new(OptimizerKind::Adam, Some(0.01)).unwrap();
        adam.beta1 = 0.7;
        adam.beta2 = 0.9;
        let first = adam.scalars(0);
        assert_eq!(first.lr, 0.01);
        // From the f32 betas (0.7f32 is 0.699999988...), within f32 rounding.
        let close = |got: f32, want: f64| ((got as f64 - want) / want).abs() < 1e-6;
        assert!(close(first.adam_step, 0.01 / 0.3), "{first:?}");
        assert!(close(first.adam_norm, 1.0 / 0.1f64.sqrt()), "{first:?}");
        let later = adam.scalars(99);
        assert!(close(later.adam_step, 0.01 / (1.0 - 0.7f64.powi(100))), "{later:?}");
        assert_eq!(later.decay, 0.0);
        let mut adamw = Optimizer::new(OptimizerKind::AdamW, Some(0.01)).unwrap();
        adamw.schedule = Schedule::one_cycle(100);
        let s = adamw.scalars(5);
        assert_eq!(s.decay, (adamw.schedule.rate_f64(0.01, 5) * 0.01) as f32);
        assert_eq!(s.lr, adamw.schedule.rate(0.01, 5));
    }

    #[test]
    fn bad_hyper_parameters_name_their_flag() {
        let adam = Optimizer::new(OptimizerKind::Adam, None).unwrap();
        for (opt, flag) in [
            (Optimizer { beta1: 1.0, ..adam }, "--beta1"),
            (Optimizer { beta2: -0.1, ..adam }, "--beta2"),
            (Optimizer { eps: 0.0, ..adam }, "--eps"),
            (Optimizer { momentum: 0.9, ..adam }, "--momentum"),
            (
                Optimizer {
                    weight_decay: f32::NAN,
                    ..adam
                },
                "--weight-decay",
            ),
        ] {
            let e = opt.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        assert!(Optimizer::new(OptimizerKind::Sgd, Some(-1.0)).is_err());
    }
}
