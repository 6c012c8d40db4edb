//! Numerical faults and interruption: a diverging run stops at the first infinite loss naming the
//! epoch and step; Ctrl-C checkpoints mid-epoch, exits with 130, and --resume completes the run
//! with exactly the weights of an uninterrupted one.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use gpu_mnist::checkpoint;

#[test]
fn a_diverging_run_stops_at_the_first_infinite_loss() {
    let dir = tempfile::tempdir().unwrap();
    let d = data_arg();
    let out = bin()
        .args([
            "train",
            "--device",
            "cpu",
            "--data",
            &d,
            "--lr",
            "100",
            "--epochs",
            "2",
            "--checkpoint-dir",
        ])
        .arg(dir.path().join("ck"))
        .args(["--out"])
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("training diverged") && stderr.contains("epoch 1, step"),
        "{stderr}"
    );
    assert!(stderr.contains("smaller --lr"));
    assert!(
        !dir.path().join("ck/checkpoint.safetensors").exists(),
        "a diverged epoch must not be checkpointed"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("test:"),
        "no test result after a divergence"
    );
}

#[test]
fn ctrl_c_checkpoints_exits_130_and_resume_finishes_with_the_same_weights() {
    interrupt_and_resume(&[]);
}

/// The same with Adam and a one-cycle schedule: the resumed run continues the optimizer's moments,
/// its step count (Adam's bias corrections) and the schedule's rates exactly.
#[test]
fn ctrl_c_and_resume_with_adam_and_one_cycle_end_with_the_same_weights() {
    interrupt_and_resume(&["--optimizer", "adam", "--schedule", "one-cycle"]);
}

/// The same with batch normalisation (its moving averages are saved with the weights) and
/// dropout (its masks follow the run's step, so the resumed steps drop what the uninterrupted
/// run's did).
#[test]
fn ctrl_c_and_resume_with_batch_norm_and_dropout_end_with_the_same_weights() {
    interrupt_and_resume(&[
        "--layers",
        "dense:64,batchnorm,dropout:0.3,dense:10",
        "--optimizer",
        "adam",
    ]);
}

/// The same with early stopping: the checkpoint taken mid-epoch holds the watch and the best
/// epoch's weights, which the resumed run goes on from (at this rate the validation loss rises in
/// the second epoch, so both runs stop after it and end with the first epoch's weights).
#[test]
fn ctrl_c_and_resume_with_early_stopping_end_with_the_same_weights() {
    interrupt_and_resume(&["--validation-split", "0.1", "--early-stop", "1", "--lr", "0.01"]);
}

/// Train 3 epochs uninterrupted, and again interrupted by SIGINT in the second epoch and resumed:
/// the weights and every epoch's loss and accuracy must be the same.
fn interrupt_and_resume(optimizer: &[&str]) {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    let common = [
        &[
            "train",
            "--device",
            "cpu",
            "--data",
            &d,
            "--epochs",
            "3",
            "--train-limit",
            "40000",
            "--seed",
            "9",
            "--chunk-steps",
            "16",
        ][..],
        optimizer,
    ]
    .concat();
    run_ok(
        &[
            &common[..],
            &["--out", &p("run-a"), "--save", &p("a.safetensors"), "--quiet"],
        ]
        .concat(),
    );

    let child = bin()
        .args(
            [
                &common[..],
                &["--checkpoint-dir", &p("b"), "--out", &p("run-b"), "--quiet"],
            ]
            .concat(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt during the second epoch: after the first checkpoint appears.
    wait_for_file(&dir.path().join("b/checkpoint.safetensors"));
    std::thread::sleep(Duration::from_millis(150));
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    if out.status.code() == Some(0) {
        println!("the run finished before the interrupt arrived; nothing to resume");
        return;
    }
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("continue with: gpu-mnist train --resume"), "{stderr}");
    let state = checkpoint::load(&dir.path().join("b/checkpoint.safetensors"))
        .unwrap()
        .state
        .unwrap();
    println!(
        "checkpoint state: epochs_done {}, partial {}",
        state["epochs_done"], state["partial_epoch"]
    );

    let resumed = run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--resume",
        &p("b"),
        "--save",
        &p("b.safetensors"),
    ]);
    assert!(resumed.contains("resuming after epoch"), "{resumed}");
    let a = checkpoint::load(std::path::Path::new(&p("a.safetensors"))).unwrap();
    let b = checkpoint::load(std::path::Path::new(&p("b.safetensors"))).unwrap();
    assert_eq!(
        a.params, b.params,
        "interrupted and resumed weights differ from the uninterrupted run's"
    );
    let run_a = std::fs::read_to_string(dir.path().join("run-a/metrics.csv")).unwrap();
    let run_b = std::fs::read_to_string(dir.path().join("run-b/metrics.csv")).unwrap();
    let losses = |csv: &str| {
        csv.lines()
            .skip(1)
            .map(|l| l.split(',').take(3).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        losses(&run_a),
        losses(&run_b),
        "per-epoch loss and accuracy must match too"
    );
}

#[test]
fn a_lost_gpu_ends_cleanly_and_auto_continues_on_the_cpu() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "train",
        "--data",
        &d,
        "--train-limit",
        "2000",
        "--test-limit",
        "500",
        "--epochs",
        "3",
        "--chunk-steps",
        "16",
    ];
    // --device gpu: one clear error, exit 1.
    let out = bin()
        .args(args)
        .args(["--device", "gpu", "--out"])
        .arg(dir.path().join("gpu"))
        .env("GPU_MNIST_INJECT_DEVICE_LOSS", "3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: GPU: the GPU device was lost"), "{stderr}");
    // --device auto (here allowed to take the software adapter): the CPU takes over after the
    // last completed epoch, says so, and the run ends as an all-CPU run does.
    let out = bin()
        .args(args)
        .args(["--device", "auto", "--out"])
        .arg(dir.path().join("auto"))
        .env("GPU_MNIST_AUTO_ACCEPTS_SOFTWARE", "1")
        .env("GPU_MNIST_INJECT_DEVICE_LOSS", "4")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("{stdout}{stderr}");
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("--device auto: software (cpu) GPU found"), "{stdout}");
    assert!(
        stderr.contains("continues on the CPU from the end of epoch 1"),
        "{stderr}"
    );
    let csv = std::fs::read_to_string(dir.path().join("auto/metrics.csv")).unwrap();
    let devices: Vec<&str> = csv.lines().skip(1).map(|l| l.rsplit(",\"").next().unwrap()).collect();
    assert!(
        devices[0].starts_with("gpu") && devices[1].starts_with("cpu") && devices[2].starts_with("cpu"),
        "{csv}"
    );
    let cpu = run_ok(
        &[
            &args[..],
            &["--device", "cpu", "--out", dir.path().join("cpu").to_str().unwrap()],
        ]
        .concat(),
    );
    let tail = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("test:"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    // The GPU's first epoch matches the CPU's to rounding; the test figures agree to 0.5 points.
    let acc = |s: &str| {
        tail(s)[0]
            .split("accuracy ")
            .nth(1)
            .unwrap()
            .trim_end_matches(|c| c != '%')
            .trim_end_matches('%')
            .parse::<f64>()
            .unwrap()
    };
    assert!((acc(&stdout) - acc(&cpu)).abs() <= 0.5, "{stdout}\n{cpu}");
}

#[test]
fn no_adapter_at_all_is_a_clear_error_for_gpu_and_the_cpu_for_auto() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    // The Vulkan loader finds no driver when pointed at a file that does not exist.
    let no_driver = |cmd: &mut std::process::Command| {
        cmd.env("VK_DRIVER_FILES", "/nonexistent/icd.json")
            .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
            .env("WGPU_BACKEND", "vulkan");
    };
    let mut cmd = bin();
    cmd.args(["train", "--device", "gpu", "--data", &d]);
    no_driver(&mut cmd);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no GPU adapter found") && stderr.contains("--device cpu"),
        "{stderr}"
    );
    let mut cmd = bin();
    cmd.args([
        "train",
        "--data",
        &d,
        "--epochs",
        "1",
        "--train-limit",
        "500",
        "--test-limit",
        "100",
        "--out",
    ]);
    cmd.arg(dir.path().join("run"));
    no_driver(&mut cmd);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("--device auto: no GPU adapter was found"),
        "{stdout}"
    );
}

#[test]
fn a_gpu_lost_after_a_mid_epoch_resume_hands_over_from_that_step() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    // A checkpoint from the middle of epoch 1: a run stopped by Ctrl-C on the CPU.
    let args = [
        "train",
        "--data",
        &d,
        "--train-limit",
        "16000",
        "--test-limit",
        "500",
        "--epochs",
        "2",
        "--chunk-steps",
        "8",
    ];
    let child = bin()
        .args(
            [
                &args[..],
                &["--device", "cpu", "--checkpoint-dir", &p("ck"), "--out", &p("run")],
            ]
            .concat(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.code() != Some(130) {
        println!(
            "the run ended before the interrupt ({:?}); nothing to check",
            out.status.code()
        );
        return;
    }
    let state = checkpoint::load(&dir.path().join("ck/checkpoint.safetensors"))
        .unwrap()
        .state
        .unwrap();
    println!("interrupted at {}", state["partial_epoch"]);
    // Resume the same checkpoint twice: on the CPU, and with --device auto on a GPU that is lost at
    // its first read-back. Both must end with the same figures.
    std::fs::create_dir(dir.path().join("ck2")).unwrap();
    std::fs::copy(
        dir.path().join("ck/checkpoint.safetensors"),
        dir.path().join("ck2/checkpoint.safetensors"),
    )
    .unwrap();
    let cpu = run_ok(&[
        "train",
        "--data",
        &d,
        "--test-limit",
        "500",
        "--device",
        "cpu",
        "--resume",
        &p("ck"),
    ]);
    let auto = bin()
        .args([
            "train",
            "--data",
            &d,
            "--test-limit",
            "500",
            "--device",
            "auto",
            "--resume",
            &p("ck2"),
        ])
        .env("GPU_MNIST_AUTO_ACCEPTS_SOFTWARE", "1")
        .env("GPU_MNIST_INJECT_DEVICE_LOSS", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&auto.stdout),
        String::from_utf8_lossy(&auto.stderr),
    );
    assert!(
        auto.status.success() && stderr.contains("continues on the CPU"),
        "{stderr}"
    );
    let figures = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("epoch") || l.starts_with("test"))
            .map(|l| l.rsplit_once(", ").map_or(l, |x| x.0).to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        figures(&stdout),
        figures(&cpu),
        "auto after a lost GPU must continue exactly like the CPU resume"
    );
}

#[test]
fn a_high_but_workable_learning_rate_survives_its_first_spikes() {
    // RMSprop at lr 0.05 puts the loss above the f32-infinite mark for 3 steps, then learns.
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--lr",
        "0.05",
        "--epochs",
        "1",
        "--test-limit",
        "2000",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let acc: f64 = out
        .lines()
        .find(|l| l.starts_with("test:"))
        .and_then(|l| l.split("accuracy ").nth(1))
        .and_then(|a| a.split('%').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(acc > 80.0, "{out}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let mut child = bin()
        .args([
            "train",
            "--device",
            "cpu",
            "--data",
            &d,
            "--epochs",
            "2",
            "--train-limit",
            "2000",
            "--test-limit",
            "100",
            "--out",
            dir.path().to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("internal failure") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn resume_keeps_its_settings_but_epochs_can_extend_it() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    let args = [
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--train-limit",
        "1000",
        "--test-limit",
        "200",
        "--seed",
        "4",
    ];
    run_ok(
        &[
            &args[..],
            &["--epochs", "1", "--checkpoint-dir", &p("ck"), "--out", &p("run")],
        ]
        .concat(),
    );
    let out = bin()
        .args([
            "train",
            "--device",
            "cpu",
            "--data",
            &d,
            "--test-limit",
            "200",
            "--resume",
            &p("ck"),
            "--epochs",
            "3",
            "--lr",
            "0.5",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ignoring --lr"), "{stderr}");
    assert!(stdout.contains("epoch 3/3") && stdout.contains("lr 0.001"), "{stdout}");
    // The same as an uninterrupted 3-epoch run.
    let whole = run_ok(&[&args[..], &["--epochs", "3", "--out", &p("run2")]].concat());
    let lines = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("epoch 3/3") || l.starts_with("test"))
            .map(|l| l.rsplit_once(", ").map_or(l, |x| x.0).to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(lines(&stdout), lines(&whole));
}
