//! `gpu-mnist evaluate --model PATH`: test loss and accuracy of a saved model.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use gpu_mnist::data::locate::resolve_data_dir;
use gpu_mnist::data::Mnist;
use gpu_mnist::device::open_device;
use gpu_mnist::model::Graph;
use gpu_mnist::train::evaluate;
use gpu_mnist::{checkpoint, Result};

use super::{parse_positive, DataArgs, DeviceArgs};

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The model file written by `train --save`
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Examples per evaluation batch
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value = "128", value_parser = parse_positive)]
    pub batch_size: usize,
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    let (spec, params) = checkpoint::load(&args.model)?;
    let (dir, _) = resolve_data_dir(
        args.data.data.as_deref(),
        args.data.offline,
        std::io::stderr().is_terminal(),
    )?;
    let mnist = Mnist::load(&dir)?;
    let test_set = mnist.test.first(args.data.test_limit.unwrap_or(usize::MAX));
    let opened = open_device(args.device.device.into(), args.device.adapter.as_deref())?;
    println!("{}", opened.note);
    println!("model: {} ({})", spec.describe(), args.model.display());
    let mut backend = opened.backend;
    let be = backend.as_mut();
    let graph = Graph::new(be, &spec, args.batch_size)?;
    graph.set_params(be, &params)?;
    let ds = be.upload_dataset(&test_set)?;
    let report = evaluate(be, &graph, ds, test_set.len(), 64)?;
    println!(
        "test: loss {:.4}, accuracy {:.2}% ({} images)",
        report.loss,
        100.0 * report.accuracy,
        report.examples
    );
    Ok(())
}
