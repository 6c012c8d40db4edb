//! Data augmentation as part of the gather: each training image is shifted, rotated and scaled
//! by its own random amounts as the batch is built from the resident u8 images (bilinear, zero
//! outside the picture), on the device, never for evaluation.
//!
//! Contract: image `r` of step `step` takes its four uniform numbers from
//! `dropout::mask_bits(step_key(key, step), 4 r + j)` (j = 0..4: x shift, y shift, angle,
//! scale), so every device draws the same transform; the transform is computed in f32 by the
//! same operations on the host (`transform`, `sample`) and in shaders/gather.wgsl (sine and
//! cosine by the same polynomial, not the platform's functions), so the CPU path and the GPU
//! agree to rounding (a fused multiply-add on a GPU moves the last bits).

use super::dropout::{mask_bits, mix, step_key};

/// The largest rotation `--augment` takes, in degrees (where `sin_cos`'s polynomial is exact to
/// f32).
pub const MAX_ROTATE_DEGREES: f32 = 45.0;

/// How much each training image may move: up to `shift` pixels each way along each axis, a
/// rotation of up to `rotate` radians either way, a scale of 1 +- `scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    pub shift: f32,
    pub rotate: f32,
    pub scale: f32,
    /// From the run's seed (`key_of`).
    pub key: u32,
}

impl Augment {
    /// `--augment`'s words: comma-separated `shift:PIXELS`, `rotate:DEGREES` (at most 45),
    /// `scale:FRACTION` (below 1), each at most once, e.g. `shift:2,rotate:10,scale:0.1`; the
    /// key is 0 until the run's seed sets it (`key_of`).
    pub fn parse(text: &str) -> Result<Augment, String> {
        let mut aug = Augment {
            shift: 0.0,
            rotate: 0.0,
            scale: 0.0,
            key: 0,
        };
        let mut seen = Vec::new();
        for item in text.split(',').map(str::trim) {
            let (name, value) = item
                .split_once(':')
                .ok_or_else(|| format!("'{item}' is not NAME:VALUE (shift:2, rotate:10, scale:0.1)"))?;
            if seen.contains(&name) {
                return Err(format!("'{name}' is given twice"));
            }
            seen.push(name);
            let number = value.parse::<f32>().ok().filter(|v| v.is_finite() && *v >= 0.0);
            let (field, max, unit) = match name {
                "shift" => (&mut aug.shift, 14.0, "pixels"),
                "rotate" => (&mut aug.rotate, MAX_ROTATE_DEGREES, "degrees"),
                "scale" => (&mut aug.scale, 0.99, "of the size"),
                _ => return Err(format!("'{name}' is not one of shift, rotate, scale")),
            };
            match number {
                Some(v) if v <= max => *field = v,
                _ => return Err(format!("{name} '{value}' is not a number from 0 to {max} ({unit})")),
            }
        }
        aug.rotate = (aug.rotate as f64).to_radians() as f32;
        Ok(aug)
    }

    /// The words `parse` reads back to the same augmentation.
    pub fn describe(&self) -> String {
        let degrees = (self.rotate as f64).to_degrees() as f32;
        format!("shift:{},rotate:{},scale:{}", self.shift, degrees, self.scale)
    }
}

/// The augmentation key of a run seeded `seed`.
pub fn key_of(seed: u64) -> u32 {
    mix(super::dropout::layer_key(seed, 0x0a06) ^ 0x5bd1_e995)
}

/// A uniform number in [-1, 1) from a random word (its top 24 bits).
#[inline(always)]
pub fn signed_unit(bits: u32) -> f32 {
    (bits >> 8) as f32 * (2.0 / 16_777_216.0) - 1.0
}

/// sin and cos of |x| <= pi / 4 by their Taylor polynomials to x^9 and x^10 (error below f32's
/// rounding there), the same operations in gather.wgsl.
#[inline(always)]
pub fn sin_cos(x: f32) -> (f32, f32) {
    let x2 = x * x;
    let sin = x * (1.0 + x2 * (-1.0 / 6.0 + x2 * (1.0 / 120.0 + x2 * (-1.0 / 5040.0 + x2 * (1.0 / 362_880.0)))));
    let cos =
        1.0 + x2 * (-0.5 + x2 * (1.0 / 24.0 + x2 * (-1.0 / 720.0 + x2 * (1.0 / 40_320.0 + x2 * (-1.0 / 3_628_800.0)))));
    (sin, cos)
}

/// The inverse map of one image's transform: output pixel (ox, oy) samples the source at
/// (a ox' + b oy' + CENTRE, c ox' + d oy' + CENTRE), where ox' = ox - CENTRE - tx and
/// oy' = oy - CENTRE - ty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    pub a: f32,
    pub b: f32,
    pub c: f32,
    pub d: f32,
    pub tx: f32,
    pub ty: f32,
}

/// The centre of a 28 x 28 image, in pixel coordinates.
pub const CENTRE: f32 = 13.5;

/// Image `row`'s transform at step `step`.
pub fn transform(aug: &Augment, step: u32, row: u32) -> Transform {
    let key = step_key(aug.key, step);
    let u = |j: u32| signed_unit(mask_bits(key, 4 * row + j));
    let (tx, ty) = (aug.shift * u(0), aug.shift * u(1));
    let (sin, cos) = sin_cos(aug.rotate * u(2));
    let inv = 1.0 / (1.0 + aug.scale * u(3));
    Transform {
        a: cos * inv,
        b: sin * inv,
        c: -sin * inv,
        d: cos * inv,
        tx,
        ty,
    }
}

/// Output pixel (ox, oy) of a 28 x 28 image under `t`: the bilinear sample of `pixel(x, y)`
/// (0 outside the image), times 1 / 255.
#[inline(always)]
pub fn sample(t: &Transform, ox: usize, oy: usize, pixel: impl Fn(usize, usize) -> u8) -> f32 {
    let u = ox as f32 - CENTRE - t.tx;
    let v = oy as f32 - CENTRE - t.ty;
    let sx = t.a * u + t.b * v + CENTRE;
    let sy = t.c * u + t.d * v + CENTRE;
    let (x0, y0) = (sx.floor(), sy.floor());
    let (fx, fy) = (sx - x0, sy - y0);
    let at = |x: f32, y: f32| -> f32 {
        if (0.0..28.0).contains(&x) && (0.0..28.0).contains(&y) {
            pixel(x as usize, y as usize) as f32
        } else {
            0.0
        }
    };
    let top = (1.0 - fx) * at(x0, y0) + fx * at(x0 + 1.0, y0);
    let bottom = (1.0 - fx) * at(x0, y0 + 1.0) + fx * at(x0 + 1.0, y0 + 1.0);
    ((1.0 - fy) * top + fy * bottom) * (1.0 / 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_polynomial_sine_and_cosine_match_the_library_to_f32() {
        let mut worst = 0.0f64;
        for i in -1000..=1000 {
            let x = i as f32 * std::f32::consts::FRAC_PI_4 / 1000.0;
            let (s, c) = sin_cos(x);
            worst = worst.max(
                (s as f64 - (x as f64).sin())
                    .abs()
                    .max((c as f64 - (x as f64).cos()).abs()),
            );
        }
        println!("largest error of sin_cos over [-pi/4, pi/4]: {worst:e}");
        assert!(worst < 2e-7, "{worst}");
    }

    #[test]
    fn augment_words_parse_and_read_back() {
        let aug = Augment::parse("shift:2,rotate:10,scale:0.1").unwrap();
        assert_eq!((aug.shift, aug.scale), (2.0, 0.1));
        assert!((aug.rotate - 10f32.to_radians()).abs() < 1e-7);
        assert_eq!(Augment::parse(&aug.describe()).unwrap(), aug);
        assert_eq!(Augment::parse("rotate:5").unwrap().shift, 0.0);
        for (bad, words) in [
            ("rotate:50", "from 0 to 45"),
            ("shift:-1", "shift '-1'"),
            ("zoom:2", "not one of"),
            ("shift:1,shift:2", "twice"),
            ("shift", "NAME:VALUE"),
            ("scale:nan", "scale 'nan'"),
        ] {
            let err = Augment::parse(bad).unwrap_err();
            assert!(err.contains(words), "{bad}: {err}");
        }
    }

    #[test]
    fn no_augmentation_is_the_identity_and_a_shift_moves_the_picture() {
        let image: Vec<u8> = (0..784).map(|i| (i * 7 % 256) as u8).collect();
        let pixel = |x: usize, y: usize| image[y * 28 + x];
        let none = Augment {
            shift: 0.0,
            rotate: 0.0,
            scale: 0.0,
            key: 5,
        };
        let t = transform(&none, 3, 2);
        for (oy, ox) in [(0, 0), (13, 14), (27, 27)] {
            assert_eq!(sample(&t, ox, oy, pixel), image[oy * 28 + ox] as f32 * (1.0 / 255.0));
        }
        let one_right = Transform { tx: 1.0, ..t };
        assert_eq!(
            sample(&one_right, 5, 9, pixel),
            image[9 * 28 + 4] as f32 * (1.0 / 255.0)
        );
        assert_eq!(sample(&one_right, 0, 9, pixel), 0.0);
    }
}
