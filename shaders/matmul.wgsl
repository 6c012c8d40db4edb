// matmul.wgsl: c (M, N) = epilogue(a (M, K) @ b (K, N)), with a and b read through strides, so
// that the forward product and both transposed backward products of a dense layer are this one
// kernel, and the bias-add, ReLU, ReLU-gradient mask and bias gradient cost no dispatch of their own.
//
// Bindings (group 0):
//   0 params  uniform  { m, n, k, a_row_stride, a_col_stride, b_row_stride, b_col_stride, flags }
//   1 a       storage read   array<f32>  element (i, kk) at i * a_row_stride + kk * a_col_stride
//   2 b       storage read   array<f32>  element (kk, j) at kk * b_row_stride + j * b_col_stride
//   3 c       storage rw     array<f32>  (M, N) row-major, assigned (not accumulated)
//   4 bias    storage read   array<f32>  (N,): added when flags & 1 (else any buffer)
//   5 mask    storage read   array<f32>  (M, N): c is zeroed where mask <= 0 when flags & 4
//   6 colsum  storage rw     array<f32>  (N,): when flags & 8, the column sums of b over its K
//                                        rows (a dense layer's bias gradient); else any buffer
// Epilogue, in this order: + bias[j] (flags & 1), max(., 0) (flags & 2), mask (flags & 4).
// Uses of it (dense layer with inp (B, C), weight (C, OC), dout (B, OC)):
//   forward          out  = relu(inp @ weight + bias)  M=B, N=OC, K=C,  a=(C,1),  b=(OC,1), flags 1|2
//   backward input   dinp = (dout @ weight^T) * (inp > 0)
//                                                      M=B, N=C,  K=OC, a=(OC,1), b=(1,OC), flags 4
//   backward weight  dw   = inp^T @ dout, dbias = colsum(dout)
//                                                      M=C, N=OC, K=B,  a=(1,C),  b=(OC,1), flags 8
//
// Tiling (the host writes the four constants below per pipeline; see kernels.rs TileConfig):
// a workgroup computes a TM x TN tile of c. Its threads form S slices of (TM/4) x (TN/4); each
// thread of a slice holds a 4x4 block of the tile in registers. K is cut into chunks of KC; chunk q
// belongs to slice q % S (split-K inside the workgroup, so that small outputs still fill a GPU).
// Each round, every slice copies its chunk of a (TM x KC) and of b (KC x TN) from storage into
// workgroup memory (coalesced along whichever stride is 1, zero outside the matrices), then
// multiplies it from there with vec4 reads. At the end slices 1..S-1 hand their sums to slice 0,
// which adds them in slice order and stores the tile through the epilogue. Every sum is taken in
// a fixed order, so results are deterministic. Grid: (ceil(N / TN), ceil(M / TM), 1).

const TM: u32 = 32u;
const TN: u32 = 32u;
const KC: u32 = 16u;
const S: u32 = 4u;
// Workgroup memory in vec4s: max(S * KC * (TM + TN), (S - 1) * (TM * TN + TN)) / 4.
const SMEM: u32 = 1024u;

const T: u32 = (TM / 4u) * (TN / 4u); // threads per slice
const WG: u32 = T * S; // threads per workgroup
const LA: u32 = TM * KC / T; // values of a each thread copies per round
const LB: u32 = KC * TN / T; // values of b each thread copies per round

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
@group(0) @binding(6) var<storage, read_write> colsum: array<f32>;

const ADD_BIAS: u32 = 1u;
const RELU: u32 = 2u;
const MASK: u32 = 4u;
const COLSUM: u32 = 8u;

// Slice s's chunk of a at vec4 [s * KC * TM / 4, ...) laid out [kk][i]; its chunk of b after all
// of a's, laid out [kk][j]. After the last round, the hand-over of sums reuses the same memory.
var<workgroup> smem: array<vec4<f32>, SMEM>;

fn smem_store(index: u32, v: f32) {
    smem[index / 4u][index % 4u] = v;
}

@compute @workgroup_size(WG)
fn matmul(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let slice = lid / T;
    let t = lid % T;
    let tx = t % (TN / 4u); // this thread's columns: tx * 4 .. tx * 4 + 3 of the tile
    let ty = t / (TN / 4u); // this thread's rows:    ty * 4 .. ty * 4 + 3 of the tile
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let a_at = slice * KC * TM; // scalar index of this slice's a chunk in smem
    let b_at = S * KC * TM + slice * KC * TN;
    let a_k_fast = params.a_col_stride == 1u;
    let b_j_fast = params.b_col_stride == 1u;
    let want_colsum = (params.flags & COLSUM) != 0u && wid.y == 0u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var csum = vec4<f32>(0.0);
    let chunks = (params.k + KC - 1u) / KC;
    let rounds = (chunks + S - 1u) / S;
    for (var round = 0u; round < rounds; round = round + 1u) {
        let k0 = (round * S + slice) * KC;
        for (var q = 0u; q < LA; q = q + 1u) {
            let idx = t + q * T;
            var i = idx / KC;
            var kk = idx % KC;
            if (!a_k_fast) {
                i = idx % TM;
                kk = idx / TM;
            }
            var v = 0.0;
            if (row0 + i < params.m && k0 + kk < params.k) {
                v = a[(row0 + i) * params.a_row_stride + (k0 + kk) * params.a_col_stride];
            }
            smem_store(a_at + kk * TM + i, v);
        }
        for (var q = 0u; q < LB; q = q + 1u) {
            let idx = t + q * T;
            var kk = idx / TN;
            var j = idx % TN;
            if (!b_j_fast) {
                kk = idx % KC;
                j = idx / KC;
            }
            var v = 0.0;
            if (col0 + j < params.n && k0 + kk < params.k) {
                v = b[(k0 + kk) * params.b_row_stride + (col0 + j) * params.b_col_stride];
            }
            smem_store(b_at + kk * TN + j, v);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KC; kk = kk + 1u) {
            let av = smem[(a_at + kk * TM) / 4u + ty];
            let bv = smem[(b_at + kk * TN) / 4u + tx];
            acc0 = fma(vec4<f32>(av.x), bv, acc0);
            acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2);
            acc3 = fma(vec4<f32>(av.w), bv, acc3);
            if (want_colsum) {
                csum = csum + bv;
            }
        }
        workgroupBarrier();
    }

    // Hand the sums of slices 1..S-1 to slice 0 (4 vec4 per thread, then the column sums).
    if (S > 1u) {
        if (slice > 0u) {
            let at = (slice - 1u) * T * 4u + t * 4u;
            smem[at] = acc0;
            smem[at + 1u] = acc1;
            smem[at + 2u] = acc2;
            smem[at + 3u] = acc3;
            if (want_colsum && ty == 0u) {
                smem[(S - 1u) * T * 4u + (slice - 1u) * (TN / 4u) + tx] = csum;
            }
        }
        workgroupBarrier();
        if (slice == 0u) {
            for (var s = 1u; s < S; s = s + 1u) {
                let at = (s - 1u) * T * 4u + t * 4u;
                acc0 = acc0 + smem[at];
                acc1 = acc1 + smem[at + 1u];
                acc2 = acc2 + smem[at + 2u];
                acc3 = acc3 + smem[at + 3u];
                if (want_colsum && ty == 0u) {
                    csum = csum + smem[(S - 1u) * T * 4u + (s - 1u) * (TN / 4u) + tx];
                }
            }
        }
    }
    if (slice != 0u) {
        return;
    }
    let row = row0 + ty * 4u;
    let col = col0 + tx * 4u;
    store_row(row, col, acc0);
    store_row(row + 1u, col, acc1);
    store_row(row + 2u, col, acc2);
    store_row(row + 3u, col, acc3);
    if (want_colsum && ty == 0u) {
        for (var j = 0u; j < 4u; j = j + 1u) {
            if (col + j < params.n) {
                colsum[col + j] = csum[j];
            }
        }
    }
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
