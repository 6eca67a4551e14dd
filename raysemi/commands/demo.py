"""``raysemi demo``: the embedded default. Generates the synthetic demo set, ingests it, runs the method.

Everything stays in one local folder (``outputs/demo`` by default): ``data/images`` (the generated,
clearly synthetic PNGs), ``data/dataset`` (the shards) and ``run`` (checkpoints and the report). The folder
must be new or empty, or hold an earlier demo (recognised by its marker, ``outputs.MARKER``): then
``--resume`` continues it and ``--overwrite`` removes what that demo wrote (``outputs.DEMO``) and starts
afresh. A folder holding anything else is refused: the demo never removes a file it did not write.
"""

from __future__ import annotations

import logging
from pathlib import Path

from raysemi.core.config import load_config
from raysemi.core.errors import RaysemiError
from raysemi.core.outputs import DEMO, mark, marked_kind, remove_output
from raysemi.data.synthetic import make_demo_dataset
from raysemi.pipeline.run import run_pipeline

log = logging.getLogger("raysemi.commands.demo")

# Packaged with raysemi (package data), so that `raysemi demo` from an installed wheel runs the same demo;
# configs/demo.yaml in the repository is a copy of it (tests/core/test_config.py keeps them equal).
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def prepare_folder(root: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``root`` the demo's folder: new, empty or an earlier demo's (see the module docstring)."""
    if root.exists() and not root.is_dir():
        raise RaysemiError(f"{root} exists and is not a folder")
    held = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if held:
        if marked_kind(str(root)) != DEMO.kind:
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise RaysemiError(f"{root} holds files the demo did not write ({shown}): give --out a new or empty "
                               "folder")
        if overwrite:
            remove_output(str(root), DEMO, "an earlier demo")
        elif not resume:
            raise RaysemiError(f"{root} already holds an earlier demo: pass --resume to continue it or "
                               "--overwrite to replace it")
    root.mkdir(parents=True, exist_ok=True)
    mark(str(root), DEMO)


def run_demo(out: str, *, resume: bool = False, overwrite: bool = False, config_path: str | None = None,
             overrides: list[str] | None = None) -> str:
    """Run the demo; returns the URI of its ``report.json``."""
    root = Path(out).expanduser().resolve()
    if config_path is None and not DEMO_CONFIG.is_file():  # never silently the defaults (100 epochs, resnet18)
        raise RaysemiError(f"the demo config {DEMO_CONFIG} is missing from this install: reinstall raysemi")
    path = config_path or str(DEMO_CONFIG)
    cfg = load_config(path, [f"data.path={root / 'data' / 'dataset'}", f"run.output_dir={root / 'run'}",
                             *(overrides or [])])
    prepare_folder(root, resume=resume, overwrite=overwrite)
    if not (root / "data" / "dataset" / "manifest.json").is_file():
        manifest = make_demo_dataset(str(root / "data"), seed=cfg.run.seed, size=cfg.data.image_size)
        log.info("demo data set: %s", {k: v.rows for k, v in manifest.splits.items()})
    report = run_pipeline(cfg, resume=resume, config_path=path)
    return report
