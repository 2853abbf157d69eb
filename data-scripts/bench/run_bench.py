#!/usr/bin/env python3
"""Side-by-side registration (and segmentation) benchmark of obelisk against its peers.

Usually started by bench.sh, which makes the virtual environment and builds the binary. Every
tool runs as its own process with 2 threads; its result is converted to an ITK displacement
field on the fixed grid, and every field goes through the same evaluation: `obelisk warp` of the
moving label map, then `obelisk eval` (Dice per organ, HD95, SDlogJ, folding, endpoint error
where a true field exists). Outputs in --out: results.json, results.md, results.png.

--smoke: one tiny synthetic pair, obelisk (mind, intensity) and SimpleITK demons only; needs
just SimpleITK, numpy and nibabel (data-scripts/setup-venv.sh).

--corpus DIR (default ROOT/data/corpus when it exists; --no-corpus skips it): the pairs of the
development corpus that data-scripts/fetch_corpus.sh builds, each in the set named by its anatomy
(brain, head_ct, abdomen, 2d); --sets picks sets (e.g. --sets brain,2d; synthetic and real count
as sets too). The report has one table per set with every tool side by side.

--start labels: every tool starts from the same translation, the one that lines up the pair's
shared label maps (`obelisk register --init labels` with no optimisation); the peers get it as
their initial transform (peers.py --init-translation), obelisk runs with `--init labels`. The
reference row `label start` is that translation alone. The default, --start own, lets every tool
use its own initialisation.
"""

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OURS = ["obelisk-obelisk", "obelisk-mind", "obelisk-intensity"]
PEERS = ["ants-syn", "elastix-bspline", "sitk-demons", "sitk-bspline", "convexadam"]
# Python module each peer needs; a missing one skips that peer with a note
PEER_MODULES = {
    "ants-syn": "ants",
    "elastix-bspline": "itk",
    "sitk-demons": "SimpleITK",
    "sitk-bspline": "SimpleITK",
    "convexadam": "convexAdam",
}
# rows that are no registration but the yardstick of their pair
REFERENCES = ("identity", "truth", "label start")
# the corpus's anatomies (data-scripts/fetch_corpus.sh), in the order of the report
CORPUS_SETS = ["brain", "head_ct", "abdomen", "2d"]
SET_ORDER = ["synthetic", "real", *CORPUS_SETS]
SET_TITLES = {"synthetic": "Synthetic pairs", "real": "Real pairs", "brain": "Corpus: brain MR",
              "head_ct": "Corpus: head CT", "abdomen": "Corpus: abdominal CT", "2d": "Corpus: 2D slices"}
# tools that register 3D volumes only: on a 2D pair their row says so instead of failing
THREE_D_ONLY = {"convexadam": "convexAdam registers 3D volumes only"}
# the real pairs of data/totalseg/dataset.json that the benchmark uses: fixed <- moving
REAL_PAIRS = [("ct_a", "ct_b"), ("ct_b", "ct_a"), ("ct_a", "mr_c")]
SEG_ARCHS = ["obelisk", "hybrid", "unet"]
# ablation -> the `obelisk train` flag that switches it on; skipped while the binary lacks it
SEG_ABLATIONS = {
    "no augmentation": "--no-augmentation",
    "no OHEM": "--no-ohem",
    "single-offset kernel": "--single-offset",
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Failed(Exception):
    pass


def run_measured(cmd, env=None, timeout=None, cwd=None):
    """Runs cmd; returns (stdout, stderr, wall seconds). Raises Failed."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise Failed(f"timed out after {timeout} s")
    wall = time.perf_counter() - t
    if p.returncode != 0:
        last = (err.strip().splitlines() or ["(no message)"])[-1]
        raise Failed(f"exit {p.returncode}: {last}")
    return out, err, wall


def timed(cmd, workdir, env=None, timeout=None, cwd=None):
    """Runs cmd under GNU time, which reports the peak RSS of that one process (the child rusage
    of this script would be the maximum over all tools); returns (stdout, wall s, peak RSS MB)."""
    rss_file = Path(workdir) / "peak_rss_kb.txt"
    out, _, wall = run_measured(["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + cmd, env=env, timeout=timeout,
                                cwd=cwd)
    rss_mb = int(rss_file.read_text().split()[-1]) / 1024.0
    return out, wall, rss_mb


class Obelisk:
    def __init__(self, binary, threads):
        self.binary = str(binary)
        self.threads = threads

    def cmd(self, *args):
        return [self.binary, "--threads", str(self.threads), "--quiet", *map(str, args)]

    def run(self, *args):
        out, _, _ = run_measured(self.cmd(*args))
        return out

    def help(self, sub):
        return subprocess.run([self.binary, sub, "--help"], capture_output=True, text=True).stdout

    def version(self):
        return subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout.strip()


def env_threads(n):
    env = dict(os.environ)
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(n)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


# ---------------------------------------------------------------------------------------------
# data


def load_names(dataset_json):
    d = json.loads(Path(dataset_json).read_text())
    return {int(k): v for k, v in d.get("labels", {}).items()}


def synthetic_pairs(ob, out, n, size, spacing, max_disp, seed):
    if n <= 0:
        return []
    d = out / "data" / "synthetic"
    if not (d / "dataset.json").exists():
        ob.run("synth", "--out", d, "--subjects", 0, "--pairs", n, "--seed", seed, "--max-displacement", max_disp,
               "--size", ",".join(map(str, size)), "--spacing", ",".join(map(str, spacing)))
    ds = json.loads((d / "dataset.json").read_text())
    names = load_names(d / "dataset.json")
    pairs = []
    for i, p in enumerate(ds["registration_val"][:n]):
        pairs.append({
            "name": f"synth_{i:03d}", "set": "synthetic", "names": names,
            "fixed": d / p["fixed"], "moving": d / p["moving"],
            "fixed_labels": d / p["fixed_label"], "moving_labels": d / p["moving_label"],
            "truth": d / p["truth_field"],
        })
    return pairs


def real_pairs(data_dir):
    ds_path = data_dir / "dataset.json"
    if not ds_path.exists():
        raise Failed(f"{ds_path}: not found (run data-scripts/fetch_totalseg.sh)")
    ds = json.loads(ds_path.read_text())
    names = load_names(ds_path)
    by_key = {(Path(p["fixed"]).name, Path(p["moving"]).name): p for p in ds["registration_val"]}
    pairs = []
    for f, m in REAL_PAIRS:
        p = by_key.get((f + ".nii.gz", m + ".nii.gz"))
        if p is None:
            raise Failed(f"{ds_path}: no registration pair {f} <- {m}")
        pairs.append({
            "name": f"{f}<-{m}", "set": "real", "names": names,
            "fixed": data_dir / p["fixed"], "moving": data_dir / p["moving"],
            "fixed_labels": data_dir / p["fixed_label"], "moving_labels": data_dir / p["moving_label"],
            "truth": None,
        })
    return pairs


def corpus_pairs(corpus_dir, sets=None):
    """The pairs of data/corpus/dataset.json (fetch_corpus.sh), set = their anatomy; `sets`
    keeps only those anatomies."""
    ds_path = corpus_dir / "dataset.json"
    if not ds_path.exists():
        raise Failed(f"{ds_path}: not found (run data-scripts/fetch_corpus.sh)")
    ds = json.loads(ds_path.read_text())
    pairs = []
    for p in ds["registration_val"]:
        if sets is not None and p["anatomy"] not in sets:
            continue
        pairs.append({
            "name": p["name"], "set": p["anatomy"], "modality": p.get("modality"),
            "names": {int(k): v for k, v in p.get("label_names", {}).items()},
            "fixed": corpus_dir / p["fixed"], "moving": corpus_dir / p["moving"],
            "fixed_labels": corpus_dir / p["fixed_label"], "moving_labels": corpus_dir / p["moving_label"],
            "truth": corpus_dir / p["truth_field"] if p.get("truth_field") else None,
            "is_2d": len(nib.load(str(corpus_dir / p["fixed"])).shape) == 2,
        })
    return pairs


def train_feature_model(ob, out, size, spacing, subjects, iterations, seed):
    """A small OBELISK-Net trained on a synthetic cohort, for `register --features obelisk`."""
    cohort = out / "data" / "cohort"
    model = out / "model"
    if not (cohort / "dataset.json").exists():
        ob.run("synth", "--out", cohort, "--subjects", subjects, "--seed", seed,
               "--size", ",".join(map(str, size)), "--spacing", ",".join(map(str, spacing)))
    info = {"subjects": subjects, "iterations": iterations, "size": size, "spacing": spacing}
    if not (model / "model.safetensors").exists():
        model.mkdir(parents=True, exist_ok=True)
        _, wall, rss = timed(ob.cmd("train", "--dataset", cohort / "dataset.json", "--out", model,
                                    "--iterations", iterations, "--seed", 0), model, env=env_threads(ob.threads))
        info.update(train_s=wall, train_peak_rss_mb=rss)
        (model / "bench_train.json").write_text(json.dumps(info))
    else:
        info = json.loads((model / "bench_train.json").read_text())
    return model, info


# ---------------------------------------------------------------------------------------------
# running the tools


def label_start(pair, workdir, ob, timeout):
    """The translation that lines up the pair's shared label maps, as `obelisk register --init
    labels` finds it (no affine, no deformable iterations): LPS mm, ITK convention (the fixed
    point x maps to the moving point x + t). Returns (t, seconds)."""
    if pair.get("fixed_labels") is None or pair.get("moving_labels") is None:
        raise Failed(f"{pair['name']}: --start labels needs both label maps")
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [ob.binary, "--threads", str(ob.threads), "register", "--fixed", str(pair["fixed"]), "--moving",
           str(pair["moving"]), "--fixed-labels", str(pair["fixed_labels"]), "--moving-labels",
           str(pair["moving_labels"]), "--init", "labels", "--iterations", "0", "--affine-iterations", "0",
           "--no-pictures", "--json", "--force", "--out", str(workdir / "reg")]
    out, _, wall = run_measured(cmd, env=env_threads(ob.threads), timeout=timeout)
    t = [float(v) for v in json.loads(out)["init_translation_mm"]]
    return t, wall


def run_tool(tool, pair, workdir, ob, model, threads, timeout, start=None):
    """One registration; returns (field path, wall s, register s, peak RSS MB, versions).
    `start`: the label start's translation (--start labels), or None for each tool's own start."""
    workdir.mkdir(parents=True, exist_ok=True)
    field = workdir / "field.nii.gz"
    for stale in (field, workdir / "reg" / "field.nii.gz"):
        if stale.exists():
            stale.unlink()
    env = env_threads(threads)
    if tool.startswith("obelisk-"):
        feats = tool.split("-", 1)[1]
        args = ["register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", workdir / "reg",
                "--features", feats, "--no-pictures", "--json", "--force"]
        if feats == "obelisk":
            args += ["--model", model]
        if start is not None:
            # the same start as the peers: the search on the label maps (then affine, deformable)
            args += ["--init", "labels", "--fixed-labels", pair["fixed_labels"], "--moving-labels",
                     pair["moving_labels"]]
        # --json alone: stdout holds nothing but the summary
        cmd = [ob.binary, "--threads", str(threads), *map(str, args)]
        out, wall, rss = timed(cmd, workdir, env=env, timeout=timeout)
        summary = json.loads(out)
        os.replace(workdir / "reg" / "field.nii.gz", field)
        return field, wall, summary["runtime_s"].get("total"), rss, {}
    cmd = [sys.executable, str(HERE / "peers.py"), tool, "--fixed", str(pair["fixed"]), "--moving",
           str(pair["moving"]), "--out", str(field), "--threads", str(threads)]
    if start is not None:
        # one argument with "=": a leading minus would read as an option
        cmd += ["--init-translation=" + ",".join(repr(float(v)) for v in start)]
    # transformix leaves deformationField.nii in the working folder: keep it in the run's folder
    out, wall, rss = timed(cmd, workdir, env=env, timeout=timeout, cwd=workdir)
    info = json.loads(out.strip().splitlines()[-1])
    return field, wall, info["register_s"], rss, info["versions"]


def write_like(ref_img, data, path, dtype):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), ref_img.affine, ref_img.header)
    img.set_data_dtype(dtype)
    nib.save(img, str(path))


def zero_field(fixed_path, path, translation=(0.0, 0.0, 0.0)):
    """The identity (or the translation x -> x + t, LPS mm) as an ITK displacement field on the
    fixed grid (written by SimpleITK, like the peers' fields); 2D images get a 2D field (the
    translation's z is dropped)."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    size = fixed.GetSize()
    dim = fixed.GetDimension()
    u = np.empty((*reversed(size), dim), np.float32)
    u[...] = np.asarray(translation, np.float32)[:dim]
    f = sitk.GetImageFromArray(u, isVector=True)
    f.CopyInformation(fixed)
    sitk.WriteImage(f, str(path))


def evaluate(pair, field, workdir, ob):
    """Warps the moving labels with `field`, restricts both label maps to the fixed voxels that
    the moving image covers after warping, and runs `obelisk eval`."""
    # in the run's own folder: a folder shared by pairs would hand one pair's moving grid to the
    # next (the reference rows' folders sit one level higher than the tools' run folders)
    ones = workdir / "moving_ones.nii.gz"
    if not ones.exists():
        m = nib.load(str(pair["moving"]))
        write_like(m, np.ones(m.shape[:3], np.float32), ones, np.float32)
    warped = workdir / "warped_labels.nii.gz"
    cover = workdir / "coverage.nii.gz"
    ob.run("warp", "--moving", pair["moving_labels"], "--field", field, "--labels", "--out", warped,
           "--reference", pair["fixed"], "--force")
    ob.run("warp", "--moving", ones, "--field", field, "--out", cover, "--force")
    mask = np.asarray(nib.load(str(cover)).dataobj) > 0.5
    fl_img = nib.load(str(pair["fixed_labels"]))
    fl = np.asarray(fl_img.dataobj).astype(np.uint8)
    wl = np.asarray(nib.load(str(warped)).dataobj).astype(np.uint8)
    fl_m, wl_m = workdir / "fixed_labels_in_overlap.nii.gz", workdir / "warped_labels_in_overlap.nii.gz"
    write_like(fl_img, np.where(mask, fl, 0), fl_m, np.uint8)
    write_like(fl_img, np.where(mask, wl, 0), wl_m, np.uint8)
    args = ["eval", "--fixed-labels", fl_m, "--warped-labels", wl_m, "--field", field, "--json"]
    if pair["truth"] is not None:
        args += ["--truth", pair["truth"]]
    cmd = [ob.binary, "--threads", str(ob.threads), *map(str, args)]
    out, _, _ = run_measured(cmd)
    m = json.loads(out)
    # organs present in both subjects' label maps (anywhere); those absent from both maps inside
    # the overlap are not reported by eval and stay out of the mean
    moving_ids = set(np.unique(np.asarray(nib.load(str(pair["moving_labels"])).dataobj)).astype(int))
    both = (set(np.unique(fl).astype(int)) & moving_ids) - {0}
    per = {l["label"]: l for l in m["labels"] if l["label"] in both}
    dice = {pair["names"].get(k, str(k)): v["dice"] for k, v in sorted(per.items())}
    hd = [v["hd95_mm"] for v in per.values() if v["hd95_mm"] is not None]
    epe = m.get("endpoint_error")
    return {
        "dice": dice,
        "mean_dice": float(np.mean(list(dice.values()))) if dice else None,
        "mean_hd95_mm": float(np.mean(hd)) if hd else None,
        "sd_log_j": m["sd_log_j"],
        "folding_percent": 100.0 * m["folding_fraction"],
        "epe_mean_mm": epe["mean_mm"] if epe else None,
        "epe_p95_mm": epe["p95_mm"] if epe else None,
        "overlap_percent": 100.0 * float(mask.mean()),
    }


def bench_registration(args, ob, out, pairs, tools, model, model_info):
    """Returns (rows, starts): starts maps a pair to its label start (--start labels)."""
    rows, starts = [], {}
    for pair in pairs:
        pdir = out / "runs" / pair["name"].replace("<-", "_from_")
        start = None
        if args.start == "labels":
            # one start for every tool: its own folder, so that the runs of --start own stay apart
            pdir = pdir / "start_labels"
            try:
                start, secs = label_start(pair, pdir / "label start", ob, args.timeout)
            except (Failed, json.JSONDecodeError, KeyError, ValueError, OSError) as e:
                log(f"{pair['name']:<14} label start FAILED: {e}; its tools are not run")
                rows.append({"pair": pair["name"], "set": pair["set"], "tool": "label start", "status": "failed",
                             "error": str(e)})
                continue
            starts[pair["name"]] = {"translation_mm": start, "seconds": secs}
            log(f"{pair['name']:<14} label start ({', '.join(f'{v:.1f}' for v in start)}) mm  [{secs:.1f} s]")
            refs = [("label start", None)]
        else:
            refs = [("identity", None)]
        refs += [("truth", pair["truth"])] if pair["truth"] is not None else []
        for name, field in refs:
            wd = pdir / name
            wd.mkdir(parents=True, exist_ok=True)
            if field is None:
                field = wd / "field.nii.gz"
                if not field.exists():
                    zero_field(pair["fixed"], field, start if start is not None else (0.0, 0.0, 0.0))
            row = {"pair": pair["name"], "set": pair["set"], "tool": name, "status": "reference"}
            row.update(evaluate(pair, field, wd, ob))
            rows.append(row)
            if name == "label start":
                starts[pair["name"]].update(mean_dice=row["mean_dice"], overlap_percent=row["overlap_percent"])
            log(f"{pair['name']:<14} {name:<18} Dice {fmt(row['mean_dice'])}")
        for tool in tools:
            row = {"pair": pair["name"], "set": pair["set"], "tool": tool, "start": args.start}
            if pair.get("is_2d") and tool in THREE_D_ONLY:
                row.update(status="n/a", error=f"{THREE_D_ONLY[tool]}; this pair is 2D")
                log(f"{pair['name']:<14} {tool:<18} n/a: {row['error']}")
                rows.append(row)
                continue
            walls, regs, rsss = [], [], []
            try:
                for r in range(args.repeats):
                    # A run of minutes varies by a few per cent of its length between repeats; repeating it
                    # would double or triple the benchmark's hours for no change in the table's ranking.
                    if r > 0 and walls[0] >= args.repeat_below:
                        break
                    wd = pdir / tool / f"run{r}"
                    field, wall, reg, rss, versions = run_tool(tool, pair, wd, ob, model, args.threads, args.timeout,
                                                               start)
                    walls.append(wall)
                    regs.append(reg)
                    rsss.append(rss)
                    if r == 0:
                        row["versions"] = versions
                        row.update(evaluate(pair, field, wd, ob))
                row.update(status="ok", wall_s=statistics.median(walls), wall_s_all=walls,
                           register_s=statistics.median(r for r in regs if r is not None) if any(
                               r is not None for r in regs) else None,
                           peak_rss_mb=max(rsss))
                log(f"{pair['name']:<14} {tool:<18} Dice {fmt(row['mean_dice'])}  wall {row['wall_s']:.1f} s  "
                    f"RSS {row['peak_rss_mb']:.0f} MB")
            except (Failed, json.JSONDecodeError, KeyError, OSError) as e:
                row.update(status="failed", error=str(e))
                log(f"{pair['name']:<14} {tool:<18} FAILED: {e}")
            rows.append(row)
    return rows, starts


# ---------------------------------------------------------------------------------------------
# segmentation table


def safetensors_params(path):
    """Number of parameters in a .safetensors file (header: 8-byte length, then JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    total = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        # batch-norm running statistics are buffers, not trained parameters
        if k.endswith("running_mean") or k.endswith("running_var"):
            continue
        total += int(np.prod(v["shape"])) if v["shape"] else 1
    return total


def bench_segmentation(args, ob, out):
    help_text = ob.help("train")
    # clap lists the choices as "[possible values: a, b]" or as an indented list under --arch
    arch_help = help_text.split("--arch", 1)[-1].split("\n  -", 1)[0].split("\n      --", 1)[0]
    archs = set(re.findall(r"[a-z][a-z0-9-]*", arch_help))
    # keyed by what generates it: a cohort left by a run at another size must not be reused
    # under this run's size in the table
    size = "x".join(map(str, args.seg_size)) + "_" + "x".join(f"{v:g}" for v in args.seg_spacing)
    cohort = out / "data" / f"seg_cohort_{args.seg_subjects}_{size}_{args.seed + 100}"
    if not (cohort / "dataset.json").exists():
        ob.run("synth", "--out", cohort, "--subjects", args.seg_subjects, "--seed", args.seed + 100,
               "--size", ",".join(map(str, args.seg_size)), "--spacing", ",".join(map(str, args.seg_spacing)))
    variants = []
    for arch in SEG_ARCHS:
        variants.append((arch, arch, []))
    for ab, flag in SEG_ABLATIONS.items():
        variants.append((f"obelisk, {ab}", "obelisk", [flag]))
    rows, notes = [], []
    test_image = cohort / "subject_000_image.nii.gz"
    for name, arch, flags in variants:
        iterations = args.seg_arch_iterations.get(arch, args.seg_iterations)
        row = {"variant": name, "arch": arch, "flags": flags, "iterations": iterations}
        missing = [f for f in flags if f not in help_text]
        if arch not in archs:
            missing.append(f"--arch {arch}")
        if missing:
            row.update(status="skipped", note=f"`obelisk train` has no {', '.join(missing)}")
            notes.append(f"{name}: skipped, `obelisk train --help` lists no {', '.join(missing)}")
            rows.append(row)
            log(f"segmentation {name}: skipped ({', '.join(missing)} not supported)")
            continue
        wd = out / "seg" / name.replace(", ", "_").replace(" ", "-")
        wd.mkdir(parents=True, exist_ok=True)
        try:
            cmd = ob.cmd("train", "--dataset", cohort / "dataset.json", "--out", wd, "--arch", arch, "--folds",
                         args.seg_folds, "--iterations", iterations, "--seed", 0, "--force", *flags)
            _, wall, rss = timed(cmd, wd, env=env_threads(args.threads), timeout=args.timeout)
            cv = json.loads((wd / "cv.json").read_text())
            seg_out = wd / "inference.nii.gz"
            _, inf_wall, inf_rss = timed(ob.cmd("segment", "--model", wd, "--image", test_image, "--out", seg_out,
                                                "--force"), wd, env=env_threads(args.threads))
            row.update(status="ok", dice=cv["mean"], mean_dice=cv["mean_dice"],
                       params=safetensors_params(wd / "model.safetensors"),
                       fold_s=[f["seconds"] for f in cv["folds"]], train_total_s=wall, train_peak_rss_mb=rss,
                       inference_s=inf_wall, inference_peak_rss_mb=inf_rss)
            log(f"segmentation {name}: mean Dice {fmt(row['mean_dice'])}, {row['params']} parameters")
        except (Failed, OSError, KeyError, json.JSONDecodeError) as e:
            row.update(status="failed", error=str(e))
            log(f"segmentation {name}: FAILED {e}")
        rows.append(row)
    return {"rows": rows, "notes": notes, "subjects": args.seg_subjects, "folds": args.seg_folds,
            "iterations": args.seg_iterations, "arch_iterations": args.seg_arch_iterations,
            "size": args.seg_size, "spacing": args.seg_spacing,
            "inference_image": str(test_image.relative_to(out))}


# ---------------------------------------------------------------------------------------------
# reporting


def fmt(v, p=3):
    return "–" if v is None else f"{v:.{p}f}"


def summarise(rows):
    """Mean over the pairs of a set, per tool (failed runs count as failures, not zeros)."""
    out = {}
    for row in rows:
        key = (row["set"], row["tool"])
        out.setdefault(key, []).append(row)
    summary = []
    for (s, tool), rs in out.items():
        # a tool that cannot take a pair (convexAdam on 2D) is not counted for it
        rs = [r for r in rs if r["status"] != "n/a"]
        ok = [r for r in rs if r["status"] in ("ok", "reference")]

        def mean(k):
            v = [r[k] for r in ok if r.get(k) is not None]
            return float(np.mean(v)) if v else None

        summary.append({"set": s, "tool": tool, "pairs": len(rs), "ok": len(ok),
                        **{k: mean(k) for k in ("mean_dice", "mean_hd95_mm", "sd_log_j", "folding_percent",
                                                "epe_mean_mm", "wall_s", "register_s", "peak_rss_mb",
                                                "overlap_percent")}})
    return summary


def start_markdown(results):
    """The note on the start every tool used and, with --start labels, the start per pair."""
    if results.get("start", "own") != "labels":
        return ("Start: **own** (`--start own`): every tool from its own initialisation (obelisk: translation "
                "search on the image features; ANTs: centre of mass; elastix, SimpleITK, convexAdam: geometric "
                "centre); `identity` is the headers as they are.\n")
    L = ["Start: **labels** (`--start labels`): every tool starts from the same translation, the one that lines "
         "up the shared structures of the two label maps (`obelisk register --init labels --iterations 0 "
         "--affine-iterations 0`). The peers get it as their initial transform, then run their own stages "
         "(ANTs `initial_transform`, elastix with the moving header shifted by it, no automatic "
         "initialisation and its samples drawn where the moving image covers the fixed one at the start, SimpleITK and convexAdam with it in place of the geometric centring, before their "
         "affine stage); obelisk runs `register --init labels` (the same search) and its usual stages. "
         "The row `label start` is that translation alone, evaluated like every field.\n",
         "| pair | start translation mm (LPS, fixed x -> moving x + t) | Dice at the start | overlap % | s |",
         "|---|---|---:|---:|---:|"]
    for pair, st in results.get("starts", {}).items():
        t = ", ".join(f"{v:.1f}" for v in st["translation_mm"])
        L.append(f"| {pair} | ({t}) | {fmt(st.get('mean_dice'))} | {fmt(st.get('overlap_percent'), 1)} | "
                 f"{fmt(st.get('seconds'), 1)} |")
    return "\n".join(L) + "\n"


def sets_present(rows):
    present = list(dict.fromkeys(r["set"] for r in rows))
    return [s for s in SET_ORDER if s in present] + [s for s in present if s not in SET_ORDER]


def side_by_side_markdown(reg, s):
    """One row per pair of set `s`, one column per tool (Dice, EPE where the truth is known,
    folding %, wall s); the identity and truth rows' Dice first."""
    rows = [r for r in reg["rows"] if r["set"] == s]
    tools = [t for t in dict.fromkeys(r["tool"] for r in rows) if t not in REFERENCES]
    refs = [t for t in REFERENCES if any(r["tool"] == t for r in rows)]
    by = {(r["pair"], r["tool"]): r for r in rows}
    L = [f"Per pair, side by side (Dice / EPE mm / folding % / wall s; EPE only where the true field is known):\n",
         "| pair | " + " | ".join(f"{t} Dice" for t in refs) + (" | " if refs else "") + " | ".join(tools) + " |",
         "|---|" + "---:|" * len(refs) + "---|" * len(tools)]
    for pair in dict.fromkeys(r["pair"] for r in rows):
        cells = [fmt(by[(pair, t)].get("mean_dice")) if (pair, t) in by else "" for t in refs]
        for t in tools:
            r = by.get((pair, t))
            if r is None:
                cells.append("")
            elif r["status"] == "n/a":
                cells.append("n/a (3D only)" if t in THREE_D_ONLY else "n/a")
            elif r["status"] == "failed":
                cells.append(f"failed: {r['error'][:80]}")
            else:
                epe = f" / {fmt(r['epe_mean_mm'], 2)}" if r.get("epe_mean_mm") is not None else " / –"
                cells.append(f"{fmt(r['mean_dice'])}{epe} / {fmt(r['folding_percent'], 2)} / "
                             f"{fmt(r.get('wall_s'), 1)}")
        L.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def markdown(results):
    L = [start_markdown(results)]
    reg = results["registration"]
    for s in sets_present(reg["rows"]):
        sm = [r for r in reg["summary"] if r["set"] == s]
        if not sm:
            continue
        L.append(f"### {SET_TITLES.get(s, s)}: mean over {sm[0]['pairs']} pair(s)\n")
        L.append("| tool | pairs ok | Dice | HD95 mm | SDlogJ | folding % | EPE mm | overlap % | wall s | "
                 "register s | peak RSS MB |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(sm, key=lambda r: (r["tool"] not in REFERENCES, -(r["mean_dice"] or 0))):
            L.append(f"| {r['tool']} | {r['ok']}/{r['pairs']} | {fmt(r['mean_dice'])} | {fmt(r['mean_hd95_mm'], 1)} | "
                     f"{fmt(r['sd_log_j'])} | {fmt(r['folding_percent'], 2)} | {fmt(r['epe_mean_mm'], 2)} | "
                     f"{fmt(r['overlap_percent'], 1)} | {fmt(r['wall_s'], 1)} | {fmt(r['register_s'], 1)} | "
                     f"{fmt(r['peak_rss_mb'], 0)} |")
        L.append("")
        if s in CORPUS_SETS:
            L.append(side_by_side_markdown(reg, s))
    L.append("### Every pair\n")
    L.append("| pair | tool | Dice | HD95 mm | SDlogJ | folding % | EPE mm | overlap % | wall s | runs | "
             "peak RSS MB |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in reg["rows"]:
        if r["status"] in ("failed", "n/a"):
            L.append(f"| {r['pair']} | {r['tool']} | {r['status']}: {r['error'][:140]} | | | | | | | | |")
            continue
        runs = len(r["wall_s_all"]) if "wall_s_all" in r else ""
        L.append(f"| {r['pair']} | {r['tool']} | {fmt(r['mean_dice'])} | {fmt(r['mean_hd95_mm'], 1)} | "
                 f"{fmt(r['sd_log_j'])} | {fmt(r['folding_percent'], 2)} | {fmt(r['epe_mean_mm'], 2)} | "
                 f"{fmt(r['overlap_percent'], 1)} | {fmt(r.get('wall_s'), 1)} | {runs} | "
                 f"{fmt(r.get('peak_rss_mb'), 0)} |")
    L.append("")
    for pair in dict.fromkeys(r["pair"] for r in reg["rows"]):
        rs = [r for r in reg["rows"] if r["pair"] == pair and r["status"] in ("ok", "reference")]
        organs = list(dict.fromkeys(o for r in rs for o in r["dice"]))
        # atlases of 80-120 regions (the corpus's AAL and Desikan-Killiany pairs) would make tables
        # wider than they are useful: their mean Dice is in the tables above, the rest in results.json
        if not organs or len(organs) > 24:
            continue
        L.append(f"#### Dice per structure, {pair}\n")
        L.append("| tool | " + " | ".join(organs) + " |")
        L.append("|---|" + "---:|" * len(organs))
        for r in rs:
            L.append(f"| {r['tool']} | " + " | ".join(fmt(r["dice"].get(o), 2) for o in organs) + " |")
        L.append("")
    return "\n".join(L) + "\n"


def features_markdown(results):
    """Item 3 of the benchmark: the same engine driven by three kinds of features."""
    L = ["| features | set | Dice | HD95 mm | SDlogJ | EPE mm | register s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["registration"]["summary"]:
        if r["tool"].startswith("obelisk-"):
            L.append(f"| {r['tool'].split('-', 1)[1]} | {r['set']} | {fmt(r['mean_dice'])} | "
                     f"{fmt(r['mean_hd95_mm'], 1)} | {fmt(r['sd_log_j'])} | {fmt(r['epe_mean_mm'], 2)} | "
                     f"{fmt(r['register_s'], 1)} |")
    return "\n".join(L) + "\n" if len(L) > 2 else ""


def seg_markdown(results):
    L = []
    seg = results.get("segmentation")
    if seg:
        size = "×".join(map(str, seg["size"])) + f" voxels at {seg['spacing'][0]} mm, " if seg.get("size") else ""
        L.append(f"### Segmentation: {seg['folds']}-fold CV on {seg['subjects']} synthetic subjects ({size}"
                 f"a fold's test subjects unseen in its training)\n")
        ok = [r for r in seg["rows"] if r["status"] == "ok"]
        organs = list(dict.fromkeys(o for r in ok for o in r["dice"]))
        L.append("| variant | " + " | ".join(organs) + " | mean Dice | parameters | iterations | "
                 "training s (all folds + final) | training peak RSS MB | inference s | inference peak RSS MB |")
        L.append("|---|" + "---:|" * (len(organs) + 7))
        for r in seg["rows"]:
            if r["status"] != "ok":
                L.append(f"| {r['variant']} | {r['status']}: {r.get('note') or r.get('error')} |")
                continue
            L.append(f"| {r['variant']} | " + " | ".join(fmt(r["dice"].get(o), 3) for o in organs) +
                     f" | {fmt(r['mean_dice'])} | {r['params']:,} | {r.get('iterations', seg['iterations'])} | "
                     f"{r['train_total_s']:.1f} | "
                     f"{r['train_peak_rss_mb']:.0f} | {r['inference_s']:.2f} | {r['inference_peak_rss_mb']:.0f} |")
        L.append("")
    return "\n".join(L) + "\n"


METHOD = """\
Every tool registers the moving image to the fixed image as its own process with 2 threads
(`obelisk --threads 2`; ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, OMP_NUM_THREADS, RAYON_NUM_THREADS=2;
`torch.set_num_threads(2)`), starting from the files on disk. Its result is converted to an ITK
displacement field on the fixed grid (LPS mm, warped(x) = moving(x + u(x))) and evaluated by the
same code for all: `obelisk warp --labels` of the moving label map (nearest neighbour), then
`obelisk eval` (Dice, HD95, SDlogJ and folding of the field, endpoint error against the true field
of synthetic pairs). Dice and HD95 are restricted to the fixed voxels that the warped moving image
covers (`overlap %`; computed here with nibabel by warping an all-ones moving image with
`obelisk warp`, since `obelisk eval` has no mask option), over the structures present in both
label maps. SDlogJ and folding are over the whole fixed grid.

- **wall s**: the whole process (start-up, reading, registration, writing the field), median of
  the repeats (a run that took longer than `--repeat-below` seconds is not repeated); **register s**: the registration call alone as the tool reports it (for obelisk
  `runtime_s.total`), median; **peak RSS**: GNU time's maximum resident set of the process, the
  largest over the repeats.
- **obelisk-obelisk / -mind / -intensity**: `obelisk register --features obelisk|mind|intensity`
  with its defaults (translation search, affine, two deformable levels); the OBELISK features
  come from a small OBELISK-Net trained by `obelisk train` on a synthetic cohort inside the
  benchmark (settings under "feature model").
- **ants-syn**: `ants.registration(type_of_transform="SyN")` (affine from a centre-of-mass start,
  then SyN with ANTsPy's defaults); the `[Warp, Affine]` pair is composed into one field.
- **elastix-bspline**: itk-elastix default `affine` map (with geometric-centre initialisation)
  followed by the default `bspline` map; the field from `transformix_deformation_field`.
- **sitk-demons**, **sitk-bspline**, **convexadam**: these have no global stage of their own, so
  each starts with the same SimpleITK affine registration (geometric centring, Mattes MI, 3
  levels), counted in their time. Then: fast symmetric-forces demons after histogram matching
  (3 levels, 40/30/20 iterations, sigma 1.5 voxels); a cubic B-spline (control points about 40 mm
  apart, Mattes MI, L-BFGS-B, 3 levels); `convex_adam_pt` with its defaults (MIND-SSC, CPU,
  float32) on the affinely resampled moving image, its voxel field converted to LPS mm.
- **identity** (zero field) and **truth** (the generator's field, synthetic pairs only) go
  through the same evaluation: the truth row is the ceiling that nearest-neighbour label
  resampling allows.
"""


def repeat_rule(results):
    below = results.get("repeat_below_s", float("inf"))
    if results["repeats"] < 2 or below == float("inf"):
        return ""
    return f" for runs under {below:g} s (a run that took longer ran once; column `runs`)"


def benchmarks_md(results, png_rel):
    m = results["machine"]
    pk = results["python_packages"]
    L = ["# Benchmarks", "",
         "Generated by `bash data-scripts/bench/bench.sh` (see `data-scripts/bench/README.md`); every number below "
         "was measured by that run. Do not edit by hand: rerun it.", "",
         "## Set-up", "",
         f"- Machine: {m.get('cpu', '?')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; {m.get('platform')}.",
         f"- Load average (1, 5, 15 min) at the start {' '.join(m.get('load_average_start', []))}, at the end "
         f"{' '.join(m.get('load_average_end', []))}: the machine was shared with other jobs, so wall times "
         "carry that noise (all tools ran under the same conditions, one after another).",
         f"- obelisk: `{results['obelisk']}` (release build), threads: {results['threads']}, repeats per run: "
         f"{results['repeats']}{repeat_rule(results)}.",
         "- Python packages: " + ", ".join(f"{k} {v}" for k, v in pk.items()) + f" (Python {m.get('python')}).",
         f"- Command: `{results['command']}` (total {results['elapsed_s'] / 60:.0f} min).",
         f"- Start: `--start {results.get('start', 'own')}` (see the note above the registration tables).",
         ]
    if results["synthetic"]["pairs"] > 0:
        L.append(f"- Synthetic pairs: `obelisk synth --pairs {results['synthetic']['pairs']} --size "
                 f"{','.join(map(str, results['synthetic']['size']))} --spacing "
                 f"{','.join(map(str, results['synthetic']['spacing']))} --max-displacement "
                 f"{results['synthetic']['max_displacement_mm']:g} --seed {results['synthetic']['seed']}` "
                 "(9 structures, known deformation).")
    else:
        L.append("- Synthetic pairs: none in this run (`--synth-pairs 0`).")
    if any(r["set"] == "real" for r in results["registration"]["rows"]):
        L.append("- Real pairs: the TotalSegmentator 2.18.0 example subjects converted by "
                 "`data-scripts/fetch_totalseg.sh` (CT A abdomen-pelvis 3 mm; CT B upper-abdomen slab of 20 slices; "
                 "MR C). Their label maps are TotalSegmentator predictions, not manual annotations, and the three "
                 "subjects lie in unrelated scanner coordinates, so every tool needs its global stage.")
    else:
        L.append("- Real pairs: **not run** in this run (`--no-real`); the TotalSegmentator pairs have no numbers "
                 "here yet.")
    corpus = results.get("corpus")
    if corpus:
        L.append(f"- Corpus pairs: {corpus['pairs']} pairs of `data/corpus` (`data-scripts/fetch_corpus.sh`; brain MR, "
                 f"head CT, abdominal CT and 2D slices from public packages, described in data-scripts/README.md), "
                 f"sets {', '.join(corpus['sets'])}; pairs with a known field report EPE against it.")
    seg = results.get("segmentation")
    if not seg:
        L.append("- Segmentation table: **not run** in this run (`--no-segmentation`).")
    elif seg.get("command"):
        load = " ".join(seg.get("load_average_end") or [])
        L.append(f"- Segmentation table: run separately by `{seg['command']}` "
                 f"({seg['elapsed_s'] / 60:.0f} min; load average at its end {load}).")
    fm = results.get("feature_model")
    if fm:
        L.append(f"- Feature model: `obelisk train` (OBELISK-Net, {fm['iterations']} iterations) on "
                 f"{fm['subjects']} synthetic subjects of the same size: {fm['train_s']:.0f} s, "
                 f"{fm['train_peak_rss_mb']:.0f} MB peak RSS (not part of the registration times).")
    for n in results["notes"]:
        L.append(f"- Note: {n}")
    L += ["", "## Method", "", METHOD, "## Registration", ""]
    if png_rel:
        L += [f"![Dice and wall time per tool]({png_rel})", ""]
    L.append(markdown(results))
    feats = features_markdown(results)
    if feats:
        L += ["## Features for registration", "",
              "The same `obelisk register` pipeline with learned OBELISK features, MIND-SSC and raw intensity "
              "(rows obelisk-* above, mean over the pairs of each set):", "", feats]
    seg = seg_markdown(results)
    if seg.strip():
        L += ["## Segmentation", "", seg]
    return "\n".join(L)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    summ = [r for r in results["registration"]["summary"]]
    sets = sets_present(summ)
    fig, axes = plt.subplots(len(sets), 2, figsize=(12, 3.6 * len(sets)), squeeze=False)
    for i, s in enumerate(sets):
        rs = [r for r in summ if r["set"] == s]
        rs.sort(key=lambda r: (r["tool"] not in REFERENCES, r["tool"]))
        names = [r["tool"] for r in rs]
        colors = ["#888888" if n in REFERENCES else "#1f77b4" if n.startswith("obelisk") else "#ff7f0e"
                  for n in names]
        axes[i][0].barh(names, [r["mean_dice"] or 0 for r in rs], color=colors)
        axes[i][0].set_xlabel("mean Dice")
        axes[i][0].set_title(f"{s} pairs: Dice (same evaluation for all)")
        axes[i][0].set_xlim(0, 1)
        timed_rs = [r for r in rs if r["wall_s"] is not None]
        axes[i][1].barh([r["tool"] for r in timed_rs], [r["wall_s"] for r in timed_rs],
                        color=[c for r, c in zip(rs, colors) if r["wall_s"] is not None])
        axes[i][1].set_xlabel("wall time s (2 threads)")
        axes[i][1].set_title(f"{s} pairs: wall time")
        for ax in axes[i]:
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return None


def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
        info["load_average_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return info


def python_versions():
    from importlib.metadata import PackageNotFoundError, version

    v = {}
    for pkg in ("SimpleITK", "numpy", "nibabel", "antspyx", "itk-elastix", "convexAdam", "torch", "matplotlib"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return v


def report(results, out, benchmarks):
    """Writes results.md, results.png and (with a path) BENCHMARKS.md from the results."""
    (out / "results.md").write_text(markdown(results) + seg_markdown(results))
    note = plot(results, out / "results.png")
    if note and note not in results["notes"]:
        results["notes"].append(note)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if benchmarks:
        md_path = Path(benchmarks).resolve()
        png_rel = None
        if not note:
            png = md_path.parent / "docs" / "benchmark.png"
            png.parent.mkdir(exist_ok=True)
            png.write_bytes((out / "results.png").read_bytes())
            png_rel = "docs/benchmark.png"
        tmp = md_path.with_suffix(".md.part")
        tmp.write_text(benchmarks_md(results, png_rel))
        os.replace(tmp, md_path)
        log(f"wrote {md_path}")
    print(markdown(results) + seg_markdown(results))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}" + ("" if note else f", {out / 'results.png'}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--obelisk", default=str(ROOT / "target/release/obelisk"), help="the obelisk binary")
    ap.add_argument("--out", default=str(HERE / "out"), help="working and output folder")
    ap.add_argument("--smoke", action="store_true", help="one tiny synthetic pair, obelisk + SimpleITK only")
    ap.add_argument("--tools", help="comma-separated subset of " + ",".join(OURS + PEERS))
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool and pair; the wall time is their median")
    ap.add_argument("--repeat-below", type=float, default=120.0,
                    help="repeat a tool on a pair only when its first run took less than this many seconds "
                         "(0: never repeat; a huge value: always)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before one run counts as failed")
    ap.add_argument("--synth-pairs", type=int, default=2, help="synthetic pairs (0: none)")
    ap.add_argument("--synth-size", default="80,80,80")
    ap.add_argument("--synth-spacing", default="4.2,4.2,4.2")
    ap.add_argument("--synth-max-disp", type=float, default=10.0, help="largest true displacement (mm)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-real", action="store_true", help="skip the TotalSegmentator pairs")
    ap.add_argument("--start", choices=["own", "labels"], default="own",
                    help="own: every tool from its own initialisation; labels: every tool from the translation "
                         "that lines up the pair's label maps (obelisk register --init labels)")
    ap.add_argument("--real-data", default=str(ROOT / "data/totalseg"))
    default_corpus = ROOT / "data/corpus"
    ap.add_argument("--corpus", default=str(default_corpus) if (default_corpus / "dataset.json").exists() else None,
                    help="the development corpus (data-scripts/fetch_corpus.sh); its pairs join the benchmark in "
                         "sets named by their anatomy (default: data/corpus when it exists)")
    ap.add_argument("--no-corpus", action="store_true", help="skip the corpus pairs")
    ap.add_argument("--sets", help="comma-separated sets to run: synthetic, real, " + ", ".join(CORPUS_SETS) +
                                   " (default: all that the other options enable)")
    ap.add_argument("--model-subjects", type=int, default=4, help="synthetic subjects for the feature model")
    ap.add_argument("--model-iterations", type=int, default=200)
    ap.add_argument("--benchmarks", help="also write this BENCHMARKS.md (and its plot next to it, under docs/)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite results.md, results.png and --benchmarks from OUT/results.json without running")
    ap.add_argument("--segmentation", action="store_true", help="also run the segmentation table")
    ap.add_argument("--no-segmentation", action="store_true", help="overrides --segmentation (bench.sh sets it)")
    ap.add_argument("--seg-subjects", type=int, default=4)
    ap.add_argument("--seg-folds", type=int, default=2)
    ap.add_argument("--seg-size", default="48,48,48",
                    help="the segmentation cohort's grid (a U-Net iteration at 80^3 takes seconds on 2 cores)")
    ap.add_argument("--seg-spacing", default="7,7,7")
    ap.add_argument("--seg-iterations", type=int, default=1500, help="training iterations per fold")
    ap.add_argument("--seg-arch-iterations", default="unet=200,hybrid=100",
                    help="per-architecture iterations instead of --seg-iterations, ARCH=N,...: a U-Net or hybrid "
                         "iteration (dense patches or whole volumes) costs 30-60 OBELISK-Net iterations")
    ap.add_argument("--segmentation-only", action="store_true",
                    help="run only the segmentation table and merge it into the results.json already in --out "
                         "(then regenerate the reports)")
    args = ap.parse_args()
    args.segmentation = args.segmentation and not args.no_segmentation
    try:
        args.seg_arch_iterations = {k: int(v) for k, v in
                                    (kv.split("=") for kv in args.seg_arch_iterations.split(",") if kv)}
    except ValueError:
        sys.exit(f"--seg-arch-iterations: expected ARCH=N,..., got {args.seg_arch_iterations!r}")
    args.synth_size = [int(v) for v in args.synth_size.split(",")]
    args.synth_spacing = [float(v) for v in args.synth_spacing.split(",")]
    args.seg_size = [int(v) for v in args.seg_size.split(",")]
    args.seg_spacing = [float(v) for v in args.seg_spacing.split(",")]
    if args.smoke:
        # coarse but with a clear deformation, so that registration visibly beats the identity
        args.synth_pairs, args.synth_size, args.synth_spacing = 1, [40, 40, 40], [7.0, 7.0, 7.0]
        args.synth_max_disp, args.repeats, args.no_real, args.segmentation = 20.0, 1, True, False
        default_tools = ["obelisk-mind", "obelisk-intensity", "sitk-demons"]
    else:
        default_tools = OURS + PEERS
    tools = args.tools.split(",") if args.tools else default_tools
    unknown = [t for t in tools if t not in OURS + PEERS]
    if unknown:
        sys.exit(f"--tools: unknown tool(s) {', '.join(unknown)}; choose from {', '.join(OURS + PEERS)}")
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")
    sets = None
    if args.sets:
        sets = [v for v in args.sets.split(",") if v]
        bad = [v for v in sets if v not in SET_ORDER]
        if bad:
            sys.exit(f"--sets: unknown set(s) {', '.join(bad)}; choose from {', '.join(SET_ORDER)}")
    if args.smoke:
        args.no_corpus = True
    binary = Path(args.obelisk)
    if not binary.is_file():
        sys.exit(f"{binary}: obelisk binary not found (cargo build --release, or pass --obelisk)")
    ob = Obelisk(binary.resolve(), args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.report_only or args.segmentation_only:
        if not (out / "results.json").exists():
            sys.exit(f"{out / 'results.json'}: no results to report on or merge into (run the benchmark first)")
        results = json.loads((out / "results.json").read_text())
        if args.segmentation_only:
            started = time.time()
            results["segmentation"] = bench_segmentation(args, ob, out)
            results["segmentation"].update(
                command=os.environ.get("BENCH_COMMAND") or " ".join(shlex.quote(a) for a in sys.argv),
                elapsed_s=time.time() - started, load_average_end=Path("/proc/loadavg").read_text().split()[:3])
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        report(results, out, args.benchmarks)
        return
    notes = []
    import importlib.util

    for t in list(tools):
        mod = PEER_MODULES.get(t)
        if mod and importlib.util.find_spec(mod) is None:
            tools.remove(t)
            notes.append(f"{t}: skipped, Python module `{mod}` is not installed (data-scripts/bench/setup.sh)")
    for n in notes:
        log(n)

    started = time.time()
    machine = machine_info()
    pairs = []
    if sets is None or "synthetic" in sets:
        pairs += synthetic_pairs(ob, out, args.synth_pairs, args.synth_size, args.synth_spacing, args.synth_max_disp,
                                 args.seed)
    if not args.no_real and (sets is None or "real" in sets):
        pairs += real_pairs(Path(args.real_data).resolve())
    corpus_info = None
    if args.corpus and not args.no_corpus:
        corpus_sets = None if sets is None else [s for s in sets if s in CORPUS_SETS]
        if corpus_sets != []:
            cp = corpus_pairs(Path(args.corpus).resolve(), corpus_sets)
            pairs += cp
            corpus_info = {"dir": str(Path(args.corpus).resolve()), "pairs": len(cp),
                           "sets": list(dict.fromkeys(p["set"] for p in cp))}
    model, model_info = None, None
    if "obelisk-obelisk" in tools:
        model, model_info = train_feature_model(ob, out, args.synth_size, args.synth_spacing, args.model_subjects,
                                                args.model_iterations, args.seed + 50)
        log(f"feature model: {model_info}")
    if not pairs:
        sys.exit("no pairs to run (--synth-pairs 0 with --no-real)")
    rows, starts = bench_registration(args, ob, out, pairs, tools, model, model_info)
    results = {
        # bench.sh passes the command a person typed; run_bench.py's own argv otherwise
        "command": os.environ.get("BENCH_COMMAND") or " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine,
        "obelisk": ob.version(),
        "python_packages": python_versions(),
        "threads": args.threads,
        "repeats": args.repeats,
        "repeat_below_s": args.repeat_below,
        "start": args.start,
        "starts": starts,
        "synthetic": {"pairs": args.synth_pairs, "size": args.synth_size, "spacing": args.synth_spacing,
                      "max_displacement_mm": args.synth_max_disp, "seed": args.seed},
        "feature_model": model_info,
        "corpus": corpus_info,
        "notes": notes,
        "registration": {"rows": rows, "summary": summarise(rows)},
    }
    if args.segmentation:
        results["segmentation"] = bench_segmentation(args, ob, out)
    results["machine"]["load_average_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["elapsed_s"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report(results, out, args.benchmarks)

if __name__ == "__main__":
    main()
