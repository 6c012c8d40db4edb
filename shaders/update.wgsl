// update.wgsl: one optimizer step of a parameter on its own (a batch normalisation's scale and
// offset; a dense or convolution layer's weights step inside their gradient's kernel), one
// invocation per value, through optimizer.wgsl. The value, its gradient and its moments sit at
// word offsets of their packed buffers, bound whole; the step's scalars come from the step
// table's row of `slot` (matmul.wgsl's layout: word 0 is the row of slot 0, row r at words
// 4 + 4 r).
//
// Bindings (group 0):
//   0 params    uniform  { count, flags, slot, value, grad, velocity, moment, rho, eps, beta1,
//                          beta2, momentum, l2, _pad0, _pad1, _pad2 }
//   1 values    storage rw     array<f32>  the packed parameter values
//   2 grads     storage read   array<f32>  the packed gradients
//   3 velocity  storage rw     array<f32>  the packed second moments
//   4 moments   storage rw     array<f32>  the packed first moments
//   5 table     storage read   array<f32>  the step table
// Dispatch: 64 per workgroup on a 2-D grid (x fastest), i = x + y * groups_x * 64.

//!include optimizer.wgsl

struct Params {
    count: u32,
    flags: u32,
    slot: u32,
    value: u32,
    grad: u32,
    velocity: u32,
    moment: u32,
    rho: f32,
    eps: f32,
    beta1: f32,
    beta2: f32,
    momentum: f32,
    l2: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> values: array<f32>;
@group(0) @binding(2) var<storage, read> grads: array<f32>;
@group(0) @binding(3) var<storage, read_write> velocity: array<f32>;
@group(0) @binding(4) var<storage, read_write> moments: array<f32>;
@group(0) @binding(5) var<storage, read> table: array<f32>;

@compute @workgroup_size(64)
fn update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.count) {
        return;
    }
    let flags = params.flags;
    let s = Moments(values[params.value + i], velocity[params.velocity + i], moments[params.moment + i]);
    let row = 4u + 4u * (bitcast<u32>(table[0]) + params.slot);
    let k = vec4<f32>(table[row], table[row + 1u], table[row + 2u], table[row + 3u]);
    let h = Hyper(params.rho, params.eps, params.beta1, params.beta2, params.momentum, params.l2);
    let next = optimizer_step(flags, s, grads[params.grad + i], k, h);
    values[params.value + i] = next.p;
    if (uses_velocity(flags)) {
        velocity[params.velocity + i] = next.v;
    }
    if (uses_momentum(flags)) {
        moments[params.moment + i] = next.m;
    }
}
