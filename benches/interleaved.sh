#!/bin/bash
# benches/interleaved.sh MODEL BASELINE: `gpu-mnist train --model MODEL --device cpu` against
# PyTorch's run of the same recipe (the script BASELINE), interleaved run by run so that the
# machine's drift hits both alike. benches/fast99.sh and benches/accurate.sh call it.
#
# Contract: run from the repository root after `cargo build --release`, with PyTorch installed
# (PYTHON, default ~/.venvs/torch/bin/python; ../shared/bench/README.md says how) and MNIST in
# GPU_MNIST_DATA (default ../shared/data/mnist). SEEDS (default "0 1 2") are run in turn, ours
# then PyTorch's; THREADS (default 2) is PyTorch's --threads. Prints one line per run (seed,
# training seconds (ours: the sum of the epochs; PyTorch's `train_seconds`), test accuracy, peak
# RSS in MiB), the means, and the ratio of the means.
set -euo pipefail
model=$1
baseline=$2
python=${PYTHON:-$HOME/.venvs/torch/bin/python}
data=${GPU_MNIST_DATA:-$(cd ../shared/data/mnist && pwd)}
seeds=${SEEDS:-0 1 2}
threads=${THREADS:-2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "run seed train_s test_accuracy peak_rss_mib"
for seed in $seeds; do
    /usr/bin/time -f "%M" -o "$tmp/rss" ./target/release/gpu-mnist train --model "$model" --device cpu \
        --data "$data" --seed "$seed" --json --out "$tmp/run-$seed" >"$tmp/ours.json"
    ours_s=$(grep '"epoch"' "$tmp/ours.json" | sed 's/.*"seconds":\([0-9.e-]*\).*/\1/' | awk '{ s += $1 } END { print s }')
    ours_acc=$(grep '"test_accuracy"' "$tmp/ours.json" | sed 's/.*"test_accuracy":\([0-9.e-]*\).*/\1/')
    echo "gpu-mnist $seed $ours_s $ours_acc $(( $(cat "$tmp/rss") / 1024 ))"
    /usr/bin/time -f "%M" -o "$tmp/rss" "$python" "$baseline" --data "$data" \
        --threads "$threads" --seed "$seed" | grep '^RESULT' | sed 's/^RESULT //' >"$tmp/torch.json"
    torch_s=$(sed 's/.*"train_seconds": \([0-9.e-]*\).*/\1/' "$tmp/torch.json")
    torch_acc=$(sed 's/.*"test_accuracy": \([0-9.e-]*\).*/\1/' "$tmp/torch.json")
    echo "pytorch $seed $torch_s $torch_acc $(( $(cat "$tmp/rss") / 1024 ))"
done | tee "$tmp/runs"
awk '{ n[$1]++; s[$1] += $3; a[$1] += $4 }
     END { for (k in n) printf "mean %s: %.3f s, %.4f test accuracy over %d runs\n", k, s[k] / n[k], a[k] / n[k], n[k];
           printf "ratio gpu-mnist / pytorch (mean training time): %.3f\n", (s["gpu-mnist"] / n["gpu-mnist"]) / (s["pytorch"] / n["pytorch"]) }' \
    <(grep -v '^run' "$tmp/runs")
