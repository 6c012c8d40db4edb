//! The bad-input matrix: the binary against bad data files, checkpoints, images, flags and device
//! limits. Each case must give one clear line naming the file or flag, a non-zero exit (2 for
//! usage, 1 for runtime), no panic or backtrace, and leave every file on disk as it was.

mod common;

use std::path::Path;

use common::*;

struct Outcome {
    code: i32,
    stderr: String,
}

/// Run in a fresh empty folder, which must still be empty afterwards (no run folder, no output).
fn run(args: &[&str]) -> Outcome {
    let cwd = tempfile::tempdir().unwrap();
    let out = bin()
        .args(args)
        .current_dir(cwd.path())
        .output()
        .expect("run gpu-mnist");
    assert_eq!(
        snapshot(cwd.path()),
        vec![],
        "gpu-mnist {} wrote files although it failed",
        args.join(" ")
    );
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// Run `args` against the files in `dir`, which must be unchanged afterwards.
fn run_on(dir: &Path, args: &[&str]) -> Outcome {
    let before = snapshot(dir);
    let o = run(args);
    assert_eq!(
        snapshot(dir),
        before,
        "gpu-mnist {} changed files in {}",
        args.join(" "),
        dir.display()
    );
    o
}

fn assert_clean_failure(case: &str, o: &Outcome, code: i32, needles: &[&str]) {
    println!("{case}: exit {} | {}", o.code, o.stderr.trim());
    assert_eq!(o.code, code, "{case}: exit code (stderr: {})", o.stderr);
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace", "internal failure"] {
        assert!(!o.stderr.contains(bad), "{case}: stderr shows a panic: {}", o.stderr);
    }
    if code == 2 {
        assert_eq!(
            o.stderr.trim().lines().count(),
            1,
            "{case}: a usage error is one line: {}",
            o.stderr
        );
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
    let o = run_on(
        dir.path(),
        &["train", "--device", "cpu", "--data", d, "--epochs", "1", "--offline"],
    );
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
    let cases: [(&[&str], &str); 17] = [
        (&["--optimizer", "lamb"], "--optimizer"),
        (&["--beta1", "1"], "--beta1"),
        (&["--beta2", "-0.1"], "--beta2"),
        (&["--eps", "0"], "--eps"),
        (&["--weight-decay", "-1"], "--weight-decay"),
        (&["--optimizer", "adam", "--momentum", "0.9"], "--momentum"),
        (&["--optimizer", "sgd", "--nesterov"], "--nesterov"),
        (&["--schedule", "linear"], "--schedule"),
        (&["--schedule", "cosine:warmup=1.5"], "--schedule"),
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

/// The CPU path's tuning variables refuse values they can not take, naming the variable, before
/// any training starts (and whatever `--device` asks for: auto may end on the CPU).
#[test]
fn bad_cpu_tuning_variables_are_usage_errors() {
    let cases = [
        ("GPU_MNIST_CPU_THREADS", "0"),
        ("GPU_MNIST_CPU_THREADS", "two"),
        ("GPU_MNIST_CPU_THREADS", "100000"),
        ("GPU_MNIST_CPU_SIMD", "avx3"),
    ];
    for (var, value) in cases {
        let cwd = tempfile::tempdir().unwrap();
        let o = Outcome::from(
            bin()
                .args(["train", "--device", "cpu", "--data", &data_arg(), "--epochs", "1"])
                .env(var, value)
                .current_dir(cwd.path())
                .output()
                .unwrap(),
        );
        assert_clean_failure(&format!("{var}={value}"), &o, 2, &[var, value]);
        assert_eq!(snapshot(cwd.path()), vec![], "{var}={value}: a run folder was written");
    }
    // Before the data is looked for: no download, no "files missing" first.
    let cache = tempfile::tempdir().unwrap();
    let o = Outcome::from(
        bin()
            .args(["train", "--device", "cpu", "--offline"])
            .env_remove("GPU_MNIST_DATA")
            .env("XDG_CACHE_HOME", cache.path())
            .env("GPU_MNIST_CPU_SIMD", "avx3")
            .output()
            .unwrap(),
    );
    assert_clean_failure(
        "GPU_MNIST_CPU_SIMD=avx3 without data",
        &o,
        2,
        &["GPU_MNIST_CPU_SIMD", "avx3"],
    );
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

/// A `--data` folder without the files: one line naming every missing file and the folder.
#[test]
fn a_data_folder_without_the_files_names_all_of_them() {
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_string_lossy().to_string();
    let o = run_on(empty.path(), &["train", "--device", "cpu", "--offline", "--data", &dir]);
    assert_clean_failure(
        "--data, empty folder",
        &o,
        1,
        &[
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
            &dir,
        ],
    );
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.stderr);
}

impl From<std::process::Output> for Outcome {
    fn from(out: std::process::Output) -> Self {
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }
}

/// A small trained model file and the folder it lives in.
fn model_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors").to_string_lossy().to_string();
    let d = data_dir().to_string_lossy().to_string();
    let out = bin()
        .args([
            "train",
            "--device",
            "cpu",
            "--data",
            &d,
            "--epochs",
            "1",
            "--train-limit",
            "1000",
            "--hidden",
            "16",
            "--quiet",
            "--save",
            &model,
        ])
        .args(["--out", dir.path().join("run").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (dir, model)
}

/// A safetensors file with the given header JSON and data bytes.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    [(h.len() as u64).to_le_bytes().as_slice(), &h, data].concat()
}

#[test]
fn bad_checkpoints() {
    let (dir, model) = model_dir();
    let d = data_dir().to_string_lossy().to_string();
    let good = std::fs::read(&model).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_string_lossy().to_string()
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "truncated model",
            write("truncated.safetensors", &good[..good.len() - 100]),
            vec!["not a valid safetensors file"],
        ),
        (
            "absurd header length",
            write("absurd.safetensors", &[&u64::MAX.to_le_bytes()[..], b"{}"].concat()),
            vec!["header length"],
        ),
        (
            "header not JSON",
            write("notjson.safetensors", &safetensors("{not json", b"")),
            vec!["invalid JSON"],
        ),
        (
            "another model's file (no gpu-mnist metadata)",
            write(
                "other.safetensors",
                &safetensors(
                    r#"{"weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    &[0; 8],
                ),
            ),
            vec!["no gpu-mnist metadata", "--layers"],
        ),
        (
            "wrong dtype",
            write(
                "f16.safetensors",
                &safetensors(
                    r#"{"__metadata__":{"layers":"784,1,10"},"dense_0.kernel":{"dtype":"F16","shape":[784,1],"data_offsets":[0,1568]}}"#,
                    &[0; 1568],
                ),
            ),
            vec!["dtype F16"],
        ),
        (
            "wrong shapes",
            write(
                "shape.safetensors",
                &safetensors(
                    r#"{"__metadata__":{"layers":"784,2,10"},"dense_0.kernel":{"dtype":"F32","shape":[2,784],"data_offsets":[0,6272]}}"#,
                    &[0; 6272],
                ),
            ),
            vec!["shape", "[784, 2]"],
        ),
        (
            "not an MNIST model",
            write(
                "cifar.safetensors",
                &safetensors(r#"{"__metadata__":{"layers":"3072,10"}}"#, b""),
            ),
            vec!["784-...-10"],
        ),
        ("empty model file", write("empty.safetensors", b""), vec!["too short"]),
        (
            "a flipped byte in the tensor data",
            write("damaged.safetensors", &{
                let mut bytes = good.clone();
                let last = bytes.len() - 1;
                bytes[last] ^= 0x10;
                bytes
            }),
            vec!["is damaged", "SHA-256"],
        ),
    ];
    for (case, path, needles) in &cases {
        let o = run_on(
            dir.path(),
            &["evaluate", "--device", "cpu", "--data", &d, "--model", path],
        );
        let mut all = vec![path.as_str()];
        all.extend(needles);
        assert_clean_failure(case, &o, 1, &all);
    }
    let o = run_on(
        dir.path(),
        &[
            "evaluate",
            "--device",
            "cpu",
            "--data",
            &d,
            "--model",
            dir.path().to_str().unwrap(),
        ],
    );
    assert_clean_failure("a folder as --model", &o, 1, &["is a directory"]);
    // The same model without the hash (as another tool writes it) loads, with a one-line note.
    let head = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&good[8..8 + head]).unwrap();
    header["__metadata__"]
        .as_object_mut()
        .unwrap()
        .remove("tensor_data_sha256");
    let unhashed = write(
        "unhashed.safetensors",
        &safetensors(&header.to_string(), &good[8 + head..]),
    );
    let o = run_on(
        dir.path(),
        &[
            "evaluate",
            "--device",
            "cpu",
            "--data",
            &d,
            "--model",
            &unhashed,
            "--test-limit",
            "100",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let notes: Vec<&str> = o.stderr.lines().filter(|l| l.contains("carries no SHA-256")).collect();
    assert_eq!(notes.len(), 1, "{}", o.stderr);
    assert!(notes[0].contains("unhashed.safetensors"), "{}", o.stderr);
    // A plain model is not a training checkpoint.
    let ck = dir.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    std::fs::copy(&model, ck.join("checkpoint.safetensors")).unwrap();
    let o = run_on(
        dir.path(),
        &[
            "train",
            "--device",
            "cpu",
            "--data",
            &d,
            "--resume",
            ck.to_str().unwrap(),
        ],
    );
    assert_clean_failure("--resume a plain model", &o, 1, &["not a training checkpoint"]);
    let o = run_on(
        dir.path(),
        &["train", "--device", "cpu", "--data", &d, "--resume", "/no/such/dir"],
    );
    assert_clean_failure("--resume a missing folder", &o, 2, &["--resume", "/no/such/dir"]);
}

#[test]
fn bad_images() {
    let (dir, model) = model_dir();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_string_lossy().to_string()
    };
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, 28, 28);
        enc.set_color(png::ColorType::Grayscale);
        enc.write_header().unwrap().write_image_data(&[0u8; 784]).unwrap();
    }
    // A PNG header claiming 16384 x 16384 pixels in a file of a few dozen bytes.
    let mut huge_png = [&png[..16], &16384u32.to_be_bytes(), &16384u32.to_be_bytes(), &png[24..]].concat();
    let mut crc = flate2::Crc::new();
    crc.update(&huge_png[12..29]);
    huge_png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    let jpeg = {
        let mut out = Vec::new();
        let photo: Vec<u8> = (0..64 * 64).map(|i| if (i % 64) / 8 == 3 { 20 } else { 230 }).collect();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode(&photo, 64, 64, image::ExtendedColorType::L8)
            .unwrap();
        out
    };
    // Grey paper, no ink: lit unevenly (a gradient), and speckled with noise.
    let gradient: Vec<u8> = (0..120 * 80).map(|i| 120 + ((i % 120) * 100 / 120) as u8).collect();
    let noise: Vec<u8> = (0..64 * 64u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let pgm = |w: usize, h: usize, px: &[u8]| [format!("P5\n{w} {h}\n255\n").as_bytes(), px].concat();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "not an image",
            write("notes.png", b"hello, this is text"),
            "not a picture gpu-mnist reads",
        ),
        ("truncated JPEG", write("cut.jpg", &jpeg[..jpeg.len() / 2]), "JPEG"),
        (
            "a BMP header claiming 60000 x 60000 pixels",
            write("bomb.bmp", &{
                let mut b = b"BM".to_vec();
                b.extend(70u32.to_le_bytes());
                b.extend([0; 4]);
                b.extend(54u32.to_le_bytes());
                b.extend(40u32.to_le_bytes());
                b.extend(60_000i32.to_le_bytes());
                b.extend(60_000i32.to_le_bytes());
                b.extend(1u16.to_le_bytes());
                b.extend(24u16.to_le_bytes());
                b.extend([0; 24]);
                b
            }),
            "larger than gpu-mnist accepts",
        ),
        (
            "grey paper lit unevenly, no ink",
            write("gradient.pgm", &pgm(120, 80, &gradient)),
            "no digit found",
        ),
        (
            "noise, no ink",
            write("noise.pgm", &pgm(64, 64, &noise)),
            "no digit found",
        ),
        ("empty image file", write("empty.png", b""), "empty"),
        ("zero-size PGM", write("zero.pgm", b"P5\n0 0\n255\n"), "zero size"),
        (
            "huge PGM dimensions",
            write("huge.pgm", b"P5\n99999 99999\n255\n"),
            "larger than",
        ),
        ("huge PNG dimensions", write("huge.png", &huge_png), "16384"),
        ("truncated PNG", write("cut.png", &png[..png.len() - 20]), "PNG"),
        (
            "blank image",
            write("blank.pgm", &[b"P5\n40 40\n255\n".as_slice(), &[255u8; 1600]].concat()),
            "blank",
        ),
    ];
    for (case, path, needle) in &cases {
        let o = run_on(dir.path(), &["predict", "--device", "cpu", "--model", &model, path]);
        assert_clean_failure(case, &o, 1, &[path.as_str(), needle]);
    }
}

#[test]
fn more_bad_flags_and_device_limits() {
    let (dir, model) = model_dir();
    let d = data_dir().to_string_lossy().to_string();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let f = file.to_str().unwrap();
    let usage: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--validation-split", "1"], "--validation-split"),
        (vec!["train", "--validation-split", "-0.1"], "--validation-split"),
        (vec!["train", "--chunk-steps", "0"], "--chunk-steps"),
        (vec!["predict", "--model", &model], "--index"),
        (vec!["predict", "--model", &model, "--index", "5..2"], "--index"),
        (
            vec!["predict", "--model", &model, "--data", &d, "--index", "10000"],
            "--index",
        ),
        (
            vec!["train", "--data", &d, "--save", "/no/such/folder/m.safetensors"],
            "--save",
        ),
        (vec!["train", "--data", &d, "--device", "cpu", "--out", f], "--out"),
        (vec!["bench", "--steps", "0"], "--steps"),
        // Values that would ask for more memory than exists are refused before allocating.
        (
            vec!["train", "--data", &d, "--batch-size", "1000000000"],
            "--batch-size",
        ),
        (
            vec!["train", "--data", &d, "--chunk-steps", "1000000000000"],
            "--chunk-steps",
        ),
        (
            vec!["train", "--data", &d, "--device", "cpu", "--hidden", "1048576,1048576"],
            "--hidden",
        ),
        (
            vec![
                "train",
                "--data",
                &d,
                "--device",
                "cpu",
                "--hidden",
                "100000",
                "--batch-size",
                "65536",
            ],
            "--batch-size",
        ),
        (
            vec!["bench", "--data", &d, "--device", "cpu", "--batch-size", "60001"],
            "--batch-size",
        ),
    ];
    for (args, flag) in &usage {
        let o = run_on(dir.path(), args);
        assert_clean_failure(&args.join(" "), &o, 2, &[flag]);
    }
    // Device limits: refused before any dispatch, naming the limit.
    let o = run_on(
        dir.path(),
        &["train", "--device", "gpu", "--data", &d, "--hidden", "200000"],
    );
    assert_clean_failure(
        "a model larger than the adapter allows",
        &o,
        1,
        &["max_storage_buffer_binding_size"],
    );
    let o = run_on(
        dir.path(),
        &["train", "--device", "gpu", "--adapter", "no-such-gpu", "--data", &d],
    );
    assert_clean_failure(
        "--adapter that matches nothing",
        &o,
        1,
        &["no-such-gpu", "--device cpu"],
    );
}

#[test]
fn a_new_run_never_overwrites_another_runs_checkpoint_or_records() {
    let d = data_dir().to_string_lossy().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (ck, out) = (dir.path().join("ck"), dir.path().join("run"));
    let args = [
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--epochs",
        "1",
        "--train-limit",
        "500",
        "--test-limit",
        "100",
        "--quiet",
    ];
    let first = bin()
        .args(args)
        .arg("--checkpoint-dir")
        .arg(&ck)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let o = run_on(
        dir.path(),
        &[
            &args[..],
            &[
                "--checkpoint-dir",
                ck.to_str().unwrap(),
                "--out",
                dir.path().join("other").to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert_clean_failure(
        "--checkpoint-dir holding a checkpoint",
        &o,
        2,
        &["--checkpoint-dir", "--resume"],
    );
    let o = run_on(dir.path(), &[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert_clean_failure("--out holding a run", &o, 2, &["--out", "already holds"]);
}
