#!/bin/bash
# benches/device_check.sh: the whole measurement on a machine with an NVIDIA GPU (H100/H200) and
# no Rust toolchain, in one run of a few minutes.
#
# Contract: run from the repository root on the GPU machine, with `.dev/` copied there (ignored by
# git: `echo /.dev/ >> .git/info/exclude`) holding
#   gpu-mnist       a release binary built here (`cargo build --release`, then `strip`)
#   mnist/          the four gzip IDX files (from ../shared/data/mnist)
#   torch_mnist.py  ../shared/bench/torch_mnist.py
#   torch_convnet.py  ../shared/bench/torch_convnet.py
#   torch_fast99.py   ../shared/bench/torch_fast99.py
#   torch_accurate.py benches/torch_accurate.py
#   *.deb           the Vulkan loader and libglvnd (libvulkan1 libegl1 libglvnd0 libopengl0 libgl1
#                   libglx0 libgles2, downloaded for amd64 with `apt-get download`)
#   tests/          optional: the kernels and training test binaries, stripped, to run on the card
#                   (`cargo test --release --test kernels --test training --no-run` prints their
#                   paths; copy them as tests/kernels and tests/training)
# and writes at most 13 files to $OUT: the card, `devices`, the reference job with the output
# layer unfused (GPU_MNIST_OUTPUT_FUSION=0; cold driver cache: the start-up figure) and fused (=1),
# `bench --device gpu` both ways, the convnet (`train --model convnet` and `bench --model convnet`),
# PyTorch CUDA's reference job and convnet, the fastest published recipe in one file (`train
# --model fast`, `bench --model fast` and PyTorch CUDA's run of it, `torch_fast99.py`, seeds 0-2:
# the goal is under 0.25 s of training), `--model accurate` (batch norm, dropout, augmentation on
# the device) against `torch_accurate.py --device cuda` in another, and the tests' summary.
# TRAIN_ARGS adds arguments to both training runs (a dry run on llvmpipe here:
# VK_DRIVER_FILES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json TRAIN_ARGS="--train-limit 2560
# --epochs 1" BENCH_ARGS="--steps 5 --repeats 1" OUT=/tmp/out bash benches/device_check.sh).
set -u
out=${OUT:-/tmp/device-check}
mkdir -p "$out"
for f in .dev/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
ldconfig 2>/dev/null
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export GPU_MNIST_DATA=$PWD/.dev/mnist
bin=.dev/gpu-mnist
train_args=${TRAIN_ARGS:-}
bench_args=${BENCH_ARGS:-}

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv; } >"$out/card.txt" 2>&1
"$bin" devices >"$out/devices.txt" 2>&1
# shellcheck disable=SC2086 # the extra arguments are meant to split
{
    time GPU_MNIST_OUTPUT_FUSION=0 "$bin" train --device gpu --verbose --out /tmp/run-unfused $train_args
} >"$out/train_unfused.txt" 2>&1
# shellcheck disable=SC2086
{
    time GPU_MNIST_OUTPUT_FUSION=1 "$bin" train --device gpu --verbose --out /tmp/run-fused $train_args
} >"$out/train_fused.txt" 2>&1
# shellcheck disable=SC2086
GPU_MNIST_OUTPUT_FUSION=0 "$bin" bench --device gpu $bench_args >"$out/bench_unfused.txt" 2>&1
# shellcheck disable=SC2086
GPU_MNIST_OUTPUT_FUSION=1 "$bin" bench --device gpu $bench_args >"$out/bench_fused.txt" 2>&1
# shellcheck disable=SC2086
{
    time "$bin" train --model convnet --device gpu --verbose --out /tmp/run-convnet $train_args
} >"$out/train_convnet.txt" 2>&1
# shellcheck disable=SC2086
"$bin" bench --model convnet --device gpu $bench_args >"$out/bench_convnet.txt" 2>&1
if [ -z "$train_args" ]; then
    PYTHONUNBUFFERED=1 python3 .dev/torch_mnist.py --device cuda --data .dev/mnist >"$out/torch_cuda.txt" 2>&1
    PYTHONUNBUFFERED=1 python3 .dev/torch_convnet.py --device cuda --data .dev/mnist >"$out/torch_convnet_cuda.txt" 2>&1
fi
# shellcheck disable=SC2086
{
    time "$bin" train --model fast --device gpu --verbose --out /tmp/run-fast $train_args
    "$bin" bench --model fast --device gpu $bench_args
    if [ -z "$train_args" ]; then
        for seed in 0 1 2; do
            PYTHONUNBUFFERED=1 python3 .dev/torch_fast99.py --device cuda --data .dev/mnist --seed "$seed"
        done
    fi
} >"$out/fast.txt" 2>&1
# shellcheck disable=SC2086
{
    time "$bin" train --model accurate --device gpu --out /tmp/run-accurate $train_args
    if [ -z "$train_args" ]; then
        PYTHONUNBUFFERED=1 python3 .dev/torch_accurate.py --device cuda --data .dev/mnist --seed 0
    fi
} >"$out/accurate.txt" 2>&1
for t in .dev/tests/*; do
    [ -x "$t" ] || continue
    echo "== $t"
    GPU_MNIST_DATA=$PWD/.dev/mnist "$t" --test-threads=1 2>&1 | grep -E "^test |test result|panicked|max \|diff\|.*fused"
done >"$out/tests.txt" 2>&1
grep -H -E "epoch|test:|first chunk|dispatches a step" "$out"/train_*.txt | head -40
grep -H -E "step|epoch|samples" "$out"/bench_*.txt | head -20
grep -E "epoch|test:|step|RESULT" "$out/fast.txt" | head -20
grep -E "epoch 10|test:|RESULT|real" "$out/accurate.txt" | head -8
tail -n 3 "$out/torch_cuda.txt" "$out/torch_convnet_cuda.txt" 2>/dev/null
grep -E "test result" "$out/tests.txt"
