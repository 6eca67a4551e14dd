"""DICOM in: find DICOM files, read their headers, render their pixels for ``raysemi ingest``.

The scanning (which files, which labels, which items) is ``sources.py``'s; this module knows DICOM.

**Pixels as a radiologist sees them** (the PS3.4 N.2 greyscale pipeline, with pydicom's own functions):
modality LUT (Modality LUT Sequence, or Rescale Slope/Intercept: ``apply_modality_lut``), then VOI (the VOI
LUT Sequence, else the first Window Center/Width with its VOI LUT Function: ``apply_voi_lut``; ``--window
C,W`` replaces both), then the VOI output range mapped linearly to 0..255 (pydicom's range: 0..2^n-1 for a
LUT, the rescaled stored-bit range for a window), then MONOCHROME1 inverted. Without any VOI the frame's own
min..max is stretched (8-bit unsigned data without a rescale is kept as stored). Colour (RGB, YBR -> RGB,
PALETTE COLOR through its LUT) is scaled from its bit depth. Enhanced multi-frame files keep rescale and
window per frame in functional groups: those are lifted to the frame's top level first.

**Privacy**: nothing read from a header leaves this module except the pixels, the group key (hashed with a
salt by ``Hasher`` before anyone stores it), the tags a user may keep (``check_keep_tags``) and fixed
quarantine reasons (never an exception's text, which can quote a header value or a path).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from raysemi.data.shards import DatasetError

FRAMES = ("first", "middle", "all")
GROUP_BY = {"patient": "PatientID", "study": "StudyInstanceUID"}
MIN_SALT = 12
DECODER_PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle")
_INSTALL_HINT = "DICOM sources need pydicom and its decoders: pip install 'raysemi[dicom]'"

_MONO = ("MONOCHROME1", "MONOCHROME2")
_DICOMDIR = "1.2.840.10008.1.3.10"
# Multi-frame SOP classes whose frames are slices of one volume, not views of one 2-D image.
_VOLUME_SOP = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET",
    "1.2.840.10008.5.1.4.1.1.13.1.1": "X-Ray 3D Angiographic",
    "1.2.840.10008.5.1.4.1.1.13.1.2": "X-Ray 3D Craniofacial",
    "1.2.840.10008.5.1.4.1.1.13.1.3": "Breast Tomosynthesis",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume",
    "1.2.840.10008.5.1.4.1.1.77.1.5.4": "Ophthalmic Tomography",
}
# What to install for a compressed transfer syntax whose decoder is missing (pip names).
_DECODER_HINT = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg or pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg or pillow",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg, pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg, pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg, pillow or python-gdcm",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg, pillow or python-gdcm",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}
_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian
_NOISY_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle")  # silenced while ingesting DICOM
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_FUNCTIONAL_GROUPS = [0x52009229, 0x52009230]  # Shared / Per-frame Functional Groups Sequence

# --keep-tags policy: only coded and numeric values, outside the patient, study-scheduling, visit and
# request groups; text VRs (names, IDs, dates, UIDs, free text) never. A few LO/SH that describe the device
# class, not a person or a place, are allowed by name.
_KEEP_VRS = {"CS", "IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "US or SS"}
_KEEP_ALSO = {"Manufacturer", "ManufacturerModelName", "ConvolutionKernel"}
_BANNED_GROUPS = {0x0010: "patient", 0x0032: "study scheduling", 0x0038: "visit", 0x0040: "procedure/request"}


class DicomReject(Exception):
    """A file or frame to quarantine; ``reason`` is a fixed phrase that quotes nothing from the file."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def pydicom_module():
    """The ``pydicom`` module, or a one-line error with the install command."""
    try:
        import pydicom
        import pydicom.pixels  # the pixel API: pydicom >= 3
    except ImportError:
        raise DatasetError(_INSTALL_HINT) from None
    return pydicom


def decoder_versions() -> dict[str, str]:
    """Installed versions of pydicom and its pixel-data plugins, for the manifest."""
    out = {}
    for name in (*DECODER_PACKAGES, "python-gdcm", "pyjpegls", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


@dataclass(frozen=True)
class DicomOptions:
    """How DICOM becomes rows: which frames, which window, which group key, what may be kept."""

    frames: str = "first"  # first | middle | all
    window: tuple[float, float] | None = None  # (center, width) replacing the file's VOI
    group_by: str = "patient"  # patient (PatientID) | study (StudyInstanceUID)
    salt: str | None = None  # None: a random salt per ingest, never stored
    keep_tags: tuple[str, ...] = ()
    keep_paths: bool = False  # store relative paths in `source` (they can name patients)
    volumes: bool = False  # take frames of 3-D volumes too (else quarantined)

    def checked(self) -> DicomOptions:
        """These options validated (a one-line ``DatasetError`` otherwise), keep_tags normalised."""
        if self.frames not in FRAMES:
            raise DatasetError(f"--frames must be one of {', '.join(FRAMES)}, not {self.frames!r}")
        if self.group_by not in GROUP_BY:
            raise DatasetError(f"--dicom-group must be one of {', '.join(GROUP_BY)}, not {self.group_by!r}")
        if self.window is not None and not (len(self.window) == 2 and self.window[1] >= 1):
            raise DatasetError("--window needs CENTER,WIDTH with a width of at least 1")
        if self.salt is not None and len(self.salt) < MIN_SALT:
            raise DatasetError(f"--salt must be at least {MIN_SALT} characters (it guards hashed patient keys)")
        return DicomOptions(
            self.frames, self.window, self.group_by, self.salt, check_keep_tags(self.keep_tags),
            self.keep_paths, self.volumes,
        )


def parse_window(text: str) -> tuple[float, float]:
    """``"-600,1500"`` -> (center, width)."""
    try:
        center, width = (float(x) for x in text.split(","))
    except ValueError:
        raise DatasetError(f"--window must be CENTER,WIDTH (e.g. -600,1500), not {text!r}") from None
    if width < 1:
        raise DatasetError(f"--window width must be at least 1, not {width:g}")
    return center, width


def check_keep_tags(names) -> tuple[str, ...]:
    """Refuse any tag that can identify a patient; return the keywords (deduplicated, in order)."""
    pydicom_module()
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name or name in out:
            continue
        tag = tag_for_keyword(name)
        if tag is None:
            raise DatasetError(f"--keep-tags: {name!r} is not a DICOM keyword (e.g. Modality, BodyPartExamined)")
        group = tag >> 16
        vr = dictionary_VR(tag)
        if group in _BANNED_GROUPS:
            why = f"it is in the {_BANNED_GROUPS[group]} group"
        elif group % 2:
            why = "it is a private tag"
        elif vr not in _KEEP_VRS and name not in _KEEP_ALSO:
            why = f"its VR {vr} holds names, IDs, dates or free text"
        else:
            out.append(name)
            continue
        raise DatasetError(f"--keep-tags: refusing {name}: {why}, which can identify a patient")
    return tuple(out)


class Hasher:
    """Salted HMAC-SHA256 of patient keys and paths. The salt is random per ingest unless the user gives
    one, and is stored nowhere: without it a hash cannot be checked against a list of likely IDs."""

    def __init__(self, salt: str | None):
        self._key = salt.encode() if salt is not None else secrets.token_bytes(32)

    def _mac(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()

    def group(self, kind: str, value: str) -> str:
        return self._mac(kind, value)[:32]

    def source(self, relpath: str) -> str:
        return f"dicom:{self._mac('path', relpath)[:24]}"

    @staticmethod
    def order(value: str) -> str:
        """An unsalted sort key, held in memory only: splits and shard order stay the same whatever the salt."""
        return hashlib.sha256(f"order\0{value}".encode()).hexdigest()


def is_dicom(path: Path) -> bool:
    """The DICOM file format's mark: ``DICM`` after the 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def looks_like_dicom(root: Path, limit: int = 64) -> bool:
    """Whether a folder tree holds DICOM files: any of its first ``limit`` files (in walk order)."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if is_dicom(Path(dirpath) / name):
                return True
            seen += 1
            if seen >= limit:
                return False
    return False


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom while ingesting: its warnings and log lines quote header values and file paths.
    Call from the main thread; the worker threads see the same (process-wide) settings."""
    pydicom = pydicom_module()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    config = pydicom.config.settings
    old = ([lg.disabled for lg in loggers], config.reading_validation_mode)
    for lg in loggers:
        lg.disabled = True
    config.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, was in zip(loggers, old[0]):
            lg.disabled = was
        config.reading_validation_mode = old[1]


@dataclass
class Header:
    """What the scan learns from one file's header; ``skip`` (not an image file) or ``reason`` (quarantine)."""

    skip: str | None = None
    reason: str | None = None
    frames: list[int | None] = field(default_factory=list)  # frame indices to render (None: the only one)
    keys: dict[str, str] = field(default_factory=dict)  # PatientID, StudyInstanceUID, SOPInstanceUID (raw)
    names: tuple[str, ...] = ()  # normalised PatientID and PatientName parts: to refuse patient-named folders
    tags: dict[str, str | None] = field(default_factory=dict)  # the kept tags' values
    syntax: str = ""


def norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _uid_label(uid) -> str:
    """A UID's registered name, the UID itself when it is well formed, else a placeholder."""
    name = getattr(uid, "name", "")
    if name and name != str(uid):
        return name
    return str(uid) if re.fullmatch(r"[0-9.]{1,64}", str(uid)) else "an unregistered UID"


def _value(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _nframes(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _is_volume(ds, nframes: int) -> bool:
    if nframes < 2:
        return False
    if str(ds.get("SOPClassUID", "")) in _VOLUME_SOP:
        return True
    positions = set()
    for item in ds.get("PerFrameFunctionalGroupsSequence") or []:
        for plane in item.get("PlanePositionSequence") or []:
            pos = plane.get("ImagePositionPatient")
            if pos:
                positions.add(tuple(round(float(v), 3) for v in pos))
    slices = ds.get("SliceVector")
    return len(positions) > 1 or (slices is not None and len(set(slices)) > 1)


def _pixel_problem(fh, ds, size: int) -> str | None:
    """Look at the pixel data element where the header read stopped: missing, or cut short?"""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or syntax.is_deflated:
        return None  # the dataset is compressed as a whole: the decoder will tell
    head = fh.read(8)
    if len(head) < 8:
        # Where the header describes an image, the file may have been cut short before its pixels.
        return "no pixel data (the file ends after the image description: truncated?)" if "Rows" in ds else "no pixel data"
    endian = "<" if syntax.is_little_endian else ">"
    group, elem = struct.unpack(f"{endian}HH", head[:4])
    if (group, elem) not in _PIXEL_TAGS:
        return "no pixel data"
    if syntax.is_implicit_VR:
        (length,) = struct.unpack(f"{endian}L", head[4:])
    else:
        more = fh.read(4)
        if len(more) < 4:
            return "truncated"
        (length,) = struct.unpack(f"{endian}L", more)
    left = size - fh.tell()
    if length == 0xFFFFFFFF:  # encapsulated: complete only with its sequence delimiter
        fh.seek(max(size - 8, 0))
        if fh.read(8) == _SEQ_DELIMITER:
            return None
        fh.seek(size - left)
        return None if _SEQ_DELIMITER in fh.read() else "truncated"
    if length == 0:
        return "no pixel data"
    return "truncated" if length > left else None


def _parsable(syntax) -> bool:
    """Whether pydicom knows how the dataset after the file meta is encoded under this transfer syntax."""
    try:
        return syntax.is_implicit_VR in (True, False) and syntax.is_little_endian in (True, False)
    except ValueError:
        return False


def _decoder_problem(syntax) -> str | None:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return (
            f"unsupported transfer syntax: {_uid_label(syntax)} (no decoder in pydicom; convert it to "
            "JPEG 2000 or uncompressed first, e.g. with gdcmconv or dcmtk)"
        )
    if decoder.is_available:
        return None
    hint = _DECODER_HINT.get(str(syntax), "a pydicom pixel-data plugin")
    return f"unsupported transfer syntax: {_uid_label(syntax)} (needs {hint})"


def read_header(path: Path, opts: DicomOptions, max_pixels: int) -> Header:
    """Everything the scan needs from one file, reading no pixel data. Never raises for a bad file."""
    pydicom_module()
    if not is_dicom(path):
        return Header(skip="not DICOM")
    try:
        return _read_header(path, opts, max_pixels)
    except (EOFError, struct.error):
        return Header(reason="truncated")
    except OSError as err:
        return Header(reason=f"unreadable: {type(err).__name__}")
    except Exception as err:  # pydicom's messages (and a bad value's) can quote the header: the type only
        return Header(reason=f"unreadable DICOM header ({type(err).__name__})")


def _read_header(path: Path, opts: DicomOptions, max_pixels: int) -> Header:
    pydicom = pydicom_module()
    size = path.stat().st_size
    syntax = pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID")
    if syntax is not None and not _parsable(syntax):  # e.g. JPEG XL in pydicom 3.0: no reading the rest
        return Header(reason=_decoder_problem(syntax) or "unsupported transfer syntax")
    with open(path, "rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=1 << 16)
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR:
            return Header(skip="DICOMDIR")
        problem = _pixel_problem(fh, ds, size)
    sop = ds.get("SOPClassUID")
    if sop is not None and sop.is_valid and sop.name != str(sop) and "Image Storage" not in sop.name:
        return Header(reason=f"non-image SOP class: {sop.name}")
    if problem:
        return Header(reason=problem)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        return Header(reason="no transfer syntax in the file meta")
    if bad := _decoder_problem(syntax):
        return Header(reason=bad)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * cols > max_pixels:
        return Header(reason=f"over pixel limit ({cols} x {rows})")
    if rows < 1 or cols < 1:
        return Header(reason="corrupt: empty image")
    n = _nframes(ds)
    if _is_volume(ds, n) and not opts.volumes:
        return Header(reason=f"3-D volume ({n} slices) where a 2-D image was expected (--volumes takes slices)")
    if n == 1:
        frames: list[int | None] = [None]
    else:
        frames = {"first": [0], "middle": [n // 2], "all": list(range(n))}[opts.frames]
    keys = {k: v.strip() for k in ("PatientID", "StudyInstanceUID", "SOPInstanceUID") if (v := _value(ds, k))}
    keys = {k: v for k, v in keys.items() if v}
    person = [norm(p) for p in re.split(r"[\^ =]+", str(ds.get("PatientName") or ""))]
    names = (norm(keys.get("PatientID", "")), *(p for p in person if len(p) >= 2))
    tags = {t: _value(ds, t) for t in opts.keep_tags}
    return Header(frames=frames, keys=keys, names=names, tags=tags, syntax=_uid_label(syntax))


def names_patient(folder: str, names: tuple[str, ...]) -> bool:
    """Whether a folder name spells a file's PatientID, or every part of its PatientName."""
    f = norm(folder)
    if not f or not names:
        return False
    pid, parts = names[0], names[1:]
    return (len(pid) >= 2 and f == pid) or (bool(parts) and all(p in f for p in parts))


@dataclass
class DicomRef:
    """One frame of one file to render; ``rules`` and ``conversion`` are filled in by ``render``."""

    path: Path
    index: int | None
    syntax: str
    tags: dict[str, str | None]
    rules: str = ""


def _scrub(msg: str) -> str:
    """A decoder's message without anything quoted or path-like, so it cannot repeat a header value."""
    first = (msg.strip().splitlines() or [""])[-1].strip()
    first = re.sub(r"'[^']*'|\"[^\"]*\"|\S*[/\\]\S*", "…", first)
    return re.sub(r"[^\w .,:;()<>=+…-]", "", first)[:100]


def _lift_functional_groups(ds, index: int | None) -> None:
    """Enhanced multi-frame files: copy the frame's rescale and window (shared, then per-frame) to the top."""
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    i = index or 0
    for groups in (shared[:1], per[i : i + 1]):
        for group in groups:
            for seq, keywords in (
                ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
                ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
            ):
                for item in (group.get(seq) or [])[:1]:
                    for kw in keywords:
                        if kw in item:
                            setattr(ds, kw, item[kw].value)


def _window_range(ds) -> tuple[float, float]:
    """The output range of pydicom's ``apply_windowing`` for this dataset (its own rule, repeated)."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1)
    elif ds.PixelRepresentation == 0:
        lo, hi = 0.0, float(2**ds.BitsStored - 1)
    else:
        lo, hi = float(-(2 ** (ds.BitsStored - 1))), float(2 ** (ds.BitsStored - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _lut_top(item) -> float:
    """The top of a VOI LUT's output: 2^bits - 1, with bits from the descriptor, or fewer when the data
    never reach them (a 16-bit descriptor over 12-bit data is a common export bug)."""
    bits = int(item.LUTDescriptor[2])
    data = item.LUTData
    values = np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data).ravel()
    if values.size:
        bits = min(bits, max(8, int(values.max()).bit_length()))
    return float(2**bits - 1)


def _to_uint8(y: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:
        return np.zeros(y.shape, np.uint8)
    out = (np.asarray(y, np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_display(arr: np.ndarray, ds, window: tuple[float, float] | None = None) -> tuple[np.ndarray, list[str]]:
    """One decoded frame -> 8-bit L (HxW) or RGB (HxWx3) as displayed, and the rules applied.
    ``ds`` holds the frame's group 0028 (it is changed when ``window`` overrides the file's VOI)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in _MONO:
        if arr.ndim != 2:
            raise DicomReject(f"unexpected {arr.ndim}-D {photometric} frame")
        rules = []
        if ds.get("ModalityLUTSequence"):
            rules.append("modality LUT")
        elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
            rules.append("rescale")
        x = apply_modality_lut(arr, ds)
        if window is not None:
            if "VOILUTSequence" in ds:
                del ds.VOILUTSequence
            ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = window[0], window[1], "LINEAR"
        voi = ds.get("VOILUTSequence")
        if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
            y, (lo, hi) = apply_voi_lut(x, ds), (0.0, _lut_top(voi[0]))
            rules.append("VOI LUT")
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            y, (lo, hi) = apply_voi_lut(x, ds), _window_range(ds)
            function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
            rules.append(f"window ({'--window' if window else 'file'}, {function.lower()})")
        elif not rules and arr.dtype == np.uint8:
            y, lo, hi = x, 0.0, 255.0
            rules.append("8-bit as stored")
        else:
            y, lo, hi = x, float(np.min(x)), float(np.max(x))
            rules.append("min-max (no window)")
        out = _to_uint8(y, lo, hi)
        if photometric == "MONOCHROME1":
            out = 255 - out
            rules.append("MONOCHROME1 inverted")
        return out, rules
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _to_uint8(rgb, 0.0, float(2**bits - 1)), ["palette colour LUT"]
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DicomReject(f"unexpected pixel array shape for {photometric}")
        bits = int(ds.get("BitsStored") or 8)
        rule = "RGB" if photometric == "RGB" else f"{photometric} -> RGB"
        return (arr.astype(np.uint8) if bits == 8 else _to_uint8(arr, 0.0, float(2**bits - 1))), [rule]
    known = photometric if re.fullmatch(r"[A-Z0-9_ ]{1,16}", photometric) else "unknown"
    raise DicomReject(f"unsupported photometric interpretation {known}")


def render(ref: DicomRef, window: tuple[float, float] | None) -> tuple[np.ndarray, str]:
    """Decode one frame and render it for display: (uint8 array, conversion label). Sets ``ref.rules``.
    Raises ``DicomReject`` with a reason that quotes nothing from the file."""
    pydicom = pydicom_module()
    from pydicom.pixels import pixel_array

    ds = pydicom.Dataset()
    try:
        arr = pixel_array(str(ref.path), index=ref.index, ds_out=ds, specific_tags=_FUNCTIONAL_GROUPS)
    except (EOFError, struct.error):
        raise DicomReject("truncated") from None
    except Exception as err:
        raise DicomReject(f"decode failed: {type(err).__name__}: {_scrub(str(err))}") from None
    try:
        _lift_functional_groups(ds, ref.index)
        out, rules = to_display(arr, ds, window)
    except DicomReject:
        raise
    except Exception as err:
        raise DicomReject(f"cannot render: {type(err).__name__}: {_scrub(str(err))}") from None
    ref.rules = " + ".join(rules)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    bits = int(ds.get("BitsStored") or 0)
    mode = "L" if out.ndim == 2 else "RGB"
    return out, f"DICOM {bits}-bit {photometric} -> 8-bit {mode} PNG"


def manifest_entry(opts: DicomOptions, stats: dict[str, Any], rendered: list[DicomRef]) -> dict[str, Any]:
    """What the manifest says about a DICOM ingest: the rules applied and the counts, nothing identifying."""
    from collections import Counter

    key = GROUP_BY[opts.group_by]
    return {
        "group_key": key,
        "group_hash": "HMAC-SHA256 of the key, first 32 hex digits; salt: "
        + ("the user's --salt" if opts.salt else "random for this ingest")
        + ", not stored anywhere",
        "source_column": "relative path (--keep-paths)" if opts.keep_paths else "dicom:<salted HMAC of the relative path>",
        "missing_group_key": "labelled files without it are quarantined; unlabelled ones are kept with no group",
        "frames": opts.frames,
        "volumes": "frames taken per --frames" if opts.volumes else "quarantined",
        "window_override": list(opts.window) if opts.window else None,
        "keep_tags": list(opts.keep_tags),
        "pipeline": "modality LUT (rescale) -> VOI LUT or window (file, or --window) -> output range to 0..255 "
        "-> MONOCHROME1 inverted -> 8-bit PNG",
        "rules": dict(sorted(Counter(r.rules for r in rendered).items())),
        "transfer_syntaxes": dict(sorted(Counter(r.syntax for r in rendered).items())),
        "decoders": decoder_versions(),
        **stats,
    }
