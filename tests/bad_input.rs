//! The binary against bad data files and bad flags: each case must give one clear line naming the
//! file or flag, a non-zero exit (2 for usage, 1 for runtime), and no panic or backtrace.

mod common;

use std::path::Path;

use common::*;

struct Outcome {
    code: i32,
    stderr: String,
}

fn run(args: &[&str]) -> Outcome {
    let out = bin().args(args).output().expect("run gpu-mnist");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

fn assert_clean_failure(case: &str, o: &Outcome, code: i32, needles: &[&str]) {
    println!("{case}: exit {} | {}", o.code, o.stderr.trim());
    assert_eq!(o.code, code, "{case}: exit code (stderr: {})", o.stderr);
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace", "internal failure"] {
        assert!(!o.stderr.contains(bad), "{case}: stderr shows a panic: {}", o.stderr);
    }
    let error_lines: Vec<&str> = o.stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        error_lines.len(),
        1,
        "{case}: expected one error line, got: {}",
        o.stderr
    );
    for n in needles {
        assert!(o.stderr.contains(n), "{case}: stderr lacks {n:?}: {}", o.stderr);
    }
}

/// A folder with a valid small set, then `corrupt` applied; train must fail naming `file`.
fn bad_file_case(case: &str, file: &str, corrupt: impl FnOnce(&Path), needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    write_small_mnist(dir.path(), 60, 20);
    corrupt(&dir.path().join(file));
    let d = dir.path().to_str().unwrap();
    let o = run(&["train", "--device", "cpu", "--data", d, "--epochs", "1", "--offline"]);
    let mut all = vec![file.trim_end_matches(".gz")];
    all.extend_from_slice(needles);
    assert_clean_failure(case, &o, 1, &all);
}

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte.gz";

#[test]
fn a_valid_small_set_trains() {
    let dir = tempfile::tempdir().unwrap();
    write_small_mnist(dir.path(), 60, 20);
    let out = bin()
        .args([
            "train",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--data",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("test: loss"));
}

#[test]
fn missing_empty_and_directory_files() {
    bad_file_case(
        "missing file",
        TRAIN_LABELS,
        |p| std::fs::remove_file(p).unwrap(),
        &["not found"],
    );
    bad_file_case(
        "empty file",
        TRAIN_IMAGES,
        |p| std::fs::write(p, b"").unwrap(),
        &["empty"],
    );
    bad_file_case(
        "directory instead of a file",
        TRAIN_IMAGES,
        |p| {
            std::fs::remove_file(p).unwrap();
            std::fs::create_dir(p).unwrap();
        },
        &["directory"],
    );
}

#[test]
fn broken_gzip() {
    bad_file_case(
        "truncated gzip",
        TRAIN_IMAGES,
        |p| {
            let bytes = std::fs::read(p).unwrap();
            std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
        },
        &["truncated"],
    );
    bad_file_case(
        "not gzip but named .gz",
        TRAIN_LABELS,
        |p| std::fs::write(p, idx_bytes(0x801, &[60], &[1; 60])).unwrap(),
        &["not gzip"],
    );
    bad_file_case(
        "corrupt gzip body",
        TRAIN_IMAGES,
        |p| {
            let mut bytes = std::fs::read(p).unwrap();
            let mid = bytes.len() / 2;
            for b in &mut bytes[mid..mid + 64] {
                *b ^= 0x5a;
            }
            std::fs::write(p, bytes).unwrap();
        },
        &["gzip"],
    );
}

#[test]
fn inconsistent_headers_and_contents() {
    bad_file_case(
        "wrong magic",
        TRAIN_IMAGES,
        |p| std::fs::write(p, gzip(&idx_bytes(0x801, &[60, 28, 28], &[0; 60 * 784]))).unwrap(),
        &["magic"],
    );
    bad_file_case(
        "wrong image size",
        TRAIN_IMAGES,
        |p| std::fs::write(p, gzip(&idx_bytes(0x803, &[60, 32, 32], &[0; 60 * 1024]))).unwrap(),
        &["32x32"],
    );
    bad_file_case(
        "image and label counts differ",
        TRAIN_LABELS,
        |p| std::fs::write(p, gzip(&idx_bytes(0x801, &[59], &[1; 59]))).unwrap(),
        &["59 labels", "60 images"],
    );
    bad_file_case(
        "a label of 10",
        TRAIN_LABELS,
        |p| {
            let mut labels = vec![3u8; 60];
            labels[17] = 10;
            std::fs::write(p, gzip(&idx_bytes(0x801, &[60], &labels))).unwrap();
        },
        &["label 17 is 10"],
    );
    bad_file_case(
        "header claims 2^31 images",
        TRAIN_IMAGES,
        |p| std::fs::write(p, gzip(&idx_bytes(0x803, &[1 << 31, 28, 28], &[0; 784]))).unwrap(),
        &["truncated", "2147483648"],
    );
    bad_file_case(
        "raw file with data past its header",
        TRAIN_LABELS,
        |p| {
            std::fs::remove_file(p).unwrap();
            let raw = p.with_extension("");
            std::fs::write(raw, idx_bytes(0x801, &[60], &[1; 61])).unwrap();
        },
        &["train-labels-idx1-ubyte", "past"],
    );
}

#[test]
fn bad_flag_values_are_usage_errors() {
    let cases: [(&[&str], &str); 8] = [
        (&["--batch-size", "0"], "--batch-size"),
        (&["--epochs", "0"], "--epochs"),
        (&["--lr", "-1"], "--lr"),
        (&["--lr", "nan"], "--lr"),
        (&["--hidden", "0"], "--hidden"),
        (&["--hidden", "512,x"], "--hidden"),
        (&["--device", "tpu"], "--device"),
        (&["--train-limit", "-5"], "--train-limit"),
    ];
    for (flags, name) in cases {
        let mut args = vec!["train"];
        args.extend_from_slice(flags);
        let o = run(&args);
        assert_clean_failure(&format!("train {}", flags.join(" ")), &o, 2, &[name]);
    }
    let o = run(&["train", "--data", "/no/such/folder", "--device", "cpu"]);
    assert_clean_failure("--data of a missing folder", &o, 1, &["/no/such/folder"]);
    let o = run(&["evaluate", "--model", "/no/such/model.safetensors", "--device", "cpu"]);
    assert_clean_failure("evaluate a missing model", &o, 1, &["/no/such/model.safetensors"]);
}

#[test]
fn offline_without_data_says_which_files_to_put_where() {
    let cache = tempfile::tempdir().unwrap();
    let o = Outcome::from(
        bin()
            .args(["train", "--device", "cpu", "--offline"])
            .env("XDG_CACHE_HOME", cache.path())
            .output()
            .unwrap(),
    );
    assert_clean_failure(
        "--offline, empty cache",
        &o,
        1,
        &["train-images-idx3-ubyte.gz", "gpu-mnist/mnist"],
    );
}

impl From<std::process::Output> for Outcome {
    fn from(out: std::process::Output) -> Self {
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }
}
