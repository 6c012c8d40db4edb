//! Where a dataset's files are: `--data DIR`, then its variable (`$GPU_MNIST_DATA` for MNIST,
//! `$GPU_MNIST_FASHION_DATA`, `$GPU_MNIST_KMNIST_DATA`), then its per-user cache folder
//! (downloaded there when missing).
//!
//! Contract: an explicitly named folder (flag or variable) is used as it is and never written to;
//! only the cache folder is filled by a download. `--offline` never touches the network and says
//! which files to put where. Each dataset has its own cache folder, since all three use the same
//! four file names; and a folder whose labels match another dataset's published checksum is
//! refused (`--dataset fashion` on MNIST's files), while files that match none (a user's own
//! IDX files) are taken as they are.

use std::path::{Path, PathBuf};

use super::{dir_has_all_files, download, file_path, DatasetKind, MNIST_FILES};
use crate::error::{Error, Result};

/// How the data folder was chosen (printed for the user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    Flag,
    EnvVar,
    Cache,
}

/// The per-user cache folder of `kind`: `$XDG_CACHE_HOME/gpu-mnist/mnist` (or `fashion`,
/// `kmnist`) or the platform's equivalent.
pub fn cache_dir(kind: DatasetKind) -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("gpu-mnist").join(kind.key()));
    }
    let base = if cfg!(target_os = "windows") {
        std::env::var_os("LOCALAPPDATA").map(PathBuf::from)
    } else if cfg!(target_os = "macos") {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join("Library").join("Caches"))
    } else {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))
    };
    base.map(|b| b.join("gpu-mnist").join(kind.key()))
}

/// The names (as .gz) of the four files that `dir` lacks (the same names for every dataset).
fn missing_files(dir: &Path) -> Vec<String> {
    MNIST_FILES
        .iter()
        .filter(|f| !file_path(dir, f).exists())
        .map(|f| format!("{}.gz", f.name))
        .collect()
}

fn missing_files_message(kind: DatasetKind, dir: &Path, why: &str) -> String {
    let missing = missing_files(dir);
    format!(
        "{kind} not found: {why}; put {} in {} (or pass --data DIR, or set {})",
        missing.join(", "),
        dir.display(),
        kind.data_env()
    )
}

/// Refuse a folder whose labels are another dataset's: the train and test labels (60 KB and 10 KB,
/// so this costs nothing) are checked against every other dataset's pins.
pub fn check_identity(kind: DatasetKind, dir: &Path) -> Result<()> {
    for i in [1, 3] {
        let path = file_path(dir, &kind.files()[i]);
        let other = DatasetKind::ALL
            .into_iter()
            .filter(|&k| k != kind)
            .find(|k| download::verify_content(&path, &k.files()[i]).is_ok());
        if let Some(other) = other {
            return Err(Error::bad_file(
                &path,
                format!("holds {other}'s labels (it matches {other}'s published checksum), not {kind}'s"),
            ));
        }
    }
    Ok(())
}

/// What to try when `kind`'s download failed: its mirror variable, and that MNIST's variable (if
/// that is the one set) is not the others'.
fn mirror_hint(kind: DatasetKind) -> String {
    let mnist = DatasetKind::Mnist.mirrors_env();
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    let only_mnist = kind != DatasetKind::Mnist && set(mnist) && !set(kind.mirrors_env());
    format!(
        "set {}=url1,url2 to try other mirrors{}",
        kind.mirrors_env(),
        if only_mnist {
            format!("; {mnist} names MNIST's only")
        } else {
            String::new()
        }
    )
}

/// Resolve `kind`'s data folder, downloading into its cache when allowed and needed.
pub fn resolve_data_dir(
    kind: DatasetKind,
    flag: Option<&Path>,
    offline: bool,
    show_progress: bool,
) -> Result<(PathBuf, DataSource)> {
    let env = kind.data_env();
    let explicit = match flag {
        Some(dir) => Some((dir.to_path_buf(), DataSource::Flag, "--data")),
        None => std::env::var_os(env)
            .filter(|v| !v.is_empty())
            .map(|v| (PathBuf::from(v), DataSource::EnvVar, env)),
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
        check_identity(kind, &dir)?;
        return Ok((dir, source));
    }
    let cache = cache_dir(kind)
        .ok_or_else(|| Error::DataNotFound(format!("no --data DIR, no {env}, and no home folder for a cache")))?;
    if dir_has_all_files(&cache) {
        check_identity(kind, &cache)?;
        return Ok((cache, DataSource::Cache));
    }
    if offline {
        return Err(Error::DataNotFound(missing_files_message(
            kind,
            &cache,
            "--offline forbids downloading",
        )));
    }
    if show_progress {
        eprintln!("gpu-mnist: downloading {kind} into {}", cache.display());
    }
    let mirrors = download::mirrors_from_env(kind);
    download::download_missing(&cache, kind.files(), &mirrors, show_progress).map_err(|e| {
        let why = format!("the download failed ({})", mirror_hint(kind));
        Error::DataNotFound(format!("{}; {}", e, missing_files_message(kind, &cache, &why)))
    })?;
    Ok((cache, DataSource::Cache))
}
