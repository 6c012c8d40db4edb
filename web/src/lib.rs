//! gpu-mnist in a web page: the functions `web/worker.js` calls, over the same library as the
//! native binary (layer graph, training loop, WGSL kernels, IDX reader, checksums, model files).
//!
//! Contract: nothing here implements training, a kernel, a file format or a check of its own;
//! each export wires a library call to JavaScript values. The module runs in a dedicated worker
//! (one instance, one thread), which the page ends and starts afresh whenever the module traps (a
//! panic, an out-of-memory abort): its state here, the checked data set, the latest trained or
//! loaded model and a stop flag, is therefore never trusted after a trap. `train` runs on WebGPU
//! when the browser offers an adapter that meets the kernels' limits, and otherwise on the CPU
//! path compiled to wasm (one thread; with WebAssembly SIMD where the page loaded that build),
//! saying why. Training yields to the event loop after every chunk of steps
//! (`yielding::Yielding`), so that Stop and predictions reach the worker on either device.
//! Errors reach JavaScript as `Error`s whose message is one sentence for the page.

mod yielding;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use gpu_mnist::backend::cpu::{CpuBackend, CpuSettings};
use gpu_mnist::backend::wgpu::{GpuSettings, WgpuBackend};
use gpu_mnist::backend::Backend;
use gpu_mnist::checkpoint::{self, Checkpoint};
use gpu_mnist::data::{Dataset, DatasetKind, Mnist, IMAGE_PIXELS};
use gpu_mnist::image::{to_mnist, Gray};
use gpu_mnist::model::{glorot_init, Batch, Graph, ModelSpec};
use gpu_mnist::optim::{Optimizer, OptimizerKind};
use gpu_mnist::train::{fit, ChunkProgress, EpochProgress, EpochStart, FitData, Observer, Position, TrainConfig};
use serde_json::{json, Value};
use wasm_bindgen::prelude::*;

use yielding::Yielding;

thread_local! {
    /// The four MNIST files, checked (`load_data`).
    static DATA: RefCell<Option<Mnist>> = const { RefCell::new(None) };
    /// The latest trained or loaded model.
    static MODEL: RefCell<Option<Checkpoint>> = const { RefCell::new(None) };
    /// Set by `stop`, read between chunks.
    static STOP: Cell<bool> = const { Cell::new(false) };
    /// Whether a `train` call is running.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Runs when the module loads: a panic (a bug) is reported on the console and leaves its message
/// in the global `gpuMnistPanic`, where the worker reads it when the trap that follows (panics
/// abort on wasm32) reaches JavaScript; the worker is then replaced.
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic");
        let message = match info.location() {
            Some(at) => format!("{what}, at {}:{}", at.file(), at.line()),
            None => what.to_string(),
        };
        let _ = js_sys::Reflect::set(
            &js_sys::global(),
            &JsValue::from_str("gpuMnistPanic"),
            &JsValue::from_str(&message),
        );
        web_console_error(&format!("gpu-mnist: internal error: {info}"));
    }));
}

/// `console.error(message)`, through the global object (a page or a worker).
fn web_console_error(message: &str) {
    let console = js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("console"));
    let error = console
        .as_ref()
        .ok()
        .and_then(|c| js_sys::Reflect::get(c, &JsValue::from_str("error")).ok())
        .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
    if let (Ok(console), Some(error)) = (console, error) {
        let _ = error.call1(&console, &JsValue::from_str(message));
    }
}

/// Steps between two read-backs of the statistics (and two chances for the page to redraw).
const CHUNK_STEPS: usize = 20;

fn js_error(message: impl std::fmt::Display) -> JsError {
    JsError::new(&message.to_string())
}

/// Check the four MNIST files (train images, train labels, test images, test labels; gzip or
/// raw) with the native reader's checks: size and SHA-256 of the content, then the IDX
/// structure. Returns a one-line summary; keeps the data for `train`.
#[wasm_bindgen]
pub fn load_data(
    train_images: &[u8],
    train_labels: &[u8],
    test_images: &[u8],
    test_labels: &[u8],
) -> Result<String, JsError> {
    let files = [train_images, train_labels, test_images, test_labels];
    let mnist = Mnist::from_bytes(DatasetKind::Mnist, files).map_err(js_error)?;
    let summary = format!(
        "MNIST checked: {} training and {} test images",
        mnist.train.len(),
        mnist.test.len()
    );
    DATA.with_borrow_mut(|d| *d = Some(mnist));
    Ok(summary)
}

/// The most bytes each of the four MNIST files may have, in `load_data`'s order (its size
/// decompressed: a gzip of it is smaller), so that the page refuses a larger file before reading
/// it.
#[wasm_bindgen]
pub fn data_file_limits() -> Vec<f64> {
    DatasetKind::Mnist
        .files()
        .iter()
        .map(|f| f.download_limit() as f64)
        .collect()
}

/// The largest model file the page reads: 256 MiB (64 million parameters, far more than any
/// model the page trains, a sixteenth of the WebAssembly memory it is copied into).
#[wasm_bindgen]
pub fn model_file_limit() -> f64 {
    (256u64 << 20) as f64
}

/// Ask a running `train` to stop after its current chunk of steps.
#[wasm_bindgen]
pub fn stop() {
    STOP.set(true);
}

/// Whether a model is ready for `predict` and `save_model`.
#[wasm_bindgen]
pub fn has_model() -> bool {
    MODEL.with_borrow(|m| m.is_some())
}

/// The options `train` takes, as JSON: every field optional.
struct TrainOptions {
    model: String,
    epochs: usize,
    batch_size: Option<usize>,
    lr: Option<f32>,
    seed: u64,
    train_limit: Option<usize>,
    test_limit: Option<usize>,
    /// "auto" (WebGPU, else the CPU), "webgpu" or "cpu".
    device: String,
    /// The browser's words for its WebGPU adapter (vendor, architecture, description), read by
    /// the page: wgpu passes on only the description, which browsers mostly leave empty.
    adapter_info: String,
    /// A failure to provoke after the first chunk ("panic" or "out-of-memory"): the page's test
    /// of its recovery from a trap inside the module.
    fault: Option<Fault>,
}

/// A deliberate trap inside the module, for the page's test.
#[derive(Clone, Copy)]
enum Fault {
    /// A Rust panic (with a message, which the panic hook records).
    Panic,
    /// Allocate until WebAssembly's memory cannot grow: an abort that no panic hook sees.
    OutOfMemory,
}

impl Fault {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "panic" => Ok(Fault::Panic),
            "out-of-memory" => Ok(Fault::OutOfMemory),
            other => Err(format!("unknown fault '{other}' (panic or out-of-memory)")),
        }
    }

    fn provoke(self) -> ! {
        match self {
            Fault::Panic => panic!("a panic the page's test asked for"),
            Fault::OutOfMemory => {
                // Blocks that are never written take no time to allocate; black_box keeps them.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(std::hint::black_box(Vec::with_capacity(64 << 20)));
                }
            }
        }
    }
}

impl TrainOptions {
    fn parse(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("options are not JSON: {e}"))?;
        let count = |key: &str| -> Result<Option<usize>, String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => match x.as_u64().and_then(|n| usize::try_from(n).ok()) {
                    Some(n) if n >= 1 => Ok(Some(n)),
                    _ => Err(format!("{key} must be a whole number of at least 1, not {x}")),
                },
            }
        };
        let lr = match v.get("lr") {
            None | Some(Value::Null) => None,
            Some(x) => match x.as_f64() {
                Some(lr) if lr > 0.0 && lr.is_finite() => Some(lr as f32),
                _ => return Err(format!("the learning rate must be a positive number, not {x}")),
            },
        };
        let text_of = |key: &str, default: &str| v.get(key).and_then(Value::as_str).unwrap_or(default).to_string();
        Ok(TrainOptions {
            model: text_of("model", "mlp"),
            epochs: count("epochs")?.unwrap_or(5),
            batch_size: count("batch_size")?,
            lr,
            seed: v.get("seed").and_then(Value::as_u64).unwrap_or(0),
            train_limit: count("train_limit")?,
            test_limit: count("test_limit")?,
            device: text_of("device", "auto"),
            adapter_info: text_of("adapter_info", ""),
            fault: v.get("fault").and_then(Value::as_str).map(Fault::parse).transpose()?,
        })
    }

    fn spec(&self) -> Result<ModelSpec, String> {
        match self.model.as_str() {
            "mlp" => Ok(ModelSpec::mnist(&[512])),
            "convnet" => Ok(ModelSpec::convnet()),
            "fast" | "accurate" => Ok(self.recipe()?.map_or_else(ModelSpec::convnet, |r| r.spec)),
            other => ModelSpec::parse("model", other).map_err(|e| e.to_string()),
        }
    }

    /// The recipe of the model chosen ("fast": the fastest published MNIST recipe, as
    /// `gpu-mnist train --model fast`), whose optimizer, schedule and batch the run takes
    /// unless the options give a rate or a batch.
    fn recipe(&self) -> Result<Option<gpu_mnist::recipe::Recipe>, String> {
        match self.model.as_str() {
            "fast" => gpu_mnist::recipe::fast().map(Some).map_err(|e| e.to_string()),
            "accurate" => gpu_mnist::recipe::accurate().map(Some).map_err(|e| e.to_string()),
            _ => Ok(None),
        }
    }

    /// The optimizer of a run of `steps` steps: the recipe's with its schedule, else RMSprop.
    fn optimizer(&self, steps: usize) -> Result<Optimizer, String> {
        let Some(recipe) = self.recipe()? else {
            return Optimizer::new(OptimizerKind::RmsProp, self.lr).map_err(|e| e.to_string());
        };
        let recipe_optimizer = recipe.optimizer_over(steps).map_err(|e| e.to_string())?;
        let optimizer = Optimizer {
            lr: self.lr.unwrap_or(recipe_optimizer.lr),
            ..recipe_optimizer
        };
        optimizer.validate().map_err(|e| e.to_string())?;
        Ok(optimizer)
    }
}

/// The most WebAssembly memory a module can have: 4 GiB (wasm32's 65,536 pages of 64 KiB).
const WASM_MEMORY_BYTES: u64 = 1 << 32;

/// About how many bytes a run of `spec` in batches of `batch` allocates at its peak (f32 each):
/// seven copies of every parameter (the backend's four packed parts: values, gradients, two
/// moments; the initial values, the packed copy written to the backend, and one to spare for the
/// read-back), every layer's output and its gradient, and each convolution's patch matrix and its
/// gradient.
fn run_bytes(spec: &ModelSpec, batch: usize) -> Result<u64, String> {
    let layers = spec.resolve().map_err(|e| e.to_string())?;
    let params = spec.param_count() as u64;
    let outputs: u64 = std::iter::once(IMAGE_PIXELS as u64)
        .chain(layers.iter().map(|l| l.out_len() as u64))
        .sum();
    let patches: u64 = layers
        .iter()
        .map(|l| match l {
            gpu_mnist::model::Layer::Conv { geometry: g, .. } => (g.oh() * g.ow() * g.patch()) as u64,
            _ => 0,
        })
        .sum();
    let batch = batch as u64;
    Ok(4 * (7 * params + 2 * outputs * batch + 2 * patches * batch))
}

/// Refuse, in one sentence, a run that needs more memory than this module can still grow to
/// (the native limits are far above wasm32's 4 GiB), before anything is allocated: the run would
/// otherwise abort inside the module.
fn check_wasm_memory(spec: &ModelSpec, batch: usize) -> Result<(), String> {
    let need = run_bytes(spec, batch)?;
    let used = memory_bytes();
    let left = WASM_MEMORY_BYTES.saturating_sub(used);
    if need > left {
        return Err(format!(
            "Training {} in batches of {batch} needs about {} MiB, more than the {} MiB this page's WebAssembly memory can still grow to (4 GiB in all): choose a smaller model or batch.",
            spec.describe(),
            need >> 20,
            left >> 20
        ));
    }
    Ok(())
}

/// The WebAssembly memory in use now, in bytes (0 off wasm32).
fn memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) as u64 * 65_536
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

/// Whether this build of the module uses WebAssembly SIMD (`web/build.sh` builds the module twice,
/// with and without it, and the page loads the one the browser runs).
const SIMD128: bool = cfg!(target_feature = "simd128");

/// "simd128" or "plain": which of the two builds this module is.
#[wasm_bindgen]
pub fn build() -> String {
    if SIMD128 { "simd128" } else { "plain" }.to_string()
}

/// The device a run trains on, and why when it is not the one asked for.
struct Opened {
    backend: Box<dyn Backend>,
    kind: &'static str,
    adapter: String,
    note: Option<String>,
}

async fn open_device(device: &str, adapter_info: &str) -> Result<Opened, String> {
    let cpu = |note: Option<String>| Opened {
        backend: Box::new(CpuBackend::fast(&CpuSettings::default())),
        kind: "cpu",
        adapter: format!("cpu (wasm{}, 1 thread)", if SIMD128 { " simd128" } else { "" }),
        note,
    };
    match device {
        "cpu" => Ok(cpu(None)),
        "webgpu" | "auto" => match WgpuBackend::open_async(None, false, &GpuSettings::default()).await {
            Ok(be) => {
                let adapter = be.adapter().name.clone();
                Ok(Opened {
                    backend: Box::new(be),
                    kind: "webgpu",
                    adapter: match (adapter.is_empty(), adapter_info.trim()) {
                        (false, _) => adapter,
                        (true, "") => "WebGPU adapter (the browser does not name it)".to_string(),
                        (true, info) => info.to_string(),
                    },
                    note: None,
                })
            }
            Err(e) if device == "auto" => Ok(cpu(Some(format!(
                "WebGPU is not available here ({}), so this page trains on the CPU instead (one thread).",
                e.to_string()
                    .trim_start_matches("GPU: ")
                    .trim_end_matches("; use --device cpu")
            )))),
            Err(e) => Err(e.to_string()),
        },
        other => Err(format!("unknown device '{other}' (auto, webgpu or cpu)")),
    }
}

/// Reports each chunk and epoch to the page's callback, and stops when asked.
struct PageObserver<'a> {
    on_event: &'a js_sys::Function,
    started: f64,
    /// Provoked after the first chunk (the page's test).
    fault: Option<Fault>,
}

impl PageObserver<'_> {
    fn send(&self, event: Value) {
        let _ = self
            .on_event
            .call1(&JsValue::NULL, &JsValue::from_str(&event.to_string()));
    }
}

impl Observer for PageObserver<'_> {
    fn epoch_started(&mut self, start: &EpochStart) {
        self.send(json!({"type": "epoch_start", "epoch": start.epoch + 1, "steps": start.steps}));
    }
    fn chunk_done(&mut self, p: &ChunkProgress) {
        self.send(json!({
            "type": "chunk", "epoch": p.epoch, "steps_done": p.steps_done, "steps_total": p.steps_total,
            "examples_done": p.examples_done, "loss": p.loss, "accuracy": p.accuracy,
            "seconds": (js_sys::Date::now() - self.started) / 1000.0,
        }));
        if let Some(fault) = self.fault {
            fault.provoke();
        }
    }
    fn epoch_done(
        &mut self,
        at: &Position,
        _: Option<gpu_mnist::train::HostState<'_>>,
        _: gpu_mnist::backend::Counters,
    ) -> gpu_mnist::Result<()> {
        if let Some(r) = at.history.last() {
            self.send(json!({
                "type": "epoch", "epoch": r.epoch, "loss": r.train_loss, "accuracy": r.train_accuracy,
                "seconds": r.seconds,
            }));
        }
        Ok(())
    }
    fn should_stop(&self) -> bool {
        STOP.get()
    }
    fn interrupted(
        &mut self,
        at: &Position,
        stopped: EpochProgress,
        _: Option<gpu_mnist::train::HostState<'_>>,
    ) -> gpu_mnist::Error {
        gpu_mnist::Error::Interrupted(format!(
            "Stopped at epoch {}, step {}; the previous model (if any) is kept.",
            at.epoch + 1,
            stopped.steps_done
        ))
    }
}

/// Train a model with `options` (JSON, see `TrainOptions`) on the data of `load_data`, calling
/// `on_event` with a JSON string after every chunk and epoch (`type`: "device", "epoch_start",
/// "chunk", "epoch"). Resolves to the run's result line (JSON: test_accuracy, test_loss, epochs,
/// images, seconds, adapter, device); the trained model becomes the page's model.
#[wasm_bindgen]
pub async fn train(options: String, on_event: js_sys::Function) -> Result<String, JsError> {
    if BUSY.get() {
        return Err(js_error("Training is already running; press Stop first."));
    }
    BUSY.set(true);
    STOP.set(false);
    let result = train_inner(&options, &on_event).await;
    BUSY.set(false);
    result.map_err(js_error)
}

async fn train_inner(options: &str, on_event: &js_sys::Function) -> Result<String, String> {
    let opts = TrainOptions::parse(options)?;
    let spec = opts.spec()?;
    let mnist = DATA
        .with_borrow(|d| d.clone())
        .ok_or("No data yet: load the four MNIST files first.")?;
    let train = mnist.train.first(opts.train_limit.unwrap_or(usize::MAX));
    let test = mnist.test.first(opts.test_limit.unwrap_or(usize::MAX));
    let recipe_batch = opts.recipe()?.map(|r| r.batch_size);
    let batch_size = opts
        .batch_size
        .or(recipe_batch)
        .unwrap_or(if spec.is_mlp() { 128 } else { 64 });
    // A model or batch too large is refused before anything is allocated, as on the command line,
    // and one too large for what the WebAssembly memory can still grow to.
    spec.check_size(batch_size).map_err(|e| e.to_string())?;
    check_wasm_memory(&spec, batch_size)?;
    let optimizer = opts.optimizer(opts.epochs * train.len().div_ceil(batch_size))?;
    let cfg = TrainConfig {
        spec: spec.clone(),
        epochs: opts.epochs,
        batch_size,
        optimizer,
        seed: opts.seed,
        chunk_steps: CHUNK_STEPS,
        early_stop: None,
        augment: opts.recipe()?.and_then(|r| r.augment),
    };
    let opened = open_device(&opts.device, &opts.adapter_info).await?;
    let event = json!({"type": "device", "device": opened.kind, "adapter": opened.adapter, "note": opened.note});
    let _ = on_event.call1(&JsValue::NULL, &JsValue::from_str(&event.to_string()));
    let mut be = Yielding::new(opened.backend);
    let mut at = Position {
        epoch: 0,
        partial: EpochProgress::default(),
        history: Vec::new(),
        params: glorot_init(&spec, opts.seed),
        optimizer: None,
        best: None,
    };
    let started = js_sys::Date::now();
    let mut observer = PageObserver {
        on_event,
        started,
        fault: opts.fault,
    };
    let data = FitData {
        train: &train,
        val: None,
        test: &test,
    };
    let (report, params) = fit(&mut be, data, &cfg, &mut at, false, &mut observer)
        .await
        .map_err(|e| e.to_string())?;
    let seconds = (js_sys::Date::now() - started) / 1000.0;
    MODEL.with_borrow_mut(|m| *m = Some(Checkpoint::model(&spec, params, DatasetKind::Mnist)));
    Ok(json!({
        "test_accuracy": report.accuracy, "test_loss": report.loss, "epochs": cfg.epochs,
        "images": train.len(), "seconds": seconds, "adapter": opened.adapter, "device": opened.kind,
    })
    .to_string())
}

/// The page model's class probabilities for a drawing: `gray` is `width` x `height` grey levels
/// (0 = black), converted as `gpu-mnist predict` converts a picture (ink found, cropped, scaled
/// to 20x20, centred by its centre of mass in 28x28). Empty when the drawing has no ink yet.
#[wasm_bindgen]
pub fn predict(gray: &[u8], width: usize, height: usize) -> Result<Vec<f32>, JsError> {
    if width.checked_mul(height) != Some(gray.len()) {
        return Err(js_error(format!(
            "{} grey levels for a {width}x{height} picture",
            gray.len()
        )));
    }
    let img = Gray {
        width,
        height,
        pixels: gray.to_vec(),
    };
    let Ok(pixels) = to_mnist(&img) else {
        return Ok(Vec::new());
    };
    // A copy, so that no borrow of the page's model is held while the prediction runs.
    let model = MODEL
        .with_borrow(|m| m.clone())
        .ok_or_else(|| js_error("No model yet: train or load one."))?;
    predict_pixels(&model, pixels).map_err(js_error)
}

/// Run the prediction plan on the CPU path for one MNIST image.
fn predict_pixels(model: &Checkpoint, pixels: Vec<u8>) -> Result<Vec<f32>, String> {
    debug_assert_eq!(pixels.len(), IMAGE_PIXELS);
    let mut be = CpuBackend::fast(&CpuSettings::default());
    let mut graph = Graph::new(&mut be, &model.spec, 1).map_err(|e| e.to_string())?;
    graph.set_params(&mut be, &model.params).map_err(|e| e.to_string())?;
    let one = Dataset::new(pixels, vec![0]).map_err(|e| e.to_string())?;
    let ds = be.upload_dataset(&one).map_err(|e| e.to_string())?;
    let predictions = now(gpu_mnist::train::predict(
        &mut be,
        &mut graph,
        gpu_mnist::train::EvalSet { ds, len: 1 },
    ))?
    .map_err(|e| e.to_string())?;
    Ok(predictions.into_iter().next().map(|p| p.probs).unwrap_or_default())
}

/// The value of a future that is ready at once (the CPU backend's read-backs are).
fn now<T>(future: impl Future<Output = T>) -> Result<T, String> {
    let mut future = pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Ok(v),
        Poll::Pending => Err("the CPU path unexpectedly waited".to_string()),
    }
}

/// The page's model as a safetensors file, the same bytes `gpu-mnist train --save` writes.
#[wasm_bindgen]
pub fn save_model() -> Result<Vec<u8>, JsError> {
    // A copy, so that no borrow of the page's model is held while the file is written.
    let model = MODEL
        .with_borrow(|m| m.clone())
        .ok_or_else(|| js_error("No model yet: train or load one."))?;
    checkpoint::to_bytes(&model).map_err(js_error)
}

/// Make a model file (`--save`, or a checkpoint of `--checkpoint-dir`) the page's model, after
/// the native reader's checks. Returns a one-line description.
#[wasm_bindgen]
pub fn load_model(bytes: &[u8], file_name: &str) -> Result<String, JsError> {
    if bytes.len() as f64 > model_file_limit() {
        return Err(js_error(format!(
            "{file_name}: {} bytes, more than the {} MiB model files this page reads",
            bytes.len(),
            model_file_limit() as u64 >> 20
        )));
    }
    let ck = checkpoint::from_bytes(bytes).map_err(|why| js_error(format!("{file_name}: {why}")))?;
    // The page draws and names digits: a model of another dataset would name them wrongly.
    if let Some(other) = ck.dataset.filter(|&d| d != DatasetKind::Mnist) {
        return Err(js_error(format!(
            "{file_name}: was trained on {other}; this page trains and reads MNIST digits"
        )));
    }
    let unchecked = match ck.data_hash {
        checkpoint::DataHash::Absent => {
            " (it carries no SHA-256 of its tensor data, so damage to it can not be detected)"
        }
        checkpoint::DataHash::Matched => "",
    };
    let description = format!("Loaded {file_name}: model {}{unchecked}", ck.spec.describe());
    let model = Checkpoint::model(&ck.spec, ck.params, DatasetKind::Mnist);
    MODEL.with_borrow_mut(|m| *m = Some(model));
    Ok(description)
}

/// The kernels on this browser's WebGPU against the plain-loop CPU reference: whole training
/// steps of small dense models (matmul forward and both backward products, the softmax
/// cross-entropy loss, the optimizer) at awkward shapes, both run from the same weights and
/// images. Resolves to JSON: one entry per case with the largest difference and its tolerance,
/// and `ok` over all; rejects when WebGPU is unavailable.
#[wasm_bindgen]
pub async fn kernel_check() -> Result<String, JsError> {
    let mut gpu = WgpuBackend::open_async(None, false, &GpuSettings::default())
        .await
        .map_err(js_error)?;
    let adapter = gpu.adapter().name.clone();
    // (hidden widths, batch, optimizer, steps): SGD's weights are compared after the steps;
    // RMSprop and Adam divide by the root of tiny squared gradients, so their loss is compared
    // instead.
    let cases = [
        (ModelSpec::mnist(&[37]), 13, OptimizerKind::Sgd, 2),
        (ModelSpec::mnist(&[64]), 128, OptimizerKind::Sgd, 2),
        (ModelSpec::mnist(&[33, 17]), 1, OptimizerKind::Sgd, 3),
        (ModelSpec::mnist(&[50]), 61, OptimizerKind::RmsProp, 3),
        (ModelSpec::mnist(&[40]), 29, OptimizerKind::Adam, 3),
    ];
    compare_with_reference(&mut gpu, &adapter, &cases).await
}

/// The page's CPU path, as this build of the module compiles it (with or without WebAssembly
/// SIMD), against the plain-loop reference: whole training steps of dense models and of
/// convolutional ones with pooling, batch normalisation and dropout, at awkward shapes. The same
/// JSON as `kernel_check`.
#[wasm_bindgen]
pub async fn cpu_check() -> Result<String, JsError> {
    let mut cpu = CpuBackend::fast(&CpuSettings::default());
    let spec = |layers: &str| ModelSpec::parse("layers", layers).map_err(js_error);
    let cases = [
        (ModelSpec::mnist(&[37]), 13, OptimizerKind::Sgd, 2),
        (ModelSpec::mnist(&[33, 17]), 1, OptimizerKind::Sgd, 3),
        (ModelSpec::mnist(&[50]), 61, OptimizerKind::RmsProp, 3),
        (
            spec("conv:7:3,pool:2,conv:5:3,flatten,dense:10")?,
            5,
            OptimizerKind::Sgd,
            2,
        ),
        (spec(gpu_mnist::recipe::FAST_LAYERS)?, 3, OptimizerKind::Adam, 2),
        (
            spec("conv:6:5,pool:2,batchnorm,flatten,dense:19,dropout:0.25,dense:10")?,
            9,
            OptimizerKind::Adam,
            3,
        ),
    ];
    let name = format!("cpu (wasm{})", if SIMD128 { " simd128" } else { "" });
    compare_with_reference(&mut cpu, &name, &cases).await
}

/// Train each case (spec, batch, optimizer, steps) on `be` and on the reference from the same
/// weights and images; SGD's weights are compared after the steps (tolerance 1e-4), the other
/// optimizers' last loss (relative, 1e-3). NaN fails.
async fn compare_with_reference(
    be: &mut dyn Backend,
    name: &str,
    cases: &[(ModelSpec, usize, OptimizerKind, usize)],
) -> Result<String, JsError> {
    let mut results = Vec::new();
    let mut all_ok = true;
    for (spec, batch, kind, steps) in cases {
        let (batch, kind, steps) = (*batch, *kind, *steps);
        let mut reference = CpuBackend::reference();
        let (loss, params) = run_steps(be, spec, batch, kind, steps).await.map_err(js_error)?;
        let (ref_loss, ref_params) = run_steps(&mut reference, spec, batch, kind, steps)
            .await
            .map_err(js_error)?;
        let (what, diff, tolerance) = match kind {
            OptimizerKind::Sgd => {
                let diff = params
                    .iter()
                    .zip(&ref_params)
                    .flat_map(|(g, r)| g.data.iter().zip(&r.data).map(|(a, b)| (a - b).abs()))
                    // NaN-aware: NaN weights on either side fail the check.
                    .fold(
                        0.0f32,
                        |m, d| if m.is_nan() || d.is_nan() { f32::NAN } else { m.max(d) },
                    );
                ("weights", diff as f64, 1e-4)
            }
            _ => ("loss", (loss - ref_loss).abs() / ref_loss.abs().max(1e-6), 1e-3),
        };
        let ok = diff <= tolerance;
        all_ok &= ok;
        results.push(json!({
            "model": spec.describe(), "batch": batch, "optimizer": format!("{kind:?}"), "steps": steps,
            "compared": what, "max_diff": diff, "tolerance": tolerance, "ok": ok,
        }));
    }
    Ok(json!({"adapter": name, "ok": all_ok, "cases": results}).to_string())
}

/// Train `steps` steps of `spec` on synthetic images from fixed weights; the last step's mean
/// loss and the weights after.
async fn run_steps(
    be: &mut dyn Backend,
    spec: &ModelSpec,
    batch: usize,
    kind: OptimizerKind,
    steps: usize,
) -> gpu_mnist::Result<(f64, Vec<gpu_mnist::model::HostTensor>)> {
    let n = batch * steps;
    let images: Vec<u8> = (0..n * IMAGE_PIXELS)
        .map(|i| {
            if (i * 7919) % 5 < 2 {
                ((i * 104_729) % 256) as u8
            } else {
                0
            }
        })
        .collect();
    let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
    let data = Dataset::new(images, labels)?;
    let mut graph = Graph::new(be, spec, batch)?;
    graph.set_params(be, &glorot_init(spec, 7))?;
    let ds = be.upload_dataset(&data)?;
    be.reserve_stats(1)?;
    let optimizer = Optimizer::new(kind, Some(if kind == OptimizerKind::Sgd { 0.1 } else { 1e-3 }))?;
    let mut loss = 0.0;
    for step in 0..steps {
        let at = gpu_mnist::backend::StepAt {
            start: step * batch,
            slot: 0,
            step,
        };
        graph.train_step(be, Batch { ds, rows: batch }, at, &optimizer)?;
        let stats = gpu_mnist::backend::read_stats(be, 1).await?;
        loss = stats[0].loss_sum as f64 / batch as f64;
    }
    Ok((loss, graph.params_to_host(be).await?))
}
