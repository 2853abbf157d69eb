"""Tests of data-scripts/download.py against a local server on 127.0.0.1 (no internet).

Run by tests/downloads.rs with the repository's .venv Python (nibabel is needed for the fixtures);
OBELISK_BIN, when set, is used to train on the unpacked Learn2Reg data set.
"""
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import unittest
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "data-scripts"))
import download  # noqa: E402


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files with Range support; paths in server.truncate get half a body once."""

    def do_GET(self):
        path = self.path.split("?")[0]
        rng = self.headers.get("Range")
        self.server.requests.append((path, rng))
        body = self.server.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = int(rng[len("bytes="):].split("-")[0]) if rng else 0
        if start >= len(body) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if path in self.server.truncate:
            self.server.truncate.discard(path)
            payload = payload[: len(payload) // 2]
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class Server:
    def __enter__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.files, self.httpd.requests, self.httpd.truncate = {}, [], set()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return self.httpd

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def nifti_bytes(data, affine):
    buf = io.BytesIO()
    img = nib.Nifti1Image(data, affine)
    file_map = nib.Nifti1Image.make_file_map({"image": buf, "header": buf})
    img.to_file_map(file_map)
    import gzip
    return gzip.compress(buf.getvalue(), mtime=0)


def subject(seed, shape=(20, 18, 16)):
    """A blob image and its label map (1 inside the blob, 2 in a slab)."""
    rng = np.random.default_rng(seed)
    xx, yy, zz = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    blob = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2) < 25
    lab = np.where(blob, 1, 0).astype(np.uint8)
    lab[:, :, 2:4] = 2
    img = (lab * 100 + rng.normal(0, 5, shape)).astype(np.float32)
    return img, lab


def sha(b):
    import hashlib
    return hashlib.sha256(b).hexdigest()


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = download.main(argv)
    return rc, out.getvalue(), err.getvalue()


AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


class TciaMultiorgan(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        buf = io.BytesIO()
        self.labels = {}
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            for i in (1, 2):
                _, lab = subject(i)
                b = nifti_bytes(lab, AFFINE)
                self.labels[i] = lab
                info = tarfile.TarInfo(f"label_tcia_multiorgan/label{i:04d}.nii.gz")
                info.size = len(b)
                t.addfile(info, io.BytesIO(b))
        self.tar = buf.getvalue()
        self.csv = b"original_id,extent_left,extent_right\n1,0,10\n2,0,12\n"

    def tearDown(self):
        self.tmp.cleanup()

    def serve(self, httpd):
        httpd.files = {"/files/label_tciapancreasct_multiorgan.tar.gz": self.tar, "/files/cropping.csv": self.csv}

    def pins(self):
        return ["--sha256", f"label_tciapancreasct_multiorgan.tar.gz={sha(self.tar)}",
                "--sha256", f"cropping.csv={sha(self.csv)}"]

    def test_published_checksum_mismatch_is_an_error(self):
        with Server() as httpd:
            self.serve(httpd)
            rc, out, err = run(["tcia-multiorgan", "--out", str(self.dir), "--base-url", f"{self.url_of(httpd)}/files"])
        self.assertEqual(rc, 1)
        tar = self.dir / "cache/tcia_multiorgan/label_tciapancreasct_multiorgan.tar.gz"
        self.assertIn(f"{tar}: SHA-256 mismatch: expected {download.TCIA_FILES[tar.name]}, got {sha(self.tar)}", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertFalse(tar.exists() or tar.with_name(tar.name + ".part").exists())
        self.assertFalse((self.dir / "tcia_multiorgan").exists())

    def url_of(self, httpd):
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    def test_resume_convert_and_no_second_download(self):
        cache = self.dir / "cache/tcia_multiorgan"
        cache.mkdir(parents=True)
        (cache / "cropping.csv.part").write_bytes(self.csv[:10])  # an earlier, interrupted run
        images = self.dir / "nifti"
        images.mkdir()
        img, _ = subject(1)
        (images / "PANCREAS_0001.nii.gz").write_bytes(nifti_bytes(img, AFFINE))
        with Server() as httpd:
            self.serve(httpd)
            httpd.truncate = {"/files/label_tciapancreasct_multiorgan.tar.gz"}  # connection drops halfway
            base = f"{self.url_of(httpd)}/files"
            rc, out, err = run(["tcia-multiorgan", "--out", str(self.dir), "--base-url", base,
                                "--images", str(images)] + self.pins())
            self.assertEqual(rc, 0, out + err)
            reqs = list(httpd.requests)
            self.assertIn(("/files/cropping.csv", "bytes=10-"), reqs)
            tar_reqs = [r for p, r in reqs if p.endswith(".tar.gz")]
            self.assertEqual(tar_reqs, [None, f"bytes={len(self.tar) // 2}-"], reqs)
            self.assertEqual((cache / "cropping.csv").read_bytes(), self.csv)
            self.assertEqual((cache / "label_tciapancreasct_multiorgan.tar.gz").read_bytes(), self.tar)
            target = self.dir / "tcia_multiorgan"
            self.assertEqual(sorted(p.name for p in (target / "labelsTr").iterdir()),
                             ["pancreas_0001.nii.gz", "pancreas_0002.nii.gz"])
            np.testing.assert_array_equal(np.asarray(nib.load(target / "labelsTr/pancreas_0002.nii.gz").dataobj),
                                          self.labels[2])
            ds = json.loads((target / "dataset.json").read_text())
            self.assertEqual(ds["training"], [{"image": "./imagesTr/pancreas_0001.nii.gz",
                                               "label": "./labelsTr/pancreas_0001.nii.gz"}])
            self.assertEqual(ds["labels"]["11"], "pancreas")
            self.assertIn("no image for case(s) 0002", out)
            # everything is there: a second run asks the server for nothing
            httpd.requests.clear()
            rc, out, err = run(["tcia-multiorgan", "--out", str(self.dir), "--base-url", base] + self.pins())
            self.assertEqual((rc, httpd.requests), (0, []), out + err)
            self.assertIn("already there, nothing downloaded", out)
            # a cached file is re-checked, not re-fetched
            shutil_rm(target / "labelsTr")
            rc, out, err = run(["tcia-multiorgan", "--out", str(self.dir), "--base-url", base] + self.pins())
            self.assertEqual((rc, httpd.requests), (0, []), out + err)
            self.assertIn("already present, not downloaded", out)

    def test_image_on_another_grid_is_refused(self):
        images = self.dir / "nifti"
        images.mkdir()
        img, _ = subject(1)
        (images / "PANCREAS_0001.nii.gz").write_bytes(nifti_bytes(img, np.diag([2.0, 2.0, 2.5, 1.0])))
        with Server() as httpd:
            self.serve(httpd)
            rc, out, err = run(["tcia-multiorgan", "--out", str(self.dir), "--base-url", f"{self.url_of(httpd)}/files",
                                "--images", str(images)] + self.pins())
        self.assertEqual(rc, 1)
        self.assertIn(f"{images / 'PANCREAS_0001.nii.gz'}: its affine differs from the label map's", err)


def shutil_rm(p):
    import shutil
    shutil.rmtree(p)


class AbdomenCTCT(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        buf = io.BytesIO()
        names = [f"AbdomenCTCT_{i:04d}_0000.nii.gz" for i in (1, 2)]
        ds = {"name": "AbdomenCTCT", "release": "1.1", "modality": {"0": "CT"},
              "labels": {"0": "background", "1": "spleen", "2": "right kidney"},
              "tensorImageSize": {"0": "3D"}, "tensorImageShape": {"0": [20, 18, 16]},
              "numTraining": 2, "numTest": 0,
              "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
              "test": [],
              "registration_val": [{"fixed": f"./imagesTr/{names[0]}", "moving": f"./imagesTr/{names[1]}"}]}
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr("AbdomenCTCT/AbdomenCTCT_dataset.json", json.dumps(ds))
            for i, n in enumerate(names):
                img, lab = subject(10 + i)
                z.writestr(f"AbdomenCTCT/imagesTr/{n}", nifti_bytes(img, AFFINE))
                z.writestr(f"AbdomenCTCT/labelsTr/{n}", nifti_bytes(lab, AFFINE))
        self.zip = buf.getvalue()

    def tearDown(self):
        self.tmp.cleanup()

    def test_download_unpack_train_and_no_second_download(self):
        with Server() as httpd:
            httpd.files = {"/s/download/AbdomenCTCT.zip": self.zip}
            base = f"http://127.0.0.1:{httpd.server_address[1]}/s/download"
            rc, out, err = run(["abdomenctct", "--out", str(self.dir), "--base-url", base])
            self.assertEqual(rc, 0, out + err)
            self.assertIn("no checksum is published", out)
            self.assertIn(f"SHA-256 {sha(self.zip)} (no published checksum)", out)
            ds = self.dir / "AbdomenCTCT/AbdomenCTCT_dataset.json"
            self.assertTrue(ds.is_file())
            self.assertFalse((self.dir / ".AbdomenCTCT.unpacked").exists())
            httpd.requests.clear()
            rc, out, err = run(["abdomenctct", "--out", str(self.dir), "--base-url", base])
            self.assertEqual((rc, httpd.requests), (0, []), out + err)
            self.assertIn("4 listed training files present), nothing downloaded", out)
        obelisk = os.environ.get("OBELISK_BIN")
        if obelisk:
            model = self.dir / "model"
            p = subprocess.run([obelisk, "train", "--dataset", str(ds), "--out", str(model), "--iterations", "1",
                                "--quiet"], capture_output=True, text=True)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(json.loads((model / "config.json").read_text())["label_names"][1], "spleen")

    def test_pinned_checksum_and_damaged_zip(self):
        with Server() as httpd:
            bad = bytearray(self.zip)
            i = bad.index(b"AbdomenCTCT_dataset.json") + 200  # inside the first member's data
            bad[i] ^= 0xFF
            httpd.files = {"/AbdomenCTCT.zip": bytes(bad)}
            base = f"http://127.0.0.1:{httpd.server_address[1]}"
            rc, out, err = run(["abdomenctct", "--out", str(self.dir), "--base-url", base,
                                "--sha256", f"AbdomenCTCT.zip={sha(self.zip)}"])
            self.assertEqual(rc, 1)
            self.assertIn("AbdomenCTCT.zip: SHA-256 mismatch", err)
            rc, out, err = run(["abdomenctct", "--out", str(self.dir), "--base-url", base])
            self.assertEqual(rc, 1)
            self.assertIn(f"{self.dir / 'cache/AbdomenCTCT.zip'}: member AbdomenCTCT/AbdomenCTCT_dataset.json "
                          "fails its CRC-32 check", err)
            self.assertFalse((self.dir / "AbdomenCTCT").exists())

    def test_unreachable_server_keeps_the_partial_file(self):
        with Server() as httpd:
            port = httpd.server_address[1]
        # the server is gone: nothing listens on the port any more
        rc, out, err = run(["abdomenctct", "--out", str(self.dir), "--base-url", f"http://127.0.0.1:{port}"])
        self.assertEqual(rc, 1)
        self.assertIn("download failed", err)
        self.assertIn("run again to resume", err)


if __name__ == "__main__":
    unittest.main()
