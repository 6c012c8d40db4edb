// gather.wgsl: build a normalised f32 batch from the u8 dataset and its shuffled order, as it
// is or (a training batch with augmentation) each image under its own random transform.
//
// Bindings (group 0):
//   0 params     uniform  { start, rows, words_per_image, slot, key, shift, rotate, scale }
//   1 images     storage read   array<u32>  (N, words_per_image): 4 u8 pixels per word, little-endian
//   2 order      storage read   array<u32>  (N,): the epoch's permutation of 0..N
//   3 x          storage rw     array<f32>  (rows, 4 * words_per_image)
//   4 step_base  storage read   array<u32>  gather_augmented only: the step of slot 0 (dropout.wgsl's)
// Entry points:
//   gather_batch      x[r, 4w + j] = byte j of images[order[start + r], w] / 255; one invocation
//                     per word of the batch (rows * words_per_image)
//   gather_augmented  x[r, oy, ox] = the bilinear sample (zero outside) of the 28 x 28 image
//                     order[start + r] at image r's inverse transform of pixel (ox, oy), / 255;
//                     one invocation per pixel of the batch (rows * 784). The transform draws
//                     its four numbers from the step (step_base[0] + slot) and the row with
//                     hash.wgsl and computes sine and cosine by a polynomial: the same f32
//                     operations as `ops::augment::transform` and `sample` on the host.
// Dispatch: 64 per workgroup, on a 2-D grid (x fastest) so that large batches stay under 65535
// groups a dimension.

struct Params {
    start: u32,
    rows: u32,
    words_per_image: u32,
    slot: u32,
    key: u32,
    shift: f32,
    rotate: f32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> images: array<u32>;
@group(0) @binding(2) var<storage, read> order: array<u32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;
@group(0) @binding(4) var<storage, read> step_base: array<u32>;

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

//!include hash.wgsl

// A uniform number in [-1, 1) from a random word (its top 24 bits).
fn signed_unit(bits: u32) -> f32 {
    return f32(bits >> 8u) * (2.0 / 16777216.0) - 1.0;
}

// Pixel (px, py) of image `src` (0 outside the picture), as f32.
fn pixel_at(src: u32, px: f32, py: f32) -> f32 {
    if (px < 0.0 || px >= 28.0 || py < 0.0 || py >= 28.0) {
        return 0.0;
    }
    let p = src * 784u + u32(py) * 28u + u32(px);
    let word = images[p / 4u];
    return f32((word >> (8u * (p % 4u))) & 0xffu);
}

@compute @workgroup_size(64)
fn gather_augmented(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 64u;
    if (i >= params.rows * 784u) {
        return;
    }
    let r = i / 784u;
    let ox = (i % 784u) % 28u;
    let oy = (i % 784u) / 28u;
    // The image's transform (ops::augment::transform).
    let key = step_key(params.key, step_base[0] + params.slot);
    let tx = params.shift * signed_unit(mask_bits(key, 4u * r));
    let ty = params.shift * signed_unit(mask_bits(key, 4u * r + 1u));
    let angle = params.rotate * signed_unit(mask_bits(key, 4u * r + 2u));
    let inv = 1.0 / (1.0 + params.scale * signed_unit(mask_bits(key, 4u * r + 3u)));
    let x2 = angle * angle;
    let sin_a = angle * (1.0 + x2 * (-1.0 / 6.0 + x2 * (1.0 / 120.0 + x2 * (-1.0 / 5040.0 + x2 * (1.0 / 362880.0)))));
    let cos_a = 1.0 + x2 * (-0.5 + x2 * (1.0 / 24.0 + x2 * (-1.0 / 720.0 + x2 * (1.0 / 40320.0 + x2 * (-1.0 / 3628800.0)))));
    let a = cos_a * inv;
    let b = sin_a * inv;
    let c = -sin_a * inv;
    // The sample (ops::augment::sample).
    let u = f32(ox) - 13.5 - tx;
    let v = f32(oy) - 13.5 - ty;
    let sx = a * u + b * v + 13.5;
    let sy = c * u + a * v + 13.5;
    let x0 = floor(sx);
    let y0 = floor(sy);
    let fx = sx - x0;
    let fy = sy - y0;
    let src = order[params.start + r];
    let top = (1.0 - fx) * pixel_at(src, x0, y0) + fx * pixel_at(src, x0 + 1.0, y0);
    let bottom = (1.0 - fx) * pixel_at(src, x0, y0 + 1.0) + fx * pixel_at(src, x0 + 1.0, y0 + 1.0);
    x[i] = ((1.0 - fy) * top + fy * bottom) * (1.0 / 255.0);
}
