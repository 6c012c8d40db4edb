// output_layer.wgsl: the output layer's whole training step in one dispatch: its forward product,
// the fused softmax + sparse categorical cross-entropy, the input gradient through the previous
// layer's ReLU, the weight and bias gradients and the optimizer step of both. Four dispatches of
// the unfused step (three matmuls and the loss), each of which costs more in start and drain than
// in arithmetic at the reference job's sizes (128x512 @ 512x10), become one.
//
// Compiled after softmax_xent.wgsl (the host joins the two files): it uses that file's Params,
// bindings 0 and 2-5, row_stats and add_up_stats. With inp (B, C), the
// weight W (C, 10) and the bias (10) of the layer:
//   params  { rows = B, classes = 10, start, slot, write_dlogits = 1, c = C, flags, w_value,
//             b_value, w_velocity, b_velocity, w_grad, b_grad, lr, rho, eps }: the offsets are
//             f32 indices into the packed buffers below; flags: optimizer.wgsl's RMSPROP or SGD
//             (at the constant rate lr: the host fuses no other optimizer or schedule here)
//   4 dlogits  storage rw  (B, 10): first the logits, then (softmax - onehot) / B
//   6 inp      storage read   array<f32>  (B, C): the previous layer's ReLU output (also its mask)
//   7 param    storage rw     array<f32>  packed values: W (k, j) at w_value + k * 10 + j, the
//                                         bias j at b_value + j
//   8 velocity storage rw     array<f32>  packed RMSprop velocities (w_velocity, b_velocity)
//   9 grad     storage rw     array<f32>  packed gradients: dW and dbias are stored there
//  10 dinp     storage rw     array<f32>  (B, C) = (dlogits @ W^T) * (inp > 0), with W before
//                                         the step
// Phases, separated by barriers (storage writes become visible to the whole workgroup):
//   1. logits = inp @ W + bias, rows spread over the invocations (with B <= 128, K split in two
//      halves over two sets of 128 invocations), into dlogits;
//   2. per row: loss, arg-max and dlogits (row_stats); the stats slot gets the batch's sums;
//   3. dinp, one column k of C an invocation (W's row k held in registers), rows in order;
//   4. dW (k, j) = sum over rows of inp (r, k) dlogits (r, j) and dbias, one column k an
//      invocation, rows in order, then the optimizer step (optimizer.wgsl, included).
// Every sum is taken in a fixed order: results are deterministic.
// Dispatch: exactly one workgroup of 256 invocations. The host uses this kernel for batches of
// at most 1024 rows and 4 x 128 x 512 rows x inputs, 10 classes (checks::loss), and only on an
// adapter with 9 storage buffers a stage.

const HT: u32 = 256u; // invocations of the workgroup
const V: u32 = 10u; // classes

@group(0) @binding(6) var<storage, read> inp: array<f32>;
@group(0) @binding(7) var<storage, read_write> param: array<f32>;
@group(0) @binding(8) var<storage, read_write> velocity: array<f32>;
@group(0) @binding(9) var<storage, read_write> grad: array<f32>;
@group(0) @binding(10) var<storage, read_write> dinp: array<f32>;

// sum over k in [k0, k1) of inp (r, k) W (k, j), for the V classes j, k in order. Four k a round,
// so that their loads are in flight together (naga's loops are not unrolled by the driver).
fn row_times_weight(r: u32, k0: u32, k1: u32) -> array<f32, V> {
    let row = r * params.c;
    var acc: array<f32, V>;
    var k = k0;
    for (; k + 4u <= k1; k = k + 4u) {
        //!unroll u 4: let x{u} = inp[row + k + {u}u];
        //!unroll u 4: let w{u} = params.w_value + (k + {u}u) * V;
        //!unroll j 10: acc[{j}] = acc[{j}] + x0 * param[w0 + {j}u];
        //!unroll j 10: acc[{j}] = acc[{j}] + x1 * param[w1 + {j}u];
        //!unroll j 10: acc[{j}] = acc[{j}] + x2 * param[w2 + {j}u];
        //!unroll j 10: acc[{j}] = acc[{j}] + x3 * param[w3 + {j}u];
    }
    for (; k < k1; k = k + 1u) {
        let x = inp[row + k];
        let w = params.w_value + k * V;
        //!unroll j 10: acc[{j}] = acc[{j}] + x * param[w + {j}u];
    }
    return acc;
}

// dinp (r, k) from row r of dlogits and W's row k (w), zero where the ReLU clipped inp (r, k).
fn masked_dinp(r: u32, k: u32, w: array<f32, V>) -> f32 {
    var d = 0.0;
    //!unroll j 10: d = d + dlogits[r * V + {j}u] * w[{j}];
    return select(0.0, d, inp[r * params.c + k] > 0.0);
}

// The optimizer step of the parameter value at packed index `p` (velocity at `vel`) with gradient
// g: RMSprop or plain SGD at the constant rate params.lr (the host fuses no other optimizer here).
fn step_param(p: u32, vel: u32, g: f32) {
    var s = Moments(param[p], 0.0, 0.0);
    let rmsprop = (params.flags & RMSPROP) != 0u;
    if (rmsprop) {
        s.v = velocity[vel];
    }
    let k = vec4<f32>(params.lr, 0.0, 0.0, 0.0);
    let out = optimizer_step(params.flags, s, g, k, Hyper(params.rho, params.eps, 0.0, 0.0, 0.0, 0.0));
    param[p] = out.p;
    if (rmsprop) {
        velocity[vel] = out.v;
    }
}

//!include optimizer.wgsl

@compute @workgroup_size(256)
fn output_layer_step(@builtin(local_invocation_index) t: u32) {
    let rows = params.rows;
    let c = params.c;

    // 1. logits (rows, V) into dlogits.
    if (rows * 2u <= HT) {
        // Invocations 0..127 sum the first half of K (and add the bias), 128..255 the second.
        let half = HT / 2u;
        let r = t % half;
        let upper = t >= half;
        var part: array<f32, V>;
        if (r < rows) {
            part = row_times_weight(r, select(0u, c / 2u, upper), select(c / 2u, c, upper));
            if (!upper) {
                //!unroll j 10: dlogits[r * V + {j}u] = part[{j}] + param[params.b_value + {j}u];
            }
        }
        storageBarrier();
        if (r < rows && upper) {
            //!unroll j 10: dlogits[r * V + {j}u] = dlogits[r * V + {j}u] + part[{j}];
        }
    } else {
        for (var r = t; r < rows; r = r + HT) {
            let sum = row_times_weight(r, 0u, c);
            //!unroll j 10: dlogits[r * V + {j}u] = sum[{j}] + param[params.b_value + {j}u];
        }
    }
    storageBarrier();

    // 2. loss, arg-max and dlogits of each row; the batch's sums into the stats slot.
    let inv_rows = 1.0 / f32(rows);
    var loss = 0.0;
    var correct = 0u;
    for (var r = t; r < rows; r = r + HT) {
        let base = r * V;
        // Padded below any logit, as row_of_logits pads.
        var x: array<f32, 16>;
        //!unroll j 16: x[{j}] = -3.0e38;
        //!unroll j 10: x[{j}] = dlogits[base + {j}u];
        let row = row_stats(x, base, labels[order[params.start + r]], inv_rows);
        loss = loss + row.x;
        correct = correct + u32(row.y);
    }
    add_up_stats(t, loss, correct);
    storageBarrier();

    // 3. dinp (rows, C) = (dlogits @ W^T) * (inp > 0), W as it was before this step.
    for (var k = t; k < c; k = k + HT) {
        var w: array<f32, V>;
        //!unroll j 10: w[{j}] = param[params.w_value + k * V + {j}u];
        var r = 0u;
        // Four rows a round (independent, so their loads overlap).
        for (; r + 4u <= rows; r = r + 4u) {
            //!unroll u 4: dinp[(r + {u}u) * c + k] = masked_dinp(r + {u}u, k, w);
        }
        for (; r < rows; r = r + 1u) {
            dinp[r * c + k] = masked_dinp(r, k, w);
        }
    }
    // Every read of W above happens before any write below.
    storageBarrier();

    // 4. dW, dbias, and the optimizer step of both.
    for (var k = t; k < c; k = k + HT) {
        var g: array<f32, V>;
        var r = 0u;
        // Four rows a round (loads in flight together), rows in order.
        for (; r + 4u <= rows; r = r + 4u) {
            //!unroll u 4: let x{u} = inp[(r + {u}u) * c + k];
            //!unroll j 10: g[{j}] = g[{j}] + x0 * dlogits[r * V + {j}u];
            //!unroll j 10: g[{j}] = g[{j}] + x1 * dlogits[(r + 1u) * V + {j}u];
            //!unroll j 10: g[{j}] = g[{j}] + x2 * dlogits[(r + 2u) * V + {j}u];
            //!unroll j 10: g[{j}] = g[{j}] + x3 * dlogits[(r + 3u) * V + {j}u];
        }
        for (; r < rows; r = r + 1u) {
            let x = inp[r * c + k];
            //!unroll j 10: g[{j}] = g[{j}] + x * dlogits[r * V + {j}u];
        }
        //!unroll j 10: grad[params.w_grad + k * V + {j}u] = g[{j}];
        //!unroll j 10: step_param(params.w_value + k * V + {j}u, params.w_velocity + k * V + {j}u, g[{j}]);
    }
    if (t < V) {
        var g = 0.0;
        for (var r = 0u; r < rows; r = r + 1u) {
            g = g + dlogits[r * V + t];
        }
        grad[params.b_grad + t] = g;
        step_param(params.b_value + t, params.b_velocity + t, g);
    }
}
