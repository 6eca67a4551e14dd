"""DICOM in: find DICOM files, read their headers, render their pixels for ``raysemi ingest``.

The scanning (which files, which labels, which items) is ``dicom/sources.py``'s; rendering a frame's pixels
is ``dicom/render.py``'s; this module knows DICOM files: options, detection, headers, the group hash.

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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raysemi.data.shards import DatasetError

if TYPE_CHECKING:
    pass

FRAMES = ("first", "middle", "all")
GROUP_BY = {"patient": "PatientID", "study": "StudyInstanceUID"}
MIN_SALT = 12
DECODER_PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle")
_INSTALL_HINT = "DICOM sources need pydicom and its decoders: pip install 'raysemi[dicom]'"

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_NOISY_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle")  # silenced while ingesting DICOM
FUNCTIONAL_GROUPS = [0x52009229, 0x52009230]  # Shared / Per-frame Functional Groups Sequence

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


def norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def names_patient(folder: str, names: tuple[str, ...]) -> bool:
    """Whether a folder name spells a file's PatientID, or every part of its PatientName."""
    f = norm(folder)
    if not f or not names:
        return False
    pid, parts = names[0], names[1:]
    return (len(pid) >= 2 and f == pid) or (bool(parts) and all(p in f for p in parts))


def manifest_entry(
    opts: DicomOptions, stats: dict[str, Any], rules: dict[str, int], syntaxes: dict[str, int]
) -> dict[str, Any]:
    """What the manifest says about a DICOM ingest: the rules applied and the counts (of the frames stored,
    per rendering rule and transfer syntax), nothing identifying."""
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
        "rules": dict(sorted(rules.items())),
        "transfer_syntaxes": dict(sorted(syntaxes.items())),
        "decoders": decoder_versions(),
        **stats,
    }
