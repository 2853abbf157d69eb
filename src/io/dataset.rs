//! Dataset descriptions in the Learn2Reg schema (`{TASK}_dataset.json`), the one format every
//! command reads and `obelisk synth` and the data scripts write.
//!
//! Learn2Reg (e.g. `AbdomenCTCT_dataset.json`) lists subjects under `training` / `test` as
//! `{"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz", "mask": ...}` and
//! registration pairs under `registration_val`, `registration_test` and `training_paired_images`
//! as `{"fixed": IMAGE, "moving": IMAGE}`; a pair's label maps are those of the subjects with the
//! same image. Paths are relative to the JSON's folder. `labels` maps ids to names
//! (`{"1": "spleen"}`); nnU-Net's inverted form (`{"spleen": 1}`) is accepted too. Keys this
//! module does not know (`release`, `licence`, `modality`, `provided_data`, ...) are ignored.
//! obelisk's own extensions, all optional: per pair `fixed_label`, `moving_label` (explicit label
//! maps) and `truth_field` (ground-truth ITK displacement field on the fixed grid). See
//! `docs/dataset-json.md`.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use super::IoError;

/// One subject: an image with its optional label map and mask (paths resolved).
#[derive(Debug, Clone, PartialEq)]
pub struct Subject {
    pub image: PathBuf,
    pub label: Option<PathBuf>,
    pub mask: Option<PathBuf>,
    /// Where the entry sits in the JSON, e.g. `training[3]`, for messages.
    pub key: String,
}

/// One registration pair (paths resolved); the labels come from the entry itself or from the
/// subject with the same image.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetPair {
    pub fixed: PathBuf,
    pub moving: PathBuf,
    pub fixed_label: Option<PathBuf>,
    pub moving_label: Option<PathBuf>,
    pub truth_field: Option<PathBuf>,
    /// The entry's `name` (obelisk's corpus names its pairs; Learn2Reg's do not).
    pub name: Option<String>,
    /// e.g. `registration_val[0]`.
    pub key: String,
}

/// A parsed dataset description.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The JSON file.
    pub path: PathBuf,
    pub name: Option<String>,
    /// Label id → name (background included where the file names it).
    pub labels: BTreeMap<u32, String>,
    /// `tensorImageShape["0"]`: the common voxel shape where the data set has one.
    pub tensor_image_shape: Option<Vec<usize>>,
    pub training: Vec<Subject>,
    pub test: Vec<Subject>,
    pub registration_val: Vec<DatasetPair>,
    pub registration_test: Vec<DatasetPair>,
    pub training_paired_images: Vec<DatasetPair>,
}

/// The pair lists a dataset may hold, by their JSON key.
pub const PAIR_LISTS: [&str; 3] = ["registration_val", "registration_test", "training_paired_images"];

/// Lexically normalised `base/rel` ("./" and "x/.." removed), so that the same file named twice
/// in a JSON compares equal.
fn resolve(base: &Path, rel: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

struct Parser<'a> {
    json: &'a Path,
    base: PathBuf,
}

impl Parser<'_> {
    fn err(&self, msg: impl Into<String>) -> IoError {
        IoError::new(self.json, msg)
    }

    fn list<'v>(&self, root: &'v Map<String, Value>, key: &str) -> Result<&'v [Value], IoError> {
        match root.get(key) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(self.err(format!("\"{key}\" must be a list"))),
        }
    }

    fn entry<'v>(&self, v: &'v Value, at: &str) -> Result<&'v Map<String, Value>, IoError> {
        v.as_object().ok_or_else(|| self.err(format!("{at} must be an object")))
    }

    fn path(&self, obj: &Map<String, Value>, field: &str, at: &str) -> Result<Option<PathBuf>, IoError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(resolve(&self.base, s))),
            Some(_) => Err(self.err(format!("{at}.{field} must be a non-empty path string"))),
        }
    }

    fn subjects(&self, root: &Map<String, Value>, key: &str) -> Result<Vec<Subject>, IoError> {
        let mut out = Vec::new();
        for (i, v) in self.list(root, key)?.iter().enumerate() {
            let at = format!("{key}[{i}]");
            let obj = self.entry(v, &at)?;
            let image = self.path(obj, "image", &at)?.ok_or_else(|| self.err(format!("{at} has no \"image\"")))?;
            out.push(Subject {
                image,
                label: self.path(obj, "label", &at)?,
                mask: self.path(obj, "mask", &at)?,
                key: at,
            });
        }
        Ok(out)
    }

    fn pairs(&self, root: &Map<String, Value>, key: &str, subjects: &[&Subject]) -> Result<Vec<DatasetPair>, IoError> {
        let label_of = |image: &Path| subjects.iter().find(|s| s.image == image).and_then(|s| s.label.clone());
        let mut out = Vec::new();
        for (i, v) in self.list(root, key)?.iter().enumerate() {
            let at = format!("{key}[{i}]");
            let obj = self.entry(v, &at)?;
            let need = |f: &str| self.path(obj, f, &at)?.ok_or_else(|| self.err(format!("{at} has no \"{f}\"")));
            let (fixed, moving) = (need("fixed")?, need("moving")?);
            let fixed_label = self.path(obj, "fixed_label", &at)?.or_else(|| label_of(&fixed));
            let moving_label = self.path(obj, "moving_label", &at)?.or_else(|| label_of(&moving));
            let truth_field = self.path(obj, "truth_field", &at)?;
            let name = match obj.get("name") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(self.err(format!("{at}.name must be a string"))),
            };
            out.push(DatasetPair { fixed, moving, fixed_label, moving_label, truth_field, name, key: at });
        }
        Ok(out)
    }

    fn labels(&self, root: &Map<String, Value>) -> Result<BTreeMap<u32, String>, IoError> {
        let obj = match root.get("labels") {
            None | Some(Value::Null) => return Ok(BTreeMap::new()),
            Some(Value::Object(o)) => o,
            Some(_) => return Err(self.err("\"labels\" must be an object of id → name")),
        };
        let mut out = BTreeMap::new();
        for (k, v) in obj {
            let (id, name) = match (k.trim().parse::<u32>(), v) {
                (Ok(id), Value::String(name)) => (id, name.clone()),
                // nnU-Net v2 writes name → id
                (Err(_), Value::Number(n)) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(id) => (id, k.clone()),
                    None => return Err(self.err(format!("labels: {n} is not a label id"))),
                },
                _ => return Err(self.err(format!("labels: entry {k:?}: {v} is neither id → name nor name → id"))),
            };
            if let Some(old) = out.insert(id, name) {
                return Err(self.err(format!("labels: id {id} is named twice ({old:?})")));
            }
        }
        Ok(out)
    }
}

impl Dataset {
    /// Reads and parses a dataset description; files it lists are not touched (see
    /// [`Dataset::check_files`]): a published data set may list test images it does not ship.
    pub fn load(path: &Path) -> Result<Self, IoError> {
        if !path.exists() {
            return Err(IoError::new(path, "dataset file not found"));
        }
        let text = std::fs::read_to_string(path).map_err(|e| IoError::new(path, format!("cannot read: {e}")))?;
        Self::parse(path, &text)
    }

    /// Parses `text` as the content of `path` (relative entries resolve against its folder).
    pub fn parse(path: &Path, text: &str) -> Result<Self, IoError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| IoError::new(path, format!("not a valid dataset JSON: {e}")))?;
        let root = value.as_object().ok_or_else(|| IoError::new(path, "not a dataset description (no JSON object)"))?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let p = Parser { json: path, base };
        let training = p.subjects(root, "training")?;
        let test = p.subjects(root, "test")?;
        let all: Vec<&Subject> = training.iter().chain(&test).collect();
        let tensor_image_shape = match root.get("tensorImageShape") {
            Some(Value::Object(o)) => o.get("0").and_then(|v| serde_json::from_value::<Vec<usize>>(v.clone()).ok()),
            _ => None,
        };
        Ok(Dataset {
            name: root.get("name").and_then(Value::as_str).map(str::to_owned),
            labels: p.labels(root)?,
            tensor_image_shape,
            registration_val: p.pairs(root, "registration_val", &all)?,
            registration_test: p.pairs(root, "registration_test", &all)?,
            training_paired_images: p.pairs(root, "training_paired_images", &all)?,
            training,
            test,
            path: path.to_path_buf(),
        })
    }

    /// Training subjects that have a label map.
    pub fn labelled_training(&self) -> Vec<&Subject> {
        self.training.iter().filter(|s| s.label.is_some()).collect()
    }

    /// The pair list named `key` (one of [`PAIR_LISTS`]).
    pub fn pairs(&self, key: &str) -> Option<&[DatasetPair]> {
        match key {
            "registration_val" => Some(&self.registration_val),
            "registration_test" => Some(&self.registration_test),
            "training_paired_images" => Some(&self.training_paired_images),
            _ => None,
        }
    }

    /// Fails on the first listed file that does not exist, naming it and where the JSON lists it.
    pub fn check_files<'a>(&self, files: impl IntoIterator<Item = (&'a Path, String)>) -> Result<(), IoError> {
        for (file, at) in files {
            if !file.is_file() {
                let what = if file.exists() { "is not a file" } else { "file not found" };
                return Err(IoError::new(file, format!("{what} (listed as {at} in {})", self.path.display())));
            }
        }
        Ok(())
    }
}

impl Subject {
    /// The image and label map with their JSON locations, for [`Dataset::check_files`].
    pub fn files(&self) -> Vec<(&Path, String)> {
        let mut v = vec![(self.image.as_path(), format!("{}.image", self.key))];
        v.extend(self.label.as_deref().map(|l| (l, format!("{}.label", self.key))));
        v
    }
}

impl DatasetPair {
    /// Every file of the pair with its JSON location, for [`Dataset::check_files`].
    pub fn files(&self) -> Vec<(&Path, String)> {
        let mut v = vec![
            (self.fixed.as_path(), format!("{}.fixed", self.key)),
            (self.moving.as_path(), format!("{}.moving", self.key)),
        ];
        for (p, f) in [
            (&self.fixed_label, "fixed_label"),
            (&self.moving_label, "moving_label"),
            (&self.truth_field, "truth_field"),
        ] {
            v.extend(p.as_deref().map(|p| (p, format!("{}.{f}", self.key))));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of Learn2Reg's AbdomenCTCT_dataset.json (release 1.1), shortened to 3 training
    /// subjects, 1 test subject and 2 validation pairs.
    const ABDOMEN_CTCT: &str = r#"{
        "name": "AbdomenCTCT",
        "release": "1.1",
        "description": "AbdomenCTCT task of Learn2Reg Dataset.",
        "licence": "see README",
        "reference": "",
        "pairings": "unpaired",
        "provided_data": {"0": ["image", "label"]},
        "registration_direction": {"fixed": 0, "moving": 0},
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney",
                   "13": "left adrenal gland"},
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": [192, 160, 256]},
        "numTraining": 3,
        "numTest": 1,
        "training": [
            {"image": "./imagesTr/AbdomenCTCT_0001_0000.nii.gz", "label": "./labelsTr/AbdomenCTCT_0001_0000.nii.gz"},
            {"image": "./imagesTr/AbdomenCTCT_0002_0000.nii.gz", "label": "./labelsTr/AbdomenCTCT_0002_0000.nii.gz"},
            {"image": "./imagesTr/AbdomenCTCT_0004_0000.nii.gz", "label": "./labelsTr/AbdomenCTCT_0004_0000.nii.gz"}
        ],
        "test": [{"image": "./imagesTs/AbdomenCTCT_0031_0000.nii.gz"}],
        "numPairedTraining": 0,
        "training_paired_images": [],
        "registration_val": [
            {"fixed": "./imagesTr/AbdomenCTCT_0001_0000.nii.gz", "moving": "./imagesTr/AbdomenCTCT_0004_0000.nii.gz"},
            {"fixed": "./imagesTr/AbdomenCTCT_0002_0000.nii.gz", "moving": "./imagesTs/AbdomenCTCT_0031_0000.nii.gz"}
        ]
    }"#;

    #[test]
    fn parses_learn2reg_abdomen_ctct() {
        let json = Path::new("/data/AbdomenCTCT/AbdomenCTCT_dataset.json");
        let ds = Dataset::parse(json, ABDOMEN_CTCT).unwrap();
        assert_eq!(ds.name.as_deref(), Some("AbdomenCTCT"));
        assert_eq!(ds.labels[&1], "spleen");
        assert_eq!(ds.labels[&13], "left adrenal gland");
        assert_eq!(ds.labels.len(), 5);
        assert_eq!(ds.tensor_image_shape, Some(vec![192, 160, 256]));
        assert_eq!(ds.training.len(), 3);
        let root = Path::new("/data/AbdomenCTCT");
        assert_eq!(ds.training[1].image, root.join("imagesTr/AbdomenCTCT_0002_0000.nii.gz"));
        assert_eq!(ds.training[1].label.as_deref(), Some(root.join("labelsTr/AbdomenCTCT_0002_0000.nii.gz").as_path()));
        assert_eq!(ds.training[1].key, "training[1]");
        assert_eq!(ds.test.len(), 1);
        assert_eq!(ds.test[0].label, None);
        assert_eq!(ds.labelled_training().len(), 3);
        // a pair's label maps are those of the subjects with the same image
        let p = &ds.registration_val[0];
        assert_eq!(p.fixed, root.join("imagesTr/AbdomenCTCT_0001_0000.nii.gz"));
        assert_eq!(p.fixed_label, Some(root.join("labelsTr/AbdomenCTCT_0001_0000.nii.gz")));
        assert_eq!(p.moving_label, Some(root.join("labelsTr/AbdomenCTCT_0004_0000.nii.gz")));
        assert_eq!(p.truth_field, None);
        // a test image has no label map
        assert_eq!(ds.registration_val[1].moving_label, None);
        assert!(ds.registration_test.is_empty() && ds.training_paired_images.is_empty());
        assert_eq!(ds.pairs("registration_val").unwrap().len(), 2);
        assert!(ds.pairs("validation").is_none());
    }

    #[test]
    fn explicit_pair_files_and_relative_json_path() {
        let text = r#"{"training": [], "registration_val": [{"fixed": "f.nii", "moving": "sub/../m.nii",
            "fixed_label": "fl.nii", "moving_label": "./ml.nii", "truth_field": "t.nii.gz", "name": "p0"}]}"#;
        let ds = Dataset::parse(Path::new("dataset.json"), text).unwrap();
        let p = &ds.registration_val[0];
        assert_eq!(p.moving, Path::new("m.nii"));
        assert_eq!(p.moving_label.as_deref(), Some(Path::new("ml.nii")));
        assert_eq!(p.truth_field.as_deref(), Some(Path::new("t.nii.gz")));
        assert_eq!(p.files().len(), 5);
        assert_eq!(p.name.as_deref(), Some("p0"));
        assert!(ds.labels.is_empty() && ds.name.is_none() && ds.tensor_image_shape.is_none());
    }

    #[test]
    fn nnunet_label_map_is_accepted() {
        let ds = Dataset::parse(Path::new("d.json"), r#"{"labels": {"background": 0, "liver": 1}}"#).unwrap();
        assert_eq!(ds.labels[&0], "background");
        assert_eq!(ds.labels[&1], "liver");
    }

    fn parse_err(text: &str) -> String {
        Dataset::parse(Path::new("/x/d.json"), text).unwrap_err().to_string()
    }

    #[test]
    fn malformed_descriptions_name_the_json_and_the_entry() {
        for (text, want) in [
            ("{", "not a valid dataset JSON"),
            ("[1]", "no JSON object"),
            (r#"{"training": {"image": "a"}}"#, "\"training\" must be a list"),
            (r#"{"training": [{"label": "a"}]}"#, "training[0] has no \"image\""),
            (r#"{"training": [{"image": 3}]}"#, "training[0].image must be"),
            (r#"{"registration_val": [{"fixed": "a"}]}"#, "registration_val[0] has no \"moving\""),
            (r#"{"registration_val": [{"fixed": "a", "moving": "b", "name": 3}]}"#, "registration_val[0].name must be"),
            (r#"{"labels": {"1": "a", "x": "b"}}"#, "neither id"),
            (r#"{"labels": {"1": "a", "01": "b"}}"#, "id 1 is named twice"),
            (r#"{"labels": ["a"]}"#, "\"labels\" must be"),
        ] {
            let e = parse_err(text);
            assert!(e.starts_with("/x/d.json: ") && e.contains(want), "{text}: {e}");
        }
        let e = Dataset::load(Path::new("/nonexistent/d.json")).unwrap_err().to_string();
        assert_eq!(e, "/nonexistent/d.json: dataset file not found");
    }

    #[test]
    fn missing_listed_file_is_named_with_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("AbdomenCTCT_dataset.json");
        std::fs::write(&json, ABDOMEN_CTCT).unwrap();
        let ds = Dataset::load(&json).unwrap();
        std::fs::create_dir_all(dir.path().join("imagesTr")).unwrap();
        std::fs::create_dir_all(dir.path().join("labelsTr")).unwrap();
        for s in &ds.training {
            std::fs::write(&s.image, b"x").unwrap();
            std::fs::write(s.label.as_ref().unwrap(), b"x").unwrap();
        }
        ds.check_files(ds.training.iter().flat_map(|s| s.files())).unwrap();
        let gone = ds.training[2].label.clone().unwrap();
        std::fs::remove_file(&gone).unwrap();
        let e = ds.check_files(ds.training.iter().flat_map(|s| s.files())).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: file not found (listed as training[2].label in {})", gone.display(), json.display())
        );
        // the test image is listed but not shipped: only checked when asked for
        let e = ds.check_files(ds.registration_val[1].files()).unwrap_err().to_string();
        assert!(
            e.contains("AbdomenCTCT_0031_0000.nii.gz: file not found (listed as registration_val[1].moving"),
            "{e}"
        );
    }
}
