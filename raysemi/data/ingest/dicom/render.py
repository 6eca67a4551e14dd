"""Rendering one DICOM frame to display pixels (8-bit greyscale or RGB), the greyscale pipeline of PS3.4 N.2.

See ``dicom.py``'s docstring for the pipeline and the privacy rules; this module holds its pixel half.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysemi.data.ingest.dicom.read import FUNCTIONAL_GROUPS, MONOCHROME, DicomReject, pydicom_module


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
    if photometric in MONOCHROME:
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
        arr = pixel_array(str(ref.path), index=ref.index, ds_out=ds, specific_tags=FUNCTIONAL_GROUPS)
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
