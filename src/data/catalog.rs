//! The datasets gpu-mnist knows: MNIST and its two drop-in siblings, Fashion-MNIST and KMNIST.
//! All three are four IDX files with the same names, 60,000 training and 10,000 test images of
//! 28x28 u8 pixels and labels 0-9; they differ in what the classes mean, where they are published
//! and how the publisher pins them.
//!
//! Contract: `DatasetKind::files()` lists the four files in the order train images, train labels,
//! test images, test labels, each with the decompressed size and the checksum its publisher gives
//! (see `Pin`); `class_names()` has ten names in label order; `key()` is the one word used on the
//! command line (`--dataset`), for the cache folder and in model files.

use std::fmt;

/// How a file's bytes are pinned: the checksum as its source publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// SHA-256 of the decompressed content (MNIST, as listed in the data folder's README; it is
    /// the same whichever mirror compressed the file).
    ContentSha256(&'static str),
    /// MD5 and size of the `.gz` file as published (Fashion-MNIST's README, torchvision's KMNIST
    /// list): only the publisher's own compressed bytes match.
    GzipMd5 { md5: &'static str, gz_size: u64 },
}

/// One of the four files of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataFile {
    /// Base name without `.gz`, e.g. `train-images-idx3-ubyte`.
    pub name: &'static str,
    /// Decompressed size in bytes (the IDX header and payload).
    pub size: u64,
    /// The published checksum.
    pub pin: Pin,
}

impl DataFile {
    /// The most bytes a download of this file may take: its pinned compressed size, or for a
    /// content pin the decompressed size (gzip of MNIST is always smaller); one more byte shows
    /// that a mirror sent too much.
    pub fn download_limit(&self) -> u64 {
        match self.pin {
            Pin::GzipMd5 { gz_size, .. } => gz_size,
            Pin::ContentSha256(_) => self.size,
        }
    }
}

/// The four files' names and decompressed sizes, shared by the three datasets.
const NAMES: [(&str, u64); 4] = [
    ("train-images-idx3-ubyte", 47_040_016),
    ("train-labels-idx1-ubyte", 60_008),
    ("t10k-images-idx3-ubyte", 7_840_016),
    ("t10k-labels-idx1-ubyte", 10_008),
];

const fn file(i: usize, pin: Pin) -> DataFile {
    DataFile {
        name: NAMES[i].0,
        size: NAMES[i].1,
        pin,
    }
}

const fn md5(i: usize, md5: &'static str, gz_size: u64) -> DataFile {
    file(i, Pin::GzipMd5 { md5, gz_size })
}

/// MNIST: SHA-256 of the decompressed files.
pub const MNIST_FILES: [DataFile; 4] = [
    file(
        0,
        Pin::ContentSha256("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    ),
    file(
        1,
        Pin::ContentSha256("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    ),
    file(
        2,
        Pin::ContentSha256("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    ),
    file(
        3,
        Pin::ContentSha256("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ),
];

/// Fashion-MNIST: the MD5s in Zalando Research's README (github.com/zalandoresearch/fashion-mnist,
/// "Get the Data"), and the sizes its download servers send.
pub const FASHION_FILES: [DataFile; 4] = [
    md5(0, "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26_421_880),
    md5(1, "25c81989df183df01b3e8a0aad5dffbe", 29_515),
    md5(2, "bef4ecab320f06d8554ea6380940ec79", 4_422_102),
    md5(3, "bb300cfdad3c16e7a12a480ee83cd310", 5_148),
];

/// KMNIST: the MD5s torchvision pins for ROIS-CODH's files (torchvision.datasets.KMNIST), and the
/// sizes CODH's server sends.
pub const KMNIST_FILES: [DataFile; 4] = [
    md5(0, "bdb82020997e1d708af4cf47b453dcf7", 18_165_135),
    md5(1, "e144d726b3acfaa3e44228e80efcd344", 29_497),
    md5(2, "5c965bf0a639b31b8f53240b1b52f4d7", 3_041_136),
    md5(3, "7320c461ea6c1c855c0b718fb2a4b134", 5_120),
];

/// Which dataset: MNIST's handwritten digits or one of its siblings of the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DatasetKind {
    #[default]
    Mnist,
    /// Zalando's Fashion-MNIST: photos of clothes, shoes and bags.
    Fashion,
    /// Kuzushiji-MNIST: ten cursive Japanese (hiragana) characters.
    Kmnist,
}

impl DatasetKind {
    pub const ALL: [DatasetKind; 3] = [DatasetKind::Mnist, DatasetKind::Fashion, DatasetKind::Kmnist];

    /// The word for it on the command line, in cache folder names and in model files.
    pub fn key(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::Fashion => "fashion",
            DatasetKind::Kmnist => "kmnist",
        }
    }

    /// The dataset whose `key()` is `key`.
    pub fn from_key(key: &str) -> Option<DatasetKind> {
        DatasetKind::ALL.into_iter().find(|d| d.key() == key)
    }

    /// Its usual name.
    pub fn title(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "MNIST",
            DatasetKind::Fashion => "Fashion-MNIST",
            DatasetKind::Kmnist => "KMNIST",
        }
    }

    /// The four files with their pinned checksums.
    pub fn files(self) -> &'static [DataFile; 4] {
        match self {
            DatasetKind::Mnist => &MNIST_FILES,
            DatasetKind::Fashion => &FASHION_FILES,
            DatasetKind::Kmnist => &KMNIST_FILES,
        }
    }

    /// The ten class names in label order (MNIST's are its digits).
    pub fn class_names(self) -> &'static [&'static str; 10] {
        match self {
            DatasetKind::Mnist => &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
            // Fashion-MNIST's README, "Labels".
            DatasetKind::Fashion => &[
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ],
            // KMNIST's classmap: the hiragana, romanised as torchvision names them.
            DatasetKind::Kmnist => &["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
        }
    }

    /// Whether its class names are just the label numbers.
    pub fn classes_are_digits(self) -> bool {
        self == DatasetKind::Mnist
    }

    /// Where it is published, tried in order (base URLs; the file is `BASE/NAME.gz`).
    pub fn default_mirrors(self) -> &'static [&'static str] {
        match self {
            // torchvision's list, plus Google's copy used by TensorFlow.
            DatasetKind::Mnist => &[
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
                "http://yann.lecun.com/exdb/mnist/",
            ],
            // Zalando's own server and repository, and the copy Keras downloads (byte-identical).
            DatasetKind::Fashion => &[
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            ],
            // ROIS-CODH, the publisher, over HTTPS and over HTTP (the address torchvision uses).
            DatasetKind::Kmnist => &[
                "https://codh.rois.ac.jp/kmnist/dataset/kmnist/",
                "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
            ],
        }
    }

    /// The environment variable naming a folder that holds its files.
    pub fn data_env(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "GPU_MNIST_DATA",
            DatasetKind::Fashion => "GPU_MNIST_FASHION_DATA",
            DatasetKind::Kmnist => "GPU_MNIST_KMNIST_DATA",
        }
    }

    /// The environment variable replacing its mirror list (comma-separated base URLs).
    pub fn mirrors_env(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "GPU_MNIST_MIRRORS",
            DatasetKind::Fashion => "GPU_MNIST_FASHION_MIRRORS",
            DatasetKind::Kmnist => "GPU_MNIST_KMNIST_MIRRORS",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dataset_pins_four_files_with_well_formed_checksums() {
        for kind in DatasetKind::ALL {
            assert_eq!(DatasetKind::from_key(kind.key()), Some(kind));
            assert_eq!(kind.class_names().len(), 10);
            for (f, (name, size)) in kind.files().iter().zip(NAMES) {
                assert_eq!((f.name, f.size), (name, size));
                let (hex, len) = match f.pin {
                    Pin::ContentSha256(h) => (h, 64),
                    Pin::GzipMd5 { md5, gz_size } => {
                        assert!(gz_size > 0 && gz_size < f.size, "{kind} {}", f.name);
                        (md5, 32)
                    }
                };
                assert_eq!(hex.len(), len, "{kind} {}", f.name);
                assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            }
        }
        assert_eq!(DatasetKind::from_key("cifar10"), None);
        assert_eq!(DatasetKind::Fashion.class_names()[7], "Sneaker");
    }
}
