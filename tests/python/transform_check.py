"""SimpleITK side of obelisk's transform-file checks (driven by tests/transforms.rs).

Commands:
  resample MOVING REF TRANSFORM OUT   sitk.ReadTransform(TRANSFORM), then Resample(moving, ref,
                                      transform, linear, 0)
  info TRANSFORM OUT_JSON             what SimpleITK reads: name, parameters, fixed parameters
                                      of every transform (a composite flattened)
  map TRANSFORM POINTS_JSON OUT_JSON  sitk's TransformPoint of each [x, y, z] (LPS)
  write-affine OUT DIM                SimpleITK writes an AffineTransform with a centre (.tfm/.mat)
  resample-field MOVING REF FIELD OUT  the same through a displacement field image
"""
import json
import sys

import SimpleITK as sitk


def resample(moving_path, ref_path, transform_path, out_path):
    moving = sitk.ReadImage(moving_path, sitk.sitkFloat32)
    ref = sitk.ReadImage(ref_path)
    tx = sitk.ReadTransform(transform_path)
    out = sitk.Resample(moving, ref, tx, sitk.sitkLinear, 0.0)
    sitk.WriteImage(out, out_path)


def resample_field(moving_path, ref_path, field_path, out_path):
    moving = sitk.ReadImage(moving_path, sitk.sitkFloat32)
    ref = sitk.ReadImage(ref_path)
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage(field_path, sitk.sitkVectorFloat64))
    sitk.WriteImage(sitk.Resample(moving, ref, tx, sitk.sitkLinear, 0.0), out_path)


def flatten(tx):
    if tx.GetName() == "CompositeTransform":
        c = sitk.CompositeTransform(tx)
        return [t for i in range(c.GetNumberOfTransforms()) for t in flatten(c.GetNthTransform(i))]
    return [tx]


def info(transform_path, out_json):
    tx = sitk.ReadTransform(transform_path)
    items = [
        {"name": t.GetName(), "parameters": list(t.GetParameters()), "fixed": list(t.GetFixedParameters())}
        for t in flatten(tx)
    ]
    with open(out_json, "w") as f:
        json.dump(items, f)


def map_points(transform_path, points_json, out_json):
    tx = sitk.ReadTransform(transform_path)
    with open(points_json) as f:
        pts = json.load(f)
    dim = tx.GetDimension()
    out = [list(tx.TransformPoint([float(v) for v in p[:dim]])) for p in pts]
    with open(out_json, "w") as f:
        json.dump(out, f)


def write_affine(out_path, dim):
    dim = int(dim)
    tx = sitk.AffineTransform(dim)
    if dim == 3:
        tx.SetMatrix([1.05, 0.1, -0.05, -0.08, 0.95, 0.12, 0.04, -0.1, 1.1])
        tx.SetCenter([3.0, -6.0, 2.0])
        tx.SetTranslation([2.5, -1.5, 3.0])
    else:
        tx.SetMatrix([1.05, 0.12, -0.1, 0.93])
        tx.SetCenter([3.0, -6.0])
        tx.SetTranslation([2.5, -1.5])
    sitk.WriteTransform(tx, out_path)


COMMANDS = {"resample": resample, "resample-field": resample_field, "info": info, "map": map_points, "write-affine": write_affine}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
