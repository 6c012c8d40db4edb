#!/bin/bash
# benches/fast99.sh: time to 99 % on this machine's CPU, `gpu-mnist train --model fast --device
# cpu` against PyTorch's run of the same recipe (../shared/bench/torch_fast99.py), interleaved
# (benches/interleaved.sh, whose contract applies), seeds 0-4 unless SEEDS says.
set -euo pipefail
SEEDS=${SEEDS:-0 1 2 3 4} exec bash "$(dirname "$0")/interleaved.sh" fast ../shared/bench/torch_fast99.py
