//! Finding the ink of a picture: as a scan or drawing (smooth, with strokes: every grey level
//! away from its paper) or as a photo (the paper's local level subtracted, Otsu's threshold).
//!
//! Contract: `separate_ink` returns the ink as white on black (0 to 255), or one sentence saying
//! why the picture holds no digit (blank, lighting alone, noise).

use super::Gray;

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

/// The value at quantile `q` of sorted `values`.
fn quantile(sorted: &[f32], q: f64) -> f32 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q) as usize)
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
    steps.sort_by(f32::total_cmp);
    bends.sort_by(f32::total_cmp);
    let strokes = quantile(&steps, 0.95) >= SCAN_MIN_EDGE * range;
    // Whole grey levels: a faint picture's rounding alone bends and steps by a level or two.
    let quiet = quantile(&steps, 0.5) <= (SCAN_MAX_STEP * range).max(3.0);
    let smooth = quantile(&bends, 0.5) <= (SCAN_MAX_BEND * range).max(2.0);
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
pub(super) fn separate_ink(img: &Gray) -> std::result::Result<Vec<u8>, String> {
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
