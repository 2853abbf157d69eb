#!/usr/bin/env bash
# Fetches the TotalSegmentator 2.18.0 source distribution from PyPI (it ships three example
# subjects with predicted organ labels under tests/reference_files) and converts them into
# data/totalseg/ with one common label list and a Learn2Reg-style dataset.json.
#
#   data-scripts/fetch_totalseg.sh            # venv + download (once) + extract + convert
#   PYTHON=python3.12 data-scripts/fetch_totalseg.sh
#
# Layout (all gitignored):
#   data-scripts/.venv-data/   Python venv with the pinned packages of venv-data.sh
#   data/cache/                the sdist (downloaded once, SHA-256 checked) and its extracted
#                              tests/reference_files
#   data/totalseg/             converter output (see data-scripts/README.md)
# Licence of the data: Apache-2.0 (TotalSegmentator); the labels are model predictions.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="$root/data/cache"
out="$root/data/totalseg"

version=2.18.0
sdist="totalsegmentator-$version.tar.gz"
# SHA-256 of totalsegmentator-2.18.0.tar.gz as downloaded from PyPI on 2026-11-27 (38,049,988 bytes).
sdist_sha256=5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03

# --- 1. venv with pinned packages (idempotent; shared with fetch_corpus.sh) --------------------
# shellcheck source=venv-data.sh
source "$root/data-scripts/venv-data.sh"
ensure_venv_data fetch_totalseg

# --- 2. download the sdist once -----------------------------------------------------------------
mkdir -p "$cache"
if [[ -f "$cache/$sdist" ]]; then
    echo "fetch_totalseg: using cached $cache/$sdist"
else
    # Exactly as in the reference notes: no binaries (the wheel lacks tests/), and no build
    # isolation (with isolation, --no-binary :all: makes pip build numpy from source).
    dl="$(mktemp -d "$cache/.download.XXXXXX")"
    trap 'rm -rf "$dl"' EXIT
    "$venv/bin/python" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
        --no-build-isolation -d "$dl" "totalsegmentator==$version"
    mv "$dl/$sdist" "$cache/$sdist"
    rm -rf "$dl"
    trap - EXIT
fi
check_sha fetch_totalseg "$cache/$sdist" "$sdist_sha256"

# --- 3. extract only tests/reference_files -----------------------------------------------------
ref="$cache/totalsegmentator-$version/tests/reference_files"
if [[ ! -f "$ref/example_ct.nii.gz" ]]; then
    tar xzf "$cache/$sdist" -C "$cache" "totalsegmentator-$version/tests/reference_files"
fi

# --- 4. convert (the class maps are read from the sdist's map_to_binary.py inside the tarball) --
"$venv/bin/python" "$root/data-scripts/totalseg_convert.py" \
    --reference "$ref" --sdist "$cache/$sdist" --out "$out"
