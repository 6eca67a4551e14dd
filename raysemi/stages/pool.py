"""A round's pseudo-labels, chosen shard by shard on the cluster: the driver sees counts and thresholds.

The unlabelled pool is every row of the ``train`` and ``unlabeled`` shards that the ``LabelRule`` does not
keep; each has a prediction in the part of the same index (``stages.commits``), row for row. Ray tasks
read the small columns of both (``id, label`` and ``id, pred, confidence``), and:

1. count the candidates per predicted class (pool rows at or above ``pseudolabel.min_confidence``);
2. answer the selection's range queries (``selection.plan_selection`` -> ``data.order_stats``), a few
   passes, until the rule's thresholds are exact;
3. count the chosen rows per shard and, where a hidden true label is known, the confusion counts that
   give the pseudo-label precision;
4. write the training-set parts (``data.trainset``): each task reads only its rows' images.

The chosen rows are exactly those the rule picks from all predictions sorted at once (tests compare the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysemi.core.errors import RaysemiError
from raysemi.core.io import join, write_bytes_atomic
from raysemi.data.labels import LabelRule
from raysemi.data.shards import Manifest, Mapper, read_shard, shard_groups, table_bytes
from raysemi.data.trainset import SourceShard, one_hot
from raysemi.ml.losses import sharpen
from raysemi.ml.metrics import precision_from_counts
from raysemi.stages.commits import part_uri
from raysemi.stages.selection import (
    SELECTION_SCHEMA,
    SelectionRule,
    candidates,
    class_counts_of,
    plan_selection,
    range_summaries,
)

POOL_SPLITS = ("train", "unlabeled")


def pool_shards(root: str, manifest: Manifest, predictions: str | None = None) -> list[SourceShard]:
    """The shards that hold the pool, in prediction-part order, with their part under ``predictions``."""
    out = []
    for split in POOL_SPLITS:
        if split not in manifest.splits:
            continue
        for uri, info in zip(manifest.shard_uris(root, split), manifest.splits[split].shards):
            out.append(SourceShard(uri, split, info.rows, None))
    if predictions is not None:
        out = [SourceShard(s.uri, s.split, s.rows, part_uri(predictions, i)) for i, s in enumerate(out)]
    return out


@dataclass(frozen=True)
class PoolView:
    """How a task sees a shard's pool: the label rule, the classes and the confidence floor."""

    labels: LabelRule
    num_classes: int
    min_confidence: float

    def candidates(self, shard: SourceShard) -> pa.Table:
        """``id, pred, confidence, negc, row, truth`` of the shard's candidates (``truth``: the hidden
        label of a train row, else -1)."""
        inputs = read_shard(shard.uri, ["id", "label"])
        preds = read_shard(shard.predictions, ["id", "pred", "confidence"])
        if inputs.num_rows != preds.num_rows or not inputs.column("id").equals(preds.column("id")):
            raise RaysemiError(f"the predictions {shard.predictions} do not hold the rows of {shard.uri} in order")
        cands = candidates(preds, self.num_classes, self.labels.pool(inputs, shard.split), self.min_confidence)
        truth = inputs.column("label").take(cands.column("row")).fill_null(-1)
        if shard.split != "train":
            truth = pa.array(np.full(cands.num_rows, -1, dtype=np.int16))
        return cands.append_column("truth", truth.cast(pa.int16()))


def class_count_task(view: PoolView, shards: list[SourceShard]) -> np.ndarray:
    return np.sum([class_counts_of(view.candidates(s), view.num_classes) for s in shards], axis=0)


def summary_task(view: PoolView, shards: list[SourceShard], ranges: dict, class_limits: tuple | None) -> dict:
    cands = pa.concat_tables([view.candidates(s) for s in shards])
    return range_summaries(cands, ranges, class_limits)


@dataclass(frozen=True)
class PseudoRows:
    """A ``data.trainset.RowSource``: the rows ``rule`` chooses, labelled with their prediction, weight
    ``weight``; with ``temperature`` set, a ``target`` column of the teacher's sharpened probabilities."""

    view: PoolView
    rule: SelectionRule
    weight: float
    temperature: float | None = None

    @property
    def num_classes(self) -> int:
        return self.view.num_classes

    def chosen_rows(self, shard: SourceShard) -> pa.Table:
        cands = self.view.candidates(shard)
        cands = cands.filter(pa.array(self.rule.chosen(cands)))
        cands = cands.take(pc.sort_indices(cands, sort_keys=[("row", "ascending")]))
        out = pa.table({"row": cands.column("row"), "id": cands.column("id"), "label": cands.column("pred"),
                        "weight": pa.array(np.full(cands.num_rows, self.weight, np.float32)),
                        "truth": cands.column("truth")})
        if self.temperature is None:
            return out
        probs = read_shard(shard.predictions, ["probs"]).column("probs").take(cands.column("row"))
        k = self.num_classes
        flat = np.asarray(pc.list_flatten(probs).to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, k)
        import torch

        soft = sharpen(torch.from_numpy(flat), self.temperature).numpy().astype(np.float32)
        if not len(soft):
            return out.append_column("target", one_hot(np.zeros(0, np.int64), k))
        target = pa.FixedSizeListArray.from_arrays(pa.array(soft.reshape(-1)), k).cast(pa.list_(pa.float32()))
        return out.append_column("target", target)

    def tally(self, rows: pa.Table, shard: SourceShard) -> np.ndarray:
        """Chosen rows per class, then the ``(pred, truth + 1)`` counts (truth -1: unknown), flattened."""
        k = self.num_classes
        pred = rows.column("label").to_numpy().astype(np.int64)
        truth = rows.column("truth").to_numpy().astype(np.int64)
        confusion = np.bincount(pred * (k + 1) + truth + 1, minlength=k * (k + 1))
        return np.concatenate([np.bincount(pred, minlength=k), confusion])


def select(shards: list[SourceShard], view: PoolView, budget: int, prior: list[float] | None,
           map_fn: Mapper) -> tuple[SelectionRule, list[int]]:
    """The rule choosing ``budget`` pseudo-labels of the pool (tasks of ``map_fn``), and the candidates per class."""
    groups = shard_groups(shards, [s.rows for s in shards])
    counts = map_fn(class_count_task, [(view, g) for g in groups])
    class_counts = np.sum(counts, axis=0).astype(int).tolist()

    def run_pass(ranges, class_limits):
        return map_fn(summary_task, [(view, g, ranges, class_limits) for g in groups])

    return plan_selection(class_counts, budget, prior, run_pass), class_counts


def write_selected_task(view: PoolView, rule: SelectionRule, shards: list[SourceShard], uri: str) -> int:
    chosen = []
    for shard in shards:
        cands = view.candidates(shard)
        chosen.append(cands.filter(pa.array(rule.chosen(cands))).select(SELECTION_SCHEMA.names))
    table = pa.concat_tables(chosen)
    write_bytes_atomic(uri, table_bytes(table))
    return table.num_rows


def write_selected(shards: list[SourceShard], view: PoolView, rule: SelectionRule, out_uri: str,
                   map_fn: Mapper) -> int:
    """The chosen rows (``id, pred, confidence``) as ``part-NNNNN.parquet`` under ``out_uri``, one per task."""
    groups = shard_groups(shards, [s.rows for s in shards])
    tasks = [(view, rule, g, join(out_uri, f"part-{j:05d}.parquet")) for j, g in enumerate(groups)]
    return sum(map_fn(write_selected_task, tasks))


def precision(tally: np.ndarray, classes: list[str]) -> dict:
    """``metrics.pseudo_label_precision``'s figures from a ``PseudoRows`` tally."""
    k = len(classes)
    confusion = np.asarray(tally[k:]).reshape(k, k + 1)
    return precision_from_counts(confusion[:, 1:], confusion[:, 0], classes)
