#!/usr/bin/env bash
# Creates .venv in the repository root with the Python packages the ITK cross-check tests need.
# Idempotent: does nothing when the pinned versions are already importable.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
pins=(SimpleITK==2.5.7 numpy==2.3.5 nibabel==5.3.2)

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m, sys
want = {"SimpleITK": "2.5.7", "numpy": "2.3.5", "nibabel": "5.3.2"}
sys.exit(0 if all(m.version(k) == v for k, v in want.items()) else 1)
PY
then
    echo "setup-venv: $venv already has ${pins[*]}"
    exit 0
fi

# a venv left half-made (an interrupted run) has python but no pip: make it anew
if [[ -x "$venv/bin/python" ]] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$venv"
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
echo "setup-venv: installed ${pins[*]} into $venv"
