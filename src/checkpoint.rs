//! Model files and training checkpoints in the safetensors format, written atomically.
//!
//! Contract: `save` writes every parameter as an F32 tensor named like `dense_0.kernel` (shape
//! (in, out), the Keras layout) and `dense_0.bias`, with metadata `format = gpu-mnist`,
//! `layers = "784,512,10"` (the widths) and `activation = relu`; through a temporary file in the
//! same folder, fsync, then rename, so an interrupted save never leaves a half-written model.
//! A training checkpoint adds RMSprop's velocities as `optimizer.dense_0.kernel.velocity` ... and
//! its training state as JSON in metadata key `training_state`. `load` validates the header
//! (length, JSON, dtypes, shapes, offsets, finiteness) before it trusts any of it.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::model::{HostTensor, ModelSpec};

/// The largest header we accept (a real one is under 1 KB).
const MAX_HEADER: u64 = 1 << 20;
/// The largest file we read: the parameters, velocities and header of the largest model allowed.
const MAX_FILE: u64 = 2 * 4 * crate::model::MAX_PARAMS as u64 + MAX_HEADER + 8;

/// Write `data` to `path` atomically: temporary file beside it, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
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
    /// RMSprop's velocities, one per parameter, stored as `optimizer.{name}.velocity`; empty for a
    /// plain model file.
    pub velocities: Vec<HostTensor>,
    /// The training state of a `--checkpoint-dir` checkpoint (JSON in metadata key `training_state`).
    pub state: Option<Value>,
}

impl Checkpoint {
    /// A plain model file: parameters only.
    pub fn model(spec: &ModelSpec, params: Vec<HostTensor>) -> Self {
        Checkpoint {
            spec: spec.clone(),
            params,
            velocities: Vec::new(),
            state: None,
        }
    }
}

const VELOCITY_PREFIX: &str = "optimizer.";
const VELOCITY_SUFFIX: &str = ".velocity";

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

/// Serialise to safetensors bytes.
pub fn to_bytes(ck: &Checkpoint) -> Vec<u8> {
    let spec = &ck.spec;
    let mut header = Map::new();
    // An MLP by its widths ("784,512,10"), any other model by its --layers spec.
    let layers = match spec.is_mlp() {
        true => spec.describe().replace('-', ","),
        false => spec.to_layers_arg(),
    };
    let mut meta = json!({"format": "gpu-mnist", "layers": layers, "activation": "relu"});
    if let Some(state) = &ck.state {
        meta["training_state"] = Value::String(state.to_string());
    }
    header.insert("__metadata__".to_string(), meta);
    let velocities: Vec<HostTensor> = ck
        .velocities
        .iter()
        .map(|v| HostTensor {
            name: format!("{VELOCITY_PREFIX}{}{VELOCITY_SUFFIX}", v.name),
            ..v.clone()
        })
        .collect();
    let tensors: Vec<&HostTensor> = ck.params.iter().chain(&velocities).collect();
    let mut offset = 0usize;
    for p in &tensors {
        let bytes = p.data.len() * 4;
        header.insert(
            p.name.clone(),
            json!({"dtype": "F32", "shape": p.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for p in &tensors {
        for v in &p.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Save atomically.
pub fn save(path: &Path, ck: &Checkpoint) -> Result<()> {
    write_atomic(path, &to_bytes(ck))
}

/// Load and validate a file written by `save` (or any safetensors file of the same layout).
pub fn load(path: &Path) -> Result<Checkpoint> {
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
    from_bytes(&bytes).map_err(|reason| Error::bad_file(path, reason))
}

fn bad<T>(reason: impl Into<String>) -> std::result::Result<T, String> {
    Err(reason.into())
}

/// One F32 tensor of the given name and shape, validated against the data section.
fn tensor(
    tensors: &Map<String, Value>,
    data: &[u8],
    name: &str,
    shape: &[usize],
) -> std::result::Result<HostTensor, String> {
    let info = tensors.get(name).ok_or_else(|| format!("tensor {name} is missing"))?;
    let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
    if dtype != "F32" {
        return bad(format!("tensor {name} has dtype {dtype}, expected F32"));
    }
    let got_shape: Option<Vec<usize>> = info
        .get("shape")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect());
    if got_shape.as_deref() != Some(shape) {
        return bad(format!(
            "tensor {name} has shape {got_shape:?}, the layers need {shape:?}"
        ));
    }
    let offsets: Option<Vec<u64>> = info
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|v| v.as_u64()).collect());
    let (begin, end) = match offsets.as_deref() {
        Some(&[b, e]) if b <= e && e <= data.len() as u64 => (b as usize, e as usize),
        _ => {
            return bad(format!(
                "tensor {name} has data offsets {offsets:?} outside the {}-byte data",
                data.len()
            ))
        }
    };
    let len: usize = shape.iter().product();
    if end - begin != len * 4 {
        return bad(format!(
            "tensor {name} holds {} bytes, its shape needs {}",
            end - begin,
            len * 4
        ));
    }
    let values: Vec<f32> = data[begin..end]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return bad(format!("tensor {name} holds NaN or infinite values"));
    }
    Ok(HostTensor {
        name: name.to_string(),
        shape: shape.to_vec(),
        data: values,
    })
}

/// Parse safetensors bytes. Errors are plain reasons (the caller names the file).
pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Checkpoint, String> {
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
    let head = &bytes[8..8 + head_len as usize];
    let data = &bytes[8 + head_len as usize..];
    let mut header: Map<String, Value> = match serde_json::from_slice(head) {
        Ok(Value::Object(m)) => m,
        _ => return bad("not a safetensors model: the header is not a JSON object"),
    };
    let meta = header.remove("__metadata__").unwrap_or(Value::Null);
    let layers = meta
        .get("layers")
        .and_then(|l| l.as_str())
        .ok_or("no `layers` in the metadata: not a gpu-mnist model")?;
    match meta.get("activation").and_then(|a| a.as_str()) {
        None | Some("relu") => {}
        Some(other) => return bad(format!("its activation is {other:?}; gpu-mnist models use relu")),
    }
    let spec = spec_of(layers)?;
    let mut params = Vec::new();
    let mut velocities = Vec::new();
    let has_velocities = header.keys().any(|k| k.starts_with(VELOCITY_PREFIX));
    let shapes = spec.param_shapes().map_err(|e| e.to_string())?;
    for (name, shape) in shapes {
        params.push(tensor(&header, data, &name, &shape)?);
        if has_velocities {
            let mut v = tensor(
                &header,
                data,
                &format!("{VELOCITY_PREFIX}{name}{VELOCITY_SUFFIX}"),
                &shape,
            )?;
            v.name = name;
            velocities.push(v);
        }
    }
    let expected = params.len() + velocities.len();
    if header.len() != expected {
        return bad(format!(
            "holds {} tensors, a {} model has {expected}",
            header.len(),
            spec.describe()
        ));
    }
    let state = match meta.get("training_state").and_then(|s| s.as_str()) {
        Some(text) => Some(serde_json::from_str(text).map_err(|e| format!("its training state is not JSON ({e})"))?),
        None => None,
    };
    Ok(Checkpoint {
        spec,
        params,
        velocities,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::glorot_init;

    /// A write whose folder is gone says so, naming the file, and leaves nothing behind.
    #[test]
    fn a_write_into_a_vanished_folder_says_the_write_failed() {
        let base = std::env::temp_dir().join(format!("gpu-mnist-vanished-{}", std::process::id()));
        let path = base.join("gone").join("m.safetensors");
        let err = write_atomic(&path, b"x")
            .expect_err("the folder does not exist")
            .to_string();
        assert!(
            err.contains("m.safetensors") && err.contains("could not be written"),
            "{err}"
        );
        assert!(err.contains("does not exist"), "{err}");
        assert!(!base.exists());
    }

    #[test]
    fn round_trip_and_rejections() -> std::result::Result<(), String> {
        let spec = ModelSpec::mnist(&[5]);
        let params = glorot_init(&spec, 3);
        let ck = Checkpoint::model(&spec, params.clone());
        let bytes = to_bytes(&ck);
        assert_eq!(from_bytes(&bytes)?, ck);
        let full = Checkpoint {
            velocities: glorot_init(&spec, 4),
            state: Some(json!({"epochs_done": 2})),
            ..ck
        };
        assert_eq!(from_bytes(&to_bytes(&full))?, full);
        assert!(from_bytes(&bytes[..bytes.len() - 4]).unwrap_err().contains("outside"));
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(from_bytes(&huge).unwrap_err().contains("header length"));
        Ok(())
    }
}
