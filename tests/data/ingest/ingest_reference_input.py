"""A generated ingest input with every case the planning rules decide (the fixture ``ingest_reference.json``
holds what the ingest of revision 58ff6dc made of it, shard by shard)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def make_input(root: Path) -> tuple[Path, Path]:
    """(source folder, unlabeled folder): 3 classes of patients with 1-4 images each, uneven classes,
    corrupt files, exact copies with the same and with another label, an unlabeled pool with copies."""
    rng = np.random.default_rng(7)
    src, pool = root / "src", root / "pool"
    n = 0
    for cls, patients in (("covid", 9), ("normal", 23), ("viral", 14)):
        (src / cls).mkdir(parents=True)
        for p in range(patients):
            for i in range(int(rng.integers(1, 5))):
                arr = rng.integers(0, 255, (12, 12), dtype=np.uint8)
                Image.fromarray(arr).save(src / cls / f"person{p:03d}{cls[0]}_{i}.png")
                n += 1
    (src / "normal" / "person900n_0.png").write_bytes(b"not an image")
    (src / "viral" / "person901v_0.png").write_bytes(b"")
    shutil.copy(src / "normal" / "person001n_0.png", src / "normal" / "person902n_0.png")  # same label
    shutil.copy(src / "covid" / "person002c_0.png", src / "viral" / "person903v_0.png")  # conflicting
    pool.mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(pool / f"u{i:03d}.png")
    shutil.copy(src / "viral" / "person004v_0.png", pool / "copy.png")
    return src, pool
