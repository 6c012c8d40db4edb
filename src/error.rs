//! Error types of the library.
//!
//! Contract: every failure a user can meet (bad files, bad flags, a missing or failing GPU, a failed
//! download) is one `Error` variant whose `Display` is a single line naming the file, flag or
//! device and what is wrong. `Error::exit_code` maps it to the CLI's exit status: 2 for usage
//! mistakes, 130 for an interruption (Ctrl-C, as shells report SIGINT), 1 for everything that went
//! wrong at run time.

use std::path::{Path, PathBuf};

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value that is out of range or inconsistent with another.
    #[error("invalid value for {flag}: {reason}")]
    Usage { flag: String, reason: String },

    /// A data file that exists but can not be trusted (bad magic, wrong size, truncated, ...).
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },

    /// An I/O failure on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A dataset's files are not where we looked and could not be downloaded.
    #[error("{0}")]
    DataNotFound(String),

    /// Every mirror failed for a file.
    #[error("could not download {file}: {reason}")]
    Download { file: String, reason: String },

    /// No usable GPU adapter, a missing limit or feature, or a failure reported by the driver.
    #[error("GPU: {0}")]
    Gpu(String),

    /// A kernel or op was called with inconsistent shapes (a bug in the caller, reported not panicked).
    #[error("shape mismatch in {op}: {reason}")]
    Shape { op: &'static str, reason: String },

    /// Training diverged (NaN or infinite loss).
    #[error("{0}")]
    Numerical(String),

    /// An external command (a --baseline) failed.
    #[error("{0}")]
    Command(String),

    /// Some of several inputs could not be used (each was reported on its own line before).
    #[error("{0}")]
    Inputs(String),

    /// The user interrupted the run (Ctrl-C); the message says what was saved.
    #[error("{0}")]
    Interrupted(String),
}

impl Error {
    /// The process exit status for this error: 2 for usage mistakes, 1 for runtime failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage { .. } => 2,
            Error::Interrupted(_) => 130,
            _ => 1,
        }
    }

    pub fn usage(flag: &str, reason: impl Into<String>) -> Self {
        Error::Usage {
            flag: flag.to_string(),
            reason: reason.into(),
        }
    }

    pub fn bad_file(path: &Path, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::NotFound => Error::bad_file(path, "not found"),
            std::io::ErrorKind::PermissionDenied => Error::bad_file(path, "permission denied"),
            _ => Error::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }

    pub fn shape(op: &'static str, reason: impl Into<String>) -> Self {
        Error::Shape {
            op,
            reason: reason.into(),
        }
    }
}
