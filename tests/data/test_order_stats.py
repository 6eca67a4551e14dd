"""The k-th smallest key over many shards from bounded summaries: exact, in few passes, any split of the rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raysemi.data import order_stats
from raysemi.data.order_stats import at_or_below, kth_smallest, summarize

NAMES = ("negc", "id")


def shards(n: int, groups: int, seed: int = 0, ties: bool = True) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 50, n).astype(np.float32) / 50 if ties else rng.random(n).astype(np.float32)
    table = pa.table({"negc": pa.array(-conf), "id": pa.array([f"r{i:07d}" for i in rng.permutation(n)])})
    cuts = np.sort(rng.choice(np.arange(1, n), groups - 1, replace=False))
    return [table.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, n])]


def reference(tables: list[pa.Table], k: int) -> tuple:
    rows = sorted(zip(*(pa.concat_tables(tables).column(c).to_pylist() for c in NAMES)))
    return rows[k - 1]


@pytest.mark.parametrize("n,groups,samples", [(50, 3, 256), (20_000, 7, 16), (5_000, 40, 8)])
def test_kth_equals_the_sorted_reference_and_passes_stay_few(n, groups, samples):
    tables = shards(n, groups)
    passes = []

    def run_pass(ranges):
        passes.append(ranges)
        return [{q: summarize(t, NAMES, lo, hi, samples) for q, (lo, hi) in ranges.items()} for t in tables]

    ks = {"first": 1, "mid": n // 3, "last": n, "near": n - 2}
    found = kth_smallest(ks, run_pass)
    assert found == {q: reference(tables, k) for q, k in ks.items()}
    # Each pass narrows a range by about samples / 2: log(n) / log(samples / 2) passes, plus the exact one.
    assert len(passes) <= int(np.ceil(np.log(n) / np.log(samples / 2))) + 2
    # The threshold picks exactly k rows.
    for q, k in ks.items():
        assert sum(int(at_or_below(t, NAMES, found[q]).sum()) for t in tables) == k


def test_a_summary_holds_at_most_its_samples_and_counts_the_rest():
    [table] = shards(1000, 1)
    s = summarize(table, NAMES, None, None, samples=10)
    assert s.count == 1000 and s.below == 0 and len(s.keys) == 10 and not s.exact
    assert s.positions[-1] == 999 and s.keys == sorted(s.keys)
    lo = s.keys[4]
    t = summarize(table, NAMES, lo, None, samples=2000)
    assert t.below == s.positions[4] + 1 and t.exact and t.count == 1000 - t.below


def test_out_of_range_rank_and_limits():
    [table] = shards(10, 1)
    with pytest.raises(ValueError, match="outside"):
        kth_smallest({"q": 11}, lambda r: [{q: summarize(table, NAMES, *b) for q, b in r.items()}])
    assert at_or_below(table, NAMES, "all").all() and not at_or_below(table, NAMES, None).any()
    assert order_stats.SAMPLES >= 64
