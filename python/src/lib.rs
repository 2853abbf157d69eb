//! `obelisk._obelisk`: the native half of the Python package. It turns what Python hands over
//! (paths, or arrays with their voxel → RAS affine) into the application crate's
//! [`RegisterJob`] and runs the same pipeline as `obelisk register`; the conversions from
//! SimpleITK and nibabel objects and the public API live in `obelisk/__init__.py`.
//!
//! Arrays cross in the layout of the Rust volumes, which is numpy's C order for shape
//! `(nz, ny, nx)` (SimpleITK's `GetArrayFromImage` order): no transposition on either side.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use numpy::ndarray::{Array3, Array4};
use numpy::{IntoPyArray, PyArray2, PyArray3, PyReadonlyArray2, PyReadonlyArray3};
use obelisk::cli::register::{check_memory, check_pair, parse_method, RegOptions, SimilarityKind};
use obelisk::cli::validate::{check_input, mask_for, prepare_out_dir};
use obelisk::io::{self, atomic::check_output, IoError};
use obelisk::pictures::SliceSpec;
use obelisk::pipeline::{FeatureKind, RegisterJob, Registered};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use registration::method::{silent, Start};
use registration::warp::{warp_labels, warp_volume, Interpolation, Padding};
use registration::{DisplacementField, Grid, Labels, Volume};

/// An image, label map or mask as Python hands it over: a file, or `(array, affine, name)`
/// with the array in `(nz, ny, nx)` order, the voxel → RAS affine and the name errors give it.
#[derive(FromPyObject)]
enum Input<'py> {
    Path(PathBuf),
    Array(Bound<'py, PyAny>, PyReadonlyArray2<'py, f64>, String),
}

/// An [`Input`] read into memory, with its name.
struct Named<T> {
    name: PathBuf,
    value: T,
}

/// The Rust error as a Python exception, with the whole chain of causes in one line as the CLI
/// prints it: a missing file is `FileNotFoundError`, other failures of the operating system
/// `OSError`, everything else (bad values, unreadable file contents) `ValueError`.
fn to_py(e: anyhow::Error) -> PyErr {
    let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
    let missing = e.chain().any(|c| c.downcast_ref::<IoError>().is_some_and(|io| io.msg == "file not found"));
    if missing {
        PyFileNotFoundError::new_err(msg)
    } else if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some()) {
        PyOSError::new_err(msg)
    } else {
        PyValueError::new_err(msg)
    }
}

/// Runs `f` without the GIL (other Python threads run meanwhile) on `threads` worker threads
/// (a pool of its own; `None`: rayon's global pool, one thread per core), on one of the pool's
/// own threads so that its parallel loops are shared in place rather than handed across
/// threads. A panic becomes a `RuntimeError` instead of unwinding into the interpreter.
fn compute<T: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> PyResult<T> {
    let result = py.detach(move || {
        catch_unwind(AssertUnwindSafe(|| match threads {
            Some(n) => rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| anyhow::anyhow!("cannot set up {n} threads: {e}"))?
                .install(f),
            None => rayon::scope(|_| f()),
        }))
    });
    match result {
        Ok(r) => r.map_err(to_py),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(PyRuntimeError::new_err(format!("obelisk failed internally (a bug; please report it): {what}")))
        }
    }
}

/// The grid of an array of shape `(nz, ny, nx)` placed by a voxel → RAS affine.
fn grid_of(shape: &[usize], affine: &PyReadonlyArray2<'_, f64>, name: &str) -> anyhow::Result<Grid> {
    let a = affine.as_array();
    if a.shape() != [4, 4] {
        anyhow::bail!("{name}: the affine must be 4 x 4, got {:?}", a.shape());
    }
    let &[nz, ny, nx] = shape else {
        anyhow::bail!("{name}: expected an array of shape (nz, ny, nx), got {shape:?}");
    };
    let m = nalgebra::Matrix4::from_fn(|r, c| a[[r, c]]);
    Grid::new([nx, ny, nz], m).map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

/// Reads an image input: a file as `obelisk register` reads it (without the GIL: decompressing
/// a large scan takes a while), or a float32 array.
fn image(py: Python<'_>, input: Input<'_>) -> anyhow::Result<Named<Volume>> {
    match input {
        Input::Path(p) => {
            check_input(&p)?;
            Ok(Named { value: py.detach(|| io::read_image(&p))?, name: p })
        }
        Input::Array(array, affine, name) => {
            let array: PyReadonlyArray3<'_, f32> =
                array.extract().map_err(|e| anyhow::anyhow!("{name}: expected a 3D float32 array: {e}"))?;
            let grid = grid_of(array.as_array().shape(), &affine, &name)?;
            let data = array.as_array().iter().copied().collect();
            let v = Volume::new(grid, 1, data).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            v.check_finite().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            Ok(Named { name: PathBuf::from(name), value: v })
        }
    }
}

/// Reads a label map input: a file (without the GIL), or a uint32 array.
fn labels(py: Python<'_>, input: Input<'_>) -> anyhow::Result<Named<Labels>> {
    match input {
        Input::Path(p) => {
            check_input(&p)?;
            Ok(Named { value: py.detach(|| io::read_label_map(&p))?, name: p })
        }
        Input::Array(array, affine, name) => {
            let array: PyReadonlyArray3<'_, u32> =
                array.extract().map_err(|e| anyhow::anyhow!("{name}: expected a 3D uint32 array: {e}"))?;
            let grid = grid_of(array.as_array().shape(), &affine, &name)?;
            let data = array.as_array().iter().copied().collect();
            let l = Labels::new(grid, data).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            Ok(Named { name: PathBuf::from(name), value: l })
        }
    }
}

fn parse_enum<T: ValueEnum>(what: &str, s: &str) -> anyhow::Result<T> {
    T::from_str(s, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_string())
            .collect();
        anyhow::anyhow!("{what} must be one of {}, got {s:?}", names.join(", "))
    })
}

/// The inputs of one registration as the Python wrapper passes them.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Inputs<'py> {
    fixed: Input<'py>,
    moving: Input<'py>,
    fixed_labels: Option<Input<'py>>,
    moving_labels: Option<Input<'py>>,
    fixed_mask: Option<Input<'py>>,
    moving_mask: Option<Input<'py>>,
    truth: Option<PathBuf>,
}

/// The options of `obelisk register` (the names of its flags), as the Python wrapper passes
/// them after checking their types.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Options {
    features: String,
    model: Option<PathBuf>,
    /// `(JSON text, the name errors give it)`: a `--method` file's text or a dict's JSON.
    method: Option<(String, PathBuf)>,
    init: Option<String>,
    similarity: Option<String>,
    ncc_radius: usize,
    smoothness: Option<f64>,
    diffusion: Option<f64>,
    affine_iterations: Option<usize>,
    iterations: Option<usize>,
    displacement: bool,
    exact: bool,
    discrete_radius: Option<usize>,
    inverse: bool,
    pictures: bool,
    slice: String,
    /// Bytes, or a size such as "8G" (`--max-memory`).
    max_memory: Option<String>,
}

impl Options {
    fn reg_options(&self) -> anyhow::Result<RegOptions> {
        let d = RegOptions::default();
        Ok(RegOptions {
            features: parse_enum::<FeatureKind>("features", &self.features)?,
            model: self.model.clone(),
            method: self.method.as_ref().map(|m| m.1.clone()),
            init: self.init.as_deref().map(|s| parse_enum::<Start>("init", s)).transpose()?,
            similarity: self
                .similarity
                .as_deref()
                .map(|s| parse_enum::<SimilarityKind>("similarity", s))
                .transpose()?,
            ncc_radius: self.ncc_radius,
            smoothness: self.smoothness.unwrap_or(d.smoothness),
            diffusion: self.diffusion,
            affine_iterations: self.affine_iterations.unwrap_or(d.affine_iterations),
            iterations: self.iterations,
            displacement: self.displacement,
            diffeomorphic: false,
            exact: self.exact,
            discrete_radius: self.discrete_radius.unwrap_or(d.discrete_radius),
        })
    }
}

/// Validates as `obelisk register` does (the same functions) and builds the job.
fn make_job(py: Python<'_>, inputs: Inputs<'_>, o: &Options) -> anyhow::Result<(RegisterJob, Vec<PathBuf>)> {
    let options = o.reg_options()?;
    if let Some(m) = &o.model {
        check_input_dir(m)?;
    }
    let method = o.method.as_ref().map(|(text, name)| parse_method(text, name)).transpose()?;
    let (model, config) = options.validate_with(method)?;
    if config.start == Start::Labels && (inputs.fixed_labels.is_none() || inputs.moving_labels.is_none()) {
        anyhow::bail!("init=\"labels\" needs fixed_labels and moving_labels");
    }
    let max_memory = o
        .max_memory
        .as_deref()
        .map(obelisk::memory::parse_size)
        .transpose()
        .map_err(|e| anyhow::anyhow!("max_memory: {e}"))?;
    let fixed = image(py, inputs.fixed)?;
    let moving = image(py, inputs.moving)?;
    check_memory(
        &options,
        &config,
        model.as_ref(),
        (&fixed.name, &fixed.value.grid),
        (&moving.name, &moving.value.grid),
        max_memory,
    )?;
    check_pair(&fixed.name, &fixed.value.grid, &moving.name, &moving.value.grid, &config)?;
    let on = |l: Option<Input<'_>>, image: &Named<Volume>| -> anyhow::Result<Option<Labels>> {
        l.map(|l| {
            let l = labels(py, l)?;
            Ok(io::labels_for(l.value, &l.name, &image.value.grid, &image.name)?)
        })
        .transpose()
    };
    let fixed_labels = on(inputs.fixed_labels, &fixed)?;
    let moving_labels = on(inputs.moving_labels, &moving)?;
    let mask = |m: Option<Input<'_>>, image: &Named<Volume>| -> anyhow::Result<Option<(Volume, f64)>> {
        m.map(|m| {
            let m = self::image(py, m)?;
            mask_for(m.value, &m.name, &image.value.grid, &image.name, true)
        })
        .transpose()
    };
    let fixed_mask = mask(inputs.fixed_mask, &fixed)?;
    let moving_mask = mask(inputs.moving_mask, &moving)?;
    let truth = match &inputs.truth {
        Some(p) => {
            check_input(p)?;
            let t = io::read_field(p)?;
            if !t.grid.same_as(&fixed.value.grid, io::GRID_TOL) {
                return Err(IoError::new(
                    p,
                    format!("the truth field does not lie on the grid of {}", fixed.name.display()),
                )
                .into());
            }
            Some(t)
        }
        None => None,
    };
    // files among the inputs: save() never overwrites them
    let files = [&fixed.name, &moving.name].into_iter().filter(|p| p.exists()).cloned().collect();
    let job = RegisterJob {
        fixed_path: fixed.name,
        moving_path: moving.name,
        fixed: fixed.value,
        moving: moving.value,
        fixed_labels,
        moving_labels,
        truth,
        fixed_mask,
        moving_mask,
        label_names: BTreeMap::new(),
        out: PathBuf::new(),
        features: options.features,
        model,
        exact: options.exact,
        config,
        pictures: o.pictures,
        slice: o.slice.parse::<SliceSpec>().map_err(|e| anyhow::anyhow!("slice: {e}"))?,
        force: false,
        quiet: true,
        inverse: o.inverse,
    };
    Ok((job, files))
}

fn check_input_dir(p: &Path) -> anyhow::Result<()> {
    if !p.exists() {
        return Err(IoError::new(p, "file not found").into());
    }
    Ok(())
}

/// Registers `moving` to `fixed` (see `obelisk.register`, which checks and converts the
/// arguments first).
#[pyfunction]
#[pyo3(signature = (inputs, options, threads=None))]
fn register(py: Python<'_>, inputs: Inputs<'_>, options: Options, threads: Option<usize>) -> PyResult<Registration> {
    if threads == Some(0) {
        return Err(PyValueError::new_err("threads must be at least 1"));
    }
    let (job, input_files) = make_job(py, inputs, &options).map_err(to_py)?;
    let job_ref = &job;
    let registered = compute(py, threads, move || job_ref.compute(&mut silent()))?;
    Ok(Registration { job, registered, input_files })
}

/// A finished registration, held in memory (`obelisk.Registration` wraps it).
#[pyclass(module = "obelisk._obelisk", frozen)]
struct Registration {
    job: RegisterJob,
    registered: Registered,
    input_files: Vec<PathBuf>,
}

/// A displacement field as numpy: `(nz, ny, nx, 3)`, or `(ny, nx, 2)` on a 2D grid (as
/// field.nii.gz stores it and SimpleITK reads it).
fn field_array<'py>(py: Python<'py>, f: &DisplacementField) -> Bound<'py, PyAny> {
    let [nx, ny, nz] = f.grid.shape();
    let n = f.grid.num_voxels();
    if f.grid.is_2d() {
        let a = Array3::from_shape_fn((ny, nx, 2), |(j, i, c)| f.data[c * n + j * nx + i]);
        a.into_pyarray(py).into_any()
    } else {
        let a = Array4::from_shape_fn((nz, ny, nx, 3), |(k, j, i, c)| f.data[c * n + (k * ny + j) * nx + i]);
        a.into_pyarray(py).into_any()
    }
}

/// A 4 x 4 affine as numpy.
type PyAffine<'py> = Bound<'py, PyArray2<f64>>;

fn affine_array<'py>(py: Python<'py>, m: &nalgebra::Matrix4<f64>) -> PyAffine<'py> {
    numpy::ndarray::Array2::from_shape_fn((4, 4), |(r, c)| m[(r, c)]).into_pyarray(py)
}

fn volume_array<'py>(py: Python<'py>, v: &Volume) -> Bound<'py, PyArray3<f32>> {
    let [nx, ny, nz] = v.grid.shape();
    Array3::from_shape_vec((nz, ny, nx), v.data[..v.grid.num_voxels()].to_vec())
        .expect("a volume's data fills its grid")
        .into_pyarray(py)
}

fn labels_array<'py>(py: Python<'py>, l: &Labels) -> Bound<'py, PyArray3<u32>> {
    let [nx, ny, nz] = l.grid.shape();
    Array3::from_shape_vec((nz, ny, nx), l.data.clone()).expect("a label map fills its grid").into_pyarray(py)
}

#[pymethods]
impl Registration {
    /// The displacement field (see [`field_array`]): LPS millimetres, fixed → moving.
    #[getter]
    fn displacement<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        field_array(py, &self.registered.field)
    }

    /// The fixed grid's voxel → RAS affine (4 x 4) and shape `(nz, ny, nx)`.
    #[getter]
    fn fixed_grid<'py>(&self, py: Python<'py>) -> PyGrid<'py> {
        let g = &self.job.fixed.grid;
        let [nx, ny, nz] = g.shape();
        (affine_array(py, g.affine()), (nz, ny, nx))
    }

    /// The affine stage's map, fixed LPS → moving LPS points (4 x 4).
    #[getter]
    fn affine<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        affine_array(py, &self.registered.affine.matrix)
    }

    /// The moving image resampled onto the fixed grid, `(nz, ny, nx)`.
    #[getter]
    fn warped<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray3<f32>> {
        volume_array(py, &self.registered.warped)
    }

    /// The moving label map resampled onto the fixed grid, when one was given.
    #[getter]
    fn warped_labels<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray3<u32>>> {
        self.registered.warped_labels.as_ref().map(|l| labels_array(py, l))
    }

    /// metrics.json as the CLI writes it, before any file is: `out_dir` is null and `files`
    /// empty until `save`.
    fn metrics_json(&self) -> PyResult<String> {
        let mut v = serde_json::to_value(&self.registered.summary).map_err(|e| to_py(e.into()))?;
        v["out_dir"] = serde_json::Value::Null;
        serde_json::to_string(&v).map_err(|e| to_py(e.into()))
    }

    /// Writes the files of `obelisk register` into `folder` (created if missing); refuses to
    /// overwrite existing outputs unless `force`, and never overwrites an input. Returns the
    /// metrics.json it wrote.
    #[pyo3(signature = (folder, force=false))]
    fn save(&self, py: Python<'_>, folder: PathBuf, force: bool) -> PyResult<String> {
        let run = || -> anyhow::Result<String> {
            prepare_out_dir(&folder)?;
            let inputs: Vec<&Path> = self.input_files.iter().map(|p| p.as_path()).collect();
            for out in self.job.outputs_in(&folder) {
                check_output(&out, &inputs, force)?;
            }
            let summary = self.job.write(&self.registered, &folder)?;
            Ok(serde_json::to_string(&summary)?)
        };
        compute(py, None, run)
    }

    /// Resamples an image (or, with `labels`, a uint32 label map) on any grid onto the fixed
    /// grid through the displacement, as `obelisk warp --field field.nii.gz` does; returns the
    /// array `(nz, ny, nx)`.
    #[pyo3(signature = (image, interpolation="linear", labels=false))]
    fn apply<'py>(
        &self,
        py: Python<'py>,
        image: Input<'py>,
        interpolation: &str,
        labels: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let field = &self.registered.field;
        if labels {
            if interpolation != "nearest" {
                return Err(PyValueError::new_err("label maps are resampled with interpolation=\"nearest\""));
            }
            let l = self::labels(py, image).map_err(to_py)?;
            let warped = compute(py, None, || Ok(warp_labels(&l.value, field)))?;
            return Ok(labels_array(py, &warped).into_any());
        }
        let interp = match interpolation {
            "linear" => Interpolation::Linear,
            "nearest" => Interpolation::Nearest,
            other => {
                return Err(PyValueError::new_err(format!(
                    "interpolation must be \"linear\" or \"nearest\", got {other:?}"
                )))
            }
        };
        let v = self::image(py, image).map_err(to_py)?;
        let warped = compute(py, None, || Ok(warp_volume(&v.value, field, interp, Padding::Extent)))?;
        Ok(volume_array(py, &warped).into_any())
    }
}

/// A grid as Python sees it: the voxel → RAS affine (4 x 4) and the numpy shape `(nz, ny, nx)`.
type PyGrid<'py> = (PyAffine<'py>, (usize, usize, usize));

/// The 4 x 4 voxel → RAS affine and shape `(nz, ny, nx)` of an image file, from its header.
#[pyfunction]
fn read_grid<'py>(py: Python<'py>, path: PathBuf) -> PyResult<PyGrid<'py>> {
    check_input(&path).map_err(|e| to_py(e.into()))?;
    let g = io::read_grid(&path).map_err(|e| to_py(e.into()))?;
    let [nx, ny, nz] = g.shape();
    Ok((affine_array(py, g.affine()), (nz, ny, nx)))
}

/// An image file as `(array (nz, ny, nx) float32, voxel → RAS affine)`.
#[pyfunction]
fn read_image<'py>(py: Python<'py>, path: PathBuf) -> PyResult<(Bound<'py, PyArray3<f32>>, PyAffine<'py>)> {
    let v = image(py, Input::Path(path)).map_err(to_py)?;
    Ok((volume_array(py, &v.value), affine_array(py, v.value.grid.affine())))
}

#[pymodule]
fn _obelisk(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(register, m)?)?;
    m.add_function(wrap_pyfunction!(read_grid, m)?)?;
    m.add_function(wrap_pyfunction!(read_image, m)?)?;
    m.add_class::<Registration>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
