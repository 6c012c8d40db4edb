//! MNIST data: reading, validating, locating or downloading, and shuffled minibatch order.
//!
//! Contract: `Mnist::load(dir)` returns the train and test sets only after every file has been
//! validated (see `idx`) and image and label counts agree. Images stay u8 in memory (47 MB for the
//! training set); backends scale them to f32 / 255 per batch.

pub mod check;
#[cfg(not(target_arch = "wasm32"))]
pub mod download;
pub mod idx;
#[cfg(not(target_arch = "wasm32"))]
pub mod locate;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
pub use idx::{CLASSES, IMAGE_PIXELS, IMAGE_SIDE};

/// One of the four canonical MNIST files.
#[derive(Debug, Clone, Copy)]
pub struct MnistFile {
    /// Base name without `.gz`, e.g. `train-images-idx3-ubyte`.
    pub name: &'static str,
    /// SHA-256 of the decompressed content (from shared/data/mnist/README.md).
    pub sha256: &'static str,
    /// Decompressed size in bytes.
    pub size: u64,
}

/// The four files, in the order train images, train labels, test images, test labels.
pub const MNIST_FILES: [MnistFile; 4] = [
    MnistFile {
        name: "train-images-idx3-ubyte",
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        size: 47_040_016,
    },
    MnistFile {
        name: "train-labels-idx1-ubyte",
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        size: 60_008,
    },
    MnistFile {
        name: "t10k-images-idx3-ubyte",
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        size: 7_840_016,
    },
    MnistFile {
        name: "t10k-labels-idx1-ubyte",
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        size: 10_008,
    },
];

/// Images (u8, row-major 28x28 each) and their labels. Shared, never copied per backend.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// (len, 784) pixels, 0-255.
    pub images: Arc<[u8]>,
    /// (len,) labels, 0-9.
    pub labels: Arc<[u8]>,
}

impl Dataset {
    pub fn new(images: Vec<u8>, labels: Vec<u8>) -> Result<Self> {
        if images.len() != labels.len() * IMAGE_PIXELS {
            return Err(Error::shape(
                "Dataset::new",
                format!("{} pixels for {} labels", images.len(), labels.len()),
            ));
        }
        Ok(Dataset {
            images: images.into(),
            labels: labels.into(),
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` examples (all of them when `n` is larger).
    pub fn first(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        Dataset {
            images: self.images[..n * IMAGE_PIXELS].into(),
            labels: self.labels[..n].into(),
        }
    }
}

/// The training and test sets.
#[derive(Debug, Clone)]
pub struct Mnist {
    pub train: Dataset,
    pub test: Dataset,
}

/// Where a file of the set lives in `dir`: `NAME.gz` if present, else the raw `NAME`.
/// When neither exists, the `.gz` path is returned so that the error names it.
pub fn file_path(dir: &Path, file: &MnistFile) -> PathBuf {
    let gz = dir.join(format!("{}.gz", file.name));
    let raw = dir.join(file.name);
    if !gz.exists() && raw.exists() {
        raw
    } else {
        gz
    }
}

/// True when every one of the four files exists in `dir` (gzip or raw).
pub fn dir_has_all_files(dir: &Path) -> bool {
    MNIST_FILES.iter().all(|f| file_path(dir, f).exists())
}

fn load_pair(dir: &Path, images: &MnistFile, labels: &MnistFile) -> Result<Dataset> {
    let images_path = file_path(dir, images);
    let labels_path = file_path(dir, labels);
    let (count, pixels) = idx::read_images(&images_path)?;
    let labels = idx::read_labels(&labels_path)?;
    if count != labels.len() {
        return Err(Error::bad_file(
            &labels_path,
            format!(
                "holds {} labels but {} holds {count} images",
                labels.len(),
                images_path.display()
            ),
        ));
    }
    Dataset::new(pixels, labels)
}

impl Mnist {
    /// Load and validate the four files from `dir`.
    pub fn load(dir: &Path) -> Result<Mnist> {
        let train = load_pair(dir, &MNIST_FILES[0], &MNIST_FILES[1])?;
        let test = load_pair(dir, &MNIST_FILES[2], &MNIST_FILES[3])?;
        Ok(Mnist { train, test })
    }
}

/// The order in which epoch `epoch` (0-based) visits `n` examples: a fresh seeded shuffle.
///
/// Each epoch draws from its own ChaCha8 stream of `seed`, so an epoch's order does not depend on
/// what ran before it (a resumed run sees the same orders).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1 + epoch as u64);
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut rng);
    order
}

/// Batch boundaries over `n` examples: (start, rows) pairs, the final partial batch kept.
pub fn batches(n: usize, batch_size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(batch_size.max(1))
        .map(move |start| (start, batch_size.min(n - start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_the_final_partial_batch() {
        let b: Vec<_> = batches(60_000, 128).collect();
        assert_eq!(b.len(), 469);
        assert_eq!(b[468], (59_904, 96));
        assert!(b[..468].iter().all(|&(_, r)| r == 128));
    }

    #[test]
    fn epoch_orders_are_permutations_that_differ_by_epoch_and_repeat_by_seed() {
        let a = epoch_order(1000, 7, 0);
        let b = epoch_order(1000, 7, 1);
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(1000, 7, 0));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
    }
}
