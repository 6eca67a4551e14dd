"""The content-addressed pretraining cache: the key, the lease lock, and reuse across Ray processes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from raysemi.core.config import load_config
from raysemi.pipeline import pretrain_cache as pc

# Ray workers unpickle this module's functions by value (tests/ is not importable on workers).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = [
    "model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=64", "model.proj_dim=32",
    "model.pred_hidden_dim=64", "pretrain.warmup_epochs=0", "pretrain.epochs=1", "pretrain.batch_size=32",
    "pretrain.knn_every=0", "data.image_size=32", "data.num_threads=1", "ray.num_workers=1",
    "ray.cpus_per_worker=0.5",
]


# ---------------------------------------------------------------- the key


def test_key_ignores_what_does_not_change_the_weights(demo_dataset):
    cfg = load_config(None, [f"data.path={demo_dataset}", *TINY])
    key = pc.cache_key(cfg)
    assert len(key) == 64
    same = {
        "finetune.lr": 0.5, "finetune.epochs": 3, "pseudolabel.budget": 7, "pseudolabel.rounds": 3,
        "pretrain.cache": "/elsewhere", "pretrain.checkpoint_every": 3, "pretrain.knn_every": 2,
        "pretrain.knn_k": 5, "run.output_dir": "/x", "run.name": "other", "ray.cpus_per_worker": 1.0,
        "ray.storage_path": "/y", "ray.max_failures": 0, "data.label_fraction": 0.5,
        "augment.finetune_policy": "randaugment", "augment.finetune_crop_scale": [0.2, 1.0],
        "finetune.steps": 11, "finetune.drop_path_rate": 0.3, "pseudolabel.selection": "top",
        "run.select_metric": "accuracy",
    }
    for k, v in same.items():
        assert pc.cache_key(cfg.replace(**{k: v})) == key, k


def test_key_changes_with_what_changes_the_weights(demo_dataset):
    cfg = load_config(None, [f"data.path={demo_dataset}", *TINY])
    key = pc.cache_key(cfg)
    other = {
        "pretrain.epochs": 2, "pretrain.lr": 0.1, "pretrain.seed": 1, "pretrain.batch_size": 16,
        "pretrain.optimizer": "sgd", "model.proj_dim": 16, "model.backbone": "resnet18", "augment.hflip_p": 0.0,
        "data.image_size": 48, "data.loader": "torch", "ray.num_workers": 2,
    }
    keys = {pc.cache_key(cfg.replace(**{k: v})) for k, v in other.items()}
    assert key not in keys and len(keys) == len(other)
    # The data set enters through its manifest's bytes.
    assert pc.cache_key(cfg, manifest_sha="0" * 64) != key
    fields = pc.key_fields(cfg, pc.manifest_sha256(demo_dataset))
    assert fields["manifest_sha256"] == pc.manifest_sha256(demo_dataset)
    assert "cache" not in fields["pretrain"] and "knn_every" not in fields["pretrain"]


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(pc.DatasetError, match="not a raysemi dataset"):
        pc.manifest_sha256(str(tmp_path))


# ---------------------------------------------------------------- the lock, without Ray


def test_lock_grants_one_owner_until_release_or_expiry(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(pc.time, "time", lambda: now[0])
    lock = pc.CacheLock()
    assert lock.acquire("k", "a", 10) is None
    assert lock.acquire("k", "b", 10) == "a"  # held
    assert lock.acquire("k2", "b", 10) is None  # another key is independent
    assert lock.acquire("k", "a", 10) is None  # re-entrant for the owner
    now[0] += 9
    assert lock.renew("k", "a", 10)
    now[0] += 9
    assert lock.acquire("k", "b", 10) == "a"  # the renewal kept it
    now[0] += 11  # a's lease lapsed: a is presumed dead
    assert lock.acquire("k", "b", 10) is None
    assert not lock.renew("k", "a", 10)  # a lost it
    lock.release("k", "a")  # not a's to release
    assert lock.holders()["k"][0] == "b"
    lock.release("k", "b")
    assert "k" not in lock.holders()


# ---------------------------------------------------------------- with Ray: concurrent processes


def _fake_compute(counter: str, seconds: float, die: bool = False):
    def compute(entry: str) -> str:
        with open(counter, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        if die:
            os._exit(1)
        weights = f"{entry}/pretrain/byol.safetensors"
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        Path(weights).write_bytes(b"weights")
        return weights

    return compute


def _ask(cache: str, key: str, counter: str, label: str, seconds: float = 3.0, die: bool = False,
         lease_s: float = 60.0, barrier: tuple[str, int] | None = None) -> dict:
    if barrier is not None:  # start together: worker start-up times differ by seconds on a busy machine
        folder, n = barrier
        Path(folder, label).touch()
        deadline = time.time() + 120
        while len(os.listdir(folder)) < n and time.time() < deadline:
            time.sleep(0.05)
    result = pc.get_or_compute(cache, key, _fake_compute(counter, seconds, die), label=label, lease_s=lease_s,
                               poll_s=0.2)
    return result.__dict__


def _calls(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


@pytest.mark.ray
def test_concurrent_same_key_computes_once_and_other_keys_compute(ray_session, tmp_path):
    ray = ray_session
    ask = ray.remote(num_cpus=0.1)(_ask)
    cache = str(tmp_path / "cache")
    same = tmp_path / "same.txt"
    (tmp_path / "b1").mkdir()
    results = ray.get([ask.remote(cache, "k" * 64, str(same), f"trial{i}", barrier=(str(tmp_path / "b1"), 2))
                       for i in range(2)])
    assert _calls(same) == 1  # one computed, the other waited and reused
    assert sorted(r["reused"] for r in results) == [False, True]
    waiter = next(r for r in results if r["reused"])
    assert waiter["waited_s"] > 0.5 and waiter["weights"] == results[0]["weights"]
    marker = json.loads((tmp_path / "cache" / ("k" * 64) / pc.COMPLETE).read_text())
    assert marker["weights"] == "pretrain/byol.safetensors"

    other = tmp_path / "other.txt"
    (tmp_path / "b2").mkdir()
    results = ray.get([ask.remote(cache, key * 64, str(other), f"t{key}", barrier=(str(tmp_path / "b2"), 2))
                       for key in ("a", "b")])
    assert _calls(other) == 2 and not any(r["reused"] for r in results)

    # A later caller finds the entry and computes nothing; the same label (a resumed run) is not a reuse.
    again = pc.get_or_compute(cache, "a" * 64, _fake_compute(str(other), 0), label="ta")
    assert _calls(other) == 2 and not again.reused
    assert pc.get_or_compute(cache, "a" * 64, _fake_compute(str(other), 0), label="new").reused


@pytest.mark.ray
def test_a_dead_owner_releases_the_key(ray_session, tmp_path):
    ray = ray_session
    cache, counter, key = str(tmp_path / "cache"), tmp_path / "calls.txt", "d" * 64
    dying = ray.remote(num_cpus=0.1, max_retries=0)(_ask).remote(cache, key, str(counter), "dies", 1.0, True, 2.0)
    deadline = time.time() + 60
    while _calls(counter) == 0 and time.time() < deadline:  # the first owner holds the key
        time.sleep(0.1)
    result = ray.get(ray.remote(num_cpus=0.1)(_ask).remote(cache, key, str(counter), "survivor", 0.5, False, 2.0))
    with pytest.raises(ray.exceptions.RayError):
        ray.get(dying)
    assert _calls(counter) == 2  # the survivor took the lapsed key over and computed it
    assert not result["reused"] and pc.lookup(cache, key)["computed_by"] == "survivor"


# ---------------------------------------------------------------- a real pretraining


@pytest.mark.ray
@pytest.mark.slow
def test_pretraining_is_reused_with_the_same_settings_only(ray_session, demo_dataset, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    cfg = load_config(None, [f"data.path={demo_dataset}", *TINY, f"pretrain.cache={cache}",
                             f"run.output_dir={tmp_path / 'a'}"])
    Path(cache).mkdir()
    (Path(cache) / "README.md").write_text("the user's note")  # a foreign file in the cache survives its tidying
    first = pc.pretrain_cached(cfg)
    assert not first.reused and Path(first.weights).is_file()
    assert Path(first.entry, pc.KEY_FILE).is_file()
    assert not (Path(first.entry) / "ray").exists()  # the Ray Train run is tidied away
    assert (Path(cache) / "README.md").read_text() == "the user's note"

    # Another run (other fine-tuning, other output folder), same pretraining settings: a hit.
    from raysemi.stages import pretrain

    stamp = Path(first.weights).stat().st_mtime_ns
    monkeypatch.setattr(pretrain, "run", lambda *a, **k: pytest.fail("a cache hit must not pretrain"))
    second = pc.pretrain_cached(cfg.replace(**{"finetune.lr": 0.5, "run.output_dir": str(tmp_path / "b")}))
    assert second.reused and second.weights == first.weights and second.key == first.key
    assert Path(first.weights).stat().st_mtime_ns == stamp  # nothing trained, nothing rewritten
    monkeypatch.undo()

    # Other pretraining settings: another key, not in the cache (a miss that would compute).
    changed = cfg.replace(**{"pretrain.epochs": 2})
    assert pc.cache_key(changed) != first.key
    assert pc.lookup(cache, pc.cache_key(changed)) is None
