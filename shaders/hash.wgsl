// hash.wgsl: the counter-based random words of dropout's masks and the augmentation's
// transforms, the same integer operations as `ops::dropout` on the host (u32 arithmetic wraps the
// same everywhere). Not a kernel of its own: a kernel includes it (`//!include hash.wgsl`).

// lowbias32: every bit of the input moves every bit of the output.
fn mix(x_in: u32) -> u32 {
    var x = x_in;
    x = x ^ (x >> 16u);
    x = x * 0x7feb352du;
    x = x ^ (x >> 15u);
    x = x * 0x846ca68bu;
    x = x ^ (x >> 16u);
    return x;
}

// The key of one step of a layer's (or the augmentation's) key.
fn step_key(key: u32, step: u32) -> u32 {
    return mix(key ^ mix(step));
}

// The random word of value (or draw) i of a step.
fn mask_bits(key: u32, i: u32) -> u32 {
    return mix(key ^ mix(i));
}
