//! The content checks of the four MNIST files, shared by the downloader and by the readers of
//! files that arrive as bytes (the browser page): size and SHA-256 of the decompressed content,
//! computed in the same pass that reads it.
//!
//! Contract: `Mnist::from_bytes` returns data only after every file's IDX structure (see `idx`)
//! and its size and SHA-256 (the values pinned in `MNIST_FILES`) have been checked; every error
//! names the file as `NAME.gz` (or `NAME` for raw bytes) and says what is wrong in one line.

use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::{idx, Dataset, Mnist, MnistFile, MNIST_FILES};
use crate::error::{Error, Result};

/// Whether `bytes` start as gzip data does.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// A reader that hashes and counts what passes through it.
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// Read what is left, then compare size and digest with `file`'s pinned values.
    pub fn finish(mut self, file: &MnistFile) -> std::result::Result<(), String> {
        let mut rest = [0u8; 1 << 14];
        loop {
            match self.read(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("its content could not be read to the end ({e})")),
            }
        }
        let digest: String = self.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if self.size != file.size || digest != file.sha256 {
            return Err(format!(
                "checksum mismatch: got {} bytes with SHA-256 {digest}, expected {} bytes with {}",
                self.size, file.size, file.sha256
            ));
        }
        Ok(())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// Parse one file's bytes with `parse` while hashing its content, then check size and digest.
fn read_checked<T>(
    bytes: &[u8],
    file: &MnistFile,
    parse: impl FnOnce(&mut dyn Read, &Path, bool) -> Result<T>,
) -> Result<T> {
    let gzip = is_gzip(bytes);
    let name = match gzip {
        true => format!("{}.gz", file.name),
        false => file.name.to_string(),
    };
    let path = Path::new(&name);
    if bytes.is_empty() {
        return Err(Error::bad_file(path, "is empty (0 bytes)"));
    }
    let content: Box<dyn Read + '_> = match gzip {
        true => Box::new(MultiGzDecoder::new(bytes)),
        false => Box::new(bytes),
    };
    // At most one byte past the pinned size is read, so that a gzip bomb fails the size check
    // instead of filling memory.
    let mut reader = Hashing::new(content.take(file.size + 1));
    let value = parse(&mut reader, path, gzip)?;
    reader.finish(file).map_err(|why| Error::bad_file(path, why))?;
    Ok(value)
}

impl Mnist {
    /// Check and read the four files from bytes, in `MNIST_FILES` order (train images, train
    /// labels, test images, test labels), each gzip-compressed or raw.
    pub fn from_bytes(files: [&[u8]; 4]) -> Result<Mnist> {
        let images = |i: usize| read_checked(files[i], &MNIST_FILES[i], idx::read_images_from);
        let labels = |i: usize| read_checked(files[i], &MNIST_FILES[i], idx::read_labels_from);
        let pair = |i: usize| -> Result<Dataset> {
            let (count, pixels) = images(i)?;
            let labels = labels(i + 1)?;
            if count != labels.len() {
                return Err(Error::bad_file(
                    Path::new(MNIST_FILES[i + 1].name),
                    format!(
                        "holds {} labels but {} holds {count} images",
                        labels.len(),
                        MNIST_FILES[i].name
                    ),
                ));
            }
            Dataset::new(pixels, labels)
        };
        Ok(Mnist {
            train: pair(0)?,
            test: pair(2)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_of_the_wrong_content_are_refused_naming_the_file() {
        // A well-formed IDX labels file that is not MNIST's: the checksum names it.
        let mut labels = 0x0000_0801u32.to_be_bytes().to_vec();
        labels.extend_from_slice(&3u32.to_be_bytes());
        labels.extend_from_slice(&[1, 2, 3]);
        let err = read_checked(&labels, &MNIST_FILES[1], idx::read_labels_from).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("train-labels-idx1-ubyte") && text.contains("checksum mismatch"),
            "{text}"
        );
        // Garbage: the IDX reader's message, naming the file.
        let err = read_checked(b"hello", &MNIST_FILES[0], idx::read_images_from).unwrap_err();
        assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");
        let err = read_checked(&[0x1f, 0x8b, 1, 2], &MNIST_FILES[2], idx::read_images_from).unwrap_err();
        assert!(err.to_string().contains("t10k-images-idx3-ubyte.gz"), "{err}");
    }
}
