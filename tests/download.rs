//! The downloader against a small HTTP server on 127.0.0.1 serving the shared MNIST files (and
//! generated Fashion-MNIST-shaped ones), with a dead mirror and a mirror whose copy of one file is
//! corrupt. Nothing leaves this machine.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use gpu_mnist::data::catalog::FASHION_FILES;
use gpu_mnist::data::download::{download_missing, verify_content};
use gpu_mnist::data::{dir_has_all_files, file_path, DataFile, DatasetKind, Mnist, Pin, IMAGE_PIXELS, MNIST_FILES};
use md5::{Digest, Md5};

/// Serves /good/NAME from the shared data and /corrupt/NAME the same, except that the train labels
/// have one flipped byte inside a well-formed gzip stream (so only the SHA-256 can catch it).
/// Stops when dropped.
struct Mirror {
    base: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mirror {
    fn start(data: PathBuf) -> Mirror {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind 127.0.0.1");
        let base = format!("http://{}", server.server_addr().to_ip().expect("ip address"));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                let url = request.url().to_string();
                let (kind, name) = url.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
                let body = match std::fs::read(data.join(name)) {
                    Ok(mut bytes) => {
                        if kind == "corrupt" && name.starts_with("train-labels") {
                            let mut raw = Vec::new();
                            let mut dec = flate2::read::MultiGzDecoder::new(bytes.as_slice());
                            std::io::Read::read_to_end(&mut dec, &mut raw).expect("shared file is gzip");
                            raw[100] ^= 0x01;
                            bytes = gzip(&raw);
                        }
                        bytes
                    }
                    Err(_) => {
                        let _ = request.respond(tiny_http::Response::empty(404));
                        continue;
                    }
                };
                let _ = request.respond(tiny_http::Response::from_data(body));
            }
        });
        Mirror {
            base,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A mirror nobody answers: a port that was just free.
fn dead_mirror() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/")
}

/// Hidden (temporary) files left in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn falls_through_dead_and_corrupt_mirrors_to_a_verified_copy() {
    let mirror = Mirror::start(data_dir());
    let cache = tempfile::tempdir().unwrap();
    let mirrors = vec![
        dead_mirror(),
        format!("{}/corrupt/", mirror.base),
        format!("{}/good/", mirror.base),
    ];
    download_missing(cache.path(), &MNIST_FILES, &mirrors, false).expect("download through the good mirror");
    assert!(dir_has_all_files(cache.path()));
    for f in &MNIST_FILES {
        verify_content(&file_path(cache.path(), f), f).expect("checksum of the downloaded file");
    }
    assert!(
        leftovers(cache.path()).is_empty(),
        "temporary files left: {:?}",
        leftovers(cache.path())
    );
    let m = Mnist::load(cache.path()).expect("downloaded set loads");
    assert_eq!((m.train.len(), m.test.len()), (60_000, 10_000));
}

#[test]
fn a_corrupt_download_never_lands_and_the_error_names_the_file() {
    let mirror = Mirror::start(data_dir());
    let cache = tempfile::tempdir().unwrap();
    let mirrors = vec![dead_mirror(), format!("{}/corrupt/", mirror.base)];
    let err = download_missing(cache.path(), &MNIST_FILES, &mirrors, false)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(
        err.contains("train-labels-idx1-ubyte.gz") && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(
        !cache.path().join("train-labels-idx1-ubyte.gz").exists(),
        "a corrupt file was kept"
    );
    assert!(
        leftovers(cache.path()).is_empty(),
        "temporary files left: {:?}",
        leftovers(cache.path())
    );
}

#[test]
fn train_downloads_into_the_cache_when_no_data_is_given() {
    let mirror = Mirror::start(data_dir());
    let cache = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "train",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--train-limit",
            "512",
            "--test-limit",
            "256",
        ])
        .env("XDG_CACHE_HOME", cache.path())
        .env("GPU_MNIST_MIRRORS", format!("{},{}/good/", dead_mirror(), mirror.base))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("gpu-mnist/mnist") && stdout.contains("test: loss"),
        "{stdout}"
    );
    assert!(dir_has_all_files(&cache.path().join("gpu-mnist/mnist")));
}

/// A small Fashion-MNIST-shaped set that a model can learn: class c is a bright bar at row
/// 2 + 2c (jittered by a row, with noise), as the four gzip files a publisher would serve,
/// with their MD5s and sizes pinned as `catalog` pins the real ones.
fn write_fashion_like(dir: &Path, n_train: usize, n_test: usize) -> [DataFile; 4] {
    use rand::RngExt;
    let mut rng = rng(11);
    let mut set = |n: usize| {
        let mut images = vec![0u8; n * IMAGE_PIXELS];
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        for (image, &c) in images.chunks_mut(IMAGE_PIXELS).zip(&labels) {
            let row = 2 + 2 * c as usize + rng.random_range(0..2usize);
            for (i, px) in image.iter_mut().enumerate() {
                let (r, col) = (i / 28, i % 28);
                let bar = (r == row || r == row + 1) && (4..24).contains(&col);
                *px = if bar {
                    200 + rng.random_range(0..56u8)
                } else {
                    rng.random_range(0..30u8)
                };
            }
        }
        (images, labels)
    };
    let (train, test) = (set(n_train), set(n_test));
    let contents = [
        idx_bytes(0x803, &[n_train as u32, 28, 28], &train.0),
        idx_bytes(0x801, &[n_train as u32], &train.1),
        idx_bytes(0x803, &[n_test as u32, 28, 28], &test.0),
        idx_bytes(0x801, &[n_test as u32], &test.1),
    ];
    let mut pins = FASHION_FILES;
    for (pin, content) in pins.iter_mut().zip(contents) {
        let gz = gzip(&content);
        std::fs::write(dir.join(format!("{}.gz", pin.name)), &gz).unwrap();
        let md5: String = Md5::digest(&gz).iter().map(|b| format!("{b:02x}")).collect();
        pin.size = content.len() as u64;
        pin.pin = Pin::GzipMd5 {
            md5: Box::leak(md5.into_boxed_str()),
            gz_size: gz.len() as u64,
        };
    }
    pins
}

/// Fashion-MNIST end to end on generated files: download from a loopback mirror (past a dead one)
/// checked by MD5, then train, evaluate with class names, predict by name, and a model that
/// refuses another dataset. A corrupt copy never lands. The download goes through the library with
/// the generated files' own pins, since the real ones rightly refuse them; the binary's download
/// against the real pins is the next test.
#[test]
fn fashion_downloads_checked_by_md5_then_trains_and_evaluates_with_class_names() {
    let served = tempfile::tempdir().unwrap();
    let pins = write_fashion_like(served.path(), 1000, 300);
    let mirror = Mirror::start(served.path().to_path_buf());
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("gpu-mnist").join("fashion");

    // The corrupt mirror re-compresses the train labels with one flipped byte: larger than the
    // pinned size, or (were it the same size) a different MD5.
    let corrupt = vec![format!("{}/corrupt/", mirror.base)];
    let err = download_missing(&cache, &pins, &corrupt, false)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(err.contains("train-labels-idx1-ubyte.gz"), "{err}");
    assert!(
        err.contains("more than the") || err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(!cache.join("train-labels-idx1-ubyte.gz").exists());
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));

    let mirrors = vec![dead_mirror(), format!("{}/good/", mirror.base)];
    download_missing(&cache, &pins, &mirrors, false).expect("download through the good mirror");
    for f in &pins {
        verify_content(&file_path(&cache, f), f).expect("MD5 of the downloaded file");
    }

    let model = root.path().join("fashion.safetensors");
    let model_arg = model.to_str().unwrap();
    let (run, ck) = (root.path().join("run"), root.path().join("ck"));
    // The binary with the loopback download as its cache: (exit code, stdout, stderr).
    let cached = |args: &[&str]| {
        let out = bin().args(args).env("XDG_CACHE_HOME", root.path()).output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, stdout, stderr) = cached(&[
        "train",
        "--dataset",
        "fashion",
        "--offline",
        "--device",
        "cpu",
        "--hidden",
        "32",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--save",
        model_arg,
        "--out",
        run.to_str().unwrap(),
        "--checkpoint-dir",
        ck.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        stdout.contains("data: Fashion-MNIST in ") && stdout.contains("gpu-mnist/fashion"),
        "{stdout}"
    );
    let saved = gpu_mnist::checkpoint::load(&model).unwrap();
    assert_eq!(saved.dataset, Some(DatasetKind::Fashion));
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(config.contains("\"dataset\": \"fashion\""), "{config}");
    // A resumed run keeps its dataset (and finds it in the same cache) ...
    let (code, stdout, stderr) = cached(&["train", "--resume", ck.to_str().unwrap(), "--epochs", "4", "--offline"]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        stdout.contains("data: Fashion-MNIST in ") && stdout.contains("epoch 4"),
        "{stdout}"
    );
    // ... and refuses to continue on another.
    let (code, _, stderr) = cached(&["train", "--resume", ck.to_str().unwrap(), "--dataset", "mnist"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("the checkpoint trained on Fashion-MNIST, not MNIST"),
        "{stderr}"
    );

    let evaluate = ["evaluate", "--model", model_arg, "--device", "cpu", "--offline"];
    let (code, stdout, stderr) = cached(&evaluate);
    println!("{stdout}");
    assert_eq!(code, Some(0), "stderr: {stderr}");
    for name in ["Fashion-MNIST test set", "T-shirt/top", "Sneaker", "Ankle boot"] {
        assert!(stdout.contains(name), "{name} missing in: {stdout}");
    }
    let accuracy: f64 = stdout
        .split("accuracy ")
        .nth(1)
        .and_then(|t| t.split('%').next())
        .and_then(|t| t.parse().ok())
        .expect("an accuracy");
    assert!(accuracy > 80.0, "the bars are easy to tell apart: {accuracy}%");

    // Test image 7 is class 7: a Sneaker.
    let (_, stdout, _) = cached(&[
        "predict",
        "--model",
        model_arg,
        "--index",
        "7",
        "--device",
        "cpu",
        "--offline",
    ]);
    println!("{stdout}");
    assert!(
        stdout.contains("true label Sneaker (7)") && stdout.contains("Ankle boot: "),
        "{stdout}"
    );

    let (code, _, stderr) = cached(&[&evaluate[..], &["--dataset", "mnist"]].concat());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("was trained on Fashion-MNIST, not MNIST"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// The binary downloads Fashion-MNIST from the mirror its variable names and checks the
/// publisher's real MD5s: generated files are refused, naming the file, and nothing lands.
#[test]
fn the_published_md5_refuses_files_that_are_not_fashion_mnist() {
    let served = tempfile::tempdir().unwrap();
    write_fashion_like(served.path(), 100, 20);
    let mirror = Mirror::start(served.path().to_path_buf());
    let root = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["train", "--dataset", "fashion", "--device", "cpu", "--epochs", "1"])
        .env("XDG_CACHE_HOME", root.path())
        .env("GPU_MNIST_FASHION_MIRRORS", format!("{}/good/", mirror.base))
        // MNIST's variable is not Fashion-MNIST's: a mirror named there is not used.
        .env("GPU_MNIST_MIRRORS", dead_mirror())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("train-images-idx3-ubyte.gz")
            && stderr.contains("checksum mismatch")
            && stderr.contains("MD5 8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let cache = root.path().join("gpu-mnist").join("fashion");
    assert!(!dir_has_any_file(&cache), "a file landed in {}", cache.display());
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));

    // MNIST's real files named as Fashion-MNIST's: their labels match MNIST's pin, so refused.
    let data = data_dir();
    let (code, _, stderr) = run_any(&["train", "--dataset", "fashion", "--data", data.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("train-labels-idx1-ubyte")
            && stderr.contains("holds MNIST's labels")
            && stderr.contains("not Fashion-MNIST's"),
        "{stderr}"
    );

    let out = bin()
        .args(["train", "--dataset", "kmnist", "--offline"])
        .env("XDG_CACHE_HOME", root.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("KMNIST not found: --offline forbids downloading")
            && stderr.contains("gpu-mnist/kmnist")
            && stderr.contains("GPU_MNIST_KMNIST_DATA"),
        "{stderr}"
    );
}

/// Whether any of the four data files is in `dir`.
fn dir_has_any_file(dir: &Path) -> bool {
    MNIST_FILES.iter().any(|f| file_path(dir, f).exists())
}
