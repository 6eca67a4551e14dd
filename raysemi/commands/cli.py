"""``raysemi`` command line: ingest | pretrain | finetune | pseudolabel | predict | evaluate | run | tune | demo.

Every training command takes ``--config FILE`` and any number of ``--set key=value`` overrides; the
resolved config is validated once, before any work starts. A problem with what the user gave is reported
as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from raysemi.core.errors import RaysemiError

log = logging.getLogger("raysemi")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (defaults for every key not given)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set pretrain.epochs=50 (repeatable)",
    )


def _load(args: argparse.Namespace):
    from raysemi.core.config import absolute_paths, load_config

    return absolute_paths(load_config(args.config, args.overrides))


def _dicom_options(args: argparse.Namespace):
    """DicomOptions when any DICOM flag was given, else None (the defaults, for DICOM sources only)."""
    from raysemi.data.ingest.dicom.read import DicomOptions, parse_window

    flags = (args.frames, args.window, args.dicom_group, args.salt, args.keep_tags, args.keep_paths, args.volumes)
    if not any(flags):
        return None
    return DicomOptions(
        frames=args.frames or "first",
        window=parse_window(args.window) if args.window else None,
        group_by=args.dicom_group or "patient",
        salt=args.salt,
        keep_tags=tuple(t for t in (args.keep_tags or "").split(",") if t.strip()),
        keep_paths=args.keep_paths,
        volumes=args.volumes,
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    from raysemi.data.ingest.run import ingest
    from raysemi.data.ingest.summary import summarize
    from raysemi.data.shards import local_map

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:  # under `ray job submit` too: RAY_ADDRESS names the cluster the job runs on
        from raysemi.distributed.ray_tasks import task_mapper

    manifest = ingest(
        args.source, args.dest, fmt=args.format, shard_mb=args.shard_mb, min_shards=args.min_shards,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, group_regex=args.group_regex,
        unlabeled=args.unlabeled, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet,
        dicom_options=_dicom_options(args), labels=args.labels, follow_symlinks=args.follow_symlinks,
        map_fn=task_mapper(address) if address else local_map,
    )
    print(summarize(manifest))
    print(f"dataset written to {args.dest}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raysemi.commands.demo import run_demo

    report = run_demo(args.out, resume=args.resume, overwrite=args.overwrite, config_path=args.config,
                      overrides=args.overrides)
    print(f"report: {report.removesuffix('.json')}.md (and {report})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raysemi.pipeline.run import run_pipeline

    cfg = _load(args)
    report = run_pipeline(cfg, resume=args.resume, overwrite=args.overwrite, config_path=args.config or "")
    print(f"report: {report.removesuffix('.json')}.md (and {report})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from raysemi.pipeline.run import finetune_only

    cfg = _load(args)
    print(f"classifier: {finetune_only(cfg, args.init, overwrite=args.overwrite)}")
    return 0


def cmd_pseudolabel(args: argparse.Namespace) -> int:
    from raysemi.pipeline.run import pseudolabel_only

    cfg = _load(args)
    print(pseudolabel_only(cfg, args.model, args.out))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from raysemi.commands import predict
    from raysemi.commands.predict_output import summary_text

    cfg = _load(args)
    summary = predict.run(
        cfg, args.model, args.source, args.out, split=args.split, min_confidence=args.min_confidence,
        actors=args.actors, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(summary_text(summary, args.out))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from raysemi.stages import evaluate

    cfg = _load(args)
    report = evaluate.run(cfg, args.model, args.split)
    print(f"report: {report.removesuffix('.json')}.md (and {report})")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from raysemi.stages import pretrain

    cfg = _load(args)
    result = pretrain.run(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"pretrained backbone: {result.weights}")
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    import json

    from raysemi.stages.probe import format_table, knn_table

    cfg = _load(args)
    rows = knn_table(cfg, args.weights, args.split)
    print(format_table(rows))
    if args.json:
        from raysemi.core.io import write_bytes_atomic

        write_bytes_atomic(args.json, (json.dumps(rows, indent=2) + "\n").encode())
        print(f"written to {args.json}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raysemi.core.config import parse_override
    from raysemi.tune import run_tune

    # On --resume the experiment's own config is used; one given anyway must match it. --set wins over the
    # space's own `set`.
    cfg = _load(args) if args.config or args.overrides or not args.resume else None
    summary = run_tune(cfg, args.space, name=args.name, out=args.out, resume=args.resume,
                       overwrite=args.overwrite, use_cache=not args.no_cache, config_path=args.config or "",
                       overrides=dict(parse_override(o) for o in args.overrides))
    print(summary.text)
    return 0


def _add_ingest(sub) -> None:
    p = sub.add_parser("ingest", help="image folder / .npz / CSV / DICOM -> validated Parquet shards + manifest")
    p.add_argument(
        "source", help="image or DICOM folder (class subfolders, optional train/val/test), .npz, or .csv"
    )
    p.add_argument("dest", help="dataset folder or s3://bucket/prefix")
    p.add_argument("--format", default="auto", choices=["auto", "folder", "npz", "csv", "dicom"])
    p.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MB (default 64)")
    p.add_argument("--min-shards", type=int, default=4, help="at least this many shards per split (default 4)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="when the source has no val split")
    p.add_argument("--test-fraction", type=float, default=0.1, help="when the source has no test split")
    p.add_argument("--group-regex", help="regex whose group 1 is the patient key, applied to the file name")
    p.add_argument("--unlabeled", help="folder of images without labels (split 'unlabeled')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at DEST")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--address", help="Ray cluster whose nodes read, validate and write, as tasks (default: "
                   "$RAY_ADDRESS when set, else this process); SOURCE and DEST must then be reachable from every "
                   "node: s3:// or a shared file system")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="read files that symbolic links point to outside the source folder (default: quarantined, "
                        "listed in quarantine.parquet with the reason)")
    d = p.add_argument_group("DICOM sources (see README: From your PACS export)")
    d.add_argument("--labels", metavar="CSV",
                   help="label CSV for a DICOM tree: 'label' + one key column (path, SOPInstanceUID or "
                        "StudyInstanceUID), optional 'split'; files it does not name are unlabelled")
    d.add_argument("--frames", choices=["first", "middle", "all"],
                   help="multi-frame files: the first frame (default), the middle one, or every frame as a row")
    d.add_argument("--window", metavar="CENTER,WIDTH",
                   help="window replacing the files' own VOI LUT / window, e.g. --window=-600,1500 (a lung window "
                        "for CT; with '=' when the centre is negative)")
    d.add_argument("--dicom-group", choices=["patient", "study"],
                   help="group key kept on one side of the splits: PatientID (default) or StudyInstanceUID")
    d.add_argument("--salt", help="secret for the group and source hashes (default: random, stored nowhere)")
    d.add_argument("--keep-tags", metavar="TAG,...",
                   help="non-identifying tags to store as columns, e.g. Modality,BodyPartExamined,ViewPosition")
    d.add_argument("--keep-paths", action="store_true",
                   help="store relative file paths in 'source' (they can name patients; default: a salted hash)")
    d.add_argument("--volumes", action="store_true",
                   help="take frames (per --frames) of 3-D volumes too, instead of quarantining them")
    p.set_defaults(func=cmd_ingest)


def _add_stage(sub, name: str, help_: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_)
    _add_config_args(p)
    p.set_defaults(func=func)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raysemi")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysemi", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, with Ray's own start-up and per-rank report lines")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ingest(sub)
    p = _add_stage(sub, "pretrain", "BYOL pretraining on Ray Train (DDP)", cmd_pretrain)
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the output folder")
    p = _add_stage(sub, "finetune", "fine-tune a classifier on the labelled rows", cmd_finetune)
    p.add_argument("--init", help="byol.safetensors to start from (default: random init)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier classifier in the output folder")
    p = _add_stage(sub, "pseudolabel", "predict every unlabelled image with a classifier (Ray actor pool)",
                   cmd_pseudolabel)
    p.add_argument("--model", required=True, help="classifier.safetensors (local or s3://)")
    p.add_argument("--out", help="prediction folder (default <run.output_dir>/predictions/manual)")
    p = _add_stage(sub, "predict", "classify new images with an exported classifier (Ray actor pool)", cmd_predict)
    p.add_argument("model", help="classifier.safetensors (local or s3://)")
    p.add_argument("source", help="image folder, s3:// prefix of images, CSV with a 'path' column, or a dataset")
    p.add_argument("out", help="output folder (local or s3://): predictions.parquet/.csv, failed.csv, summary.json")
    p.add_argument("--split", default="all", help="dataset SOURCE: train, val, test, unlabeled or all (default)")
    p.add_argument("--min-confidence", type=float, default=0.5,
                   help="predictions below this confidence are counted as low-confidence (default 0.5)")
    p.add_argument("--actors", type=int,
                   help="predictor actors (default: as many as the cluster's CPUs, or GPUs, hold)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT (nothing is redone)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = _add_stage(sub, "evaluate", "metrics and report of a classifier on one split", cmd_evaluate)
    p.add_argument("--model", required=True, help="classifier.safetensors (local or s3://)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p = _add_stage(sub, "knn", "frozen-feature kNN accuracy of pretrained backbones vs random init", cmd_knn)
    p.add_argument("weights", nargs="*", help="byol.safetensors files (local or s3://) to compare with random init")
    p.add_argument("--split", default="test", help="query split (default test); the bank is the labelled train rows")
    p.add_argument("--json", help="also write the rows to this JSON file (local or s3://)")
    p = _add_stage(sub, "run", "the whole method: pretrain, fine-tune, pseudo-label rounds, report", cmd_run)
    p.add_argument("--resume", action="store_true", help="continue the run in run.output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace the run in run.output_dir")
    p = _add_stage(sub, "tune", "Ray Tune over the whole method: one pipeline run per trial", cmd_tune)
    p.add_argument("--space", help="search space, e.g. tune_spaces/paper_grid.yaml (optional with --resume)")
    p.add_argument("--name", help="experiment name (default: the space file's name)")
    p.add_argument("--out", default="outputs/tune", help="experiments folder, local or s3:// (default outputs/tune)")
    p.add_argument("--resume", action="store_true", help="continue the experiment <out>/<name>")
    p.add_argument("--overwrite", action="store_true", help="replace the experiment <out>/<name>")
    p.add_argument("--no-cache", action="store_true",
                   help="pretrain in every trial instead of sharing pretrainings through <out>/pretrain_cache")
    p = _add_stage(sub, "demo", "generate the synthetic demo data set and run the method on it", cmd_demo)
    p.add_argument("--out", default="outputs/demo", help="demo folder (default outputs/demo)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the earlier demo in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the earlier demo in --out (only what the demo wrote there is removed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from raysemi.core import console

    console.set_verbose(args.verbose)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        console.quiet_libraries()
    try:
        return args.func(args)
    except RaysemiError as err:
        print(f"raysemi {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raysemi {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the storage failing where no stage said so itself: still one line
        from raysemi.core.io import storage_problem

        problem = storage_problem(err)
        if problem is None:
            raise
        log.debug("storage error", exc_info=True)
        print(f"raysemi {args.command}: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
