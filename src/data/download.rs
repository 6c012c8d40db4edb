//! Download of a dataset's files into a cache folder, verified by checksum.
//!
//! Contract: `download_missing(dir, files, mirrors, ...)` fetches each of `files` missing from
//! `dir`, trying each mirror in turn. A download is streamed into a temporary file in `dir`,
//! cut off past the file's pinned size, checked against its pin (see `catalog::Pin`), and only
//! then renamed to its final name: an interrupted or corrupt download never leaves a file that
//! looks valid.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{check, file_path, DataFile, DatasetKind};
use crate::error::{Error, Result};

/// The mirror list of `kind`: its variable (`GPU_MNIST_MIRRORS` for MNIST, comma-separated base
/// URLs) or its publishers' defaults.
pub fn mirrors_from_env(kind: DatasetKind) -> Vec<String> {
    match std::env::var(kind.mirrors_env()) {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        _ => kind.default_mirrors().iter().map(|s| s.to_string()).collect(),
    }
}

/// Download every one of `files` missing from `dir`. `show_progress` draws a bar on stderr.
pub fn download_missing(dir: &Path, files: &[DataFile], mirrors: &[String], show_progress: bool) -> Result<()> {
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
    for file in files.iter().filter(|f| !file_path(dir, f).exists()) {
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
    file: &DataFile,
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
    let mut received = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("download interrupted: {e}")),
        };
        received += n as u64;
        if received > file.download_limit() {
            return Err(format!(
                "the mirror sent more than the {} bytes pinned for this file",
                file.download_limit()
            ));
        }
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

/// Check a downloaded file against its pin (see `check::check_stored`). Returns whether the file
/// is gzip-compressed.
pub fn verify_content(path: &Path, file: &DataFile) -> Result<bool, String> {
    let mut head = [0u8; 2];
    let raw = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let gzip = matches!((&raw).read(&mut head), Ok(2)) && check::is_gzip(&head);
    let raw = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    check::check_stored(BufReader::new(raw), gzip, file)
}
