"""bench/quality.py's label ladder: the rungs it accepts, and the share of the gap each method row closes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rungs_become_label_overrides(quality):
    assert quality.rung_sets(None) == ("", [])
    assert quality.rung_sets("10/class") == ("10perclass", ["data.label_fraction=null", "data.labels_per_class=10"])
    assert quality.rung_sets("10%") == ("10pc", ["data.label_fraction=0.1", "data.labels_per_class=null"])
    assert quality.rung_sets("2.5%") == ("2.5pc", ["data.label_fraction=0.025", "data.labels_per_class=null"])
    assert quality.rung_sets("100%") == ("100pc", ["data.label_fraction=null", "data.labels_per_class=null"])
    for bad in ("0/class", "ten/class", "0%", "150%", "10", "x%"):
        with pytest.raises(SystemExit, match=f"--labels '{bad}'"):
            quality.rung_sets(bad)


def _row(row: str, rung: str, seed: int, acc: float, bal: float) -> dict:
    return {"row": row, "rung": rung, "seed": seed, "labelled": 30, "accuracy": acc, "balanced_accuracy": bal,
            "macro_f1": None, "auc_ovr": None, "predicted_classes": 3, "best_round": 0}


def test_gap_closed_is_measured_on_the_means_over_seeds(quality):
    rows = [
        _row("supervised_all", "100%", 0, 0.90, 0.88), _row("supervised_all", "100%", 1, 0.92, 0.90),
        _row("supervised", "10/class", 0, 0.60, 0.50), _row("supervised", "10/class", 1, 0.62, 0.54),
        _row("full", "10/class", 0, 0.80, 0.70), _row("full", "10/class", 1, 0.76, 0.70),
        _row("byol_finetune", "10/class", 0, 0.55, 0.52), _row("byol_finetune", "10/class", 1, 0.57, 0.52),
    ]
    # accuracy: ceiling 0.91, rung 0.61, method 0.78 -> 0.17 / 0.30; balanced: 0.89, 0.52, 0.70 -> 0.18 / 0.37
    assert quality.gap_closed(rows, "10/class", "full", "accuracy") == pytest.approx(0.17 / 0.30)
    assert quality.gap_closed(rows, "10/class", "full", "balanced_accuracy") == pytest.approx(0.18 / 0.37)
    assert quality.gap_closed(rows, "10/class", "byol_finetune", "accuracy") == pytest.approx(-0.05 / 0.30)
    assert quality.gap_closed(rows, "50/class", "full", "accuracy") is None  # no such rung measured
    table = quality.format_table({"some/set": rows})
    assert "| set | 10/class | full method, few labels |" in table and "57% / 49%" in table
    assert "| set | 100% | supervised, all labels |" in table
    assert table.splitlines()[0].endswith("| steps chosen | images seen |")


def test_the_gap_is_undefined_when_the_rung_already_reaches_the_ceiling(quality):
    rows = [_row("supervised_all", "100%", 0, 0.9, 0.9), _row("supervised", "50%", 0, 0.9, 0.9),
            _row("full", "50%", 0, 0.91, 0.91)]
    assert quality.gap_closed(rows, "50%", "full", "accuracy") is None


def test_each_row_keeps_the_length_that_validates_best(quality):
    assert quality.choose_steps([(300, 0.70), (600, 0.74), (1200, 0.73)]) == 600
    assert quality.choose_steps([(1200, 0.74), (300, 0.74), (600, 0.70)]) == 300  # a tie: less compute
    assert quality.choose_steps([(600, 0.5)]) == 600


def test_pick_reads_the_chosen_rounds_validation(quality, tmp_path):
    def report(vals, best):
        return {"run": {"select_metric": "balanced_accuracy"}, "best_round": best,
                "rounds": [{"val": {"balanced_accuracy": v}} for v in vals]}
    done = [(300, tmp_path / "a", (report([0.60, 0.80], 1), 1.0, False)),
            (600, tmp_path / "b", (report([0.70, 0.65], 0), 1.0, False))]
    assert quality._pick(done, lambda r: r["best_round"])[0] == 300  # the full method: 0.80 at its best round
    assert quality._pick(done, lambda r: 0)[0] == 600  # BYOL + fine-tune: round 0 alone, 0.70


def test_a_run_is_reused_only_for_the_settings_its_mode_uses(quality):
    """FixMatch's settings matter to a fixmatch run (and to the method with fixmatch.in_rounds), not to the others;
    pseudo-labelling settings only to the method."""
    from raysemi.core.config import load_config

    def relevant(*sets):
        return quality._relevant(load_config(None, list(sets)).to_dict())

    for mode in ("supervised", "byol_finetune", "full"):
        assert relevant(f"run.mode={mode}") == relevant(f"run.mode={mode}", "fixmatch.ratio=2")
    assert relevant("run.mode=fixmatch") != relevant("run.mode=fixmatch", "fixmatch.ratio=2")
    assert relevant("run.mode=fixmatch") == relevant("run.mode=fixmatch", "pseudolabel.budget=0.5")
    assert relevant("run.mode=full", "fixmatch.in_rounds=true") != relevant(
        "run.mode=full", "fixmatch.in_rounds=true", "fixmatch.ratio=2")
