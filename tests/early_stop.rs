//! `--early-stop`: a run whose validation loss rises (a small model overfitting 300 images) stops
//! `patience` epochs after its best epoch and ends with exactly that epoch's weights: the model it
//! saves is bit for bit the one a run of that many epochs saves, and the run folder's result.json
//! names the epoch.

mod common;

use common::*;
use gpu_mnist::checkpoint;

#[test]
fn a_rising_validation_loss_stops_the_run_and_restores_the_best_epoch() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    let common = [
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--hidden",
        "64",
        "--train-limit",
        "600",
        "--validation-split",
        "0.5",
        "--test-limit",
        "500",
        "--lr",
        "0.005",
        "--seed",
        "4",
    ];
    let out = run_ok(
        &[
            &common[..],
            &[
                "--epochs",
                "60",
                "--early-stop",
                "3",
                "--out",
                &p("run"),
                "--save",
                &p("early.safetensors"),
            ],
        ]
        .concat(),
    );
    println!("{out}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/result.json")).unwrap()).unwrap();
    let kept = result["kept_epoch"].as_u64().unwrap() as usize;
    assert_eq!(result["stopped_early"], true, "{result}");
    assert!(out.contains(&format!("kept the weights of epoch {kept}")), "{out}");
    // The epochs run: the best, then three without a lower validation loss.
    let csv = std::fs::read_to_string(dir.path().join("run/metrics.csv")).unwrap();
    let val_loss: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
        .collect();
    assert_eq!(val_loss.len(), kept + 3, "{csv}");
    let best = val_loss.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(val_loss[kept - 1], best, "{csv}");
    assert!(val_loss[kept..].iter().all(|&l| l >= best), "{csv}");
    // The same run for exactly `kept` epochs ends with the same weights.
    let kept_epochs = kept.to_string();
    run_ok(
        &[
            &common[..],
            &[
                "--epochs",
                &kept_epochs,
                "--out",
                &p("plain"),
                "--save",
                &p("plain.safetensors"),
            ],
        ]
        .concat(),
    );
    let early = checkpoint::load(std::path::Path::new(&p("early.safetensors"))).unwrap();
    let plain = checkpoint::load(std::path::Path::new(&p("plain.safetensors"))).unwrap();
    assert_eq!(
        early.params, plain.params,
        "early stopping must end with the best epoch's weights"
    );
}

#[test]
fn early_stop_needs_a_validation_set_and_no_checkpoint() {
    for (args, needle) in [
        (&["--early-stop", "2"][..], "--validation-split"),
        (&["--early-stop", "2", "--validation-split", "0"][..], "--early-stop"),
        (&["--early-stop", "0", "--validation-split", "0.1"][..], "--early-stop"),
        (
            &[
                "--early-stop",
                "2",
                "--validation-split",
                "0.1",
                "--checkpoint-dir",
                "ck",
            ][..],
            "--checkpoint-dir",
        ),
        (&["--monitor", "val-accuracy"][..], "--early-stop"),
    ] {
        let (code, _, stderr) = run_any(&[&["train", "--device", "cpu"][..], args].concat());
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
