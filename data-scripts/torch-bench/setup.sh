#!/usr/bin/env bash
# Creates data-scripts/torch-bench/.venv with PyTorch from PyPI (the default Linux wheel: built
# with CUDA, runs on the CPU; a large download) for the OBELISK-Net step-time comparison.
# Idempotent: does nothing when the pinned version is already importable.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
pin="torch==2.15.0"

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.15.0")' 2>/dev/null; then
    echo "torch-bench: $venv already has $pin"
    exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$pin" numpy
echo "torch-bench: installed $pin into $venv"
