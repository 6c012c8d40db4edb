#!/bin/bash
# benches/accurate.sh: `gpu-mnist train --model accurate --device cpu` (batch normalisation,
# dropout, augmentation, 10 epochs) against PyTorch's run of the same recipe
# (benches/torch_accurate.py), interleaved (benches/interleaved.sh, whose contract applies), seeds
# 0-2 unless SEEDS says.
set -euo pipefail
exec bash "$(dirname "$0")/interleaved.sh" accurate "$(dirname "$0")/torch_accurate.py"
