#!/usr/bin/env bash
# Build the browser page and serve it on http://127.0.0.1:8000/ (PORT=... to change; WebGPU needs
# a secure context, which 127.0.0.1 is). The module is built twice: with WebAssembly SIMD
# (simd128, into dist/pkg-simd/, about three times as fast on the CPU path) and without (dist/pkg/,
# for browsers without SIMD); the page loads the one the browser validates. Installs what it needs on the way: the
# wasm32-unknown-unknown target and the wasm-bindgen CLI of exactly the version web/Cargo.lock
# pins (the generated JavaScript glue must match the crate). The page goes to web/dist/, a static
# folder any web server can host; MNIST's four files are copied into web/dist/data/ from
# $GPU_MNIST_DATA, ../shared/data/mnist beside the repository, or the native binary's cache
# (~/.cache/gpu-mnist/mnist, filled by `gpu-mnist train`); without them the page asks the person
# to pick the files.
#
#   bash web/build.sh              build, then serve until Ctrl-C
#   bash web/build.sh --no-serve   build only (what the tests do)
set -euo pipefail
cd "$(dirname "$0")"
serve=1
[ "${1:-}" = "--no-serve" ] && serve=0

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
version=$(sed -n '/^name = "wasm-bindgen"$/{n;s/^version = "\(.*\)"$/\1/p;}' Cargo.lock)
if ! wasm-bindgen --version 2>/dev/null | grep -qF "$version"; then
    echo "web/build.sh: installing wasm-bindgen-cli $version (a few minutes, once)"
    # --locked first; a registry that lacks one of its pinned dependencies gets the newest that fits.
    cargo install wasm-bindgen-cli --version "$version" --locked --quiet || cargo install wasm-bindgen-cli --version "$version" --quiet
fi

cargo build --release --target wasm32-unknown-unknown --quiet
# RUSTFLAGS reach only the wasm32 artifacts (a --target build), not build scripts; their own
# target folder keeps both builds' caches.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+simd128" \
    cargo build --release --target wasm32-unknown-unknown --target-dir target/simd128 --quiet
rm -rf dist
mkdir -p dist/pkg dist/pkg-simd dist/data
wasm-bindgen --target web --no-typescript --out-dir dist/pkg target/wasm32-unknown-unknown/release/gpu_mnist_web.wasm
wasm-bindgen --target web --no-typescript --out-dir dist/pkg-simd target/simd128/wasm32-unknown-unknown/release/gpu_mnist_web.wasm
cp index.html app.js engine.js worker.js style.css dist/

files="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
placed=0
for dir in "${GPU_MNIST_DATA:-}" ../../shared/data/mnist "${XDG_CACHE_HOME:-$HOME/.cache}/gpu-mnist/mnist"; do
    [ -n "$dir" ] || continue
    if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
        for f in $files; do cp "$dir/$f.gz" dist/data/; done
        echo "web/build.sh: MNIST from $dir"
        placed=1
        break
    fi
done
[ "$placed" = 1 ] || echo "web/build.sh: no MNIST files found; the page will ask for them (or run 'gpu-mnist train' once to download them, then build again)"
echo "web/build.sh: page built in web/dist ($(du -k dist/pkg-simd/gpu_mnist_web_bg.wasm | cut -f1) KiB of wasm with SIMD, $(du -k dist/pkg/gpu_mnist_web_bg.wasm | cut -f1) KiB without)"

if [ "$serve" = 1 ]; then
    port="${PORT:-8000}"
    echo "web/build.sh: serving on http://127.0.0.1:$port/ (Ctrl-C stops)"
    exec python3 -m http.server "$port" --bind 127.0.0.1 --directory dist
fi
