//! MNIST-shaped data (MNIST, Fashion-MNIST, KMNIST: see `catalog`): reading, validating, locating
//! or downloading, and shuffled minibatch order.
//!
//! Contract: `Mnist::load(dir)` returns the train and test sets only after every file has been
//! validated (see `idx`) and image and label counts agree. Images stay u8 in memory (47 MB for the
//! training set); backends scale them to f32 / 255 per batch.

pub mod catalog;
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
pub use catalog::{DataFile, DatasetKind, Pin, MNIST_FILES};
pub use idx::{CLASSES, IMAGE_PIXELS, IMAGE_SIDE};

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
pub fn file_path(dir: &Path, file: &DataFile) -> PathBuf {
    let gz = dir.join(format!("{}.gz", file.name));
    let raw = dir.join(file.name);
    if !gz.exists() && raw.exists() {
        raw
    } else {
        gz
    }
}

/// True when every one of the four files exists in `dir` (gzip or raw); the three datasets share
/// the names.
pub fn dir_has_all_files(dir: &Path) -> bool {
    MNIST_FILES.iter().all(|f| file_path(dir, f).exists())
}

fn load_pair(dir: &Path, images: &DataFile, labels: &DataFile) -> Result<Dataset> {
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
