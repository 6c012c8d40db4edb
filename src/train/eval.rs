//! Evaluation and prediction over a resident dataset, through the graph's plans.
//!
//! Contract: `evaluate` runs the evaluation plan over every batch, reading the statistics back
//! once per chunk of batches; `predict` runs the prediction plan and reads the logits back once a
//! batch. Neither changes the parameters.

use super::{accumulate, EpochProgress};
use crate::backend::ops::StepAt;
use crate::backend::reference as r;
use crate::backend::{read_stats, Backend, DatasetId};
use crate::data::batches;
use crate::error::Result;
use crate::model::{Batch, Graph};
use crate::plan::PlanKind;

/// Loss and accuracy over a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub loss: f64,
    pub accuracy: f64,
    pub examples: usize,
}

/// A resident dataset evaluated or predicted whole: its `len` examples of `ds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalSet {
    pub ds: DatasetId,
    pub len: usize,
}

/// Evaluate `graph` on the `len` examples of resident dataset `ds` (in its current order) in
/// batches of the graph's size, reading statistics back once per `chunk_steps` batches.
pub async fn evaluate(
    be: &mut dyn Backend,
    graph: &mut Graph,
    EvalSet { ds, len }: EvalSet,
    chunk_steps: usize,
) -> Result<EvalReport> {
    let steps: Vec<(usize, usize)> = batches(len, graph.max_batch()).collect();
    let chunk = chunk_steps.max(1);
    be.reserve_stats(chunk)?;
    let mut totals = EpochProgress::default();
    for chunk_steps in steps.chunks(chunk) {
        for (slot, &(start, rows)) in chunk_steps.iter().enumerate() {
            graph.eval_step(be, Batch { ds, rows }, StepAt { start, slot, step: 0 })?;
        }
        let stats = read_stats(be, chunk_steps.len()).await?;
        // A bad model may have a huge loss; only a non-finite one is an error here.
        accumulate(&mut totals, &stats, chunk_steps, f64::INFINITY, |_, what, _| {
            format!("evaluation failed: the loss became {what}")
        })?;
    }
    Ok(EvalReport {
        loss: totals.mean_loss(),
        accuracy: totals.accuracy(),
        examples: totals.examples,
    })
}

/// One example's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The class with the largest logit (the first one on a tie, as in the loss kernel).
    pub class: u8,
    /// Softmax probabilities of the classes.
    pub probs: Vec<f32>,
}

/// Predict the `len` examples of resident dataset `ds`, in its current order, in batches of the
/// graph's size (one read-back each).
pub async fn predict(be: &mut dyn Backend, graph: &mut Graph, EvalSet { ds, len }: EvalSet) -> Result<Vec<Prediction>> {
    let v = crate::data::CLASSES;
    let mut out = Vec::with_capacity(len);
    for (start, rows) in batches(len, graph.max_batch()) {
        graph.step(
            be,
            PlanKind::Predict,
            Batch { ds, rows },
            StepAt {
                start,
                slot: 0,
                step: 0,
            },
            None,
        )?;
        let logits = be.read(graph.logits()).await?;
        let logits = &logits[..rows * v];
        let (mut probs, mut losses, mut classes) = (vec![0.0; rows * v], vec![0.0; rows], vec![0u8; rows]);
        // The loss is unused here: the labels passed are placeholders.
        r::softmax_xent_forward(&mut probs, &mut losses, logits, &vec![0; rows], rows, v);
        r::argmax_rows(&mut classes, logits, rows, v);
        out.extend(classes.iter().zip(probs.chunks(v)).map(|(&class, p)| Prediction {
            class,
            probs: p.to_vec(),
        }));
    }
    Ok(out)
}
