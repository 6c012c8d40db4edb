//! Helpers shared by the integration tests: devices, random data, tolerant comparison.
#![allow(dead_code)]

pub mod ops;

use std::path::PathBuf;

use gpu_mnist::backend::cpu::CpuBackend;
use gpu_mnist::backend::wgpu::WgpuBackend;
use gpu_mnist::backend::{Backend, Packed, ParamTensors, TensorId};
use gpu_mnist::data::{Dataset, Mnist, IMAGE_PIXELS};
use gpu_mnist::optim::Optimizer;
use gpu_mnist::settings::settings;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The wgpu device. A GPU test must fail, not skip, when there is none: CI installs Mesa's
/// software Vulkan driver so that there always is one.
pub fn gpu() -> WgpuBackend {
    match WgpuBackend::open(None, false, &settings().gpu) {
        Ok(be) => be,
        Err(e) => panic!(
            "no wgpu adapter for the GPU tests ({e}). Install one: apt-get install mesa-vulkan-drivers libvulkan1"
        ),
    }
}

/// The fast CPU path, with the process's settings (tests/run.sh runs some tests again with
/// `GPU_MNIST_CPU_SIMD` and `GPU_MNIST_CPU_THREADS` set).
pub fn fast_cpu() -> CpuBackend {
    CpuBackend::fast(&settings().cpu)
}

/// Every backend the op tests run on: the fast CPU path and the GPU, each against the reference.
pub fn devices_under_test() -> Vec<Box<dyn Backend>> {
    vec![Box::new(fast_cpu()), Box::new(gpu())]
}

/// Real MNIST: $GPU_MNIST_DATA or ../shared/data/mnist beside the project.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("GPU_MNIST_DATA") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mnist"),
    }
}

/// `data_dir()` as a command-line argument.
pub fn data_arg() -> String {
    data_dir().to_string_lossy().to_string()
}

/// Wait (up to two minutes) until `path` exists; true if it does.
pub fn wait_for_file(path: &std::path::Path) -> bool {
    let t0 = std::time::Instant::now();
    while !path.exists() && t0.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    path.exists()
}

pub fn mnist() -> Mnist {
    let dir = data_dir();
    Mnist::load(&dir).unwrap_or_else(|e| panic!("real MNIST is needed at {} ({e})", dir.display()))
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// n values uniform in [-scale, scale].
pub fn random_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A synthetic dataset of n random images and labels.
pub fn random_dataset(rng: &mut ChaCha8Rng, n: usize) -> Dataset {
    let images = (0..n * IMAGE_PIXELS).map(|_| rng.random_range(0..=255u8)).collect();
    let labels = (0..n).map(|_| rng.random_range(0..10u8)).collect();
    Dataset::new(images, labels).expect("consistent sizes")
}

/// Allocate a tensor on `be` holding `data`.
pub fn upload(be: &mut dyn Backend, data: &[f32]) -> TensorId {
    let t = be.alloc(data.len()).expect("alloc");
    be.write(t, data).expect("write");
    t
}

/// Read `n` values of `t`.
pub fn download(be: &mut dyn Backend, t: TensorId, n: usize) -> Vec<f32> {
    let mut v = ops::read(be, t).expect("read");
    v.truncate(n);
    v
}

/// Assert |got - want| <= atol + rtol * |want| elementwise; print the max difference either way.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    let magnitude: Vec<f32> = want.iter().map(|w| w.abs()).collect();
    assert_close_scaled(what, got, want, &magnitude, atol, rtol);
}

/// Assert |got - want| <= atol + rtol * scale elementwise, where scale bounds the size of the
/// terms summed into each value (for a dot product: sum |a_k b_k|, so that results that cancel
/// to near zero are judged against the size of what was summed, as float error is).
pub fn assert_close_scaled(what: &str, got: &[f32], want: &[f32], scale: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut max_abs = 0.0f32;
    let mut bad = Vec::new();
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let diff = (g - w).abs();
        max_abs = max_abs.max(diff);
        // NaN differences fail too.
        if diff.is_nan() || diff > atol + rtol * s {
            bad.push((i, g, w));
        }
    }
    println!(
        "{what}: {} values, max |diff| {max_abs:.3e} (atol {atol:e}, rtol {rtol:e})",
        got.len()
    );
    if !bad.is_empty() {
        let first: Vec<String> = bad
            .iter()
            .take(5)
            .map(|(i, g, w)| format!("[{i}] got {g} want {w}"))
            .collect();
        panic!(
            "{what}: {} of {} values out of tolerance; first: {}",
            bad.len(),
            got.len(),
            first.join(", ")
        );
    }
}

/// The gpu-mnist binary built for these tests.
pub fn bin() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-mnist"));
    for kind in gpu_mnist::data::DatasetKind::ALL {
        cmd.env_remove(kind.data_env()).env_remove(kind.mirrors_env());
    }
    // Run folders (runs/...) of runs without --out land in the temporary folder, not the project.
    cmd.current_dir(std::env::temp_dir());
    cmd
}

/// Run the binary; fail the test unless it succeeds; return its stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = bin().args(args).output().expect("run gpu-mnist");
    assert!(
        out.status.success(),
        "gpu-mnist {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Run the binary, whatever its outcome: (exit code, stdout, stderr).
pub fn run_any(args: &[&str]) -> (Option<i32>, String, String) {
    let out = bin().args(args).output().expect("run gpu-mnist");
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// An IDX file's bytes: magic, dimensions (big-endian u32), payload.
pub fn idx_bytes(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// Write a small valid MNIST set (the first `n_train` / `n_test` real examples) as .gz files.
pub fn write_small_mnist(dir: &std::path::Path, n_train: usize, n_test: usize) {
    let m = mnist();
    let sets = [("train", m.train.first(n_train)), ("t10k", m.test.first(n_test))];
    for (prefix, set) in sets {
        let n = set.len() as u32;
        let images = idx_bytes(0x803, &[n, 28, 28], &set.images);
        let labels = idx_bytes(0x801, &[n], &set.labels);
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte.gz")), gzip(&images)).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), gzip(&labels)).unwrap();
    }
}

/// Every file under `dir` (relative path, size, FNV hash of its bytes), sorted: two snapshots are
/// equal when nothing was created, deleted or changed.
pub fn snapshot(dir: &std::path::Path) -> Vec<(String, u64, u64)> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, u64, u64)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().to_string();
            if path.is_dir() {
                out.push((rel + "/", 0, 0));
                walk(root, &path, out);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                });
                out.push((rel, bytes.len() as u64, hash));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// What `fused_step` reads back, in order.
pub const FUSED_STEP_PARTS: [&str; 7] = [
    "dweight",
    "dbias",
    "weight",
    "bias",
    "weight velocity",
    "bias velocity",
    "other layer",
];

/// One weight gradient with its fused update on `be` for a dense layer packed after another one (parts
/// of lengths [11, 3, C*OC, OC], so that its parameters sit at non-zero offsets), from the given
/// values and velocities of the four parts; returns the parts named in `FUSED_STEP_PARTS`.
pub fn fused_step(
    be: &mut dyn Backend,
    (values, vels): (&[Vec<f32>], &[Vec<f32>]),
    (inp, dout): (&[f32], &[f32]),
    (b, c, oc): (usize, usize, usize),
    opt: &Optimizer,
) -> [Vec<f32>; 7] {
    let packed = packed_two_layers(be, (values, vels), (c, oc));
    let [p, gr, v, _] = &packed;
    let (t_inp, t_dout) = (upload(be, inp), upload(be, dout));
    let params = (param_of(&packed, 2), param_of(&packed, 3));
    ops::backward_weight_update(be, params, (t_inp, t_dout), (b, c, oc), opt).unwrap();
    let parts = [
        gr.parts[2],
        gr.parts[3],
        p.parts[2],
        p.parts[3],
        v.parts[2],
        v.parts[3],
        p.parts[0],
    ];
    parts.map(|t| ops::read(be, t).unwrap())
}

/// The packed values, gradients, velocities and momenta of two dense layers, parts of lengths
/// [11, 3, C*OC, OC] (so that the second layer's parameters sit at non-zero offsets): the values
/// and velocities as given, the momenta `momentum_of` the velocities, the gradients filled with
/// the values (what an op must overwrite).
pub fn packed_two_layers(
    be: &mut dyn Backend,
    (values, vels): (&[Vec<f32>], &[Vec<f32>]),
    (c, oc): (usize, usize),
) -> [Packed; 4] {
    let lens = [11, 3, c * oc, oc];
    let packed = [(); 4].map(|_| be.alloc_packed(&lens).unwrap());
    for k in 0..lens.len() {
        be.write(packed[0].parts[k], &values[k]).unwrap();
        be.write(packed[1].parts[k], &values[k]).unwrap();
        be.write(packed[2].parts[k], &vels[k]).unwrap();
        be.write(packed[3].parts[k], &momentum_of(&vels[k])).unwrap();
    }
    packed
}

/// The starting momenta of `packed_two_layers`: of both signs, unlike the velocities.
pub fn momentum_of(vels: &[f32]) -> Vec<f32> {
    vels.iter()
        .enumerate()
        .map(|(i, v)| if i % 3 == 0 { -v } else { 0.5 * v })
        .collect()
}

/// The tensors of parameter `k` in `packed_two_layers`' allocations.
pub fn param_of(packed: &[Packed; 4], k: usize) -> ParamTensors {
    ParamTensors {
        value: packed[0].parts[k],
        grad: packed[1].parts[k],
        velocity: packed[2].parts[k],
        momentum: packed[3].parts[k],
    }
}

/// |v| elementwise.
pub fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// The reference's dense layer relu(inp (B, C) @ weight (C, OC) + bias) and the scale of its
/// rounding error (the same with every term's magnitude), for `assert_close_scaled`.
pub fn reference_dense_relu(
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    (b, c, oc): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    use gpu_mnist::backend::reference as r;
    let (mut pre, mut scale, mut want) = (vec![0.0; b * oc], vec![0.0; b * oc], vec![0.0; b * oc]);
    r::matmul_forward(&mut pre, inp, weight, b, c, oc);
    r::bias_add_forward(&mut pre, bias, b, oc);
    r::relu_forward(&mut want, &pre);
    r::matmul_forward(&mut scale, &abs(inp), &abs(weight), b, c, oc);
    r::bias_add_forward(&mut scale, &abs(bias), b, oc);
    (want, scale)
}
