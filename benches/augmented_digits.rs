//! The picture of augmented digits in the README: the first 8 training images of MNIST as they
//! are (top row) and as three training steps of `--model accurate`'s augmentation
//! (shift:2,rotate:10,scale:0.1, seed 0) gather them (rows below), through the reference's
//! augmented gather, which every device matches. Writes a PNG to standard output:
//!
//!   cargo bench --bench augmented_digits > benches/augmented_digits.png

use gpu_mnist::backend::ops::{augment, Augment};
use gpu_mnist::backend::reference as r;
use gpu_mnist::data::Mnist;

const DIGITS: usize = 8;
const CELL: usize = 30;
const SCALE: usize = 2;

fn main() {
    let dir = std::env::var("GPU_MNIST_DATA").unwrap_or_else(|_| "../shared/data/mnist".to_string());
    let mnist = match Mnist::load(std::path::Path::new(&dir)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("augmented_digits: MNIST is needed in {dir} ({e})");
            std::process::exit(1);
        }
    };
    let order: Vec<u32> = (0..DIGITS as u32).collect();
    let aug = Augment {
        key: augment::key_of(0),
        ..Augment::parse("shift:2,rotate:10,scale:0.1").expect("valid words")
    };
    let mut rows = vec![vec![0.0f32; DIGITS * 784]];
    r::gather_batch(&mut rows[0], &mnist.train.images, &order, 0, DIGITS, 784);
    for step in 0..3 {
        let mut x = vec![0.0f32; DIGITS * 784];
        r::gather_augmented(&mut x, &mnist.train.images, &order, (0, DIGITS), &aug, step);
        rows.push(x);
    }
    // White paper, black ink, each pixel drawn SCALE x SCALE.
    let (w, h) = (DIGITS * CELL * SCALE, rows.len() * CELL * SCALE);
    let mut grey = vec![255u8; w * h];
    for (row, x) in rows.iter().enumerate() {
        for d in 0..DIGITS {
            for p in 0..784 {
                let ink = 255 - (x[d * 784 + p].clamp(0.0, 1.0) * 255.0).round() as u8;
                let (px, py) = (d * CELL + 1 + p % 28, row * CELL + 1 + p / 28);
                for dy in 0..SCALE {
                    let start = (py * SCALE + dy) * w + px * SCALE;
                    grey[start..start + SCALE].fill(ink);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w as u32, h as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let written = encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&grey));
    if let Err(e) = written {
        eprintln!("augmented_digits: {e}");
        std::process::exit(1);
    }
    use std::io::Write;
    if std::io::stdout().write_all(&out).is_err() {
        std::process::exit(1);
    }
}
