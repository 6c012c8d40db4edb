// optim.wgsl: parameter updates, elementwise over n values.
//
// Bindings (group 0); each entry point uses only its own:
//   0 params    uniform  { n, lr, rho, eps } (lr, rho, eps as f32 bits)   both
// rmsprop_update (Keras's formula):
//   1 grad      storage read   array<f32>  (n,)
//   2 param     storage rw     array<f32>  (n,), param -= lr * grad / sqrt(velocity + eps)
//   3 velocity  storage rw     array<f32>  (n,), velocity = rho * velocity + (1 - rho) * grad^2
// sgd_update:
//   1 grad      storage read   array<f32>  (n,)
//   2 param     storage rw     array<f32>  (n,), param -= lr * grad
// Dispatch: rmsprop_update: one invocation per 4 consecutive values (fewer, longer threads: the
// update is memory-bound); sgd_update: one per value; 64 invocations per workgroup, 2-D grid.

struct Params {
    n: u32,
    lr: f32,
    rho: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> velocity: array<f32>;

fn rmsprop_one(i: u32) {
    if (i >= params.n) {
        return;
    }
    let g = grad[i];
    let v = params.rho * velocity[i] + (1.0 - params.rho) * g * g;
    velocity[i] = v;
    param[i] = param[i] - params.lr * g / sqrt(v + params.eps);
}

@compute @workgroup_size(64)
fn rmsprop_update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = 4u * (gid.x + gid.y * groups.x * 64u);
    rmsprop_one(i);
    rmsprop_one(i + 1u);
    rmsprop_one(i + 2u);
    rmsprop_one(i + 3u);
}

@compute @workgroup_size(64)
fn sgd_update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.n) {
        return;
    }
    param[i] = param[i] - params.lr * grad[i];
}
