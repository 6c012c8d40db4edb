// softmax_xent.wgsl: fused softmax + sparse categorical cross-entropy, forward and backward, with
// the batch's loss sum and correct count reduced on the GPU (no float atomics: deterministic).
//
// Bindings (group 0):
//   0 params   uniform  { rows, classes, start, slot, write_dlogits, _, _, _ }
//   1 logits   storage read   array<f32>  (rows, classes)
//   2 labels   storage read   array<u32>  (N,): the dataset's labels, one per word
//   3 order    storage read   array<u32>  (N,): row r's label is labels[order[start + r]]
//   4 dlogits  storage rw     array<f32>  (rows, classes) = (softmax - onehot) / rows, written
//                                         only when write_dlogits != 0 (evaluation skips it)
//   5 stats    storage rw     array<u32>  (slots, 2): [2 slot] = bitcast(sum of row losses),
//                                         [2 slot + 1] = rows whose first arg-max is the label
// Row loss = log(sum exp(logit - max)) - (logit[label] - max).
// Dispatch: exactly one workgroup of 256 invocations; invocation t handles rows t, t + 256, ...,
// then a fixed-order tree reduction in workgroup memory sums the per-invocation partials.

struct Params {
    rows: u32,
    classes: u32,
    start: u32,
    slot: u32,
    write_dlogits: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
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
    let v = params.classes;
    let inv_rows = 1.0 / f32(params.rows);
    var loss = 0.0;
    var correct = 0u;
    for (var r = t; r < params.rows; r = r + THREADS) {
        let base = r * v;
        let label = labels[order[params.start + r]];
        var max_v = logits[base];
        var arg = 0u;
        for (var j = 1u; j < v; j = j + 1u) {
            let x = logits[base + j];
            if (x > max_v) {
                max_v = x;
                arg = j;
            }
        }
        var sum = 0.0;
        for (var j = 0u; j < v; j = j + 1u) {
            sum = sum + exp(logits[base + j] - max_v);
        }
        loss = loss + (log(sum) - (logits[base + label] - max_v));
        correct = correct + select(0u, 1u, arg == label);
        if (params.write_dlogits != 0u) {
            for (var j = 0u; j < v; j = j + 1u) {
                let p = exp(logits[base + j] - max_v) / sum;
                let onehot = select(0.0, 1.0, j == label);
                dlogits[base + j] = (p - onehot) * inv_rows;
            }
        }
    }
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
