"""obelisk.register against the CLI on the same pairs, and the input kinds against each other."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import obelisk
from conftest import cli, pair

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")


def field_of(folder: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "field.nii.gz")))


def test_matches_the_cli_field_and_writes_its_files(data, tmp_path):
    p = pair(data)
    out_cli = tmp_path / "cli"
    cli("register", "--fixed", p["fixed"], "--moving", p["moving"], "--fixed-labels", p["fixed_labels"],
        "--moving-labels", p["moving_labels"], "--out", str(out_cli), "--quiet")
    r = obelisk.register(p["fixed"], p["moving"], fixed_labels=p["fixed_labels"], moving_labels=p["moving_labels"])
    assert r.displacement.shape == (24, 24, 24, 3) and r.displacement.dtype == np.float32
    assert np.abs(r.displacement - field_of(out_cli)).max() < 1e-4
    # metrics as metrics.json holds them (before saving: no folder, no files)
    want = json.loads((out_cli / "metrics.json").read_text())
    assert r.metrics["metrics"]["mean_dice"] == pytest.approx(want["metrics"]["mean_dice"], abs=1e-6)
    assert r.metrics["out_dir"] is None and r.metrics["files"] == []
    assert r.metrics["config"] == want["config"]
    # save() writes what the CLI wrote
    out_py = tmp_path / "py"
    saved = r.save(out_py)
    assert sorted(f.name for f in out_py.iterdir()) == sorted(f.name for f in out_cli.iterdir())
    assert sorted(saved) == sorted(want)
    assert saved["out_dir"] == str(out_py) and len(saved["files"]) == len(want["files"])
    assert np.abs(field_of(out_py) - field_of(out_cli)).max() < 1e-4
    assert (out_py / "affine.tfm").read_text() == (out_cli / "affine.tfm").read_text()
    # existing outputs are kept unless force
    with pytest.raises(Exception, match="field.nii.gz"):
        r.save(out_py)
    r.save(out_py, force=True)
    # the fixed grid is the fixed file's
    g = r.fixed_grid
    f = sitk.ReadImage(p["fixed"])
    assert g.shape == (24, 24, 24)
    np.testing.assert_allclose(g.spacing, f.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(g.origin, f.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(g.direction).ravel(), f.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(g.affine, nib.load(p["fixed"]).affine, atol=1e-4)


def reoriented(moving: str, path: Path, angle: float) -> str:
    """`moving` stored differently, written to `path`: the same voxels with y reversed (a
    negative direction column) and x and y swapped, turned by `angle` about the image's centre
    and shifted by a few mm."""
    m = sitk.ReadImage(moving, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(m)[:, ::-1, :].transpose(0, 2, 1).copy()
    d0 = np.asarray(m.GetDirection()).reshape(3, 3)
    d = (d0 @ np.diag([1.0, -1.0, 1.0]))[:, [1, 0, 2]]
    o = np.array(m.TransformContinuousIndexToPhysicalPoint([0.0, m.GetSize()[1] - 1.0, 0.0]))
    c, s_ = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]])
    centre = np.array(m.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in m.GetSize()]))
    moved = sitk.GetImageFromArray(arr)
    moved.SetSpacing(tuple(np.asarray(m.GetSpacing())[[1, 0, 2]]))
    moved.SetDirection(tuple((rot @ d).ravel()))
    moved.SetOrigin(tuple(centre + rot @ (o - centre) + [5.0, -3.0, 2.0]))
    sitk.WriteImage(moved, str(path))
    return str(path)


def test_simpleitk_nibabel_and_numpy_inputs_give_the_path_result(data, tmp_path):
    # axes swapped and flipped, no rotation: every header entry is exact in float32, so the
    # geometry SimpleITK holds in memory is the file's to the last bit (with a rotation, ITK's
    # re-orthonormalised direction differs from the header by ~1e-7, which the registration's
    # discrete choices may amplify)
    fixed = pair(data)["fixed"]
    moving = reoriented(pair(data)["moving"], tmp_path / "moving_reoriented.nii.gz", 0.0)
    opts = dict(threads=2)
    ref = obelisk.register(fixed, moving, **opts).displacement
    by_sitk = obelisk.register(sitk.ReadImage(fixed), sitk.ReadImage(moving), **opts).displacement
    by_nib = obelisk.register(nib.load(fixed), nib.load(moving), **opts).displacement
    m = sitk.ReadImage(moving)
    by_numpy = obelisk.register(
        obelisk.load_image(fixed),
        obelisk.Image(sitk.GetArrayFromImage(m), m.GetSpacing(), m.GetOrigin(), m.GetDirection()),
        **opts,
    ).displacement
    for name, d in [("SimpleITK", by_sitk), ("nibabel", by_nib), ("numpy", by_numpy)]:
        assert np.abs(d - ref).max() < 1e-4, name


def test_oblique_nibabel_image_gives_the_path_result(data, tmp_path):
    # nibabel hands over the header's affine unchanged: equal to the path even when oblique
    fixed = pair(data)["fixed"]
    moving = reoriented(pair(data)["moving"], tmp_path / "moving_oblique.nii.gz", 0.1)
    ref = obelisk.register(fixed, moving, threads=2).displacement
    by_nib = obelisk.register(nib.load(fixed), nib.load(moving), threads=2).displacement
    assert np.abs(by_nib - ref).max() < 1e-4


def test_geometry_conversions_agree_with_simpleitk(data, tmp_path):
    moving = reoriented(pair(data)["moving"], tmp_path / "moving_oblique.nii.gz", 0.1)
    img = nib.load(moving)
    s = sitk.ReadImage(moving)
    native_affine, shape = obelisk._obelisk.read_grid(moving)
    for g in [obelisk.Grid.from_affine(img.affine, img.shape[::-1]), obelisk.load_image(moving).grid,
              obelisk._to_image(s, "s").grid]:
        assert g.shape == shape == tuple(s.GetSize()[::-1])
        np.testing.assert_allclose(g.spacing, s.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(g.origin, s.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(np.asarray(g.direction).ravel(), s.GetDirection(), atol=1e-5)
        np.testing.assert_allclose(g.affine, img.affine, atol=1e-4)
        np.testing.assert_allclose(g.affine, native_affine, atol=1e-4)
    # the voxel values reach obelisk in the same [z, y, x] order from every kind
    arrays = [obelisk._input(x, "m")[0] for x in (img, s, obelisk.load_image(moving))]
    assert all(np.array_equal(a, arrays[0]) for a in arrays)


def test_apply_matches_obelisk_warp(data, tmp_path):
    p = pair(data, 1)
    out = tmp_path / "reg"
    r = obelisk.register(p["fixed"], p["moving"])
    r.save(out)
    cli("warp", "--moving", p["moving"], "--field", str(out / "field.nii.gz"), "--out", str(tmp_path / "w.nii.gz"),
        "--quiet")
    cli("warp", "--moving", p["moving_labels"], "--field", str(out / "field.nii.gz"), "--labels",
        "--out", str(tmp_path / "wl.nii.gz"), "--quiet")
    want = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nii.gz")))
    want_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "wl.nii.gz")))
    # a path, a SimpleITK image and a nibabel image give the same values, each as its own kind
    assert np.abs(r.apply(p["moving"]) - want).max() < 1e-4
    w = r.apply(sitk.ReadImage(p["moving"]))
    assert isinstance(w, sitk.Image) and np.abs(sitk.GetArrayFromImage(w) - want).max() < 1e-4
    assert w.GetSpacing() == pytest.approx(sitk.ReadImage(p["fixed"]).GetSpacing())
    wn = r.apply(nib.load(p["moving"]))
    assert isinstance(wn, nib.Nifti1Image)
    assert np.abs(np.asarray(wn.dataobj).transpose(2, 1, 0) - want).max() < 1e-4
    labels = r.apply(nib.load(p["moving_labels"]), interpolation="nearest")
    la = np.asarray(labels.dataobj).transpose(2, 1, 0)
    assert np.array_equal(la, want_labels) and la.dtype == np.asanyarray(nib.load(p["moving_labels"]).dataobj).dtype
    assert np.array_equal(r.warped_labels if r.warped_labels is not None else want_labels, want_labels)
    assert np.abs(r.warped - want).max() < 1e-4


def test_bad_inputs_raise_clear_exceptions(data, tmp_path):
    p = pair(data)
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        obelisk.register(p["fixed"], missing)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is no image")
    with pytest.raises((ValueError, OSError), match="garbage.nii.gz"):
        obelisk.register(garbage, p["moving"])
    with pytest.raises(ValueError, match="features must be one of"):
        obelisk.register(p["fixed"], p["moving"], features="sift")
    with pytest.raises(ValueError, match="method dict"):
        obelisk.register(p["fixed"], p["moving"], method={"no_such_key": 1})
    with pytest.raises(ValueError, match="cannot be given with it"):
        obelisk.register(p["fixed"], p["moving"], method={}, smoothness=1.0)
    bad_labels = np.zeros((5, 5, 5), dtype=np.int16)
    with pytest.raises(ValueError, match="fixed_labels"):
        obelisk.register(p["fixed"], p["moving"], fixed_labels=bad_labels, moving_labels=p["moving_labels"])
    nan = np.full((8, 8, 8), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="<moving array>.*NaN"):
        obelisk.register(p["fixed"], nan)
    with pytest.raises(TypeError, match="fixed"):
        obelisk.register(42, p["moving"])
    with pytest.raises(ValueError, match="threads"):
        obelisk.register(p["fixed"], p["moving"], threads=0)


def test_method_dict_and_file_agree(data, tmp_path):
    p = pair(data)
    method = {"smoothness": 2.0, "levels": [{"shrink": 2, "control_shrink": 2, "iterations": 10}]}
    (tmp_path / "m.json").write_text(json.dumps(method))
    a = obelisk.register(p["fixed"], p["moving"], method=method, init="none")
    b = obelisk.register(p["fixed"], p["moving"], method=tmp_path / "m.json", init="none")
    assert np.array_equal(a.displacement, b.displacement)
    assert a.metrics["config"]["smoothness"] == 2.0 and len(a.metrics["config"]["levels"]) == 1


def blob_pair(n: int = 12):
    """A tiny numpy pair: a bright ball and the same ball shifted by one voxel."""
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float32)
    c = (n - 1) / 2
    f = np.exp(-((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2) / 8.0)
    m = np.exp(-((x - c - 1) ** 2 + (y - c) ** 2 + (z - c) ** 2) / 8.0)
    return obelisk.Image(f, spacing=(2, 2, 2)), obelisk.Image(m, spacing=(2, 2, 2))


FAST = dict(init="none", affine_iterations=0, discrete_radius=0, iterations=5, threads=1)


def test_fifty_calls_do_not_leak():
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    f, m = blob_pair()
    for _ in range(5):  # warm up: allocator pools, lazily made tables
        obelisk.register(f, m, **FAST).displacement
    before = proc.memory_info().rss
    for _ in range(50):
        r = obelisk.register(f, m, **FAST)
        r.displacement
        r.metrics
    grown = (proc.memory_info().rss - before) / 2**20
    assert grown < 50, f"RSS grew by {grown:.1f} MB over 50 calls"


def test_the_gil_is_released_while_registering(data):
    p = pair(data)
    ticks = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.01)

    t = threading.Thread(target=tick)
    t.start()
    start = time.perf_counter()
    obelisk.register(p["fixed"], p["moving"], threads=1)
    end = time.perf_counter()
    done.set()
    t.join()
    during = [x for x in ticks if start < x < end]
    # a thread holding the GIL for the whole call would let the ticker run at most once or twice
    assert len(during) >= 0.25 * (end - start) / 0.01


def test_2d_numpy_pair():
    y, x = np.mgrid[:32, :32].astype(np.float32)
    f = np.exp(-((x - 15) ** 2 + (y - 16) ** 2) / 20.0)
    m = np.exp(-((x - 17) ** 2 + (y - 16) ** 2) / 20.0)
    # the features: a lone smooth blob is locally linear in every 5-pixel window, so the default's
    # local NCC (chosen, the contrast being the same) cannot see its shift
    r = obelisk.register(f, m, init="none", similarity="l1")
    assert r.displacement.shape == (32, 32, 2)
    assert r.fixed_grid.shape == (32, 32) and r.fixed_grid.is_2d
    w = r.apply(m)
    assert w.shape == (32, 32)
    # the warped moving ball lies nearer the fixed one than before
    assert np.abs(w - f).sum() < np.abs(m - f).sum()


def test_seed_is_accepted_and_changes_nothing(data):
    p = pair(data)
    a = obelisk.register(p["fixed"], p["moving"], seed=1, **FAST)
    b = obelisk.register(p["fixed"], p["moving"], seed=2, **FAST)
    assert np.array_equal(a.displacement, b.displacement)
