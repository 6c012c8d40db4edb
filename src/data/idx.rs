//! IDX file reader (the MNIST container format), gzip-compressed or raw.
//!
//! Contract: `read_images` / `read_labels` return the payload only after the whole file has been
//! validated: magic number (2051 images, 2049 labels), 28x28 images, and the payload length exactly
//! matching the header. Nothing is allocated from header values: the payload is read incrementally,
//! so a header claiming 2^31 images in a small file fails with "truncated", not an allocation.
//! Every error names the file and the problem in one line.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::error::{Error, Result};

/// Magic number of an IDX file of u8 images (rank 3).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of u8 labels (rank 1).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// MNIST image side, in pixels.
pub const IMAGE_SIDE: usize = 28;
/// Pixels per image.
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
/// Number of classes (digits 0-9).
pub const CLASSES: usize = 10;

/// Open a file for reading, decompressing when it is gzip. A name ending `.gz` must be gzip.
fn open_payload(path: &Path) -> Result<(Box<dyn Read>, bool)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::bad_file(path, "is a directory, expected an IDX file"));
    }
    if !meta.is_file() {
        return Err(Error::bad_file(path, "is not a regular file"));
    }
    if meta.len() == 0 {
        return Err(Error::bad_file(path, "is empty (0 bytes)"));
    }
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 2];
    let got = read_up_to(&mut file, &mut magic).map_err(|e| Error::io(path, e))?;
    let is_gzip = got == 2 && magic == [0x1f, 0x8b];
    let named_gz = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    if named_gz && !is_gzip {
        return Err(Error::bad_file(
            path,
            "is named .gz but is not gzip data (no gzip magic bytes 1f 8b)",
        ));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = BufReader::with_capacity(1 << 16, file);
    if is_gzip {
        Ok((Box::new(MultiGzDecoder::new(reader)), true))
    } else {
        Ok((Box::new(reader), false))
    }
}

/// Read until `buf` is full or EOF; returns the number of bytes read.
fn read_up_to(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Describe a read error in the user's terms (gzip streams fail in their own ways).
fn read_error(path: &Path, gzip: bool, err: std::io::Error) -> Error {
    if !gzip {
        return Error::io(path, err);
    }
    let reason = match err.kind() {
        std::io::ErrorKind::UnexpectedEof => "truncated gzip stream (the file ends early)".to_string(),
        _ => format!("corrupt gzip data ({err})"),
    };
    Error::bad_file(path, reason)
}

/// Parse an IDX stream: check the magic and rank, return the dimensions and exactly the payload.
///
/// `expected_magic` is `IMAGES_MAGIC` or `LABELS_MAGIC`. The payload is read in pieces, so its
/// buffer only grows as far as the data that really exists.
pub fn parse_idx(reader: &mut dyn Read, path: &Path, gzip: bool, expected_magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut head = [0u8; 4];
    let got = read_up_to(reader, &mut head).map_err(|e| read_error(path, gzip, e))?;
    if got < 4 {
        return Err(Error::bad_file(
            path,
            format!("too short for an IDX header ({got} bytes)"),
        ));
    }
    let magic = u32::from_be_bytes(head);
    if magic != expected_magic {
        let kind = if expected_magic == IMAGES_MAGIC {
            "images"
        } else {
            "labels"
        };
        return Err(Error::bad_file(
            path,
            format!("wrong magic number {magic} (0x{magic:08x}); an IDX file of {kind} starts with {expected_magic}"),
        ));
    }
    let rank = (magic & 0xff) as usize;
    let mut dims_raw = vec![0u8; 4 * rank];
    let got = read_up_to(reader, &mut dims_raw).map_err(|e| read_error(path, gzip, e))?;
    if got < dims_raw.len() {
        return Err(Error::bad_file(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = dims_raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let payload_len = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| Error::bad_file(path, "header dimensions overflow"))?;
    // Read at most one byte more than the header promises: enough to detect trailing data, and
    // (for gzip) to reach the end of the stream so that its CRC is checked.
    let mut payload = Vec::new();
    reader
        .take(payload_len.saturating_add(1))
        .read_to_end(&mut payload)
        .map_err(|e| read_error(path, gzip, e))?;
    let have = payload.len() as u64;
    if have < payload_len {
        return Err(Error::bad_file(
            path,
            format!(
                "truncated: the header ({}) promises {payload_len} bytes of data, but only {have} follow",
                dims_text(&dims)
            ),
        ));
    }
    if have > payload_len {
        return Err(Error::bad_file(
            path,
            format!(
                "has data past the {payload_len} bytes its header ({}) describes",
                dims_text(&dims)
            ),
        ));
    }
    Ok((dims, payload))
}

fn dims_text(dims: &[usize]) -> String {
    dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" x ")
}

/// Read an IDX images file: returns (count, pixels) with pixels of length count * 784.
pub fn read_images(path: &Path) -> Result<(usize, Vec<u8>)> {
    let (mut reader, gzip) = open_payload(path)?;
    read_images_from(&mut reader, path, gzip)
}

/// `read_images` over any stream (used by the fuzz and unit tests).
pub fn read_images_from(reader: &mut dyn Read, path: &Path, gzip: bool) -> Result<(usize, Vec<u8>)> {
    let (dims, pixels) = parse_idx(reader, path, gzip, IMAGES_MAGIC)?;
    if dims[1] != IMAGE_SIDE || dims[2] != IMAGE_SIDE {
        return Err(Error::bad_file(
            path,
            format!("images are {}x{}, expected {IMAGE_SIDE}x{IMAGE_SIDE}", dims[1], dims[2]),
        ));
    }
    if dims[0] == 0 {
        return Err(Error::bad_file(path, "holds no images"));
    }
    Ok((dims[0], pixels))
}

/// Read an IDX labels file: every label must be a digit 0-9.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let (mut reader, gzip) = open_payload(path)?;
    read_labels_from(&mut reader, path, gzip)
}

/// `read_labels` over any stream.
pub fn read_labels_from(reader: &mut dyn Read, path: &Path, gzip: bool) -> Result<Vec<u8>> {
    let (_dims, labels) = parse_idx(reader, path, gzip, LABELS_MAGIC)?;
    if labels.is_empty() {
        return Err(Error::bad_file(path, "holds no labels"));
    }
    if let Some((i, &bad)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= CLASSES) {
        return Err(Error::bad_file(
            path,
            format!("label {i} is {bad}, expected a digit 0-9"),
        ));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn reads_a_valid_images_stream() -> Result<()> {
        let bytes = idx(IMAGES_MAGIC, &[2, 28, 28], &[7u8; 2 * 784]);
        let (n, px) = read_images_from(&mut bytes.as_slice(), Path::new("x"), false)?;
        assert_eq!(n, 2);
        assert_eq!(px.len(), 2 * 784);
        Ok(())
    }

    #[test]
    fn huge_header_in_small_stream_is_truncated_not_allocated() {
        let bytes = idx(IMAGES_MAGIC, &[1 << 31, 28, 28], &[0u8; 100]);
        let err = read_images_from(&mut bytes.as_slice(), Path::new("x"), false).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn trailing_data_and_bad_labels_are_rejected() {
        let bytes = idx(LABELS_MAGIC, &[2], &[1, 2, 3]);
        let err = read_labels_from(&mut bytes.as_slice(), Path::new("x"), false).unwrap_err();
        assert!(err.to_string().contains("past"), "{err}");
        let bytes = idx(LABELS_MAGIC, &[2], &[1, 10]);
        let err = read_labels_from(&mut bytes.as_slice(), Path::new("x"), false).unwrap_err();
        assert!(err.to_string().contains("label 1 is 10"), "{err}");
    }
}
