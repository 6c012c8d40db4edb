//! A bounded, deterministic fuzz harness for every parser that reads untrusted bytes: the IDX
//! reader (raw and gzip), the checkpoint loader and the image decoder (PNG, PGM) with the MNIST
//! conversion. Each target gets valid seed inputs, then thousands of mutations of them (bit flips,
//! extreme header fields, truncation, insertion), plus every file in `tests/corpus/`, the inputs
//! that once found bugs. A case passes when the parser returns (Ok or a clean Err) without
//! panicking, within a time limit, and without any single allocation larger than the input
//! justifies (a counting global allocator measures it).
//!
//! FUZZ_CASES=N raises the number of mutations per seed (CI runs the default).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gpu_mnist::checkpoint::{self, Checkpoint};
use gpu_mnist::data::idx::{read_images_from, read_labels_from};
use gpu_mnist::data::DatasetKind;
use gpu_mnist::image::{decode_image, to_mnist};
use gpu_mnist::model::{glorot_init, ModelSpec};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// Tracks the largest single allocation made since the last reset.
struct CountingAlloc;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The most one input may justify: its own size many times over (deflate expands at most about
/// 1032:1, and buffers grow by doubling), plus a fixed allowance for the parser's own buffers.
fn allocation_limit(input: usize) -> usize {
    2200 * input + (8 << 20)
}

const TIME_LIMIT: Duration = Duration::from_secs(3);

/// Run `parse` on `input`; fail the test on a panic, a hang or an unjustified allocation.
fn check(target: &str, input: &[u8], parse: &dyn Fn(&[u8]) -> bool) -> bool {
    LARGEST.store(0, Ordering::Relaxed);
    let t0 = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(input)));
    let (elapsed, largest) = (t0.elapsed(), LARGEST.load(Ordering::Relaxed));
    let ok = match outcome {
        Ok(ok) => ok,
        Err(_) => {
            save_failure(target, input);
            panic!(
                "{target}: the parser panicked on a {}-byte input (saved under tests/corpus/)",
                input.len()
            );
        }
    };
    if elapsed > TIME_LIMIT || largest > allocation_limit(input.len()) {
        save_failure(target, input);
        panic!(
            "{target}: {}-byte input took {elapsed:?} and allocated {largest} bytes at once",
            input.len()
        );
    }
    ok
}

/// Keep an input that found a bug, so that it stays a regression test.
fn save_failure(target: &str, input: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(target);
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("found-{:016x}", fxhash(input))), input);
}

fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// One random mutation of `seed`.
fn mutate(rng: &mut ChaCha8Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    let n = v.len().max(1);
    match rng.random_range(0..6u8) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..n);
                if let Some(b) = v.get_mut(i) {
                    *b ^= 1 << rng.random_range(0..8);
                }
            }
        }
        1 => {
            // An extreme 32-bit field somewhere in the first 64 bytes (the headers).
            let extremes = [0u32, 1, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 28, 60_000, 10];
            let at = rng.random_range(0..n.min(64));
            let value = extremes[rng.random_range(0..extremes.len())];
            let bytes = if rng.random_range(0..2) == 0 {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            for (k, b) in bytes.iter().enumerate() {
                if let Some(slot) = v.get_mut(at + k) {
                    *slot = *b;
                }
            }
        }
        2 => v.truncate(rng.random_range(0..n)),
        3 => {
            let at = rng.random_range(0..=v.len());
            let extra: Vec<u8> = (0..rng.random_range(1..64))
                .map(|_| rng.random_range(0..=255u8))
                .collect();
            v.splice(at..at, extra);
        }
        4 => {
            let i = rng.random_range(0..n);
            if let Some(b) = v.get_mut(i) {
                *b = if rng.random_range(0..2) == 0 { 0 } else { 0xff };
            }
        }
        _ => {
            // A large 64-bit little-endian value (the safetensors header length) at the start.
            let value: u64 = [u64::MAX, 1 << 40, 1 << 20, 7][rng.random_range(0..4)];
            for (k, b) in value.to_le_bytes().iter().enumerate() {
                if let Some(slot) = v.get_mut(k) {
                    *slot = *b;
                }
            }
        }
    }
    v
}

fn cases() -> usize {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

/// Corpus files first, then mutations of each seed; returns how many inputs parsed cleanly.
fn fuzz(target: &str, seeds: &[Vec<u8>], parse: &dyn Fn(&[u8]) -> bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(target);
    let mut corpus = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let bytes = std::fs::read(e.path()).unwrap();
            check(target, &bytes, parse);
            corpus += 1;
        }
    }
    for s in seeds {
        assert!(check(target, s, parse), "{target}: a valid seed input was rejected");
    }
    let mut r = rng(fxhash(target.as_bytes()));
    let mut accepted = 0;
    let total = cases() * seeds.len();
    for i in 0..total {
        let input = mutate(&mut r, &seeds[i % seeds.len()]);
        accepted += check(target, &input, parse) as usize;
    }
    println!("{target}: {corpus} corpus files and {total} mutations, {accepted} still parsed, none panicked, hung or over-allocated");
}

fn small_idx() -> (Vec<u8>, Vec<u8>) {
    let images = idx_bytes(
        0x803,
        &[3, 28, 28],
        &(0..3 * 784).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    );
    let labels = idx_bytes(0x801, &[3], &[1, 7, 9]);
    (images, labels)
}

#[test]
fn idx_reader_raw_and_gzip() {
    let (images, labels) = small_idx();
    let p = Path::new("fuzz-input");
    let raw = |b: &[u8]| {
        let a = read_images_from(&mut &b[..], p, false).is_ok();
        let l = read_labels_from(&mut &b[..], p, false).is_ok();
        a || l
    };
    fuzz("idx", &[images.clone(), labels.clone()], &raw);
    let gz = |b: &[u8]| {
        let mut d1 = flate2::read::MultiGzDecoder::new(b);
        let mut d2 = flate2::read::MultiGzDecoder::new(b);
        read_images_from(&mut d1 as &mut dyn Read, p, true).is_ok() || read_labels_from(&mut d2, p, true).is_ok()
    };
    fuzz("idx-gz", &[gzip(&images), gzip(&labels)], &gz);
}

#[test]
fn checkpoint_loader() {
    let spec = ModelSpec::mnist(&[3]);
    let model = checkpoint::to_bytes(&Checkpoint::model(&spec, glorot_init(&spec, 1), DatasetKind::Mnist)).unwrap();
    let full = checkpoint::to_bytes(&Checkpoint {
        optimizer: gpu_mnist::model::OptimizerState {
            velocities: glorot_init(&spec, 2),
            momenta: glorot_init(&spec, 3),
        },
        best: glorot_init(&spec, 4),
        state: Some(serde_json::json!({"epochs_done": 1})),
        ..Checkpoint::model(&spec, glorot_init(&spec, 1), DatasetKind::Mnist)
    })
    .unwrap();
    fuzz("checkpoint", &[model, full], &|b: &[u8]| {
        checkpoint::from_bytes(b).is_ok()
    });
}

fn png_bytes(w: u32, h: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(data).unwrap();
    }
    out
}

#[test]
fn image_decoder_and_mnist_conversion() {
    let digit: Vec<u8> = (0..784)
        .map(|i| if (i % 28 > 10) && (i % 28 < 16) { 255 } else { 0 })
        .collect();
    let rgba: Vec<u8> = (0..50 * 30)
        .flat_map(|i| [(i % 255) as u8, 20, 200, if i % 7 == 0 { 0 } else { 255 }])
        .collect();
    let pgm = [b"P5\n# a digit\n28 28\n255\n".as_slice(), &digit].concat();
    let pgm_ascii = format!("P2\n4 2\n15\n{}\n", "0 15 3 7 15 0 1 2").into_bytes();
    let seeds = vec![
        png_bytes(28, 28, png::ColorType::Grayscale, &digit),
        png_bytes(50, 30, png::ColorType::Rgba, &rgba),
        pgm,
        pgm_ascii,
    ];
    let parse = |b: &[u8]| match decode_image(b) {
        Ok(img) => {
            let _ = to_mnist(&img);
            true
        }
        Err(_) => false,
    };
    fuzz("image", &seeds, &parse);
}
