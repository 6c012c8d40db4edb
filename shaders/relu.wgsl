// relu.wgsl: ReLU forward and backward, elementwise over n values.
//
// Bindings (group 0); each entry point uses only its own (auto layout keeps the used ones):
//   0 params  uniform  { n, _, _, _ }                         both
// relu_forward:
//   1 inp     storage read   array<f32>  (n,)
//   2 out     storage rw     array<f32>  (n,), out = max(inp, 0)
// relu_backward:
//   3 dout    storage read   array<f32>  (n,)
//   4 act     storage read   array<f32>  (n,), the forward output
//   5 dinp    storage rw     array<f32>  (n,), dinp = dout where act > 0, else 0
// Dispatch: one invocation per value, 64 per workgroup, 2-D grid (x fastest).

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> inp: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> dout: array<f32>;
@group(0) @binding(4) var<storage, read> act: array<f32>;
@group(0) @binding(5) var<storage, read_write> dinp: array<f32>;

@compute @workgroup_size(64)
fn relu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.n) {
        return;
    }
    let v = inp[i];
    out[i] = select(0.0, v, v > 0.0);
}

@compute @workgroup_size(64)
fn relu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.n) {
        return;
    }
    dinp[i] = select(0.0, dout[i], act[i] > 0.0);
}
