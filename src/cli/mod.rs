//! Command-line types (clap derive) and the dispatch to one module per subcommand.
//!
//! Contract: every flag value is validated here, by clap value parsers, so that a bad value is a
//! usage error (exit 2) naming the flag before anything runs.

mod bench;
mod devices;
mod evaluate;
mod predict;
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use gpu_mnist::data::DatasetKind;
use gpu_mnist::device::DeviceChoice;
use gpu_mnist::model::ModelSpec;
use gpu_mnist::Result;

#[derive(Parser, Debug)]
#[command(
    name = "gpu-mnist",
    version,
    about = "Train MNIST classifiers (or Fashion-MNIST, KMNIST ones) with WGSL compute shaders on wgpu, or on the CPU",
    after_help = "Examples:\n  gpu-mnist train --device auto --save model.safetensors\n  gpu-mnist train --dataset fashion --model convnet --save fashion.safetensors\n  gpu-mnist evaluate --model model.safetensors\n  gpu-mnist predict --model model.safetensors --index 0\n  gpu-mnist bench\n  gpu-mnist devices"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// One value, parsed once at start-up: the size of its largest variant (train's flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model (default: the Keras book's 784-512-10 MLP, RMSprop, 5 epochs)
    #[command(
        after_help = "Examples:\n  gpu-mnist train --device auto --epochs 5 --save model.safetensors\n  gpu-mnist train --model fast    # 99 % in one epoch: Adam, one-cycle, batch 128\n  gpu-mnist train --model accurate    # 99.5 %: batch norm, dropout, augmentation, 10 epochs\n  gpu-mnist train --optimizer adamw --lr 3e-3 --schedule cosine:warmup=100"
    )]
    Train(train::TrainArgs),
    /// Report test loss and accuracy of a saved model
    #[command(after_help = "Example:\n  gpu-mnist evaluate --model model.safetensors --misclassified wrong.png")]
    Evaluate(evaluate::EvaluateArgs),
    /// Class probabilities of test images (--index) or of pictures (PNG, JPEG, ...), as in the book
    #[command(
        after_help = "Examples:\n  gpu-mnist predict --model model.safetensors --index 0\n  gpu-mnist predict --model model.safetensors digit.png photo.pgm"
    )]
    Predict(predict::PredictArgs),
    /// Measure speed and memory on each device (matmul GFLOP/s, step time, samples/s, round trips)
    #[command(
        after_help = "Examples:\n  gpu-mnist bench\n  gpu-mnist bench --device cpu --baseline \"python3 ../shared/bench/torch_mnist.py --device cpu\""
    )]
    Bench(bench::BenchArgs),
    /// List the GPU adapters wgpu can see, with their type and key limits
    #[command(after_help = "Example:\n  WGPU_BACKEND=vulkan gpu-mnist devices")]
    Devices,
}

/// Parse the command line, keeping clap's matches so that a subcommand can tell which flags the
/// user gave (e.g. --resume warns about the ones it can not honour).
pub fn parse() -> std::result::Result<(Cli, clap::ArgMatches), clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().try_get_matches()?;
    let cli = Cli::from_arg_matches(&matches)?;
    Ok((cli, matches))
}

/// Print a usage error as one line (clap's message, its possible values, without the tips and
/// usage block) and exit with 2; help and version go to stdout with 0.
pub fn exit_with_usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    eprintln!("{} (see --help)", line.join(" "));
    std::process::exit(2);
}

pub fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    // A GPU_MNIST_* value that can not be taken is a usage error before anything is downloaded
    // or read.
    gpu_mnist::settings::check()?;
    match cli.command {
        Command::Train(args) => train::run(args, matches.subcommand_matches("train").unwrap_or(matches)),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Devices => devices::run(),
    }
}

/// Where the data comes from (shared by train, evaluate and predict).
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// mnist: handwritten digits; fashion: Zalando's Fashion-MNIST (clothes, shoes, bags); kmnist:
    /// Kuzushiji-MNIST (cursive hiragana). Each downloads into its own cache folder [default: the
    /// model's dataset for evaluate and predict, else mnist]
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetFlag>,
    /// Folder holding the dataset's four IDX files (.gz or raw) [default: $GPU_MNIST_DATA (or
    /// $GPU_MNIST_FASHION_DATA, $GPU_MNIST_KMNIST_DATA), then the cache]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Never download; fail with a message saying which files to put where
    #[arg(long)]
    pub offline: bool,
    /// Evaluate on the first N test images only
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = parse_positive)]
    pub test_limit: Option<usize>,
}

/// `--dataset`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFlag {
    Mnist,
    Fashion,
    Kmnist,
}

impl From<DatasetFlag> for DatasetKind {
    fn from(f: DatasetFlag) -> Self {
        match f {
            DatasetFlag::Mnist => DatasetKind::Mnist,
            DatasetFlag::Fashion => DatasetKind::Fashion,
            DatasetFlag::Kmnist => DatasetKind::Kmnist,
        }
    }
}

impl DataArgs {
    /// The dataset to use with the model in `path`, which says it was trained on `trained_on`
    /// (`None`: it does not say). A different `--dataset` is refused: the model's classes would
    /// be read as another dataset's.
    pub fn dataset_for_model(&self, path: &std::path::Path, trained_on: Option<DatasetKind>) -> Result<DatasetKind> {
        let asked = self.dataset.map(DatasetKind::from);
        match (asked, trained_on) {
            (Some(a), Some(t)) if a != t => Err(gpu_mnist::Error::usage(
                "--dataset",
                format!(
                    "{} was trained on {t}, not {a}; leave out --dataset to use {t}",
                    path.display()
                ),
            )),
            (a, t) => Ok(t.or(a).unwrap_or_default()),
        }
    }

    /// The folder holding `kind`'s files (downloaded into the cache when needed and allowed).
    pub fn folder(&self, kind: DatasetKind, show_progress: bool) -> Result<PathBuf> {
        let (dir, _) =
            gpu_mnist::data::locate::resolve_data_dir(kind, self.data.as_deref(), self.offline, show_progress)?;
        Ok(dir)
    }
}

/// Which device runs the math (shared by train and evaluate).
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// auto: a hardware GPU if there is one, else the CPU; gpu: the best wgpu adapter (software
    /// ones count); cpu: the fast CPU path; reference: the plain-loop CPU reference
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceFlag,
    /// Pick the wgpu adapter whose name contains TEXT (see `gpu-mnist devices`)
    #[arg(long, value_name = "TEXT")]
    pub adapter: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFlag {
    Auto,
    Gpu,
    Cpu,
    Reference,
}

impl From<DeviceFlag> for DeviceChoice {
    fn from(f: DeviceFlag) -> Self {
        match f {
            DeviceFlag::Auto => DeviceChoice::Auto,
            DeviceFlag::Gpu => DeviceChoice::Gpu,
            DeviceFlag::Cpu => DeviceChoice::Cpu,
            DeviceFlag::Reference => DeviceChoice::Reference,
        }
    }
}

/// A whole number of at least 1.
pub fn parse_positive(text: &str) -> std::result::Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(v) => Ok(v),
        Err(_) => Err("must be a whole number of at least 1".to_string()),
    }
}

/// A batch size: 1 to 65536.
pub fn parse_batch(text: &str) -> std::result::Result<usize, String> {
    parse_up_to(text, 65_536)
}

/// A whole number from 1 to `max`.
pub fn parse_up_to(text: &str, max: usize) -> std::result::Result<usize, String> {
    match parse_positive(text)? {
        v if v > max => Err(format!("must be at most {max}")),
        v => Ok(v),
    }
}

/// Steps per chunk: 1 to 4096.
pub fn parse_chunk(text: &str) -> std::result::Result<usize, String> {
    parse_up_to(text, 4096)
}

/// A learning rate: finite and greater than 0.
pub fn parse_lr(text: &str) -> std::result::Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("must be a finite number greater than 0".to_string()),
        Err(_) => Err("must be a number such as 0.001".to_string()),
    }
}

/// The model to train or measure: the book's MLP or convnet, or any stack of layers.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// mlp: the book's chapter 2 model, Dense(512, relu) -> Dense(10) (other widths with
    /// --hidden); convnet: its chapter 8 model, conv:32:3,pool:2,conv:64:3,pool:2,conv:128:3,
    /// flatten,dense:10; fast: the fastest published MNIST recipe, 99 % in one epoch:
    /// conv:24:5,pool:2,conv:32:3,pool:2,flatten,dense:256,dense:10 trained with Adam (lr 0.01,
    /// betas 0.7 0.9), a one-cycle schedule, batch 128, 1 epoch; accurate: 99.5 % in 10 epochs,
    /// the same network with batch normalisation after each pool and dropout,
    /// conv:24:5,pool:2,batchnorm,conv:32:3,pool:2,batchnorm,flatten,dense:256,dropout:0.25,dense:10,
    /// with --augment shift:2,rotate:10,scale:0.1, Adam and one-cycle as fast (flags override
    /// each part)
    #[arg(long, value_enum, default_value = "mlp")]
    pub model: ModelFlag,
    /// Hidden layer widths of the mlp, comma-separated (ReLU after each) [default: 512]
    #[arg(long, value_name = "W[,W...]", value_parser = parse_hidden)]
    pub hidden: Option<Hidden>,
    /// Any stack of layers instead of --model: comma-separated conv:FILTERS:KERNEL[:same]
    /// (ReLU, stride 1, 'valid' padding unless :same), pool:SIZE (max pooling), flatten,
    /// dense:UNITS (ReLU but the last, which must be dense:10), batchnorm (per channel, Keras's
    /// momentum 0.99 and epsilon 1e-3; the ReLU of the layer before moves after it), dropout:RATE
    /// (in training only), e.g. conv:32:3,pool:2,conv:64:3,pool:2,conv:128:3,flatten,dense:10
    #[arg(long, value_name = "SPEC", conflicts_with_all = ["hidden", "model"])]
    pub layers: Option<String>,
}

/// `--model`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFlag {
    Mlp,
    Convnet,
    Fast,
    Accurate,
}

impl ModelArgs {
    /// The model the flags name.
    pub fn spec(&self) -> gpu_mnist::Result<ModelSpec> {
        if let Some(layers) = &self.layers {
            return ModelSpec::parse("--layers", layers);
        }
        match (self.model, &self.hidden) {
            (ModelFlag::Mlp, hidden) => Ok(ModelSpec::mnist(hidden.as_ref().map_or(&[512][..], |h| &h.0))),
            (ModelFlag::Convnet, None) => Ok(ModelSpec::convnet()),
            (ModelFlag::Fast, None) => Ok(gpu_mnist::recipe::fast()?.spec),
            (ModelFlag::Accurate, None) => Ok(gpu_mnist::recipe::accurate()?.spec),
            (_, Some(_)) => Err(gpu_mnist::Error::usage(
                "--hidden",
                "sets the mlp's widths; the other models' layers are fixed (use --layers for another stack)",
            )),
        }
    }

    /// The recipe `--model` names beyond its layers (`--model fast`, `accurate`), unless --layers
    /// is given.
    pub fn recipe(&self) -> gpu_mnist::Result<Option<gpu_mnist::recipe::Recipe>> {
        match (self.model, &self.layers) {
            (ModelFlag::Fast, None) => Ok(Some(gpu_mnist::recipe::fast()?)),
            (ModelFlag::Accurate, None) => Ok(Some(gpu_mnist::recipe::accurate()?)),
            _ => Ok(None),
        }
    }
}

/// The batch size a model trains with unless --batch-size says: its recipe's, else the book's,
/// 128 for an MLP, 64 for a convnet.
pub fn default_batch(spec: &ModelSpec, recipe: Option<&gpu_mnist::recipe::Recipe>) -> usize {
    match recipe {
        Some(r) => r.batch_size,
        None if spec.is_mlp() => 128,
        None => 64,
    }
}

/// Hidden layer widths, parsed from one flag value.
#[derive(Debug, Clone)]
pub struct Hidden(pub Vec<usize>);

/// Hidden layer widths: a comma-separated list of whole numbers >= 1, e.g. "512" or "512,256".
pub fn parse_hidden(text: &str) -> std::result::Result<Hidden, String> {
    let widths: Vec<usize> = text
        .split(',')
        .map(|w| parse_positive(w).map_err(|_| format!("'{}' is not a layer width of at least 1", w.trim())))
        .collect::<std::result::Result<_, _>>()?;
    if let Some(w) = widths.iter().find(|&&w| w > 1 << 20) {
        return Err(format!("layer width {w} is larger than 1048576"));
    }
    Ok(Hidden(widths))
}

/// Fail before any work if an output file could not be written where asked.
pub fn check_output_path(flag: &str, path: &std::path::Path) -> gpu_mnist::Result<()> {
    use gpu_mnist::Error;
    if let Some(why) = gpu_mnist::checkpoint::not_writable(path) {
        return Err(Error::usage(flag, format!("{} {why}", path.display())));
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !parent.is_dir() {
        return Err(Error::usage(
            flag,
            format!("folder {} does not exist", parent.display()),
        ));
    }
    Ok(())
}

/// Load a model file or checkpoint; a file that carries no SHA-256 of its tensor data (written by
/// another tool) loads with a one-line note on stderr, since damage to it can not be detected.
pub fn load_model(
    path: &std::path::Path,
    layers: Option<&str>,
) -> gpu_mnist::Result<gpu_mnist::checkpoint::Checkpoint> {
    let given = layers.map(|l| ModelSpec::parse("--layers", l)).transpose()?;
    let ck = gpu_mnist::checkpoint::load_as(path, given.as_ref())?;
    if ck.data_hash == gpu_mnist::checkpoint::DataHash::Absent {
        eprintln!(
            "note: {} carries no SHA-256 of its tensor data (metadata {}), so damage to it can not be detected",
            path.display(),
            gpu_mnist::checkpoint::DATA_HASH_KEY
        );
    }
    Ok(ck)
}
