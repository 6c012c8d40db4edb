//! `--early-stop`: a run whose validation loss rises (a small model overfitting 300 images) stops
//! `patience` epochs after its best epoch and ends with exactly that epoch's weights: the model it
//! saves is bit for bit the one a run of that many epochs saves, and the run folder's result.json
//! names the epoch. With `--checkpoint-dir`, a run cut short between its best epoch and its stop
//! and continued with `--resume` stops at the same epoch with the same weights; resuming a run
//! that stopped trains no further.

mod common;

use common::*;
use gpu_mnist::checkpoint;

/// `train` of a small model on 300 images, validated on 300 more: its validation loss rises
/// after a dozen epochs.
fn overfitting_run(data: &str) -> Vec<&str> {
    vec![
        "train",
        "--device",
        "cpu",
        "--data",
        data,
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
    ]
}

#[test]
fn a_rising_validation_loss_stops_the_run_and_restores_the_best_epoch() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    let common = overfitting_run(&d);
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
fn a_resumed_run_keeps_its_best_epoch_and_stops_where_an_uninterrupted_one_does() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    let common = [&overfitting_run(&d)[..], &["--early-stop", "3"]].concat();
    let result_of = |run: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(run).join("result.json")).unwrap()).unwrap()
    };
    let load = |name: &str| checkpoint::load(std::path::Path::new(&p(name))).unwrap();
    // Uninterrupted, with checkpoints.
    run_ok(
        &[
            &common[..],
            &[
                "--epochs",
                "60",
                "--checkpoint-dir",
                &p("ck_full"),
                "--out",
                &p("full"),
                "--save",
                &p("full.safetensors"),
            ],
        ]
        .concat(),
    );
    let full = result_of("full");
    let kept = full["kept_epoch"].as_u64().unwrap() as usize;
    assert_eq!(full["stopped_early"], true, "{full}");
    let full_state = checkpoint::load(&dir.path().join("ck_full/checkpoint.safetensors"))
        .unwrap()
        .state
        .unwrap();
    assert_eq!(full_state["early_stop"]["stopped"], true, "{full_state}");
    // The same run cut one epoch after its best: its checkpoint holds that epoch's weights.
    let cut = (kept + 1).to_string();
    run_ok(
        &[
            &common[..],
            &["--epochs", &cut, "--checkpoint-dir", &p("ck"), "--out", &p("cut")],
        ]
        .concat(),
    );
    let ck = checkpoint::load(&dir.path().join("ck/checkpoint.safetensors")).unwrap();
    let state = ck.state.clone().unwrap();
    assert_eq!(state["early_stop"]["best_epoch"], kept, "{state}");
    assert_eq!(state["early_stop"]["waited"], 1, "{state}");
    assert_eq!(
        ck.best.len(),
        ck.params.len(),
        "the checkpoint holds the best epoch's weights"
    );
    // Continued: it stops where the uninterrupted run stopped, with the same weights.
    let resume = |save: &str| run_ok(&["train", "--resume", &p("ck"), "--epochs", "60", "--save", &p(save)]);
    let out = resume("resumed.safetensors");
    println!("{out}");
    let resumed = result_of("cut");
    assert_eq!(resumed["kept_epoch"], full["kept_epoch"], "{resumed}");
    assert_eq!(resumed["stopped_early"], true, "{resumed}");
    assert_eq!(resumed["test_accuracy"], full["test_accuracy"], "{resumed}");
    assert_eq!(
        load("resumed.safetensors").params,
        load("full.safetensors").params,
        "a resumed early-stopped run must end with the uninterrupted run's best weights"
    );
    let metrics = |run: &str| std::fs::read_to_string(dir.path().join(run).join("metrics.csv")).unwrap();
    assert_eq!(metrics("cut").lines().count(), metrics("full").lines().count());
    // A run that stopped trains no further when resumed, and ends with the same weights.
    let again = resume("again.safetensors");
    assert!(again.contains("early stopping had ended this run"), "{again}");
    assert_eq!(load("again.safetensors").params, load("full.safetensors").params);
    assert_eq!(metrics("cut").lines().count(), metrics("full").lines().count());
    // Cut on the epoch where its patience runs out (its last, so it did not "stop early"):
    // resumed with more epochs, it trains no further, as the uninterrupted run stopped there.
    let at_stop = (kept + 3).to_string();
    run_ok(
        &[
            &common[..],
            &["--epochs", &at_stop, "--checkpoint-dir", &p("ck3"), "--out", &p("cut3")],
        ]
        .concat(),
    );
    assert_eq!(result_of("cut3")["stopped_early"], false);
    let out = run_ok(&[
        "train",
        "--resume",
        &p("ck3"),
        "--epochs",
        "60",
        "--save",
        &p("cut3.safetensors"),
    ]);
    assert!(out.contains("early stopping had ended this run"), "{out}");
    assert_eq!(result_of("cut3")["stopped_early"], true);
    assert_eq!(load("cut3.safetensors").params, load("full.safetensors").params);
    assert_eq!(metrics("cut3").lines().count(), metrics("full").lines().count());
    // A checkpoint whose state names a best epoch but whose best weights are gone is refused,
    // naming the file.
    let path = dir.path().join("ck/checkpoint.safetensors");
    let stripped = checkpoint::Checkpoint {
        best: Vec::new(),
        ..checkpoint::load(&path).unwrap()
    };
    checkpoint::save(&path, &stripped).unwrap();
    let (code, _, stderr) = run_any(&["train", "--resume", &p("ck")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("checkpoint.safetensors") && stderr.contains("holds no best.* weights"),
        "{stderr}"
    );
}

#[test]
fn early_stop_needs_a_validation_set() {
    for (args, needle) in [
        (&["--early-stop", "2"][..], "--validation-split"),
        (&["--early-stop", "2", "--validation-split", "0"][..], "--early-stop"),
        (&["--early-stop", "0", "--validation-split", "0.1"][..], "--early-stop"),
        (&["--monitor", "val-accuracy"][..], "--early-stop"),
    ] {
        let (code, _, stderr) = run_any(&[&["train", "--device", "cpu"][..], args].concat());
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
