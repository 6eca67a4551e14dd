"""``raysemi tune``: spaces and their translation, bad input before any trial, results, and a real sweep."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import numpy as np
import pytest
import yaml
from ray.tune import Callback

from raysemi.commands.cli import main
from raysemi.core.config import load_config
from raysemi.core.errors import RaysemiError
from raysemi.core.event_log import read_scalars
from raysemi.pipeline.rounds import RoundResult
from raysemi.tune import SETUP, SpaceError, load_space, parse_space, results, run_tune, search, validate_space
from raysemi.tune import experiment as tune_experiment
from raysemi.tune.space import TRIAL_METRICS, max_reports
from raysemi.tune.trial import best_so_far, plain, trial_dir

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPACES = sorted((Path(__file__).resolve().parents[2] / "tune_spaces").glob("*.yaml"))
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# ---------------------------------------------------------------- space files


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_every_space_file_parses_and_validates(path):
    space = load_space(path)
    assert space.params and space.metric in TRIAL_METRICS and space.num_trials >= 1
    for cfg in (load_config(None), *(load_config(p) for p in sorted(CONFIGS.glob("*.yaml")))):
        validate_space(space, cfg)
    domains = space.param_space()
    assert set(domains) == set(space.params)


def test_the_shipped_spaces():
    names = {p.stem for p in SPACES}
    assert {"paper_grid", "asha", "tiny"} <= names
    grid = load_space(SPACES[[p.stem for p in SPACES].index("paper_grid")])
    assert {k: (p.kind, p.values) for k, p in grid.params.items()} == {
        "pretrain.epochs": ("grid", (50, 150, 250)),
        "pretrain.lr": ("grid", (0.03, 0.01, 0.001)),
        "pseudolabel.budget": ("grid", (500, 1000, 2000)),
    }
    assert grid.num_trials == 27 and grid.scheduler is None
    asha = load_space(SPACES[[p.stem for p in SPACES].index("asha")])
    assert asha.scheduler["name"] == "asha" and asha.num_samples > 1
    assert {p.kind for p in asha.params.values()} >= {"choice", "uniform", "loguniform", "randint"}
    tiny = load_space(SPACES[[p.stem for p in SPACES].index("tiny")])
    assert tiny.num_trials == 4


def test_paper_grid_has_nine_distinct_pretrainings(demo_dataset):
    from ray.tune.search.variant_generator import generate_variants

    from raysemi.pipeline.pretrain_cache import cache_key

    space = load_space(SPACES[[p.stem for p in SPACES].index("paper_grid")])
    cfg = load_config(None, [f"data.path={demo_dataset}"])
    points = [v for _, v in generate_variants(space.param_space())]
    assert len(points) == 27
    keys = [cache_key(cfg.replace(**p), "0" * 64) for p in points]
    assert len(set(keys)) == 9
    assert len(set(keys[:9])) == 9  # Ray's grid order: the distinct pretrainings come first


# ---------------------------------------------------------------- translation to ray.tune


def test_each_notation_translates_to_its_ray_tune_domain():
    from ray.tune.search import sample

    space = parse_space({"params": {
        "pretrain.epochs": {"grid": [1, 2, 3]},
        "model.head": {"choice": ["projector", "encoder"]},
        "finetune.label_smoothing": {"uniform": [0.0, 0.2]},
        "finetune.lr": {"loguniform": [0.001, 0.1]},
        "pseudolabel.rounds": {"randint": [1, 3]},
    }})
    d = space.param_space()
    assert d["pretrain.epochs"] == {"grid_search": [1, 2, 3]}
    assert isinstance(d["model.head"], sample.Categorical) and d["model.head"].categories == ["projector", "encoder"]
    uni, log = d["finetune.label_smoothing"], d["finetune.lr"]
    assert isinstance(uni, sample.Float) and isinstance(uni.get_sampler(), sample.Uniform)
    assert (uni.lower, uni.upper) == (0.0, 0.2)
    assert isinstance(log, sample.Float) and isinstance(log.get_sampler(), sample.LogUniform)
    assert (log.lower, log.upper) == (0.001, 0.1)
    ints = d["pseudolabel.rounds"]
    assert isinstance(ints, sample.Integer) and (ints.lower, ints.upper) == (1, 4)  # ours includes hi
    rng = np.random.default_rng(0)
    drawn = {int(ints.sample(random_state=rng)) for _ in range(200)}
    assert drawn == {1, 2, 3}
    assert all(0.001 <= log.sample(random_state=rng) <= 0.1 for _ in range(100))
    assert space.grid_size == 3 and space.num_trials == 3


def test_sampled_values_make_valid_trial_configs():
    from ray.tune.search.variant_generator import generate_variants

    space = load_space(SPACES[[p.stem for p in SPACES].index("asha")])
    base = validate_space(space, load_config(None))
    for _ in range(5):
        for _, point in generate_variants(space.param_space()):
            cfg = base.replace(**{k: plain(v) for k, v in point.items()})
            assert 1 <= cfg.pseudolabel.rounds <= 3 and 0.003 <= cfg.finetune.lr <= 0.1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"params": {"pretrain.epochz": {"grid": [1]}}}, "unknown config key pretrain.epochz"),
        ({"params": {"nosuch.key": {"choice": [1]}}}, "unknown config key nosuch"),
        ({"params": {"pretrain.epochs": {"grid": []}}}, "empty grid"),
        ({"params": {"pretrain.epochs": {"choice": []}}}, "empty choice"),
        ({"params": {}}, "'params' must map"),
        ({"params": {"pretrain.epochs": {"normal": [1, 2]}}}, "unknown notation 'normal'"),
        ({"params": {"pretrain.epochs": [1, 2]}}, "expected one of"),
        ({"params": {"pretrain.lr": {"uniform": [0.2, 0.1]}}}, "must be below"),
        ({"params": {"pretrain.lr": {"loguniform": [0.0, 0.1]}}}, "must be > 0"),
        ({"params": {"pretrain.epochs": {"randint": [1.5, 3]}}}, "must be integers"),
        ({"params": {"pretrain.epochs": {"uniform": [10, 20]}}}, "expected an integer"),
        ({"params": {"pretrain.optimizer": {"choice": ["adam"]}}}, "not one of"),
        ({"params": {"pretrain.epochs": {"grid": [1, 5]}}, "set": {"pretrain.warmup_epochs": 3}},
         "warmup_epochs: 3 is outside"),
        ({"params": {"pretrain.epochs": {"grid": [5]}}, "set": {"pretrain.nope": 3}}, "set: unknown config key"),
        ({"params": {"run.output_dir": {"choice": ["a"]}}}, "set by raysemi tune"),
        ({"params": {"pretrain.epochs": {"grid": [50]}}, "metric": "test_accuracy"}, "never on test"),
        ({"params": {"pretrain.epochs": {"grid": [50]}}, "metric": "loss"}, "not reported by the trials"),
        ({"params": {"pretrain.epochs": {"grid": [50]}}, "mode": "best"}, "mode must be"),
        ({"params": {"pretrain.epochs": {"grid": [50]}}, "scheduler": {"name": "pbt"}}, "scheduler must be"),
        ({"params": {"pretrain.epochs": {"grid": [50]}}, "search": "optuna"}, "optuna takes no grid"),
        ({"params": {"pretrain.epochs": {"grid": [50]}}, "sample": 3}, "unknown key 'sample'"),
    ],
)
def test_bad_spaces_are_refused_in_one_line(data, match):
    with pytest.raises(SpaceError, match=match) as info:
        validate_space(parse_space(data, "bad.yaml"), load_config(None))
    assert "\n" not in str(info.value) and str(info.value).startswith("bad.yaml")


def test_every_grid_point_is_validated():
    space = parse_space({"params": {"pretrain.epochs": {"grid": [2, 5]},
                                    "pretrain.warmup_epochs": {"choice": [0, 3]}}}, "combo.yaml")
    cfg = load_config(None, ["pretrain.epochs=5", "pretrain.warmup_epochs=0"])  # each value alone is fine
    with pytest.raises(SpaceError, match="the point .* is not a valid config"):
        validate_space(space, cfg)


def test_command_line_set_wins_over_the_space_set_but_not_over_its_params():
    space = parse_space({"set": {"finetune.epochs": 1}, "params": {"pretrain.epochs": {"grid": [50]}}}, "s.yaml")
    assert validate_space(space, load_config(None)).finetune.epochs == 1
    assert validate_space(space, load_config(None), {"finetune.epochs": 3}).finetune.epochs == 3
    with pytest.raises(SpaceError, match="pretrain.epochs is tuned by the space"):
        validate_space(space, load_config(None), {"pretrain.epochs": 3})


def test_cli_refuses_bad_input_before_any_trial(tmp_path, capsys, demo_dataset, monkeypatch):
    import ray

    def no_ray(*_a, **_k):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(tune_experiment, "run_trial", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    bad = tmp_path / "bad.yaml"
    cases = [
        ({"params": {"pretrain.nope": {"grid": [1]}}}, "unknown config key pretrain.nope"),
        ({"params": {"pretrain.epochs": {"grid": []}}}, "empty grid"),
        ({"params": {"pretrain.epochs": {"grid": [50]}}, "metric": "test_accuracy"}, "not reported"),
        ({"params": {"pseudolabel.budget": {"grid": [10, 100000]}}}, "larger than the unlabeled pool"),
    ]
    for data, match in cases:
        bad.write_text(yaml.safe_dump(data))
        code = main(["tune", "--space", str(bad), "--out", str(tmp_path / "out"), "--set", f"data.path={demo_dataset}",
                     "--set", "pretrain.batch_size=32", "--set", "ray.num_workers=1"])
        err = capsys.readouterr().err
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    code = main(["tune", "--resume", "--name", "nothing", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "holds no tune experiment" in err
    code = main(["tune", "--space", str(tmp_path / "missing.yaml")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_experiment_is_refused_without_resume(tmp_path, demo_dataset, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no Ray")))
    exp = tmp_path / "out" / "tiny"
    exp.mkdir(parents=True)
    (exp / SETUP).write_text("{}")
    cfg = load_config(None, [f"data.path={demo_dataset}"])
    with pytest.raises(RaysemiError, match="pass --resume to continue it or --overwrite"):
        run_tune(cfg, str(SPACES[[p.stem for p in SPACES].index("tiny")]), out=str(tmp_path / "out"))


# ---------------------------------------------------------------- resources


def test_concurrency_from_what_a_trial_needs():
    cpu = load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=0.5", "pseudolabel.num_actors=1",
                             "pseudolabel.cpus_per_actor=0.5"])
    assert search.trial_needs(cpu) == {"CPU": 1.0, "GPU": 0}
    # Each trial's own 0.01 CPU counts: 2 trials of 1 CPU do not fit 2 CPUs, 2 of 0.99 do.
    assert search.max_concurrent_trials(cpu, {"CPU": 2.0}) == 1
    assert search.max_concurrent_trials(cpu, {"CPU": 16.0}) == 15
    assert search.max_concurrent_trials(cpu.replace(**{"ray.num_workers": 1}), {"CPU": 2.0}) == 3
    almost = cpu.replace(**{"ray.num_workers": 1, "ray.cpus_per_worker": 0.99, "pseudolabel.cpus_per_actor": 0.99})
    assert search.max_concurrent_trials(almost, {"CPU": 2.0}) == 2
    assert search.max_concurrent_trials(cpu, {"CPU": 0.5}) == 1  # never below one
    gpu = load_config(CONFIGS / "covid19.yaml")  # 4 GPU workers, 4 GPU actors
    assert search.trial_needs(gpu)["GPU"] == 4
    assert search.max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 2
    assert search.max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 2.0}) == 1  # never below one


def test_asha_stops_on_rounds_and_leaves_the_final_report():
    space = load_space(SPACES[[p.stem for p in SPACES].index("asha")])
    cfg = load_config(None)
    assert max_reports(space, cfg) == 3 + 2  # randint up to 3 rounds: rounds 0..3 and the final report
    tc = search.tune_config(space, cfg, 4)
    assert tc.scheduler._max_t == 5 and tc.metric == "val_accuracy" and tc.mode == "max"
    assert tc.search_alg.max_concurrent == 4


# ---------------------------------------------------------------- results


def _trial(i, status, **m):
    return SimpleNamespace(trial_id=f"abc_{i:05d}", status=status, num_failures=0,
                           config={"pretrain.epochs": m.pop("epochs"), "pretrain.lr": m.pop("lr")}, last_result=m)


def test_results_table_heatmap_and_best_config(tmp_path, demo_dataset):
    space = parse_space({"params": {"pretrain.epochs": {"grid": [1, 2]}, "pretrain.lr": {"grid": [0.1, 0.2]}}},
                        "t.yaml")
    base = load_config(None, [f"data.path={demo_dataset}", "pretrain.warmup_epochs=0"])
    trials = [
        _trial(0, "TERMINATED", epochs=1, lr=0.1, val_accuracy=0.5, test_accuracy=0.4, completed=True,
               pretrain_reused=False, pretrain_s=60.0, wall_s=100.0, round=1, best_round=1),
        _trial(1, "TERMINATED", epochs=2, lr=0.1, val_accuracy=0.9, test_accuracy=0.8, completed=True,
               pretrain_reused=True, pretrain_s=1.0, wall_s=50.0, round=1, best_round=0),
        _trial(2, "TERMINATED", epochs=1, lr=0.2, val_accuracy=0.3, completed=False, pretrain_reused=False,
               round=0),  # stopped early by ASHA
        _trial(3, "ERROR", epochs=2, lr=0.2),
    ]
    for t in trials:
        t.last_result["val_accuracy"] = t.last_result.get("val_accuracy")
    rows = results.collect_rows(trials, space, base)
    assert [r["status"] for r in rows] == ["completed", "completed", "stopped early", "error"]
    assert rows[0]["pretrain_key"] != rows[1]["pretrain_key"]
    exp = tmp_path / "exp"
    trial_dir = exp / "trials" / "abc_00001"
    trial_dir.mkdir(parents=True)
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(base.replace(**{"pretrain.epochs": 2}).to_dict()))
    summary = results.write_outputs(str(exp), "exp", space, base, rows)
    assert summary.best["trial_id"] == "abc_00001" and not summary.interrupted
    md = (exp / "tune_results.md").read_text()
    assert "2 computed, 1 reused" in md and "| abc_00001 |" in md and "stopped early" in md
    assert md.index("abc_00001") < md.index("abc_00000")  # best first
    csv_lines = (exp / "tune_results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("trial_id,pretrain.epochs,pretrain.lr,status,val_accuracy,test_accuracy")
    assert len(csv_lines) == 5
    assert (exp / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(exp / "best_config.yaml")
    assert best.pretrain.epochs == 2 and best.run.output_dir == str(exp / "best_run")


# ---------------------------------------------------------------- Tune plumbing with a stub trial


def _stub_trial(config: dict, setup: dict) -> None:
    """Stands in for the pipeline: counts its runs, writes the trial's config and reports two rounds."""
    from ray import tune

    from raysemi.core.config import config_to_yaml, from_dict
    from raysemi.core.io import join, write_bytes_atomic

    trial_id = tune.get_context().get_trial_id()
    with open(setup["counter"], "a") as fh:
        fh.write(trial_id + "\n")
    cfg = from_dict(setup["base"]).replace(**config)
    write_bytes_atomic(join(trial_dir(setup["exp"], trial_id), "config.yaml"), config_to_yaml(cfg).encode())
    acc = 0.5 + cfg.pretrain.epochs / 1000
    tune.report({"round": 0, "val_accuracy": acc, "round_val_accuracy": acc, "completed": False})
    tune.report({"round": 0, "val_accuracy": acc, "round_val_accuracy": acc, "test_accuracy": acc - 0.1,
                 "best_round": 0, "pretrain_reused": False, "pretrain_s": 1.0, "wall_s": 2.0, "completed": True})


@pytest.mark.ray
def test_sweep_on_s3_storage_resumes_without_rerunning_finished_trials(ray_session, s3_bucket, demo_dataset,
                                                                       tmp_path, monkeypatch):
    from raysemi.core.io import filesystem

    counter = tmp_path / "runs.txt"
    real = tune_experiment.run_trial
    monkeypatch.setattr(tune_experiment, "run_trial", lambda config, setup: _stub_trial(config, {**setup, "counter": str(counter)}))
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"params": {"pretrain.epochs": {"grid": [50, 150]},
                                                "pretrain.lr": {"grid": [0.01, 0.001]}}}))
    cfg = load_config(None, [f"data.path={demo_dataset}", "pretrain.batch_size=32", "ray.num_workers=1",
                             "pseudolabel.budget=10", "pseudolabel.rounds=1"])
    out = f"{s3_bucket}/tune"
    first = run_tune(cfg, str(space), name="grid", out=out)
    assert [r["status"] for r in first.rows] == ["completed"] * 4 and len(counter.read_text().split()) == 4
    assert first.best["pretrain.epochs"] == 150 and first.best["val_accuracy"] == pytest.approx(0.65)
    assert first.files["md"] == f"{out}/grid/tune_results.md"
    fs, _ = filesystem(out)
    assert {p.rsplit("/", 1)[1] for p in fs.ls(f"{out}/grid", refresh=True)} >= {
        "tune_results.csv", "tune_results.md", "heatmap.png", "best_config.yaml", "tuner.pkl", SETUP}
    assert yaml.safe_load(fs.cat(f"{out}/grid/best_config.yaml"))["pretrain"]["epochs"] == 150
    assert first.best["pretrain_key"] is not None

    again = run_tune(None, None, name="grid", out=out, resume=True)
    assert len(counter.read_text().split()) == 4  # the finished trials were not run again
    assert [r["trial_id"] for r in again.rows] == [r["trial_id"] for r in first.rows]
    with pytest.raises(RaysemiError, match="holds an earlier tune experiment"):
        run_tune(cfg, str(space), name="grid", out=out)
    monkeypatch.setattr(tune_experiment, "run_trial", real)


# ---------------------------------------------------------------- a real sweep


TINY = [
    "model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=64", "model.proj_dim=32",
    "model.pred_hidden_dim=64", "data.image_size=32", "data.num_threads=1", "data.label_fraction=0.3",
    "pretrain.batch_size=32", "finetune.batch_size=16", "finetune.steps=4", "finetune.eval_every=4", "finetune.warmup_steps=0",
    "pseudolabel.num_actors=1",
    "pseudolabel.cpus_per_actor=0.99", "pseudolabel.batch_size=64", "ray.num_workers=1",
    "ray.cpus_per_worker=0.99", "ray.max_failures=1",
]


class InterruptOnce(Callback):
    """Stops the experiment (SIGUSR1, as ``ray job stop`` does) when the first trial completes after the file
    ``after`` appeared; a marker file makes it fire once (the restored experiment unpickles this callback too)."""

    def __init__(self, marker: str, after: str) -> None:
        self.marker, self.after = marker, after

    def on_trial_complete(self, iteration, trials, trial, **info):
        if os.path.exists(self.after) and not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


class KillAfterRound(Callback):
    """Kills the process of trial ``index`` (SIGKILL, from outside the trial) when it has reported ``round``,
    once (a marker file: the restored experiment unpickles this callback too). Tune holds a function trial at
    its report until the driver asks for the next result, so the kill lands after the round's checkpoint.
    ``recovered`` is written when Tune has seen the failure and scheduled the retry."""

    def __init__(self, index: int, round_: int, marker: str) -> None:
        self.index, self.round, self.marker = index, round_, marker
        self.recovered = marker + ".recovered"

    def on_trial_recover(self, iteration, trials, trial, **info):
        if os.path.exists(self.marker) and not os.path.exists(self.recovered):
            Path(self.recovered).write_text(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if (int(trial.trial_id.rsplit("_", 1)[-1]) == self.index and result.get("round") == self.round
                and not result.get("completed") and not os.path.exists(self.marker)):
            Path(self.marker).write_text(f"killed trial {trial.trial_id} (pid {result['pid']})\n")
            os.kill(result["pid"], signal.SIGKILL)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 5 min on an idle 2-core machine; far longer on a shared, loaded one
def test_tiny_sweep_survives_a_trial_failure_and_an_interruption(ray_session, demo_dataset, tmp_path, monkeypatch):
    """The tiny space (4 trials, 2 pretraining settings) with its pseudo-label round turned off by a --set
    (the rounds are the pipeline tests' business; here each trial is pretrain, fine-tune, evaluate), one
    0.99-CPU Train worker per trial, so two trials (each also holding its own 0.01 CPU) at a time on the
    2-CPU test Ray."""
    out = tmp_path / "tune"
    fault, stop = tmp_path / "fault", tmp_path / "stopped"
    cfg = load_config(None, [f"data.path={demo_dataset}", *TINY])
    space = str(SPACES[[p.stem for p in SPACES].index("tiny")])

    # The interruption waits for Tune to have seen the kill: a kill racing the interruption would make the
    # killed trial an interrupted one, resumed without a failure on record.
    kill = KillAfterRound(1, 0, str(fault))
    first = run_tune(cfg, space, out=str(out), overrides={"pseudolabel.rounds": 0},
                     callbacks=[InterruptOnce(str(stop), after=kill.recovered), kill])
    assert first.interrupted and "--resume" in first.text
    done = {r["trial_id"] for r in first.rows if r["status"] == "completed"}
    assert stop.read_text() in done
    stamps = {t: (out / "tiny" / "trials" / t / "report.json").stat().st_mtime_ns for t in done}

    summary = run_tune(None, None, name="tiny", out=str(out), resume=True)
    rows = {r["trial_id"]: r for r in summary.rows}
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows.values()), summary.text
    for t, stamp in stamps.items():  # finished trials were kept, not re-run
        assert (out / "tiny" / "trials" / t / "report.json").stat().st_mtime_ns == stamp
    # The trial killed after round 0 was retried from its checkpoint and finished.
    assert fault.is_file()
    killed = next(r for t, r in rows.items() if t.endswith("_00001"))
    assert killed["status"] == "completed" and killed["failures"] >= 1
    # 4 trials, 2 pretraining settings: each computed once and reused once.
    by_epochs = {}
    for r in rows.values():
        by_epochs.setdefault(r["pretrain.epochs"], []).append(r["pretrain_reused"])
    assert {e: sorted(v) for e, v in by_epochs.items()} == {1: [False, True], 2: [False, True]}
    for t in rows:
        report = json.loads((out / "tiny" / "trials" / t / "report.json").read_text())
        assert report["run"]["name"] == t and report["run"]["pretrain_cache_key"]
        # TensorBoard over the experiment folder: every trial's pretraining (copied from the cache entry it
        # used, computed or reused), fine-tuning and round curves.
        trial = out / "tiny" / "trials" / t
        assert read_scalars(str(trial / "pretrain"))["loss"]
        assert read_scalars(str(trial / "round=0"))["val_accuracy"]
        # Round 0 only (rounds are off); a trial that ran again after a kill or an interruption logs its
        # (reused) round 0 again, with the same value.
        logged = read_scalars(str(trial))["rounds/val_accuracy"]
        assert {s for s, _ in logged} == {0}
        assert all(v == pytest.approx(report["rounds"][0]["val"]["accuracy"]) for _, v in logged)
    assert len(list((out / "pretrain_cache").glob("*/COMPLETE.json"))) == 2
    md = (out / "tiny" / "tune_results.md").read_text()
    assert "2 computed, 2 reused" in md
    assert (out / "tiny" / "heatmap.png").is_file()
    best = load_config(out / "tiny" / "best_config.yaml")
    assert best.pseudolabel.budget in (10, 20) and best.pretrain.cache == str(out / "pretrain_cache")


def test_tune_reports_the_best_round_so_far_not_the_last():
    def rnd(r, acc, bal):
        return RoundResult(round=r, val={"accuracy": acc, "balanced_accuracy": bal}, model=f"round={r}").to_dict()

    rounds = [rnd(0, 0.80, 0.60), rnd(1, 0.85, 0.50), rnd(2, 0.70, 0.90)]
    assert best_so_far(rounds, "accuracy").round == 1
    assert best_so_far(rounds, "balanced_accuracy").round == 2  # by run.select_metric, not always accuracy
    assert best_so_far(rounds[:1], "accuracy").round == 0
    assert best_so_far([*rounds, rnd(3, 0.85, 0.0)], "accuracy").round == 1  # the tie: the earlier round
