"""Reading one DICOM file's header for ingest: what it holds (frames, syntax, group key, kept tags), or why it
is refused (a fixed quarantine reason, never a header value), without decoding its pixels.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from raysemi.data.ingest.dicom.read import DicomOptions, is_dicom, norm, pydicom_module

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
_DICOMDIR = "1.2.840.10008.1.3.10"
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian
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
