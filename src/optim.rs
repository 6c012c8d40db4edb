//! Optimizer settings: RMSprop with Keras's defaults, or plain SGD.
//!
//! Contract: the update formulas live in `backend::reference` (`rmsprop_one`, `sgd_one`, which
//! every CPU path calls) and in shaders/optimizer.wgsl; this module only holds and validates the
//! hyper-parameters.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    RmsProp,
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f32,
    /// RMSprop's decay of the squared-gradient average.
    pub rho: f32,
    /// RMSprop's epsilon, added inside the square root as Keras does.
    pub eps: f32,
}

impl Optimizer {
    /// Keras defaults: RMSprop lr 1e-3, rho 0.9, eps 1e-7; SGD lr 1e-2.
    pub fn new(kind: OptimizerKind, lr: Option<f32>) -> Result<Self> {
        let default_lr = match kind {
            OptimizerKind::RmsProp => 1e-3,
            OptimizerKind::Sgd => 1e-2,
        };
        let lr = lr.unwrap_or(default_lr);
        if !lr.is_finite() || lr <= 0.0 {
            return Err(Error::usage("--lr", format!("{lr} is not a positive finite number")));
        }
        Ok(Optimizer {
            kind,
            lr,
            rho: 0.9,
            eps: 1e-7,
        })
    }

    pub fn describe(&self) -> String {
        match self.kind {
            OptimizerKind::RmsProp => format!("rmsprop (lr {}, rho {}, eps {})", self.lr, self.rho, self.eps),
            OptimizerKind::Sgd => format!("sgd (lr {})", self.lr),
        }
    }
}
