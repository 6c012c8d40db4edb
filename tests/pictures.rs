//! Digits as people crop them: MNIST test digits made to look like scanned handwriting cropped
//! tightly (cropped to the ink, shrunk to 8-16 pixels, blurred, enlarged again to 24-64 pixels,
//! dark on white, the ink touching the edges). `predict` must read them at least as well as the
//! plain MNIST conversion of the same pictures (crop the ink, longest side 20 pixels, centre of
//! mass in 28x28, no thresholding) with the same weights, and refuse none of them.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use gpu_mnist::data::IMAGE_PIXELS;

/// Pictures in the set.
const COUNT: usize = 300;

fn write_png_gray(path: &Path, w: usize, h: usize, pixels: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(pixels).unwrap();
}

/// Area-averaging resample of (w, h) to (ow, oh).
fn resample(src: &[f32], (w, h): (usize, usize), (ow, oh): (usize, usize)) -> Vec<f32> {
    let (sx, sy) = (w as f64 / ow as f64, h as f64 / oh as f64);
    let mut out = vec![0.0; ow * oh];
    for oy in 0..oh {
        for ox in 0..ow {
            let (y0, y1, x0, x1) = (
                oy as f64 * sy,
                (oy + 1) as f64 * sy,
                ox as f64 * sx,
                (ox + 1) as f64 * sx,
            );
            let (mut acc, mut area) = (0.0, 0.0);
            for y in y0.floor() as usize..(y1.ceil() as usize).min(h) {
                let wy = (y1.min(y as f64 + 1.0) - y0.max(y as f64)).max(0.0);
                for x in x0.floor() as usize..(x1.ceil() as usize).min(w) {
                    let wx = (x1.min(x as f64 + 1.0) - x0.max(x as f64)).max(0.0);
                    acc += src[y * w + x] as f64 * wx * wy;
                    area += wx * wy;
                }
            }
            out[oy * ow + ox] = (acc / area.max(1e-12)) as f32;
        }
    }
    out
}

/// Bilinear enlargement of (w, h) to (ow, oh).
fn enlarge(src: &[f32], (w, h): (usize, usize), (ow, oh): (usize, usize)) -> Vec<f32> {
    let at = |x: usize, y: usize| src[y.min(h - 1) * w + x.min(w - 1)];
    let mut out = Vec::with_capacity(ow * oh);
    for oy in 0..oh {
        let fy = ((oy as f32 + 0.5) * h as f32 / oh as f32 - 0.5).max(0.0);
        for ox in 0..ow {
            let fx = ((ox as f32 + 0.5) * w as f32 / ow as f32 - 0.5).max(0.0);
            let (x, y, tx, ty) = (fx as usize, fy as usize, fx.fract(), fy.fract());
            let top = at(x, y) * (1.0 - tx) + at(x + 1, y) * tx;
            let bottom = at(x, y + 1) * (1.0 - tx) + at(x + 1, y + 1) * tx;
            out.push(top * (1.0 - ty) + bottom * ty);
        }
    }
    out
}

/// A 3x3 box blur.
fn blur(src: &[f32], (w, h): (usize, usize)) -> Vec<f32> {
    (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            let mut acc = 0.0;
            for (dx, dy) in (-1..=1).flat_map(|dx| (-1..=1).map(move |dy| (dx, dy))) {
                let (sx, sy) = ((x + dx).clamp(0, w as i64 - 1), (y + dy).clamp(0, h as i64 - 1));
                acc += src[sy as usize * w + sx as usize];
            }
            acc / 9.0
        })
        .collect()
}

/// The ink's bounding box (x0, y0, x1, y1) of a white-on-black image: pixels above `floor`.
fn ink_box(img: &[f32], (w, h): (usize, usize), floor: f32) -> (usize, usize, usize, usize) {
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if img[y * w + x] > floor {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
    }
    (x0, y0, x1, y1)
}

fn crop(img: &[f32], w: usize, (x0, y0, x1, y1): (usize, usize, usize, usize)) -> (Vec<f32>, (usize, usize)) {
    let data = (y0..=y1).flat_map(|y| (x0..=x1).map(move |x| img[y * w + x])).collect();
    (data, (x1 - x0 + 1, y1 - y0 + 1))
}

/// Test digit `i` made to look tightly cropped and scanned: white-on-black ink, and its size.
fn degraded(digit: &[u8], i: usize) -> (Vec<f32>, (usize, usize)) {
    let img: Vec<f32> = digit.iter().map(|&v| v as f32).collect();
    let (ink, (bw, bh)) = crop(&img, 28, ink_box(&img, (28, 28), 0.0));
    let side = 8 + i % 9;
    let scale = side as f64 / bw.max(bh) as f64;
    let small_size = (
        ((bw as f64 * scale).round() as usize).max(1),
        ((bh as f64 * scale).round() as usize).max(1),
    );
    let small = blur(&resample(&ink, (bw, bh), small_size), small_size);
    let factor = 3 + i % 3;
    let big_size = (small_size.0 * factor, small_size.1 * factor);
    (enlarge(&small, small_size, big_size), big_size)
}

/// The plain MNIST conversion of white-on-black ink: cropped to the ink, longest side 20 pixels,
/// centre of mass at the centre of 28x28, no thresholding.
fn plain_mnist(ink: &[f32], (w, h): (usize, usize)) -> Vec<u8> {
    let (cropped, (bw, bh)) = crop(ink, w, ink_box(ink, (w, h), 0.5));
    let scale = 20.0 / bw.max(bh) as f64;
    let size = (
        ((bw as f64 * scale).round() as usize).clamp(1, 20),
        ((bh as f64 * scale).round() as usize).clamp(1, 20),
    );
    let small = resample(&cropped, (bw, bh), size);
    let total: f64 = small.iter().map(|&v| v as f64).sum::<f64>().max(1e-9);
    let cx = small
        .iter()
        .enumerate()
        .map(|(i, &v)| (i % size.0) as f64 * v as f64)
        .sum::<f64>()
        / total;
    let cy = small
        .iter()
        .enumerate()
        .map(|(i, &v)| (i / size.0) as f64 * v as f64)
        .sum::<f64>()
        / total;
    let off_x = ((13.5 - cx).round() as i64).clamp(0, (28 - size.0) as i64) as usize;
    let off_y = ((13.5 - cy).round() as i64).clamp(0, (28 - size.1) as i64) as usize;
    let mut out = vec![0u8; IMAGE_PIXELS];
    for y in 0..size.1 {
        for x in 0..size.0 {
            out[(y + off_y) * 28 + x + off_x] = small[y * size.0 + x].round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// (right, refused) of `predict` over pictures with these labels.
fn predict(model: &str, pictures: &[(PathBuf, u8)]) -> (usize, usize) {
    let paths: Vec<String> = pictures.iter().map(|(p, _)| p.to_string_lossy().to_string()).collect();
    let mut args = vec!["predict", "--device", "cpu", "--model", model];
    args.extend(paths.iter().map(String::as_str));
    let (_, out, err) = run_any(&args);
    let (mut right, mut refused) = (0, 0);
    for ((path, label), name) in pictures.iter().zip(&paths) {
        let line = out.lines().find(|l| l.starts_with(&format!("{name}: predicted ")));
        match line {
            Some(l) => right += usize::from(l[name.len() + 12..].starts_with(&label.to_string())),
            None => {
                refused += 1;
                let why = err.lines().find(|l| l.contains(name.as_str())).unwrap_or("no line");
                println!("refused {}: {why}", path.display());
            }
        }
    }
    (right, refused)
}

#[test]
fn tightly_cropped_blurred_digits_read_at_least_as_well_as_the_plain_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("book.safetensors").to_string_lossy().to_string();
    let out = dir.path().join("run").to_string_lossy().to_string();
    run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &data_arg(),
        "--save",
        &model,
        "--out",
        &out,
        "--quiet",
    ]);
    let test = mnist().test;
    let (mut scanned, mut plain) = (Vec::new(), Vec::new());
    for i in 0..COUNT {
        // Every 7th test image, so that the set spans the test set's writers.
        let k = i * 7;
        let digit = &test.images[k * IMAGE_PIXELS..(k + 1) * IMAGE_PIXELS];
        let label = test.labels[k];
        let (ink, (w, h)) = degraded(digit, i);
        let picture: Vec<u8> = ink
            .iter()
            .map(|&v| (255.0 - v).round().clamp(0.0, 255.0) as u8)
            .collect();
        let path = dir.path().join(format!("scan{i}.png"));
        write_png_gray(&path, w, h, &picture);
        scanned.push((path, label));
        let path = dir.path().join(format!("plain{i}.png"));
        write_png_gray(&path, 28, 28, &plain_mnist(&ink, (w, h)));
        plain.push((path, label));
    }
    let (ours, refused) = predict(&model, &scanned);
    let (baseline, _) = predict(&model, &plain);
    println!(
        "tightly cropped digits: predict {ours} of {COUNT} right ({refused} refused); the plain conversion \
         {baseline} of {COUNT}"
    );
    assert_eq!(refused, 0, "a picture of a digit was refused");
    assert!(ours >= baseline, "predict read {ours}, the plain conversion {baseline}");
}
