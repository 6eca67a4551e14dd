"""Output folders: raysemi removes only what it wrote, and never a folder it was given.

Each command that can replace an earlier output gets a foreign file (the user's) put in its folder: the file
survives ``--overwrite``, or the command refuses with one line and exit 2. The commands with a Ray run of their
own (``predict``, the ingest and synthetic writer) are covered in their own test modules as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raysemi.commands import demo
from raysemi.commands.cli import main
from raysemi.core import outputs
from raysemi.core.config import load_config
from raysemi.core.errors import RaysemiError
from raysemi.core.outputs import (
    DEMO,
    MARKER,
    RUN,
    TRAIN_RUN,
    TUNE,
    Layout,
    clear,
    mark,
    marked_kind,
    remove_output,
)

THESIS = "thesis/chapter1.tex"


def _foreign(folder: Path, rel: str = THESIS) -> Path:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("three years of work\n")
    return path


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the rule


def test_remove_output_removes_only_the_layouts_entries_and_keeps_the_folder(tmp_path):
    lay = Layout("thing", ("a.txt", "round=*", "nested"), children={"nested": Layout("n", ("x-*",))})
    for rel in ("a.txt", "round=0/w.bin", "round=1/deep/z", "nested/x-1", "nested/mine.txt", "b.txt", "round"):
        _foreign(tmp_path, rel)
    with pytest.raises(RaysemiError, match=f"holds the thing but no raysemi marker \\({MARKER}\\)"):
        remove_output(str(tmp_path), lay, "the thing")
    assert len(_files(tmp_path)) == 7  # refused: nothing removed
    mark(str(tmp_path), lay)
    kept = remove_output(str(tmp_path), lay, "the thing")
    assert kept == ["b.txt", "nested/mine.txt", "round"]
    assert _files(tmp_path) == [MARKER, "b.txt", "nested/mine.txt", "round"]
    assert tmp_path.is_dir()


def test_an_emptied_child_folder_goes_and_a_marker_of_another_kind_is_refused(tmp_path):
    lay = Layout("thing", ("nested",), children={"nested": Layout("n", ("x-*",))})
    _foreign(tmp_path, "nested/x-1")
    mark(str(tmp_path), lay)
    assert clear(str(tmp_path), lay) == [] and not (tmp_path / "nested").exists()
    with pytest.raises(RaysemiError, match="another kind of raysemi output \\(thing"):
        mark(str(tmp_path), RUN)
    with pytest.raises(RaysemiError, match="a marker of another kind \\(thing\\)"):
        remove_output(str(tmp_path), RUN, "an earlier run")
    assert marked_kind(str(tmp_path)) == "thing"


def test_markers_and_removal_work_on_s3(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    root = f"{s3_bucket}/runs/r1"
    for name in ("config.yaml", "round=0/classifier.safetensors", "notes.txt"):
        fs.pipe(f"{root}/{name}".removeprefix("s3://"), b"x")
    mark(root, RUN)
    assert remove_output(root, RUN, "an earlier run") == ["notes.txt"]
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root.removeprefix("s3://"))) == [MARKER, "notes.txt"]


# ---------------------------------------------------------------- raysemi demo


@pytest.fixture
def fake_demo(monkeypatch):
    """The demo's data and pipeline replaced by writers of their folders' real layout (the real demo takes
    minutes; what is tested here is only what happens to the folder)."""
    calls = []

    def data(root: str, **kwargs):
        for rel in ("images/SYNTHETIC-demo/README.txt", "images/SYNTHETIC-demo/synthetic_blob/p0000_00000.png",
                    "dataset/manifest.json", "dataset/train/part-00000.parquet"):
            _foreign(Path(root), rel)
        mark(str(Path(root) / "dataset"), outputs.DATASET)
        from types import SimpleNamespace
        return SimpleNamespace(splits={})

    def pipeline(cfg, resume=False, config_path=""):
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        mark(str(out), RUN)
        for rel in ("config.yaml", "round=0/classifier.safetensors", "report.json"):
            _foreign(out, rel)
        calls.append(resume)
        return str(out / "report.json")

    monkeypatch.setattr(demo, "make_demo_dataset", data)
    monkeypatch.setattr(demo, "run_pipeline", pipeline)
    return calls


def test_demo_refuses_a_folder_holding_the_users_files(tmp_path, fake_demo, capsys):
    thesis = _foreign(tmp_path)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["demo", "--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "holds files the demo did not write (thesis)" in err, err
    assert _files(tmp_path) == [THESIS] and thesis.read_text() == "three years of work\n"
    assert fake_demo == []


def test_demo_into_a_new_folder_then_overwrite_removes_only_what_the_demo_wrote(tmp_path, fake_demo, capsys):
    out = tmp_path / "new" / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    written = _files(out)
    assert MARKER in written and "run/report.json" in written and "data/dataset/manifest.json" in written
    # A second plain run is refused (it used to wipe the folder): one line naming both ways on.
    assert main(["demo", "--out", str(out)]) == 2
    assert "already holds an earlier demo: pass --resume to continue it or --overwrite" in capsys.readouterr().err
    # The user's files, beside the demo's and inside its folders, survive --overwrite.
    mine = [_foreign(out, "notes.md"), _foreign(out, "run/my-plot.png"), _foreign(out, "data/dataset/README")]
    assert main(["demo", "--out", str(out), "--overwrite"]) == 0
    assert all(p.read_text() == "three years of work\n" for p in mine)
    assert sorted(set(_files(out)) - set(written)) == ["data/dataset/README", "notes.md", "run/my-plot.png"]
    assert main(["demo", "--out", str(out), "--resume"]) == 0
    assert fake_demo == [False, False, True]


def test_demo_in_the_working_directory_never_removes_it(tmp_path, fake_demo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "."]) == 0
    _foreign(tmp_path, "notes.md")
    assert main(["demo", "--out", ".", "--overwrite"]) == 0
    assert Path.cwd() == tmp_path and (tmp_path / "notes.md").is_file()
    remove_output(".", DEMO, "an earlier demo")
    assert _files(tmp_path) == [MARKER, "notes.md"] and os.getcwd() == str(tmp_path)


# ---------------------------------------------------------------- raysemi run --overwrite


def test_run_overwrite_removes_the_earlier_run_and_keeps_the_users_files(tmp_path, capsys):
    from raysemi.pipeline.run import prepare_output

    out = tmp_path / "run"
    cfg = load_config(None, [f"run.output_dir={out}"])
    prepare_output(cfg, resume=False, overwrite=False)
    for rel in ("round=0/classifier.safetensors", "ray/demo-round0/checkpoint_x/state.pt", "report.md",
                "events.out.tfevents.1.host.round0", "predictions/round=1/part-00000.parquet"):
        _foreign(out, rel)
    mine = _foreign(out)
    with pytest.raises(RaysemiError, match="already holds an earlier run: pass --resume"):
        prepare_output(cfg, resume=False, overwrite=False)
    prepare_output(cfg, resume=False, overwrite=True)
    assert _files(out) == [MARKER, "config.yaml", THESIS] and mine.is_file()


def test_run_overwrite_refuses_a_folder_raysemi_did_not_mark(tmp_path):
    from raysemi.pipeline.run import prepare_output

    out = tmp_path / "project"
    _foreign(out, "config.yaml")  # the user's own config.yaml, in the folder given as run.output_dir
    cfg = load_config(None, [f"run.output_dir={out}"])
    with pytest.raises(RaysemiError, match="holds an earlier run but no raysemi marker"):
        prepare_output(cfg, resume=False, overwrite=True)
    assert _files(out) == ["config.yaml"]


# ---------------------------------------------------------------- Ray Train checkpoints, tune


def test_removing_a_train_run_keeps_what_ray_train_did_not_write(tmp_path):
    from raysemi.distributed import ray_utils

    cfg = load_config(None, [f"ray.storage_path={tmp_path}"])
    for rel in ("x-pretrain/checkpoint_2026-12-05_10-00-00.000000/state.pt", "x-pretrain/.validate_storage_marker",
                "x-pretrain/checkpoint_manager_snapshot.json", "y-pretrain/checkpoint_1/state.pt"):
        _foreign(tmp_path, rel)
    mine = [_foreign(tmp_path, "notes.md"), _foreign(tmp_path, "x-pretrain/mine.txt")]
    ray_utils.remove_train_run("x-pretrain", cfg)
    assert _files(tmp_path) == ["notes.md", "x-pretrain/mine.txt", "y-pretrain/checkpoint_1/state.pt"]
    (mine[1]).unlink()
    ray_utils.remove_train_run("y-pretrain", cfg)
    assert _files(tmp_path) == ["notes.md"] and sorted(p.name for p in tmp_path.iterdir()) == ["notes.md",
                                                                                               "x-pretrain"]


def test_tune_overwrite_removes_tunes_files_only_and_refuses_an_unmarked_experiment(tmp_path, demo_dataset,
                                                                                   monkeypatch):
    from raysemi.distributed import ray_session
    from raysemi.tune import SETUP, run_tune

    def no_ray(*args, **kwargs):
        raise AssertionError("no Ray")

    monkeypatch.setattr(ray_session, "init_ray", no_ray)  # the sweep must not start (Ray may be up: other tests)
    space = Path(__file__).resolve().parents[2] / "tune_spaces" / "tiny.yaml"
    exp = tmp_path / "out" / "tiny"
    cfg = load_config(None, [f"data.path={demo_dataset}", "pretrain.batch_size=32"])
    for rel in (SETUP, "tuner.pkl", "experiment_state-2026-12-05.json", "trials/abc/config.yaml",
                "run_trial_abc_00000_0/result.json"):
        _foreign(exp, rel)
    mine = [_foreign(tmp_path / "out", "notes.md"), _foreign(exp, "notes.md")]
    with pytest.raises(RaysemiError, match="holds an earlier tune experiment but no raysemi marker"):
        run_tune(cfg, str(space), out=str(tmp_path / "out"), overwrite=True)
    assert len(_files(exp)) == 6
    (exp / MARKER).write_text(json.dumps({"kind": TUNE.kind}))
    with pytest.raises(AssertionError, match="no Ray"):  # past the removal, at the start of the sweep
        run_tune(cfg, str(space), out=str(tmp_path / "out"), overwrite=True)
    assert all(p.is_file() for p in mine)
    assert _files(exp) == [MARKER, "notes.md"]


def test_every_layout_names_a_kind_once():
    kinds = [lay.kind for lay in (outputs.DATASET, RUN, DEMO, outputs.PREDICT, TUNE, TRAIN_RUN)]
    assert len(set(kinds)) == len(kinds)


def test_pretrain_overwrite_forgets_only_what_ray_train_wrote_of_its_run(tmp_path, demo_dataset, monkeypatch):
    from raysemi.distributed import ray_utils
    from raysemi.stages import pretrain

    def stop(*args, **kwargs):
        raise AssertionError("training would start here")

    monkeypatch.setattr(ray_utils, "fit", stop)
    cfg = load_config(None, [f"data.path={demo_dataset}", f"run.output_dir={tmp_path / 'run'}",
                             "model.backbone=test_resnet", "pretrain.batch_size=32"])
    run = tmp_path / "run" / "ray" / pretrain.run_name(cfg)
    for rel in ("checkpoint_2026-12-05_10-00-00.000000/state.pt", ".validate_storage_marker"):
        _foreign(run, rel)
    mine = _foreign(run, "notes.md")
    with pytest.raises(RaysemiError, match="unfinished pretraining run .*--overwrite"):
        pretrain.run(cfg)
    with pytest.raises(AssertionError, match="training would start here"):
        pretrain.run(cfg, overwrite=True)
    assert _files(run) == ["notes.md"] and mine.read_text() == "three years of work\n"
