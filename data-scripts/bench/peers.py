#!/usr/bin/env python3
"""Runs one peer registration tool on one pair and writes its result as an ITK displacement field.

    python peers.py TOOL --fixed F.nii.gz --moving M.nii.gz --out field.nii.gz [--threads 2]
                         [--init-translation TX,TY,TZ]

TOOL: ants-syn | elastix-bspline | sitk-demons | sitk-bspline | convexadam.

2D images (NIfTI with dim[0] = 2, e.g. the 2D pairs of data/corpus) register in 2D with every tool
except convexadam, which handles 3D volumes only (it exits with an error naming that); the field
is then [X, Y, 1, 1, 2] and --init-translation's z is ignored.

--init-translation: start from this translation (LPS mm, ITK convention: the fixed point x maps to
the moving point x + t) instead of the tool's own initialisation (centre of mass or geometric
centre); run_bench.py --start labels passes the translation that lines up the shared label maps.
Each tool's global stage (affine) then starts from it, and the written field is still the whole
transform from the fixed grid to the original moving image.

The field is written in the ITK convention (on the fixed grid, LPS millimetres,
warped(x) = moving(x + u(x))), so `obelisk warp` and `obelisk eval` treat every tool alike.
Prints one JSON line on stdout: {"tool", "register_s", "versions"}. `register_s` is the time of
the registration call alone; the caller measures the wall time and peak RSS of this process.

Each tool runs in its own process (started by run_bench.py), so the thread settings below are in
place before any library starts its thread pool and one tool's memory does not count for another.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ["ants-syn", "elastix-bspline", "sitk-demons", "sitk-bspline", "convexadam"]


def set_threads(n):
    # must happen before numpy/ITK/torch are imported: their pools read these once
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(n)
    # busy-waiting OpenMP workers slow torch down badly on a shared machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("ANTS_RANDOM_SEED", "1")


def to_itk_field(transform, fixed, sitk):
    """Samples a SimpleITK transform on the fixed grid as a displacement field (ITK convention)."""
    conv = sitk.TransformToDisplacementFieldFilter()
    conv.SetReferenceImage(fixed)
    conv.SetOutputPixelType(sitk.sitkVectorFloat64)
    return sitk.Cast(conv.Execute(transform), sitk.sitkVectorFloat32)


def translation_affine(fixed, t, sitk):
    """x -> x + t as an affine transform centred on the fixed image (the centre of rotation that
    CenteredTransformInitializer would choose), so the optimiser's scales are the usual ones."""
    a = sitk.AffineTransform(fixed.GetDimension())
    size = fixed.GetSize()
    a.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in size]))
    a.SetTranslation([float(v) for v in t][:fixed.GetDimension()])
    return a


def affine_init(fixed, moving, sitk, threads, start=None):
    """The usual SimpleITK recipe for tools without a global stage of their own: centre the
    geometries (or start from the translation `start`), then a multi-resolution affine
    registration with Mattes mutual information."""
    if start is None:
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(fixed.GetDimension()),
                                                 sitk.CenteredTransformInitializerFilter.GEOMETRY)
    else:
        init = translation_affine(fixed, start, sitk)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(threads)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


def on_fixed_grid(fixed, moving, transform, sitk):
    return sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def coverage_mask(fixed_path, moving_path, start):
    """uint8 array (z, y, x) on the fixed grid: 1 where x + start lies inside the moving image."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    moving = sitk.ReadImage(moving_path, sitk.sitkFloat32)
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    dim = fixed.GetDimension()
    shift = sitk.TranslationTransform(dim, [float(v) for v in start][:dim])
    cover = sitk.Resample(ones, fixed, shift, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(cover)


def run_ants(fixed_path, moving_path, threads, start=None):
    import tempfile

    import ants
    import SimpleITK as sitk

    f, m = ants.image_read(fixed_path), ants.image_read(moving_path)
    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    tmp = tempfile.TemporaryDirectory(prefix="peers_ants_")
    initial = None
    if start is not None:
        # antsRegistration -r FILE: an ITK transform file in ANTs' own convention, which is ITK's
        # (physical LPS space, fixed point -> moving point); the affine stage starts from it and,
        # with ANTsPy's --collapse-output-transforms 1, the written affine includes it
        initial = os.path.join(tmp.name, "start.mat")
        sitk.WriteTransform(translation_affine(fixed, start, sitk), initial)
    t = time.perf_counter()
    # SyN = affine (from a centre-of-mass start, or from `start`) + symmetric normalisation,
    # ANTsPy's defaults
    r = ants.registration(fixed=f, moving=m, type_of_transform="SyN", random_seed=1,
                          initial_transform=[initial] if initial else None)
    seconds = time.perf_counter() - t
    # ANTs lists the transforms as [Warp, Affine] and applies them to a point as Affine(Warp(x));
    # ITK's composite applies the transform added last first, so the list goes in reversed
    comp = sitk.CompositeTransform(fixed.GetDimension())
    for path in reversed(r["fwdtransforms"]):
        if path.endswith((".nii", ".nii.gz")):
            comp.AddTransform(sitk.DisplacementFieldTransform(sitk.ReadImage(path, sitk.sitkVectorFloat64)))
        else:
            comp.AddTransform(sitk.ReadTransform(path))
    field = to_itk_field(comp, fixed, sitk)
    tmp.cleanup()
    return field, seconds, {"antspyx": ants.__version__}


def elastix_log_reason(log):
    """The 'Description:' of the exception elastix wrote to its log, without ITK's prefix."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    reasons = [ln.split("Description:", 1)[1].strip() for ln in lines if "Description:" in ln]
    return reasons[-1].split("): ", 1)[-1] if reasons else None


def run_elastix(fixed_path, moving_path, threads, start=None):
    import itk
    import numpy as np
    import SimpleITK as sitk

    f = itk.imread(fixed_path, itk.F)
    m = itk.imread(moving_path, itk.F)
    po = itk.ParameterObject.New()
    affine = po.GetDefaultParameterMap("affine")
    if start is None:
        affine["AutomaticTransformInitialization"] = ["true"]
        affine["AutomaticTransformInitializationMethod"] = ["GeometricalCenter"]
    else:
        # a translation is exact as a header change: the moving image with its origin moved by
        # -t satisfies M'(y) = M(y + t), so elastix registers F to M' from the identity (no
        # automatic initialisation) and t is added to the field it returns
        # zip stops at the image's dimension: a 2D image ignores the z of the start
        m.SetOrigin([o - float(v) for o, v in zip(m.GetOrigin(), start)])
        affine["AutomaticTransformInitialization"] = ["false"]
        # elastix stops when fewer than a quarter of its samples land inside the moving image,
        # which a thin slab inside a large fixed image never reaches; so it samples the fixed
        # image only where the (shifted) moving image covers it at the start: the part that the
        # other tools' metrics see as well (they skip samples outside the moving image)
        fixed_mask = coverage_mask(fixed_path, moving_path, start)
    bspline = po.GetDefaultParameterMap("bspline")
    if start is not None:
        # elastix erodes the mask at each pyramid level by default, which wipes out a slab a few
        # voxels thick at the coarse levels ("no valid voxels")
        for pm in (affine, bspline):
            pm["ErodeMask"] = ["false"]
    po.AddParameterMap(affine)
    po.AddParameterMap(bspline)
    t = time.perf_counter()
    # threads come from ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS: number_of_threads > 1 on the
    # default B-spline map crashed itk-elastix here
    masks = {}
    if start is not None:
        mask = itk.image_from_array(fixed_mask)
        mask.SetOrigin(f.GetOrigin())
        mask.SetSpacing(f.GetSpacing())
        mask.SetDirection(f.GetDirection())
        masks["fixed_mask"] = mask
    with tempfile.TemporaryDirectory() as logdir:
        try:
            _, params = itk.elastix_registration_method(f, m, parameter_object=po, log_to_file=True,
                                                        output_directory=logdir, **masks)
        except Exception as e:  # noqa: BLE001 (itk raises plain RuntimeError or its own types)
            # itk-elastix's own message only points at its log: the reason is in there
            raise RuntimeError(f"elastix: {elastix_log_reason(Path(logdir) / 'elastix.log') or e}") from None
    field = itk.transformix_deformation_field(m, params)
    seconds = time.perf_counter() - t
    arr = np.asarray(itk.array_from_image(field), dtype=np.float32)  # (z, y, x, 3) or (y, x, 2), LPS mm
    if start is not None:
        arr = arr + np.asarray(start, np.float32)[:arr.shape[-1]]
    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    out = sitk.GetImageFromArray(arr, isVector=True)
    out.CopyInformation(fixed)
    from importlib.metadata import version

    return out, seconds, {"itk-elastix": version("itk-elastix")}


def run_sitk_demons(fixed_path, moving_path, threads, start=None):
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    moving = sitk.ReadImage(moving_path, sitk.sitkFloat32)
    t = time.perf_counter()
    init = affine_init(fixed, moving, sitk, threads, start)
    moved = on_fixed_grid(fixed, moving, init, sitk)
    moved = sitk.HistogramMatching(moved, fixed, numberOfHistogramLevels=256, numberOfMatchPoints=7,
                                   thresholdAtMeanIntensity=True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetStandardDeviations(1.5)
    demons.SetSmoothDisplacementField(True)
    # coarse to fine: each level starts from the previous field, resampled
    field = None
    dim = fixed.GetDimension()
    for shrink, iters in ((4, 40), (2, 30), (1, 20)):
        fs = sitk.Shrink(fixed, [shrink] * dim) if shrink > 1 else fixed
        ms = sitk.Shrink(moved, [shrink] * dim) if shrink > 1 else moved
        if field is not None:
            field = sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        demons.SetNumberOfIterations(iters)
        field = demons.Execute(fs, ms) if field is None else demons.Execute(fs, ms, field)
    seconds = time.perf_counter() - t
    comp = sitk.CompositeTransform(dim)
    comp.AddTransform(init)
    comp.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
    return to_itk_field(comp, fixed, sitk), seconds, {"SimpleITK": sitk.Version_VersionString()}


def run_sitk_bspline(fixed_path, moving_path, threads, start=None):
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    moving = sitk.ReadImage(moving_path, sitk.sitkFloat32)
    t = time.perf_counter()
    init = affine_init(fixed, moving, sitk, threads, start)
    # control points about every 40 mm
    extent = [n * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, int(round(e / 40.0))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(threads)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
                             costFunctionConvergenceFactor=1e7)
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetMovingInitialTransform(init)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(fixed, moving)
    seconds = time.perf_counter() - t
    # the moving initial transform acts after the optimised one: x -> init(bspline(x))
    comp = sitk.CompositeTransform(fixed.GetDimension())
    comp.AddTransform(init)
    comp.AddTransform(bspline)
    return to_itk_field(comp, fixed, sitk), seconds, {"SimpleITK": sitk.Version_VersionString()}


def run_convexadam(fixed_path, moving_path, threads, start=None):
    import numpy as np
    import SimpleITK as sitk
    import torch
    from importlib.metadata import version

    torch.set_num_threads(threads)
    from convexAdam.convex_adam_MIND import convex_adam_pt

    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    moving = sitk.ReadImage(moving_path, sitk.sitkFloat32)
    if fixed.GetDimension() != 3:
        raise RuntimeError("convexAdam registers 3D volumes only; this pair is 2D")
    t = time.perf_counter()
    # convexAdam needs both images on one grid: the same affine start as the SimpleITK tools;
    # the affine goes back into the written field below, so it maps to the original moving image
    init = affine_init(fixed, moving, sitk, threads, start)
    moved = on_fixed_grid(fixed, moving, init, sitk)
    # convexAdam indexes arrays like nibabel (i, j, k); SimpleITK arrays are (k, j, i)
    f_arr = np.ascontiguousarray(sitk.GetArrayFromImage(fixed).transpose(2, 1, 0))
    m_arr = np.ascontiguousarray(sitk.GetArrayFromImage(moved).transpose(2, 1, 0))
    disp = convex_adam_pt(f_arr, m_arr, device=torch.device("cpu"), dtype=torch.float32)
    seconds = time.perf_counter() - t
    # voxel units along (i, j, k) -> LPS mm: ITK direction matrix times spacing
    d = np.array(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    mm = disp.astype(np.float64) @ d.T  # (i, j, k, 3)
    field = sitk.GetImageFromArray(mm.transpose(2, 1, 0, 3), isVector=True)
    field.CopyInformation(fixed)
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(init)
    comp.AddTransform(sitk.DisplacementFieldTransform(field))
    return to_itk_field(comp, fixed, sitk), seconds, {"convexAdam": version("convexAdam"), "torch": torch.__version__}


RUNNERS = {
    "ants-syn": run_ants,
    "elastix-bspline": run_elastix,
    "sitk-demons": run_sitk_demons,
    "sitk-bspline": run_sitk_bspline,
    "convexadam": run_convexadam,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tool", choices=TOOLS)
    ap.add_argument("--fixed", required=True)
    ap.add_argument("--moving", required=True)
    ap.add_argument("--out", required=True, help="displacement field to write (.nii.gz)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init-translation", metavar="TX,TY,TZ",
                    help="start translation (LPS mm, fixed point x -> moving point x + t) instead of the "
                         "tool's own initialisation")
    a = ap.parse_args()
    start = None
    if a.init_translation:
        try:
            start = [float(v) for v in a.init_translation.split(",")]
        except ValueError:
            start = []
        if len(start) != 3 or not all(map(math.isfinite, start)):
            sys.exit(f"--init-translation: expected three finite numbers TX,TY,TZ, got {a.init_translation!r}")
    set_threads(a.threads)
    for p in (a.fixed, a.moving):
        if not os.path.isfile(p):
            sys.exit(f"{p}: file not found")
    if os.path.exists(a.out):
        sys.exit(f"{a.out}: exists; refusing to overwrite")
    field, seconds, versions = RUNNERS[a.tool](a.fixed, a.moving, a.threads, start=start)
    import SimpleITK as sitk

    tmp = a.out + ".part.nii.gz"
    sitk.WriteImage(field, tmp)
    os.replace(tmp, a.out)
    print(json.dumps({"tool": a.tool, "register_s": seconds, "versions": versions}))


if __name__ == "__main__":
    main()
