"""Ingest throughput on the COVID-19 chest X-ray folder and on a generated DICOM export: local disk and S3
(a moto server on loopback).

    python bench/ingest.py [--source DIR] [--repeat 3] [--dicom 200]
    python bench/ingest.py --dicom-only [--dicom 200]     # the DICOM rows alone (ingest_dicom.json)

Prints a table (images/s per target; the median of --repeat runs) and writes bench/results/ingest.json.
The S3 figure is against moto's in-process Python server on this machine, so it measures the client
path (s3fs, multipart, copy-on-rename) plus moto, not a real S3 endpoint's bandwidth.

The DICOM export is generated (nothing is downloaded): 512x512 CT slices (16-bit signed, rescale and a
window; 70% uncompressed, 30% RLE) and 1024x1024 MONOCHROME1 radiographs (12-bit, window), a few slices per
patient. Each file is read, decoded, windowed to 8 bits and stored as PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raysemi.core.tables import markdown_table  # noqa: E402
from raysemi.data import shards  # noqa: E402
from raysemi.data.ingest.run import ingest  # noqa: E402
from raysemi.data.ingest.validate import check_image  # noqa: E402
from tests.moto_s3 import moto_s3  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "covid19-radiography-3class"


def start_moto(stack: contextlib.ExitStack) -> str:
    """A moto server (``tests/moto_s3.py``) for as long as ``stack`` is open; this process's AWS environment
    points at it. Its endpoint."""
    server = stack.enter_context(moto_s3())
    os.environ.update(server.env)
    return server.endpoint


def make_dicom_export(root: Path, n: int, seed: int = 0) -> float:
    """``n`` DICOM files under ``root/{ct,cr}/<patient>/``; returns their size in MB."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:512, 0:512]
    body = (np.hypot(yy - 256, xx - 256) < 220) * 1040  # a disc of soft tissue in air (HU + 1024)
    for i in range(n):
        cr = i % 10 == 9
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1" if cr else "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.PatientID, ds.PatientName, ds.StudyInstanceUID = f"BENCH{i // 4:05d}", f"Bench^{i // 4}", generate_uid()
        ds.Modality = "CR" if cr else "CT"
        if cr:
            arr = (np.kron(rng.integers(500, 3500, (32, 32)), np.ones((32, 32))) + rng.normal(0, 40, (1024, 1024)))
            ds.set_pixel_data(np.clip(arr, 0, 4095).astype(np.uint16), "MONOCHROME1", 12)
            ds.WindowCenter, ds.WindowWidth = 2000, 3000
        else:
            arr = body + rng.normal(0, 20, (512, 512))
            ds.set_pixel_data(np.clip(arr, 0, 4095).astype(np.int16), "MONOCHROME2", 16)
            ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 40, 400
            if i % 10 < 3:
                ds.compress(RLELossless, encoding_plugin="pylibjpeg")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = root / ds.Modality.lower() / ds.PatientID / f"{i:06d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dicom", type=int, default=200, help="generated DICOM files (0: no DICOM rows)")
    ap.add_argument("--dicom-only", action="store_true", help="only the DICOM rows (-> ingest_dicom.json)")
    ap.add_argument("--out", help="results file (default bench/results/ingest.json or ingest_dicom.json)")
    args = ap.parse_args()
    out = Path(args.out or REPO / "bench" / "results" / ("ingest_dicom.json" if args.dicom_only else "ingest.json"))
    source = Path(args.source)
    if not args.dicom_only and not source.is_dir():
        raise SystemExit(f"source folder {source} does not exist")
    files = [] if args.dicom_only else [f for f in source.glob("*/*") if f.is_file()]
    mbytes = sum(f.stat().st_size for f in files) / 1e6

    def decode_only():
        for f in files:
            check_image(f.read_bytes())

    moto = contextlib.ExitStack()
    endpoint = start_moto(moto)
    import s3fs

    tmp = Path(tempfile.mkdtemp(prefix="raysemi-bench-"))
    bucket = f"raysemi-bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    targets = {}
    if not args.dicom_only:
        targets = {
            "decode+validate only (1 thread)": (decode_only, len(files), mbytes),
            "ingest -> local disk": (
                lambda: ingest(str(source), str(tmp / "ds"), overwrite=True, progress=False), len(files), mbytes
            ),
            "ingest -> s3:// (moto, loopback)": (
                lambda: ingest(str(source), f"s3://{bucket}/covid", overwrite=True, progress=False),
                len(files),
                mbytes,
            ),
        }
    dicom_mb = 0.0
    dicom_src = tmp / "dicom-export"
    if args.dicom:
        targets["DICOM ingest -> local disk"] = (
            lambda: ingest(str(dicom_src), str(tmp / "dcm"), overwrite=True, progress=False), args.dicom, 0.0
        )
        targets["DICOM ingest -> s3:// (moto)"] = (
            lambda: ingest(str(dicom_src), f"s3://{bucket}/dicom", overwrite=True, progress=False), args.dicom, 0.0
        )
    rows = []
    try:
        if args.dicom:
            t0 = time.perf_counter()
            dicom_mb = make_dicom_export(dicom_src, args.dicom)
            print(f"generated {args.dicom} DICOM files ({dicom_mb:.1f} MB) in {time.perf_counter() - t0:.1f} s")
        if not args.dicom_only:
            decode_only()  # warm the page cache: every target reads the same files
        for name, (fn, n_images, mb) in targets.items():
            secs = [timed(fn) for _ in range(args.repeat)]
            med = statistics.median(secs)
            rows.append(
                {
                    "target": name,
                    "images": n_images,
                    "seconds_median": round(med, 3),
                    "seconds_all": [round(s, 3) for s in secs],
                    "images_per_s": round(n_images / med, 1),
                    "mb_per_s": round((mb or dicom_mb) / med, 2),
                }
            )
        manifest = shards.read_manifest(str(tmp / ("dcm" if args.dicom_only else "ds")))
        dicom_manifest = shards.read_manifest(str(tmp / "dcm")) if args.dicom else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        moto.close()

    if not args.dicom_only:
        print(f"\ningest of {source.name}: {len(files)} images, {mbytes:.1f} MB, {os.cpu_count()} CPUs")
    if args.dicom:
        print(f"DICOM export (generated): {args.dicom} files, {dicom_mb:.1f} MB, {os.cpu_count()} CPUs")
    print()
    cells = ([r["target"], f"{r['images_per_s']:.1f}", f"{r['mb_per_s']:.2f}", f"{r['seconds_median']:.2f}"]
             for r in rows)
    print("\n".join(markdown_table(["target", "images/s", "MB/s", "median s"], cells, align="lrrr")))
    stored = sum(s.rows for s in manifest.splits.values())
    print(f"\nstored {stored}, quarantined {manifest.quarantined_total}, duplicates {manifest.duplicates}")
    if dicom_manifest is not None:
        d = dicom_manifest.extra["dicom"]
        print(f"DICOM: rules {d['rules']}; transfer syntaxes {d['transfer_syntaxes']}")
    result = {
        "benchmark": "ingest",
        "source": None if args.dicom_only else str(source),
        "images": len(files),
        "megabytes": round(mbytes, 2),
        "dicom_files": args.dicom,
        "dicom_megabytes": round(dicom_mb, 2),
        "repeat": args.repeat,
        "stored": stored,
        "quarantined": manifest.quarantined_total,
        "duplicates": manifest.duplicates,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "note": "s3 target is a moto server on loopback, not AWS",
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
