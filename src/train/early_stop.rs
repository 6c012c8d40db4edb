//! Early stopping, as Keras's `EarlyStopping(monitor, patience, restore_best_weights=True)`: watch
//! a validation figure after every epoch, stop once it has not improved for `patience` epochs in a
//! row, and end with the weights of the best epoch.
//!
//! Contract: `Watch::observe` takes each epoch's record in order and says whether it was the best
//! so far (the caller then keeps that epoch's weights) and whether to stop; a run that never
//! improves keeps its first epoch. Any strict improvement counts (Keras's `min_delta = 0`).

use crate::records::EpochRecord;

/// The figure watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Monitor {
    /// Validation loss, lower is better (Keras's default).
    ValLoss,
    /// Validation accuracy, higher is better.
    ValAccuracy,
}

impl Monitor {
    /// The name, as Keras and metrics.csv write it.
    pub fn key(self) -> &'static str {
        match self {
            Monitor::ValLoss => "val_loss",
            Monitor::ValAccuracy => "val_accuracy",
        }
    }

    /// The monitor `key` names.
    pub fn from_key(key: &str) -> Option<Monitor> {
        [Monitor::ValLoss, Monitor::ValAccuracy]
            .into_iter()
            .find(|m| m.key() == key)
    }

    /// The figure of `r` as a number to minimise (accuracy negated).
    fn cost(self, r: &EpochRecord) -> Option<f64> {
        match self {
            Monitor::ValLoss => r.val_loss,
            Monitor::ValAccuracy => r.val_accuracy.map(|a| -a),
        }
    }
}

/// What `--early-stop` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlyStop {
    /// Epochs without improvement before the run stops (1 or more).
    pub patience: usize,
    pub monitor: Monitor,
}

/// The best epoch so far and how long ago it was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watch {
    pub rule: EarlyStop,
    /// The best epoch (1-based) and its cost, once one has been seen.
    pub best: Option<(usize, f64)>,
    /// Epochs since the best one.
    pub waited: usize,
}

/// What one epoch's record meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The epoch is the best so far: keep its weights.
    pub best: bool,
    /// `patience` epochs have passed without improvement: stop after this epoch.
    pub stop: bool,
}

impl Watch {
    pub fn new(rule: EarlyStop) -> Watch {
        Watch {
            rule,
            best: None,
            waited: 0,
        }
    }

    /// Take the record of the next epoch. An epoch without the figure (no validation set) is
    /// neither better nor worse.
    pub fn observe(&mut self, r: &EpochRecord) -> Verdict {
        let Some(cost) = self.rule.monitor.cost(r) else {
            return Verdict {
                best: false,
                stop: false,
            };
        };
        let improved = self.best.is_none_or(|(_, best)| cost < best);
        if improved {
            self.best = Some((r.epoch, cost));
            self.waited = 0;
        } else {
            self.waited += 1;
        }
        Verdict {
            best: improved,
            stop: self.waited >= self.rule.patience,
        }
    }

    /// Whether `patience` epochs have passed without improvement: the run is over, however many
    /// epochs it was given (a resumed run given more trains no further).
    pub fn exhausted(&self) -> bool {
        self.waited >= self.rule.patience
    }

    /// The best epoch so far (1-based).
    pub fn best_epoch(&self) -> Option<usize> {
        self.best.map(|(epoch, _)| epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: usize, val_loss: f64, val_accuracy: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: 0.0,
            train_accuracy: 0.0,
            val_loss: Some(val_loss),
            val_accuracy: Some(val_accuracy),
            seconds: 0.0,
            lr: None,
            device: String::new(),
        }
    }

    #[test]
    fn stops_after_patience_epochs_without_improvement_and_names_the_best() {
        let losses = [0.5, 0.4, 0.45, 0.39, 0.6, 0.7, 0.8];
        let mut w = Watch::new(EarlyStop {
            patience: 2,
            monitor: Monitor::ValLoss,
        });
        let verdicts: Vec<Verdict> = losses
            .iter()
            .enumerate()
            .map(|(i, &l)| w.observe(&record(i + 1, l, 0.0)))
            .collect();
        let best: Vec<bool> = verdicts.iter().map(|v| v.best).collect();
        assert_eq!(best, [true, true, false, true, false, false, false]);
        let stop = verdicts.iter().position(|v| v.stop);
        assert_eq!(stop, Some(5), "stops after epoch 6, two epochs past epoch 4");
        assert_eq!(w.best_epoch(), Some(4));
        // Accuracy: higher is better; a tie is no improvement.
        let mut w = Watch::new(EarlyStop {
            patience: 1,
            monitor: Monitor::ValAccuracy,
        });
        assert!(w.observe(&record(1, 0.0, 0.9)).best);
        let tie = w.observe(&record(2, 0.0, 0.9));
        assert!(!tie.best && tie.stop);
        assert_eq!(w.best_epoch(), Some(1));
    }
}
