//! Tests of model specs: parsing, resolving, names, sizes.

use super::*;

#[test]
fn the_book_models_resolve() {
    let mlp = ModelSpec::mnist(&[512]);
    assert_eq!(mlp.describe(), "784-512-10");
    assert_eq!(mlp.param_count(), 407_050);
    assert_eq!(mlp.hidden(), vec![512]);
    let convnet = ModelSpec::convnet();
    assert_eq!(convnet.to_layers_arg(), CONVNET);
    assert_eq!(convnet.param_count(), 104_202);
    let layers = convnet.resolve().unwrap();
    assert_eq!(layers.len(), 6);
    assert_eq!(layers[4].out_len(), 1152);
    assert_eq!(
        layers[5],
        Layer::Dense {
            inputs: 1152,
            outputs: 10,
            relu: false
        }
    );
    let names: Vec<String> = convnet.param_shapes().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[0], "conv2d_0.kernel");
    assert_eq!(names[6], "dense_0.kernel");
    // Glorot for a convolution counts the kernel's area in both fans.
    let init = glorot_init(&convnet, 0);
    let limit = (6.0f64 / (9.0 * 1.0 + 9.0 * 32.0)).sqrt() as f32;
    assert!(init[0].data.iter().all(|v| v.abs() <= limit));
    assert!(init[0].data.iter().any(|v| v.abs() > 0.9 * limit));
    assert_eq!(
        ModelSpec::parse("--layers", "conv:8:5:same,pool:2,dense:10")
            .unwrap()
            .param_count(),
        208 + 14 * 14 * 8 * 10 + 10
    );
}

#[test]
fn batch_norm_takes_the_relu_of_the_layer_before_and_has_kerass_names() {
    let spec = ModelSpec::parse(
        "--layers",
        "conv:8:3,batchnorm,pool:2,dropout:0.25,flatten,dense:16,batchnorm,dense:10",
    )
    .unwrap();
    assert_eq!(
        spec.to_layers_arg(),
        "conv:8:3,batchnorm,pool:2,dropout:0.25,flatten,dense:16,batchnorm,dense:10"
    );
    let layers = spec.resolve().unwrap();
    let relus: Vec<bool> = layers.iter().map(Layer::relu).collect();
    assert_eq!(relus, [false, true, false, false, false, true, false]);
    assert_eq!(
        layers[1],
        Layer::BatchNorm {
            channels: 8,
            len: 26 * 26 * 8,
            relu: true
        }
    );
    assert_eq!(
        layers[3],
        Layer::Dropout {
            len: 13 * 13 * 8,
            rate: 0.25
        }
    );
    assert_eq!(
        layers[5],
        Layer::BatchNorm {
            channels: 16,
            len: 16,
            relu: true
        }
    );
    let names: Vec<String> = spec.param_shapes().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names[2..6],
        [
            "batch_normalization_0.gamma",
            "batch_normalization_0.beta",
            "batch_normalization_0.moving_mean",
            "batch_normalization_0.moving_variance"
        ]
    );
    assert_eq!(names[8], "batch_normalization_1.gamma");
    assert_eq!(
        spec.param_count(),
        8 * 9 + 8 + 4 * 8 + 13 * 13 * 8 * 16 + 16 + 4 * 16 + 16 * 10 + 10
    );
    // Batch normalisation starts as the identity.
    let init = glorot_init(&spec, 0);
    assert_eq!(init[2].data, vec![1.0; 8]);
    assert_eq!(init[3].data, vec![0.0; 8]);
    assert_eq!(init[5].data, vec![1.0; 8]);
}

#[test]
fn sizes_past_the_limits_are_refused() {
    assert!(ModelSpec::convnet().check_size(64).is_ok());
    let huge_patches = ModelSpec::parse("--layers", "conv:32:3,conv:1:27:same,flatten,dense:10").unwrap();
    let err = huge_patches.check_size(64).unwrap_err().to_string();
    assert!(
        err.contains("27x27 convolution") && err.contains("--batch-size"),
        "{err}"
    );
    let err = ModelSpec::mnist(&[1 << 20, 1 << 20])
        .check_size(1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("parameters") && err.contains("--hidden"), "{err}");
}

#[test]
fn bad_specs_name_the_item() {
    for (spec, words) in [
        ("conv:32", "item 1 'conv:32'"),
        (
            "conv:32:3,dense:10,conv:8:3,dense:10",
            "item 3 'conv:8:3': a convolution needs an image",
        ),
        (
            "conv:32:7,pool:4,conv:8:7,dense:10",
            "item 3 'conv:8:7': a 7x7 kernel does not fit a 5x5 image",
        ),
        ("pool:0,dense:10", "window size '0'"),
        ("conv:4:4:same,dense:10", "odd kernel"),
        ("dense:512", "last layer must be dense:10"),
        ("dense:10,flatten", "item 2 'flatten'"),
        ("conv:3:3,,dense:10", "item 2 ''"),
        ("relu,dense:10", "not one of"),
        (
            "dropout:1,dense:10",
            "item 1 'dropout:1': the rate '1' is not a number between 0 and 1",
        ),
        ("dropout:nan,dense:10", "the rate 'nan'"),
        ("dropout,dense:10", "write dropout:RATE"),
        ("batchnorm:2,dense:10", "write batchnorm"),
        ("dense:10,batchnorm", "last layer must be dense:10"),
        ("", "item 1 ''"),
    ] {
        let err = ModelSpec::parse("--layers", spec).unwrap_err().to_string();
        assert!(err.contains(words), "{spec}: {err}");
        assert!(err.contains("--layers"), "{spec}: {err}");
    }
}
