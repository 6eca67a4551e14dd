"""Make an imbalanced variant of a class-folder image tree: keep only a fraction of some classes.

    python bench/subsample_classes.py SRC DEST --keep CLASS=FRACTION [--keep ...] [--seed 0]

SRC holds one folder per class (``SRC/<class>/**``). DEST gets the same tree, every file copied except that
of each named class only a deterministic ``FRACTION`` is kept: the files whose sha256 of ``"<seed>:<relative
path>"`` ranks in the first ``ceil(FRACTION x n)``. Then ingest DEST as usual. The imbalanced COVID-19 set of
the README (15% of COVID kept):

    python bench/subsample_classes.py ../shared/data/covid19-radiography-3class /tmp/covid19-imb --keep COVID=0.15
    raysemi ingest /tmp/covid19-imb outputs/data/covid19-imb --group-regex '^(person\\d+)_'
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
from pathlib import Path


def parse_keep(items: list[str]) -> dict[str, float]:
    keep = {}
    for item in items:
        name, _, frac = item.partition("=")
        try:
            value = float(frac)
        except ValueError:
            raise SystemExit(f"subsample_classes.py: error: --keep {item!r} is not CLASS=FRACTION") from None
        if not name or not 0 < value <= 1:
            raise SystemExit(f"subsample_classes.py: error: --keep {item!r}: the fraction must be in (0, 1]")
        keep[name] = value
    return keep


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--keep", action="append", default=[], required=True, help="CLASS=FRACTION (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    src, dest = Path(args.src), Path(args.dest)
    keep = parse_keep(args.keep)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
    missing = sorted(set(keep) - set(classes))
    if missing:
        raise SystemExit(f"subsample_classes.py: error: {src} has no class folder {', '.join(missing)}")
    if dest.exists():
        raise SystemExit(f"subsample_classes.py: error: {dest} exists; remove it or choose another folder")
    for name in classes:
        files = sorted(p for p in (src / name).rglob("*") if p.is_file())
        if name in keep:
            files.sort(key=lambda p: hashlib.sha256(f"{args.seed}:{p.relative_to(src)}".encode()).hexdigest())
            files = files[: math.ceil(keep[name] * len(files))]
        for f in files:
            out = dest / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
        print(f"{name}: {len(files)} files")


if __name__ == "__main__":
    main()
