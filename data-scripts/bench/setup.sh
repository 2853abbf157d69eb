#!/usr/bin/env bash
# Creates data-scripts/bench/.venv with the peer tools of the benchmark, pinned.
# Idempotent: does nothing when the pinned versions are already installed.
# torch comes from PyPI as its default (CUDA) build: a few GB to download; the benchmark runs
# it on the CPU. PYTHON=... picks the interpreter (3.10-3.12).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
pins=(SimpleITK==2.5.7 numpy==2.3.5 nibabel==5.3.2 antspyx==0.6.3 itk-elastix==0.25.4 convexAdam==0.2.0
      torch==2.15.0 matplotlib==3.11.2)

have_pins() {
    [[ -x "$venv/bin/python" ]] || return 1
    "$venv/bin/python" - "${pins[@]}" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
ok = all(m.version(n) == v for n, v in (p.split("==") for p in sys.argv[1:]))
sys.exit(0 if ok else 1)
PY
}
if have_pins; then
    echo "bench/setup: $venv has ${pins[*]}"
    exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
have_pins || { echo "bench/setup: $venv does not have ${pins[*]} after pip install" >&2; exit 1; }
echo "bench/setup: installed ${pins[*]} into $venv"
