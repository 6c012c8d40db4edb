// bias.wgsl: bias-add forward and the bias gradient (column sum).
//
// Bindings (group 0), both entry points:
//   0 params  uniform  { rows, cols, _, _ }
// bias_add_forward:
//   1 bias    storage read   array<f32>  (cols,)
//   2 out     storage rw     array<f32>  (rows, cols), out[r, c] += bias[c]
//   Dispatch: one invocation per element, rows * cols, 64 per workgroup, 2-D grid (x fastest).
// bias_backward:
//   1 dout    storage read   array<f32>  (rows, cols)
//   2 dbias   storage rw     array<f32>  (cols,), dbias[c] = sum over r of dout[r, c]
//   Dispatch: one invocation per column, 64 per workgroup; each sums its column in row order
//   (no atomics, so the result is deterministic).

struct Params {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(64)
fn bias_add_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.rows * params.cols) {
        return;
    }
    dst[i] = dst[i] + src[i % params.cols];
}

@compute @workgroup_size(64)
fn bias_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    if (col >= params.cols) {
        return;
    }
    var acc = 0.0;
    for (var r = 0u; r < params.rows; r = r + 1u) {
        acc = acc + src[r * params.cols + col];
    }
    dst[col] = acc;
}
