"""A stage's metrics as TensorBoard event files in its own folder (local or ``s3://``).

Each stage writes into its output folder, so ``tensorboard --logdir <run.output_dir>`` shows one TensorBoard
run per stage (``pretrain``, ``round=0``, ``round=1``, ...) and the run folder's own file holds the per-round
summary; the same tags (``loss``, ``val_accuracy``, ...) overlay across rounds. Event files are written with
tensorboardX's record writer (a Ray Tune dependency, so nothing to install); reading them needs ``pip install tensorboard``.

Remote folders: tensorboardX writes into a local temporary folder and every ``log`` call copies the (small,
append-only) file up, so curves appear while a stage runs. A process that restarts (a restored Ray Train
worker) opens a new file beside the old one; TensorBoard reads both.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raysemi.core.io import filesystem, is_remote


class EventLog:
    """Scalars of one stage, written as TensorBoard events under ``uri``."""

    def __init__(self, uri: str, suffix: str = "") -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self.uri = uri
        self._tmp = tempfile.mkdtemp(prefix="raysemi-events-") if is_remote(uri) else None
        local = self._tmp or uri
        Path(local).mkdir(parents=True, exist_ok=True)
        # The synchronous record writer, not SummaryWriter: the latter queues events to a thread and its flush
        # does not wait for them, so a file copied up (or read) after a flush could miss the last epoch.
        # The suffix keeps apart files that several writers open in one folder within the same second.
        self._writer = EventsWriter(str(Path(local) / "events"), suffix)

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Every finite number in ``metrics`` as a scalar at ``step`` (bools and other values are skipped)."""
        from tensorboardX.proto import event_pb2, summary_pb2

        values = [
            summary_pb2.Summary.Value(tag=f"{prefix}{key}", simple_value=float(value))
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ]
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        self._writer.write_event(event)
        self._writer.flush()
        if self._tmp is not None:
            self._upload()

    def _upload(self) -> None:
        fs, path = filesystem(self.uri)
        for f in Path(self._tmp).iterdir():
            fs.put_file(str(f), f"{path.rstrip('/')}/{f.name}")

    def close(self) -> None:
        self._writer.close()
        if self._tmp is not None:
            self._upload()
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def event_files(uri: str) -> list[str]:
    """The event files directly under ``uri`` (full paths in its filesystem), oldest name first."""
    fs, path = filesystem(uri)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.rsplit("/", 1)[-1].startswith("events.out.tfevents"))


def copy_events(src_uri: str, dst_uri: str) -> None:
    """Copy the event files under ``src_uri`` to ``dst_uri`` (a pretraining shared through the cache keeps its
    curves in the cache entry; each run that uses it shows them as its own)."""
    src_fs, _ = filesystem(src_uri)
    dst_fs, dst = filesystem(dst_uri)
    dst_fs.makedirs(dst, exist_ok=True)
    for name in event_files(src_uri):
        with src_fs.open(name, "rb") as fh:
            data = fh.read()
        with dst_fs.open(f"{dst.rstrip('/')}/{name.rsplit('/', 1)[-1]}", "wb") as out:
            out.write(data)


def clear_events(uri: str) -> None:
    """Remove the event files under ``uri`` (a stage started afresh must not inherit an earlier run's curves)."""
    fs, _ = filesystem(uri)
    for name in event_files(uri):
        fs.rm(name)


def read_scalars(uri: str) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` from every event file under ``uri`` (tests, and a quick look without
    TensorBoard). Reads the TFRecord framing directly: 8-byte length, 4-byte CRC, record, 4-byte CRC."""
    import struct

    from tensorboardX.proto import event_pb2

    fs, _ = filesystem(uri)
    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in event_files(uri):
        with fs.open(name, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return scalars
