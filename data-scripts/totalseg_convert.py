#!/usr/bin/env python3
"""Convert TotalSegmentator 2.18.0's example subjects into an obelisk evaluation set.

Reads the sdist's tests/reference_files (extracted by fetch_totalseg.sh) and the class maps in
the sdist's totalsegmentator/map_to_binary.py (parsed with ast.literal_eval, never executed), and
writes into --out:

  ct_a.nii.gz, ct_a_labels.nii.gz   CT A  (example_ct + example_seg_fast_force_split, `total` map)
  ct_b.nii.gz, ct_b_labels.nii.gz   CT B  (20-slice DICOM series + example_seg_dicom, `total` map;
                                           labels resampled nearest-neighbour onto the CT grid)
  mr_c.nii.gz, mr_c_labels.nii.gz   MR C  (example_mr_sm + example_seg_mr, `total_mr` map)
  dataset.json                      Learn2Reg-style description

CT is clipped to [-1024, 2000] HU, images are float32, labels uint8 with one common label list:
obelisk's synthetic ids 1..9 (liver, spleen, kidney_right, kidney_left, stomach, pancreas, aorta,
gallbladder, spine = all vertebrae merged), then structures present in both class maps (and
CT-only structures present in both CT subjects) from 10 up. Geometry is checked and every image
is summarised (shape, spacing, RAS world bounding box, labels present).
"""

import argparse
import ast
import json
import re
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

HU_MIN, HU_MAX = -1024.0, 2000.0
OBELISK = ["liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "aorta",
           "gallbladder", "spine"]
HOLLOW = ["lung_left", "lung_right", "colon", "small_bowel", "duodenum", "stomach", "esophagus"]


# ----------------------------------------------------------------------------- class maps
def read_class_maps(sdist: Path) -> dict:
    """`class_map` from totalsegmentator/map_to_binary.py inside the sdist, without executing it."""
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("totalsegmentator/map_to_binary.py"))
        src = tar.extractfile(member).read().decode()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("class_map not found in map_to_binary.py")


def canonical(name: str, task: str):
    """Common-list name of a TotalSegmentator class (None: not used)."""
    if task == "total":
        if name.startswith("vertebrae_"):
            return "spine"
        m = re.fullmatch(r"lung_(upper|middle|lower)_lobe_(left|right)", name)
        if m:
            return f"lung_{m.group(2)}"
        if name.startswith("rib_"):
            return "ribs"
    elif task == "total_mr":
        if name == "vertebrae":
            return "spine"
    return name


def build_common(maps: dict, present: dict) -> list:
    """Common label names, index = id (0 = background).

    present: subject -> (task, set of source ids in its label map)."""
    ct = {canonical(n, "total") for n in maps["total"].values()}
    mr_order = []
    for i in sorted(maps["total_mr"]):
        c = canonical(maps["total_mr"][i], "total_mr")
        if c not in mr_order:
            mr_order.append(c)
    shared = [c for c in mr_order if c in ct and c not in OBELISK]

    def n_subjects(c):
        return sum(any(canonical(maps[t][i], t) == c for i in ids) for t, ids in present.values())

    ct_subjects = [ids for t, ids in present.values() if t == "total"]
    ct_only = []
    for i in sorted(maps["total"]):
        c = canonical(maps["total"][i], "total")
        if c in ct_only or c in shared or c in OBELISK or c in mr_order:
            continue
        if all(any(canonical(maps["total"][j], "total") == c for j in ids) for ids in ct_subjects):
            ct_only.append(c)
    missing = [c for c in OBELISK if c not in ct or c not in mr_order]
    if missing:
        raise SystemExit(f"obelisk labels missing from a class map: {missing}")
    # Most widely present first (ties in total_mr order), so the first ids are the useful ones.
    rest = sorted(shared, key=lambda c: (-n_subjects(c), shared.index(c))) + ct_only
    return ["background"] + OBELISK + rest


def lookup(task_map: dict, task: str, common: list) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    idx = {n: i for i, n in enumerate(common)}
    for i, n in task_map.items():
        lut[i] = idx.get(canonical(n, task), 0)
    return lut


# ----------------------------------------------------------------------------- geometry helpers
def world_bbox(affine: np.ndarray, shape) -> tuple:
    """RAS bounding box (mm) of the voxel centres."""
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)], float)
    w = (affine @ corners.T)[:3]
    return w.min(1), w.max(1)


def sitk_geometry_equal(a: sitk.Image, b: sitk.Image, tol=1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def save_pair(out: Path, stem: str, img: np.ndarray, lab: np.ndarray, affine: np.ndarray):
    """Write image (float32) and labels (uint8) with the same affine, sform and qform code 1."""
    for arr, name, dtype in ((img, f"{stem}.nii.gz", np.float32), (lab, f"{stem}_labels.nii.gz", np.uint8)):
        nii = nib.Nifti1Image(np.asarray(arr, dtype), affine)
        nii.set_qform(affine, code=1)
        nii.set_sform(affine, code=1)
        nii.header.set_xyzt_units("mm", "sec")
        nib.save(nii, out / name)


def check_written(out: Path, stem: str) -> tuple:
    """Reload with nibabel: the label map's affine must equal its image's; also via SimpleITK."""
    img = nib.load(out / f"{stem}.nii.gz")
    lab = nib.load(out / f"{stem}_labels.nii.gz")
    if img.shape != lab.shape or not np.allclose(img.affine, lab.affine, atol=1e-5):
        raise SystemExit(f"{stem}: label affine/shape differs from image\n{img.affine}\n{lab.affine}")
    if not sitk_geometry_equal(sitk.ReadImage(str(out / f"{stem}.nii.gz")),
                               sitk.ReadImage(str(out / f"{stem}_labels.nii.gz"))):
        raise SystemExit(f"{stem}: SimpleITK sees different image/label geometry")
    return img, lab


def hu_check(stem: str, ct: np.ndarray, lab: np.ndarray, common: list):
    """Overlay sanity in CT: spine must be bone, liver soft tissue, labels inside the body."""
    idx = {n: i for i, n in enumerate(common)}
    spine = float(ct[lab == idx["spine"]].mean())
    liver = float(ct[lab == idx["liver"]].mean())
    # Air-filled structures (lungs, bowel gas) legitimately hold voxels below -500 HU.
    hollow = [idx[n] for n in HOLLOW if n in idx]
    solid = (lab > 0) & ~np.isin(lab, hollow)
    inside = float((ct[solid] > -500).mean())
    print(f"  overlay check: mean HU spine {spine:.0f}, liver {liver:.0f}; "
          f"voxels of non-air-filled structures with HU > -500: {100 * inside:.1f}%")
    if not (spine > 150 and -20 < liver < 250 and inside > 0.97):
        raise SystemExit(f"{stem}: labels do not overlay the CT (spine {spine}, liver {liver}, inside {inside})")


def summarise(stem: str, img: nib.Nifti1Image, lab: nib.Nifti1Image, common: list) -> dict:
    lo, hi = world_bbox(img.affine, img.shape)
    data = np.asarray(img.dataobj)
    ids, counts = np.unique(np.asarray(lab.dataobj), return_counts=True)
    present = {int(i): int(c) for i, c in zip(ids, counts) if i > 0}
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    print(f"{stem}: shape {img.shape}, spacing {tuple(round(z, 4) for z in zooms)} mm, "
          f"orientation {''.join(nib.aff2axcodes(img.affine))}, {img.get_data_dtype()}, "
          f"intensity [{data.min():.0f}, {data.max():.0f}]")
    print(f"  world bbox RAS (voxel centres, mm): x [{lo[0]:.1f}, {hi[0]:.1f}]  "
          f"y [{lo[1]:.1f}, {hi[1]:.1f}]  z [{lo[2]:.1f}, {hi[2]:.1f}]")
    print(f"  {len(present)} labels: " + ", ".join(f"{i} {common[i]} ({c})" for i, c in present.items()))
    return {"shape": list(img.shape), "spacing": zooms, "bbox": (lo, hi), "labels": present}


def report_dropped(stem: str, src_lab: np.ndarray, task_map: dict, lut: np.ndarray):
    ids, counts = np.unique(src_lab, return_counts=True)
    dropped = [f"{task_map[int(i)]} ({c})" for i, c in zip(ids, counts) if i > 0 and lut[i] == 0]
    if dropped:
        print(f"  {stem}: source classes not in the common list (set to 0): " + ", ".join(dropped))


# ----------------------------------------------------------------------------- subjects
def load_nifti_pair(ref: Path, image: str, labels: str):
    img = nib.load(ref / image)
    lab = nib.load(ref / labels)
    if img.shape != lab.shape or not np.allclose(img.affine, lab.affine, atol=1e-4):
        raise SystemExit(f"{labels} is not on the grid of {image}")
    return img, np.asarray(lab.dataobj).astype(np.uint8)


def load_ct_b(ref: Path):
    """DICOM series (SimpleITK, LPS) and its label map resampled onto it (nearest neighbour)."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(ref / "example_ct_dicom"))
    if len(series) != 1:
        raise SystemExit(f"expected one DICOM series, found {len(series)}")
    files = reader.GetGDCMSeriesFileNames(str(ref / "example_ct_dicom"), series[0])
    reader.SetFileNames(files)
    ct = reader.Execute()
    lab_src = sitk.ReadImage(str(ref / "example_seg_dicom.nii.gz"))
    print(f"CT B: {len(files)} DICOM slices, size {ct.GetSize()}, spacing "
          f"{tuple(round(s, 4) for s in ct.GetSpacing())}, origin LPS {tuple(round(o, 2) for o in ct.GetOrigin())}, "
          f"direction {tuple(round(d, 3) for d in ct.GetDirection())}")
    if sitk_geometry_equal(ct, lab_src):
        print("  example_seg_dicom.nii.gz is on the DICOM grid")
        lab = lab_src
    else:
        print(f"  example_seg_dicom.nii.gz grid differs (origin LPS {tuple(round(o, 2) for o in lab_src.GetOrigin())}, "
              f"direction {tuple(round(d, 3) for d in lab_src.GetDirection())}): resampling, nearest neighbour")
        lab = sitk.Resample(lab_src, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab_src.GetPixelID())
        a = sitk.GetArrayViewFromImage(lab_src)
        b = sitk.GetArrayViewFromImage(lab)
        ua, ca = np.unique(a, return_counts=True)
        ub, cb = np.unique(b, return_counts=True)
        if not (np.array_equal(ua, ub) and np.array_equal(ca, cb)):
            print("  warning: resampling changed label voxel counts (grids are not a pure permutation)")
        else:
            print("  resampling kept every label's voxel count (the grids differ by an axis flip/shift only)")
    # NIfTI (RAS) affine of the ITK (LPS) geometry.
    d = np.array(ct.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ d @ np.diag(ct.GetSpacing())
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.array(ct.GetOrigin())
    # ITK arrays are (z, y, x); NIfTI/nibabel arrays are (x, y, z).
    img = sitk.GetArrayFromImage(ct).transpose(2, 1, 0)
    labels = sitk.GetArrayFromImage(lab).transpose(2, 1, 0).astype(np.uint8)
    return img, labels, affine


def world_overlay_check(src: Path, out_lab: Path, lut: np.ndarray):
    """Independent nibabel check: every source label voxel, mapped through both RAS affines,
    lands on a voxel of the written label map with the same (mapped) label."""
    s = nib.load(src)
    o = nib.load(out_lab)
    sd = np.asarray(s.dataobj)
    od = np.asarray(o.dataobj)
    vox = np.argwhere(sd > 0)
    world = nib.affines.apply_affine(s.affine, vox)
    tgt = np.rint(nib.affines.apply_affine(np.linalg.inv(o.affine), world)).astype(int)
    inside = np.all((tgt >= 0) & (tgt < np.array(od.shape)), axis=1)
    hit = od[tuple(tgt[inside].T)] == lut[sd[tuple(vox[inside].T)]]
    frac = inside.mean() * hit.mean() if inside.any() else 0.0
    print(f"  world-space check (nibabel affines): {100 * frac:.2f}% of source label voxels land on "
          f"the same (mapped) label in {out_lab.name}")
    if frac < 0.999:
        raise SystemExit(f"{out_lab.name} does not overlay {src.name} in world space")


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="extracted tests/reference_files")
    ap.add_argument("--sdist", type=Path, required=True, help="totalsegmentator-2.18.0.tar.gz")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    t0 = time.time()
    ref, out = a.reference, a.out
    out.mkdir(parents=True, exist_ok=True)
    maps = read_class_maps(a.sdist)
    total, total_mr = maps["total"], maps["total_mr"]

    img_a, src_lab_a = load_nifti_pair(ref, "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")
    img_b, src_lab_b, aff_b = load_ct_b(ref)
    img_c, src_lab_c = load_nifti_pair(ref, "example_mr_sm.nii.gz", "example_seg_mr.nii.gz")

    present = {"ct_a": ("total", {int(i) for i in np.unique(src_lab_a)} - {0}),
               "ct_b": ("total", {int(i) for i in np.unique(src_lab_b)} - {0}),
               "mr_c": ("total_mr", {int(i) for i in np.unique(src_lab_c)} - {0})}
    common = build_common(maps, present)
    if len(common) > 256:
        raise SystemExit("common label list does not fit uint8")
    lut_ct, lut_mr = lookup(total, "total", common), lookup(total_mr, "total_mr", common)
    print(f"common label list ({len(common) - 1} structures): "
          + ", ".join(f"{i} {n}" for i, n in enumerate(common) if i > 0))

    ct_a = np.clip(np.asarray(img_a.dataobj, np.float32), HU_MIN, HU_MAX)
    save_pair(out, "ct_a", ct_a, lut_ct[src_lab_a], img_a.affine)
    save_pair(out, "ct_b", np.clip(img_b.astype(np.float32), HU_MIN, HU_MAX), lut_ct[src_lab_b], aff_b)
    save_pair(out, "mr_c", np.asarray(img_c.dataobj, np.float32), lut_mr[src_lab_c], img_c.affine)

    info = {}
    modality = {"ct_a": "CT", "ct_b": "CT", "mr_c": "MR"}
    for stem, src_lab, task_map, lut in (("ct_a", src_lab_a, total, lut_ct), ("ct_b", src_lab_b, total, lut_ct),
                                         ("mr_c", src_lab_c, total_mr, lut_mr)):
        img, lab = check_written(out, stem)
        info[stem] = summarise(stem, img, lab, common)
        report_dropped(stem, src_lab, task_map, lut)
        if modality[stem] == "CT":
            hu_check(stem, np.asarray(img.dataobj), np.asarray(lab.dataobj), common)
    world_overlay_check(ref / "example_seg_dicom.nii.gz", out / "ct_b_labels.nii.gz", lut_ct)
    # Original CT A / MR C affines must survive the rewrite.
    for stem, src in (("ct_a", "example_ct.nii.gz"), ("mr_c", "example_mr_sm.nii.gz")):
        if not np.allclose(nib.load(out / f"{stem}.nii.gz").affine, nib.load(ref / src).affine, atol=1e-4):
            raise SystemExit(f"{stem}: affine changed on writing")

    stems = list(info)
    for i, p in enumerate(stems):
        for q in stems[i + 1:]:
            lo = np.maximum(info[p]["bbox"][0], info[q]["bbox"][0])
            hi = np.minimum(info[p]["bbox"][1], info[q]["bbox"][1])
            ov = "empty" if np.any(lo > hi) else "  ".join(
                f"{ax} [{l:.1f}, {h:.1f}]" for ax, l, h in zip("xyz", lo, hi))
            print(f"bbox overlap {p} / {q}: {ov}")

    def f(stem, lab=False):
        return f"./{stem}{'_labels' if lab else ''}.nii.gz"

    pairs = [("ct_a", "ct_b"), ("ct_b", "ct_a"), ("ct_a", "mr_c"), ("mr_c", "ct_a")]
    ds = {
        "name": "obelisk-totalseg",
        "description": "Three example subjects from the TotalSegmentator 2.18.0 sdist "
                       "(tests/reference_files), labels mapped to one common list",
        "licence": "Apache-2.0 (TotalSegmentator, https://github.com/wasserth/TotalSegmentator); "
                   "labels are TotalSegmentator model predictions, not manual annotations",
        "reference": "Wasserthal et al., TotalSegmentator, Radiology: AI 2023, doi:10.1148/ryai.230024",
        "tensorImageSize": {"0": "3D"},
        "modality": {"0": "CT", "1": "MR"},
        "labels": {str(i): n for i, n in enumerate(common)},
        "numTraining": len(stems),
        "training": [{
            "image": f(s), "label": f(s, True), "modality": modality[s],
            "tensorSize": info[s]["shape"], "spacing": info[s]["spacing"],
            "worldBoundingBoxRAS": [list(map(float, info[s]["bbox"][0])), list(map(float, info[s]["bbox"][1]))],
            "labelsPresent": sorted(info[s]["labels"]),
        } for s in stems],
        "numPairs": len(pairs),
        "registration_val": [{"fixed": f(x), "moving": f(y), "fixed_label": f(x, True),
                              "moving_label": f(y, True)} for x, y in pairs],
        "sources": {
            "ct_a": {"image": "example_ct.nii.gz", "label": "example_seg_fast_force_split.nii.gz",
                     "class_map": "total"},
            "ct_b": {"image": "example_ct_dicom/ (20 slices)", "label": "example_seg_dicom.nii.gz",
                     "class_map": "total", "note": "labels resampled nearest-neighbour onto the DICOM grid"},
            "mr_c": {"image": "example_mr_sm.nii.gz", "label": "example_seg_mr.nii.gz", "class_map": "total_mr"},
        },
        "intensity": "CT clipped to [-1024, 2000] HU; all images float32; labels uint8",
    }
    (out / "dataset.json").write_text(json.dumps(ds, indent=2) + "\n")
    print(f"wrote {len(stems)} subjects, {len(pairs)} pairs and dataset.json to {out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
