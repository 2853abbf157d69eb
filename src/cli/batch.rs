//! `obelisk batch`: registers every pair of a CSV or a dataset.json, each into its own folder,
//! resumably and shardable over a job array.
//!
//! A pair's folder counts as complete only when its marker (`done.json`) exists: the marker is
//! written last, atomically, and records the inputs' sizes and modification times and the
//! settings, so a batch killed at any point and run again redoes exactly the pairs without one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use registration::features::ObeliskFeatures;
use registration::method::{MethodConfig, Role, SharedFeatures, Start};
use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::register::{OutputOptions, RegOptions, RegisterArgs};
use crate::cli::validate::{check_input, prepare_out_dir, same_dimensionality};
use crate::cli::Output;
use crate::io::{self, atomic::write_atomic, dataset::Dataset};
use crate::pipeline::RegisterSummary;
use crate::progress::Progress;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk batch pairs.csv --out cohort/
  obelisk batch data/dataset.json --out reg/ --features mind --no-pictures --json
  obelisk batch data/dataset.json --list registration_test --out reg/ --shard 2/8
  sbatch --array=0-9 --wrap 'obelisk batch pairs.csv --out cohort/ --threads 4'

PAIRS.csv has a header naming its columns: fixed and moving, and optionally fixed_labels,
moving_labels, fixed_mask, moving_mask, truth and name; relative paths are relative to the CSV's
folder, empty cells mean none. A dataset.json contributes the pairs of --list with their label
maps, truth fields and names. Pair NAME goes to OUT/NAME/ (default name: MOVING_to_FIXED, from
the file names), with the files `obelisk register` writes and done.json, written last; a pair
whose done.json matches its inputs and settings is skipped, any other is (re)done. The summary
goes to OUT/batch.json and OUT/batch.csv (OUT/batch.shard-I-of-N.json and .csv with a shard).
When every pair has the same moving (or fixed) image, its features are computed once.")]
pub struct BatchArgs {
    /// The pairs: a CSV file with a header, or a Learn2Reg dataset.json.
    #[arg(value_name = "PAIRS.csv|dataset.json")]
    pub pairs: PathBuf,
    /// Output folder: a folder per pair, and the summary.
    #[arg(long)]
    pub out: PathBuf,
    /// The pair list of a dataset.json: registration_val, registration_test or
    /// training_paired_images [default: registration_val].
    #[arg(long, value_name = "KEY")]
    pub list: Option<String>,
    /// Register only shard I of N, counted from 1: pair k of the input (from 0) belongs to shard
    /// k mod N + 1. Without it, a Slurm job array's task picks its shard
    /// (SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN, over SLURM_ARRAY_TASK_STEP, of
    /// SLURM_ARRAY_TASK_COUNT); outside one, every pair is registered.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<Shard>,
    /// Redo complete pairs too (and pairs made with other inputs or settings).
    #[arg(long)]
    pub force: bool,
    /// Compute every image's features for each pair, even where all pairs share an image.
    #[arg(long)]
    pub no_shared_features: bool,
    #[command(flatten)]
    pub options: RegOptions,
    #[command(flatten)]
    pub outputs: OutputOptions,
}

/// One of N parts of a batch, counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected I/N with 1 <= I <= N (e.g. 2/8), got {s:?}");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// The shard of the current Slurm array task, read through `var` (the environment); `None`
    /// outside a job array.
    pub fn from_slurm(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(id) = var("SLURM_ARRAY_TASK_ID") else { return Ok(None) };
        let number = |name: &str, default: Option<usize>| -> Result<usize> {
            match var(name) {
                Some(v) => v.trim().parse().map_err(|_| anyhow!("{name}={v:?} is not a whole number")),
                None => default.ok_or_else(|| anyhow!("SLURM_ARRAY_TASK_ID is set but {name} is not")),
            }
        };
        let id = id.trim().parse::<usize>().map_err(|_| anyhow!("SLURM_ARRAY_TASK_ID={id:?} is not a whole number"))?;
        let count = number("SLURM_ARRAY_TASK_COUNT", None)?;
        // an array need not start at 0 (--array=1-10) nor step by 1 (--array=0-20:2)
        let (min, step) = (number("SLURM_ARRAY_TASK_MIN", Some(0))?, number("SLURM_ARRAY_TASK_STEP", Some(1))?);
        let offset = id.checked_sub(min).filter(|o| step > 0 && o % step == 0).map(|o| o / step);
        match offset {
            Some(k) if k < count => Ok(Some(Shard { index: k + 1, count })),
            _ => bail!(
                "SLURM_ARRAY_TASK_ID={id} is not one of the {count} tasks of an array from {min} by {step} \
                 (SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_STEP, SLURM_ARRAY_TASK_COUNT); pass --shard I/N"
            ),
        }
    }

    fn has(&self, pair_index: usize) -> bool {
        pair_index % self.count + 1 == self.index
    }
}

/// One pair as listed, paths resolved.
#[derive(Debug, Clone)]
struct PairSpec {
    name: String,
    /// Position in the input (from 0): what shards are counted by.
    index: usize,
    /// Where the input lists it: `line 4` or `registration_val[3]`.
    at: String,
    fixed: PathBuf,
    moving: PathBuf,
    fixed_labels: Option<PathBuf>,
    moving_labels: Option<PathBuf>,
    fixed_mask: Option<PathBuf>,
    moving_mask: Option<PathBuf>,
    truth: Option<PathBuf>,
}

impl PairSpec {
    fn inputs(&self) -> Vec<(&'static str, &Path)> {
        let mut v = vec![("fixed", self.fixed.as_path()), ("moving", self.moving.as_path())];
        for (role, p) in [
            ("fixed_labels", &self.fixed_labels),
            ("moving_labels", &self.moving_labels),
            ("fixed_mask", &self.fixed_mask),
            ("moving_mask", &self.moving_mask),
            ("truth", &self.truth),
        ] {
            v.extend(p.as_deref().map(|p| (role, p)));
        }
        v
    }
}

/// The columns a pair CSV may have; singular label columns as in dataset.json are accepted.
const CSV_COLUMNS: [&str; 8] =
    ["fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask", "truth", "name"];

fn csv_column(header: &str) -> Option<&'static str> {
    let h = header.trim().to_ascii_lowercase();
    let h = match h.as_str() {
        "fixed_label" => "fixed_labels",
        "moving_label" => "moving_labels",
        "truth_field" => "truth",
        other => other,
    };
    CSV_COLUMNS.iter().find(|c| **c == h).copied()
}

/// Splits one CSV line: commas separate, double quotes enclose a cell holding commas (`""` is
/// a quote), unquoted cells are trimmed.
fn split_csv_line(line: &str) -> Result<Vec<String>, String> {
    let mut cells = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        let mut cell = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        cell.push('"');
                    }
                    Some('"') => break,
                    Some(c) => cell.push(c),
                    None => return Err("a quoted cell is not closed".into()),
                }
            }
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            match chars.next() {
                None => {
                    cells.push(cell);
                    return Ok(cells);
                }
                Some(',') => cells.push(cell),
                Some(c) => return Err(format!("unexpected {c:?} after a quoted cell")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        cells.push(cell.trim().to_string());
                        return Ok(cells);
                    }
                    Some(',') => break,
                    Some(c) => cell.push(c),
                }
            }
            cells.push(cell.trim().to_string());
        }
    }
}

/// A relative path of a list resolves against the list's folder.
fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Reads a pair CSV; `name` stays empty where the CSV gives none.
fn read_csv(path: &Path) -> Result<Vec<PairSpec>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot be read: {e}", path.display()))?;
    let base = folder_of(path);
    let err = |line: usize, msg: String| anyhow!("{}: line {line}: {msg}", path.display());
    let mut rows = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_start_matches('\u{feff}')))
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let Some((hline, header)) = rows.next() else { bail!("{}: empty: no header and no pairs", path.display()) };
    let header = split_csv_line(header).map_err(|e| err(hline, e))?;
    let mut columns = Vec::with_capacity(header.len());
    for h in &header {
        let c = csv_column(h).ok_or_else(|| {
            err(hline, format!("unknown column {h:?} in the header (columns: {})", CSV_COLUMNS.join(", ")))
        })?;
        if columns.contains(&c) {
            return Err(err(hline, format!("column {c} appears twice in the header")));
        }
        columns.push(c);
    }
    for need in ["fixed", "moving"] {
        if !columns.contains(&need) {
            return Err(err(
                hline,
                format!(
                    "the header has no {need:?} column (it has {}); columns: {}",
                    header.join(", "),
                    CSV_COLUMNS.join(", ")
                ),
            ));
        }
    }
    let mut pairs = Vec::new();
    for (line, text) in rows {
        let cells = split_csv_line(text).map_err(|e| err(line, e))?;
        if cells.len() != columns.len() {
            return Err(err(line, format!("{} cells, but the header names {} columns", cells.len(), columns.len())));
        }
        let cell = |c: &str| columns.iter().position(|k| *k == c).map(|i| cells[i].as_str()).filter(|s| !s.is_empty());
        let path = |c: &str| cell(c).map(|s| resolve(&base, s));
        let need = |c: &str| path(c).ok_or_else(|| err(line, format!("the {c} cell is empty")));
        pairs.push(PairSpec {
            name: cell("name").unwrap_or("").to_string(),
            index: pairs.len(),
            at: format!("line {line}"),
            fixed: need("fixed")?,
            moving: need("moving")?,
            fixed_labels: path("fixed_labels"),
            moving_labels: path("moving_labels"),
            fixed_mask: path("fixed_mask"),
            moving_mask: path("moving_mask"),
            truth: path("truth"),
        });
    }
    if pairs.is_empty() {
        bail!("{}: lists no pairs under its header", path.display());
    }
    Ok(pairs)
}

/// Reads the pairs of `list` in a dataset.json.
fn read_dataset(path: &Path, list: &str) -> Result<Vec<PairSpec>> {
    let ds = Dataset::load(path)?;
    let Some(listed) = ds.pairs(list) else {
        bail!(
            "--list {list:?} is not a pair list of a dataset.json; choose one of {}",
            io::dataset::PAIR_LISTS.join(", ")
        )
    };
    if listed.is_empty() {
        let have: Vec<&str> =
            io::dataset::PAIR_LISTS.iter().copied().filter(|k| ds.pairs(k).is_some_and(|p| !p.is_empty())).collect();
        bail!(
            "{}: no pairs under \"{list}\"{}",
            path.display(),
            if have.is_empty() { String::new() } else { format!(" (pass --list {})", have.join(" or --list ")) }
        );
    }
    Ok(listed
        .iter()
        .enumerate()
        .map(|(index, p)| PairSpec {
            name: p.name.clone().unwrap_or_default(),
            index,
            at: p.key.clone(),
            fixed: p.fixed.clone(),
            moving: p.moving.clone(),
            fixed_labels: p.fixed_label.clone(),
            moving_labels: p.moving_label.clone(),
            fixed_mask: None,
            moving_mask: None,
            truth: p.truth_field.clone(),
        })
        .collect())
}

/// A file name without its image extension (`.nii.gz`, `.png`, ...).
fn stem(p: &Path) -> String {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    for ext in [".nii.gz", ".nii", ".png", ".nrrd", ".nhdr", ".mha", ".mhd"] {
        if lower.ends_with(ext) {
            return name[..name.len() - ext.len()].to_string();
        }
    }
    name
}

fn name_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')
}

/// Checks the pairs' names (derived from the file names where none is given): each becomes a
/// folder of OUT, so it must be a plain, unique file name.
fn name_pairs(pairs: &mut [PairSpec], list: &Path) -> Result<()> {
    let mut seen: HashMap<String, String> = HashMap::new();
    for p in pairs.iter_mut() {
        if p.name.is_empty() {
            let derived = format!("{}_to_{}", stem(&p.moving), stem(&p.fixed));
            p.name = derived.chars().map(|c| if name_char_ok(c) { c } else { '_' }).collect();
        } else if !p.name.chars().all(name_char_ok) || p.name.starts_with('.') {
            bail!(
                "{}: {}: pair name {:?} must be a plain folder name (letters, digits, - _ . +, not starting with a dot)",
                list.display(),
                p.at,
                p.name
            );
        }
        if p.name.starts_with("batch.") {
            bail!("{}: {}: pair name {:?} would clash with the summary files batch.*", list.display(), p.at, p.name);
        }
        if let Some(first) = seen.insert(p.name.clone(), p.at.clone()) {
            bail!(
                "{}: {}: pair name {:?} is also the name of {first}; names must be unique (give a name{})",
                list.display(),
                p.at,
                p.name,
                if list.extension().is_some_and(|e| e == "json") { "" } else { " column" }
            );
        }
    }
    Ok(())
}

/// Size and modification time of an input (for a DICOM folder: of its files), so that a pair
/// whose inputs changed since it was registered is not taken as done. The path is left out:
/// a cohort moved to another disk keeps its results.
fn file_stamp(p: &Path) -> Result<Value> {
    let meta = |p: &Path| std::fs::metadata(p).map_err(|e| anyhow!("{}: {e}", p.display()));
    let mtime_ns = |m: &std::fs::Metadata| {
        m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64)
    };
    let m = meta(p)?;
    let (size, mtime) = if m.is_dir() {
        let mut acc = (0u64, mtime_ns(&m));
        for e in std::fs::read_dir(p).map_err(|e| anyhow!("{}: {e}", p.display()))? {
            let m = meta(&e.map_err(|e| anyhow!("{}: {e}", p.display()))?.path())?;
            acc = (acc.0 + m.len(), acc.1.max(mtime_ns(&m)));
        }
        acc
    } else {
        (m.len(), mtime_ns(&m))
    };
    Ok(json!({ "size": size, "mtime_ns": mtime }))
}

/// The marker's name in a pair's folder.
const MARKER: &str = "done.json";

/// What a pair's result depends on: its inputs (as stamped) and the settings.
fn fingerprint(pair: &PairSpec, settings: &Value) -> Result<Value> {
    let mut inputs = serde_json::Map::new();
    for (role, p) in pair.inputs() {
        inputs.insert(role.to_string(), file_stamp(p)?);
    }
    // through text and back, so that it compares equal to a marker read from disk
    let v = json!({ "inputs": inputs, "settings": settings });
    Ok(serde_json::from_str(&serde_json::to_string(&v)?)?)
}

/// The state of a pair's folder before the batch runs.
enum Found {
    /// The marker matches: the stored outcome.
    Complete(Value),
    /// A marker made from other inputs or settings.
    Stale,
    /// No marker (never run, or interrupted).
    Unfinished,
}

fn inspect(dir: &Path, fp: &Value) -> Found {
    let Ok(text) = std::fs::read_to_string(dir.join(MARKER)) else { return Found::Unfinished };
    // a marker that does not parse was not written by a finished run (they are atomic)
    let Ok(marker) = serde_json::from_str::<Value>(&text) else { return Found::Unfinished };
    if marker.get("inputs") != fp.get("inputs") || marker.get("settings") != fp.get("settings") {
        return Found::Stale;
    }
    let files_present = marker["files"]
        .as_array()
        .is_some_and(|fs| fs.iter().all(|f| f.as_str().is_some_and(|f| dir.join(f).is_file())));
    if files_present {
        Found::Complete(marker)
    } else {
        Found::Unfinished
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    /// Registered by this run.
    Done,
    /// Complete from an earlier run.
    Skipped,
    Failed,
    /// Not reached yet (the summary is rewritten after each pair).
    Pending,
}

/// A pair's line in the summary.
#[derive(Debug, Clone, Serialize)]
struct PairResult {
    name: String,
    index: usize,
    fixed: PathBuf,
    moving: PathBuf,
    out_dir: PathBuf,
    status: Status,
    error: Option<String>,
    mean_dice: Option<f64>,
    endpoint_error_mm: Option<f64>,
    folding_fraction: Option<f64>,
    runtime_s: Option<f64>,
}

impl PairResult {
    fn set_outcome(&mut self, outcome: &Value) {
        self.mean_dice = outcome["mean_dice"].as_f64();
        self.endpoint_error_mm = outcome["endpoint_error_mm"].as_f64();
        self.folding_fraction = outcome["folding_fraction"].as_f64();
        self.runtime_s = outcome["runtime_s"].as_f64();
    }
}

/// The image all pairs share, whose features were computed once.
#[derive(Debug, Clone, Serialize)]
struct SharedInfo {
    role: &'static str,
    image: PathBuf,
    /// Feature computations of the shared image (one per feature frame met).
    extractions: usize,
}

#[derive(Debug, Serialize)]
struct BatchSummary {
    input: PathBuf,
    /// The dataset.json pair list used.
    list: Option<String>,
    out_dir: PathBuf,
    shard: Option<Shard>,
    /// Where the shard came from: "--shard" or "slurm".
    shard_source: Option<&'static str>,
    /// Pairs in the input, and in this shard.
    pairs_listed: usize,
    pairs_in_shard: usize,
    done: usize,
    skipped: usize,
    failed: usize,
    shared_features: Option<SharedInfo>,
    wall_s: f64,
    pairs: Vec<PairResult>,
}

impl BatchSummary {
    fn count(&mut self) {
        let n = |s: Status| self.pairs.iter().filter(|p| p.status == s).count();
        (self.done, self.skipped, self.failed) = (n(Status::Done), n(Status::Skipped), n(Status::Failed));
    }

    fn csv(&self) -> String {
        let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
        let mut out = String::from("index,name,status,mean_dice,endpoint_error_mm,runtime_s,error\n");
        for p in &self.pairs {
            let error = p.error.as_deref().map_or(String::new(), |e| format!("\"{}\"", e.replace('"', "\"\"")));
            out.push_str(&format!(
                "{},{},{},{},{},{},{}\n",
                p.index,
                p.name,
                serde_json::to_value(p.status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
                num(p.mean_dice),
                num(p.endpoint_error_mm),
                num(p.runtime_s),
                error
            ));
        }
        out
    }

    fn write(&self, json_path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        write_atomic(json_path, |f| std::io::Write::write_all(f, text.as_bytes()))?;
        let csv = self.csv();
        write_atomic(&json_path.with_extension("csv"), |f| std::io::Write::write_all(f, csv.as_bytes()))?;
        Ok(())
    }
}

/// Names every input and checks that its header reads, so that a missing or unreadable file
/// stops the batch before any pair is registered.
fn check_pair_inputs(pair: &PairSpec, list: &Path) -> Result<()> {
    let at = |e: anyhow::Error| anyhow!("{}: {}: {e}", list.display(), pair.at);
    for (role, p) in pair.inputs() {
        check_input(p).map_err(|e| at(anyhow!("{role}: {e}")))?;
        // the truth field's header is read with the field itself
        if role != "truth" {
            io::read_grid(p).map_err(|e| at(anyhow!("{role}: {e}")))?;
        }
    }
    let (fg, mg) = (io::read_grid(&pair.fixed)?, io::read_grid(&pair.moving)?);
    same_dimensionality(&pair.fixed, &fg, &pair.moving, &mg).map_err(at)?;
    Ok(())
}

/// The image every pair (of at least two) has in the same role: the moving image of an atlas
/// registered to a cohort, or the fixed image of a cohort registered to an atlas.
fn shared_image(pairs: &[&PairSpec]) -> Option<(Role, PathBuf)> {
    if pairs.len() < 2 {
        return None;
    }
    let same = |of: fn(&PairSpec) -> &Path| -> Option<PathBuf> {
        let key = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let first = key(of(pairs[0]));
        pairs.iter().all(|p| key(of(p)) == first).then(|| of(pairs[0]).to_path_buf())
    };
    same(|p| &p.moving).map(|m| (Role::Moving, m)).or_else(|| same(|p| &p.fixed).map(|f| (Role::Fixed, f)))
}

/// Removes what an interrupted run left in a pair's folder: the marker of an earlier run about to
/// be redone, and hidden temporary files.
fn clear_for_rerun(dir: &Path) -> Result<()> {
    let marker = dir.join(MARKER);
    if marker.exists() {
        std::fs::remove_file(&marker).map_err(|e| anyhow!("{}: cannot remove: {e}", marker.display()))?;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".obelisk-") && e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// The numbers of a registration that the summary shows.
fn outcome_of(s: &RegisterSummary) -> Value {
    json!({
        "mean_dice": s.metrics.mean_dice,
        "endpoint_error_mm": s.metrics.endpoint_error.as_ref().map(|e| e.mean_mm),
        "folding_fraction": s.metrics.folding_fraction,
        "runtime_s": s.runtime_s.get("total"),
    })
}

/// Everything validated: the pairs of this shard, each with its state, and the settings.
struct Plan {
    list: Option<String>,
    listed: usize,
    pairs: Vec<(PairSpec, Value, Found)>,
    shard: Option<(Shard, &'static str)>,
    summary_path: PathBuf,
}

/// Reads the list, picks this shard's pairs and checks them and the output folder; `needs_labels`
/// (`--init labels`) demands both label maps of every pair.
fn plan(args: &BatchArgs, settings: &Value, needs_labels: bool) -> Result<Plan> {
    let is_json = args.pairs.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if !args.pairs.is_file() {
        bail!("{}: {}", args.pairs.display(), if args.pairs.exists() { "is not a file" } else { "file not found" });
    }
    let (mut pairs, list) = if is_json {
        let list = args.list.clone().unwrap_or_else(|| "registration_val".to_string());
        (read_dataset(&args.pairs, &list)?, Some(list))
    } else {
        if args.list.is_some() {
            bail!("--list picks a pair list of a dataset.json; {} is a CSV", args.pairs.display());
        }
        (read_csv(&args.pairs)?, None)
    };
    name_pairs(&mut pairs, &args.pairs)?;
    let shard = match args.shard {
        Some(s) => Some((s, "--shard")),
        None => Shard::from_slurm(|k| std::env::var(k).ok())?.map(|s| (s, "slurm")),
    };
    let listed = pairs.len();
    pairs.retain(|p| shard.is_none_or(|(s, _)| s.has(p.index)));

    prepare_out_dir(&args.out)?;
    let summary_path = match shard {
        Some((s, _)) => args.out.join(format!("batch.shard-{}-of-{}.json", s.index, s.count)),
        None => args.out.join("batch.json"),
    };
    let all_inputs: Vec<&Path> = pairs.iter().flat_map(|p| p.inputs().into_iter().map(|(_, p)| p)).collect();
    for f in [summary_path.clone(), summary_path.with_extension("csv")] {
        io::atomic::check_output(&f, &all_inputs, true)?;
    }
    let mut planned = Vec::with_capacity(pairs.len());
    for p in pairs {
        check_pair_inputs(&p, &args.pairs)?;
        if needs_labels && (p.fixed_labels.is_none() || p.moving_labels.is_none()) {
            bail!(
                "{}: {}: --init labels needs the fixed and moving label maps of every pair",
                args.pairs.display(),
                p.at
            );
        }
        let dir = args.out.join(&p.name);
        if dir.exists() && !dir.is_dir() {
            bail!("{}: {}: output {} exists and is not a folder", args.pairs.display(), p.at, dir.display());
        }
        let fp = fingerprint(&p, settings)?;
        let found = inspect(&dir, &fp);
        if matches!(found, Found::Stale) && !args.force {
            bail!(
                "{}: {}: {} holds a registration of other inputs or with other settings ({MARKER} differs); \
                 pass --force to redo it, or choose another --out",
                args.pairs.display(),
                p.at,
                dir.display()
            );
        }
        planned.push((p, fp, found));
    }
    Ok(Plan { list, listed, pairs: planned, shard, summary_path })
}

pub fn run(args: BatchArgs, out: Output) -> Result<()> {
    let t0 = Instant::now();
    let (model, config) = args.options.validate()?;
    // what a pair's outputs depend on besides its inputs; the version is recorded, not compared
    let settings = json!({
        "features": args.options.features,
        "model": args.options.model,
        "exact": args.options.exact,
        "config": config,
        "pictures": !args.outputs.no_pictures,
        "slice": format!("{:?}", args.outputs.slice),
        "inverse": args.outputs.inverse,
    });
    let plan = plan(&args, &settings, config.start == Start::Labels)?;
    let quiet = out.silent();

    let mut summary = BatchSummary {
        input: args.pairs.clone(),
        list: plan.list.clone(),
        out_dir: args.out.clone(),
        shard: plan.shard.map(|s| s.0),
        shard_source: plan.shard.map(|s| s.1),
        pairs_listed: plan.listed,
        pairs_in_shard: plan.pairs.len(),
        done: 0,
        skipped: 0,
        failed: 0,
        shared_features: None,
        wall_s: 0.0,
        pairs: plan
            .pairs
            .iter()
            .map(|(p, _, _)| PairResult {
                name: p.name.clone(),
                index: p.index,
                fixed: p.fixed.clone(),
                moving: p.moving.clone(),
                out_dir: args.out.join(&p.name),
                status: Status::Pending,
                error: None,
                mean_dice: None,
                endpoint_error_mm: None,
                folding_fraction: None,
                runtime_s: None,
            })
            .collect(),
    };
    let to_run: Vec<&PairSpec> = plan
        .pairs
        .iter()
        .filter(|(_, _, f)| args.force || !matches!(f, Found::Complete(_)))
        .map(|(p, _, _)| p)
        .collect();
    let shared = match shared_image(&to_run) {
        Some((role, image)) if !args.no_shared_features => Some((SharedFeatures::new(role), image)),
        _ => None,
    };
    let progress = Progress::new(quiet);
    let mut runner = Runner { args: &args, model, config, shared, progress: progress.clone(), quiet };
    let bar = progress.bar(plan.pairs.len() as u64, "batch", "pairs");
    let n = plan.pairs.len();
    for (k, (pair, fp, found)) in plan.pairs.iter().enumerate() {
        let result = &mut summary.pairs[k];
        let dir = args.out.join(&pair.name);
        bar.set_message(pair.name.clone());
        match found {
            Found::Complete(marker) if !args.force => {
                result.status = Status::Skipped;
                result.set_outcome(&marker["outcome"]);
                progress.println(&format!("[{}/{n}] {}: complete, skipped", k + 1, pair.name));
            }
            _ => {
                let registered = register_one(pair, fp, &dir, &mut runner);
                match registered {
                    Ok(outcome) => {
                        result.status = Status::Done;
                        result.set_outcome(&outcome);
                        let dice = result.mean_dice.map_or(String::new(), |d| format!(", mean Dice {d:.3}"));
                        let epe =
                            result.endpoint_error_mm.map_or(String::new(), |e| format!(", endpoint error {e:.2} mm"));
                        progress.println(&format!(
                            "[{}/{n}] {}: done in {:.1} s{dice}{epe}",
                            k + 1,
                            pair.name,
                            result.runtime_s.unwrap_or(f64::NAN)
                        ));
                    }
                    Err(e) => {
                        let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ").replace('\n', " ");
                        progress.println(&format!("[{}/{n}] {}: FAILED: {msg}", k + 1, pair.name));
                        result.status = Status::Failed;
                        result.error = Some(msg);
                    }
                }
            }
        }
        bar.inc(1);
        summary.count();
        summary.shared_features = runner.shared.as_ref().map(|(s, image)| SharedInfo {
            role: if s.role() == Role::Moving { "moving" } else { "fixed" },
            image: image.clone(),
            extractions: s.extractions(),
        });
        summary.wall_s = t0.elapsed().as_secs_f64();
        // after every pair, so that a long batch can be followed and a killed one leaves a record
        summary.write(&plan.summary_path)?;
    }
    bar.finish_and_clear();
    summary.wall_s = t0.elapsed().as_secs_f64();
    summary.write(&plan.summary_path)?;
    out.finish(&summary, || {
        println!(
            "{} pairs: {} done, {} skipped (complete), {} failed in {:.1} s; summary in {}",
            summary.pairs_in_shard,
            summary.done,
            summary.skipped,
            summary.failed,
            summary.wall_s,
            plan.summary_path.display()
        );
        if let Some(s) = &summary.shared_features {
            println!(
                "features of the {} image all pairs share, {}, computed {} time(s) instead of once per pair",
                s.role,
                s.image.display(),
                s.extractions
            );
        }
    })?;
    if summary.failed > 0 {
        bail!(
            "{} of {} pairs failed (their errors are in {})",
            summary.failed,
            summary.pairs_in_shard,
            plan.summary_path.display()
        );
    }
    Ok(())
}

/// What every pair of a run shares: the arguments, the validated options, the cache of the
/// shared image's features, the progress display.
struct Runner<'a> {
    args: &'a BatchArgs,
    model: Option<ObeliskFeatures>,
    config: MethodConfig,
    shared: Option<(SharedFeatures, PathBuf)>,
    progress: Progress,
    quiet: bool,
}

/// Registers one pair into `dir` as `obelisk register` would, then writes its marker; returns
/// the outcome recorded in the marker. A panic inside is caught and reported as this pair's
/// failure, so that one bad pair does not stop a cohort.
fn register_one(pair: &PairSpec, fp: &Value, dir: &Path, r: &mut Runner) -> Result<Value> {
    clear_for_rerun(dir)?;
    let reg = RegisterArgs {
        fixed: pair.fixed.clone(),
        moving: pair.moving.clone(),
        fixed_labels: pair.fixed_labels.clone(),
        moving_labels: pair.moving_labels.clone(),
        truth: pair.truth.clone(),
        fixed_mask: pair.fixed_mask.clone(),
        moving_mask: pair.moving_mask.clone(),
        out: dir.to_path_buf(),
        options: r.args.options.clone(),
        outputs: r.args.outputs.clone(),
        // the folder is the batch's own: an interrupted run's outputs are replaced
        force: true,
    };
    let run = || -> Result<RegisterSummary> {
        let job = reg.into_job_with(r.model.clone(), r.config.clone(), r.quiet)?;
        let mut bars = r.progress.registration(&job.config);
        let summary = job.run_sharing(&mut bars, r.shared.as_mut().map(|s| &mut s.0))?;
        bars.finish();
        Ok(summary)
    };
    let summary = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(r) => r.with_context(|| format!("pair {} ({})", pair.name, pair.at))?,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            bail!("pair {} ({}): internal error: {what}", pair.name, pair.at);
        }
    };
    let outcome = outcome_of(&summary);
    let mut files: Vec<String> =
        summary.files.iter().filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    files.push("metrics.json".to_string());
    let marker = json!({
        "obelisk_version": env!("CARGO_PKG_VERSION"),
        "name": pair.name,
        "paths": pair.inputs().into_iter().map(|(role, p)| {
            (role.to_string(), json!(p.canonicalize().unwrap_or_else(|_| p.to_path_buf())))
        }).collect::<serde_json::Map<_, _>>(),
        "inputs": fp["inputs"],
        "settings": fp["settings"],
        "files": files,
        "outcome": outcome,
    });
    let text = serde_json::to_string_pretty(&marker)?;
    write_atomic(&dir.join(MARKER), |f| std::io::Write::write_all(f, text.as_bytes()))?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parsing_and_membership() {
        let s: Shard = "2/3".parse().unwrap();
        assert_eq!(s, Shard { index: 2, count: 3 });
        assert_eq!((0..7).filter(|&i| s.has(i)).collect::<Vec<_>>(), vec![1, 4]);
        for bad in ["0/3", "4/3", "1", "a/b", "1/0", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn slurm_array_tasks_map_to_shards() {
        fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        }
        assert_eq!(Shard::from_slurm(env(&[])).unwrap(), None);
        let zero = [("SLURM_ARRAY_TASK_ID", "0"), ("SLURM_ARRAY_TASK_COUNT", "4")];
        assert_eq!(Shard::from_slurm(env(&zero)).unwrap(), Some(Shard { index: 1, count: 4 }));
        // --array=1-10
        let one = [("SLURM_ARRAY_TASK_ID", "10"), ("SLURM_ARRAY_TASK_COUNT", "10"), ("SLURM_ARRAY_TASK_MIN", "1")];
        assert_eq!(Shard::from_slurm(env(&one)).unwrap(), Some(Shard { index: 10, count: 10 }));
        // --array=0-20:5 → 0, 5, 10, 15, 20
        let step = [
            ("SLURM_ARRAY_TASK_ID", "15"),
            ("SLURM_ARRAY_TASK_COUNT", "5"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_STEP", "5"),
        ];
        assert_eq!(Shard::from_slurm(env(&step)).unwrap(), Some(Shard { index: 4, count: 5 }));
        let no_count = [("SLURM_ARRAY_TASK_ID", "3")];
        assert!(Shard::from_slurm(env(&no_count)).unwrap_err().to_string().contains("SLURM_ARRAY_TASK_COUNT"));
        let outside = [("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_COUNT", "4")];
        assert!(Shard::from_slurm(env(&outside)).is_err());
        let garbage = [("SLURM_ARRAY_TASK_ID", "x"), ("SLURM_ARRAY_TASK_COUNT", "4")];
        assert!(Shard::from_slurm(env(&garbage)).is_err());
    }

    #[test]
    fn csv_lines_split_with_quotes() {
        assert_eq!(split_csv_line("a, b ,c").unwrap(), vec!["a", "b", "c"]);
        assert_eq!(split_csv_line(r#""x,y", "say ""hi""",,"#).unwrap(), vec!["x,y", "say \"hi\"", "", ""]);
        assert!(split_csv_line(r#""open"#).is_err());
        assert!(split_csv_line(r#""a"b"#).is_err());
    }

    #[test]
    fn csv_reading_names_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("pairs.csv");
        let read = |text: &str| {
            std::fs::write(&csv, text).unwrap();
            read_csv(&csv).map_err(|e| e.to_string())
        };
        let pairs = read("# cohort\nFixed,moving,moving_label,name\nf.nii.gz,/abs/m.nii.gz,,p1\n\n").unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].fixed, dir.path().join("f.nii.gz"));
        assert_eq!(pairs[0].moving, Path::new("/abs/m.nii.gz"));
        assert_eq!(pairs[0].moving_labels, None);
        assert_eq!((pairs[0].name.as_str(), pairs[0].at.as_str()), ("p1", "line 3"));
        let e = read("fixed,moving\na.nii,b.nii\nc.nii\n").unwrap_err();
        assert!(e.contains("pairs.csv: line 3: 1 cells, but the header names 2 columns"), "{e}");
        let e = read("fixed,mvoing\na,b\n").unwrap_err();
        assert!(e.contains("line 1: unknown column \"mvoing\""), "{e}");
        let e = read("fixed,name\na,b\n").unwrap_err();
        assert!(e.contains("line 1: the header has no \"moving\" column"), "{e}");
        let e = read("fixed,moving\n,b\n").unwrap_err();
        assert!(e.contains("line 2: the fixed cell is empty"), "{e}");
        assert!(read("fixed,moving\n").unwrap_err().contains("lists no pairs"));
    }

    #[test]
    fn pair_names_are_derived_checked_and_unique() {
        let spec = |name: &str, fixed: &str, moving: &str, line: usize| PairSpec {
            name: name.into(),
            index: line,
            at: format!("line {line}"),
            fixed: fixed.into(),
            moving: moving.into(),
            fixed_labels: None,
            moving_labels: None,
            fixed_mask: None,
            moving_mask: None,
            truth: None,
        };
        let list = Path::new("p.csv");
        let mut ok = vec![spec("", "d/s 1.nii.gz", "atlas.nii", 2), spec("x", "a.png", "b.png", 3)];
        name_pairs(&mut ok, list).unwrap();
        assert_eq!(ok[0].name, "atlas_to_s_1");
        let mut dup = vec![spec("", "f.nii", "m.nii", 2), spec("m_to_f", "g.nii", "n.nii", 3)];
        let e = name_pairs(&mut dup, list).unwrap_err().to_string();
        assert!(e.contains("line 3: pair name \"m_to_f\" is also the name of line 2"), "{e}");
        for bad in ["../x", "a/b", ".hidden", "batch.json"] {
            let e = name_pairs(&mut [spec(bad, "f", "m", 2)], list).unwrap_err().to_string();
            assert!(e.contains("line 2: pair name"), "{bad}: {e}");
        }
    }
}
