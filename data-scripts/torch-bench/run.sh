#!/usr/bin/env bash
# OBELISK-Net training step: PyTorch (CPU) vs obelisk (candle), same network, batch and shapes,
# 2 threads each. Usage: data-scripts/torch-bench/run.sh [THREADS]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
threads="${1:-2}"
bash "$here/setup.sh"
echo "== PyTorch"
OMP_NUM_THREADS="$threads" "$here/.venv/bin/python" "$here/obelisk_step.py" --threads "$threads" --infer-size 144
echo "== obelisk (candle, release)"
cd "$root"
cargo build --release -q -p obelisk-segmentation --example train_bench
RAYON_NUM_THREADS="$threads" target/release/examples/train_bench step
RAYON_NUM_THREADS="$threads" target/release/examples/train_bench infer --size 144
