//! Batch normalisation and dropout on the CPU, through the reference's loops (`reference::layers`),
//! which the fast path runs over row pieces on the threads: the element-wise passes give the same
//! bits, the per-channel sums differ by f64 rounding (`sums_by_pieces`); and the fast path's
//! augmented gather (the reference's values).

use super::{r, threads, CpuBackend, CpuKind};
use crate::backend::ops::augment::{self, Augment};
use crate::backend::ops::{
    dropout, BatchNorm, BatchNormKind, Dropout, DropoutKind, NormParams, StepAt, BATCH_NORM_EPSILON,
    BATCH_NORM_MOMENTUM,
};
use crate::error::Result;

impl CpuBackend {
    /// Dropout forward (the step's mask, or a copy in evaluation) or backward (the same mask).
    pub(super) fn dropout(&mut self, d: &Dropout, at: StepAt) -> Result<()> {
        let op = "dropout";
        let step_key = dropout::step_key(d.key, at.step as u32);
        let n = d.len;
        match d.kind {
            DropoutKind::Forward { out, inp, train } => self.with_out(op, (out, n), &[(inp, n)], |out, ins| {
                if train {
                    r::dropout_apply(out, ins[0], None, step_key, d.rate);
                } else {
                    out.copy_from_slice(ins[0]);
                }
            }),
            DropoutKind::Backward { dinp, dout, relu_mask } => {
                let mut inputs = vec![(dout, n)];
                inputs.extend(relu_mask.map(|m| (m, n)));
                self.with_out(op, (dinp, n), &inputs, |dinp, ins| {
                    r::dropout_apply(dinp, ins[0], ins.get(1).copied(), step_key, d.rate);
                })
            }
        }
    }

    /// Batch normalisation forward (batch statistics, moving averages moved; or the moving
    /// statistics) or backward (the parameters' gradients, then the input's).
    pub(super) fn batch_norm(&mut self, b: &BatchNorm) -> Result<()> {
        let op = "batch norm";
        let (rows, c) = (b.rows, b.channels);
        let n = rows * c;
        let kind = self.kind;
        match b.kind {
            BatchNormKind::ForwardTrain {
                out,
                inp,
                params,
                stats,
                relu,
            } => {
                let (mut mean, mut var, mut invstd) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
                let x = self.tensor(op, inp, n)?;
                match kind {
                    CpuKind::Reference => r::batchnorm_stats(&mut mean, &mut var, x, rows, c),
                    CpuKind::Fast => batchnorm_stats_fast(&mut mean, &mut var, x, rows),
                }
                r::batchnorm_invstd(&mut invstd, &var, BATCH_NORM_EPSILON);
                let (gamma, beta) = self.scale_offset(op, params, c)?;
                self.tensor(op, stats, 2 * c)?;
                self.tensor(op, params.moving_mean, c)?;
                self.tensor(op, params.moving_variance, c)?;
                self.with_out(op, (out, n), &[(inp, n)], |out, ins| match kind {
                    CpuKind::Reference => {
                        r::batchnorm_forward(out, ins[0], (&gamma, &beta), (&mean, &invstd), rows, relu)
                    }
                    CpuKind::Fast => batchnorm_forward_fast(out, ins[0], (&gamma, &beta), (&mean, &invstd), relu),
                })?;
                let s = self.tensor_mut(op, stats, 2 * c)?;
                s[..c].copy_from_slice(&mean);
                s[c..].copy_from_slice(&invstd);
                r::batchnorm_moving(self.tensor_mut(op, params.moving_mean, c)?, &mean, BATCH_NORM_MOMENTUM);
                r::batchnorm_moving(
                    self.tensor_mut(op, params.moving_variance, c)?,
                    &var,
                    BATCH_NORM_MOMENTUM,
                );
                Ok(())
            }
            BatchNormKind::ForwardEval { out, inp, params, relu } => {
                let (gamma, beta) = self.scale_offset(op, params, c)?;
                let mean = self.tensor(op, params.moving_mean, c)?.to_vec();
                let mut invstd = vec![0.0f32; c];
                r::batchnorm_invstd(
                    &mut invstd,
                    self.tensor(op, params.moving_variance, c)?,
                    BATCH_NORM_EPSILON,
                );
                self.with_out(op, (out, n), &[(inp, n)], |out, ins| match kind {
                    CpuKind::Reference => {
                        r::batchnorm_forward(out, ins[0], (&gamma, &beta), (&mean, &invstd), rows, relu)
                    }
                    CpuKind::Fast => batchnorm_forward_fast(out, ins[0], (&gamma, &beta), (&mean, &invstd), relu),
                })
            }
            BatchNormKind::Backward {
                dinp,
                dout,
                inp,
                gamma,
                stats,
                dgamma,
                dbeta,
            } => {
                let s = self.tensor(op, stats, 2 * c)?.to_vec();
                let (mean, invstd) = s.split_at(c);
                let gamma = self.tensor(op, gamma, c)?.to_vec();
                let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
                let (dy, x) = (self.tensor(op, dout, n)?, self.tensor(op, inp, n)?);
                match kind {
                    CpuKind::Reference => r::batchnorm_backward_params((&mut dg, &mut db), dy, x, (mean, invstd), rows),
                    CpuKind::Fast => batchnorm_backward_params_fast((&mut dg, &mut db), dy, x, (mean, invstd), rows),
                }
                self.tensor_mut(op, dgamma, c)?.copy_from_slice(&dg);
                self.tensor_mut(op, dbeta, c)?.copy_from_slice(&db);
                let Some(dinp) = dinp else { return Ok(()) };
                let channels = r::batchnorm_channels(&gamma, (mean, invstd), (&dg, &db), rows);
                self.with_out(op, (dinp, n), &[(dout, n), (inp, n)], |dx, ins| match kind {
                    CpuKind::Reference => r::batchnorm_backward_input(dx, ins[0], ins[1], &channels, rows),
                    CpuKind::Fast => batchnorm_backward_input_fast(dx, ins[0], ins[1], &channels),
                })
            }
        }
    }

    /// Copies of a batch normalisation's gamma and beta.
    fn scale_offset(&self, op: &'static str, p: NormParams, c: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            self.tensor(op, p.gamma, c)?.to_vec(),
            self.tensor(op, p.beta, c)?.to_vec(),
        ))
    }
}

/// `reference::gather_augmented` without its per-pixel bounds checks, over row pieces on the
/// threads: each source image is copied into a zero-bordered 30 x 30 f32 frame once, so a sample
/// whose four taps fall in the frame reads them without a test, and one farther out is 0. The
/// same f32 operations in the same order as `augment::sample`, so the same values.
pub(super) fn gather_augmented_fast(
    x: &mut [f32],
    images: &[u8],
    order: &[u32],
    (start, rows): (usize, usize),
    aug: &Augment,
    step: u32,
) {
    threads::split_units(
        &mut x[..rows * SIDE * SIDE],
        SIDE * SIDE,
        rows * SIDE * SIDE,
        &|first, part| {
            gather_augmented_rows(part, images, &order[start..start + rows], first, aug, step);
        },
    );
}

/// Rows first.. of the batch into x (those rows only).
fn gather_augmented_rows(x: &mut [f32], images: &[u8], order: &[u32], first: usize, aug: &Augment, step: u32) {
    let mut frame = [0.0f32; FRAME * FRAME];
    for (i, out) in x.chunks_exact_mut(SIDE * SIDE).enumerate() {
        let r = first + i;
        let src = &images[order[r] as usize * SIDE * SIDE..][..SIDE * SIDE];
        for (y, line) in src.chunks_exact(SIDE).enumerate() {
            for (cell, &p) in frame[(y + 1) * FRAME + 1..][..SIDE].iter_mut().zip(line) {
                *cell = p as f32;
            }
        }
        let t = augment::transform(aug, step, r as u32);
        sample_image(out, &frame, &t);
    }
}

/// The side of an image, and of its zero-bordered frame.
const SIDE: usize = 28;
const FRAME: usize = SIDE + 2;

simd_variants! {
    /// out (28 x 28) = `augment::sample` of every pixel of the image in `frame` under `t`.
    fn sample_image(out: &mut [f32], frame: &[f32; FRAME * FRAME], t: &augment::Transform) => sample_image_any
}

/// `sample_image` written without a branch or an index check inside the row (a sample whose
/// taps leave the frame is computed at the clamped place and then replaced by 0), so that the
/// compiler vectorises it (gathers on AVX-512); the same operations on every kept value.
#[inline(always)]
fn sample_image_any(out: &mut [f32], frame: &[f32; FRAME * FRAME], t: &augment::Transform) {
    for (oy, out_line) in out.chunks_exact_mut(SIDE).enumerate() {
        let v = oy as f32 - augment::CENTRE - t.ty;
        let (bv, dv) = (t.b * v, t.d * v);
        for (ox, o) in out_line.iter_mut().enumerate() {
            let u = ox as f32 - augment::CENTRE - t.tx;
            let sx = t.a * u + bv + augment::CENTRE;
            let sy = t.c * u + dv + augment::CENTRE;
            let (x0, y0) = (floor(sx), floor(sy));
            // Taps x0, x0 + 1 (and y0, y0 + 1) in the frame when -1 <= x0 <= 27; farther out
            // both are outside the picture.
            let inside = (-1.0..=27.0).contains(&x0) && (-1.0..=27.0).contains(&y0);
            let (cx, cy) = (x0.clamp(-1.0, 27.0), y0.clamp(-1.0, 27.0));
            let at = ((cy + 1.0) as usize * FRAME + (cx + 1.0) as usize).min(FRAME * FRAME - FRAME - 2);
            let (fx, fy) = (sx - x0, sy - y0);
            let top = (1.0 - fx) * frame[at] + fx * frame[at + 1];
            let bottom = (1.0 - fx) * frame[at + FRAME] + fx * frame[at + FRAME + 1];
            let value = ((1.0 - fy) * top + fy * bottom) * (1.0 / 255.0);
            *o = if inside { value } else { 0.0 };
        }
    }
}

/// floor(v) for |v| < 2^31 (a sample's coordinate is far inside that) without the library
/// call that a CPU without SSE4.1's rounding instruction makes.
#[inline(always)]
fn floor(v: f32) -> f32 {
    let t = v as i32 as f32;
    if t > v {
        t - 1.0
    } else {
        t
    }
}

/// `reference::batchnorm_forward` over row pieces on the threads, each row one zipped loop over
/// the channels (no index checks: the compiler vectorises it); the same per-value operations
/// (`batchnorm_one`), so the same bits.
fn batchnorm_forward_fast(out: &mut [f32], x: &[f32], params: (&[f32], &[f32]), stats: (&[f32], &[f32]), relu: bool) {
    let c = params.0.len();
    let ((gamma, beta), (mean, invstd)) = (params, stats);
    threads::split_units(out, c, out.len(), &|first, part| {
        for (o_row, x_row) in part.chunks_exact_mut(c).zip(x[first * c..].chunks_exact(c)) {
            let lanes = o_row.iter_mut().zip(x_row).zip(gamma).zip(beta).zip(mean).zip(invstd);
            for (((((o, &x), &g), &b), &m), &s) in lanes {
                *o = r::batchnorm_one(x, g, b, m, s, relu);
            }
        }
    });
}

/// `reference::batchnorm_backward_input` over row pieces on the threads, the channels' numbers
/// laid out as one array each and every slice cut to the channel count, so that each row is one
/// loop without index checks (vectorised); the same per-value operations (`batchnorm_dx_one`),
/// so the same bits.
fn batchnorm_backward_input_fast(dx: &mut [f32], dy: &[f32], x: &[f32], channels: &[r::BatchNormChannel<f32>]) {
    let c = channels.len();
    let column = |f: fn(&r::BatchNormChannel<f32>) -> f32| channels.iter().map(f).collect::<Vec<f32>>();
    let (gamma, mean, invstd) = (column(|k| k.gamma), column(|k| k.mean), column(|k| k.invstd));
    let (mean_dbeta, mean_dgamma) = (column(|k| k.mean_dbeta), column(|k| k.mean_dgamma));
    threads::split_units(dx, c, dx.len(), &|first, part| {
        let (g, m, s, mb, mg) = (
            &gamma[..c],
            &mean[..c],
            &invstd[..c],
            &mean_dbeta[..c],
            &mean_dgamma[..c],
        );
        let rows = part
            .chunks_exact_mut(c)
            .zip(dy[first * c..].chunks_exact(c))
            .zip(x[first * c..].chunks_exact(c));
        for ((d_row, dy_row), x_row) in rows {
            let (d_row, dy_row, x_row) = (&mut d_row[..c], &dy_row[..c], &x_row[..c]);
            for ch in 0..c {
                let k = r::BatchNormChannel {
                    gamma: g[ch],
                    mean: m[ch],
                    invstd: s[ch],
                    mean_dbeta: mb[ch],
                    mean_dgamma: mg[ch],
                };
                d_row[ch] = r::batchnorm_dx_one(dy_row[ch], x_row[ch], k);
            }
        }
    });
}

/// Per-channel sums over `rows` rows, cut into a fixed 8 pieces of rows (whatever the thread
/// count, so that a run's numbers do not depend on it) summed on the threads, each in f64 in row
/// order, the pieces then added in order: `add_row(row, sums)` adds one row's terms to `sums`
/// (`width` values). The reference sums all rows in one f64 run: the two differ by f64 rounding.
fn sums_by_pieces(rows: usize, width: usize, add_row: &(dyn Fn(usize, &mut [f64]) + Sync)) -> Vec<f64> {
    const PIECES: usize = 8;
    let per = rows.div_ceil(PIECES).max(1);
    let mut partial = vec![0.0f64; PIECES * width];
    let mut parts = partial.chunks_mut(width.max(1)).enumerate();
    let items: [_; threads::MAX_CHUNKS] = std::array::from_fn(|_| parts.next());
    threads::for_each(items, &|(piece, sums): (usize, &mut [f64])| {
        for row in piece * per..((piece + 1) * per).min(rows) {
            add_row(row, sums);
        }
    });
    let mut total = vec![0.0f64; width];
    for sums in partial.chunks(width.max(1)) {
        for (t, s) in total.iter_mut().zip(sums) {
            *t += s;
        }
    }
    total
}

/// `reference::batchnorm_stats` with its sums over pieces on the threads (`sums_by_pieces`).
fn batchnorm_stats_fast(mean: &mut [f32], var: &mut [f32], x: &[f32], rows: usize) {
    let c = mean.len();
    let sums = sums_by_pieces(rows, c, &|row, sums| {
        for (s, &v) in sums.iter_mut().zip(&x[row * c..(row + 1) * c]) {
            *s += v as f64;
        }
    });
    for (m, s) in mean.iter_mut().zip(&sums) {
        *m = (s / rows as f64) as f32;
    }
    let mean: &[f32] = mean;
    let squares = sums_by_pieces(rows, c, &|row, sums| {
        for ((s, &v), &m) in sums.iter_mut().zip(&x[row * c..(row + 1) * c]).zip(mean) {
            let d = (v - m) as f64;
            *s += d * d;
        }
    });
    for (v, s) in var.iter_mut().zip(&squares) {
        *v = (s / rows as f64) as f32;
    }
}

/// `reference::batchnorm_backward_params` with its sums over pieces on the threads.
fn batchnorm_backward_params_fast(
    (dgamma, dbeta): (&mut [f32], &mut [f32]),
    dy: &[f32],
    x: &[f32],
    (mean, invstd): (&[f32], &[f32]),
    rows: usize,
) {
    let c = mean.len();
    let sums = sums_by_pieces(rows, 2 * c, &|row, sums| {
        let (sg, sb) = sums.split_at_mut(c);
        let (dy_row, x_row) = (&dy[row * c..(row + 1) * c], &x[row * c..(row + 1) * c]);
        let (mean, invstd) = (&mean[..c], &invstd[..c]);
        for ch in 0..c {
            let xhat = (x_row[ch] - mean[ch]) * invstd[ch];
            sg[ch] += (dy_row[ch] * xhat) as f64;
            sb[ch] += dy_row[ch] as f64;
        }
    });
    for ch in 0..c {
        dgamma[ch] = sums[ch] as f32;
        dbeta[ch] = sums[c + ch] as f32;
    }
}
