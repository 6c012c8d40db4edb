//! The content checks of a dataset's four files, shared by the downloader and by the readers of
//! files that arrive as bytes (the browser page): size and checksum as the publisher pins them
//! (see `catalog::Pin`), computed in the same pass that reads the bytes.
//!
//! Contract: `Mnist::from_bytes` returns data only after every file's IDX structure (see `idx`)
//! and its pinned size and checksum have been checked; every error names the file as `NAME.gz`
//! (or `NAME` for raw bytes) and says what is wrong in one line. At most one byte past a pinned
//! size is ever read, so that a gzip bomb fails the size check instead of filling memory.

use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;
use md5::Md5;
use sha2::{Digest, Sha256};

use super::{idx, DataFile, Dataset, DatasetKind, Mnist, Pin};
use crate::error::{Error, Result};

/// Whether `bytes` start as gzip data does.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// A reader that hashes (with `D`) and counts what passes through it.
pub struct Hashing<R, D = Sha256> {
    inner: R,
    hasher: D,
    size: u64,
}

impl<R: Read, D: Digest> Hashing<R, D> {
    pub fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: D::new(),
            size: 0,
        }
    }

    /// Read what is left; the byte count and the lowercase hex digest of everything read.
    pub fn finish(mut self) -> std::result::Result<(u64, String), String> {
        let mut rest = [0u8; 1 << 14];
        loop {
            match self.read(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("its content could not be read to the end ({e})")),
            }
        }
        let digest = self.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok((self.size, digest))
    }
}

impl<R: Read, D: Digest> Read for Hashing<R, D> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// Compare what was read (`got`: bytes and hex digest) with a pinned size and digest.
fn compare(got: (u64, String), want: (u64, &str), algorithm: &str) -> std::result::Result<(), String> {
    if got.0 != want.0 || got.1 != want.1 {
        return Err(format!(
            "checksum mismatch: got {} bytes with {algorithm} {}, expected {} bytes with {algorithm} {}",
            got.0, got.1, want.0, want.1
        ));
    }
    Ok(())
}

/// Check a whole file as it lies on disk or arrives: `raw` is its bytes as stored (gzip or not).
/// A content pin hashes the decompressed bytes; a gzip pin hashes the stored bytes, which must
/// then be gzip. Returns whether the file is gzip-compressed.
pub fn check_stored(raw: impl Read, gzip: bool, file: &DataFile) -> std::result::Result<bool, String> {
    match file.pin {
        Pin::ContentSha256(sha256) => {
            let content: Box<dyn Read> = match gzip {
                true => Box::new(MultiGzDecoder::new(std::io::BufReader::new(raw))),
                false => Box::new(raw),
            };
            let got = Hashing::<_, Sha256>::new(content.take(file.size + 1)).finish()?;
            compare(got, (file.size, sha256), "SHA-256")?;
        }
        Pin::GzipMd5 { md5, gz_size } => {
            if !gzip {
                return Err(NOT_GZIP.to_string());
            }
            let got = Hashing::<_, Md5>::new(raw.take(gz_size + 1)).finish()?;
            compare(got, (gz_size, md5), "MD5")?;
        }
    }
    Ok(gzip)
}

const NOT_GZIP: &str = "is not gzip-compressed, and its publisher's checksum (MD5) is of the .gz file";

/// Parse one file's bytes with `parse` while checking them against `file`'s pin.
fn read_checked<T>(
    bytes: &[u8],
    file: &DataFile,
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
    let mut content = content.take(file.size + 1);
    let bad = |why: String| Error::bad_file(path, why);
    match file.pin {
        // The content is hashed in the same pass that parses it.
        Pin::ContentSha256(sha256) => {
            let mut reader = Hashing::<_, Sha256>::new(content);
            let value = parse(&mut reader, path, gzip)?;
            compare(reader.finish().map_err(bad)?, (file.size, sha256), "SHA-256").map_err(bad)?;
            Ok(value)
        }
        // The stored bytes are all in memory: checked before they are parsed.
        Pin::GzipMd5 { .. } => {
            check_stored(bytes, gzip, file).map_err(bad)?;
            parse(&mut content, path, gzip)
        }
    }
}

impl Mnist {
    /// Check and read `kind`'s four files from bytes, in `DatasetKind::files` order (train
    /// images, train labels, test images, test labels), each gzip-compressed or raw (raw only
    /// where the pin is of the content).
    pub fn from_bytes(kind: DatasetKind, files: [&[u8]; 4]) -> Result<Mnist> {
        let pinned = kind.files();
        let images = |i: usize| read_checked(files[i], &pinned[i], idx::read_images_from);
        let labels = |i: usize| read_checked(files[i], &pinned[i], idx::read_labels_from);
        let pair = |i: usize| -> Result<Dataset> {
            let (count, pixels) = images(i)?;
            let labels = labels(i + 1)?;
            if count != labels.len() {
                return Err(Error::bad_file(
                    Path::new(pinned[i + 1].name),
                    format!(
                        "holds {} labels but {} holds {count} images",
                        labels.len(),
                        pinned[i].name
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
    use crate::data::MNIST_FILES;

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

#[cfg(test)]
mod gzip_pin_tests {
    use std::io::Write;

    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn hex(digest: &[u8]) -> String {
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_gzip_pin_checks_the_stored_bytes_and_refuses_raw_ones() {
        let mut labels = 0x0000_0801u32.to_be_bytes().to_vec();
        labels.extend_from_slice(&3u32.to_be_bytes());
        labels.extend_from_slice(&[1, 2, 3]);
        let gz = gzip(&labels);
        let md5: &'static str = Box::leak(hex(&Md5::digest(&gz)).into_boxed_str());
        let file = DataFile {
            name: "train-labels-idx1-ubyte",
            size: labels.len() as u64,
            pin: Pin::GzipMd5 {
                md5,
                gz_size: gz.len() as u64,
            },
        };
        assert_eq!(read_checked(&gz, &file, idx::read_labels_from).unwrap(), vec![1, 2, 3]);
        assert_eq!(check_stored(gz.as_slice(), true, &file), Ok(true));
        // The same labels compressed otherwise: the content agrees, the publisher's MD5 does not.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&labels).unwrap();
        let mut other = enc.finish().unwrap();
        other[4] ^= 1; // the gzip header's modification time: still a valid stream
        let err = read_checked(&other, &file, idx::read_labels_from)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train-labels-idx1-ubyte.gz") && err.contains("checksum mismatch") && err.contains("MD5"),
            "{err}"
        );
        let err = read_checked(&labels, &file, idx::read_labels_from)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not gzip-compressed"), "{err}");
        println!("{err}");
    }
}
