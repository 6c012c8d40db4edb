//! Test inputs shared by the kernels' tests: values that show a change of summation order, ties
//! and NaN for the selecting kernels, and a bit-for-bit comparison.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// Values of very different magnitudes (so that a change of summation order shows).
pub fn spread(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-4..4)))
        .collect()
}

/// Small integers (many ties, zeros of both signs, negatives), with a NaN now and then.
pub fn tied(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| match rng.random_range(0..40) {
            0 => f32::NAN,
            1 => -0.0,
            k => (k % 7) as f32 - 3.0,
        })
        .collect()
}

/// The number of values whose bits differ, and the largest difference among the numbers.
pub fn compare(fast: &[f32], reference: &[f32]) -> (usize, f32) {
    assert_eq!(fast.len(), reference.len());
    let pairs = fast.iter().zip(reference);
    let differ = pairs.clone().filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let max = pairs
        .map(|(a, b)| (a - b).abs())
        .filter(|d| !d.is_nan())
        .fold(0.0, f32::max);
    (differ, max)
}

/// The fastest of `reps` runs of `work`, in seconds (for the printed timings).
pub fn best_seconds(reps: usize, work: &mut dyn FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            work();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The largest |a - b| over the pairs, NaN when either side holds a NaN (a value never written
/// into a NaN-filled buffer then fails any tolerance).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, |worst, d| {
        if worst.is_nan() || d.is_nan() {
            f32::NAN
        } else {
            worst.max(d)
        }
    })
}
