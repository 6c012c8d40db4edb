//! Images in and out: decoding a picture of a digit (through the `image` crate) and converting
//! it the MNIST way, and writing PNG pictures (the grid of misclassified test digits).
//!
//! Contract: `load_digit(path)` returns 784 u8 pixels, white digit on black, as MNIST has them,
//! from a PNG, JPEG (turned as its EXIF orientation says), WebP, BMP, GIF, TIFF or PNM picture of
//! any size and colour type. A picture that is not 28x28 is read one of two ways. A scan or a
//! drawing (smooth: no camera noise, with strokes' edges; `scan_of`) may be cropped tightly to
//! its ink, low-resolution and blurred: its ink is every level away from its paper, unthresholded,
//! as MNIST's grey edges are (`scan_ink`). A photo's ink is the side that reaches far from the
//! median grey; the paper's level (a percentile of each of 4 x 4 blocks, interpolated) is
//! subtracted, so that uneven lighting and grey paper become black, and Otsu's threshold cuts the
//! ink's faint rest away (`photo_ink`; a quiet picture with strokes that it finds no digit in is
//! read as a scan). Either way the ink is then cropped, scaled so its longer side is 20 pixels,
//! and centred by its centre of mass in a 28x28 frame. A picture with no ink that stands out
//! (blank, lighting alone, noise) is refused, not guessed at. A 28x28 picture is taken as MNIST-like as it is
//! (inverted when its border is light). Sizes are checked before any pixel is decoded; every
//! failure names the file.

use std::path::Path;

use crate::data::IMAGE_SIDE;
use crate::error::{Error, Result};

/// Largest accepted image side and pixel count (a phone photo is about 4000 x 3000).
const MAX_SIDE: u32 = 16_384;
const MAX_PIXELS: u64 = 50_000_000;
/// The most memory one decoded picture may take (a 50-megapixel RGBA photo at 16 bits is 400 MB,
/// a phone's 12-megapixel RGB photo 36 MB).
const MAX_DECODED_BYTES: u64 = 512 << 20;

/// The formats `decode_image` reads (the `image` crate's decoders this build enables).
pub const FORMATS: &str = "PNG, JPEG, WebP, BMP, GIF, TIFF or PNM";

/// A grayscale image, 0 = black.
#[derive(Debug, Clone, PartialEq)]
pub struct Gray {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

fn check_size(w: u64, h: u64) -> std::result::Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("image has zero size ({w}x{h})"));
    }
    if w > MAX_SIDE as u64 || h > MAX_SIDE as u64 || w * h > MAX_PIXELS {
        return Err(format!(
            "image is {w}x{h}, larger than gpu-mnist accepts ({MAX_SIDE} a side, {MAX_PIXELS} pixels)"
        ));
    }
    Ok(())
}

/// The largest image file read (a 4000x3000 16-bit RGBA PNG is under 100 MB).
const MAX_FILE_BYTES: u64 = 256 << 20;

/// Decode a picture file (see `decode_image`).
pub fn load_gray(path: &Path) -> Result<Gray> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::bad_file(
            path,
            format!("is a directory, expected a picture ({FORMATS})"),
        ));
    }
    if !meta.is_file() {
        return Err(Error::bad_file(path, "is not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::bad_file(
            path,
            format!("is {} bytes, larger than any digit picture needs", meta.len()),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes).map_err(|reason| Error::bad_file(path, reason))
}

/// Decode a picture from bytes through the `image` crate: PNG, JPEG, WebP, BMP, GIF, TIFF or
/// PNM, turned the way its EXIF orientation says (a phone's photo), transparency composited over
/// white, then to grey (0.299 R + 0.587 G + 0.114 B). The header's size is checked before any
/// pixel is decoded. Errors are plain reasons (the caller names the file).
pub fn decode_image(bytes: &[u8]) -> std::result::Result<Gray, String> {
    use image::{DynamicImage, ImageDecoder, ImageError, ImageReader};
    if bytes.is_empty() {
        return Err("is empty (0 bytes)".to_string());
    }
    let not_a_picture = || format!("is not a picture gpu-mnist reads ({FORMATS})");
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("could not be read ({e})"))?;
    let Some(format) = reader.format() else {
        return Err(not_a_picture());
    };
    let name = format!("{format:?}").to_uppercase();
    // Decoders' messages may span lines; a user gets one.
    let one_line = |e: &ImageError| e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    let unreadable = |e: ImageError| match e {
        ImageError::Unsupported(_) => not_a_picture(),
        ImageError::Limits(_) => format!("is a {name} image larger than gpu-mnist accepts ({})", one_line(&e)),
        e => format!("is not a readable {name} image ({})", one_line(&e)),
    };
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(unreadable)?;
    let (w, h) = decoder.dimensions();
    check_size(w as u64, h as u64)?;
    limits.reserve(decoder.total_bytes()).map_err(unreadable)?;
    decoder.set_limits(limits).map_err(unreadable)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(unreadable)?;
    img.apply_orientation(orientation);
    let (width, height) = (img.width() as usize, img.height() as usize);
    let rgba = img.to_rgba8();
    let pixels = rgba
        .pixels()
        .map(|p| {
            let [r, g, b, a] = p.0;
            let lum = 0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32;
            // Composite over white: a transparent background reads as paper.
            let a = a as f32 / 255.0;
            (lum * a + 255.0 * (1.0 - a)).round().clamp(0.0, 255.0) as u8
        })
        .collect();
    Ok(Gray { width, height, pixels })
}

/// Invert when the border is light (a dark digit on paper): MNIST digits are white on black.
/// Used for pictures already 28x28, which are taken as MNIST-like as they are.
fn white_on_black(img: &Gray) -> Vec<u8> {
    let (w, h) = (img.width, img.height);
    let border: Vec<u32> = (0..w)
        .flat_map(|x| [img.pixels[x], img.pixels[(h - 1) * w + x]])
        .chain((0..h).flat_map(|y| [img.pixels[y * w], img.pixels[y * w + w - 1]]))
        .map(u32::from)
        .collect();
    let mean = border.iter().sum::<u32>() as f32 / border.len() as f32;
    if mean > 127.0 {
        img.pixels.iter().map(|&p| 255 - p).collect()
    } else {
        img.pixels.clone()
    }
}

/// Otsu's threshold of a histogram: the level t that best splits it into two classes (<= t and
/// > t) by between-class variance.
fn otsu(histogram: &[u64; 256]) -> u8 {
    let total: u64 = histogram.iter().sum();
    let sum_all: f64 = histogram.iter().enumerate().map(|(v, &n)| v as f64 * n as f64).sum();
    let (mut below, mut sum_below, mut best, mut best_t) = (0u64, 0.0f64, -1.0f64, 0u8);
    for (t, &n) in histogram.iter().enumerate() {
        below += n;
        sum_below += t as f64 * n as f64;
        let above = total - below;
        if below == 0 || above == 0 {
            continue;
        }
        let (m0, m1) = (sum_below / below as f64, (sum_all - sum_below) / above as f64);
        let between = below as f64 * above as f64 * (m0 - m1) * (m0 - m1);
        if between > best {
            (best, best_t) = (between, t as u8);
        }
    }
    best_t
}

/// The least difference, in grey levels, between ink and the paper around it.
const MIN_INK_CONTRAST: f32 = 40.0;
/// The largest share of a picture that can be ink (a digit is a few strokes, not a region).
const MAX_INK_SHARE: f64 = 0.4;
/// Blocks a side for the paper's estimate (each a quarter of the picture's side).
const PAPER_BLOCKS: usize = 4;

/// The grey level below which `fraction` of `pixels` lie (from a histogram).
fn percentile(histogram: &[u32; 256], fraction: f64) -> u8 {
    let total: u32 = histogram.iter().sum();
    let want = ((total as f64 * fraction).ceil() as u32).clamp(1, total.max(1));
    let mut seen = 0;
    histogram
        .iter()
        .position(|&n| {
            seen += n;
            seen >= want
        })
        .unwrap_or(255) as u8
}

/// The paper's grey level under every pixel: in each of 4 x 4 blocks the level that 90 % of the
/// block is darker than (`dark_ink`: the paper is the light side) or lighter than, interpolated
/// bilinearly between block centres (a lamp's gradient or a shadow is smooth at that scale). A
/// stroke, however thick, covers less than 90 % of a block.
fn paper_level(img: &Gray, dark_ink: bool) -> Vec<f32> {
    let (w, h) = (img.width, img.height);
    let (gx, gy) = (PAPER_BLOCKS.min(w), PAPER_BLOCKS.min(h));
    let mut levels = vec![0.0f32; gx * gy];
    for by in 0..gy {
        for bx in 0..gx {
            let (x0, x1, y0, y1) = (bx * w / gx, (bx + 1) * w / gx, by * h / gy, (by + 1) * h / gy);
            let mut histogram = [0u32; 256];
            for y in y0..y1 {
                for &p in &img.pixels[y * w + x0..y * w + x1] {
                    histogram[p as usize] += 1;
                }
            }
            levels[by * gx + bx] = percentile(&histogram, if dark_ink { 0.9 } else { 0.1 }) as f32;
        }
    }
    // Block centres at ((b + 0.5) * w / g); between them, bilinear; beyond, the nearest.
    let axis = |v: usize, n: usize, g: usize| {
        let f = ((v as f32 + 0.5) * g as f32 / n as f32 - 0.5).clamp(0.0, (g - 1) as f32);
        let i = (f.floor() as usize).min(g.saturating_sub(2));
        (i, (f - i as f32).clamp(0.0, 1.0))
    };
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let (iy, fy) = axis(y, h, gy);
        for x in 0..w {
            let (ix, fx) = axis(x, w, gx);
            let at = |bx: usize, by: usize| levels[by.min(gy - 1) * gx + bx.min(gx - 1)];
            let top = at(ix, iy) * (1.0 - fx) + at(ix + 1, iy) * fx;
            let bottom = at(ix, iy + 1) * (1.0 - fx) + at(ix + 1, iy + 1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// A scan is smooth: the median bend between three pixels in a row (|a - 2b + c|) is at most this
/// share of the picture's range (paper and strokes, even blurred and enlarged, bend little;
/// a camera's noise bends every pixel).
const SCAN_MAX_BEND: f32 = 0.01;
/// A picture is quiet: the median step between neighbouring pixels is at most this share of the
/// range (uniform noise steps a third of it).
const SCAN_MAX_STEP: f32 = 0.05;
/// A picture has strokes: a twentieth of its neighbouring steps at least this share of the range
/// (a stroke's edge is steep, even blurred; a lamp's gradient is not).
const SCAN_MIN_EDGE: f32 = 0.04;

/// The least difference, in grey levels, between a scan's ink and its paper: a noiseless picture's
/// faint stroke (a thin digit shrunk and blurred) is still ink.
const SCAN_MIN_CONTRAST: f32 = 12.0;

/// What a picture is, to `separate_ink`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scan {
    /// Smooth, with strokes: a scan or a drawing, read as it is.
    clean: bool,
    /// Quiet, with strokes: read as a scan when the photo path finds no digit in it.
    readable: bool,
    /// Dark ink on light paper (else light on dark).
    dark_ink: bool,
    /// The paper's level: the lightest level (dark ink) or the darkest.
    paper: f32,
}

/// The value at quantile `q` of `values` (sorted here).
fn quantile(values: &mut [f32], q: f64) -> f32 {
    values.sort_by(f32::total_cmp);
    values
        .get(((values.len() as f64 - 1.0) * q) as usize)
        .copied()
        .unwrap_or(0.0)
}

/// A picture's smoothness, noise, strokes, paper and polarity (see `Scan`).
fn scan_of(img: &Gray) -> Scan {
    let (w, h) = (img.width, img.height);
    let px = |x: usize, y: usize| img.pixels[y * w + x] as f32;
    let (lo, hi) = img
        .pixels
        .iter()
        .fold((255u8, 0u8), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    let range = (hi as f32 - lo as f32).max(1.0);
    let (mut steps, mut bends) = (Vec::with_capacity(2 * w * h), Vec::with_capacity(2 * w * h));
    for y in 0..h {
        for x in 0..w {
            if x + 1 < w {
                steps.push((px(x + 1, y) - px(x, y)).abs());
            }
            if y + 1 < h {
                steps.push((px(x, y + 1) - px(x, y)).abs());
            }
            if x + 2 < w {
                bends.push((px(x, y) - 2.0 * px(x + 1, y) + px(x + 2, y)).abs());
            }
            if y + 2 < h {
                bends.push((px(x, y) - 2.0 * px(x, y + 1) + px(x, y + 2)).abs());
            }
        }
    }
    let strokes = quantile(&mut steps, 0.95) >= SCAN_MIN_EDGE * range;
    // Whole grey levels: a faint picture's rounding alone bends and steps by a level or two.
    let quiet = quantile(&mut steps, 0.5) <= (SCAN_MAX_STEP * range).max(3.0);
    let smooth = quantile(&mut bends, 0.5) <= (SCAN_MAX_BEND * range).max(2.0);
    // The border is mostly paper, even when the ink touches it: dark ink on light paper unless
    // the border is clearly dark.
    let border: Vec<f32> = (0..w)
        .flat_map(|x| [px(x, 0), px(x, h - 1)])
        .chain((0..h).flat_map(|y| [px(0, y), px(w - 1, y)]))
        .collect();
    let border_mean = border.iter().sum::<f32>() / border.len().max(1) as f32;
    let dark_ink = border_mean >= lo as f32 + 0.3 * range;
    Scan {
        clean: smooth && strokes,
        readable: quiet && strokes,
        dark_ink,
        paper: if dark_ink { hi as f32 } else { lo as f32 },
    }
}

/// The ink of a scan or drawing (`Scan`): every level away from its paper,
/// unthresholded, as MNIST's grey edges are, scaled so that the darkest ink is 255. Such a
/// picture may be mostly ink (a digit cropped tightly, its strokes touching the edges) and its
/// strokes faint (a blurred, low-resolution scan).
fn scan_ink(img: &Gray, scan: Scan) -> std::result::Result<Vec<u8>, String> {
    let ink: Vec<f32> = img
        .pixels
        .iter()
        .map(|&p| {
            (if scan.dark_ink {
                scan.paper - p as f32
            } else {
                p as f32 - scan.paper
            })
            .max(0.0)
        })
        .collect();
    let top = ink.iter().copied().fold(0.0f32, f32::max);
    if top < SCAN_MIN_CONTRAST {
        return Err("the picture is blank: no ink found, so there is no digit to read".to_string());
    }
    Ok(ink.iter().map(|&v| (v * 255.0 / top).round() as u8).collect())
}

/// Separate the ink from the paper. The paper is most of the picture, so its median is paper;
/// the ink is the side that reaches far from it (dark ink on light paper, or light on dark). The
/// paper's level under each pixel (`paper_level`) is subtracted, so that uneven lighting and grey
/// paper count as nothing, and Otsu's threshold of what remains cuts the faint rest away.
/// Returns the ink as white on black (0 to 255), or why the picture holds no digit.
fn separate_ink(img: &Gray) -> std::result::Result<Vec<u8>, String> {
    // A clean scan on even paper is read as it is; a picture the photo path below refuses is
    // still a digit when it is clean (tightly cropped, mostly ink).
    let scan = scan_of(img);
    if scan.clean {
        return scan_ink(img, scan);
    }
    match photo_ink(img) {
        Err(_) if scan.readable => scan_ink(img, scan),
        other => other,
    }
}

/// The ink of a photo: see `separate_ink`.
fn photo_ink(img: &Gray) -> std::result::Result<Vec<u8>, String> {
    let no_digit = |why: String| format!("no digit found: {why}");
    let mut histogram = [0u32; 256];
    for &p in &img.pixels {
        histogram[p as usize] += 1;
    }
    let (low, median, high) = (
        percentile(&histogram, 0.005) as f32,
        percentile(&histogram, 0.5) as f32,
        percentile(&histogram, 0.995) as f32,
    );
    let (below, above) = (median - low, high - median);
    if below.max(above) < MIN_INK_CONTRAST {
        return Err("the picture is blank: no ink found, so there is no digit to read".to_string());
    }
    if below.min(above) * 1.5 > below.max(above) {
        return Err(no_digit(format!(
            "the picture reaches as far darker as lighter than its middle grey ({below:.0} and {above:.0} \
             levels): lighting or noise, not ink on paper"
        )));
    }
    let dark_ink = below > above;
    let paper = paper_level(img, dark_ink);
    let ink: Vec<u8> = img
        .pixels
        .iter()
        .zip(&paper)
        .map(|(&p, &b)| (if dark_ink { b - p as f32 } else { p as f32 - b }).clamp(0.0, 255.0) as u8)
        .collect();
    let top = ink.iter().copied().max().unwrap_or(0);
    if (top as f32) < MIN_INK_CONTRAST {
        return Err(no_digit(format!(
            "nothing differs from the paper around it by {MIN_INK_CONTRAST} grey levels"
        )));
    }
    let mut histogram = [0u64; 256];
    for &v in &ink {
        histogram[v as usize] += 1;
    }
    let t = otsu(&histogram) as usize;
    let share = histogram[t + 1..].iter().sum::<u64>() as f64 / ink.len() as f64;
    if share > MAX_INK_SHARE {
        return Err(no_digit(format!(
            "{:.0} % of the picture would be ink, more than a digit covers",
            100.0 * share
        )));
    }
    let span = (top as usize - t).max(1) as f32;
    Ok(ink
        .iter()
        .map(|&v| match (v as usize).checked_sub(t) {
            Some(above) if above > 0 => (above as f32 * 255.0 / span).round().min(255.0) as u8,
            _ => 0,
        })
        .collect())
}

/// Resample a (w, h) image to (ow, oh) by area averaging (each output pixel is the mean of the
/// source area it covers, with fractional edges).
fn resample(src: &[f32], w: usize, h: usize, ow: usize, oh: usize) -> Vec<f32> {
    let (sx, sy) = (w as f64 / ow as f64, h as f64 / oh as f64);
    let mut out = vec![0.0f32; ow * oh];
    for oy in 0..oh {
        let (y0, y1) = (oy as f64 * sy, (oy + 1) as f64 * sy);
        for ox in 0..ow {
            let (x0, x1) = (ox as f64 * sx, (ox + 1) as f64 * sx);
            let (mut acc, mut area) = (0.0f64, 0.0f64);
            for y in y0.floor() as usize..(y1.ceil() as usize).min(h) {
                let wy = (y1.min(y as f64 + 1.0) - y0.max(y as f64)).max(0.0);
                for x in x0.floor() as usize..(x1.ceil() as usize).min(w) {
                    let wx = (x1.min(x as f64 + 1.0) - x0.max(x as f64)).max(0.0);
                    acc += src[y * w + x] as f64 * wx * wy;
                    area += wx * wy;
                }
            }
            out[oy * ow + ox] = if area > 0.0 { (acc / area) as f32 } else { 0.0 };
        }
    }
    out
}

/// Convert a grayscale image the MNIST way (see the module contract). Fails on a blank image.
pub fn to_mnist(img: &Gray) -> std::result::Result<Vec<u8>, String> {
    let (w, h) = (img.width, img.height);
    if w == IMAGE_SIDE && h == IMAGE_SIDE {
        return Ok(white_on_black(img));
    }
    let ink = separate_ink(img)?;
    let max = *ink.iter().max().unwrap_or(&0);
    if max == 0 {
        return Err("the picture is blank: no ink found, so there is no digit to read".to_string());
    }
    // Faint anti-aliased edges belong to the digit; only near-black noise is left out of its box.
    let threshold = max / 10;
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if ink[y * w + x] > threshold {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
    }
    let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
    let crop: Vec<f32> = (y0..=y1)
        .flat_map(|y| (x0..=x1).map(move |x| (y, x)))
        .map(|(y, x)| ink[y * w + x] as f32)
        .collect();
    let scale = 20.0 / bw.max(bh) as f64;
    let (ow, oh) = (
        ((bw as f64 * scale).round() as usize).clamp(1, 20),
        ((bh as f64 * scale).round() as usize).clamp(1, 20),
    );
    let small = resample(&crop, bw, bh, ow, oh);
    // Centre of mass of the scaled digit, placed at the centre of the 28x28 frame.
    let total: f64 = small.iter().map(|&v| v as f64).sum::<f64>().max(1e-9);
    let cx = small
        .iter()
        .enumerate()
        .map(|(i, &v)| (i % ow) as f64 * v as f64)
        .sum::<f64>()
        / total;
    let cy = small
        .iter()
        .enumerate()
        .map(|(i, &v)| (i / ow) as f64 * v as f64)
        .sum::<f64>()
        / total;
    let off_x = ((13.5 - cx).round() as i64).clamp(0, (IMAGE_SIDE - ow) as i64) as usize;
    let off_y = ((13.5 - cy).round() as i64).clamp(0, (IMAGE_SIDE - oh) as i64) as usize;
    let mut out = vec![0u8; IMAGE_SIDE * IMAGE_SIDE];
    for y in 0..oh {
        for x in 0..ow {
            out[(y + off_y) * IMAGE_SIDE + x + off_x] = small[y * ow + x].round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(out)
}

/// Load an image file and convert it to MNIST's 784 pixels.
pub fn load_digit(path: &Path) -> Result<Vec<u8>> {
    let img = load_gray(path)?;
    to_mnist(&img).map_err(|reason| Error::bad_file(path, reason))
}

/// Encode an RGB image (row-major, 3 bytes a pixel) as PNG bytes.
pub fn encode_png_rgb(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(rgb, width as u32, height as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Numerical(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// 5x7 bitmaps of the digits 0-9, one row per byte (the low 5 bits, most significant = left).
const DIGIT_FONT: [[u8; 7]; 10] = [
    [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
    [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
    [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
    [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
    [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
    [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
    [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
    [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
    [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
    [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
];

/// A grid picture of digits with two labels under each (predicted in red, true in green):
/// each cell is the 28x28 image scaled by 2 above a 20-pixel label strip.
pub fn digit_grid_png(digits: &[(&[u8], u8, u8)], columns: usize) -> Result<Vec<u8>> {
    let (cell_w, cell_h, pad) = (56usize, 76usize, 4usize);
    let columns = columns.clamp(1, digits.len().max(1));
    let rows = digits.len().div_ceil(columns).max(1);
    let (w, h) = (columns * (cell_w + pad) + pad, rows * (cell_h + pad) + pad);
    let mut rgb = vec![255u8; w * h * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        let i = (y * w + x) * 3;
        rgb[i..i + 3].copy_from_slice(&c);
    };
    for (k, &(pixels, predicted, truth)) in digits.iter().enumerate() {
        let (cx, cy) = (
            pad + (k % columns) * (cell_w + pad),
            pad + (k / columns) * (cell_h + pad),
        );
        for y in 0..56 {
            for x in 0..56 {
                let v = 255 - pixels[(y / 2) * IMAGE_SIDE + x / 2];
                put(cx + x, cy + y, [v, v, v]);
            }
        }
        for (slot, (digit, colour)) in [(predicted, [200, 0, 0]), (truth, [0, 140, 0])].into_iter().enumerate() {
            let glyph = DIGIT_FONT[digit.min(9) as usize];
            let gx = cx + 10 + slot * 24;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                            put(gx + col * 2 + dx, cy + 59 + row * 2 + dy, colour);
                        }
                    }
                }
            }
        }
    }
    encode_png_rgb(w, h, &rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pnm_pictures_and_bad_headers() -> std::result::Result<(), String> {
        let p5 = [b"P5\n# c\n2 1\n255\n".as_slice(), &[0, 255]].concat();
        assert_eq!(decode_image(&p5)?.pixels, vec![0, 255]);
        assert_eq!(decode_image(b"P2 2 1 15 0 15")?.pixels, vec![0, 255]);
        let bomb = decode_image(b"P5\n60000 60000\n255\n").unwrap_err();
        assert!(bomb.contains("larger than gpu-mnist accepts"), "{bomb}");
        let cut = decode_image(b"P5\n4 4\n255\nab").unwrap_err();
        assert!(cut.contains("not a readable PNM image"), "{cut}");
        assert!(decode_image(b"hello").unwrap_err().contains("not a picture"));
        Ok(())
    }

    #[test]
    fn a_dark_digit_on_paper_is_inverted_cropped_and_centred() -> std::result::Result<(), String> {
        // A 100x100 white page with a black bar: becomes a white bar on black, 20 tall, centred.
        let mut pixels = vec![255u8; 100 * 100];
        for y in 10..90 {
            for x in 60..70 {
                pixels[y * 100 + x] = 0;
            }
        }
        let out = to_mnist(&Gray {
            width: 100,
            height: 100,
            pixels,
        })?;
        let rows: Vec<usize> = (0..28)
            .filter(|y| out[y * 28..y * 28 + 28].iter().any(|&v| v > 128))
            .collect();
        assert_eq!(rows.len(), 20);
        let cols: Vec<usize> = (0..28).filter(|x| (0..28).any(|y| out[y * 28 + x] > 128)).collect();
        let mid = (cols[0] + cols[cols.len() - 1]) as f64 / 2.0;
        assert!((mid - 13.5).abs() <= 1.0, "centred at {mid}");
        assert!(to_mnist(&Gray {
            width: 5,
            height: 5,
            pixels: vec![255; 25]
        })
        .is_err());
        Ok(())
    }
}
