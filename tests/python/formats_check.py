"""SimpleITK side of the image format checks (driven by tests/formats.rs).

Commands:
  make-images DIR           an oblique, anisotropic 3D image (and a 2D one) written by SimpleITK in
                            every NRRD and MetaImage flavour; DIR/truth.json holds, per file, the
                            geometry and voxels SimpleITK reads back
  info PATH OUT_JSON        what SimpleITK reads from PATH: geometry (LPS), size, components, voxels
  make-dicom DIR NII JSON   a DICOM series (int16, rescaled, oblique) in DIR; what SimpleITK's
                            ImageSeriesReader makes of it, as NIfTI (NII) and geometry (JSON)

Voxels are listed with x fastest (NIfTI/obelisk order), vector components innermost.
"""
import json
import os
import sys

import numpy as np
import SimpleITK as sitk


def describe(img):
    a = sitk.GetArrayFromImage(img)
    return {
        "size": list(img.GetSize()),
        "origin": list(img.GetOrigin()),
        "spacing": list(img.GetSpacing()),
        "direction": list(img.GetDirection()),
        "components": img.GetNumberOfComponentsPerPixel(),
        "pixel_type": img.GetPixelIDTypeAsString(),
        "values": a.astype(np.float64).ravel().tolist(),
    }


def oblique(shape_zyx, spacing, origin, dtype, seed):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        a = rng.normal(100.0, 50.0, size=shape_zyx).astype(dtype)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(max(info.min, -30000), min(info.max, 30000), size=shape_zyx).astype(dtype)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if len(spacing) == 3:
        r = sitk.VersorRigid3DTransform()
        r.SetRotation((0.3, -0.5, 0.8), 0.6)
        img.SetDirection(r.GetMatrix())
    else:
        c, s = np.cos(0.4), np.sin(0.4)
        img.SetDirection((c, -s, s, c))
    return img


def make_images(out):
    img = oblique((6, 9, 11), (0.7, 1.3, 2.4), (-20.5, 13.25, 41.0), np.int16, 1)
    files = {
        "raw.nrrd": (img, False),
        "gz.nrrd": (img, True),
        "raw.nhdr": (img, False),
        "gz.nhdr": (img, True),
        "raw.mha": (img, False),
        "z.mha": (img, True),
        "raw.mhd": (img, False),
        "z.mhd": (img, True),
        "f64.nrrd": (oblique((5, 4, 3), (1.1, 0.6, 3.0), (1.0, 2.0, 3.0), np.float64, 2), True),
        "u16.mha": (oblique((5, 4, 3), (1.1, 0.6, 3.0), (1.0, 2.0, 3.0), np.uint16, 3), True),
        "u8_2d.nrrd": (oblique((7, 8), (0.5, 0.8), (3.0, -4.0), np.uint8, 4), True),
        "f32_2d.mha": (oblique((7, 8), (0.5, 0.8), (3.0, -4.0), np.float32, 5), False),
    }
    truth = {}
    for name, (im, compress) in files.items():
        path = os.path.join(out, name)
        sitk.WriteImage(im, path, useCompression=compress)
        truth[name] = describe(sitk.ReadImage(path))
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump(truth, f)


def info(path, out_json):
    with open(out_json, "w") as f:
        json.dump(describe(sitk.ReadImage(path)), f)


def dicom_series(out):
    os.makedirs(out, exist_ok=True)
    img = oblique((5, 6, 7), (0.7, 0.9, 2.5), (-20.5, 13.25, 40.0), np.int16, 7)
    arr = sitk.GetArrayFromImage(img)
    d = np.array(img.GetDirection()).reshape(3, 3)
    sp, org = img.GetSpacing(), np.array(img.GetOrigin())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    ds = lambda v: "\\".join(repr(float(x)) for x in v)
    for k in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(arr[k])
        sl.SetSpacing(sp[:2])
        tags = {
            "0008|0060": "CT",
            "0008|0008": "DERIVED\\SECONDARY",
            "0020|000e": series_uid,
            "0008|103e": "obelisk formats test",
            "0020|0037": ds((d[0, 0], d[1, 0], d[2, 0], d[0, 1], d[1, 1], d[2, 1])),
            "0020|0032": ds(org + d[:, 2] * sp[2] * k),
            "0020|0013": str(k + 1),
            "0028|0030": ds((sp[1], sp[0])),
            "0018|0050": repr(sp[2]),
            "0028|1053": "2",
            "0028|1052": "-100",
        }
        for t, v in tags.items():
            sl.SetMetaData(t, v)
        # file names out of slice order, so that sorting is tested
        writer.SetFileName(os.path.join(out, f"IM{(k * 3) % arr.shape[0]:04d}.dcm"))
        writer.Execute(sl)


def read_series(folder):
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(folder))
    return r.Execute()


def make_dicom(out, nii, out_json):
    dicom_series(out)
    img = read_series(out)
    sitk.WriteImage(sitk.Cast(img, sitk.sitkFloat32), nii)
    with open(out_json, "w") as f:
        json.dump(describe(img), f)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "make-images": make_images,
        "info": info,
        "make-dicom": make_dicom,
    }[cmd](*args)
