"""What a run prints: one line per epoch (or evaluation interval) of each stage, and progress of long loops.

A stage line reads the same for pretraining and fine-tuning::

    pretrain  epoch 3/25   loss 0.4123  knn 0.512  812 img/s  wait 4%  elapsed 1m02s  ETA 7m10s

Progress of loops over many items (ingest, pseudo-labelling) is a tqdm bar on a terminal and, where stderr
is not one (Ray job logs, CI, a file), a plain line every tenth of the work or every 30 s, so that a log
file never fills with carriage-return frames. No ML here and no Ray: the stages call it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("raysemi")

# (metric key, label, format): what a stage line shows when the metric is there.
SHOWN = (
    ("loss", "loss", "{:.4f}"),
    ("train_accuracy", "train acc", "{:.3f}"),
    ("knn_accuracy", "knn", "{:.3f}"),
    ("val_accuracy", "val acc", "{:.3f}"),
    ("images_per_s_total", "", "{:.0f} img/s"),
    ("data_wait_fraction", "wait", "{:.0%}"),
)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short enough for a status line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def stage_line(stage: str, unit: str, done: int, total: int, metrics: Mapping[str, Any], elapsed_s: float,
               done_at_start: int = 0) -> str:
    """One status line after ``done`` of ``total`` units (epochs, steps) of ``stage``.

    ``elapsed_s`` is the time since this process started at ``done_at_start`` units (a worker restored from a
    checkpoint starts part-way): the ETA extrapolates from the units this process ran, not from zero."""
    width = len(str(total))
    parts = [f"{stage:<9} {unit} {done:>{width}}/{total}"]
    for key, label, fmt in SHOWN:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {fmt.format(value)}".strip())
    parts.append(f"elapsed {duration(elapsed_s)}")
    ran = done - done_at_start
    if ran > 0 and done < total:
        parts.append(f"ETA {duration(elapsed_s / ran * (total - done))}")
    return "  ".join(parts)


class StageClock:
    """Wall time of one stage in one process, for ``stage_line``'s elapsed time and ETA."""

    def __init__(self, stage: str, unit: str, total: int, done_at_start: int = 0) -> None:
        self.stage, self.unit, self.total, self.done_at_start = stage, unit, total, done_at_start
        self.t0 = time.monotonic()

    def line(self, done: int, metrics: Mapping[str, Any]) -> str:
        return stage_line(self.stage, self.unit, done, self.total, metrics, time.monotonic() - self.t0,
                          self.done_at_start)


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class PlainProgress:
    """tqdm's ``update`` / ``set_postfix_str`` / ``close`` as plain log lines: one every ``step`` of the
    total (a tenth by default) but not within ``min_interval_s`` of the previous one, at least one every
    ``every_s`` seconds, and one at the end (a loop of a few seconds prints only that one)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", step: float = 0.1, every_s: float = 30.0,
                 min_interval_s: float = 5.0) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.postfix = 0, ""
        self._next = max(1, math.ceil(total * step)) if total else 1
        self._step, self._every_s, self._min_interval_s = self._next, every_s, min_interval_s
        self._t0 = self._last = time.monotonic()
        self._closed = False

    def _emit(self) -> None:
        elapsed = time.monotonic() - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        post = f"  {self.postfix}" if self.postfix else ""
        log.info("%s: %d/%s %s%s  %.1f %s/s  elapsed %s%s", self.desc, self.n, self.total or "?", self.unit, pct,
                 rate, self.unit, duration(elapsed), post)
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        since = time.monotonic() - self._last
        if (self.n >= self._next and since >= self._min_interval_s) or since >= self._every_s:
            while self._next <= self.n:
                self._next += self._step
            if self.total is None or self.n < self.total:
                self._emit()

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True):
    """A progress reporter for ``total`` items: tqdm on a terminal, ``PlainProgress`` lines otherwise, and a
    silent tqdm when ``enabled`` is false."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if is_terminal():
        return tqdm(total=total, desc=desc, unit=unit, smoothing=0.2, dynamic_ncols=True)
    return PlainProgress(total, desc, unit)


# ---------------------------------------------------------------- verbosity

_verbose = False

# Libraries whose INFO lines no user can act on, kept off the console like Ray's notices: botocore says
# "Found endpoint for s3 via: environment_global." before every command when AWS_ENDPOINT_URL is set (MinIO
# and other S3-compatible stores); matplotlib announces its font cache. ``--verbose`` shows them.
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "matplotlib")


def quiet_libraries() -> None:
    """Only warnings and errors from the libraries in ``QUIET_LOGGERS``."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def set_verbose(on: bool) -> None:
    """``--verbose``: Ray's own per-rank report lines and start-up notices come back (see ``ray_utils``)."""
    global _verbose
    _verbose = on


def verbose() -> bool:
    return _verbose
