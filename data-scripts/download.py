#!/usr/bin/env python3
"""Downloads public abdominal CT data sets into obelisk's layout (Learn2Reg dataset JSON).

  python3 data-scripts/download.py abdomenctct [--out data]
  python3 data-scripts/download.py tcia-multiorgan [--out data] [--images DIR]

Downloads resume where an interrupted one stopped (HTTP Range on DIR/cache/NAME.part), are
checked against SHA-256 values recorded here before they are moved into place, and are never
repeated once the file (or the unpacked data set) is there. --base-url (or the environment
variable OBELISK_DOWNLOAD_BASE_URL) replaces the server, --sha256 NAME=HEX pins or replaces a
checksum. The download itself needs only the Python standard library; `tcia-multiorgan --images`
needs nibabel (data-scripts/setup-venv.sh). See data-scripts/README.md.
"""
import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

CHUNK = 1 << 20

# Learn2Reg AbdomenCTCT as linked from https://learn2reg.grand-challenge.org/Datasets/ (University of
# Lübeck cloud). No checksum or size is published for it; the ZIP's own CRC-32 of every member is
# checked instead, and the SHA-256 of what arrived is printed so that it can be pinned with --sha256.
ABDOMENCTCT_BASE = "https://cloud.imi.uni-luebeck.de/s/32WaSRaTnFk2JeT/download"
ABDOMENCTCT_ZIP = "AbdomenCTCT.zip"

# Gibson et al. 2018, "Multi-organ Abdominal CT Reference Standard Segmentations",
# https://zenodo.org/records/1169361 (CC-BY 4.0). Zenodo lists MD5 values on the record page; the
# SHA-256 values below are those torch-em (constantinpape/torch-em,
# torch_em/data/datasets/medical/multi_organ_abdominal_ct.py) checks for the same URLs.
ZENODO_BASE = "https://zenodo.org/records/1169361/files"
TCIA_FILES = {
    "label_tciapancreasct_multiorgan.tar.gz": "1790e252ba0732cc06ec727f00245c8d9c1d5f0bb9829fd3e9915863c5100c61",
    "cropping.csv": "d6503bda3d776c10698523aae14446409bc9d3722fb405b0025b4a5f59094f8f",
}
# Label ids of the reference segmentations (the same for the TCIA and BTCV parts; the TCIA part
# annotates 1, 3, 4, 5, 6, 7, 11 and 14 only).
GIBSON_LABELS = {
    0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal vein and splenic vein",
    11: "pancreas", 12: "right adrenal gland", 13: "left adrenal gland", 14: "duodenum",
}


class DataError(Exception):
    """A failure with a one-line message that names the file or URL concerned."""


def log(msg):
    print(f"download: {msg}", flush=True)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url, dest, sha256=None, tries=4):
    """Downloads url to dest unless dest exists; resumes from dest.part; checks sha256 if given."""
    dest = Path(dest)
    if dest.exists():
        if sha256 and (got := sha256_of(dest)) != sha256:
            raise DataError(f"{dest}: exists but its SHA-256 is {got}, expected {sha256}; delete it to download again")
        log(f"{dest}: already present, not downloaded")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, tries + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "obelisk-data-scripts", "Range": f"bytes={have}-"} if have else {
            "User-Agent": "obelisk-data-scripts"}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
                start = 0
                if have and r.status == 206:
                    m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
                    start = int(m.group(1)) if m else 0
                if start != have:
                    have = 0  # the server ignored the range: start over
                length = r.headers.get("Content-Length")
                log(f"{url}: {'resuming at byte ' + str(have) if have else 'downloading'}"
                    + (f" ({int(length) + have} bytes)" if length else ""))
                with open(part, "ab" if have else "wb") as f:
                    while block := r.read(CHUNK):
                        f.write(block)
                if length is not None and part.stat().st_size != have + int(length):
                    raise http.client.IncompleteRead(b"", have + int(length) - part.stat().st_size)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                break  # nothing left to fetch: the partial file is complete; the checksum decides
            raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            size = part.stat().st_size if part.exists() else 0
            if attempt == tries:
                raise DataError(f"{url}: download failed ({e}); {part} keeps {size} bytes, run again to resume") from None
            log(f"{url}: interrupted at byte {size} ({e}); retrying")
            time.sleep(attempt)
    got = sha256_of(part)
    if sha256 and got != sha256:
        part.unlink()
        raise DataError(f"{dest}: SHA-256 mismatch: expected {sha256}, got {got} (the download was removed)")
    part.rename(dest)
    log(f"{dest}: {dest.stat().st_size} bytes, SHA-256 {got}" + (" (ok)" if sha256 else " (no published checksum)"))
    return dest


def safe_member(name, archive):
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{archive}: refusing to unpack member {name!r} outside the target folder")
    return p


def unpack(archive, into):
    """Unpacks a ZIP (every member's CRC-32 checked) or .tar.gz into the new folder `into`."""
    archive = Path(archive)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=into.parent))
    try:
        if archive.name.endswith(".zip"):
            try:
                with zipfile.ZipFile(archive) as z:
                    if (bad := z.testzip()) is not None:
                        raise DataError(f"{archive}: member {bad} fails its CRC-32 check; delete the file to download again")
                    for m in z.namelist():
                        safe_member(m, archive)
                    z.extractall(tmp)
            except zipfile.BadZipFile as e:
                raise DataError(f"{archive}: not a valid ZIP ({e}); delete it to download again") from None
        else:
            try:
                with tarfile.open(archive, "r:*") as t:
                    for m in t.getmembers():
                        safe_member(m.name, archive)
                        if not (m.isfile() or m.isdir()):
                            raise DataError(f"{archive}: refusing to unpack {m.name!r} (not a file or folder)")
                    t.extractall(tmp)
            except (tarfile.TarError, EOFError, OSError) as e:
                raise DataError(f"{archive}: cannot unpack ({e}); delete it to download again") from None
        tmp.rename(into)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=4) + "\n")
    tmp.rename(path)


def check_listed_files(json_path):
    """Every training image and label map the dataset JSON lists must exist."""
    try:
        ds = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{json_path}: cannot read the dataset description ({e})") from None
    n = 0
    for i, entry in enumerate(ds.get("training", [])):
        for key in ("image", "label"):
            if key in entry:
                f = json_path.parent / entry[key]
                if not f.is_file():
                    raise DataError(f"{f}: file not found (listed as training[{i}].{key} in {json_path})")
                n += 1
    return n


def abdomenctct(args):
    out = Path(args.out)
    target = out / "AbdomenCTCT"
    ds = target / "AbdomenCTCT_dataset.json"
    if ds.exists():
        log(f"{ds}: already there ({check_listed_files(ds)} listed training files present), nothing downloaded")
        return
    sha = args.sha256.get(ABDOMENCTCT_ZIP)
    if not sha:
        log(f"{ABDOMENCTCT_ZIP}: no checksum is published; every ZIP member's CRC-32 is checked instead")
    archive = fetch(f"{args.base_url or ABDOMENCTCT_BASE}/{ABDOMENCTCT_ZIP}", out / "cache" / ABDOMENCTCT_ZIP, sha)
    staging = out / ".AbdomenCTCT.unpacked"
    shutil.rmtree(staging, ignore_errors=True)
    unpack(archive, staging)
    found = sorted(staging.rglob("AbdomenCTCT_dataset.json"))
    if len(found) != 1:
        shutil.rmtree(staging)
        raise DataError(f"{archive}: expected one AbdomenCTCT_dataset.json inside, found {len(found)}")
    try:
        n = check_listed_files(found[0])
    except DataError:
        shutil.rmtree(staging)
        raise
    found[0].parent.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"{target}: {n} training files present; obelisk reads {ds} as it is (e.g. obelisk train --dataset {ds})")


def case_id(name):
    m = re.search(r"(\d{4})", name)
    return m.group(1) if m else None


def find_image(images, cid):
    for stem in (f"PANCREAS_{cid}", f"Pancreas_{cid}", f"pancreas_{cid}", f"img{cid}"):
        for ext in (".nii.gz", ".nii"):
            if (p := images / (stem + ext)).is_file():
                return p
    return None


def tcia_multiorgan(args):
    out = Path(args.out)
    cache = out / "cache" / "tcia_multiorgan"
    target = out / "tcia_multiorgan"
    labels_dir = target / "labelsTr"
    if not labels_dir.is_dir():
        files = {n: fetch(f"{args.base_url or ZENODO_BASE}/{n}?download=1", cache / n, args.sha256.get(n, sha))
                 for n, sha in TCIA_FILES.items()}
        staging = cache / "labels.unpacked"
        shutil.rmtree(staging, ignore_errors=True)
        unpack(files["label_tciapancreasct_multiorgan.tar.gz"], staging)
        found = sorted(p for p in staging.rglob("label*.nii.gz") if case_id(p.name))
        if not found:
            shutil.rmtree(staging)
            raise DataError(f"{files['label_tciapancreasct_multiorgan.tar.gz']}: no labelNNNN.nii.gz inside")
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / ".labelsTr.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for p in found:
            shutil.copyfile(p, tmp / f"pancreas_{case_id(p.name)}.nii.gz")
        shutil.copyfile(files["cropping.csv"], target / "cropping.csv")
        tmp.rename(labels_dir)
        shutil.rmtree(staging)
        log(f"{labels_dir}: {len(found)} label maps")
    else:
        log(f"{labels_dir}: already there, nothing downloaded")
    if args.images is None:
        log("the CT images come from TCIA (collection Pancreas-CT, DICOM; NBIA Data Retriever): convert each "
            "series to PANCREAS_NNNN.nii.gz (e.g. dcm2niix) and run again with --images FOLDER")
        return
    import nibabel as nib
    import numpy as np

    images_in = Path(args.images)
    if not images_in.is_dir():
        raise DataError(f"{images_in}: --images folder not found")
    images_dir = target / "imagesTr"
    images_dir.mkdir(exist_ok=True)
    training, missing = [], []
    for lab in sorted(labels_dir.glob("pancreas_*.nii.gz")):
        cid = case_id(lab.name)
        src = find_image(images_in, cid)
        if src is None:
            missing.append(cid)
            continue
        dst = images_dir / lab.name
        if not dst.exists():
            try:
                img, seg = nib.load(src), nib.load(lab)
            except Exception as e:  # nibabel raises several types for damaged files
                raise DataError(f"{src}: cannot read ({e})") from None
            if img.shape[:3] != seg.shape[:3]:
                raise DataError(f"{src}: shape {img.shape} differs from the label map {lab} {seg.shape}")
            if not np.allclose(img.affine, seg.affine, atol=1e-3):
                if not args.label_affine:
                    raise DataError(f"{src}: its affine differs from the label map's {lab} "
                                    f"({img.affine.tolist()} vs {seg.affine.tolist()}); if the voxel arrays "
                                    "correspond, --label-affine writes the image with the label map's affine")
                img = nib.Nifti1Image(np.asarray(img.dataobj), seg.affine, img.header)
            tmp = dst.with_name(".tmp-" + dst.name)
            nib.save(img, tmp)
            tmp.rename(dst)
        training.append({"image": f"./imagesTr/{lab.name}", "label": f"./labelsTr/{lab.name}"})
    if missing:
        log(f"no image for case(s) {', '.join(missing)} in {images_in} (PANCREAS_0025 was withdrawn from TCIA); "
            "left out of the dataset")
    if not training:
        raise DataError(f"{images_in}: no PANCREAS_NNNN.nii(.gz) matches a label map")
    write_json(target / "dataset.json", {
        "name": "TCIA-Pancreas-CT-multiorgan",
        "description": "TCIA Pancreas-CT with the multi-organ reference segmentations of Gibson et al. 2018",
        "licence": "images: TCIA Pancreas-CT (CC BY 3.0); labels: zenodo.org/records/1169361 (CC BY 4.0)",
        "reference": "Gibson et al., Automatic multi-organ segmentation on abdominal CT with dense V-networks, "
                     "IEEE TMI 2018, doi:10.1109/TMI.2018.2806309",
        "tensorImageSize": {"0": "3D"},
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in GIBSON_LABELS.items()},
        "numTraining": len(training),
        "training": training,
        "numTest": 0,
        "test": [],
    })
    log(f"{target / 'dataset.json'}: {len(training)} subjects")


def parse_sha(items):
    out = {}
    for it in items:
        name, sep, hexd = it.partition("=")
        if not sep or not re.fullmatch(r"[0-9a-fA-F]{64}", hexd):
            raise DataError(f"--sha256 {it!r}: expected NAME=<64 hex digits>")
        out[name] = hexd.lower()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=["abdomenctct", "tcia-multiorgan"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data"),
                    help="data folder (default: data/ in the repository)")
    ap.add_argument("--base-url", default=os.environ.get("OBELISK_DOWNLOAD_BASE_URL"),
                    help="server folder the files are fetched from (default: the published location)")
    ap.add_argument("--sha256", action="append", default=[], metavar="NAME=HEX",
                    help="expected SHA-256 of a downloaded file (pins or replaces the recorded value)")
    ap.add_argument("--images", help="tcia-multiorgan: folder with PANCREAS_NNNN.nii(.gz) CT volumes")
    ap.add_argument("--label-affine", action="store_true",
                    help="tcia-multiorgan: give images the label maps' affine where the two differ")
    args = ap.parse_args(argv)
    try:
        args.sha256 = parse_sha(args.sha256)
        args.base_url = args.base_url.rstrip("/") if args.base_url else None
        {"abdomenctct": abdomenctct, "tcia-multiorgan": tcia_multiorgan}[args.dataset](args)
    except DataError as e:
        print(f"download: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
