"""The k-th smallest key over rows spread across many shards, with no row list in one process.

A rule like "the 2,500 most confident predictions" or "the first 10% of each class by rank key" is a
threshold: a row is chosen when its key is at most the k-th smallest key. This module finds that key
from per-shard summaries, in a few passes, each pass a map over the shards (Ray tasks; ``run_pass``):

1. every shard (or group of shards) reports, for the current range ``(lo, hi]`` of each query, how many of
   its rows lie at or below ``lo`` and in the range, and either all its keys in the range (when there are at
   most ``SAMPLES``) or ``SAMPLES`` evenly spaced ones with their positions;
2. the driver sweeps the merged samples to bound each sample's global rank and narrows the range to the
   samples that bracket rank k; a range shrinks by about ``SAMPLES / 2`` per pass, so 1M rows take two
   passes and 100M three, and a pass holds at most ``SAMPLES`` keys per task in the driver;
3. once every shard has sent all of its keys in the range, the k-th is read off exactly.

Keys are tuples compared in Python order (ascending); a descending column enters negated. Keys are
assumed distinct (each holds the row's id), so a threshold picks exactly k rows.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Key = tuple
SAMPLES = 256
MAX_PASSES = 40


@dataclass(frozen=True)
class RangeSummary:
    """One shard group's view of a query's range ``(lo, hi]``."""

    below: int  # rows with key <= lo
    count: int  # rows with lo < key <= hi
    keys: list[Key]  # ascending: every key in the range (count <= SAMPLES) or SAMPLES of them
    positions: list[int]  # each key's 0-based rank within the range

    @property
    def exact(self) -> bool:
        return len(self.keys) == self.count


def _greater(table: pa.Table, names: Sequence[str], bound: Key) -> pa.ChunkedArray:
    """Lexicographic ``key > bound`` over the key columns, as an Arrow mask."""
    head = table.column(names[0])
    value = pa.scalar(bound[0], head.type)
    if len(names) == 1:
        return pc.greater(head, value)
    rest = _greater(table, names[1:], bound[1:])
    return pc.or_(pc.greater(head, value), pc.and_(pc.equal(head, value), rest))


def summarize(table: pa.Table, names: Sequence[str], lo: Key | None, hi: Key | None,
              samples: int | None = None) -> RangeSummary:
    """The summary of ``table``'s rows (key columns ``names``, any order) for the range ``(lo, hi]``, with
    at most ``samples`` keys (default ``SAMPLES``)."""
    samples = samples or SAMPLES
    n = table.num_rows
    if n == 0:
        return RangeSummary(0, 0, [], [])
    above_lo = _greater(table, names, lo) if lo is not None else None
    below = n - (int(pc.sum(above_lo).as_py() or 0) if above_lo is not None else n)
    mask = above_lo
    if hi is not None:
        not_above_hi = pc.invert(_greater(table, names, hi))
        mask = not_above_hi if mask is None else pc.and_(mask, not_above_hi)
    rows = table.select(list(names)) if mask is None else table.select(list(names)).filter(mask)
    count = rows.num_rows
    if count == 0:
        return RangeSummary(below, 0, [], [])
    rows = rows.take(pc.sort_indices(rows, sort_keys=[(c, "ascending") for c in names]))
    if count <= samples:
        positions = list(range(count))
    else:  # evenly spaced, the last one the range's largest key
        positions = sorted({(j + 1) * count // samples - 1 for j in range(samples)})
    picked = rows.take(pa.array(positions, pa.int64()))
    keys = list(zip(*(picked.column(c).to_pylist() for c in names)))
    return RangeSummary(below, count, keys, positions)


def _narrow(k: int, parts: list[RangeSummary], lo: Key | None, hi: Key | None) -> tuple[Key | None, Key | None]:
    """New ``(lo, hi]`` around rank ``k`` (1-based within the range) from the parts' samples.

    Sweeping the merged samples upwards, ``low`` counts the rows certainly at or below the current key (up to
    each part's last sample passed) and ``high`` those possibly so (up to each part's next sample)."""
    merged = heapq.merge(*[[(key, p, j) for j, key in enumerate(part.keys)] for p, part in enumerate(parts)])
    last = [0] * len(parts)  # per part: rows certainly <= the current key
    nxt = [part.positions[0] if part.keys else part.count for part in parts]  # rows possibly <= it
    low, high = 0, sum(nxt)
    new_lo, new_hi = lo, hi
    for key, p, j in merged:
        part = parts[p]
        low += part.positions[j] + 1 - last[p]
        last[p] = part.positions[j] + 1
        following = part.positions[j + 1] if j + 1 < len(part.keys) else part.count
        high += following - nxt[p]
        nxt[p] = following
        if high < k:
            new_lo = key
        if low >= k:
            new_hi = key
            break
    return new_lo, new_hi


Query = Hashable
PassFn = Callable[[dict[Query, tuple[Key | None, Key | None]]], list[dict[Query, RangeSummary]]]


def kth_smallest(targets: dict[Query, int], run_pass: PassFn) -> dict[Query, Key]:
    """The ``k``-th smallest key (1-based) of each query in ``targets``, each ``1 <= k <= its row count``.

    ``run_pass(ranges)`` maps every shard group's ``summarize`` over the queries' current ranges and returns
    one ``{query: RangeSummary}`` per group. All queries advance together, one map per pass."""
    ranges = {q: (None, None) for q, k in targets.items()}
    found: dict[Query, Key] = {}
    for _ in range(MAX_PASSES):
        if not ranges:
            return found
        results = run_pass(dict(ranges))
        for q, (lo, hi) in list(ranges.items()):
            parts = [r[q] for r in results]
            k = targets[q] - sum(p.below for p in parts)
            if not 1 <= k <= sum(p.count for p in parts):
                raise ValueError(f"rank {targets[q]} is outside the rows of query {q!r}")
            if all(p.exact for p in parts):
                found[q] = list(heapq.merge(*[p.keys for p in parts]))[k - 1]
                del ranges[q]
            else:
                ranges[q] = _narrow(k, parts, lo, hi)
    raise RuntimeError(f"the k-th key search did not converge in {MAX_PASSES} passes")


def at_or_below(table: pa.Table, names: Sequence[str], limit: Key | str | None) -> np.ndarray:
    """Boolean mask: rows whose key is at most ``limit`` (``"all"``: every row; None: none)."""
    if limit == "all":
        return np.ones(table.num_rows, dtype=bool)
    if limit is None or table.num_rows == 0:
        return np.zeros(table.num_rows, dtype=bool)
    return np.asarray(pc.invert(_greater(table, names, tuple(limit))).to_numpy(zero_copy_only=False), dtype=bool)
