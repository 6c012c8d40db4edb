// pool.wgsl: max pooling over non-overlapping size x size windows (stride = size; a partial
// window at the right or bottom edge is dropped) of a batch of h x w x ch images (NHWC), output
// oh x ow x ch with oh = h / size, ow = w / size. A window's maximum is its first largest value
// in row-major order (ky, then kx): the best is replaced only by a strictly greater value, so a
// tie keeps the first (ops.rs PoolKind, reference.rs maxpool_forward and maxpool_backward).
//
// Bindings (group 0):
//   0 params  uniform  { count, h, w, ch, size, oh, ow, flags }
//   1 inp     storage read   array<f32>  (images, h, w, ch): the forward input
//   2 dout    storage read   array<f32>  (images, oh, ow, ch): backward only
//   3 out     storage rw     array<f32>  forward: out (images, oh, ow, ch), the window maxima;
//                                        backward: dinp (images, h, w, ch)
// Entry points:
//   maxpool_forward   one invocation per output value (count = images * oh * ow * ch)
//   maxpool_backward  one invocation per input value (count = images * h * w * ch): dinp = dout
//                     of the value's window if the value is that window's first maximum, else 0;
//                     with RELU_BEFORE also 0 where inp <= 0 (a ReLU before the pool, seen from
//                     its output); 0 in the dropped edge rows and columns. Each invocation
//                     writes only its own value (no scatter, no atomics), so results are exact
//                     and deterministic.
// Dispatch: 64 per workgroup on a 2-D grid (x fastest), i = x + y * groups_x * 64.

struct Params {
    count: u32,
    h: u32,
    w: u32,
    ch: u32,
    size: u32,
    oh: u32,
    ow: u32,
    flags: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> inp: array<f32>;
@group(0) @binding(2) var<storage, read> dout: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const RELU_BEFORE: u32 = 64u;

// The index in inp of the first maximum of window (oy, ox) of channel c of the image whose first
// value is inp[image].
fn window_argmax(image: u32, oy: u32, ox: u32, c: u32) -> u32 {
    let s = params.size;
    var best = image + ((oy * s) * params.w + ox * s) * params.ch + c;
    for (var ky = 0u; ky < s; ky = ky + 1u) {
        for (var kx = 0u; kx < s; kx = kx + 1u) {
            let i = image + ((oy * s + ky) * params.w + ox * s + kx) * params.ch + c;
            if (inp[i] > inp[best]) {
                best = i;
            }
        }
    }
    return best;
}

@compute @workgroup_size(64)
fn maxpool_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let o = gid.x + gid.y * groups.x * 64u;
    if (o >= params.count) {
        return;
    }
    // o = ((b * oh + oy) * ow + ox) * ch + c
    let c = o % params.ch;
    let p = o / params.ch;
    let ox = p % params.ow;
    let q = p / params.ow;
    let oy = q % params.oh;
    let b = q / params.oh;
    out[o] = inp[window_argmax(b * params.h * params.w * params.ch, oy, ox, c)];
}

@compute @workgroup_size(64)
fn maxpool_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.count) {
        return;
    }
    // i = ((b * h + y) * w + x) * ch + c
    let c = i % params.ch;
    let p = i / params.ch;
    let x = p % params.w;
    let q = p / params.w;
    let y = q % params.h;
    let b = q / params.h;
    let oy = y / params.size;
    let ox = x / params.size;
    var g = 0.0;
    if (oy < params.oh && ox < params.ow) {
        let first_max = window_argmax(b * params.h * params.w * params.ch, oy, ox, c);
        let relu_dead = (params.flags & RELU_BEFORE) != 0u && !(inp[i] > 0.0);
        if (first_max == i && !relu_dead) {
            g = dout[((b * params.oh + oy) * params.ow + ox) * params.ch + c];
        }
    }
    out[i] = g;
}
