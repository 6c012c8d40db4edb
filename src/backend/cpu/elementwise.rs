//! The fast CPU path's elementwise ops: the same arithmetic as `reference`, in the same order (so
//! bit-identical results), laid out for the vector units.
//!
//! Contract: each function here returns exactly what its namesake in `reference` returns for the
//! same inputs; only memory order and instruction selection differ (the widest vectors the CPU
//! has, AVX-512 or AVX2, chosen at run time by `simd_variants!`; no fused multiply-add, which
//! would change the rounding).

use super::threads;
use crate::backend::reference::{optimizer_one, rmsprop_one, OptimizerStep};
use crate::optim::OptimizerKind;

/// dbias (OC) = column sums of dout (B, OC), accumulated row by row (contiguous reads) in the
/// reference's order: ((d[0] + d[1]) + d[2]) + ...; with the sums of 16, 32, 64 or 128 columns
/// held in registers (a sum kept in dbias waits on its own store every row). A large dout (a
/// convolution's, megabytes) is summed by the threads of `threads`, each over its own group of columns
/// (whole cache lines of every row), so every column is still summed in row order.
pub fn bias_backward(dbias: &mut [f32], dout: &[f32], b: usize, oc: usize) {
    let groups = column_groups(b, oc);
    if groups > 1 {
        let width = oc / groups;
        let mut parts = dbias[..oc].chunks_mut(width).enumerate();
        let items: [_; MAX_COLUMN_GROUPS] = std::array::from_fn(|_| parts.next());
        let dout = &dout[..b * oc];
        threads::for_each(items, &|(g, part): (usize, &mut [f32])| {
            bias_backward_columns(part, dout, oc, g * width)
        });
        return;
    }
    bias_backward_whole(dbias, dout, b, oc);
}

/// The most column groups `bias_backward` splits a gradient into (16 columns, one cache line of
/// a row, each).
const MAX_COLUMN_GROUPS: usize = 8;

/// Values of dout worth splitting its bias gradient over threads (a 256 KiB gradient).
const BIAS_SPLIT_MIN: usize = 1 << 16;

/// Column groups for the bias gradient of dout (b, oc): one per thread, of 16, 32 or 64 columns;
/// 1 (no split) for a small gradient, one thread or a column count that is not 32, 64 or 128.
fn column_groups(b: usize, oc: usize) -> usize {
    if b * oc < BIAS_SPLIT_MIN || !matches!(oc, 32 | 64 | 128) {
        return 1;
    }
    let mut groups = 1;
    while groups * 2 <= threads::threads() && groups * 2 <= oc / 16 {
        groups *= 2;
    }
    groups
}

simd_variants! {
    /// part (W) = the column sums of dout (rows of oc) over columns j0..j0 + W, in row order.
    fn bias_backward_columns(part: &mut [f32], dout: &[f32], oc: usize, j0: usize) => bias_columns_sized
}

#[inline(always)]
fn bias_columns_sized(part: &mut [f32], dout: &[f32], oc: usize, j0: usize) {
    match part.len() {
        16 => bias_columns_fixed::<16>(part, dout, oc, j0),
        32 => bias_columns_fixed::<32>(part, dout, oc, j0),
        64 => bias_columns_fixed::<64>(part, dout, oc, j0),
        w => {
            part.fill(0.0);
            for row in dout.chunks_exact(oc) {
                for (acc, &d) in part.iter_mut().zip(&row[j0..j0 + w]) {
                    *acc += d;
                }
            }
        }
    }
}

/// `bias_columns_sized` for W columns, summed in a local array.
#[inline(always)]
fn bias_columns_fixed<const W: usize>(part: &mut [f32], dout: &[f32], oc: usize, j0: usize) {
    let mut acc = [0.0f32; W];
    for row in dout.chunks_exact(oc) {
        let Some(cols) = row[j0..].first_chunk::<W>() else {
            break;
        };
        for j in 0..W {
            acc[j] += cols[j];
        }
    }
    part[..W].copy_from_slice(&acc);
}

simd_variants! {
    /// `bias_backward` on this thread.
    fn bias_backward_whole(dbias: &mut [f32], dout: &[f32], b: usize, oc: usize) => bias_backward_sized
}

#[inline(always)]
fn bias_backward_sized(dbias: &mut [f32], dout: &[f32], b: usize, oc: usize) {
    let dout = &dout[..b * oc];
    match oc {
        16 => bias_backward_fixed::<16>(dbias, dout),
        32 => bias_backward_fixed::<32>(dbias, dout),
        64 => bias_backward_fixed::<64>(dbias, dout),
        128 => bias_backward_fixed::<128>(dbias, dout),
        _ => {
            dbias[..oc].fill(0.0);
            for row in dout.chunks_exact(oc) {
                for (acc, &d) in dbias[..oc].iter_mut().zip(row) {
                    *acc += d;
                }
            }
        }
    }
}

/// `bias_backward` for OC columns: the same additions in the same order, summed in a local array.
#[inline(always)]
fn bias_backward_fixed<const OC: usize>(dbias: &mut [f32], dout: &[f32]) {
    let mut acc = [0.0f32; OC];
    for row in dout.as_chunks::<OC>().0 {
        for j in 0..OC {
            acc[j] += row[j];
        }
    }
    dbias[..OC].copy_from_slice(&acc);
}

simd_variants! {
    /// The fused epilogue of a matmul on out (B, N), as `reference::matmul_epilogue`: + bias (N),
    /// then max(., 0), then 0 where mask (B, N) is not > 0; written as selects, which vectorize
    /// (the reference's branches mispredict on a ReLU mask, which is about half zeros).
    pub fn matmul_epilogue(
        out: &mut [f32],
        bias: Option<&[f32]>,
        relu: bool,
        mask: Option<&[f32]>,
        b: usize,
        n: usize,
    ) => epilogue_any
}

#[inline(always)]
fn epilogue_any(out: &mut [f32], bias: Option<&[f32]>, relu: bool, mask: Option<&[f32]>, b: usize, n: usize) {
    let out = &mut out[..b * n];
    if let Some(bias) = bias {
        for row in out.chunks_exact_mut(n) {
            for (x, &bv) in row.iter_mut().zip(&bias[..n]) {
                *x += bv;
            }
        }
    }
    if relu {
        for x in out.iter_mut() {
            *x = if *x > 0.0 { *x } else { 0.0 };
        }
    }
    if let Some(mask) = mask {
        for (x, &m) in out.iter_mut().zip(&mask[..b * n]) {
            *x = if m > 0.0 { *x } else { 0.0 };
        }
    }
}

simd_variants! {
    /// Every optimizer's step, as `reference::optimizer_update` (the same bits).
    pub fn optimizer_update(
        param: &mut [f32],
        velocity: &mut [f32],
        momentum: &mut [f32],
        grad: &[f32],
        k: &OptimizerStep<f32>,
    ) => optimizer_portable
}

/// `reference::optimizer_one` over the values, in one loop per optimizer, so that each loop
/// knows its formula and compiles to straight vector code.
#[inline(always)]
fn optimizer_portable(
    param: &mut [f32],
    velocity: &mut [f32],
    momentum: &mut [f32],
    grad: &[f32],
    k: &OptimizerStep<f32>,
) {
    let k = *k;
    if k.kind == OptimizerKind::RmsProp && k.l2 == 0.0 {
        // The reference job's optimizer: no first moment to walk.
        for ((p, v), &g) in param.iter_mut().zip(velocity.iter_mut()).zip(grad) {
            rmsprop_one(p, v, g, k.lr, k.rho, k.eps);
        }
        return;
    }
    let values = param
        .iter_mut()
        .zip(velocity.iter_mut())
        .zip(momentum.iter_mut())
        .zip(grad);
    match (k.kind, k.l2 == 0.0) {
        (OptimizerKind::Adam | OptimizerKind::AdamW, true) => {
            let k = OptimizerStep { l2: 0.0, ..k };
            for (((p, v), m), &g) in values {
                optimizer_one(
                    p,
                    v,
                    m,
                    g,
                    &OptimizerStep {
                        kind: OptimizerKind::Adam,
                        ..k
                    },
                );
            }
        }
        _ => {
            for (((p, v), m), &g) in values {
                optimizer_one(p, v, m, g, &k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::reference as r;

    #[test]
    fn bit_identical_to_the_reference() {
        // Column counts with sums in registers (16 .. 128) and without (29).
        // 37 rows on one thread; 4099 rows, split over the threads by columns where oc allows.
        for (oc, b) in [16, 32, 64, 128, 29].into_iter().flat_map(|oc| [(oc, 37), (oc, 4099)]) {
            let dout: Vec<f32> = (0..b * oc).map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5).collect();
            let (mut fast, mut slow) = (vec![0.0; oc], vec![0.0; oc]);
            bias_backward(&mut fast, &dout, b, oc);
            r::bias_backward(&mut slow, &dout, b, oc);
            assert!(
                fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits()),
                "oc {oc}"
            );
        }
        let (b, oc) = (37, 29);
        let dout: Vec<f32> = (0..b * oc).map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5).collect();

        // A ReLU epilogue and a mask with zeros, negatives and a NaN.
        let bias: Vec<f32> = (0..oc).map(|i| i as f32 * 0.01 - 0.1).collect();
        let mut mask = dout.clone();
        mask[3] = f32::NAN;
        mask[4] = 0.0;
        for relu in [false, true] {
            let (mut fast, mut slow) = (dout.clone(), dout.clone());
            matmul_epilogue(&mut fast, Some(&bias), relu, Some(&mask), b, oc);
            r::matmul_epilogue(&mut slow, Some(&bias), relu, Some(&mask), b, oc);
            assert_eq!(fast, slow);
        }

        let n = 1003;
        let grad: Vec<f32> = (0..n).map(|i| ((i * 31) % 101) as f32 * 1e-3 - 0.05).collect();
        let (mut p1, mut v1) = (vec![0.3f32; n], vec![1e-4f32; n]);
        let (mut p2, mut v2) = (p1.clone(), v1.clone());
        let rmsprop = crate::optim::Optimizer::new(OptimizerKind::RmsProp, Some(1e-3)).unwrap();
        let k = OptimizerStep::new(&rmsprop, rmsprop.scalars(0));
        optimizer_update(&mut p1, &mut v1, &mut vec![0.0; n], &grad, &k);
        r::rmsprop_update(&mut p2, &mut v2, &grad, 1e-3, 0.9, 1e-7);
        assert_eq!((p1, v1), (p2, v2));
        // Every optimizer, with and without L2, from non-zero moments.
        for kind in [
            OptimizerKind::Adam,
            OptimizerKind::AdamW,
            OptimizerKind::Sgd,
            OptimizerKind::RmsProp,
        ] {
            for wd in [0.0, 1e-2] {
                let mut opt = crate::optim::Optimizer::new(kind, Some(1e-2)).unwrap();
                (opt.momentum, opt.weight_decay) = (if kind == OptimizerKind::Sgd { 0.9 } else { 0.0 }, wd);
                let k = OptimizerStep::new(&opt, opt.scalars(3));
                let start = |x: f32| (0..n).map(|i| x * (1.0 + (i % 7) as f32)).collect::<Vec<f32>>();
                let mut fast = (start(0.3), start(1e-4), start(-1e-3));
                let mut slow = fast.clone();
                optimizer_update(&mut fast.0, &mut fast.1, &mut fast.2, &grad, &k);
                r::optimizer_update(&mut slow.0, &mut slow.1, &mut slow.2, &grad, &k);
                assert_eq!(fast, slow, "{kind:?}, weight decay {wd}");
            }
        }
    }
}
