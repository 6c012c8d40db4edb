// batch_norm.wgsl: batch normalisation over x (rows, channels), the channel last (NHWC images
// or a flat batch), as `reference::layers` computes it:
//   training:   mean, var = the batch's per-channel mean and biased variance (two passes);
//               stats = (mean, 1 / sqrt(var + eps)); moving = moving momentum + batch (1 - momentum)
//   forward:    y = gamma ((x - mean) invstd) + beta, then max(y, 0) with RELU
//               (EVAL: mean and invstd from the moving averages)
//   backward:   dgamma = sum dy xhat, dbeta = sum dy (xhat = (x - mean) invstd);
//               dx = gamma invstd (dy - dbeta / rows - xhat dgamma / rows)
// gamma, beta and the moving averages sit at word offsets of the packed parameter values, the
// gradients dgamma and dbeta at offsets of the packed gradients (bound whole, as the fused
// optimizer steps bind them). Sums run in f32 over a fixed tree (deterministic); the CPU sums
// in f64, so the two agree to rounding.
//
// Bindings (group 0):
//   0 params  uniform  { rows, channels, count, flags, gamma, beta, moving_mean,
//                        moving_variance, dgamma, dbeta, momentum, eps }
//   1 x       storage read   array<f32>  (rows, channels): the forward input
//   2 dy      storage read   array<f32>  (rows, channels): backward only
//   3 values  storage rw     array<f32>  the packed parameter values
//   4 stats   storage rw     array<f32>  (2, channels): the batch's mean, then invstd
//   5 out     storage rw     array<f32>  forward: y; backward: dx
//   6 grads   storage rw     array<f32>  the packed gradients
// Entry points:
//   bn_stats            one workgroup of 256 per channel (c = x + y * groups_x): the batch's
//                       statistics into stats, and the moving averages moved
//   bn_forward          one invocation per value (count = rows * channels)
//   bn_backward_params  one workgroup of 256 per channel: dgamma and dbeta into grads
//   bn_backward_input   one invocation per value: dx (after bn_backward_params)

struct Params {
    rows: u32,
    channels: u32,
    count: u32,
    flags: u32,
    gamma: u32,
    beta: u32,
    moving_mean: u32,
    moving_variance: u32,
    dgamma: u32,
    dbeta: u32,
    momentum: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> values: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> grads: array<f32>;

const RELU: u32 = 4096u;
const EVAL: u32 = 8192u;

var<workgroup> partial: array<f32, 256>;
var<workgroup> partial2: array<f32, 256>;

// Sum partial and partial2 over the workgroup (a fixed tree); every invocation gets the sums.
fn reduce_pair(t: u32) -> vec2<f32> {
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (t < s) {
            partial[t] = partial[t] + partial[t + s];
            partial2[t] = partial2[t] + partial2[t + s];
        }
        workgroupBarrier();
    }
    let sums = vec2<f32>(partial[0], partial2[0]);
    workgroupBarrier();
    return sums;
}

@compute @workgroup_size(256)
fn bn_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
            @builtin(local_invocation_index) t: u32) {
    let c = wid.x + wid.y * groups.x;
    if (c >= params.channels) {
        return;
    }
    let n = f32(params.rows);
    var s = 0.0;
    for (var r = t; r < params.rows; r = r + 256u) {
        s = s + x[r * params.channels + c];
    }
    partial[t] = s;
    partial2[t] = 0.0;
    let mean = reduce_pair(t).x / n;
    var q = 0.0;
    for (var r = t; r < params.rows; r = r + 256u) {
        let d = x[r * params.channels + c] - mean;
        q = q + d * d;
    }
    partial[t] = q;
    partial2[t] = 0.0;
    let variance = reduce_pair(t).x / n;
    if (t == 0u) {
        stats[c] = mean;
        stats[params.channels + c] = 1.0 / sqrt(variance + params.eps);
        let m = params.momentum;
        values[params.moving_mean + c] = values[params.moving_mean + c] * m + mean * (1.0 - m);
        values[params.moving_variance + c] = values[params.moving_variance + c] * m + variance * (1.0 - m);
    }
}

@compute @workgroup_size(64)
fn bn_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.count) {
        return;
    }
    let c = i % params.channels;
    var mean = stats[c];
    var invstd = stats[params.channels + c];
    if ((params.flags & EVAL) != 0u) {
        mean = values[params.moving_mean + c];
        invstd = 1.0 / sqrt(values[params.moving_variance + c] + params.eps);
    }
    var y = values[params.gamma + c] * ((x[i] - mean) * invstd) + values[params.beta + c];
    if ((params.flags & RELU) != 0u && !(y > 0.0)) {
        y = 0.0;
    }
    out[i] = y;
}

@compute @workgroup_size(256)
fn bn_backward_params(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                      @builtin(local_invocation_index) t: u32) {
    let c = wid.x + wid.y * groups.x;
    if (c >= params.channels) {
        return;
    }
    let mean = stats[c];
    let invstd = stats[params.channels + c];
    var sg = 0.0;
    var sb = 0.0;
    for (var r = t; r < params.rows; r = r + 256u) {
        let i = r * params.channels + c;
        let g = dy[i];
        sg = sg + g * ((x[i] - mean) * invstd);
        sb = sb + g;
    }
    partial[t] = sg;
    partial2[t] = sb;
    let sums = reduce_pair(t);
    if (t == 0u) {
        grads[params.dgamma + c] = sums.x;
        grads[params.dbeta + c] = sums.y;
    }
}

@compute @workgroup_size(64)
fn bn_backward_input(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.count) {
        return;
    }
    let c = i % params.channels;
    let n = f32(params.rows);
    let invstd = stats[params.channels + c];
    let xhat = (x[i] - stats[c]) * invstd;
    let mean_dbeta = grads[params.dbeta + c] / n;
    let mean_dgamma = grads[params.dgamma + c] / n;
    out[i] = values[params.gamma + c] * invstd * (dy[i] - mean_dbeta - xhat * mean_dgamma);
}
