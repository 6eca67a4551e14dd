"""The embedded demo data set: generated greyscale images with class structure, labelled as SYNTHETIC.

Each class is a shape (``synthetic_blob``, ``synthetic_ring``, ``synthetic_stripes``, ...) drawn faintly at a
random position, scale and rotation over a smooth "anatomy-like" background, then pixel noise, blur and a
random brightness/contrast. Each "patient" (``p0123_...png``) has one class and a patient-specific
background and exposure, so leaking a patient across splits inflates accuracy, as with real data; the
group regex ``^(p\\d+)_`` recovers the patient key. A CNN learns it in a few epochs; a pixel-mean does not.
Nothing here is medical data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from raysemi.core.outputs import SYNTHETIC_IMAGES, clear, guard_output
from raysemi.data.shards import DatasetError, Manifest

FOLDER = "SYNTHETIC-demo"
GROUP_REGEX = r"^(p\d+)_"
SHAPES = ("blob", "ring", "stripes", "cross", "square", "triangle", "checker", "spiral")
_MARKER = "SYNTHETIC DATA"


def class_names(num_classes: int) -> list[str]:
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be 2..{len(SHAPES)}, got {num_classes}")
    return [f"synthetic_{s}" for s in SHAPES[:num_classes]]


def _shape(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A shape in [0, 1] on coordinates (u, v) in units of the shape's radius (smooth edges)."""
    r = np.hypot(u, v)

    def soft(x):  # a smooth step: 1 inside (x < 0), 0 outside
        return 1.0 / (1.0 + np.exp(np.clip(x * 12.0, -30, 30)))

    if kind == "blob":
        return np.exp(-2.5 * r**2)
    if kind == "ring":
        return np.exp(-(((r - 0.75) / 0.17) ** 2))
    if kind == "stripes":
        return (0.5 + 0.5 * np.cos(2 * np.pi * 2.0 * u)) * soft(r - 1.0)
    if kind == "cross":
        return np.maximum(soft(np.abs(u) - 0.22), soft(np.abs(v) - 0.22)) * soft(r - 1.0)
    if kind == "square":
        return soft(np.maximum(np.abs(u), np.abs(v)) - 0.7)
    if kind == "triangle":
        return soft(np.maximum.reduce([-v, 0.866 * u + 0.5 * v, -0.866 * u + 0.5 * v]) - 0.5)
    if kind == "checker":
        return (np.sign(np.sin(np.pi * 1.6 * u) * np.sin(np.pi * 1.6 * v)) * 0.5 + 0.5) * soft(r - 1.0)
    if kind == "spiral":
        return (0.5 + 0.5 * np.cos(3 * np.arctan2(v, u) + 7 * r)) * soft(r - 1.0)
    raise ValueError(kind)


def _image(kind: str, style: dict, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    # The patient's "anatomy": a smooth gradient and two wide, low bumps, shared by all their images.
    bg = style["tilt"][0] * (xx - 0.5) + style["tilt"][1] * (yy - 0.5)
    for cy, cx, w, a in style["bumps"]:
        bg += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w**2))
    # The class shape: random place, scale, rotation, faint against the background and noise.
    cy, cx = rng.uniform(0.3, 0.7, 2)
    radius = rng.uniform(0.14, 0.26)
    theta = rng.uniform(0, 2 * np.pi)
    du, dv = (xx - cx) / radius, (yy - cy) / radius
    u = np.cos(theta) * du + np.sin(theta) * dv
    v = -np.sin(theta) * du + np.cos(theta) * dv
    img = bg + rng.uniform(0.18, 0.5) * _shape(kind, u, v)
    img += rng.normal(0.0, rng.uniform(0.04, 0.1), img.shape)
    lo, hi = np.percentile(img, (1, 99))
    img = (img - lo) / max(hi - lo, 1e-6)
    img = style["exposure"] + rng.uniform(0.7, 1.1) * (img - 0.5) * 0.8 + 0.5
    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    return pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0)))


def _style(rng: np.random.Generator) -> dict:
    return {
        "tilt": rng.normal(0, 0.3, 2),
        "bumps": [(*rng.uniform(0, 1, 2), rng.uniform(0.2, 0.4), rng.uniform(-0.3, 0.3)) for _ in range(2)],
        "exposure": rng.normal(0, 0.08),
    }


def generate_synthetic(
    out_dir: str,
    *,
    num_classes: int = 3,
    per_class: int = 300,
    unlabeled: int = 0,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``out_dir/SYNTHETIC-demo/<class>/p<patient>_<n>.png`` (+ ``unlabeled/``, README.txt).

    Returns the image folder, ready for ``ingest``. Deterministic for a seed. Refuses to replace a folder
    it did not write.
    """
    names = class_names(num_classes)
    if per_class < 1 or unlabeled < 0 or size < 16:
        raise ValueError("per_class must be >= 1, unlabeled >= 0 and size >= 16")
    root = Path(out_dir).expanduser() / FOLDER
    if root.exists():
        readme = root / "README.txt"
        if not (readme.is_file() and _MARKER in readme.read_text(errors="replace")):
            raise DatasetError(
                f"{root} exists and was not written by the synthetic generator; not replacing it"
            )
        clear(str(root), SYNTHETIC_IMAGES)  # what it wrote; anything else put there stays
    rng = np.random.default_rng(seed)
    patient = 0
    truth = []

    def emit(folder: Path, kinds: list[str]) -> None:
        """Images for ``kinds`` (one per image); each patient gets 1..6 consecutive images of one class."""
        nonlocal patient
        folder.mkdir(parents=True, exist_ok=True)
        i = 0
        while i < len(kinds):
            style, n, kind = _style(rng), int(rng.integers(1, 7)), kinds[i]
            for _ in range(min(n, len(kinds) - i)):
                name = f"p{patient:04d}_{i:05d}.png"
                _image(kind, style, rng, size).save(folder / name, compress_level=1)
                truth.append((name, f"synthetic_{kind}"))
                i += 1
            patient += 1

    for name in names:
        emit(root / name, [name.removeprefix("synthetic_")] * per_class)
    if unlabeled:
        truth.clear()
        hidden = rng.integers(0, num_classes, unlabeled)
        emit(root / "unlabeled", [names[k].removeprefix("synthetic_") for k in hidden])
        with open(root / "unlabeled_truth.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("file", "hidden_label"), *truth])
    (root / "README.txt").write_text(
        f"{_MARKER}: generated by raysemi.data.synthetic, not medical images.\n\n"
        f"Classes ({num_classes}): {', '.join(names)}; {per_class} images each, {size}x{size} greyscale PNG.\n"
        f"Unlabeled images: {unlabeled} (their hidden classes: unlabeled_truth.csv, for checking pseudo-labels).\n"
        f"Seed: {seed}. File names are p<patient>_<n>.png; one patient = one class (group regex {GROUP_REGEX}).\n"
        "Each image: the class's shape at a random position, scale and rotation over a patient-specific\n"
        "background, plus noise, blur and random brightness/contrast.\n"
    )
    return root


def make_demo_dataset(
    root: str,
    *,
    seed: int = 0,
    per_class: int = 200,
    unlabeled: int = 600,
    num_classes: int = 3,
    size: int = 64,
    overwrite: bool = False,
    progress: bool = False,
) -> Manifest:
    """Generate the synthetic images into ``<root>/images`` and ingest them into ``<root>/dataset``."""
    from raysemi.data import shards
    from raysemi.data.ingest import run as ingest_mod

    dest = str(Path(root).expanduser() / "dataset")
    guard_output(dest, "a dataset", shards.dataset_exists(dest), overwrite=overwrite, error=DatasetError)
    images = generate_synthetic(
        str(Path(root).expanduser() / "images"),
        num_classes=num_classes,
        per_class=per_class,
        unlabeled=unlabeled,
        size=size,
        seed=seed,
    )
    return ingest_mod.ingest(
        str(images),
        dest,
        group_regex=GROUP_REGEX,
        seed=seed,
        overwrite=overwrite,
        synthetic=True,
        progress=progress,
    )
