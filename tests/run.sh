#!/usr/bin/env bash
# The test command of the README: sets up what the tests need on a fresh Debian/Ubuntu machine,
# then runs the whole suite. GPU tests run the real WGSL kernels on Mesa's software Vulkan driver
# (llvmpipe) when there is no GPU; they fail, never skip, when no adapter is found.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. A Vulkan adapter: Mesa's software driver (about 15 s to install), unless one is already there.
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || ! ldconfig -p | grep -q 'libvulkan\.so\.1'; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "tests/run.sh: installing Mesa's software Vulkan driver (mesa-vulkan-drivers, libvulkan1)"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1
fi
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
# Headless machines: keep the Vulkan loader's display probing quiet.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

# 2. Real MNIST for the end-to-end tests: the shared copy beside the project unless told otherwise.
if [ -z "${GPU_MNIST_DATA:-}" ] && [ -d ../shared/data/mnist ]; then
    export GPU_MNIST_DATA="$(cd ../shared/data/mnist && pwd)"
fi

# 3. Style, lints, a smoke run of every criterion benchmark (each runs once), then every test
#    (unit, kernels, sparse CPU kernels, gradient check, training, CLI, bad inputs, faults, fuzz,
#    downloader).
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --bench kernels
cargo test --lib --bins --tests
# 4. The fast CPU path's sparse products and convolutions again with the narrower vector variants
#    (AVX2, then none), which a CPU with AVX-512 would otherwise never run, and the sparse ones on
#    one thread (the narrow products' unit test runs every variant the CPU has by itself); the
#    thread pool's own tests alone, so that they start it with more threads than cores (helpers
#    to hand work to).
for simd in avx2 portable; do
    GPU_MNIST_CPU_SIMD=$simd cargo test --test sparse --quiet
    GPU_MNIST_CPU_SIMD=$simd cargo test --test convnet --test conv_kernels --quiet fast_cpu
done
GPU_MNIST_CPU_THREADS=1 cargo test --test sparse --quiet
cargo test --lib --quiet backend::cpu::threads

# 5. The browser page (web/): built for wasm32, served on loopback, and driven in Debian's
#    headless Chromium with WebGPU on its software adapter (SwiftShader): a short training run,
#    the kernels against the reference in the browser, Stop, a second Train, a drawn digit and bad
#    files (web/tests/run.sh installs Chromium, playwright-core and wasm-bindgen-cli if missing).
bash web/tests/run.sh
