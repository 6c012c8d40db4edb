//! Dropout as an op, and its mask: which values a step drops is a pure function of the run's
//! seed, the layer, the step and the value's index, so the reference, the fast CPU path and
//! the GPU (shaders/dropout.wgsl, the same integer operations) drop the same values, a seeded
//! run is reproducible, and a resumed run drops what the uninterrupted one would have.
//!
//! Contract: value `i` of step `step` is kept when `mask_bits(step_key(key, step), i) >=
//! threshold(rate)`, and a kept value is multiplied by `scale(rate)` (one f32 product, the same
//! bits everywhere); `key` is `layer_key(seed, layer)`.

use super::TensorId;

/// Dropout over the `len` values of a batch at rate `rate` (values dropped with that
/// probability in training), for the layer whose mask key is `key` (`layer_key`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub len: usize,
    pub rate: f32,
    pub key: u32,
    pub kind: DropoutKind,
}

/// Which way, and whether training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DropoutKind {
    /// Training: out = inp x scale where the step's mask keeps the value, else 0. Evaluation
    /// (`train` false): out = inp.
    Forward { out: TensorId, inp: TensorId, train: bool },
    /// dinp = dout x scale where the step's mask kept the value, else 0; also 0 where
    /// `relu_mask` (the forward input, a ReLU's output) is not > 0.
    Backward {
        dinp: TensorId,
        dout: TensorId,
        relu_mask: Option<TensorId>,
    },
}

/// lowbias32 (Chris Wellons' integer hash): every bit of the input moves every bit of the output.
pub const fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The mask key of dropout layer number `layer` (counted over the model's layers) in a run
/// seeded `seed`.
pub fn layer_key(seed: u64, layer: usize) -> u32 {
    let (lo, hi) = (seed as u32, (seed >> 32) as u32);
    mix(mix(lo ^ mix(hi)) ^ mix(layer as u32 ^ 0x9e37_79b9))
}

/// The key of one step (a run's steps counted from 0, wrapping at 2^32).
pub const fn step_key(key: u32, step: u32) -> u32 {
    mix(key ^ mix(step))
}

/// The random word of value `i` in a step.
pub const fn mask_bits(step_key: u32, i: u32) -> u32 {
    mix(step_key ^ mix(i))
}

/// A value is kept when its word is at least this: rate x 2^32, rounded.
pub fn threshold(rate: f32) -> u32 {
    (rate as f64 * 4_294_967_296.0).round().clamp(0.0, u32::MAX as f64) as u32
}

/// What a kept value is multiplied by: 1 / (1 - rate), rounded once to f32.
pub fn scale(rate: f32) -> f32 {
    (1.0 / (1.0 - rate as f64)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_keeps_about_one_minus_the_rate() {
        for rate in [0.1f32, 0.25, 0.5, 0.9] {
            let t = threshold(rate);
            let key = step_key(layer_key(7, 3), 41);
            let kept = (0..100_000u32).filter(|&i| mask_bits(key, i) >= t).count();
            let share = kept as f64 / 100_000.0;
            assert!((share - (1.0 - rate as f64)).abs() < 0.01, "rate {rate}: kept {share}");
        }
        // Different steps, layers and seeds give different masks.
        let masks: Vec<Vec<bool>> = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
            .iter()
            .map(|&(seed, layer, step)| {
                let key = step_key(layer_key(seed, layer), step);
                (0..256).map(|i| mask_bits(key, i) >= threshold(0.5)).collect()
            })
            .collect();
        for a in 0..masks.len() {
            for b in a + 1..masks.len() {
                assert_ne!(masks[a], masks[b], "masks {a} and {b}");
            }
        }
        assert_eq!(scale(0.5), 2.0);
        assert_eq!(threshold(0.25), 1 << 30);
    }
}
