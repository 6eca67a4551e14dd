"""The Train-worker skeleton: a checkpoint's state restores model, optimizer, loss scaler and EMA exactly."""

from __future__ import annotations

import torch

from raysemi.core.config import load_config
from raysemi.core.io import load_state, save_state
from raysemi.ml.optim import build_optimizer
from raysemi.stages.finetune import build_ema, initial_classifier
from raysemi.stages.worker import TrainState, build_replica

TINY = ["model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=32", "model.proj_dim=16",
        "finetune.ema_decay=0.9"]


def fresh(cfg) -> TrainState:
    model = build_replica(lambda: initial_classifier(cfg, 3, None), seed=1, sync_batchnorm=False, device=torch.device("cpu"))
    opt = build_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.1, 1e-4)
    return TrainState(model, opt, torch.amp.GradScaler("cpu"), build_ema(model, cfg.finetune.ema_decay))


def same(a, b) -> bool:
    """Nested state dicts equal: tensors exactly, everything else by value."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_the_saved_state_restores_into_fresh_objects(tmp_path):
    cfg = load_config(None, TINY)
    trained = fresh(cfg)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for step in range(3):  # momentum buffers, a moved EMA, a scale the scaler has updated
        loss = torch.nn.functional.cross_entropy(trained.model(x), y)
        trained.optimizer.zero_grad()
        trained.scaler.scale(loss).backward()
        trained.scaler.step(trained.optimizer)
        trained.scaler.update(new_scale=1024.0 * (step + 1))
        trained.ema.update(trained.model, step=step + 1)
    save_state(tmp_path, trained.state_dict(step=3, history=[{"loss": 1.0}]), cfg)  # as the worker checkpoints

    restored = fresh(cfg)
    assert not same(restored.model.state_dict(), trained.model.state_dict())  # it starts elsewhere
    state = load_state(tmp_path)
    restored.load_state_dict(state)
    assert state["step"] == 3 and state["history"] == [{"loss": 1.0}]
    assert same(restored.model.state_dict(), trained.model.state_dict())
    assert same(restored.optimizer.state_dict(), trained.optimizer.state_dict())
    assert restored.scaler.get_scale() == trained.scaler.get_scale() == 3072.0
    assert same(restored.scaler.state_dict(), trained.scaler.state_dict())
    assert same(restored.ema.module.state_dict(), trained.ema.module.state_dict())
    assert not same(restored.ema.module.state_dict(), restored.model.state_dict())  # the EMA is its own state


def test_without_an_ema_the_checkpoint_has_none():
    cfg = load_config(None, [*TINY[:-1], "finetune.ema_decay=0"])
    state = fresh(cfg)
    assert state.ema is None and "ema" not in state.state_dict(step=0)


def test_a_worker_uses_the_node_cpus_shared_among_its_train_workers(monkeypatch):
    """Ray gives a 0.99-CPU worker one thread (OMP_NUM_THREADS=1); the worker takes the node's CPUs divided among
    the Train workers on the node, or ray.torch_threads when set."""
    from raysemi.distributed import ray_utils
    from raysemi.stages.worker import use_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(ray_utils, "node_cpus", lambda: 8)
        monkeypatch.setattr(ray_utils, "local_world_size", lambda: 3)
        assert use_threads(None) == 2 and torch.get_num_threads() == 2
        assert use_threads(5) == 5 and torch.get_num_threads() == 5
        monkeypatch.setattr(ray_utils, "local_world_size", lambda: 16)
        assert use_threads(None) == 1
    finally:
        torch.set_num_threads(before)
