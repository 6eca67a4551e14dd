"""DICOM in: rendering against pydicom's own LUT functions, compressed syntaxes, multi-frame, quarantine
reasons, patient-disjoint splits, labels CSV, kept tags, and not one byte of identifying data in the output.

Every DICOM here is built with pydicom in the test; nothing is downloaded. JPEG Lossless (process 14, SV1)
has no encoder in pydicom's plugins, so ``jpeg_lossless`` below writes one (a few lines: predictor 1, one
fixed Huffman table); the decoder under test is pylibjpeg-libjpeg's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from raysemi.commands import cli  # noqa: E402
from raysemi.data import shards  # noqa: E402
from raysemi.data.ingest.dicom import header as dicom_header  # noqa: E402
from raysemi.data.ingest.dicom import read as dicom  # noqa: E402
from raysemi.data.ingest.dicom import render as dicom_render  # noqa: E402
from raysemi.data.ingest.dicom.read import DicomOptions  # noqa: E402
from raysemi.data.ingest.dicom.render import DicomRef  # noqa: E402
from raysemi.data.ingest.run import ingest  # noqa: E402
from raysemi.data.shards import DatasetError  # noqa: E402

CT, CR, DX = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"
SC, XA, ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.2.1"
BASIC_TEXT_SR, GSPS = "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.11.1"

# Identifying values: each must never appear in anything ingest writes or prints.
SECRETS = [
    "Quuxington",
    "Zebediah",
    "PID-7731-QX",
    "19450317",  # birth date
    "20210904",  # study date
    "St Elsewhere Infirmary",
    "Frobisher",  # referring physician
    "ACC99812",
    "cough since Tuesday",  # free text
    "12 Quux Lane",
]


def patient(i: int) -> dict:
    """Identifying tags of patient ``i`` (every one a string from SECRETS, made unique per patient)."""
    return {
        "PatientName": f"Quuxington{i}^Zebediah",
        "PatientID": f"PID-7731-QX{i:02d}",
        "PatientBirthDate": "19450317",
        "PatientSex": "M",
        "PatientAddress": "12 Quux Lane",
        "StudyDate": "20210904",
        "InstitutionName": "St Elsewhere Infirmary",
        "ReferringPhysicianName": "Frobisher^Alan",
        "AccessionNumber": f"ACC99812{i}",
        "StudyDescription": "cough since Tuesday",
    }


def make_ds(
    arr: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits: int | None = None,
    sop: str = CT,
    study: str | None = None,
    who: dict | None = None,
    **tags,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = tags.pop("Modality", "CT")
    for k, v in {**(who if who is not None else patient(0)), **tags}.items():
        setattr(ds, k, v)
    if arr is not None:
        ds.set_pixel_data(arr, photometric, bits or arr.dtype.itemsize * 8)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_lossless(arr: np.ndarray, precision: int) -> bytes:
    """A minimal JPEG lossless (process 14, selection value 1) encoder for one greyscale frame."""
    x = arr.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)
    bits: list[str] = []
    for d in diff.ravel().tolist():
        ssss = abs(d).bit_length() if d != 32768 else 16
        bits.append(f"{ssss:05b}")  # the Huffman code of category s is s in 5 bits (table below)
        if 0 < ssss < 16:
            bits.append(f"{(d if d > 0 else d + (1 << ssss) - 1):0{ssss}b}")
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0)  # byte stuffing
    h, w = arr.shape
    sof = bytes([0xFF, 0xC3, 0, 11, precision, h >> 8, h & 255, w >> 8, w & 255, 1, 1, 0x11, 0])
    counts = [0, 0, 0, 0, 17] + [0] * 11
    dht = bytes([0xFF, 0xC4, 0, 36, 0x00, *counts, *range(17)])
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + bytes(data) + b"\xff\xd9"


def encapsulated(ds: Dataset, frame: bytes, syntax: str) -> Dataset:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def expected_display(path: Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """pydicom's own chain (apply_modality_lut, apply_voi_lut) on the file, scaled to 8 bits by the output
    range the standard gives, MONOCHROME1 inverted."""
    ds = pydicom.dcmread(path)
    x = apply_modality_lut(ds.pixel_array, ds)
    if window is not None:
        if "VOILUTSequence" in ds:
            del ds.VOILUTSequence
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = window[0], window[1], "LINEAR"
    y = apply_voi_lut(x, ds)
    if "VOILUTSequence" in ds:
        lo, hi = 0, 2 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1
    elif "WindowCenter" in ds:
        bits = ds.BitsStored
        lo, hi = (0, 2**bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        slope, icpt = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        lo, hi = lo * slope + icpt, hi * slope + icpt
    else:
        lo, hi = float(y.min()), float(y.max())
    out = np.clip(np.rint((y - lo) / (hi - lo) * 255), 0, 255)
    return 255 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


def rendered(path: Path, window=None, index=None) -> tuple[np.ndarray, str]:
    ref = DicomRef(path, index, "", {})
    with dicom.quiet():
        arr, _ = dicom_render.render(ref, window)
    return arr, ref.rules


RNG = np.random.default_rng(7)
U12 = RNG.integers(0, 4096, (64, 48), dtype=np.uint16)
S16 = RNG.integers(-2000, 3000, (24, 20), dtype=np.int16)
U14 = RNG.integers(0, 16384, (24, 20), dtype=np.uint16)
WINDOW = {"WindowCenter": 2048, "WindowWidth": 4096}  # so that images differing by an offset stay distinct


def voi_lut_item(bits_in: int, bits_out: int) -> Dataset:
    item = Dataset()
    n = 2**bits_in
    item.LUTDescriptor = [n if n < 65536 else 0, 0, bits_out]
    lut = (np.sqrt(np.arange(n) / (n - 1)) * (2**bits_out - 1)).astype(np.uint16)  # a gamma-like curve
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    return item


CASES = {
    "CT 12-bit, rescale, window 40/400": (
        lambda: make_ds(U12, bits=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400),
        "rescale + window (file, linear)",
    ),
    "CT 16-bit signed, two windows (first used)": (
        lambda: make_ds(S16, bits=16, RescaleSlope=1, RescaleIntercept=0,
                        WindowCenter=[40, -600], WindowWidth=[400, 1500]),
        "rescale + window (file, linear)",
    ),
    "CT sigmoid window, slope 0.5": (
        lambda: make_ds(U12, bits=12, RescaleSlope=0.5, RescaleIntercept=-100, WindowCenter=300,
                        WindowWidth=800, VOILUTFunction="SIGMOID"),
        "rescale + window (file, sigmoid)",
    ),
    "CR MONOCHROME1 14-bit, VOI LUT": (
        lambda: make_ds(U14, photometric="MONOCHROME1", bits=14, sop=CR, Modality="CR",
                        VOILUTSequence=[voi_lut_item(14, 16)]),
        "VOI LUT + MONOCHROME1 inverted",
    ),
    "DX MONOCHROME1 12-bit, window": (
        lambda: make_ds(U12, photometric="MONOCHROME1", bits=12, sop=DX, Modality="DX",
                        WindowCenter=2048, WindowWidth=3000),
        "window (file, linear) + MONOCHROME1 inverted",
    ),
    "DX 16-bit, no window": (
        lambda: make_ds(U14, bits=14, sop=DX, Modality="DX"),
        "min-max (no window)",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_render_matches_pydicom_luts(tmp_path, name):
    build, rules = CASES[name]
    path = save(build(), tmp_path / "x.dcm")
    out, got_rules = rendered(path)
    want = expected_display(path)
    assert out.dtype == np.uint8 and out.shape == want.shape
    assert np.abs(out.astype(int) - want).max() <= 1
    assert got_rules == rules
    assert np.ptp(out) > 100  # not a flat image: the test would prove nothing


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    a = save(make_ds(U12, bits=12, WindowCenter=2000, WindowWidth=3000), tmp_path / "m2.dcm")
    b = save(make_ds(U12, photometric="MONOCHROME1", bits=12, WindowCenter=2000, WindowWidth=3000), tmp_path / "m1.dcm")
    assert np.array_equal(rendered(b)[0], 255 - rendered(a)[0])


def test_window_override_and_8bit_as_stored(tmp_path):
    path = save(make_ds(U12, bits=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40,
                        WindowWidth=400), tmp_path / "ct.dcm")
    out, rules = rendered(path, window=(-600.0, 1500.0))
    assert rules == "rescale + window (--window, linear)"
    assert np.abs(out.astype(int) - expected_display(path, (-600.0, 1500.0))).max() <= 1
    assert not np.array_equal(out, rendered(path)[0])
    u8 = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    out, rules = rendered(save(make_ds(u8, sop=SC, Modality="OT"), tmp_path / "sc.dcm"))
    assert rules == "8-bit as stored" and np.array_equal(out, u8)
    rgb = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    out, rules = rendered(save(make_ds(rgb, photometric="RGB", sop=SC, Modality="OT"), tmp_path / "rgb.dcm"))
    assert rules == "RGB" and np.array_equal(out, rgb)


def test_colour_palette_and_ybr(tmp_path):
    from pydicom.pixels import apply_color_lut, convert_color_space

    index = RNG.integers(0, 256, (16, 12), dtype=np.uint8)
    pal = make_ds(index, photometric="PALETTE COLOR", bits=8, sop=SC, Modality="OT")
    ramp = np.arange(256, dtype=np.uint16)
    for colour, lut in (("Red", ramp * 257), ("Green", (255 - ramp) * 257), ("Blue", (ramp // 2) * 257)):
        setattr(pal, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(pal, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    path = save(pal, tmp_path / "pal.dcm")
    out, rules = rendered(path)
    want = apply_color_lut(index, pydicom.dcmread(path)) / 65535 * 255
    assert rules == "palette colour LUT" and out.shape == (16, 12, 3)
    assert np.abs(out.astype(int) - want).max() <= 1 and np.array_equal(out[..., 0], index)
    rgb = RNG.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    path = save(make_ds(ybr, photometric="YBR_FULL", sop=SC, Modality="OT"), tmp_path / "ybr.dcm")
    out, rules = rendered(path)
    assert rules == "YBR_FULL -> RGB" and np.abs(out.astype(int) - rgb).max() <= 2


def test_compressed_transfer_syntaxes_decode(tmp_path):
    plain = save(make_ds(U12, bits=12, WindowCenter=1500, WindowWidth=2500), tmp_path / "plain.dcm")
    want = rendered(plain)[0]
    rle = make_ds(U12, bits=12, WindowCenter=1500, WindowWidth=2500)
    rle.compress(RLELossless)
    j2k = make_ds(U12, bits=12, WindowCenter=1500, WindowWidth=2500)
    j2k.compress(JPEG2000Lossless)
    ljpeg = encapsulated(make_ds(U12, bits=12, WindowCenter=1500, WindowWidth=2500), jpeg_lossless(U12, 12),
                         JPEGLosslessSV1)
    for ds in (rle, j2k, ljpeg):  # lossless: the same pixels as the uncompressed file
        path = save(ds, tmp_path / f"{ds.file_meta.TransferSyntaxUID}.dcm")
        assert np.array_equal(pydicom.dcmread(path).pixel_array, U12), ds.file_meta.TransferSyntaxUID.name
        assert np.array_equal(rendered(path)[0], want), ds.file_meta.TransferSyntaxUID.name
    u8 = (np.add.outer(np.arange(32), np.arange(32)) * 4).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=95)
    base = encapsulated(make_ds(u8, sop=SC, Modality="OT"), buf.getvalue(), JPEGBaseline8Bit)
    path = save(base, tmp_path / "baseline.dcm")
    out, rules = rendered(path)
    assert rules == "8-bit as stored" and np.array_equal(out, pydicom.dcmread(path).pixel_array)
    assert np.abs(out.astype(int) - u8).max() < 12  # lossy, but the same picture


def test_multiframe_frames(tmp_path):
    frames = np.stack([np.full((8, 8), 100 * i, np.uint16) + np.arange(8, dtype=np.uint16) for i in range(5)])
    for k, ds_sop in enumerate((XA,)):
        src = tmp_path / "src"
        save(make_ds(frames, bits=12, sop=ds_sop, Modality="XA", WindowCenter=250, WindowWidth=600),
             src / "a" / f"mf{k}.dcm")
    for i in range(3):  # single-frame files in another class, other patients
        save(make_ds(U12[:8, :8] // 2 + i, bits=12, who=patient(i + 1), **WINDOW), src / "b" / f"s{i}.dcm")
    path = next((src / "a").iterdir())
    for mode, index in (("first", 0), ("middle", 2)):
        m = ingest(str(src), str(tmp_path / mode), dicom_options=DicomOptions(frames=mode), progress=False,
                   val_fraction=0, test_fraction=0, min_shards=1)
        (row,) = [r for r in shards.read_split(str(tmp_path / mode), "train").to_pylist() if r["label"] == 0]
        assert row["source"].endswith(f"#{index}")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), rendered(path, index=index)[0])
        assert m.extra["dicom"]["frames"] == mode
    ingest(str(src), str(tmp_path / "all"), dicom_options=DicomOptions(frames="all"), progress=False,
           val_fraction=0, test_fraction=0, min_shards=1)
    rows = [r for r in shards.read_split(str(tmp_path / "all"), "train").to_pylist() if r["label"] == 0]
    assert sorted(int(r["source"].rsplit("#", 1)[1]) for r in rows) == [0, 1, 2, 3, 4]
    assert len({r["group"] for r in rows}) == 1  # one patient


def enhanced_ct(n: int, *, positions: bool) -> Dataset:
    frames = np.stack([U12[:8, :8] // 2 + i for i in range(n)]).astype(np.uint16)
    ds = make_ds(frames, bits=12, sop=ENHANCED_CT)
    shared = Dataset()
    pvt, voi = Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, -1024, "HU"
    voi.WindowCenter, voi.WindowWidth = 40, 400
    shared.PixelValueTransformationSequence = [pvt]
    shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for i in range(n):
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [0, 0, float(i if positions else 0)]
        item.PlanePositionSequence = [plane]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    return ds


def test_volume_quarantined_unless_asked_and_functional_groups_applied(tmp_path):
    path = save(enhanced_ct(4, positions=True), tmp_path / "vol.dcm")
    header = dicom_header.read_header(path, DicomOptions(), 10**8)
    assert header.reason.startswith("3-D volume (4 slices) where a 2-D image was expected")
    header = dicom_header.read_header(path, DicomOptions(volumes=True, frames="middle"), 10**8)
    assert header.reason is None and header.frames == [2]
    out, rules = rendered(path, index=2)
    flat = pydicom.dcmread(path)  # the frame's rescale and window, lifted to the top by hand
    flat.RescaleSlope, flat.RescaleIntercept, flat.WindowCenter, flat.WindowWidth = 1, -1024, 40, 400
    x = apply_modality_lut(flat.pixel_array[2], flat)
    want = np.clip(np.rint((apply_voi_lut(x, flat) + 1024) / 4095 * 255), 0, 255)
    assert rules == "rescale + window (file, linear)" and np.abs(out.astype(int) - want).max() <= 1


def write_export(root: Path, *, n_patients: int = 12, seed: int = 0) -> dict:
    """A PACS-like export under class folders, with identifying tags, patient-named folders and file names,
    and a few broken files. Returns {"good": n, "bad": {reason prefix: n}, "patients": {pid: class}}."""
    rng = np.random.default_rng(seed)
    truth = {"good": 0, "bad": {}, "patients": {}}
    for i in range(n_patients):
        cls = ("normal", "pneumonia")[i % 2]
        who = patient(i)
        truth["patients"][who["PatientID"]] = cls
        folder = root / cls / f"{who['PatientName'].replace('^', ' ')} {who['PatientBirthDate']}"
        study = generate_uid()
        for k in range(1 + i % 3):
            arr = rng.integers(0, 4096, (16, 16), dtype=np.uint16)
            mono1 = k == 1
            ds = make_ds(arr, bits=12, photometric="MONOCHROME1" if mono1 else "MONOCHROME2", study=study,
                         who=who, sop=CR if mono1 else CT, Modality="CR" if mono1 else "CT",
                         BodyPartExamined="CHEST", RescaleSlope=1, RescaleIntercept=-1024,
                         WindowCenter=-600, WindowWidth=1500)
            if k == 2:
                ds.compress(RLELossless)
            name = f"{who['PatientName'].split('^')[0]}_{who['PatientID']}_{k}"
            save(ds, folder / (name + (".dcm" if k == 0 else "")))  # any extension, or none
            truth["good"] += 1

    def bad(reason: str, ds: Dataset | None = None, data: bytes | None = None, name: str = "x"):
        path = root / "normal" / f"Quuxington99 {name}"
        if ds is not None:
            save(ds, path)
        else:
            path.write_bytes(data)
        truth["bad"][reason] = truth["bad"].get(reason, 0) + 1

    who = patient(99)
    bad("non-image SOP class: Basic Text SR Storage", make_ds(None, sop=BASIC_TEXT_SR, who=who, Modality="SR"),
        name="report")
    bad("non-image SOP class: Grayscale Softcopy Presentation State Storage",
        make_ds(None, sop=GSPS, who=who, Modality="PR"), name="gsps")
    nopix = make_ds(None, who=who)
    bad("no pixel data", nopix, name="nopix")
    whole = io.BytesIO()
    make_ds(U12, bits=12, who=who).save_as(whole, enforce_file_format=True)
    bad("truncated", data=whole.getvalue()[:-200], name="cut")
    bad("3-D volume", enhanced_ct(3, positions=True), name="volume")
    noid = make_ds(U12[:8, :8], bits=12, who={k: v for k, v in who.items() if k != "PatientID"})
    bad("no PatientID", noid, name="noid")
    # Skipped, not quarantined: a DICOMDIR and a text file.
    dicomdir = make_ds(None, sop="1.2.840.10008.1.3.10", who=who)
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    save(dicomdir, root / "normal" / "DICOMDIR")
    (root / "normal" / "README Quuxington.txt").write_text("export of Zebediah Quuxington, 19450317")
    return truth


def all_output_bytes(dest: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file())


def test_pacs_export_end_to_end_without_identifying_bytes(tmp_path, capsys, caplog):
    export = tmp_path / "Zebediah Quuxington 19450317"  # even the export's own folder names a patient
    truth = write_export(export)
    dest = tmp_path / "ds"
    caplog.set_level(logging.DEBUG)
    rc = cli.main(["ingest", str(export), str(dest), "--keep-tags", "Modality,BodyPartExamined",
                   "--val-fraction", "0.2", "--test-fraction", "0.2", "--min-shards", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    m = shards.read_manifest(str(dest))
    d = m.extra["dicom"]
    assert m.extra["format"] == "dicom" and m.classes == ["normal", "pneumonia"]
    # Every image stored or quarantined with a reason; skipped files counted.
    quarantine = shards.read_quarantine(str(dest)).to_pylist()
    reasons = [q["reason"] for q in quarantine]
    for prefix, n in truth["bad"].items():
        assert sum(r.startswith(prefix) for r in reasons) == n, (prefix, reasons)
    stored = sum(s.rows for s in m.splits.values())
    assert stored + m.duplicates == truth["good"] and len(quarantine) == m.quarantined_total == sum(truth["bad"].values())
    assert d["skipped"] == {"DICOMDIR": 1, "not DICOM": 1}
    assert d["files"] == truth["good"] + sum(truth["bad"].values())
    assert d["missing_group_key"]["quarantined"] == 1
    assert d["rules"] == {
        "rescale + window (file, linear)": sum(1 + (i % 3 == 2) for i in range(12)),
        "rescale + window (file, linear) + MONOCHROME1 inverted": sum(1 for i in range(12) if i % 3 >= 1),
    }
    assert d["transfer_syntaxes"]["RLE Lossless"] == 4
    # Patient-disjoint splits, stratified, with salted group hashes.
    where: dict[str, set] = {}
    rows = []
    for split in ("train", "val", "test"):
        for r in shards.read_split(str(dest), split).to_pylist():
            where.setdefault(r["group"], set()).add(split)
            rows.append(r)
            assert r["Modality"] in ("CT", "CR") and r["BodyPartExamined"] == "CHEST"
            assert r["source"].startswith("dicom:") and r["id"] == hashlib.sha256(r["image"]).hexdigest()
    assert len(where) == 12 and all(len(s) == 1 for s in where.values())
    assert all(m.splits[s].rows > 0 for s in ("train", "val", "test"))
    unsalted = {hashlib.sha256(pid.encode()).hexdigest()[:32] for pid in truth["patients"]}
    assert not (set(where) & unsalted)
    # Not one byte of any identifying value in what ingest wrote or said.
    written = all_output_bytes(dest).lower()
    said = (out + err + caplog.text).lower().encode()
    for secret in SECRETS:
        assert secret.lower().encode() not in written, secret
        assert secret.lower().encode() not in said, secret
    # Besides the shards: the manifest, and the constant marker saying raysemi wrote the folder.
    assert sorted(p.name for p in dest.rglob("*") if p.is_file() and p.suffix != ".parquet") == [
        ".raysemi-output", "manifest.json"]
    assert json.loads((dest / ".raysemi-output").read_text()) == {"kind": "dataset", "written_by": "raysemi"}
    assert "DICOM:" in out and "salted hash of PatientID" in out


def test_splits_do_not_depend_on_the_random_salt(tmp_path):
    write_export(tmp_path / "export", n_patients=10)
    ids = []
    groups = []
    for k in range(2):
        ingest(str(tmp_path / "export"), str(tmp_path / f"ds{k}"), progress=False, min_shards=1,
               val_fraction=0.2, test_fraction=0.2)
        ids.append({s: sorted(shards.read_split(str(tmp_path / f"ds{k}"), s).column("id").to_pylist())
                    for s in ("train", "val", "test")})
        groups.append(set(shards.read_split(str(tmp_path / f"ds{k}"), "train").column("group").to_pylist()))
    assert ids[0] == ids[1]  # the same rows in the same splits ...
    assert not groups[0] & groups[1]  # ... under unlinkable hashes
    salt = "a long secret salt"
    for k in range(2):
        ingest(str(tmp_path / "export"), str(tmp_path / f"salted{k}"), progress=False, min_shards=1,
               dicom_options=DicomOptions(salt=salt))
    a, b = (shards.read_manifest(str(tmp_path / f"salted{k}")) for k in range(2))
    assert [s.sha256 for s in a.splits["train"].shards] == [s.sha256 for s in b.splits["train"].shards]
    assert salt not in (tmp_path / "salted0" / "manifest.json").read_text()


def test_labels_csv_by_uid_and_path_and_unlabeled_pool(tmp_path):
    src = tmp_path / "export" / "DOE JOHN"  # a patient-named tree: labels come from the CSV, not folders
    files = []
    for i in range(8):
        ds = make_ds(U12[:8, :8] // 2 + i, bits=12, who=patient(i), WindowCenter=2000, WindowWidth=4000)
        files.append((save(ds, src / f"IMG{i:04d}"), ds))
    for key in ("SOPInstanceUID", "StudyInstanceUID", "path"):
        lines = [f"{key},label,split"]
        for i, (path, ds) in enumerate(files[:6]):
            value = path.relative_to(tmp_path / "export").as_posix() if key == "path" else ds[key].value
            lines.append(f"{value},{'ab'[i % 2]},{'test' if i == 5 else ''}")
        (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
        dest = tmp_path / f"ds-{key}"
        m = ingest(str(tmp_path / "export"), str(dest), labels=str(tmp_path / "labels.csv"), progress=False,
                   min_shards=1, val_fraction=0.2)
        assert m.classes == ["a", "b"] and m.splits["unlabeled"].rows == 2 and m.splits["test"].rows == 1
        assert m.extra["dicom"]["labels_csv"] == {"key": key, "rows": 6, "rows_matched": 6, "files_not_in_csv": 2}
        assert m.splits["train"].rows + m.splits["val"].rows == 5
    (tmp_path / "bad.csv").write_text("SOPInstanceUID,label\n1.2.3.4,a\n")
    with pytest.raises(DatasetError, match="no row of the labels CSV") as err:
        ingest(str(tmp_path / "export"), str(tmp_path / "x"), labels=str(tmp_path / "bad.csv"), progress=False)
    assert "1.2.3.4" not in str(err.value)
    (tmp_path / "bad.csv").write_text("PatientName,label\nX,a\n")
    with pytest.raises(DatasetError, match="one key column"):
        ingest(str(tmp_path / "export"), str(tmp_path / "x"), labels=str(tmp_path / "bad.csv"), progress=False)


def test_group_by_study_and_unlabeled_dicom_pool(tmp_path):
    src = tmp_path / "src"
    for i in range(10):  # one patient, ten studies: grouped by study they may spread over the splits
        study = generate_uid()
        for k in range(2):
            save(make_ds(U12[:8, :8] // 2 + 10 * i + k, bits=12, study=study, **WINDOW), src / "c" / f"{i}-{k}.dcm")
        save(make_ds(U12[:8, :8] // 2 + 500 + i, bits=12, who=patient(i + 1), **WINDOW), src / "d" / f"{i}.dcm")
    pool = tmp_path / "pool"
    anon = make_ds(U12[:8, :8] // 2 + 999, bits=12, who={}, **WINDOW)
    del anon.StudyInstanceUID
    save(anon, pool / "anon")  # no group key: unlabelled, so kept (and counted)
    m = ingest(str(src), str(tmp_path / "ds"), unlabeled=str(pool), dicom_options=DicomOptions(group_by="study"),
               progress=False, min_shards=1, val_fraction=0.2, test_fraction=0.2)
    assert m.extra["dicom"]["group_key"] == "StudyInstanceUID"
    assert m.extra["dicom"]["missing_group_key"] == {"quarantined": 0, "unlabeled_kept": 1}
    where: dict[str, set] = {}
    for split in ("train", "val", "test"):
        for r in shards.read_split(str(tmp_path / "ds"), split).to_pylist():
            where.setdefault(r["group"], set()).add(split)
    assert len(where) == 20 and all(len(s) == 1 for s in where.values())
    (row,) = shards.read_split(str(tmp_path / "ds"), "unlabeled").to_pylist()
    assert row["group"] is None and row["label"] is None and row["source"].startswith("unlabeled:")
    m = ingest(str(src), str(tmp_path / "ds2"), progress=False, min_shards=1, val_fraction=0.2, test_fraction=0.2)
    sides = {s for s in ("train", "val", "test") if m.splits[s].label_counts["c"]}
    assert len(sides) == 1  # by patient (the default), all of class c's one patient sits on one side


def test_unsupported_transfer_syntax_names_the_decoder(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    j2k = make_ds(U12, bits=12, who=patient(1))
    j2k.compress(JPEG2000Lossless)
    j2k_path = save(j2k, tmp_path / "j2k.dcm")
    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})
    assert dicom_header.read_header(j2k_path, DicomOptions(), 10**8).reason == (
        "unsupported transfer syntax: JPEG 2000 Image Compression (Lossless Only) "
        "(needs pylibjpeg-openjpeg, pillow or python-gdcm)"
    )
    mpeg = encapsulated(make_ds(U12, bits=12), b"\x00\x00\x01\xb3" + bytes(64), "1.2.840.10008.1.2.4.100")
    path = save(mpeg, tmp_path / "mpeg.dcm")
    reason = dicom_header.read_header(path, DicomOptions(), 10**8).reason
    assert reason.startswith("unsupported transfer syntax: MPEG2 Main Profile / Main Level (no decoder in pydicom")
    # JPEG XL: newer than pydicom 3.0's dictionary (pydicom cannot even write it: patch the UID in place).
    jxl = tmp_path / "jxl.dcm"
    jxl.write_bytes(path.read_bytes().replace(b"1.2.840.10008.1.2.4.100", b"1.2.840.10008.1.2.4.110"))
    reason = dicom_header.read_header(jxl, DicomOptions(), 10**8).reason
    assert reason.startswith("unsupported transfer syntax: 1.2.840.10008.1.2.4.110 (no decoder in pydicom")


def test_corrupt_pixel_data_is_quarantined_not_fatal(tmp_path):
    ds = make_ds(U12, bits=12)
    ds.compress(RLELossless)
    frame = bytearray(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__())
    good = save(make_ds(U12, bits=12, who=patient(2)), tmp_path / "src" / "a" / "good.dcm")
    bad = encapsulated(make_ds(U12, bits=12, who=patient(3)), bytes(frame[:64]) + bytes(100), RLELossless)
    save(bad, tmp_path / "src" / "a" / "bad.dcm")
    m = ingest(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False, min_shards=1, val_fraction=0,
               test_fraction=0)
    quarantine = shards.read_quarantine(str(tmp_path / "ds")).to_pylist()
    assert m.splits["train"].rows == 1 and len(quarantine) == 1 == m.quarantined_total
    assert quarantine[0]["reason"].startswith("decode failed: ")
    assert good.exists()


def test_keep_tags_policy_and_cli_errors(tmp_path, capsys):
    assert dicom.check_keep_tags(["Modality", " BodyPartExamined", "ViewPosition", "KVP", "Manufacturer"]) == (
        "Modality", "BodyPartExamined", "ViewPosition", "KVP", "Manufacturer")
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate",
                "AcquisitionDateTime", "AccessionNumber", "InstitutionName", "StudyDescription",
                "ReferringPhysicianName", "StudyInstanceUID", "RequestedProcedureID", "DeviceSerialNumber"):
        with pytest.raises(DatasetError, match=f"refusing {tag}"):
            dicom.check_keep_tags([tag])
    with pytest.raises(DatasetError, match="not a DICOM keyword"):
        dicom.check_keep_tags(["Modalty"])
    save(make_ds(U12[:8, :8], bits=12), tmp_path / "src" / "a" / "x.dcm")
    cases = [
        (["--keep-tags", "Modality,PatientName"], "refusing PatientName"),
        (["--window", "40"], "CENTER,WIDTH"),
        (["--salt", "short"], "at least 12"),
        (["--group-regex", "(x)"], "does not apply to DICOM"),
        (["--labels", str(tmp_path / "missing.csv")], "does not exist"),
    ]
    for extra, message in cases:
        assert cli.main(["ingest", str(tmp_path / "src"), str(tmp_path / "ds"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    args = ["ingest", str(tmp_path / "src"), str(tmp_path / "ok"), "--window=-600,1500", "--quiet", "--min-shards=1"]
    assert cli.main(args) == 0
    assert shards.read_manifest(str(tmp_path / "ok")).extra["dicom"]["window_override"] == [-600.0, 1500.0]
    png = tmp_path / "png" / "a"
    png.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png / "x.png")
    with pytest.raises(DatasetError, match="apply to DICOM sources only"):
        ingest(str(tmp_path / "png"), str(tmp_path / "ds"), dicom_options=DicomOptions(frames="all"))
    with pytest.raises(DatasetError, match="no DICOM files"):
        ingest(str(tmp_path / "png"), str(tmp_path / "ds"), fmt="dicom")
    assert not (tmp_path / "ds").exists()


def test_patient_named_class_folder_is_refused(tmp_path):
    who = patient(4)
    save(make_ds(U12[:8, :8], bits=12, who=who), tmp_path / "src" / "Zebediah Quuxington4" / "1.dcm")
    save(make_ds(U12[:8, :8], bits=12, who=patient(5)), tmp_path / "src" / "PID-7731-QX05" / "1.dcm")
    with pytest.raises(DatasetError, match="named after the patient") as err:
        ingest(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
    assert "Quuxington" not in str(err.value) and not (tmp_path / "ds").exists()


def test_missing_pydicom_gives_the_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(DatasetError, match=r"pip install 'raysemi\[dicom\]'"):
        dicom.pydicom_module()


def test_dicom_to_s3_matches_local(tmp_path, s3_bucket):
    write_export(tmp_path / "export", n_patients=4)
    opts = DicomOptions(salt="the same long salt", keep_tags=("Modality",))
    local = ingest(str(tmp_path / "export"), str(tmp_path / "ds"), dicom_options=opts, progress=False)
    remote = ingest(str(tmp_path / "export"), f"{s3_bucket}/dicom", dicom_options=opts, progress=False)
    for split in shards.SPLITS:
        assert local.splits[split].shards == remote.splits[split].shards
    assert local.quarantined == remote.quarantined
    assert shards.read_quarantine(str(tmp_path / "ds")) == shards.read_quarantine(f"{s3_bucket}/dicom")
