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
use ink::separate_ink;

mod ink;
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
