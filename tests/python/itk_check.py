"""SimpleITK / nibabel side of obelisk's cross-checks (driven by tests/itk_compat.rs).

Commands:
  make-field REF OUT SEED AMP      smooth random ITK displacement field (LPS mm) on REF's grid
  resample MOVING REF FIELD OUT    SimpleITK: Resample(moving, ref, DisplacementFieldTransform, linear, 0)
  resample-labels MOVING REF FIELD OUT   the same with nearest-neighbour interpolation (label maps)
  nib-info PATH OUT_JSON           what nibabel reads: affine, shape, data (Fortran order), form codes
  nib-summary PATH OUT_JSON        what nibabel reads, summarised: affine, shape, dtype, sum, voxel counts
  nib-make PATH OUT_JSON [<|>]     nibabel writes an oblique int16 image with scl_slope/inter
"""
import json
import sys

import nibabel as nib
import numpy as np
import SimpleITK as sitk


def physical_points(img):
    """LPS coordinates of every voxel centre, shaped like GetArrayFromImage (z, y, x, dim)."""
    dim = img.GetDimension()
    size = img.GetSize()
    idx = np.meshgrid(*[np.arange(s) for s in reversed(size)], indexing="ij")  # (z,)y,x order
    idx = np.stack([i for i in reversed(idx)], axis=-1).astype(np.float64)  # components x,y(,z)
    d = np.array(img.GetDirection()).reshape(dim, dim)
    sp = np.array(img.GetSpacing())
    o = np.array(img.GetOrigin())
    return idx * sp @ d.T + o


def make_field(ref_path, out_path, seed, amp):
    ref = sitk.ReadImage(ref_path)
    dim = ref.GetDimension()
    rng = np.random.default_rng(int(seed))
    p = physical_points(ref)
    u = np.zeros(p.shape, np.float64)
    # a few random plane waves per component: smooth, non-affine, several mm
    for c in range(dim):
        for _ in range(3):
            k = rng.normal(size=dim) * 0.08
            u[..., c] += float(amp) / 3 * np.sin(p @ k + rng.uniform(0, 2 * np.pi))
    field = sitk.GetImageFromArray(u.astype(np.float32), isVector=True)
    field.CopyInformation(ref)
    sitk.WriteImage(field, out_path)


def resample(moving_path, ref_path, field_path, out_path, labels=False):
    moving = sitk.ReadImage(moving_path, sitk.sitkUInt8 if labels else sitk.sitkFloat32)
    ref = sitk.ReadImage(ref_path)
    field = sitk.ReadImage(field_path, sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(field)
    out = sitk.Resample(moving, ref, tx, sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0)
    sitk.WriteImage(out, out_path)


def resample_labels(moving_path, ref_path, field_path, out_path):
    resample(moving_path, ref_path, field_path, out_path, labels=True)


def nib_summary(path, out_json):
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    values, counts = np.unique(data, return_counts=True) if data.dtype.kind in "iu" else ([], [])
    info = {
        "affine": img.affine.tolist(),
        "shape": list(data.shape),
        "dtype": str(data.dtype),
        "sum": float(data.astype(np.float64).sum()),
        "counts": {str(int(v)): int(c) for v, c in zip(values, counts)},
    }
    with open(out_json, "w") as f:
        json.dump(info, f)


def nib_info(path, out_json):
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float64)
    info = {
        "affine": img.affine.tolist(),
        "shape": list(data.shape),
        "data": data.ravel(order="F").tolist(),
        "sform_code": int(img.header["sform_code"]),
        "qform_code": int(img.header["qform_code"]),
    }
    with open(out_json, "w") as f:
        json.dump(info, f)


def nib_make(path, out_json, endianness="<"):
    rng = np.random.default_rng(7)
    data = rng.integers(-300, 300, size=(7, 6, 5)).astype(np.int16)
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.array([[0.9 * c, -1.3 * s, 0, -20.0], [0.9 * s, 1.3 * c, 0, 15.0], [0, 0, -2.4, 30.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine, header=nib.Nifti1Header(endianness=endianness))
    img.header.set_slope_inter(0.5, 10.0)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(None, code=0)  # the reader must decode the qform (qfac = -1 here)
    nib.save(img, path)
    back = nib.load(path)
    info = {"affine": back.affine.tolist(), "data": back.get_fdata().ravel(order="F").tolist()}
    with open(out_json, "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "make-field": make_field,
        "resample": resample,
        "resample-labels": resample_labels,
        "nib-info": nib_info,
        "nib-summary": nib_summary,
        "nib-make": nib_make,
    }[cmd](*args)
