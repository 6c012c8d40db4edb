//! One run per folder: a run holds an advisory lock on its `--out` and `--checkpoint-dir` folders
//! for its lifetime, so that a second run on the same folder is refused before it writes anything
//! instead of overwriting the first one's checkpoint and records.
//!
//! Contract: `FolderLock::acquire` creates `DIR/.gpu-mnist.lock`, takes an exclusive lock on it
//! without waiting (`File::try_lock`: flock on Unix, LockFileEx on Windows) and writes the process
//! id into it; the lock goes with the process (dropped, or the process killed), so a killed run
//! leaves nothing that blocks `--resume`. The file is removed when the lock is dropped.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file's name inside a locked folder.
pub const LOCK_FILE: &str = ".gpu-mnist.lock";

/// An exclusive lock on a folder, held until dropped.
#[derive(Debug)]
pub struct FolderLock {
    file: File,
    path: PathBuf,
}

impl FolderLock {
    /// Lock `dir` (which must exist) for this process, or say which run holds it.
    pub fn acquire(dir: &Path) -> Result<FolderLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::bad_file(dir, format!("could not create its lock file {LOCK_FILE} ({e})")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let who = match holder.trim().parse::<u32>() {
                    Ok(pid) => format!("another gpu-mnist run (process {pid})"),
                    Err(_) => "another gpu-mnist run".to_string(),
                };
                return Err(Error::bad_file(
                    dir,
                    format!("is in use by {who}; wait for it to end or choose another folder"),
                ));
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::bad_file(dir, format!("could not be locked for this run ({e})")));
            }
        }
        // The holder's process id, for the message a second run gives.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        let _ = file.sync_all();
        Ok(FolderLock { file, path })
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Removed while still locked, so that no other run takes the lock of a file on its way out.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_folder_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = FolderLock::acquire(dir.path()).unwrap();
        let err = FolderLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("process {}", std::process::id())), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        drop(first);
        assert!(!dir.path().join(LOCK_FILE).exists());
        let again = FolderLock::acquire(dir.path());
        assert!(again.is_ok());
    }
}
