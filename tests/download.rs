//! The downloader against a small HTTP server on 127.0.0.1 serving the shared MNIST files, with a
//! dead mirror and a mirror whose copy of one file is corrupt. Nothing leaves this machine.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use gpu_mnist::data::download::{download_missing, verify_content};
use gpu_mnist::data::{dir_has_all_files, file_path, Mnist, MNIST_FILES};

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
    download_missing(cache.path(), &mirrors, false).expect("download through the good mirror");
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
    let err = download_missing(cache.path(), &mirrors, false).unwrap_err().to_string();
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
