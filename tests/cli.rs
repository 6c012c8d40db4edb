//! The binary end to end on real MNIST, as a user runs it.

mod common;

use common::*;
use gpu_mnist::backend::wgpu::list_adapters;

/// The number after `key` on the line that starts with `prefix`, e.g. ("test:", "accuracy").
fn figure(stdout: &str, prefix: &str, key: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in {stdout}"));
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("no {key} in {line}")) + key.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse()
        .unwrap_or_else(|_| panic!("no number after {key} in {line}"))
}

/// Lines without their wall times, for comparing runs.
fn without_times(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("epoch") || l.starts_with("test"))
        .map(|l| {
            l.rsplit_once(", ")
                .filter(|(_, t)| t.ends_with(" s"))
                .map(|(a, _)| a)
                .unwrap_or(l)
                .to_string()
        })
        .collect()
}

#[test]
fn the_reference_job_on_the_cpu_reaches_book_accuracy() {
    let data = data_arg();
    let out = run_ok(&["train", "--device", "cpu", "--data", &data]);
    println!("{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("epoch")).count(), 5);
    let train_acc = figure(&out, "epoch 5/5", "accuracy");
    let test_acc = figure(&out, "test:", "accuracy");
    assert!(train_acc >= 98.0, "train accuracy {train_acc}% after 5 epochs");
    assert!(test_acc >= 97.5, "test accuracy {test_acc}%");
}

#[test]
fn the_same_seed_gives_the_same_digits_and_another_seed_does_not() {
    let data = data_arg();
    let args = [
        "train",
        "--device",
        "cpu",
        "--data",
        &data,
        "--epochs",
        "2",
        "--train-limit",
        "3000",
        "--test-limit",
        "1000",
    ];
    let a = without_times(&run_ok(&[&args[..], &["--seed", "5"]].concat()));
    let b = without_times(&run_ok(&[&args[..], &["--seed", "5"]].concat()));
    let c = without_times(&run_ok(&[&args[..], &["--seed", "6"]].concat()));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn save_then_evaluate_reports_the_trained_accuracy() {
    let data = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    let model = model.to_str().unwrap();
    let trained = run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &data,
        "--epochs",
        "1",
        "--train-limit",
        "5000",
        "--save",
        model,
    ]);
    let evaluated = run_ok(&["evaluate", "--device", "cpu", "--data", &data, "--model", model]);
    let (a, b) = (
        figure(&trained, "test:", "accuracy"),
        figure(&evaluated, "test:", "accuracy"),
    );
    assert_eq!(a, b, "train said {a}%, evaluate said {b}%");
    assert!(a > 80.0, "one epoch on 5000 images reached only {a}%");
}

#[test]
fn devices_lists_the_adapters_with_their_limits() {
    let out = run_ok(&["devices"]);
    println!("{out}");
    assert!(
        out.contains("adapter(s), best first"),
        "no adapter listed (GPU tests need one): {out}"
    );
    assert!(
        out.contains("max storage binding") && out.contains("backend Vulkan"),
        "{out}"
    );
}

#[test]
fn auto_takes_a_hardware_gpu_or_the_cpu_and_says_why() {
    let data = data_arg();
    let out = run_ok(&[
        "train",
        "--data",
        &data,
        "--epochs",
        "1",
        "--train-limit",
        "256",
        "--test-limit",
        "256",
    ]);
    let note = out.lines().find(|l| l.starts_with("device:")).expect("a device line");
    println!("{note}");
    if list_adapters().iter().any(|a| a.is_hardware()) {
        assert!(note.contains("gpu '") && note.contains("GPU found"), "{note}");
    } else {
        assert!(note.contains("cpu (") && note.contains("--device auto:"), "{note}");
        assert!(
            note.contains("software adapter") || note.contains("no GPU adapter"),
            "{note}"
        );
    }
}

#[test]
fn gpu_training_on_a_subset_matches_the_cpu_and_counts_its_round_trips() {
    let data = data_arg();
    let common = [
        "train",
        "--data",
        &data,
        "--train-limit",
        "6000",
        "--test-limit",
        "2000",
        "--epochs",
        "2",
        "--verbose",
    ];
    // The output layer unfused (the default on hardware GPUs), whatever the adapter.
    let out = bin()
        .args([&common[..], &["--device", "gpu"]].concat())
        .env("GPU_MNIST_OUTPUT_FUSION", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gpu = String::from_utf8_lossy(&out.stdout).to_string();
    let cpu = run_ok(&[&common[..], &["--device", "cpu"]].concat());
    println!("{gpu}\n{cpu}");
    let (g, c) = (figure(&gpu, "test:", "accuracy"), figure(&cpu, "test:", "accuracy"));
    assert!((g - c).abs() <= 1.0, "gpu {g}% vs cpu {c}%");
    // 6000 / 128 = 47 steps, chunks of 64: one submit and one read-back per epoch, and one upload
    // (the shuffled order; in the first epoch also the optimizer's step table, which a constant
    // rate never changes); 7 dispatches a step for the 784-512-10 model: gather; 2 matmuls with
    // bias and ReLU fused; the loss; 3 matmuls, with the ReLU gradient, both bias gradients and
    // the optimizer steps of both layers fused in.
    let backend_lines: Vec<&str> = gpu.lines().filter(|l| l.trim_start().starts_with("backend:")).collect();
    assert_eq!(backend_lines.len(), 2, "{gpu}");
    for (line, uploads) in backend_lines.into_iter().zip([2, 1]) {
        assert_eq!(
            line.trim(),
            format!("backend: 329 dispatches, 1 submits, 1 read-backs, {uploads} uploads"),
            "{gpu}"
        );
    }
}

/// `--device auto` keeps each epoch's starting parameters and velocities, to hand a failing GPU's
/// run over to the CPU: one read-back of each packed allocation, so with the statistics' an epoch
/// has 3 (it had 9 when each of the 8 tensors was read on its own).
#[test]
fn auto_keeps_its_epoch_snapshot_in_two_read_backs() {
    let data = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["train", "--data", &data, "--train-limit", "1280", "--test-limit", "200"])
        .args(["--epochs", "2", "--verbose", "--device", "auto", "--out"])
        .arg(dir.path().join("run"))
        .env("GPU_MNIST_AUTO_ACCEPTS_SOFTWARE", "1")
        .env("GPU_MNIST_OUTPUT_FUSION", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("--device auto: software (cpu) GPU found"), "{stdout}");
    assert!(stdout.contains("plan: 4 dispatches a step"), "{stdout}");
    let backend_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("backend:"))
        .collect();
    assert_eq!(backend_lines.len(), 2, "{stdout}");
    for (line, uploads) in backend_lines.into_iter().zip([2, 1]) {
        // 10 steps of 4 dispatches (the output layer fused); the two snapshot reads and the
        // chunk's statistics; the order (and first the optimizer's step table).
        assert_eq!(
            line.trim(),
            format!("backend: 40 dispatches, 3 submits, 3 read-backs, {uploads} uploads"),
            "{stdout}"
        );
    }
}
