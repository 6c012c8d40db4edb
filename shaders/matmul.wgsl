// matmul.wgsl: c (M, N) = epilogue(a (M, K) @ b (K, N)), with a and b read through strides, so
// that the forward product and both transposed backward products of a dense layer are this one
// kernel, and the bias-add, ReLU and ReLU-gradient mask cost no dispatch of their own.
//
// Bindings (group 0):
//   0 params  uniform  { m, n, k, a_row_stride, a_col_stride, b_row_stride, b_col_stride, flags }
//   1 a       storage read   array<f32>  element (i, kk) at i * a_row_stride + kk * a_col_stride
//   2 b       storage read   array<f32>  element (kk, j) at kk * b_row_stride + j * b_col_stride
//   3 c       storage rw     array<f32>  (M, N) row-major, assigned (not accumulated)
//   4 bias    storage read   array<f32>  (N,): added when flags & 1 (else any buffer)
//   5 mask    storage read   array<f32>  (M, N): c is zeroed where mask <= 0 when flags & 4
// Epilogue, in this order: + bias[j] (flags & 1), max(., 0) (flags & 2), mask (flags & 4).
// Uses of it (dense layer with inp (B, C), weight (C, OC), dout (B, OC)):
//   forward          out  = relu(inp @ weight + bias)  M=B, N=OC, K=C,  a=(C,1),  b=(OC,1), flags 1|2
//   backward input   dinp = (dout @ weight^T) * (inp > 0)
//                                                      M=B, N=C,  K=OC, a=(OC,1), b=(1,OC), flags 4
//   backward weight  dw   = inp^T @ dout               M=C, N=OC, K=B,  a=(1,C),  b=(OC,1), flags 0
// Dispatch: workgroups of 16x16 invocations, each computing a 4x4 block of c held in registers
// (a 64x64 tile per workgroup): grid (ceil(N / 64), ceil(M / 64), 1). Rows and columns past the
// edge are clamped on load and skipped on store, so any M, N, K >= 1 works. The inner product is
// summed in increasing kk, one fma per term.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_row_stride: u32,
    a_col_stride: u32,
    b_row_stride: u32,
    b_col_stride: u32,
    flags: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> mask: array<f32>;

const ADD_BIAS: u32 = 1u;
const RELU: u32 = 2u;
const MASK: u32 = 4u;

@compute @workgroup_size(16, 16)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if (row0 >= params.m || col0 >= params.n) {
        return;
    }
    // Clamp the rows and columns this block reads; out-of-range results are never stored.
    let last_row = params.m - 1u;
    let last_col = params.n - 1u;
    let ar0 = min(row0, last_row) * params.a_row_stride;
    let ar1 = min(row0 + 1u, last_row) * params.a_row_stride;
    let ar2 = min(row0 + 2u, last_row) * params.a_row_stride;
    let ar3 = min(row0 + 3u, last_row) * params.a_row_stride;
    let bc0 = min(col0, last_col) * params.b_col_stride;
    let bc1 = min(col0 + 1u, last_col) * params.b_col_stride;
    let bc2 = min(col0 + 2u, last_col) * params.b_col_stride;
    let bc3 = min(col0 + 3u, last_col) * params.b_col_stride;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < params.k; kk = kk + 1u) {
        let ak = kk * params.a_col_stride;
        let bk = kk * params.b_row_stride;
        let bv = vec4<f32>(b[bk + bc0], b[bk + bc1], b[bk + bc2], b[bk + bc3]);
        acc0 = fma(vec4<f32>(a[ar0 + ak]), bv, acc0);
        acc1 = fma(vec4<f32>(a[ar1 + ak]), bv, acc1);
        acc2 = fma(vec4<f32>(a[ar2 + ak]), bv, acc2);
        acc3 = fma(vec4<f32>(a[ar3 + ak]), bv, acc3);
    }
    store_row(row0, col0, acc0);
    store_row(row0 + 1u, col0, acc1);
    store_row(row0 + 2u, col0, acc2);
    store_row(row0 + 3u, col0, acc3);
}

fn store_row(row: u32, col0: u32, v: vec4<f32>) {
    if (row >= params.m) {
        return;
    }
    let base = row * params.n + col0;
    for (var j = 0u; j < 4u; j = j + 1u) {
        let col = col0 + j;
        if (col < params.n) {
            var x = v[j];
            if ((params.flags & ADD_BIAS) != 0u) {
                x = x + bias[col];
            }
            if ((params.flags & RELU) != 0u) {
                x = max(x, 0.0);
            }
            if ((params.flags & MASK) != 0u && !(mask[base + j] > 0.0)) {
                x = 0.0;
            }
            c[base + j] = x;
        }
    }
}
