//! `gpu-mnist predict --model PATH (--index SPEC | IMAGE...)`: the ten class probabilities, the
//! predicted class and (for test images) the true label, as in the book; classes are named as the
//! model's dataset names them ("Sneaker" for a Fashion-MNIST model, "7" for an MNIST one).

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use gpu_mnist::checkpoint::Checkpoint;
use gpu_mnist::data::{Dataset, DatasetKind, Mnist, IMAGE_PIXELS};
use gpu_mnist::device::open_device;
use gpu_mnist::image::load_digit;
use gpu_mnist::model::Graph;
use gpu_mnist::train::{predict, EvalSet, Prediction};
use gpu_mnist::{Error, Result};

use super::{DataArgs, DeviceArgs};

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// The model file written by `train --save`, or a safetensors file of Keras's or PyTorch's
    /// weights without gpu-mnist's metadata
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The model's layers (as train --layers), for a file without gpu-mnist's metadata that is
    /// not a stack of dense layers, e.g. a PyTorch convnet's state_dict
    #[arg(long, value_name = "SPEC")]
    pub layers: Option<String>,
    /// Test images by index: 0, 0..10 (end excluded) or 3,5,8
    #[arg(long, allow_negative_numbers = true, value_name = "SPEC", value_parser = parse_indices)]
    pub index: Option<Indices>,
    /// Pictures of digits (PNG, JPEG, WebP, BMP, GIF, TIFF or PNM) of any size: white on black,
    /// dark on light paper, photos, converted the MNIST way (ink cropped, scaled, centred); each
    /// gets its line, and an unreadable one an error line
    #[arg(value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone)]
pub struct Indices(Vec<usize>);

fn parse_indices(text: &str) -> std::result::Result<Indices, String> {
    let bad = || format!("'{text}' is not an index, a range like 0..10, or a list like 3,5,8");
    let list: Vec<usize> = if let Some((a, b)) = text.split_once("..") {
        let (a, b): (usize, usize) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a >= b || b - a > 10_000 {
            return Err(format!("range {a}..{b} must be non-empty and at most 10000 long"));
        }
        (a..b).collect()
    } else {
        text.split(',')
            .map(|t| t.trim().parse::<usize>().map_err(|_| bad()))
            .collect::<std::result::Result<_, _>>()?
    };
    Ok(Indices(list))
}

/// A class as the dataset names it: "7" for MNIST, "Sneaker (7)" for Fashion-MNIST.
fn class_name(kind: DatasetKind, class: u8) -> String {
    let name = kind.class_names()[class as usize % 10];
    match kind.classes_are_digits() {
        true => name.to_string(),
        false => format!("{name} ({class})"),
    }
}

fn print_prediction(kind: DatasetKind, what: &str, p: &Prediction, label: Option<u8>) {
    let truth = label
        .map(|l| {
            let wrong = if l == p.class { "" } else { " (wrong)" };
            format!(", true label {}{wrong}", class_name(kind, l))
        })
        .unwrap_or_default();
    println!(
        "{what}: predicted {} with probability {:.6}{truth}",
        class_name(kind, p.class),
        p.probs[p.class as usize]
    );
    let names = kind.class_names();
    let probs: Vec<String> = p
        .probs
        .iter()
        .enumerate()
        .map(|(d, q)| format!("{}: {q:.6}", names[d % 10]))
        .collect();
    println!("  {}", probs.join("  "));
}

pub fn run(args: PredictArgs) -> Result<()> {
    if args.index.is_none() && args.images.is_empty() {
        return Err(Error::usage("--index", "give --index SPEC, or one or more image files"));
    }
    let Checkpoint {
        spec, params, dataset, ..
    } = super::load_model(&args.model, args.layers.as_deref())?;
    let kind = args.data.dataset_for_model(&args.model, dataset)?;
    // Load the inputs before opening a device, so that a bad file fails fast.
    let test = match &args.index {
        Some(Indices(list)) => {
            let dir = args.data.folder(kind, std::io::stderr().is_terminal())?;
            let test = Mnist::load(&dir)?.test;
            if let Some(&bad) = list.iter().find(|&&i| i >= test.len()) {
                return Err(Error::usage(
                    "--index",
                    format!("{bad} is past the {} test images", test.len()),
                ));
            }
            let images = list
                .iter()
                .flat_map(|&i| test.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS].to_vec())
                .collect();
            let labels = list.iter().map(|&i| test.labels[i]).collect();
            Some((list.clone(), Dataset::new(images, labels)?))
        }
        None => None,
    };
    // Each picture is read on its own: a bad one gets an error line, the others are predicted.
    let pictures: Vec<(&PathBuf, Result<Vec<u8>>)> = args.images.iter().map(|p| (p, load_digit(p))).collect();
    let readable: Vec<u8> = pictures
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flatten()
        .copied()
        .collect();
    let failed = pictures.iter().filter(|(_, r)| r.is_err()).count();
    if failed == pictures.len() && test.is_none() {
        // None readable: the last error is the command's, the others come first, in order.
        let mut errors: Vec<Error> = pictures.into_iter().filter_map(|(_, r)| r.err()).collect();
        let last = errors.pop();
        for e in errors {
            eprintln!("error: {e}");
        }
        return Err(last.unwrap_or_else(|| Error::usage("--index", "give --index SPEC, or one or more image files")));
    }
    let opened = open_device(args.device.device.into(), args.device.adapter.as_deref())?;
    let mut backend = opened.backend;
    let be = backend.as_mut();
    let mut graph = Graph::new(be, &spec, 256)?;
    graph.set_params(be, &params)?;
    if let Some((list, set)) = test {
        let ds = be.upload_dataset(&set)?;
        for ((i, p), &label) in list
            .iter()
            .zip(pollster::block_on(predict(
                be,
                &mut graph,
                EvalSet { ds, len: set.len() },
            ))?)
            .zip(set.labels.iter())
        {
            print_prediction(kind, &format!("test image {i}"), &p, Some(label));
        }
    }
    let mut predictions = match failed < pictures.len() {
        true => {
            let set = Dataset::new(readable, vec![0; pictures.len() - failed])?;
            let ds = be.upload_dataset(&set)?;
            pollster::block_on(predict(be, &mut graph, EvalSet { ds, len: set.len() }))?
        }
        false => Vec::new(),
    }
    .into_iter();
    // In the order given: a prediction for each readable picture, an error line for the others.
    for (path, read) in &pictures {
        match (read, read.is_ok().then(|| predictions.next()).flatten()) {
            (Ok(_), Some(p)) => print_prediction(kind, &path.display().to_string(), &p, None),
            (Err(e), _) => eprintln!("error: {e}"),
            (Ok(_), None) => return Err(Error::shape("predict", "fewer predictions than pictures")),
        }
    }
    if failed > 0 {
        return Err(Error::Inputs(format!(
            "{failed} of {} pictures could not be read (each is named above)",
            pictures.len()
        )));
    }
    Ok(())
}
