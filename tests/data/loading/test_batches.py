"""``in_background``: a stream produced ahead by a thread of its own (the fine-tuning loader's prefetch)."""

from __future__ import annotations

import threading
import time

import pytest

from raysemi.data.loading.batches import in_background


def test_items_arrive_in_order_and_all_of_them():
    assert list(in_background(iter(range(100)), depth=3)) == list(range(100))
    assert list(in_background([])) == []


def test_production_starts_before_the_first_request_and_stays_depth_ahead():
    produced: list[int] = []

    def source():
        for i in range(10):
            produced.append(i)
            yield i

    stream = in_background(source(), depth=2)
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # Two items queued and a third one made, waiting for room: the thread never runs further ahead.
    assert produced == [0, 1, 2]
    assert next(stream) == 0
    stream.close()


def test_every_call_into_the_source_happens_on_one_thread():
    threads = set()

    def source():
        for i in range(5):
            threads.add(threading.get_ident())
            yield i

    assert list(in_background(source())) == [0, 1, 2, 3, 4]
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_an_error_in_the_source_is_raised_to_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("corrupt shard")

    stream = in_background(source())
    assert next(stream) == 1 and next(stream) == 2
    with pytest.raises(ValueError, match="corrupt shard"):
        next(stream)


def test_closing_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    stream = in_background(source(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert closed.wait(5)
    assert not any(t.name == "raysemi-prefetch" and t.is_alive() for t in threading.enumerate())
