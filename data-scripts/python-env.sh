# Sourced (not run): sets the environment maturin gives cargo when it builds the Python package,
# for every cargo command of the session. pyo3's build script reruns whenever these change, so
# with them `cargo clippy/test --workspace` (which build python/ as a workspace member) and
# `maturin build` share one build of pyo3 instead of rebuilding it for each other.
# Needs .venv (data-scripts/setup-venv.sh).
_obelisk_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYO3_PYTHON="$_obelisk_root/.venv/bin/python"
export PYO3_BUILD_EXTENSION_MODULE=1
# maturin's format: implementation-major.minor-pointer width
PYO3_ENVIRONMENT_SIGNATURE="$("$PYO3_PYTHON" -c 'import sys; print(f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}-{64 if sys.maxsize > 2**32 else 32}bit")')"
export PYO3_ENVIRONMENT_SIGNATURE
unset _obelisk_root
