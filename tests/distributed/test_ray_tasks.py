"""``ray_tasks.map_tasks``: results in order; a task's RaysemiError as it was, any other error in one line."""

from __future__ import annotations

import pytest

from raysemi.core.errors import RaysemiError
from raysemi.distributed.ray_tasks import map_tasks, task_mapper


def square_or_fail(x: int) -> int:
    if x == -1:
        raise RaysemiError("shard 7 is not what the manifest says")
    if x == -2:
        raise ValueError("line one\nthe last line says why")
    return x * x


@pytest.mark.ray
def test_results_in_order_and_errors_in_one_line(ray_session):
    assert task_mapper()(square_or_fail, [(i,) for i in range(20)]) == [i * i for i in range(20)]
    with pytest.raises(RaysemiError, match="^shard 7 is not what the manifest says$"):
        map_tasks(square_or_fail, [(1,), (-1,)])
    with pytest.raises(RaysemiError, match="^square_or_fail failed: .*the last line says why$") as err:
        map_tasks(square_or_fail, [(-2,)])
    assert "\n" not in str(err.value)
