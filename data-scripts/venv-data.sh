# Sourced (not run) by fetch_totalseg.sh and fetch_corpus.sh: makes sure data-scripts/.venv-data
# has the pinned packages the data scripts need, creating it when missing.
#
#   source "$root/data-scripts/venv-data.sh"; ensure_venv_data TAG
#
# Sets `venv` (the folder) and `venv_python`. TAG prefixes the messages. PYTHON=... picks the
# interpreter that creates the venv. `check_sha TAG FILE SHA256` stops the script when a
# downloaded file's SHA-256 differs from the recorded one.

venv="$root/data-scripts/.venv-data"
venv_python="$venv/bin/python"
venv_pins=(setuptools==80.9.0 wheel==0.46.3 SimpleITK==2.5.7 numpy==2.3.5 nibabel==5.3.2 pydicom==3.0.2)

venv_has_pins() {
    [[ -x "$venv_python" ]] || return 1
    "$venv_python" - "${venv_pins[@]}" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
ok = all(m.version(n) == v for n, v in (p.split("==") for p in sys.argv[1:]))
sys.exit(0 if ok else 1)
PY
}

ensure_venv_data() {
    local tag="$1"
    if venv_has_pins; then
        echo "$tag: venv $venv has ${venv_pins[*]}"
    else
        [[ -x "$venv_python" ]] || "${PYTHON:-python3}" -m venv "$venv"
        "$venv_python" -m pip install --quiet --disable-pip-version-check "${venv_pins[@]}"
        echo "$tag: installed ${venv_pins[*]} into $venv"
    fi
}

check_sha() {  # tag file expected
    local got
    got=$(sha256sum "$2" | cut -d' ' -f1)
    if [[ "$got" != "$3" ]]; then
        echo "$1: SHA-256 mismatch for $2" >&2
        echo "  expected $3" >&2
        echo "  got      $got" >&2
        echo "  delete the file to download it again" >&2
        exit 1
    fi
    echo "$1: $(basename "$2") $(stat -c %s "$2") bytes, SHA-256 ok"
}
