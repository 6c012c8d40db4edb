//! `gpu-mnist evaluate --model PATH`: test loss, accuracy and confusion matrix (with the dataset's
//! class names) of a saved model on the test set of the dataset it was trained on, and optionally
//! a picture of the misclassified test images.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use gpu_mnist::checkpoint::{write_atomic, Checkpoint};
use gpu_mnist::data::{DatasetKind, Mnist, IMAGE_PIXELS};
use gpu_mnist::device::open_device;
use gpu_mnist::image::digit_grid_png;
use gpu_mnist::model::Graph;
use gpu_mnist::train::{evaluate, predict, EvalSet};
use gpu_mnist::Result;

use super::{check_output_path, parse_batch, parse_positive, DataArgs, DeviceArgs};

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The model file written by `train --save` (or a --checkpoint-dir checkpoint), or a
    /// safetensors file of Keras's or PyTorch's weights without gpu-mnist's metadata
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The model's layers (as train --layers), for a file without gpu-mnist's metadata that is
    /// not a stack of dense layers, e.g. a PyTorch convnet's state_dict
    #[arg(long, value_name = "SPEC")]
    pub layers: Option<String>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Examples per evaluation batch
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "1000", value_parser = parse_batch)]
    pub batch_size: usize,
    /// Write a PNG grid of the misclassified test images (predicted class in red, true class in
    /// green)
    #[arg(long, value_name = "PNG")]
    pub misclassified: Option<PathBuf>,
    /// At most this many images in the --misclassified picture
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "100", value_parser = parse_positive)]
    pub max_images: usize,
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    if let Some(path) = &args.misclassified {
        check_output_path("--misclassified", path)?;
    }
    let Checkpoint {
        spec, params, dataset, ..
    } = super::load_model(&args.model, args.layers.as_deref())?;
    let kind = args.data.dataset_for_model(&args.model, dataset)?;
    let dir = args.data.folder(kind, std::io::stderr().is_terminal())?;
    let mnist = Mnist::load(&dir)?;
    let test_set = mnist.test.first(args.data.test_limit.unwrap_or(usize::MAX));
    let opened = open_device(args.device.device.into(), args.device.adapter.as_deref())?;
    println!("{}", opened.note);
    println!("model: {} ({})", spec.describe(), args.model.display());
    println!("data: {kind} test set in {}", dir.display());
    let mut backend = opened.backend;
    let be = backend.as_mut();
    let mut graph = Graph::new(be, &spec, args.batch_size.min(test_set.len()))?;
    graph.set_params(be, &params)?;
    let ds = be.upload_dataset(&test_set)?;
    let report = pollster::block_on(evaluate(
        be,
        &mut graph,
        EvalSet {
            ds,
            len: test_set.len(),
        },
        64,
    ))?;
    println!(
        "test: loss {:.4}, accuracy {:.2}% ({} images)",
        report.loss,
        100.0 * report.accuracy,
        report.examples
    );

    let predictions = pollster::block_on(predict(
        be,
        &mut graph,
        EvalSet {
            ds,
            len: test_set.len(),
        },
    ))?;
    let mut confusion = [[0usize; 10]; 10];
    for (p, &label) in predictions.iter().zip(test_set.labels.iter()) {
        confusion[label as usize][p.class as usize] += 1;
    }
    print_confusion(kind, &confusion);
    if let Some(path) = &args.misclassified {
        let wrong: Vec<(&[u8], u8, u8)> = predictions
            .iter()
            .enumerate()
            .filter(|(i, p)| p.class != test_set.labels[*i])
            .take(args.max_images)
            .map(|(i, p)| {
                (
                    &test_set.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS],
                    p.class,
                    test_set.labels[i],
                )
            })
            .collect();
        write_atomic(path, &digit_grid_png(&wrong, 10)?)?;
        let (what, numbers) = match kind.classes_are_digits() {
            true => ("digits", ""),
            false => ("images", ", as class numbers"),
        };
        println!(
            "wrote {} misclassified {what} to {} (red: predicted, green: true label{numbers})",
            wrong.len(),
            path.display()
        );
    }
    Ok(())
}

/// The confusion matrix, rows named by class (MNIST's by digit alone), with each class's recall.
fn print_confusion(kind: DatasetKind, confusion: &[[usize; 10]; 10]) {
    let names = kind.class_names();
    let label = |c: usize| match kind.classes_are_digits() {
        true => format!("{c:>3}"),
        false => format!("{c:>3} {:<11}", names[c]),
    };
    let width = label(0).len();
    println!("confusion matrix (rows: true class, columns: predicted class):");
    println!(
        "  {:width$}{}",
        "",
        (0..10).map(|c| format!("{c:>6}")).collect::<String>()
    );
    for (class, row) in confusion.iter().enumerate() {
        let total: usize = row.iter().sum();
        let recall = match total {
            0 => 0.0,
            _ => 100.0 * row[class] as f64 / total as f64,
        };
        println!(
            "  {}{}   {recall:5.1}% right",
            label(class),
            row.iter().map(|n| format!("{n:>6}")).collect::<String>()
        );
    }
}
