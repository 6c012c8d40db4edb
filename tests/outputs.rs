//! Outputs never clobber anything: a FIFO given where a file is written is refused and left as it
//! was, a symbolic link is followed (its file replaced, the link kept), and two runs on one
//! checkpoint folder at once are one run and one refusal naming the folder and the first run's
//! process; after SIGKILL the folder's stale lock does not block --resume. (No test points at a
//! device node: they are the system's.)

#![cfg(unix)]

mod common;

use std::path::Path;
use std::process::Stdio;

use common::*;
use gpu_mnist::checkpoint;

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

#[test]
fn a_fifo_is_never_replaced_and_a_link_is_followed() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let small = ["--device", "cpu", "--data", &d, "--hidden", "16", "--epochs", "1"];
    let small = [&small[..], &["--train-limit", "500", "--test-limit", "100"]].concat();
    // --save onto a FIFO.
    mkfifo(&p("model.fifo"));
    let fifo = p("model.fifo").to_string_lossy().to_string();
    let out = p("run").to_string_lossy().to_string();
    let (code, _, stderr) = run_any(&[&["train"][..], &small, &["--save", &fifo, "--out", &out]].concat());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&fifo) && stderr.contains("FIFO"), "{stderr}");
    assert!(is_fifo(&p("model.fifo")), "the FIFO was replaced");
    // A FIFO in the run folder where config.json goes.
    std::fs::create_dir(p("run-fifo")).unwrap();
    mkfifo(&p("run-fifo/config.json"));
    let out = p("run-fifo").to_string_lossy().to_string();
    let (code, _, stderr) = run_any(&[&["train"][..], &small, &["--out", &out]].concat());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("config.json") && stderr.contains("--out"), "{stderr}");
    assert!(is_fifo(&p("run-fifo/config.json")));
    // --misclassified onto a FIFO.
    run_ok(
        &[
            &["train"][..],
            &small,
            &[
                "--save",
                &p("m.safetensors").to_string_lossy(),
                "--out",
                &p("r2").to_string_lossy(),
            ],
        ]
        .concat(),
    );
    mkfifo(&p("wrong.fifo"));
    let (code, _, stderr) = run_any(&[
        "evaluate",
        "--device",
        "cpu",
        "--data",
        &d,
        "--test-limit",
        "100",
        "--model",
        &p("m.safetensors").to_string_lossy(),
        "--misclassified",
        &p("wrong.fifo").to_string_lossy(),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(is_fifo(&p("wrong.fifo")));
    // --save through a symbolic link: the file it names is written, the link stays.
    std::fs::write(p("real.safetensors"), b"old").unwrap();
    std::os::unix::fs::symlink(p("real.safetensors"), p("link.safetensors")).unwrap();
    let link = p("link.safetensors").to_string_lossy().to_string();
    run_ok(
        &[
            &["train"][..],
            &small,
            &["--save", &link, "--out", &p("r3").to_string_lossy()],
        ]
        .concat(),
    );
    assert!(std::fs::symlink_metadata(p("link.safetensors"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(
        checkpoint::load(&p("real.safetensors")).is_ok(),
        "the link's file holds the model"
    );
}

#[test]
fn one_run_per_checkpoint_folder_and_a_killed_runs_lock_does_not_block_resume() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let ck_arg = ck.to_string_lossy().to_string();
    let run = |out: &str| {
        let out = dir.path().join(out).to_string_lossy().to_string();
        [
            "train",
            "--device",
            "cpu",
            "--data",
            &d,
            "--hidden",
            "32",
            "--train-limit",
            "6000",
            "--test-limit",
            "100",
            "--epochs",
            "400",
            "--checkpoint-dir",
            &ck_arg,
            "--out",
            &out,
            "--quiet",
        ]
        .map(str::to_string)
    };
    let mut first = bin()
        .args(run("run-a"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for_file(&ck.join(gpu_mnist::lock::LOCK_FILE)),
        "the first run never locked its folder"
    );
    let second = bin().args(run("run-b")).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    println!("{stderr}");
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&ck_arg), "{stderr}");
    assert!(stderr.contains(&format!("process {}", first.id())), "{stderr}");
    assert!(
        !dir.path().join("run-b/metrics.csv").exists(),
        "the refused run wrote records"
    );
    // SIGKILL the holder once it has a checkpoint: its lock file stays, its lock does not.
    assert!(wait_for_file(&ck.join("checkpoint.safetensors")));
    first.kill().unwrap();
    first.wait().unwrap();
    let state = checkpoint::load(&ck.join("checkpoint.safetensors"))
        .unwrap()
        .state
        .unwrap();
    let epochs = (state["epochs_done"].as_u64().unwrap() + 1).to_string();
    let resumed = run_ok(&["train", "--resume", &ck_arg, "--epochs", &epochs]);
    assert!(resumed.contains("resuming after epoch"), "{resumed}");
    assert!(
        !ck.join(gpu_mnist::lock::LOCK_FILE).exists(),
        "the lock file outlived the run"
    );
}
