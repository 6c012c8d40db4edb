// softmax_xent.wgsl: fused softmax + sparse categorical cross-entropy, forward and backward, with
// the batch's loss sum and correct count reduced on the GPU (no float atomics: deterministic).
//
// Bindings (group 0):
//   0 params   uniform  { rows, classes, start, slot, write_dlogits, ... } (16 words; the rest
//                       are output_layer.wgsl's, which is compiled after this file and shares
//                       its params, bindings 2-5, row_stats and add_up_stats)
//   1 logits   storage read   array<f32>  (rows, classes)
//   2 labels   storage read   array<u32>  (N,): the dataset's labels, one per word
//   3 order    storage read   array<u32>  (N,): row r's label is labels[order[start + r]]
//   4 dlogits  storage rw     array<f32>  (rows, classes) = (softmax - onehot) / rows, written
//                                         only when write_dlogits != 0 (evaluation skips it)
//   5 stats    storage rw     array<u32>  (slots, 2): [2 slot] = bitcast(sum of row losses),
//                                         [2 slot + 1] = rows whose first arg-max is the label
// Row loss = log(sum exp(logit - max)) - (logit[label] - max).
// Dispatch: exactly one workgroup of 256 invocations; invocation t handles rows t, t + 256, ...,
// then a fixed-order tree reduction in workgroup memory sums the per-invocation partials
// (add_up_stats).
// Rows hold at most 16 classes (the host asks for MNIST's 10): the host unrolls the per-class
// lines (`//!unroll`, see shader_text.rs), so all of a row's logits are requested at once.

struct Params {
    rows: u32,
    classes: u32,
    start: u32,
    slot: u32,
    write_dlogits: u32,
    // Read by output_layer.wgsl only.
    c: u32,
    flags: u32,
    w_value: u32,
    b_value: u32,
    w_velocity: u32,
    b_velocity: u32,
    w_grad: u32,
    b_grad: u32,
    lr: f32,
    rho: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read> order: array<u32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<u32>;

const THREADS: u32 = 256u;
var<workgroup> part_loss: array<f32, 256>;
var<workgroup> part_correct: array<u32, 256>;

@compute @workgroup_size(256)
fn softmax_xent_forward_backward(@builtin(local_invocation_index) t: u32) {
    let inv_rows = 1.0 / f32(params.rows);
    var loss = 0.0;
    var correct = 0u;
    for (var r = t; r < params.rows; r = r + THREADS) {
        let base = r * params.classes;
        let row = row_stats(row_of_logits(base), base, labels[order[params.start + r]], inv_rows);
        loss = loss + row.x;
        correct = correct + u32(row.y);
    }
    add_up_stats(t, loss, correct);
}

// Sum every invocation's (loss, correct) in a fixed-order tree and store them in the stats slot.
// Every invocation of the workgroup must call it (it holds barriers).
fn add_up_stats(t: u32, loss: f32, correct: u32) {
    part_loss[t] = loss;
    part_correct[t] = correct;
    workgroupBarrier();
    for (var stride = THREADS / 2u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            part_loss[t] = part_loss[t] + part_loss[t + stride];
            part_correct[t] = part_correct[t] + part_correct[t + stride];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        stats[2u * params.slot] = bitcast<u32>(part_loss[0]);
        stats[2u * params.slot + 1u] = part_correct[0];
    }
}

// A logit of row `base`, or a value below any logit past the row's end.
fn logit_or_low(base: u32, j: u32) -> f32 {
    if (j < params.classes) {
        return logits[base + j];
    }
    return -3.0e38;
}

// The logits of the row at `base`, padded to 16 with a value below any logit.
fn row_of_logits(base: u32) -> array<f32, 16> {
    var x: array<f32, 16>;
    //!unroll j 16: x[{j}] = logit_or_low(base, {j}u);
    return x;
}

// (loss, 1 if the first arg-max is the label) of the row at `base` whose logits are x (at most 16
// classes, padded as row_of_logits does); writes its dlogits when asked.
fn row_stats(x: array<f32, 16>, base: u32, label: u32, inv_rows: f32) -> vec2<f32> {
    let v = params.classes;
    //!unroll j 16: let x{j} = x[{j}];
    var max_v = x0;
    var arg = 0u;
    //!unroll j 16: if (x{j} > max_v) { max_v = x{j}; arg = {j}u; }
    var sum = 0.0;
    //!unroll j 16: if ({j}u < v) { sum = sum + exp(x{j} - max_v); }
    var at_label = 0.0;
    //!unroll j 16: if ({j}u == label) { at_label = x{j}; }
    if (params.write_dlogits != 0u) {
        //!unroll j 16: if ({j}u < v) { dlogits[base + {j}u] = (exp(x{j} - max_v) / sum - select(0.0, 1.0, {j}u == label)) * inv_rows; }
    }
    return vec2<f32>(log(sum) - (at_label - max_v), select(0.0, 1.0, arg == label));
}
