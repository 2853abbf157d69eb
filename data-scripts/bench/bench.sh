#!/usr/bin/env bash
# The peer benchmark from one command: makes the venv (setup.sh), builds the release binary,
# fetches the TotalSegmentator example subjects, runs run_bench.py and regenerates BENCHMARKS.md.
#
#   bash data-scripts/bench/bench.sh                      # full run, writes BENCHMARKS.md
#   bash data-scripts/bench/bench.sh --repeats 1 --no-real  # extra options go to run_bench.py
#   bash data-scripts/bench/bench.sh --smoke              # tiny pair; BENCHMARKS.md untouched
#   OBELISK_BIN=/path/to/obelisk bash data-scripts/bench/bench.sh   # skip the cargo build
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# recorded in BENCHMARKS.md as the exact command
command="bash data-scripts/bench/bench.sh $*"
if [[ -n "${OBELISK_BIN:-}" ]]; then command="OBELISK_BIN=$OBELISK_BIN $command"; fi
smoke=0
for a in "$@"; do [[ "$a" == "--smoke" ]] && smoke=1; done

bash "$here/setup.sh"
if [[ -z "${OBELISK_BIN:-}" ]]; then
    (cd "$root" && cargo build --release)
    OBELISK_BIN="$root/target/release/obelisk"
fi
extra=()
if [[ $smoke == 0 ]]; then
    [[ -f "$root/data/totalseg/dataset.json" ]] || bash "$root/data-scripts/fetch_totalseg.sh"
    extra=(--benchmarks "$root/BENCHMARKS.md" --segmentation)
fi
BENCH_COMMAND="$command" exec "$here/.venv/bin/python" "$here/run_bench.py" --obelisk "$OBELISK_BIN" "${extra[@]}" "$@"
