"""One round of the method and its result: the one description of a round that the pipeline, the report and
Tune share, and the one rule that picks the round to keep.

Round 0 fine-tunes on the labelled rows; round r >= 1 retrains on them plus the ``r x budget`` most confident
predictions of the previous round's model over the unlabelled pool (``pseudo_trainset``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from raysemi.core import io as rio
from raysemi.core.config import Config
from raysemi.core.io import filesystem, join
from raysemi.data.labels import LabelSplit
from raysemi.data.shards import Manifest
from raysemi.data.trainset import LabeledRows, TrainSet, count_rows, read_trainset, write_trainset
from raysemi.distributed import ray_tasks
from raysemi.ml.metrics import best_round
from raysemi.stages import finetune, pool
from raysemi.stages.consistency import PoolSet
from raysemi.stages.evaluate import split_metrics
from raysemi.stages.pseudolabel import predict_shards
from raysemi.stages.selection import selection_prior

log = logging.getLogger("raysemi.pipeline.rounds")


@dataclass(frozen=True)
class RoundResult:
    """What one round produced: its model, its validation metrics and how it was trained (``report.json``'s
    ``rounds[i]``, Tune's per-round report and checkpoint state)."""

    round: int
    val: dict[str, Any]  # metrics on the val split (stages/evaluate.split_metrics)
    model: str  # the round's classifier (safetensors URI)
    n_pseudo: int = 0
    train_rows: int = 0  # labelled + pseudo-labelled rows (before the labelled copies)
    steps: int = 0
    images_seen: int = 0
    labeled_copies: int = 1
    pseudo_precision: float | None = None  # of the chosen pseudo-labels, where the pool has labels
    pseudo_detail: dict[str, Any] | None = None
    seconds: float = 0.0
    compute: dict[str, Any] | None = None  # the precision and layout it ran with

    def score(self, metric: str) -> float:
        """The validation metric the round is chosen by (``run.select_metric``)."""
        return self.val[metric]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def chosen_round(rounds: list[RoundResult], metric: str) -> RoundResult:
    """The round the method keeps: the best validation ``metric``, the earlier on a tie (``metrics.best_round``)."""
    return rounds[best_round([r.score(metric) for r in rounds])]


def min_parts(cfg: Config) -> int:
    """Parts of a training set: two per worker at least (a multiple of the workers: equal rows per rank)."""
    return max(2 * cfg.ray.num_workers, 4)


def labeled_trainset(cfg: Config, manifest: Manifest, labels: LabelSplit, out: str, resume: bool = False
                     ) -> TrainSet:
    """The chosen labels as a training set under ``<out>/trainset``, written once per run (round 0's; with
    ``resume``, one an interrupted run completed there is reused). With soft targets the parts hold one-hot
    targets too."""
    uri = join(out, "trainset")
    done = read_trainset(uri) if resume else None
    if done is not None:
        return done
    soft = cfg.pseudolabel.soft_targets
    shards = [s for s in pool.pool_shards(cfg.data.path, manifest) if s.split == "train"]
    ts = write_trainset(LabeledRows(labels.rule, manifest.num_classes, soft), shards, uri, min_parts(cfg),
                        ray_tasks.task_mapper(cfg.ray.address))
    return TrainSet(ts.uris, ts.rows, ts.class_counts, soft=False)  # round 0 trains on hard labels


def pseudo_trainset(cfg: Config, manifest: Manifest, labels: LabelSplit, model: str, budget: int, out: str,
                    pred_uri: str, write: bool = True) -> tuple[TrainSet, int, dict | None]:
    """Round r's pseudo-labels: the pool predicted by ``model`` (the actor pool), ``budget`` of them chosen and
    written under ``<out>/trainset`` by Ray tasks (``write``: not when the round is already trained); returns
    the set, its rows and the pseudo-label precision."""
    pl, k = cfg.pseudolabel, manifest.num_classes
    shards = pool.pool_shards(cfg.data.path, manifest, pred_uri)
    predict_shards(model, [s.uri for s in shards], pred_uri, cfg, input_rows=[s.rows for s in shards],
                   input_sha256=[h for sp in pool.POOL_SPLITS for h in manifest.shard_hashes(sp)])
    view = pool.PoolView(labels.rule, k, pl.min_confidence)
    prior = selection_prior(pl.selection, labels.labeled_counts)
    tasks = ray_tasks.task_mapper(cfg.ray.address)
    rule, candidates = pool.select(shards, view, budget, prior, tasks)
    source = pool.PseudoRows(view, rule, cfg.finetune.pseudo_weight, pl.temperature if pl.soft_targets else None)
    counted = count_rows(source, shards, tasks)
    n = sum(counted[0])
    if n < budget:
        log.warning("only %d of the budget of %d pseudo-labels pass min_confidence=%.3f (pool: %d candidates)",
                    n, budget, pl.min_confidence, sum(candidates))
    if n == 0 or not write:
        return TrainSet([], [], [0] * k, pl.soft_targets), n, pool.precision(counted[2], manifest.classes) if n else None
    ts = write_trainset(source, shards, join(out, "trainset"), min_parts(cfg), tasks,
                        soft=pl.soft_targets, counted=counted)
    return ts, n, pool.precision(counted[2], manifest.classes)


def labeled_repeats(n_labeled: int, n_pseudo: int, share: float) -> int:
    """How many copies of each true label make them ``share`` of a round's rows (at least one): with
    equal steps per round, more pseudo-labels would otherwise mean fewer passes over the true labels."""
    if share <= 0 or n_pseudo == 0 or n_labeled == 0:
        return 1
    return max(1, round(share / (1.0 - share) * n_pseudo / n_labeled))


def ran_with(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The precision and layout a training stage ran with, from its last metrics row (None: not recorded)."""
    keys = ("device", "precision", "channels_last", "cpu_bf16_units")
    last = metrics[-1] if metrics else {}
    if not all(k in last for k in keys):
        return None
    return {k: last[k] for k in (*keys, "torch_threads") if k in last}


def trained_round(out: str) -> finetune.FinetuneResult | None:
    """The classifier an interrupted run already trained in ``out`` (``--resume``), or None."""
    weights = join(out, finetune.WEIGHTS)
    fs, path = filesystem(weights)
    if not fs.exists(path):
        return None
    log.info("%s: reusing %s", out.rsplit("/", 1)[-1], weights)
    _, meta = rio.load_weights(weights)
    extra = json.loads(meta.get("extra", "{}"))
    return finetune.FinetuneResult(weights, rio.file_sha256(weights), [], 0.0,
                                   int(extra.get("steps", 0)), int(extra.get("images_seen", 0)))


def consistency_pool(cfg: Config, manifest: Manifest) -> PoolSet | None:
    """The pool FixMatch's consistency term reads (every train and unlabelled shard) when the run uses it:
    ``run.mode=fixmatch``, or the method with ``fixmatch.in_rounds``; else None."""
    if cfg.run.mode != "fixmatch" and not (cfg.run.mode == "full" and cfg.fixmatch.in_rounds):
        return None
    shards = pool.pool_shards(cfg.data.path, manifest)
    return PoolSet([s.uri for s in shards], [s.rows for s in shards])


@dataclass(frozen=True)
class RunState:
    """What every round of one run shares: the data set, the label split, round 0's training set, the
    pretrained weights and the pseudo-labels added per round."""

    manifest: Manifest
    labels: LabelSplit
    labeled: TrainSet
    byol: str | None
    per_round: int


def run_round(cfg: Config, r: int, state: RunState, teacher: str | None, resume: bool = False) -> RoundResult:
    """Round ``r``: its training set (round 0: the labels; r >= 1: plus the ``r x budget`` pseudo-labels of
    ``teacher``, the previous round's model), fine-tuning from BYOL (or the teacher, per
    ``pseudolabel.retrain_from``) and its validation metrics."""
    t0 = time.time()
    pl, labels = cfg.pseudolabel, state.labels
    out = join(cfg.run.output_dir, f"round={r}")
    done = trained_round(out) if resume else None
    trainset, n_pseudo, precision, copies = state.labeled, 0, None, 1
    if r > 0:
        pseudo, n_pseudo, precision = pseudo_trainset(
            cfg, state.manifest, labels, teacher, min(state.per_round * r, labels.pool_rows), out,
            join(cfg.run.output_dir, f"predictions/round={r}"), write=done is None)
        copies = labeled_repeats(labels.n_labeled, n_pseudo, pl.labeled_share)
        trainset = state.labeled.plus(pseudo, copies)
    init = teacher if r > 0 and pl.retrain_from == "previous" else state.byol
    round_cfg = cfg
    if r > 0 and pl.retrain_lr_scale != 1.0:
        round_cfg = cfg.replace(**{"finetune.lr": cfg.finetune.lr * pl.retrain_lr_scale})
    classes = state.manifest.classes
    result = done or finetune.run(round_cfg, trainset, init, out, f"{cfg.run.name}-round{r}", classes, f"round {r}",
                                  pool=consistency_pool(cfg, state.manifest))
    val = split_metrics(result.weights, cfg, "val", classes)
    return RoundResult(
        round=r, val=val, model=result.weights, n_pseudo=n_pseudo, train_rows=labels.n_labeled + n_pseudo,
        steps=result.steps, images_seen=result.images_seen, labeled_copies=copies,
        pseudo_precision=precision["precision"] if precision else None, pseudo_detail=precision,
        seconds=time.time() - t0, compute=ran_with(result.history))
