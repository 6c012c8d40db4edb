//! Model files written by other tools, without gpu-mnist's metadata: Keras's layout under
//! gpu-mnist's names (`dense_0.kernel` (in, out), `conv2d_0.kernel` (kh, kw, in, out)), or a
//! PyTorch `state_dict` (`fc1.weight` (out, in), `conv1.weight` (out, in, kh, kw), flattened
//! channels first) converted to Keras's layout.
//!
//! Contract: `read` returns the model and its parameters in gpu-mnist's names and layouts, or one
//! sentence saying what is missing. A stack of dense layers is read from its shapes alone (784
//! in, 10 out, each layer's outputs the next one's inputs, ReLU between them as in every
//! gpu-mnist model); anything with convolutions needs the layers stated (`--layers`). PyTorch's
//! tensors are matched to the stated layers in order by shape, and among tensors of the same
//! shape in their names' natural order (`fc2` before `fc10`). Every tensor must be used.

use std::collections::BTreeMap;

use safetensors::SafeTensors;

use crate::model::{HostTensor, Layer, ModelSpec};

type Reason = String;

/// A tensor of the file: its shape and values.
struct Raw {
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Every tensor of the file as f32 values, by name.
fn tensors(file: &SafeTensors<'_>) -> Result<BTreeMap<String, Raw>, Reason> {
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let data = super::f32_values(&name, &view)?;
        out.insert(
            name,
            Raw {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// The model and parameters of a file without gpu-mnist's metadata; `given` is the user's
/// `--layers`, if any.
pub(super) fn read(file: &SafeTensors<'_>, given: Option<&ModelSpec>) -> Result<(ModelSpec, Vec<HostTensor>), Reason> {
    let mut raw = tensors(file)?;
    let keras = raw.keys().any(|k| k.ends_with(".kernel"));
    let torch = raw.keys().any(|k| k.ends_with(".weight"));
    let spec = match (given, keras, torch) {
        (Some(spec), ..) => spec.clone(),
        (None, true, false) => dense_stack(&raw, "kernel", |s| (s[0], s[1]))?,
        (None, false, true) => dense_stack(&raw, "weight", |s| (s[1], s[0]))?,
        _ => return Err(unknown_layout()),
    };
    let params = match (keras, torch) {
        (true, false) => keras_params(&mut raw, &spec)?,
        (false, true) => torch_params(&mut raw, &spec)?,
        _ => return Err(unknown_layout()),
    };
    if let Some(extra) = raw.keys().next() {
        return Err(format!(
            "tensor {extra} is not a parameter of {} (a file without gpu-mnist's metadata holds only \
             the layers' weights and biases)",
            spec.describe()
        ));
    }
    Ok((spec, params))
}

fn unknown_layout() -> Reason {
    "has no gpu-mnist metadata, and its tensors are named neither as Keras's layers in gpu-mnist \
     (dense_0.kernel, dense_0.bias, ...) nor as a PyTorch state_dict (fc1.weight, fc1.bias, ...): \
     save it under one of those names (and give --layers for anything but a stack of dense layers)"
        .to_string()
}

/// A dense stack read from its weights' shapes: (inputs, outputs) of each 2-D tensor whose name
/// ends with `.{weight}`, chained from 784 inputs to 10 outputs.
fn dense_stack(
    raw: &BTreeMap<String, Raw>,
    weight: &str,
    in_out: fn(&[usize]) -> (usize, usize),
) -> Result<ModelSpec, Reason> {
    let weights: Vec<(&String, &Raw)> = raw.iter().filter(|(k, _)| k.ends_with(&format!(".{weight}"))).collect();
    if let Some((name, w)) = weights.iter().find(|(_, w)| w.shape.len() != 2) {
        return Err(format!(
            "tensor {name} of shape {:?} is not a dense layer's: give the model's layers with --layers",
            w.shape
        ));
    }
    let (mut width, mut hidden) = (crate::data::IMAGE_PIXELS, Vec::new());
    for _ in 0..weights.len() {
        let next: Vec<_> = weights.iter().filter(|(_, w)| in_out(&w.shape).0 == width).collect();
        let [(_, w)] = next.as_slice() else {
            return Err(format!(
                "its dense layers do not chain from 784 inputs to 10 outputs ({} weights take {width} \
                 inputs): give the model's layers with --layers",
                next.len()
            ));
        };
        width = in_out(&w.shape).1;
        hidden.push(width);
    }
    match hidden.pop() {
        Some(crate::data::CLASSES) => Ok(ModelSpec::mnist(&hidden)),
        _ => Err(format!(
            "its dense layers end with {width} outputs, an MNIST model with 10"
        )),
    }
}

/// Keras's layout under gpu-mnist's names: each parameter as it is.
fn keras_params(raw: &mut BTreeMap<String, Raw>, spec: &ModelSpec) -> Result<Vec<HostTensor>, Reason> {
    let shapes = spec.param_shapes().map_err(|e| e.to_string())?;
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let t = raw.remove(&name).ok_or_else(|| format!("tensor {name} is missing"))?;
            if t.shape != shape {
                return Err(format!(
                    "tensor {name} has shape {:?}, the layers need {shape:?}",
                    t.shape
                ));
            }
            Ok(HostTensor {
                name,
                shape,
                data: t.data,
            })
        })
        .collect()
}

/// A name's natural sort key: runs of digits compare as numbers (`fc2` before `fc10`).
fn natural(name: &str) -> Vec<(String, u64)> {
    let mut key = Vec::new();
    let mut text = String::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut n = c.to_digit(10).map_or(0, u64::from);
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(u64::from(d));
                chars.next();
            }
            key.push((std::mem::take(&mut text), n));
        } else {
            text.push(c);
        }
    }
    key.push((text, u64::MAX));
    key
}

/// A PyTorch state_dict: each layer takes the first unused `.weight` (natural name order) of its
/// PyTorch shape, and the `.bias` beside it, converted to Keras's layout.
fn torch_params(raw: &mut BTreeMap<String, Raw>, spec: &ModelSpec) -> Result<Vec<HostTensor>, Reason> {
    let layers = spec.resolve().map_err(|e| e.to_string())?;
    let names = spec.param_shapes().map_err(|e| e.to_string())?;
    let mut weights: Vec<String> = raw.keys().filter(|k| k.ends_with(".weight")).cloned().collect();
    weights.sort_by_key(|k| natural(k));
    let mut params = Vec::new();
    // The image before a flatten (h, w, channels): PyTorch flattens it channels first.
    let mut image: Option<(usize, usize, usize)> = None;
    for layer in layers {
        // PyTorch's shape of the weight, its conversion, and the image the layer leaves.
        let (torch_shape, image_out): (Vec<usize>, _) = match layer {
            Layer::Pool { shape } => {
                image = Some((shape.oh(), shape.ow(), shape.ch));
                continue;
            }
            Layer::Conv {
                geometry: g, filters, ..
            } => (vec![filters, g.in_ch, g.kh, g.kw], Some((g.oh(), g.ow(), filters))),
            Layer::Dense { inputs, outputs, .. } => (vec![outputs, inputs], None),
            Layer::Dropout { .. } => continue,
            Layer::BatchNorm { .. } => {
                return Err("batch normalisation layers are not read from PyTorch files".to_string())
            }
        };
        let (kernel_name, _) = &names[params.len()];
        let at = weights
            .iter()
            .position(|k| raw[k].shape == torch_shape)
            .ok_or_else(|| format!("no tensor of shape {torch_shape:?} (PyTorch's layout) for {kernel_name}"))?;
        let weight_name = weights.remove(at);
        let bias_name = format!("{}.bias", weight_name.trim_end_matches(".weight"));
        let w = raw
            .remove(&weight_name)
            .ok_or_else(|| format!("tensor {weight_name} is missing"))?;
        let b = raw
            .remove(&bias_name)
            .ok_or_else(|| format!("tensor {bias_name} is missing"))?;
        let kernel = match torch_shape[..] {
            [filters, in_ch, kh, kw] => conv_kernel(&w.data, filters, in_ch, kh, kw),
            [outputs, inputs] => dense_kernel(&w.data, inputs, outputs, image),
            _ => return Err(format!("tensor {weight_name} has shape {:?}", w.shape)),
        };
        let (kernel_shape, bias_shape) = (names[params.len()].1.clone(), names[params.len() + 1].1.clone());
        if b.shape != bias_shape {
            return Err(format!(
                "tensor {bias_name} has shape {:?}, {kernel_name} needs {bias_shape:?}",
                b.shape
            ));
        }
        params.push(HostTensor {
            name: kernel_name.clone(),
            shape: kernel_shape,
            data: kernel,
        });
        let bias = names[params.len()].0.clone();
        params.push(HostTensor {
            name: bias,
            shape: bias_shape,
            data: b.data,
        });
        image = image_out;
    }
    Ok(params)
}

/// PyTorch's conv weight (out, in, kh, kw) as Keras's (kh, kw, in, out).
fn conv_kernel(w: &[f32], out: usize, inp: usize, kh: usize, kw: usize) -> Vec<f32> {
    let mut k = vec![0.0; w.len()];
    for o in 0..out {
        for c in 0..inp {
            for y in 0..kh {
                for x in 0..kw {
                    k[((y * kw + x) * inp + c) * out + o] = w[((o * inp + c) * kh + y) * kw + x];
                }
            }
        }
    }
    k
}

/// PyTorch's dense weight (out, in) as Keras's (in, out); after a flatten of an image (h, w, c),
/// PyTorch's input index is channels first (c, y, x), gpu-mnist's channels last (y, x, c).
fn dense_kernel(w: &[f32], inputs: usize, outputs: usize, image: Option<(usize, usize, usize)>) -> Vec<f32> {
    let torch_input = |i: usize| match image {
        Some((h, wd, c)) if h * wd * c == inputs => {
            let (y, x, ch) = (i / (wd * c), i / c % wd, i % c);
            (ch * h + y) * wd + x
        }
        _ => i,
    };
    let mut k = vec![0.0; w.len()];
    for i in 0..inputs {
        let t = torch_input(i);
        for o in 0..outputs {
            k[i * outputs + o] = w[o * inputs + t];
        }
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_and_layout_conversions() {
        let mut names = vec!["fc10.weight", "fc2.weight", "conv1.weight"];
        names.sort_by_key(|k| natural(k));
        assert_eq!(names, ["conv1.weight", "fc2.weight", "fc10.weight"]);
        // (out 2, in 3, 1x2) -> (1, 2, in 3, out 2)
        let w: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let k = conv_kernel(&w, 2, 3, 1, 2);
        // Keras (y 0, x 1, c 2, o 1) is PyTorch (o 1, c 2, y 0, x 1) = 1*6 + 2*2 + 1 = 11.
        assert_eq!(k[(3 + 2) * 2 + 1], 11.0);
        // A flatten of (h 1, w 2, c 2): gpu-mnist input 1 is (x 0, c 1), PyTorch's index 2.
        let w: Vec<f32> = (0..4).map(|v| v as f32).collect(); // (out 1, in 4)
        assert_eq!(dense_kernel(&w, 4, 1, Some((1, 2, 2))), [0.0, 2.0, 1.0, 3.0]);
    }
}
