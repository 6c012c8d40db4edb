// matmul.wgsl: c (M, N) = epilogue(a (M, K) @ b (K, N)), with a and b read through strides, so
// that the forward product and both transposed backward products of a dense layer are this one
// kernel, or through a convolution's operand maps (below), so that a convolution layer's three
// products are too, and the bias-add, ReLU, ReLU-gradient mask, bias gradient and optimizer step
// cost no dispatch of their own.
//
// Bindings (group 0):
//   0 params  uniform  { m, n, k, a_row_stride, a_col_stride, b_row_stride, b_col_stride, flags,
//                        slot, rho, eps, beta1, beta2, momentum, l2, w_value, w_velocity,
//                        w_momentum, b_value, b_velocity, b_momentum,
//                        h, w, in_ch, out_ch, kh, kw, pad, oh, ow }
//   1 a       storage read   array<f32>  element (i, kk) at i * a_row_stride + kk * a_col_stride
//                                        (dense; a convolution's maps are below)
//   2 b       storage read   array<f32>  element (kk, j) at kk * b_row_stride + j * b_col_stride
//   3 c       storage rw     array<f32>  (M, N) row-major, assigned (not accumulated)
//   4 side    storage read   array<f32>  one of three, never two at once (so that the kernel
//                                        stays within 8 storage buffers):
//                                        the bias (N,), added when flags & ADD_BIAS;
//                                        the mask (M, N): c is zeroed where mask <= 0 (MASK);
//                                        with an optimizer flag, the step table: word 0 holds
//                                        (as u32 bits) the row of slot 0, and row r at words
//                                        4 + 4 r the scalars (lr, adam_step, adam_norm, decay)
//                                        of a step; this step's row is word 0 + params.slot
//   5 colsum  storage rw     array<f32>  when flags & COLSUM: (N,) the column sums of b over its
//                                        K rows (a dense layer's bias gradient)
//   6 param     storage rw   array<f32>  with an optimizer flag: the packed parameter values; the
//                                        weight's value (i, j) is at w_value + i * N + j, the
//                                        bias's value j at b_value + j
//   7 velocity  storage rw   array<f32>  the packed second moments (RMSPROP, ADAM), at
//                                        w_velocity + ... and b_velocity + j
//   8 momentum  storage rw   array<f32>  the packed first moments (MOMENTUM, ADAM), at
//                                        w_momentum + ... and b_momentum + j
// Epilogue, in this order: + bias[j] (ADD_BIAS), max(., 0) (RELU), mask (MASK); then the
// optimizer step (optimizer.wgsl's flags) with the stored value (and the column sum) as the
// gradient.
// Uses of it (dense layer with inp (B, C), weight (C, OC), dout (B, OC)):
//   forward          out  = relu(inp @ weight + bias)  M=B, N=OC, K=C,  a=(C,1),  b=(OC,1)
//                                                      flags ADD_BIAS | RELU
//   backward input   dinp = (dout @ weight^T) * (inp > 0)
//                                                      M=B, N=C,  K=OC, a=(OC,1), b=(1,OC), MASK
//   backward weight  dw   = inp^T @ dout, dbias = colsum(dout), then the optimizer step of both
//                                                      M=C, N=OC, K=B,  a=(1,C),  b=(OC,1)
//                                                      flags COLSUM | RMSPROP
//
// Operand maps (variants): a and b are read through one of these, chosen per pipeline (a dense
// pipeline holds only the dense maps, and no convolution code). The dense maps use the strides;
// a convolution's (implicit GEMM: the product over output pixels, see ops.rs ConvGeometry;
// images NHWC, kernel (kh, kw, in_ch, out_ch), stride 1, `pad` zeros on every side, output
// oh x ow) use the geometry fields and ignore the strides:
//   a_dense, b_dense   the strides above
//   a_im2col           a (pixels, patch) = the patches of the input images bound as a: (i, kk) =
//                      input (b, oy + ky - pad, ox + kx - pad, c) for output pixel i = (b, oy, ox)
//                      and kk = (ky, kx, c), 0 over the padding          (conv forward)
//   a_im2col_t         a (patch, pixels): the transpose of a_im2col      (conv weight gradient)
//   a_dout_taps        a (images*h*w, kh*kw*out_ch): (i, kk) = dout (b, y + pad - ky,
//                      x + pad - kx, oc) for input pixel i = (b, y, x) and kk = (ky, kx, oc), 0
//                      outside dout                                      (conv input gradient)
//   b_weight_taps      b (kh*kw*out_ch, in_ch): (kk, c) = kernel (ky, kx, c, oc) for kk = (ky,
//                      kx, oc)                                           (conv input gradient)
// so that a convolution's three products are (weight W (patch, out_ch), dout (pixels, out_ch)):
//   forward          out = relu(A @ W + bias)     a_im2col (a = input image),  b_dense (out_ch, 1)
//   weight gradient  dW = A^T @ dout, colsum      a_im2col_t (a = input image), b_dense (out_ch, 1)
//   input gradient   dinp (images*h*w, in_ch) = sum over taps and out channels of dout x the
//                    flipped kernel (the "full" convolution, each input value summed in place: no
//                    scatter), masked                   a_dout_taps (a = dout), b_weight_taps
// with c, bias, mask and the optimizer step as for a dense layer (c and mask of the input
// gradient are images).
//
// Tiling (the host writes the constants below per pipeline; see tiling.rs TileConfig):
// a workgroup computes a TM x TN tile of c. Its threads form S slices of (TM/4) x (TN/4); each
// thread of a slice holds a 4x4 block of the tile in registers. K is cut into chunks of KC; chunk q
// belongs to slice q % S (split-K inside the workgroup, so that small outputs still fill a GPU).
// Each round, every slice stores its chunk of a (TM x KC) and of b (KC x TN) into workgroup
// memory from registers, issues the loads of its next chunk (coalesced along whichever stride is
// 1, zero outside the matrices), and multiplies the stored chunk with vec4 reads while those loads
// are in flight. At the end all slices put their sums in workgroup memory, and each thread of the
// workgroup adds up (in slice order) and stores through the epilogue TM * TN / WG outputs of the
// tile. Every sum is taken in a fixed order, so results are deterministic.
// Grid: (ceil(N / TN), ceil(M / TM), 1).
//
// Template: the host includes optimizer.wgsl, keeps the `//!variant NAME` ... `//!end` blocks of
// the pipeline's two operand maps and drops the others, fills the placeholders {{TM}}, {{TN}},
// {{KC}}, {{S}} and {{SMEM}} with a tiling's values, and, since naga emits loops that drivers do
// not unroll (and a load loop that is not unrolled waits for each load before issuing the next),
// expands each line `//!unroll V COUNT: statement` into COUNT copies of the statement with
// {V} = 0, 1, ... (COUNT is LA, LB, KC, S, E or a number).

const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;
const KC: u32 = {{KC}}u;
const S: u32 = {{S}}u;
// Workgroup memory in vec4s: max(S * KC * (TM + TN), S * TM * TN) / 4.
const SMEM: u32 = {{SMEM}}u;

const T: u32 = (TM / 4u) * (TN / 4u); // threads per slice
const WG: u32 = T * S; // threads per workgroup
const LA: u32 = TM * KC / T; // values of a each thread copies per round
const LB: u32 = KC * TN / T; // values of b each thread copies per round
const E: u32 = TM * TN / WG; // outputs each thread finishes

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_row_stride: u32,
    a_col_stride: u32,
    b_row_stride: u32,
    b_col_stride: u32,
    flags: u32,
    slot: u32,
    rho: f32,
    eps: f32,
    beta1: f32,
    beta2: f32,
    momentum: f32,
    l2: f32,
    w_value: u32,
    w_velocity: u32,
    w_momentum: u32,
    b_value: u32,
    b_velocity: u32,
    b_momentum: u32,
    h: u32,
    w: u32,
    in_ch: u32,
    out_ch: u32,
    kh: u32,
    kw: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> side: array<f32>;
@group(0) @binding(5) var<storage, read_write> colsum: array<f32>;
@group(0) @binding(6) var<storage, read_write> param: array<f32>;
@group(0) @binding(7) var<storage, read_write> velocity: array<f32>;
@group(0) @binding(8) var<storage, read_write> momentum: array<f32>;

const ADD_BIAS: u32 = 1u;
const RELU: u32 = 2u;
const MASK: u32 = 4u;
const COLSUM: u32 = 8u;

// Slice s's chunk of a at scalar [s * KC * TM, ...) laid out [kk][i]; its chunk of b after all of
// a's, laid out [kk][j]. After the last round, the slices' sums reuse the same memory.
var<workgroup> smem: array<vec4<f32>, SMEM>;

fn smem_store(index: u32, v: f32) {
    smem[index / 4u][index % 4u] = v;
}

// Each operand map defines, for a, `a_pos` (which (i, kk) of a chunk of a the idx-th copy of a
// slice is, the order chosen so that neighbouring threads read neighbouring words), `a_row`
// (what the loads of row i need that is constant over the rounds, computed once) and `load_a`
// (the value, 0 outside the matrix); for b, `b_pos` and `load_b` likewise.

//!variant a_dense
// (i, kk) of the idx-th value of a chunk of a that a slice copies: kk fastest when a's rows are
// contiguous (a_col_stride == 1), else i fastest, so that neighbouring threads read neighbouring words.
fn a_pos(idx: u32) -> vec2<u32> {
    if (params.a_col_stride == 1u) {
        return vec2<u32>(idx / KC, idx % KC);
    }
    return vec2<u32>(idx % TM, idx / TM);
}

// Where the row of a holding the idx-th value of every chunk starts. Constant over the rounds,
// so computed once.
fn a_row(idx: u32, row0: u32) -> u32 {
    let i = row0 + a_pos(idx).x;
    if (i >= params.m) {
        return 0u;
    }
    return i * params.a_row_stride;
}

fn load_a(idx: u32, row0: u32, row: u32, k0: u32) -> f32 {
    let p = a_pos(idx);
    if (row0 + p.x >= params.m || k0 + p.y >= params.k) {
        return 0.0;
    }
    return a[row + (k0 + p.y) * params.a_col_stride];
}
//!end

//!variant a_im2col
// kk fastest: a patch's channels (and, with one channel, its columns) are neighbouring words.
fn a_pos(idx: u32) -> vec2<u32> {
    return vec2<u32>(idx / KC, idx % KC);
}

// Output pixel i = (b, oy, ox) as (offset of image b, oy, ox); unused past the last row.
fn a_row(idx: u32, row0: u32) -> vec3<u32> {
    let i = row0 + a_pos(idx).x;
    let ohw = params.oh * params.ow;
    let img = i / ohw;
    let r = i - img * ohw;
    let oy = r / params.ow;
    return vec3<u32>(img * params.h * params.w * params.in_ch, oy, r - oy * params.ow);
}

fn load_a(idx: u32, row0: u32, row: vec3<u32>, k0: u32) -> f32 {
    let p = a_pos(idx);
    let kk = k0 + p.y;
    if (row0 + p.x >= params.m || kk >= params.k) {
        return 0.0;
    }
    let kwc = params.kw * params.in_ch;
    let ky = kk / kwc;
    let r = kk - ky * kwc;
    let kx = r / params.in_ch;
    // Above or left of the image these wrap to values past its size: one test covers both sides.
    let y = row.y + ky - params.pad;
    let x = row.z + kx - params.pad;
    if (y >= params.h || x >= params.w) {
        return 0.0;
    }
    return a[row.x + (y * params.w + x) * params.in_ch + r - kx * params.in_ch];
}
//!end

//!variant a_im2col_t
// i (the patch index) fastest: neighbouring channels of one input pixel are neighbouring words.
fn a_pos(idx: u32) -> vec2<u32> {
    return vec2<u32>(idx % TM, idx / TM);
}

// Patch value i = (ky, kx, c); unused past the last row.
fn a_row(idx: u32, row0: u32) -> vec3<u32> {
    let i = row0 + a_pos(idx).x;
    let kwc = params.kw * params.in_ch;
    let ky = i / kwc;
    let r = i - ky * kwc;
    let kx = r / params.in_ch;
    return vec3<u32>(ky, kx, r - kx * params.in_ch);
}

fn load_a(idx: u32, row0: u32, tap: vec3<u32>, k0: u32) -> f32 {
    let p = a_pos(idx);
    let pixel = k0 + p.y;
    if (row0 + p.x >= params.m || pixel >= params.k) {
        return 0.0;
    }
    let ohw = params.oh * params.ow;
    let img = pixel / ohw;
    let r = pixel - img * ohw;
    let oy = r / params.ow;
    // Above or left of the image these wrap to values past its size: one test covers both sides.
    let y = oy + tap.x - params.pad;
    let x = r - oy * params.ow + tap.y - params.pad;
    if (y >= params.h || x >= params.w) {
        return 0.0;
    }
    return a[((img * params.h + y) * params.w + x) * params.in_ch + tap.z];
}
//!end

//!variant a_dout_taps
// kk fastest: a tap's output channels are neighbouring words of dout.
fn a_pos(idx: u32) -> vec2<u32> {
    return vec2<u32>(idx / KC, idx % KC);
}

// Input pixel i = (b, y, x) as (offset of image b in dout, y + pad, x + pad); unused past the
// last row.
fn a_row(idx: u32, row0: u32) -> vec3<u32> {
    let i = row0 + a_pos(idx).x;
    let hw = params.h * params.w;
    let img = i / hw;
    let r = i - img * hw;
    let y = r / params.w;
    let out_image = params.oh * params.ow * params.out_ch;
    return vec3<u32>(img * out_image, y + params.pad, r - y * params.w + params.pad);
}

fn load_a(idx: u32, row0: u32, row: vec3<u32>, k0: u32) -> f32 {
    let p = a_pos(idx);
    let kk = k0 + p.y;
    if (row0 + p.x >= params.m || kk >= params.k) {
        return 0.0;
    }
    let kwo = params.kw * params.out_ch;
    let ky = kk / kwo;
    let r = kk - ky * kwo;
    let kx = r / params.out_ch;
    // The output pixel whose patch holds this input pixel at tap (ky, kx); above or left of
    // dout these wrap to values past its size: one test covers both sides.
    let oy = row.y - ky;
    let ox = row.z - kx;
    if (oy >= params.oh || ox >= params.ow) {
        return 0.0;
    }
    return a[row.x + (oy * params.ow + ox) * params.out_ch + r - kx * params.out_ch];
}
//!end

// The idx-th value of a's chunk into workgroup memory.
fn store_a(idx: u32, at: u32, v: f32) {
    let p = a_pos(idx);
    smem_store(at + p.y * TM + p.x, v);
}

//!variant b_dense
// (kk, j) of the idx-th value of a chunk of b, j fastest when b's rows are contiguous.
fn b_pos(idx: u32) -> vec2<u32> {
    if (params.b_col_stride == 1u) {
        return vec2<u32>(idx / TN, idx % TN);
    }
    return vec2<u32>(idx % KC, idx / KC);
}

fn load_b(idx: u32, col0: u32, k0: u32) -> f32 {
    let p = b_pos(idx);
    if (k0 + p.x < params.k && col0 + p.y < params.n) {
        return b[(k0 + p.x) * params.b_row_stride + (col0 + p.y) * params.b_col_stride];
    }
    return 0.0;
}
//!end

//!variant b_weight_taps
// kk fastest: a tap's output channels are neighbouring words of the kernel.
fn b_pos(idx: u32) -> vec2<u32> {
    return vec2<u32>(idx % KC, idx / KC);
}

// (kk = (tap, oc), c) at kernel (tap, c, oc).
fn load_b(idx: u32, col0: u32, k0: u32) -> f32 {
    let p = b_pos(idx);
    let kk = k0 + p.x;
    let c = col0 + p.y;
    if (kk < params.k && c < params.n) {
        let tap = kk / params.out_ch;
        return b[(tap * params.in_ch + c) * params.out_ch + kk - tap * params.out_ch];
    }
    return 0.0;
}
//!end

@compute @workgroup_size(WG)
fn matmul(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let slice = lid / T;
    let t = lid % T;
    let tx = t % (TN / 4u); // this thread's columns: tx * 4 .. tx * 4 + 3 of the tile
    let ty = t / (TN / 4u); // this thread's rows:    ty * 4 .. ty * 4 + 3 of the tile
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let a_at = slice * KC * TM; // scalar index of this slice's chunk of a in smem
    let b_at = S * KC * TM + slice * KC * TN;
    let want_colsum = (params.flags & COLSUM) != 0u && wid.y == 0u;
    let colsum_on = vec4<f32>(select(0.0, 1.0, want_colsum));

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var csum = vec4<f32>(0.0);
    var av = vec4<f32>(0.0);
    var bv = vec4<f32>(0.0);
    // This slice's first chunk, into registers.
    //!unroll q LA: let arow{q} = a_row(t + {q}u * T, row0);
    //!unroll q LA: var ra{q} = load_a(t + {q}u * T, row0, arow{q}, slice * KC);
    //!unroll q LB: var rb{q} = load_b(t + {q}u * T, col0, slice * KC);
    let chunks = (params.k + KC - 1u) / KC;
    let rounds = (chunks + S - 1u) / S;
    for (var round = 0u; round < rounds; round = round + 1u) {
        //!unroll q LA: store_a(t + {q}u * T, a_at, ra{q});
        //!unroll q LB: smem_store(b_at + b_pos(t + {q}u * T).x * TN + b_pos(t + {q}u * T).y, rb{q});
        workgroupBarrier();
        // The next chunk's loads (zeros past K) fly while this chunk is multiplied.
        let k_next = ((round + 1u) * S + slice) * KC;
        //!unroll q LA: ra{q} = load_a(t + {q}u * T, row0, arow{q}, k_next);
        //!unroll q LB: rb{q} = load_b(t + {q}u * T, col0, k_next);
        //!unroll kk KC: av = smem[(a_at + {kk}u * TM) / 4u + ty]; bv = smem[(b_at + {kk}u * TN) / 4u + tx]; acc0 = fma(vec4<f32>(av.x), bv, acc0); acc1 = fma(vec4<f32>(av.y), bv, acc1); acc2 = fma(vec4<f32>(av.z), bv, acc2); acc3 = fma(vec4<f32>(av.w), bv, acc3); csum = fma(bv, colsum_on, csum);
        workgroupBarrier();
    }

    // Every slice's partial sums into workgroup memory (the round loop ended with a barrier),
    // then every thread finishes E = TM * TN / WG outputs of the tile: neighbouring threads take
    // neighbouring columns, add the S partials in slice order and store through the epilogue.
    let at = (slice * T + t) * 4u;
    smem[at] = acc0;
    smem[at + 1u] = acc1;
    smem[at + 2u] = acc2;
    smem[at + 3u] = acc3;
    workgroupBarrier();
    //!unroll q E: finish(lid + {q}u * WG, row0, col0);
    if (want_colsum) {
        // The column sums likewise: one vec4 per slice and column block, then one thread a column.
        workgroupBarrier();
        if (ty == 0u) {
            smem[slice * (TN / 4u) + tx] = csum;
        }
        workgroupBarrier();
        if (lid < TN) {
            var g = 0.0;
            //!unroll s S: g = g + smem[{s}u * (TN / 4u) + lid / 4u][lid % 4u];
            store_colsum(col0 + lid, g);
        }
    }
}

// Output e (row e / TN, column e % TN) of the tile: the slices' partial sums, then the epilogue.
fn finish(e: u32, row0: u32, col0: u32) {
    let r = e / TN;
    let j = e % TN;
    let t = (r / 4u) * (TN / 4u) + j / 4u;
    var sum = 0.0;
    //!unroll s S: sum = sum + smem[({s}u * T + t) * 4u + r % 4u][j % 4u];
    if (row0 + r < params.m && col0 + j < params.n) {
        store_one((row0 + r) * params.n + col0 + j, col0 + j, sum);
    }
}

fn store_colsum(col: u32, g: f32) {
    if (col < params.n) {
        colsum[col] = g;
        step(params.b_value + col, params.b_velocity + col, params.b_momentum + col, g);
    }
}

// The optimizer step (if the flags ask for one) of the parameter at param[p] (velocity[v],
// momentum[m]) with gradient g, at this step's row of the step table.
fn step(p: u32, v: u32, m: u32, g: f32) {
    let flags = params.flags;
    if (!steps_at_all(flags)) {
        return;
    }
    let row = 4u + 4u * (bitcast<u32>(side[0]) + params.slot);
    let k = vec4<f32>(side[row], side[row + 1u], side[row + 2u], side[row + 3u]);
    var s = Moments(param[p], 0.0, 0.0);
    if (uses_velocity(flags)) {
        s.v = velocity[v];
    }
    if (uses_momentum(flags)) {
        s.m = momentum[m];
    }
    let h = Hyper(params.rho, params.eps, params.beta1, params.beta2, params.momentum, params.l2);
    let out = optimizer_step(flags, s, g, k, h);
    param[p] = out.p;
    if (uses_velocity(flags)) {
        velocity[v] = out.v;
    }
    if (uses_momentum(flags)) {
        momentum[m] = out.m;
    }
}

//!include optimizer.wgsl

fn store_one(at: u32, col: u32, value: f32) {
    if (col >= params.n) {
        return;
    }
    var x = value;
    if ((params.flags & ADD_BIAS) != 0u) {
        x = x + side[col];
    }
    if ((params.flags & RELU) != 0u) {
        x = max(x, 0.0);
    }
    if ((params.flags & MASK) != 0u && !(side[at] > 0.0)) {
        x = 0.0;
    }
    c[at] = x;
    step(params.w_value + at, params.w_velocity + at, params.w_momentum + at, x);
}
