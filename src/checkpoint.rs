//! Model files and training checkpoints in the safetensors format, written atomically.
//!
//! Contract: `save` writes every parameter as an F32 tensor named like `dense_0.kernel` (shape
//! (in, out), the Keras layout) and `dense_0.bias`, with metadata `format = gpu-mnist`,
//! `layers = "784,512,10"` (the widths), `activation = relu` and `dataset = mnist` (or `fashion`,
//! `kmnist`: what it was trained on); through a temporary file in the
//! same folder, fsync, then rename, so an interrupted save never leaves a half-written model.
//! A training checkpoint adds the optimizer's moments of each parameter, the second as
//! `optimizer.dense_0.kernel.velocity` (RMSprop, Adam) and the first as
//! `optimizer.dense_0.kernel.momentum` (SGD with momentum, Adam), with `--early-stop` the best
//! epoch's weights as `best.dense_0.kernel`, and its training state as JSON
//! in metadata key `training_state` (settings, position, the optimizer's step count). `load` validates the header
//! (length, JSON, dtypes, shapes, offsets, finiteness) before it trusts any of it.

use std::io::Write;
use std::path::Path;

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::data::DatasetKind;
use crate::error::{Error, Result};
use crate::model::{HostTensor, ModelSpec, OptimizerState};

/// The largest header we accept (a real one is under 1 KB).
const MAX_HEADER: u64 = 1 << 20;
/// The largest file we read: the parameters, both moments, the best epoch's weights and header of
/// the largest model allowed.
const MAX_FILE: u64 = 4 * 4 * crate::model::MAX_PARAMS as u64 + MAX_HEADER + 8;

/// Why `path` can not be written as a regular file (a device, FIFO, socket or folder is never
/// replaced), or None where it can: it does not exist, or it is a regular file, or a link to one.
pub fn not_writable(path: &Path) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        // A link to nothing is not replaced either: where would the file go?
        Err(_) if path.symlink_metadata().is_ok() => return Some("is a symbolic link to nothing".to_string()),
        Err(_) => return None,
    };
    let kind = meta.file_type();
    if kind.is_file() {
        return None;
    }
    if kind.is_dir() {
        return Some("is a directory".to_string());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let what = if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Some(format!("is {what}; gpu-mnist writes regular files only"));
    }
    #[allow(unreachable_code)]
    Some("is not a regular file; gpu-mnist writes regular files only".to_string())
}

/// Write `data` to `path` atomically: temporary file beside it, fsync, rename. A symbolic link is
/// followed (the file it points to is replaced, the link stays); anything but a regular file is
/// refused, untouched (`not_writable`).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(why) = not_writable(path) {
        return Err(Error::bad_file(path, why));
    }
    let target = match path.symlink_metadata() {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?,
        _ => path.to_path_buf(),
    };
    let path = target.as_path();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if path.is_dir() {
        return Err(Error::bad_file(path, "is a directory"));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        // Say it was the write that failed (the folder may have gone since the flags were checked).
        let why = if !dir.is_dir() {
            format!("could not be written: its folder {} does not exist", dir.display())
        } else if e.kind() == std::io::ErrorKind::PermissionDenied {
            format!("could not be written: permission denied in {}", dir.display())
        } else {
            format!("could not be written in {}: {e}", dir.display())
        };
        return Err(Error::bad_file(path, why));
    }
    Ok(())
}

/// A model, and for a training checkpoint also its optimizer state and training state.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub spec: ModelSpec,
    /// `dense_{i}.kernel` (in, out) and `dense_{i}.bias` (out), in layer order.
    pub params: Vec<HostTensor>,
    /// The optimizer's moments, each one per parameter, stored as `optimizer.{name}.velocity` and
    /// `optimizer.{name}.momentum`; empty for a plain model file.
    pub optimizer: OptimizerState,
    /// With `--early-stop`, the weights of the best epoch so far, stored as `best.{name}`; empty
    /// otherwise.
    pub best: Vec<HostTensor>,
    /// The training state of a `--checkpoint-dir` checkpoint (JSON in metadata key `training_state`).
    pub state: Option<Value>,
    /// The dataset it was trained on (metadata key `dataset`); `None` for a file that does not
    /// say (written by another tool, or before the key existed).
    pub dataset: Option<DatasetKind>,
    /// Whether a loaded file carried the SHA-256 of its tensor data (and it matched: a file whose
    /// data does not match is refused). Files written here always carry it.
    pub data_hash: DataHash,
}

/// What `from_bytes` found of the tensor data's SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataHash {
    /// Stored in the file (or about to be, for a checkpoint not yet written), and matched.
    Matched,
    /// Not in the file: written by another tool, so damage to it can not be detected.
    Absent,
}

/// The metadata key of the dataset a model was trained on (`DatasetKind::key`).
pub const DATASET_KEY: &str = "dataset";

/// The metadata key of the tensor data's SHA-256 (lowercase hex of the bytes after the header).
pub const DATA_HASH_KEY: &str = "tensor_data_sha256";

impl Checkpoint {
    /// A plain model file: parameters only, trained on `dataset`.
    pub fn model(spec: &ModelSpec, params: Vec<HostTensor>, dataset: DatasetKind) -> Self {
        Checkpoint {
            spec: spec.clone(),
            params,
            optimizer: OptimizerState::default(),
            best: Vec::new(),
            state: None,
            dataset: Some(dataset),
            data_hash: DataHash::Matched,
        }
    }
}

const OPTIMIZER_PREFIX: &str = "optimizer.";
const BEST_PREFIX: &str = "best.";
const VELOCITY_SUFFIX: &str = ".velocity";
const MOMENTUM_SUFFIX: &str = ".momentum";

/// The model that metadata `layers` names: an MLP's widths ("784,512,10") or a --layers spec.
fn spec_of(layers: &str) -> std::result::Result<ModelSpec, String> {
    let widths: std::result::Result<Vec<usize>, _> = layers.split(',').map(|w| w.trim().parse::<usize>()).collect();
    let Ok(widths) = widths else {
        return ModelSpec::parse("layers", layers).map_err(|e| format!("metadata {e}"));
    };
    if widths.len() < 2 || widths.iter().any(|&w| w == 0 || w > 1 << 24) {
        return bad(format!("metadata layers {layers:?} does not describe a network"));
    }
    let (inputs, classes) = (widths[0], widths[widths.len() - 1]);
    if inputs != crate::data::IMAGE_PIXELS || classes != crate::data::CLASSES {
        let model = widths.iter().map(|w| w.to_string()).collect::<Vec<_>>().join("-");
        return bad(format!("the model is {model}, an MNIST model is 784-...-10"));
    }
    Ok(ModelSpec::mnist(&widths[1..widths.len() - 1]))
}

/// Serialise to safetensors bytes (through the `safetensors` crate, which orders the tensors by
/// name), with a SHA-256 of the tensor data in metadata key `tensor_data_sha256`. Fails only on a
/// tensor whose values do not fill its shape.
pub fn to_bytes(ck: &Checkpoint) -> Result<Vec<u8>> {
    let spec = &ck.spec;
    // An MLP by its widths ("784,512,10"), any other model by its --layers spec.
    let layers = match spec.is_mlp() {
        true => spec.describe().replace('-', ","),
        false => spec.to_layers_arg(),
    };
    let moment = |suffix: &'static str| {
        move |v: &HostTensor| HostTensor {
            name: format!("{OPTIMIZER_PREFIX}{}{suffix}", v.name),
            ..v.clone()
        }
    };
    let velocities = ck.optimizer.velocities.iter().map(moment(VELOCITY_SUFFIX));
    let momenta = ck.optimizer.momenta.iter().map(moment(MOMENTUM_SUFFIX));
    let best = ck.best.iter().map(|t| HostTensor {
        name: format!("{BEST_PREFIX}{}", t.name),
        ..t.clone()
    });
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = ck
        .params
        .iter()
        .cloned()
        .chain(velocities)
        .chain(momenta)
        .chain(best)
        .map(|t| (t.name, t.shape, t.data.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    // The order `serialize` writes them in (one dtype: by name), so that the hash below is the
    // hash of the file's data section.
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (_, _, bytes) in &tensors {
        hasher.update(bytes);
    }
    let mut meta = HashMap::from([
        ("format".to_string(), "gpu-mnist".to_string()),
        ("layers".to_string(), layers),
        ("activation".to_string(), "relu".to_string()),
        (DATA_HASH_KEY.to_string(), hex(&hasher.finalize())),
    ]);
    if let Some(state) = &ck.state {
        meta.insert("training_state".to_string(), state.to_string());
    }
    if let Some(dataset) = ck.dataset {
        meta.insert(DATASET_KEY.to_string(), dataset.key().to_string());
    }
    let unwritable = |e: safetensors::SafeTensorError| Error::shape("writing a model file", e.to_string());
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| Ok((name.as_str(), TensorView::new(Dtype::F32, shape.clone(), bytes)?)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(unwritable)?;
    let bytes = safetensors::serialize(views, Some(meta)).map_err(unwritable)?;
    with_sorted_header(bytes).map_err(|why| Error::shape("writing a model file", why))
}

/// `bytes`, a safetensors file, with every key of its header in sorted order, so that the same
/// model gives the same file byte for byte (the crate writes the metadata in a hash map's order,
/// which changes from run to run). The header is padded with spaces to a multiple of 8 bytes as
/// the crate pads it; the tensor data, and so its offsets, are unchanged.
fn with_sorted_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let bad = |e: &dyn std::fmt::Display| format!("the header just serialised does not read back ({e})");
    let len = bytes
        .first_chunk::<8>()
        .map(|n| u64::from_le_bytes(*n) as usize)
        .filter(|&n| n <= bytes.len() - 8)
        .ok_or_else(|| bad(&"no header length"))?;
    // Two levels, both sorted: the tensors (and `__metadata__`), then each one's fields.
    let header: BTreeMap<String, BTreeMap<String, Value>> =
        serde_json::from_slice(&bytes[8..8 + len]).map_err(|e| bad(&e))?;
    let mut text = serde_json::to_vec(&header).map_err(|e| bad(&e))?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - len);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

/// Lowercase hex of a digest.
fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Save atomically.
pub fn save(path: &Path, ck: &Checkpoint) -> Result<()> {
    write_atomic(path, &to_bytes(ck)?)
}

/// Load and validate a file written by `save` (or any safetensors file of the same layout).
pub fn load(path: &Path) -> Result<Checkpoint> {
    load_as(path, None)
}

/// `load`, also of a file without gpu-mnist's metadata (`foreign`): its layers from its shapes
/// (a dense stack) or from `layers` (the user's --layers), which a file with metadata must match.
pub fn load_as(path: &Path, layers: Option<&ModelSpec>) -> Result<Checkpoint> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::bad_file(
            path,
            "is a directory, expected a .safetensors model file",
        ));
    }
    if !meta.is_file() {
        return Err(Error::bad_file(path, "is not a regular file"));
    }
    if meta.len() > MAX_FILE {
        return Err(Error::bad_file(
            path,
            format!("is {} bytes, larger than any gpu-mnist model", meta.len()),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes_as(&bytes, layers).map_err(|reason| Error::bad_file(path, reason))
}

fn bad<T>(reason: impl Into<String>) -> std::result::Result<T, String> {
    Err(reason.into())
}

/// The values of an F32 tensor, all finite.
fn f32_values(name: &str, view: &TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    if view.dtype() != Dtype::F32 {
        return bad(format!("tensor {name} has dtype {}, expected F32", view.dtype()));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return bad(format!("tensor {name} holds NaN or infinite values"));
    }
    Ok(values)
}

/// One F32 tensor of the given name and shape, with finite values.
fn tensor(file: &SafeTensors<'_>, name: &str, shape: &[usize]) -> std::result::Result<HostTensor, String> {
    let view = file.tensor(name).map_err(|_| format!("tensor {name} is missing"))?;
    if view.dtype() == Dtype::F32 && view.shape() != shape {
        return bad(format!(
            "tensor {name} has shape {:?}, the layers need {shape:?}",
            view.shape()
        ));
    }
    Ok(HostTensor {
        name: name.to_string(),
        shape: shape.to_vec(),
        data: f32_values(name, &view)?,
    })
}

/// Parse safetensors bytes (through the `safetensors` crate), then check what a gpu-mnist model
/// needs: its metadata, every tensor's name, dtype and shape, finite values, no extra tensors,
/// and the SHA-256 of the tensor data where the file carries one. Errors are plain one-line
/// reasons (the caller names the file; names and text from the file may hold line breaks).
pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Checkpoint, String> {
    from_bytes_as(bytes, None)
}

/// `from_bytes`, also of a file without gpu-mnist's metadata (see `load_as`).
pub fn from_bytes_as(bytes: &[u8], layers: Option<&ModelSpec>) -> std::result::Result<Checkpoint, String> {
    parse(bytes, layers).map_err(|why| why.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn parse(bytes: &[u8], given: Option<&ModelSpec>) -> std::result::Result<Checkpoint, String> {
    if bytes.len() < 8 {
        return bad(format!("too short for a safetensors file ({} bytes)", bytes.len()));
    }
    let head_len = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| "bad header length")?);
    if head_len > MAX_HEADER || head_len > (bytes.len() - 8) as u64 {
        return bad(format!(
            "not a safetensors model: header length {head_len} does not fit the {}-byte file",
            bytes.len()
        ));
    }
    let (head_len, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| format!("not a valid safetensors file ({e})"))?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| format!("not a valid safetensors file ({e})"))?;
    let empty = HashMap::new();
    let meta = header.metadata().as_ref().unwrap_or(&empty);
    let Some(layers) = meta.get("layers") else {
        // Written by another tool: Keras's or PyTorch's layout, read by `foreign`.
        let (spec, params) = foreign::read(&file, given)?;
        return Ok(Checkpoint {
            spec,
            params,
            optimizer: OptimizerState::default(),
            best: Vec::new(),
            state: None,
            dataset: None,
            data_hash: DataHash::Absent,
        });
    };
    match meta.get("activation").map(String::as_str) {
        None | Some("relu") => {}
        Some(other) => return bad(format!("its activation is {other:?}; gpu-mnist models use relu")),
    }
    let spec = spec_of(layers)?;
    if let Some(given) = given.filter(|g| **g != spec) {
        return bad(format!(
            "its metadata says the model is {}, not the {} given",
            spec.describe(),
            given.describe()
        ));
    }
    let dataset = match meta.get(DATASET_KEY) {
        Some(key) => Some(DatasetKind::from_key(key).ok_or_else(|| {
            let known: Vec<&str> = DatasetKind::ALL.iter().map(|d| d.key()).collect();
            format!("metadata {DATASET_KEY} {key:?} is not one of {}", known.join(", "))
        })?),
        None => None,
    };
    let mut params = Vec::new();
    let mut optimizer = OptimizerState::default();
    let has = |suffix: &str| {
        file.names()
            .iter()
            .any(|k| k.starts_with(OPTIMIZER_PREFIX) && k.ends_with(suffix))
    };
    let (has_velocities, has_momenta) = (has(VELOCITY_SUFFIX), has(MOMENTUM_SUFFIX));
    let has_best = file.names().iter().any(|k| k.starts_with(BEST_PREFIX));
    let mut best = Vec::new();
    let shapes = spec.param_shapes().map_err(|e| e.to_string())?;
    for (name, shape) in shapes {
        params.push(tensor(&file, &name, &shape)?);
        if has_best {
            let mut b = tensor(&file, &format!("{BEST_PREFIX}{name}"), &shape)?;
            b.name = name.clone();
            best.push(b);
        }
        for (wanted, suffix, into) in [
            (has_velocities, VELOCITY_SUFFIX, &mut optimizer.velocities),
            (has_momenta, MOMENTUM_SUFFIX, &mut optimizer.momenta),
        ] {
            if wanted {
                let mut v = tensor(&file, &format!("{OPTIMIZER_PREFIX}{name}{suffix}"), &shape)?;
                v.name = name.clone();
                into.push(v);
            }
        }
    }
    let expected = params.len() + optimizer.velocities.len() + optimizer.momenta.len() + best.len();
    if file.len() != expected {
        return bad(format!(
            "holds {} tensors, a {} model has {expected}",
            file.len(),
            spec.describe()
        ));
    }
    let data_hash = match meta.get(DATA_HASH_KEY) {
        Some(stored) => {
            let actual = hex(&Sha256::digest(&bytes[8 + head_len..]));
            if !stored.eq_ignore_ascii_case(&actual) {
                return bad(format!(
                    "is damaged: its tensor data does not match the SHA-256 stored in it ({DATA_HASH_KEY})"
                ));
            }
            DataHash::Matched
        }
        None => DataHash::Absent,
    };
    let state = match meta.get("training_state") {
        Some(text) => Some(serde_json::from_str(text).map_err(|e| format!("its training state is not JSON ({e})"))?),
        None => None,
    };
    Ok(Checkpoint {
        spec,
        params,
        optimizer,
        best,
        state,
        dataset,
        data_hash,
    })
}

mod foreign;
#[cfg(test)]
mod tests;
