"""Ingest's pure pieces: dedup, group-stratified carving of val/test, and the shard plan.

Nothing here reads or writes files: each takes the scanned items (``sources.Item``) and decides.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter, defaultdict

import numpy as np

from raysemi.data.sources import Item


def row_order(it: Item) -> str:
    """Row order: the source path, or (DICOM, where ``source`` is a salted hash) a salt-free key."""
    return it.sort_key or it.source


def dedup(items: list[Item]) -> tuple[list[Item], list[dict[str, str]], int]:
    """Quarantine failures; keep the first of each sha256 (labeled first, then by source path)."""
    quarantine = [{"source": it.source, "reason": it.check.reason} for it in items if not it.check.ok]
    kept, first, duplicates = [], {}, 0
    for it in sorted((it for it in items if it.check.ok), key=lambda it: (it.label is None, row_order(it))):
        prev = first.setdefault(it.sha, it)
        if prev is it:
            kept.append(it)
        elif it.label is None or it.label == prev.label:
            duplicates += 1
        else:
            reason = f"duplicate with conflicting label (of {prev.source})"
            quarantine.append({"source": it.source, "reason": reason})
    return kept, quarantine, duplicates


def carve_group_splits(items: list[Item], carve: dict[str, float], seed: int) -> None:
    """Move whole groups from the labeled train pool into val/test, stratified by each group's majority class."""
    pool = [it for it in items if it.label is not None and it.split in (None, "train")]
    for it in pool:
        it.split = "train"
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in pool:
        groups[it.group if it.group is not None else f"\0{it.source}"].append(it)
    # Salted (DICOM) groups sort by a salt-free key, so a random salt does not reshuffle the splits.
    order = {k: (m[0].group_sort or k) for k, m in groups.items()}
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        by_class[Counter(m.label for m in members).most_common(1)[0][0]].append(key)
    rng = random.Random(seed)
    for cls in sorted(by_class):
        keys = sorted(by_class[cls], key=order.__getitem__)
        rng.shuffle(keys)
        n = sum(len(groups[k]) for k in keys)
        targets = {s: round(n * f) for s, f in carve.items()}
        counts = dict.fromkeys(carve, 0)
        for k in keys:
            size = len(groups[k])
            for s, t in targets.items():
                if counts[s] < t and abs(counts[s] + size - t) <= t - counts[s]:
                    counts[s] += size
                    for it in groups[k]:
                        it.split = s
                    break


def plan_shards(items: list[Item], shard_mb: float, min_shards: int, seed: int) -> list[list[Item]]:
    """Shuffle ``items`` (seeded, from a stable order) and cut them into shards of about ``shard_mb`` MB,
    at least ``min_shards`` of them (fewer only when there are fewer rows)."""
    if not items:
        return []
    rows = sorted(items, key=row_order)
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    total = sum(it.nbytes for it in rows)
    k = min(len(rows), max(1, math.ceil(total / (shard_mb * 1e6)), min(min_shards, len(rows))))
    bounds = np.linspace(0, len(rows), k + 1).round().astype(int)
    return [rows[a:b] for a, b in itertools.pairwise(bounds)]
