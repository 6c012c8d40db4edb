//! Download of the MNIST files into a cache folder, verified by checksum.
//!
//! Contract: `download_missing(dir, mirrors, ...)` fetches each of the four files missing from
//! `dir`, trying each mirror in turn. A download is streamed into a temporary file in `dir`,
//! its decompressed content checked against the SHA-256 in `MNIST_FILES`, and only then renamed
//! to its final name: an interrupted or corrupt download never leaves a file that looks valid.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::read::MultiGzDecoder;

use super::{check, file_path, MnistFile, MNIST_FILES};
use crate::error::{Error, Result};

/// Mirrors tried in order (the list torchvision uses, plus Google's copy used by TensorFlow).
pub const DEFAULT_MIRRORS: [&str; 3] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
];

/// The mirror list: `$GPU_MNIST_MIRRORS` (comma-separated base URLs) or the defaults.
pub fn mirrors_from_env() -> Vec<String> {
    match std::env::var("GPU_MNIST_MIRRORS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        _ => DEFAULT_MIRRORS.iter().map(|s| s.to_string()).collect(),
    }
}

/// Download every file missing from `dir`. `show_progress` draws a bar on stderr.
pub fn download_missing(dir: &Path, mirrors: &[String], show_progress: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Partial downloads of an earlier run that was killed (never mistaken for data: hidden names).
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(".part-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_per_read(Some(Duration::from_secs(30)))
        .build()
        .into();
    for file in MNIST_FILES.iter().filter(|f| !file_path(dir, f).exists()) {
        let mut failures = Vec::new();
        let mut done = false;
        for mirror in mirrors {
            let url = format!("{}/{}.gz", mirror.trim_end_matches('/'), file.name);
            match fetch_verified(&agent, &url, dir, file, show_progress) {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(reason) => {
                    if show_progress {
                        eprintln!("gpu-mnist: {url}: {reason}; trying the next mirror");
                    }
                    failures.push(format!("{url}: {reason}"));
                }
            }
        }
        if !done {
            return Err(Error::Download {
                file: format!("{}.gz", file.name),
                reason: format!("every mirror failed ({})", failures.join("; ")),
            });
        }
    }
    Ok(())
}

/// A temporary file that is removed unless `keep` renames it into place.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Fetch one URL into a temporary file, verify it, rename it into place. Errors are plain text.
fn fetch_verified(
    agent: &ureq::Agent,
    url: &str,
    dir: &Path,
    file: &MnistFile,
    show_progress: bool,
) -> Result<(), String> {
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    let total = response.body().content_length();
    let tmp = TempFile {
        path: dir.join(format!(".{}.part-{}", file.name, std::process::id())),
        armed: true,
    };
    let mut out = File::create(&tmp.path).map_err(|e| format!("{}: {e}", tmp.path.display()))?;
    let bar = crate::progress::bytes_bar(total, &format!("{}.gz", file.name), show_progress);
    let mut reader = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("download interrupted: {e}")),
        };
        out.write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", tmp.path.display()))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    out.sync_all().map_err(|e| format!("{}: {e}", tmp.path.display()))?;
    drop(out);
    let gzip = verify_content(&tmp.path, file)?;
    let final_path = if gzip {
        dir.join(format!("{}.gz", file.name))
    } else {
        dir.join(file.name)
    };
    std::fs::rename(&tmp.path, &final_path).map_err(|e| format!("{}: {e}", final_path.display()))?;
    let mut tmp = tmp;
    tmp.armed = false;
    Ok(())
}

/// Check the (decompressed) content of a downloaded file against its size and SHA-256.
/// Returns whether the file is gzip-compressed.
pub fn verify_content(path: &Path, file: &MnistFile) -> Result<bool, String> {
    let mut head = [0u8; 2];
    let raw = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let gzip = matches!((&raw).read(&mut head), Ok(2)) && check::is_gzip(&head);
    let raw = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let reader: Box<dyn Read> = if gzip {
        Box::new(MultiGzDecoder::new(BufReader::new(raw)))
    } else {
        Box::new(BufReader::new(raw))
    };
    check::Hashing::new(reader.take(file.size + 1)).finish(file)?;
    Ok(gzip)
}
