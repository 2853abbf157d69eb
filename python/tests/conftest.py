"""Shared set-up: the CLI binary built from the same tree, and tiny synthetic pairs it makes."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def obelisk_bin() -> str:
    """The `obelisk` CLI to compare with: $OBELISK_BIN (.ci/run sets it), else target/debug/obelisk."""
    b = os.environ.get("OBELISK_BIN") or str(ROOT / "target" / "debug" / "obelisk")
    if not Path(b).is_file():
        pytest.fail(f"the obelisk CLI is not built at {b}: run `cargo build` or set OBELISK_BIN")
    return b


def cli(*args: str) -> str:
    r = subprocess.run([obelisk_bin(), *args], capture_output=True, text=True)
    assert r.returncode == 0, f"obelisk {' '.join(args)} failed: {r.stderr}"
    return r.stdout


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """Four tiny synthetic pairs (24³ voxels of 14 mm, as the Rust CLI tests use) with labels."""
    d = tmp_path_factory.mktemp("data")
    cli("synth", "--out", str(d), "--subjects", "1", "--pairs", "4", "--size", "24,24,24",
        "--spacing", "14,14,14", "--seed", "3", "--quiet")
    return d


def pair(data: Path, i: int = 0) -> dict:
    p = lambda n: str(data / f"pair_{i:03d}_{n}.nii.gz")  # noqa: E731
    return {"fixed": p("fixed"), "moving": p("moving"), "fixed_labels": p("fixed_labels"),
            "moving_labels": p("moving_labels")}
