//! Model files written by other tools, without gpu-mnist's metadata: a gpu-mnist model rewritten
//! as Keras's weights under gpu-mnist's names, and as PyTorch `state_dict`s (a dense stack, and the
//! fast recipe's convnet with `--layers`), in the byte layout `safetensors.torch.save_file` writes,
//! evaluate to exactly the original's test loss and accuracy: the conversions are permutations.

mod common;

use std::path::Path;

use common::*;
use gpu_mnist::checkpoint;
use gpu_mnist::model::HostTensor;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A safetensors file of these tensors, without metadata.
fn write_plain(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| (n.as_str(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A Keras kernel (rows, cols) as PyTorch's (cols, rows), its rows taken in `order`.
fn transposed(t: &HostTensor, order: impl Fn(usize) -> usize) -> Vec<f32> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + order(r)] = t.data[r * cols + c];
        }
    }
    out
}

/// A Keras conv kernel (kh, kw, in, out) as PyTorch's (out, in, kh, kw).
fn conv_to_torch(t: &HostTensor) -> Vec<f32> {
    let [kh, kw, inp, out] = t.shape[..] else {
        panic!("{:?}", t.shape)
    };
    let mut w = vec![0.0; t.data.len()];
    for y in 0..kh {
        for x in 0..kw {
            for c in 0..inp {
                for o in 0..out {
                    w[((o * inp + c) * kh + y) * kw + x] = t.data[((y * kw + x) * inp + c) * out + o];
                }
            }
        }
    }
    w
}

/// `evaluate`'s test line for a model file.
fn evaluate(d: &str, model: &Path, layers: Option<&str>) -> (Option<i32>, String, String) {
    let model = model.to_string_lossy().to_string();
    let mut args = vec![
        "evaluate",
        "--device",
        "cpu",
        "--data",
        d,
        "--test-limit",
        "2000",
        "--model",
        &model,
    ];
    if let Some(layers) = layers {
        args.extend(["--layers", layers]);
    }
    let (code, out, err) = run_any(&args);
    let line = out
        .lines()
        .find(|l| l.starts_with("test:"))
        .unwrap_or_default()
        .to_string();
    (code, line, err)
}

#[test]
fn keras_and_pytorch_dense_files_without_metadata_evaluate_as_the_original() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let original = p("model.safetensors");
    run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--hidden",
        "64,32",
        "--epochs",
        "1",
        "--train-limit",
        "6000",
        "--save",
        &original.to_string_lossy(),
        "--out",
        &p("run").to_string_lossy(),
    ]);
    let (_, want, _) = evaluate(&d, &original, None);
    assert!(want.starts_with("test:"), "{want}");
    let params = checkpoint::load(&original).unwrap().params;
    // Keras's layout under gpu-mnist's names, no metadata.
    let keras: Vec<_> = params
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.data.clone()))
        .collect();
    write_plain(&p("keras.safetensors"), &keras);
    let (code, got, err) = evaluate(&d, &p("keras.safetensors"), None);
    assert_eq!((code, &got), (Some(0), &want), "{err}");
    // PyTorch's: fc1.weight (64, 784), ... as nn.Linear stores them.
    let torch: Vec<_> = params
        .chunks(2)
        .enumerate()
        .flat_map(|(i, wb)| {
            let (w, b) = (&wb[0], &wb[1]);
            [
                (
                    format!("fc{}.weight", i + 1),
                    vec![w.shape[1], w.shape[0]],
                    transposed(w, |r| r),
                ),
                (format!("fc{}.bias", i + 1), b.shape.clone(), b.data.clone()),
            ]
        })
        .collect();
    write_plain(&p("torch.safetensors"), &torch);
    let (code, got, err) = evaluate(&d, &p("torch.safetensors"), None);
    assert_eq!((code, &got), (Some(0), &want), "{err}");
}

#[test]
fn a_pytorch_convnet_evaluates_as_the_original_given_its_layers() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let original = p("fast.safetensors");
    run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--model",
        "fast",
        "--train-limit",
        "3000",
        "--save",
        &original.to_string_lossy(),
        "--out",
        &p("run").to_string_lossy(),
    ]);
    let (_, want, _) = evaluate(&d, &original, None);
    let params = checkpoint::load(&original).unwrap().params;
    // torch_fast99.py's names and layouts: c1, c2 (out, in, kh, kw); f1 (256, 800) over the
    // channels-first flatten of the (5, 5, 32) image; f2 (10, 256).
    let chw = |r: usize| {
        let (y, x, c) = (r / (5 * 32), r / 32 % 5, r % 32);
        (c * 5 + y) * 5 + x
    };
    let flip = |t: &HostTensor| vec![t.shape[1], t.shape[0]];
    let torch = vec![
        ("c1.weight".to_string(), vec![24, 1, 5, 5], conv_to_torch(&params[0])),
        ("c1.bias".to_string(), vec![24], params[1].data.clone()),
        ("c2.weight".to_string(), vec![32, 24, 3, 3], conv_to_torch(&params[2])),
        ("c2.bias".to_string(), vec![32], params[3].data.clone()),
        ("f1.weight".to_string(), flip(&params[4]), transposed(&params[4], chw)),
        ("f1.bias".to_string(), vec![256], params[5].data.clone()),
        ("f2.weight".to_string(), flip(&params[6]), transposed(&params[6], |r| r)),
        ("f2.bias".to_string(), vec![10], params[7].data.clone()),
    ];
    let file = p("torch-fast.safetensors");
    write_plain(&file, &torch);
    let layers = gpu_mnist::recipe::FAST_LAYERS;
    let (code, got, err) = evaluate(&d, &file, Some(layers));
    assert_eq!((code, &got), (Some(0), &want), "{err}");
    // Without --layers the file is refused, saying what to add.
    let (code, _, err) = evaluate(&d, &file, None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--layers"), "{err}");
    // Layers that the tensors do not fit are refused naming the layer.
    let (code, _, err) = evaluate(&d, &file, Some("conv:16:5,pool:2,flatten,dense:10"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("conv2d_0.kernel"), "{err}");
    // A gpu-mnist file whose metadata says otherwise than --layers is refused.
    let (code, _, err) = evaluate(&d, &original, Some("conv:16:5,pool:2,flatten,dense:10"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("metadata"), "{err}");
}
