"""``raysemi demo``: the embedded default. Generates the synthetic demo set, ingests it, runs the method.

Everything stays in one local folder (``outputs/demo`` by default): ``data/images`` (the generated,
clearly synthetic PNGs), ``data/dataset`` (the shards) and ``run`` (checkpoints and the report). The demo
is disposable: each invocation starts afresh unless ``--resume`` is given.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from raysemi.config import load_config
from raysemi.data.synthetic import make_demo_dataset
from raysemi.errors import RaysemiError
from raysemi.pipeline import run_pipeline

log = logging.getLogger("raysemi.demo")

# Packaged with raysemi (package data), so that `raysemi demo` from an installed wheel runs the same demo;
# configs/demo.yaml in the repository is a copy of it (tests/test_config.py keeps them equal).
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def run_demo(out: str, *, resume: bool = False, config_path: str | None = None,
             overrides: list[str] | None = None) -> str:
    """Run the demo; returns the URI of its ``report.json``."""
    root = Path(out).expanduser().resolve()
    if config_path is None and not DEMO_CONFIG.is_file():  # never silently the defaults (100 epochs, resnet18)
        raise RaysemiError(f"the demo config {DEMO_CONFIG} is missing from this install: reinstall raysemi")
    path = config_path or str(DEMO_CONFIG)
    cfg = load_config(path, [f"data.path={root / 'data' / 'dataset'}", f"run.output_dir={root / 'run'}",
                             *(overrides or [])])
    if not resume and root.exists():
        shutil.rmtree(root)
    if not (root / "data" / "dataset" / "manifest.json").is_file():
        manifest = make_demo_dataset(str(root / "data"), seed=cfg.run.seed, size=cfg.data.image_size)
        log.info("demo data set: %s", {k: v.rows for k, v in manifest.splits.items()})
    report = run_pipeline(cfg, resume=resume, config_path=path)
    return report
