//! Where the MNIST files are: `--data DIR`, then `$GPU_MNIST_DATA`, then the per-user cache
//! (downloaded there when missing).
//!
//! Contract: an explicitly named folder (flag or variable) is used as it is and never written to;
//! only the cache folder is filled by a download. `--offline` never touches the network and says
//! which files to put where.

use std::path::{Path, PathBuf};

use super::{dir_has_all_files, download, file_path, MNIST_FILES};
use crate::error::{Error, Result};

/// How the data folder was chosen (printed for the user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    Flag,
    EnvVar,
    Cache,
}

/// The per-user cache folder: `$XDG_CACHE_HOME/gpu-mnist/mnist` or the platform's equivalent.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("gpu-mnist").join("mnist"));
    }
    let base = if cfg!(target_os = "windows") {
        std::env::var_os("LOCALAPPDATA").map(PathBuf::from)
    } else if cfg!(target_os = "macos") {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join("Library").join("Caches"))
    } else {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))
    };
    base.map(|b| b.join("gpu-mnist").join("mnist"))
}

/// The names (as .gz) of the four files that `dir` lacks.
fn missing_files(dir: &Path) -> Vec<String> {
    MNIST_FILES
        .iter()
        .filter(|f| !file_path(dir, f).exists())
        .map(|f| format!("{}.gz", f.name))
        .collect()
}

fn missing_files_message(dir: &Path, why: &str) -> String {
    let missing = missing_files(dir);
    format!(
        "MNIST not found: {why}; put {} in {} (or pass --data DIR, or set GPU_MNIST_DATA)",
        missing.join(", "),
        dir.display()
    )
}

/// Resolve the data folder, downloading into the cache when allowed and needed.
pub fn resolve_data_dir(flag: Option<&Path>, offline: bool, show_progress: bool) -> Result<(PathBuf, DataSource)> {
    let explicit = match flag {
        Some(dir) => Some((dir.to_path_buf(), DataSource::Flag, "--data")),
        None => std::env::var_os("GPU_MNIST_DATA")
            .filter(|v| !v.is_empty())
            .map(|v| (PathBuf::from(v), DataSource::EnvVar, "GPU_MNIST_DATA")),
    };
    if let Some((dir, source, what)) = explicit {
        if !dir.is_dir() {
            return Err(Error::DataNotFound(format!(
                "{what} {}: no such directory",
                dir.display()
            )));
        }
        // One missing file is reported by the loader, naming it; several, here, all at once.
        let missing = missing_files(&dir);
        if missing.len() > 1 {
            return Err(Error::DataNotFound(format!(
                "{what} {} lacks {}; put them there, or leave out {what} to use the per-user cache (filled by downloading)",
                dir.display(),
                missing.join(", ")
            )));
        }
        return Ok((dir, source));
    }
    let cache = cache_dir().ok_or_else(|| {
        Error::DataNotFound("no --data DIR, no GPU_MNIST_DATA, and no home folder for a cache".to_string())
    })?;
    if dir_has_all_files(&cache) {
        return Ok((cache, DataSource::Cache));
    }
    if offline {
        return Err(Error::DataNotFound(missing_files_message(
            &cache,
            "--offline forbids downloading",
        )));
    }
    if show_progress {
        eprintln!("gpu-mnist: downloading MNIST into {}", cache.display());
    }
    download::download_missing(&cache, &download::mirrors_from_env(), show_progress).map_err(|e| {
        Error::DataNotFound(format!(
            "{}; {}",
            e,
            missing_files_message(&cache, "the download failed")
        ))
    })?;
    Ok((cache, DataSource::Cache))
}
