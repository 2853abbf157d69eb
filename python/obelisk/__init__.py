"""obelisk: deformable medical image registration, from Python.

``obelisk.register(fixed, moving, ...)`` runs the same pipeline as ``obelisk register`` (the Rust
code, not a re-implementation) and returns a :class:`Registration` held in memory.

Conventions (those of SimpleITK, and of the files obelisk writes):

* **Arrays are indexed ``[z, y, x]``**: an image of ``nx × ny × nz`` voxels is a numpy array of
  shape ``(nz, ny, nx)`` (``(ny, nx)`` in 2D), as ``SimpleITK.GetArrayFromImage`` returns it.
  nibabel's arrays are indexed ``[x, y, z]``; nibabel images are transposed on the way in and
  out, so pass them as they are.
* **Geometry is LPS**: ``spacing`` (mm, along x, y, z), ``origin`` (LPS mm: the centre of the
  first voxel) and ``direction`` (3 × 3, its columns the LPS directions of the voxel axes x, y,
  z) are SimpleITK's ``GetSpacing``, ``GetOrigin`` and ``GetDirection``. nibabel's RAS affine is
  converted (``x_lps = -x_ras``, ``y_lps = -y_ras``).
* **The displacement** is an array ``(nz, ny, nx, 3)`` (``(ny, nx, 2)`` in 2D) on the fixed
  grid whose vectors are LPS millimetres ``(x, y, z)``: the fixed point ``p`` maps to the
  moving point ``p + u(p)`` (ITK's convention; exactly what SimpleITK reads from the CLI's
  ``field.nii.gz``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _obelisk

__version__: str = _obelisk.__version__

__all__ = ["Grid", "Image", "Registration", "load_image", "register", "__version__"]

# RAS <-> LPS: x and y change sign
_FLIP = np.diag([-1.0, -1.0, 1.0])

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Grid:
    """Where an image's voxels lie, in SimpleITK's terms.

    ``shape`` is the numpy shape of an image on the grid: ``(nz, ny, nx)``, or ``(ny, nx)`` for
    a 2D image. ``spacing``, ``origin`` and ``direction`` are always three-dimensional (a 2D
    image is one voxel deep along z): spacing in mm along x, y, z; origin in LPS mm; direction
    a 3 × 3 matrix whose columns are the LPS directions of the x, y, z voxel axes.
    """

    shape: Tuple[int, ...]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray = field(repr=False)

    @property
    def is_2d(self) -> bool:
        return len(self.shape) == 2

    @property
    def affine(self) -> np.ndarray:
        """The voxel → RAS world affine (4 × 4), as nibabel's ``img.affine`` (index order i, j, k = x, y, z)."""
        a = np.eye(4)
        a[:3, :3] = _FLIP @ np.asarray(self.direction, dtype=float) @ np.diag(self.spacing)
        a[:3, 3] = _FLIP @ np.asarray(self.origin, dtype=float)
        return a

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: Sequence[int]) -> "Grid":
        """The grid of a voxel → RAS affine and a numpy shape ``(nz, ny, nx)`` (or ``(ny, nx)``)."""
        a = np.asarray(affine, dtype=float)
        lin = a[:3, :3]
        spacing = np.linalg.norm(lin, axis=0)
        direction = _FLIP @ (lin / spacing)
        origin = _FLIP @ a[:3, 3]
        return cls(
            tuple(int(n) for n in shape),
            tuple(float(s) for s in spacing),  # type: ignore[arg-type]
            tuple(float(o) for o in origin),  # type: ignore[arg-type]
            direction,
        )


class Image:
    """A numpy array with its geometry (SimpleITK's conventions, see the module's documentation).

    ``array`` has shape ``(nz, ny, nx)`` or ``(ny, nx)``. ``spacing``, ``origin`` and
    ``direction`` default to 1 mm, the zero point and the identity; in 2D they may have two
    entries (and ``direction`` may be 2 × 2). Or give ``grid`` (e.g. ``result.fixed_grid``).
    """

    def __init__(
        self,
        array: np.ndarray,
        spacing: Optional[Sequence[float]] = None,
        origin: Optional[Sequence[float]] = None,
        direction: Optional[Any] = None,
        *,
        grid: Optional[Grid] = None,
    ) -> None:
        self.array = np.asarray(array)
        if self.array.ndim not in (2, 3):
            raise ValueError(f"an image array has shape (nz, ny, nx) or (ny, nx), got {self.array.shape}")
        if grid is not None:
            if any(v is not None for v in (spacing, origin, direction)):
                raise ValueError("give either grid or spacing/origin/direction, not both")
            if tuple(grid.shape) != self.array.shape:
                raise ValueError(f"the array's shape {self.array.shape} is not the grid's {grid.shape}")
            self.grid = grid
            return
        self.grid = Grid(self.array.shape, *_geometry(spacing, origin, direction))


def _geometry(spacing: Any, origin: Any, direction: Any) -> Tuple[Tuple[float, float, float], Tuple[float, float, float], np.ndarray]:
    """Spacing, origin and direction completed to 3D (a 2D image lies in the plane z = 0)."""
    s = [1.0, 1.0, 1.0] if spacing is None else [float(v) for v in spacing]
    o = [0.0, 0.0, 0.0] if origin is None else [float(v) for v in origin]
    if len(s) == 2:
        s.append(1.0)
    if len(o) == 2:
        o.append(0.0)
    if len(s) != 3 or len(o) != 3:
        raise ValueError(f"spacing and origin have 2 or 3 entries, got {s} and {o}")
    d = np.eye(3)
    if direction is not None:
        m = np.asarray(direction, dtype=float)
        if m.size == 4:
            d[:2, :2] = m.reshape(2, 2)
        elif m.size == 9:
            d = m.reshape(3, 3)
        else:
            raise ValueError(f"direction is a 3 x 3 (or 2 x 2) matrix, got {m.size} values")
    return (s[0], s[1], s[2]), (o[0], o[1], o[2]), d


ImageLike = Any  # a path, Image, numpy array, SimpleITK.Image or nibabel image


def _module(obj: Any) -> str:
    return type(obj).__module__ or ""


def _is_sitk(obj: Any) -> bool:
    return _module(obj).startswith("SimpleITK")


def _is_nibabel(obj: Any) -> bool:
    return _module(obj).startswith("nibabel") and hasattr(obj, "affine") and hasattr(obj, "dataobj")


def _label_array(a: np.ndarray, name: str) -> np.ndarray:
    """A label map as uint32: whole numbers ≥ 0, as obelisk reads label files."""
    if a.dtype.kind == "b":
        return a.astype(np.uint32)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name}: a label map holds whole numbers")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"{name}: a label map holds integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.uint32).max):
        raise ValueError(f"{name}: labels must lie in 0 ..= {np.iinfo(np.uint32).max}")
    return a.astype(np.uint32)


def _to_image(obj: ImageLike, name: str) -> Image:
    """Any in-memory image as an :class:`Image` (array indexed [z, y, x], LPS geometry)."""
    if isinstance(obj, Image):
        return obj
    if isinstance(obj, np.ndarray):
        return Image(obj)
    if _is_sitk(obj):
        import SimpleITK as sitk

        if obj.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{name}: has {obj.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar image")
        if obj.GetDimension() not in (2, 3):
            raise ValueError(f"{name}: is {obj.GetDimension()}D; expected a 2D or 3D image")
        return Image(sitk.GetArrayViewFromImage(obj), obj.GetSpacing(), obj.GetOrigin(), obj.GetDirection())
    if _is_nibabel(obj):
        data = np.asanyarray(obj.dataobj)
        # scaled as nibabel scales it (scl_slope, scl_inter)
        slope, inter = getattr(obj.dataobj, "slope", 1.0), getattr(obj.dataobj, "inter", 0.0)
        if slope != 1.0 or inter != 0.0:
            data = obj.get_fdata(dtype=np.float32)
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim == 2:
            data = data[:, :, None]
        if data.ndim != 3:
            raise ValueError(f"{name}: has shape {data.shape}; expected a 2D or 3D image")
        # nibabel indexes [x, y, z]; obelisk [z, y, x]
        array = np.ascontiguousarray(data.transpose(2, 1, 0))
        grid = Grid.from_affine(obj.affine, array.shape)
        if array.shape[0] == 1:
            array = array[0]
            grid = Grid(array.shape, grid.spacing, grid.origin, grid.direction)
        return Image(array, grid=grid)
    raise TypeError(
        f"{name}: expected a path, obelisk.Image, numpy array, SimpleITK.Image or nibabel image, "
        f"got {type(obj).__name__}"
    )


def _describe(obj: Any, role: str) -> str:
    """The name errors give an in-memory input."""
    if _is_nibabel(obj):
        f = obj.get_filename() if hasattr(obj, "get_filename") else None
        return f"<{role} nibabel image{' ' + f if f else ''}>"
    if _is_sitk(obj):
        return f"<{role} SimpleITK image>"
    return f"<{role} array>"


def _input(obj: ImageLike, role: str, labels: bool = False) -> Any:
    """What the native module takes: a path, or (array [z, y, x], voxel → RAS affine, name)."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    name = _describe(obj, role)
    img = _to_image(obj, name)
    a = img.array
    if a.ndim == 2:
        a = a[None]
    a = _label_array(a, name) if labels else a.astype(np.float32, copy=False)
    return (np.ascontiguousarray(a), img.grid.affine, name)


def _squeeze(a: np.ndarray, grid: Grid) -> np.ndarray:
    return a[0] if grid.is_2d else a


class Registration:
    """A finished registration, held in memory. Made by :func:`register`."""

    def __init__(self, native: Any) -> None:
        self._native = native
        affine, shape = native.fixed_grid
        grid = Grid.from_affine(affine, shape)
        if shape[0] == 1:
            grid = Grid(tuple(shape[1:]), grid.spacing, grid.origin, grid.direction)
        self._grid = grid
        self._metrics: dict = json.loads(native.metrics_json())
        self._displacement: Optional[np.ndarray] = None

    @property
    def displacement(self) -> np.ndarray:
        """The displacement field (float32): shape ``(nz, ny, nx, 3)`` (``(ny, nx, 2)`` in 2D) on
        :attr:`fixed_grid`, vectors ``(x, y, z)`` in LPS mm, fixed → moving (ITK's convention; the
        array of ``field.nii.gz`` as SimpleITK reads it)."""
        if self._displacement is None:
            self._displacement = self._native.displacement
        return self._displacement  # type: ignore[return-value]

    @property
    def fixed_grid(self) -> Grid:
        """The grid of the fixed image, on which the displacement and resampled images lie."""
        return self._grid

    @property
    def affine(self) -> np.ndarray:
        """The affine stage's map (4 × 4, homogeneous): fixed LPS points → moving LPS points."""
        return self._native.affine

    @property
    def warped(self) -> np.ndarray:
        """The moving image resampled onto the fixed grid (linear), indexed [z, y, x]."""
        return _squeeze(self._native.warped, self._grid)

    @property
    def warped_labels(self) -> Optional[np.ndarray]:
        """The moving label map resampled onto the fixed grid (nearest), when one was given."""
        w = self._native.warped_labels
        return None if w is None else _squeeze(w, self._grid)

    @property
    def metrics(self) -> dict:
        """What metrics.json holds (Dice, Jacobian statistics, stages, runtimes, the method's
        configuration); ``out_dir`` is None and ``files`` empty: see :meth:`save`."""
        return self._metrics

    def apply(self, image: ImageLike, interpolation: str = "linear") -> Any:
        """Resamples ``image`` (on any grid; usually the moving image's, or a label map) onto the
        fixed grid through the displacement, as ``obelisk warp --field field.nii.gz`` does.

        ``interpolation`` is ``"linear"`` or ``"nearest"``; an integer image with ``"nearest"``
        is resampled as a label map (``obelisk warp --labels``) and keeps its dtype (a path is
        read as an image: float32). Returns the input's kind: a SimpleITK image, a nibabel image,
        or else a numpy array indexed [z, y, x] (``(ny, nx)`` on a 2D grid).
        """
        if interpolation not in ("linear", "nearest"):
            raise ValueError(f'interpolation must be "linear" or "nearest", got {interpolation!r}')
        dtype = None
        if not isinstance(image, (str, os.PathLike)):
            img = _to_image(image, _describe(image, "apply"))
            dtype = img.array.dtype
            labels = (
                interpolation == "nearest"
                and dtype.kind in "iub"
                and (img.array.size == 0 or (img.array.min() >= 0 and img.array.max() <= np.iinfo(np.uint32).max))
            )
            out = self._native.apply(_input(img, "apply", labels), interpolation, labels)
            if labels:
                out = out.astype(dtype)
        else:
            out = self._native.apply(os.fspath(image), interpolation, False)
        out = _squeeze(out, self._grid)
        if _is_sitk(image):
            import SimpleITK as sitk

            result = sitk.GetImageFromArray(out)
            g, d = self._grid, 2 if self._grid.is_2d else 3
            result.SetSpacing(g.spacing[:d])
            result.SetOrigin(g.origin[:d])
            result.SetDirection(tuple(np.asarray(g.direction)[:d, :d].ravel()))
            return result
        if _is_nibabel(image):
            import nibabel as nib

            xyz = out.transpose(1, 0)[:, :, None] if out.ndim == 2 else out.transpose(2, 1, 0)
            return nib.Nifti1Image(np.ascontiguousarray(xyz), self._grid.affine)
        return out

    def save(self, folder: PathLike, force: bool = False) -> dict:
        """Writes the files of ``obelisk register --out folder`` (field.nii.gz, affine.tfm,
        affine.mat, transform.h5, field_deformable.nii.gz, warped.nii.gz, warped_labels.nii.gz
        with moving labels, inverse_field.nii.gz with ``inverse=True``, loss.csv, summary.png
        unless ``pictures=False``, metrics.json). Existing outputs are kept unless ``force``;
        an input is never overwritten. Returns the metrics.json written."""
        return json.loads(self._native.save(os.fspath(folder), force))

    def __repr__(self) -> str:
        d = self._metrics.get("metrics", {})
        return (
            f"<obelisk.Registration fixed grid {self._grid.shape}, folding "
            f"{100 * d.get('folding_fraction', float('nan')):.3f}%, mean Dice {d.get('mean_dice')}>"
        )


def load_image(path: PathLike) -> Image:
    """Reads an image file (NIfTI, PNG, NRRD, MetaImage or a DICOM folder) as obelisk reads it."""
    array, affine = _obelisk.read_image(os.fspath(path))
    grid = Grid.from_affine(affine, array.shape)
    if array.shape[0] == 1:
        array = array[0]
        grid = Grid(array.shape, grid.spacing, grid.origin, grid.direction)
    return Image(array, grid=grid)


_CONFLICT_WITH_METHOD = ("smoothness", "diffusion", "affine_iterations", "discrete_radius")


def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    features: str = "mind",
    fixed_labels: Optional[ImageLike] = None,
    moving_labels: Optional[ImageLike] = None,
    fixed_mask: Optional[ImageLike] = None,
    moving_mask: Optional[ImageLike] = None,
    truth: Optional[PathLike] = None,
    model: Optional[PathLike] = None,
    method: Union[None, PathLike, Mapping[str, Any]] = None,
    init: Optional[str] = None,
    similarity: Optional[str] = None,
    ncc_radius: int = 2,
    smoothness: Optional[float] = None,
    diffusion: Optional[float] = None,
    affine_iterations: Optional[int] = None,
    iterations: Optional[int] = None,
    displacement: bool = False,
    exact: bool = False,
    discrete_radius: Optional[int] = None,
    inverse: bool = False,
    pictures: bool = True,
    slice: str = "axial",
    max_memory: Union[None, int, str] = None,
    threads: Optional[int] = None,
    seed: Optional[int] = None,
) -> Registration:
    """Registers ``moving`` to ``fixed`` with the pipeline of ``obelisk register``.

    Images (and label maps, masks) are paths (any format the CLI reads), :class:`Image`, numpy
    arrays indexed [z, y, x] (1 mm voxels at the origin; use :class:`Image` for geometry),
    ``SimpleITK.Image`` or nibabel images. The options are the CLI's, named after its flags
    (``obelisk register --help``): ``features`` ("mind", "intensity", "obelisk"), ``method`` (a
    dict of the method's configuration, as metrics.json records it under ``config``, or a JSON
    file like ``--method``), ``init`` ("search", "none", "centre", "labels", ...),
    ``similarity`` ("auto", the default with MIND-SSC features; "l1", "ncc", "l1+ncc"),
    ``inverse`` (also compute the inverse field),
    ``pictures``/``slice`` (summary.png, drawn by :meth:`Registration.save`), ``max_memory``
    (bytes or "8G"). ``threads``: worker threads of this call (default: all cores); the GIL is
    released while it runs. ``seed`` is accepted as the CLI's global ``--seed`` is:
    registration draws no random numbers, so results are the same with any seed.

    Errors raise ``FileNotFoundError``/``OSError`` (files) or ``ValueError`` (values, file
    contents) with obelisk's message, which names the file or input concerned.
    """
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    given = {"smoothness": smoothness, "diffusion": diffusion, "affine_iterations": affine_iterations, "discrete_radius": discrete_radius}
    if method is not None:
        clash = [k for k in _CONFLICT_WITH_METHOD if given[k] is not None]
        if clash:
            raise ValueError(f"method sets the method's parameters; {', '.join(clash)} cannot be given with it")
        if isinstance(method, Mapping):
            method_arg = (json.dumps(dict(method)), "<method dict>")
        else:
            with open(os.fspath(method), encoding="utf-8") as f:
                method_arg = (f.read(), os.fspath(method))
    else:
        method_arg = None
    inputs = {
        "fixed": _input(fixed, "fixed"),
        "moving": _input(moving, "moving"),
        "fixed_labels": None if fixed_labels is None else _input(fixed_labels, "fixed_labels", labels=True),
        "moving_labels": None if moving_labels is None else _input(moving_labels, "moving_labels", labels=True),
        "fixed_mask": None if fixed_mask is None else _input(fixed_mask, "fixed_mask"),
        "moving_mask": None if moving_mask is None else _input(moving_mask, "moving_mask"),
        "truth": None if truth is None else os.fspath(truth),
    }
    options = {
        "features": features,
        "model": None if model is None else os.fspath(model),
        "method": method_arg,
        "init": init,
        "similarity": similarity,
        "ncc_radius": ncc_radius,
        "smoothness": smoothness,
        "diffusion": diffusion,
        "affine_iterations": affine_iterations,
        "iterations": iterations,
        "displacement": displacement,
        "exact": exact,
        "discrete_radius": discrete_radius,
        "inverse": inverse,
        "pictures": pictures,
        "slice": slice,
        "max_memory": None if max_memory is None else str(max_memory),
    }
    return Registration(_obelisk.register(inputs, options, threads))
