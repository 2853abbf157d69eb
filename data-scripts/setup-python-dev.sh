#!/usr/bin/env bash
# Adds to .venv (made by setup-venv.sh) what building and testing the Python package (python/)
# needs: maturin, pytest, Dask's distributed scheduler and psutil, at pinned versions.
# Idempotent: does nothing when they are already importable at these versions.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
bash "$root/data-scripts/setup-venv.sh" >/dev/null
pins=(maturin==1.9.4 pytest==8.4.2 "dask[distributed]==2025.9.1" psutil==7.2.2)

if "$venv/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m, sys
want = {"maturin": "1.9.4", "pytest": "8.4.2", "dask": "2025.9.1", "distributed": "2025.9.1", "psutil": "7.2.2"}
sys.exit(0 if all(m.version(k) == v for k, v in want.items()) else 1)
PY
then
    echo "setup-python-dev: $venv already has ${pins[*]}"
    exit 0
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
echo "setup-python-dev: installed ${pins[*]} into $venv"
