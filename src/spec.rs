//! What a model is: its layers as a user names them (`--layers`, `--model`, `--hidden`), their
//! shapes resolved from the 28x28x1 input, their parameters' names and Glorot-uniform values.
//!
//! Contract: `ModelSpec::parse` refuses a spec with one message naming the item that is wrong and
//! why; `ModelSpec::resolve` turns a valid spec into `Layer`s with every shape known (the input of
//! a layer is the output of the one before; `flatten`, a view in channels-last order, has no layer
//! of its own, and a dense layer flattens an image it is given). ReLU follows every convolution
//! and every dense layer but the last, which gives the logits of the 10 classes; a batch
//! normalisation right after one takes its ReLU (conv -> batch norm -> ReLU, as Keras models are
//! written). Parameters are named as Keras names them (`conv2d_0.kernel` (kh, kw, in, out),
//! `conv2d_0.bias`, `dense_0.kernel` (in, out), `batch_normalization_0.gamma`, ...), in layer
//! order.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::ops::{ConvGeometry, PoolShape};
use crate::data::CLASSES;
use crate::error::{Error, Result};

/// The input images: 28 x 28 pixels, one channel.
pub const INPUT: (usize, usize, usize) = (28, 28, 1);

/// The book's chapter 8 convnet, as a `--layers` spec.
pub const CONVNET: &str = "conv:32:3,pool:2,conv:64:3,pool:2,conv:128:3,flatten,dense:10";

/// A layer as a user names it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerSpec {
    /// `conv:FILTERS:KERNEL[:same]`: Conv2D(filters, kernel x kernel), ReLU, stride 1, 'valid'
    /// padding (or 'same', odd kernels only).
    Conv { filters: usize, kernel: usize, same: bool },
    /// `pool:SIZE`: MaxPool2D(size), stride size.
    Pool { size: usize },
    /// `flatten`: the image as a vector, channels last (Keras's order).
    Flatten,
    /// `dense:UNITS`: Dense(units), ReLU unless it is the last layer.
    Dense { units: usize },
    /// `batchnorm`: BatchNormalization over the channels of an image (or the values of a flat
    /// input), Keras's defaults (momentum 0.99, epsilon 1e-3); the ReLU of the convolution or
    /// dense layer before it moves after it (conv -> batch norm -> ReLU).
    BatchNorm,
    /// `dropout:RATE`: Dropout(rate), 0 < rate < 1: in training each value is zeroed with
    /// probability `rate` and the others scaled by 1 / (1 - rate); nothing in evaluation.
    Dropout { rate: f32 },
}

/// A network: its layers, the last a `dense:10`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub layers: Vec<LayerSpec>,
}

/// A layer with its shapes, per image (a batch scales `images` and the rows). `relu`: a ReLU
/// follows the layer's op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layer {
    Dense {
        inputs: usize,
        outputs: usize,
        relu: bool,
    },
    /// `geometry.images` is 1.
    Conv {
        geometry: ConvGeometry,
        filters: usize,
        relu: bool,
    },
    /// `shape.images` is 1.
    Pool {
        shape: PoolShape,
    },
    /// Per-channel normalisation of `len` values an image with `channels` channels (the last
    /// axis: an image's channels, or every value of a flat input).
    BatchNorm {
        channels: usize,
        len: usize,
        relu: bool,
    },
    /// `len` values an image, each dropped with probability `rate` in training.
    Dropout {
        len: usize,
        rate: f32,
    },
}

impl Layer {
    /// Values a layer's output holds per image.
    pub fn out_len(&self) -> usize {
        match *self {
            Layer::Dense { outputs, .. } => outputs,
            Layer::Conv { geometry, filters, .. } => geometry.oh() * geometry.ow() * filters,
            Layer::Pool { shape } => shape.out_len(),
            Layer::BatchNorm { len, .. } | Layer::Dropout { len, .. } => len,
        }
    }

    /// (kernel shape, bias length) of a convolution or dense layer.
    pub fn params(&self) -> Option<(Vec<usize>, usize)> {
        match *self {
            Layer::Dense { inputs, outputs, .. } => Some((vec![inputs, outputs], outputs)),
            Layer::Conv {
                geometry: g, filters, ..
            } => Some((vec![g.kh, g.kw, g.in_ch, filters], filters)),
            _ => None,
        }
    }

    /// Whether a ReLU follows the layer's op.
    pub fn relu(&self) -> bool {
        match *self {
            Layer::Dense { relu, .. } | Layer::Conv { relu, .. } | Layer::BatchNorm { relu, .. } => relu,
            Layer::Pool { .. } | Layer::Dropout { .. } => false,
        }
    }

    /// The layer's parameters as Keras names their suffixes, with their shapes: a kernel and a
    /// bias, or batch normalisation's scale, offset and moving statistics.
    pub fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        match *self {
            Layer::BatchNorm { channels, .. } => BATCH_NORM_PARAMS.iter().map(|&n| (n, vec![channels])).collect(),
            _ => match self.params() {
                Some((kernel, bias)) => vec![("kernel", kernel), ("bias", vec![bias])],
                None => Vec::new(),
            },
        }
    }

    /// Keras's name of the layer kind, numbered per kind in a model: conv2d, max_pooling,
    /// dense, batch_normalization, dropout.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Layer::Dense { .. } => "dense",
            Layer::Conv { .. } => "conv2d",
            Layer::Pool { .. } => "max_pooling",
            Layer::BatchNorm { .. } => "batch_normalization",
            Layer::Dropout { .. } => "dropout",
        }
    }
}

/// A batch normalisation layer's parameters, in order: the trained scale and offset, then the
/// moving averages that evaluation normalises with (Keras's names).
pub const BATCH_NORM_PARAMS: [&str; 4] = ["gamma", "beta", "moving_mean", "moving_variance"];

/// Every layer's name (`conv2d_0`, `max_pooling_0`, `dense_1`, ...), numbered per kind.
pub fn layer_names(layers: &[Layer]) -> Vec<String> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    layers
        .iter()
        .map(|l| {
            let kind = l.kind_name();
            let n = match counts.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => {
                    *n += 1;
                    *n - 1
                }
                None => {
                    counts.push((kind, 1));
                    0
                }
            };
            format!("{kind}_{n}")
        })
        .collect()
}

/// The most parameters a model may have (values, gradients and velocities: 3 GiB in f32).
pub const MAX_PARAMS: usize = 1 << 28;
/// The most activation values (and as many gradients) a graph may hold for one batch.
pub const MAX_ACTIVATIONS: usize = 1 << 30;
/// The most values of one convolution's patch matrix for a batch (1 GiB of f32).
pub const MAX_PATCH_VALUES: usize = 1 << 28;

impl ModelSpec {
    /// The MLP 784 -> hidden... -> 10 (the book's chapter 2 model with `&[512]`).
    pub fn mnist(hidden: &[usize]) -> Self {
        let mut layers: Vec<LayerSpec> = hidden.iter().map(|&units| LayerSpec::Dense { units }).collect();
        layers.push(LayerSpec::Dense { units: CLASSES });
        ModelSpec { layers }
    }

    /// The book's chapter 8 convnet (`CONVNET`, which a test checks it is).
    pub fn convnet() -> Self {
        let conv = |filters| LayerSpec::Conv {
            filters,
            kernel: 3,
            same: false,
        };
        let pool = LayerSpec::Pool { size: 2 };
        ModelSpec {
            layers: vec![
                conv(32),
                pool,
                conv(64),
                pool,
                conv(128),
                LayerSpec::Flatten,
                LayerSpec::Dense { units: CLASSES },
            ],
        }
    }

    /// A `--layers` spec: comma-separated items (see `LayerSpec`). `flag` names the flag in errors.
    pub fn parse(flag: &str, text: &str) -> Result<Self> {
        let mut layers = Vec::new();
        for (i, item) in text.split(',').map(str::trim).enumerate() {
            let layer =
                parse_item(item).map_err(|why| Error::usage(flag, format!("item {} '{item}': {why}", i + 1)))?;
            layers.push(layer);
        }
        let spec = ModelSpec { layers };
        spec.resolve_for(flag)?;
        Ok(spec)
    }

    /// Whether every layer is dense (an MLP, described by its widths).
    pub fn is_mlp(&self) -> bool {
        self.layers.iter().all(|l| matches!(l, LayerSpec::Dense { .. }))
    }

    /// The hidden widths of an MLP (empty for other models).
    pub fn hidden(&self) -> Vec<usize> {
        match self.is_mlp() {
            true => self.dense_units()[..self.layers.len().saturating_sub(1)].to_vec(),
            false => Vec::new(),
        }
    }

    fn dense_units(&self) -> Vec<usize> {
        self.layers
            .iter()
            .filter_map(|l| match l {
                LayerSpec::Dense { units } => Some(*units),
                _ => None,
            })
            .collect()
    }

    /// The layers with their shapes.
    pub fn resolve(&self) -> Result<Vec<Layer>> {
        self.resolve_for("--layers")
    }

    /// `resolve`, naming `flag` in errors.
    fn resolve_for(&self, flag: &str) -> Result<Vec<Layer>> {
        let bad = |i: usize, why: String| Error::usage(flag, format!("item {} '{}': {why}", i + 1, self.item(i)));
        let (mut h, mut w, mut c) = INPUT;
        let mut flat: Option<usize> = None;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let last = i + 1 == self.layers.len();
            match *layer {
                LayerSpec::Conv { filters, kernel, same } => {
                    if flat.is_some() {
                        return Err(bad(
                            i,
                            "a convolution needs an image, and the input is already flat".into(),
                        ));
                    }
                    let pad = if same { (kernel - 1) / 2 } else { 0 };
                    let geometry = ConvGeometry {
                        images: 1,
                        h,
                        w,
                        in_ch: c,
                        kh: kernel,
                        kw: kernel,
                        pad,
                    };
                    if geometry.oh() == 0 || geometry.ow() == 0 {
                        return Err(bad(
                            i,
                            format!("a {kernel}x{kernel} kernel does not fit a {h}x{w} image"),
                        ));
                    }
                    (h, w, c) = (geometry.oh(), geometry.ow(), filters);
                    out.push(Layer::Conv {
                        geometry,
                        filters,
                        relu: true,
                    });
                }
                LayerSpec::Pool { size } => {
                    if flat.is_some() {
                        return Err(bad(i, "pooling needs an image, and the input is already flat".into()));
                    }
                    if size > h || size > w {
                        return Err(bad(i, format!("a {size}x{size} window does not fit a {h}x{w} image")));
                    }
                    let shape = PoolShape {
                        images: 1,
                        h,
                        w,
                        ch: c,
                        size,
                    };
                    (h, w) = (shape.oh(), shape.ow());
                    out.push(Layer::Pool { shape });
                }
                LayerSpec::Flatten => flat = Some(flat.unwrap_or(h * w * c)),
                LayerSpec::Dense { units } => {
                    let inputs = flat.unwrap_or(h * w * c);
                    out.push(Layer::Dense {
                        inputs,
                        outputs: units,
                        relu: !last,
                    });
                    flat = Some(units);
                }
                LayerSpec::BatchNorm => {
                    // The ReLU of the layer before moves after the normalisation.
                    let relu = match out.last_mut() {
                        Some(Layer::Conv { relu, .. } | Layer::Dense { relu, .. }) => std::mem::take(relu),
                        _ => false,
                    };
                    let (channels, len) = match flat {
                        Some(n) => (n, n),
                        None => (c, h * w * c),
                    };
                    out.push(Layer::BatchNorm { channels, len, relu });
                }
                LayerSpec::Dropout { rate } => out.push(Layer::Dropout {
                    len: flat.unwrap_or(h * w * c),
                    rate,
                }),
            }
            if last && *layer != (LayerSpec::Dense { units: CLASSES }) {
                return Err(bad(
                    i,
                    format!("the last layer must be dense:{CLASSES} (the {CLASSES} classes)"),
                ));
            }
        }
        if self.layers.is_empty() {
            return Err(Error::usage(
                flag,
                format!("no layers; the last must be dense:{CLASSES}"),
            ));
        }
        Ok(out)
    }

    /// Item `i` as the spec writes it.
    fn item(&self, i: usize) -> String {
        match self.layers[i] {
            LayerSpec::Conv { filters, kernel, same } => {
                format!("conv:{filters}:{kernel}{}", if same { ":same" } else { "" })
            }
            LayerSpec::Pool { size } => format!("pool:{size}"),
            LayerSpec::Flatten => "flatten".to_string(),
            LayerSpec::Dense { units } => format!("dense:{units}"),
            LayerSpec::BatchNorm => "batchnorm".to_string(),
            LayerSpec::Dropout { rate } => format!("dropout:{rate}"),
        }
    }

    /// The spec as `--layers` takes it.
    pub fn to_layers_arg(&self) -> String {
        (0..self.layers.len())
            .map(|i| self.item(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One text line: the widths of an MLP ("784-512-10"), else the `--layers` spec.
    pub fn describe(&self) -> String {
        match self.is_mlp() {
            true => std::iter::once(INPUT.0 * INPUT.1 * INPUT.2)
                .chain(self.dense_units())
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("-"),
            false => self.to_layers_arg(),
        }
    }

    /// (name, shape) of every parameter, in order: each layer's kernel, then its bias (batch
    /// normalisation: `BATCH_NORM_PARAMS`), named `layer.suffix` (`layer_names`).
    pub fn param_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let layers = self.resolve()?;
        let mut out = Vec::new();
        for (layer, name) in layers.iter().zip(layer_names(&layers)) {
            for (suffix, shape) in layer.param_shapes() {
                out.push((format!("{name}.{suffix}"), shape));
            }
        }
        Ok(out)
    }

    /// Total number of trainable values.
    pub fn param_count(&self) -> usize {
        self.param_shapes()
            .map(|p| p.iter().map(|(_, s)| s.iter().product::<usize>()).sum())
            .unwrap_or(0)
    }

    /// Refuse a model or batch too large to allocate, before anything is allocated: at most
    /// 2^28 parameters (each also has a gradient and a velocity) and 2^30 activation values.
    pub fn check_size(&self, max_batch: usize) -> Result<()> {
        let layers = self.resolve()?;
        let params = layers
            .iter()
            .flat_map(|l| l.param_shapes())
            .try_fold(0usize, |acc, (_, shape)| {
                shape
                    .iter()
                    .try_fold(1usize, |p, &d| p.checked_mul(d))
                    .and_then(|n| acc.checked_add(n))
            });
        if !matches!(params, Some(n) if n <= MAX_PARAMS) {
            let reason = format!("{} has more than {MAX_PARAMS} parameters", self.describe());
            let flag = if self.is_mlp() { "--hidden" } else { "--layers" };
            return Err(Error::usage(flag, reason));
        }
        // The CPU path's patch matrix of each convolution (a row per output pixel, a column per
        // patch value).
        for layer in &layers {
            if let Layer::Conv { geometry: g, .. } = layer {
                let patches = (g.oh() * g.ow() * g.patch()).checked_mul(max_batch);
                if patches.is_none_or(|n| n > MAX_PATCH_VALUES) {
                    let reason = format!(
                        "a {}x{} convolution over {}x{}x{} images needs more than {MAX_PATCH_VALUES} patch values for a batch of {max_batch}",
                        g.kh, g.kw, g.h, g.w, g.in_ch
                    );
                    return Err(Error::usage("--batch-size", reason));
                }
            }
        }
        let width = layers
            .iter()
            .try_fold(INPUT.0 * INPUT.1 * INPUT.2, |acc, l| acc.checked_add(l.out_len()));
        match width
            .and_then(|w| w.checked_mul(max_batch))
            .and_then(|v| v.checked_mul(2))
        {
            Some(v) if v <= MAX_ACTIVATIONS => Ok(()),
            _ => Err(Error::usage(
                "--batch-size",
                format!(
                    "batches of {max_batch} through {} need more than {MAX_ACTIVATIONS} activation values",
                    self.describe()
                ),
            )),
        }
    }
}

/// One `--layers` item, or why it is not one.
fn parse_item(item: &str) -> std::result::Result<LayerSpec, String> {
    let parts: Vec<&str> = item.split(':').collect();
    let number = |text: &str, what: &str, max: usize| match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{what} '{text}' is not a whole number from 1 to {max}")),
    };
    match parts[..] {
        ["conv", filters, kernel] | ["conv", filters, kernel, "valid"] => Ok(LayerSpec::Conv {
            filters: number(filters, "the filter count", 4096)?,
            kernel: number(kernel, "the kernel size", 28)?,
            same: false,
        }),
        ["conv", filters, kernel, "same"] => {
            let kernel = number(kernel, "the kernel size", 27)?;
            if kernel % 2 == 0 {
                return Err(format!("'same' padding needs an odd kernel, not {kernel}"));
            }
            Ok(LayerSpec::Conv {
                filters: number(filters, "the filter count", 4096)?,
                kernel,
                same: true,
            })
        }
        ["conv", ..] => Err("write conv:FILTERS:KERNEL or conv:FILTERS:KERNEL:same".to_string()),
        ["pool", size] => Ok(LayerSpec::Pool {
            size: number(size, "the window size", 28)?,
        }),
        ["pool", ..] => Err("write pool:SIZE".to_string()),
        ["flatten"] => Ok(LayerSpec::Flatten),
        ["dense", units] => Ok(LayerSpec::Dense {
            units: number(units, "the unit count", 1 << 20)?,
        }),
        ["dense", ..] => Err("write dense:UNITS".to_string()),
        ["batchnorm"] => Ok(LayerSpec::BatchNorm),
        ["batchnorm", ..] => Err("write batchnorm (it takes no values)".to_string()),
        ["dropout", rate] => match rate.parse::<f32>() {
            Ok(r) if r > 0.0 && r < 1.0 => Ok(LayerSpec::Dropout { rate: r }),
            _ => Err(format!(
                "the rate '{rate}' is not a number between 0 and 1 (both excluded)"
            )),
        },
        ["dropout", ..] => Err("write dropout:RATE, e.g. dropout:0.25".to_string()),
        _ => Err(
            "not one of conv:FILTERS:KERNEL[:same], pool:SIZE, flatten, dense:UNITS, batchnorm, dropout:RATE"
                .to_string(),
        ),
    }
}

/// A named parameter tensor on the host (initial values, checkpoints).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// e.g. "dense_0.kernel", "dense_0.bias".
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Glorot-uniform kernels (limit sqrt(6 / (fan_in + fan_out)), where a convolution's fans are its
/// kernel's area times its input and output channels, as Keras counts them), zero biases, and
/// batch normalisation as Keras starts it (gamma and moving variance 1, beta and moving mean 0),
/// seeded. An invalid spec gives no tensors (`ModelSpec::parse` refuses those).
pub fn glorot_init(spec: &ModelSpec, seed: u64) -> Vec<HostTensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (name, shape) in spec.param_shapes().unwrap_or_default() {
        let n: usize = shape.iter().product();
        // Batch normalisation starts as the identity: scale 1, offset 0, moving variance 1.
        let ones = name.ends_with(".gamma") || name.ends_with(".moving_variance");
        let data = match shape.len() {
            1 => vec![if ones { 1.0 } else { 0.0 }; n],
            rank => {
                let area: usize = shape[..rank - 2].iter().product();
                let (fan_in, fan_out) = (area * shape[rank - 2], area * shape[rank - 1]);
                let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                (0..n).map(|_| rng.random_range(-limit..limit)).collect()
            }
        };
        out.push(HostTensor { name, shape, data });
    }
    out
}

#[cfg(test)]
mod tests;
