// dropout.wgsl: dropout's forward and backward passes, one invocation per value. Value i of a
// step is kept when mask_bits(step_key(key, step), i) >= threshold (hash.wgsl, the same integer
// operations as `ops::dropout` on the host), so every device drops the same values. A kept value is
// multiplied by `scale` (one f32 product, as the CPU's).
//
// Bindings (group 0):
//   0 params     uniform  { count, key, threshold, scale, slot, flags, _pad0, _pad1 }
//   1 inp        storage read   array<f32>  forward: the input; backward: dout
//   2 relu_mask  storage read   array<f32>  backward with RELU_MASK: the forward input
//   3 out        storage rw     array<f32>  forward: out; backward: dinp
//   4 step_base  storage read   array<u32>  word 0: the run's step of statistics slot 0, so that
//                                           this step is step_base[0] + slot (written once a
//                                           chunk of steps, like the optimizer's step table)
// Flags:
//   TRAIN      apply the step's mask (without it the forward pass copies: evaluation)
//   RELU_MASK  also zero where relu_mask <= 0 (a ReLU before the dropout, from its output)
// Dispatch: 64 per workgroup on a 2-D grid (x fastest), i = x + y * groups_x * 64.

struct Params {
    count: u32,
    key: u32,
    threshold: u32,
    scale: f32,
    slot: u32,
    flags: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> inp: array<f32>;
@group(0) @binding(2) var<storage, read> relu_mask: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> step_base: array<u32>;

const TRAIN: u32 = 1024u;
const RELU_MASK: u32 = 2048u;

//!include hash.wgsl

@compute @workgroup_size(64)
fn dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.count) {
        return;
    }
    if ((params.flags & TRAIN) == 0u) {
        out[i] = inp[i];
        return;
    }
    var keep = mask_bits(step_key(params.key, step_base[0] + params.slot), i) >= params.threshold;
    if ((params.flags & RELU_MASK) != 0u && !(relu_mask[i] > 0.0)) {
        keep = false;
    }
    out[i] = select(0.0, inp[i] * params.scale, keep);
}
