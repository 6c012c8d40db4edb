// gather.wgsl: build a normalised f32 batch from the u8 dataset and its shuffled order.
//
// Bindings (group 0):
//   0 params  uniform  { start, rows, words_per_image, _ }
//   1 images  storage read   array<u32>  (N, words_per_image): 4 u8 pixels per word, little-endian
//   2 order   storage read   array<u32>  (N,): the epoch's permutation of 0..N
//   3 x       storage rw     array<f32>  (rows, 4 * words_per_image)
// Computes x[r, 4w + j] = byte j of images[order[start + r], w] / 255.
// Dispatch: one invocation per word of the batch, rows * words_per_image in all, 64 per
// workgroup, on a 2-D grid (x fastest) so that large batches stay under 65535 groups a dimension.

struct Params {
    start: u32,
    rows: u32,
    words_per_image: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> images: array<u32>;
@group(0) @binding(2) var<storage, read> order: array<u32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn gather_batch(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    let total = params.rows * params.words_per_image;
    if (i >= total) {
        return;
    }
    let r = i / params.words_per_image;
    let w = i % params.words_per_image;
    let src = order[params.start + r];
    let word = images[src * params.words_per_image + w];
    let base = r * params.words_per_image * 4u + w * 4u;
    let scale = 1.0 / 255.0;
    x[base] = f32(word & 0xffu) * scale;
    x[base + 1u] = f32((word >> 8u) & 0xffu) * scale;
    x[base + 2u] = f32((word >> 16u) & 0xffu) * scale;
    x[base + 3u] = f32((word >> 24u) & 0xffu) * scale;
}
