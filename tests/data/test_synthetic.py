"""The synthetic demo data: labelled as synthetic, deterministic, class-structured, patient-grouped, fast."""

from __future__ import annotations

import re
import time
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from raysemi.data import shards
from raysemi.data.shards import DatasetError
from raysemi.data.synthetic import GROUP_REGEX, class_names, generate_synthetic, make_demo_dataset


def test_layout_names_and_readme(tmp_path):
    root = generate_synthetic(str(tmp_path), per_class=12, unlabeled=7, size=32, seed=1)
    assert root.name == "SYNTHETIC-demo"
    assert "SYNTHETIC DATA" in (root / "README.txt").read_text()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["synthetic_blob", "synthetic_ring", "synthetic_stripes", "unlabeled"]
    patients = defaultdict(set)
    for cls in folders:
        files = sorted((root / cls).iterdir())
        assert len(files) == (7 if cls == "unlabeled" else 12)
        for f in files:
            m = re.match(GROUP_REGEX, f.name)
            assert m, f.name
            im = Image.open(f)
            assert im.mode == "L" and im.size == (32, 32) and im.format == "PNG"
            patients[m.group(1)].add(cls)
    assert all(len(c) == 1 for c in patients.values())  # one patient, one folder (one class)
    assert len(patients) < 43  # patients hold several images
    truth = (root / "unlabeled_truth.csv").read_text().splitlines()
    assert truth[0] == "file,hidden_label" and len(truth) == 8


def test_deterministic_and_seeded(tmp_path):
    a = generate_synthetic(str(tmp_path / "a"), per_class=4, seed=5)
    b = generate_synthetic(str(tmp_path / "b"), per_class=4, seed=5)
    c = generate_synthetic(str(tmp_path / "c"), per_class=4, seed=6)

    def contents(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    assert contents(a) == contents(b)
    assert contents(a) != contents(c)


def test_classes_differ_in_structure_not_brightness(tmp_path):
    root = generate_synthetic(str(tmp_path), per_class=60, size=48, seed=0)
    means, spectra = {}, {}
    for cls in class_names(3):
        arrs = np.stack([np.asarray(Image.open(f), dtype=np.float64) for f in sorted((root / cls).iterdir())])
        means[cls] = arrs.mean(axis=(1, 2))
        spectra[cls] = np.abs(np.fft.fft2(arrs - arrs.mean(axis=(1, 2), keepdims=True))).mean(axis=0)
    # Mean brightness alone does not separate the classes (their ranges overlap) ...
    lo, hi = max(m.min() for m in means.values()), min(m.max() for m in means.values())
    assert lo < hi
    # ... but the class-average spatial structure does differ.
    blob, ring, stripes = (spectra[c] / spectra[c].sum() for c in class_names(3))
    assert np.abs(blob - stripes).sum() > 0.05 and np.abs(blob - ring).sum() > 0.02


def test_fast_enough(tmp_path):
    t = time.perf_counter()
    generate_synthetic(str(tmp_path), per_class=200, unlabeled=400, size=64)
    assert time.perf_counter() - t < 15  # ~1-2 s for 1000 images on a laptop core; slack for CI


def test_refuses_foreign_folder_and_bad_args(tmp_path):
    (tmp_path / "SYNTHETIC-demo").mkdir()
    (tmp_path / "SYNTHETIC-demo" / "mine.txt").write_text("user data")
    with pytest.raises(DatasetError, match="not written by the synthetic generator"):
        generate_synthetic(str(tmp_path), per_class=2)
    assert (tmp_path / "SYNTHETIC-demo" / "mine.txt").exists()
    with pytest.raises(ValueError, match="num_classes"):
        class_names(9)
    assert class_names(8)[-1] == "synthetic_spiral"


def test_make_demo_dataset(tmp_path):
    m = make_demo_dataset(str(tmp_path), per_class=30, unlabeled=40, size=32)
    assert m.synthetic and m.classes == class_names(3)
    assert m.splits["unlabeled"].rows == 40 and m.quarantined == {} and m.duplicates == 0
    assert sum(m.splits[s].rows for s in ("train", "val", "test")) == 90
    assert shards.read_manifest(str(tmp_path / "dataset")) == m
    sides = defaultdict(set)
    for split in ("train", "val", "test"):
        for g in (
            shards.read_split(str(tmp_path / "dataset"), split, columns=["group"]).column("group").to_pylist()
        ):
            sides[g].add(split)
    assert all(len(s) == 1 for s in sides.values())  # patients never span splits
    with pytest.raises(DatasetError, match="already holds a dataset"):
        make_demo_dataset(str(tmp_path), per_class=30, unlabeled=40, size=32)
    mine = [tmp_path / "images" / "SYNTHETIC-demo" / "my-notes.txt", tmp_path / "dataset" / "mine.txt",
            tmp_path / "images" / "SYNTHETIC-demo" / "unlabeled" / "keep.txt"]
    for p in mine:
        p.write_text("mine")
    m2 = make_demo_dataset(str(tmp_path), per_class=30, unlabeled=40, size=32, overwrite=True)
    assert m2.splits == m.splits  # deterministic: same shards
    assert all(p.read_text() == "mine" for p in mine)  # the writers replace only what they wrote
