"""Pseudo-labeling: a pool of Ray actors predicts every input shard once, committed per shard.

Each actor loads the classifier once (on its GPU when it has one, else the CPU) and then predicts one
whole input shard per task, in batches of ``pseudolabel.batch_size``, decoding with the eval transform of
the model's own config (its image size and normalisation). The actor writes the prediction shard itself
(the bytes never pass through the driver)::

    <out_uri>/part-NNNNN.parquet       id, pred (int16), confidence (float32), probs (list<float32>)
    <out_uri>/part-NNNNN.commit.json   {"model_sha256", "rows", "input", "input_sha256", "written"}, written last

``NNNNN`` is the input shard's index in the list given, so names are stable across runs. A shard counts as
done only when its marker names the same model file (sha256) and input (URI and content sha256) and its
Parquet file holds that many rows; a re-run computes only the others (the protocol: ``stages.commits``). The driver keeps one task
in flight per actor; when an actor dies (a node lost, an OOM kill) Ray restarts it and re-runs its shard
(an actor that died after its commit has its shard redone: the same file, rewritten, never a second one).
At the end every input row's id must appear in exactly one prediction row, or ``RaysemiError`` says why.

Every row of every input shard gets a prediction (the few labeled rows too: it is cheap), so the
caller filters the pool (null labels plus labels held back) when choosing pseudo-labels with
``stages.pool.select`` (the rule of ``stages.selection``, applied shard by shard).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from raysemi.core import console
from raysemi.core import io as rio
from raysemi.core.config import Config
from raysemi.core.errors import RaysemiError
from raysemi.distributed import ray_session, ray_utils
from raysemi.stages.commits import pending_shards, remove_stale, verify_exactly_once
from raysemi.stages.predictor import STAGE, ShardPredictor, model_classes

log = logging.getLogger("raysemi.pseudolabel")

MAX_ATTEMPTS = 3  # lives of an actor (its first process + 2 restarts) before the pool gives up on it
TASK_ATTEMPTS = 3  # tries of a shard whose task raised (a passing S3 error) before the run fails


@dataclass(frozen=True)
class PredictionResult:
    out_uri: str
    model_sha256: str
    shards_total: int
    shards_computed: int
    shards_skipped: int
    rows: int  # prediction rows under out_uri (= input rows: checked)
    images_per_s: float  # rows computed / seconds from all actors ready to the last shard committed
    seconds: float  # the whole call: checks, actor start-up, inference, verification
    actor_restarts: int


# ---------------------------------------------------------------- the pool (driver side)


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


class PredictorPool:
    """``num_actors`` predictor actors and a driver loop with one task in flight per actor.

    Ray restarts an actor whose process dies (``max_restarts``) and re-runs its in-flight task on the new
    process (``max_task_retries``); that is safe because ``commit`` is idempotent. The driver only sees an
    actor error once Ray has given up on it. The task retries are unbounded (-1: until the actor has used
    up its ``max_restarts``): when a whole node vanishes, every call to its actor fails at once ("actor
    temporarily unavailable") for the seconds until Ray declares the node dead, and a bounded count (it was
    2) was spent there, failing the run with the actor restarted only once (seen on the multi-node test
    cluster). Restarts are counted from the process ids the tasks report.

    A task that raises (its actor alive: a passing S3 error, a node's disk hiccup) is resubmitted by the
    driver, at the back of the queue, up to ``TASK_ATTEMPTS`` tries per shard; only then does the run fail,
    in one line. (Ray's own ``retry_exceptions`` would follow the unbounded ``max_task_retries`` above.)"""

    def __init__(
        self, model_uri: str, model_sha256: str, cfg: Config, num_actors: int, predictor: type = ShardPredictor
    ) -> None:
        import ray

        pl = cfg.pseudolabel
        self._remote = ray.remote(predictor).options(
            num_cpus=pl.cpus_per_actor, num_gpus=pl.gpus_per_actor,
            max_restarts=MAX_ATTEMPTS - 1, max_task_retries=-1, **ray_utils.actor_scheduling(cfg.ray),
        )
        self.cfg = cfg
        args = (model_uri, cfg, model_sha256, max(1, round(pl.cpus_per_actor)))
        self.actors = [self._remote.remote(*args) for _ in range(num_actors)]
        self._pids: list[set[int]] = [set() for _ in range(num_actors)]
        self.task_retries = 0  # tasks resubmitted after they raised

    @property
    def restarts(self) -> int:
        """Actor processes replaced so far (each new process id of a slot after its first)."""
        return sum(max(len(p) - 1, 0) for p in self._pids)

    def wait_ready(self, patience_s: float = 60.0) -> list[str]:
        """Block until every actor has loaded the model (start-up kept out of the throughput figure).
        Says so once when the actors still wait for resources (e.g. GPUs the cluster lacks) after a minute."""
        import ray

        refs = [a.ready.remote() for a in self.actors]
        if patience_s and ray.wait(refs, num_returns=len(refs), timeout=patience_s)[1]:
            pl = self.cfg.pseudolabel
            log.warning(
                "pseudolabel actors not started after %.0f s: each needs %s CPU and %s GPU; still waiting",
                patience_s, pl.cpus_per_actor, pl.gpus_per_actor,
            )
        devices = []
        for slot, ref in enumerate(refs):
            try:
                device, pid = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if getattr(err, "actor_init_failed", False):
                    raise RaysemiError(f"a pseudolabel actor could not load the model: {_last_line(err)}") from None
                raise RaysemiError(f"a pseudolabel actor keeps dying at start: {_last_line(err)}") from None
            self._pids[slot].add(pid)
            devices.append(device)
        return devices

    def run(self, tasks: list[tuple], out_uri: str, progress: bool = True) -> int:
        """Predict and commit ``(index, input uri, rows[, input sha256])`` tasks; returns the rows computed."""
        import ray
        queue = deque(tasks)
        inflight: dict = {}  # ObjectRef -> (slot, task)
        done_rows = done_shards = 0
        failures: dict[int, int] = {}  # shard index -> tasks of it that raised
        bar = console.progress(sum(t[2] for t in tasks), STAGE, unit="img", enabled=progress)
        bar.set_postfix_str(f"shards 0/{len(tasks)}")

        def submit(slot: int) -> None:
            if queue:
                task = queue.popleft()
                inflight[self.actors[slot].run.remote(task[0], task[1], out_uri, *task[2:])] = (slot, task)

        try:
            for slot in range(len(self.actors)):
                submit(slot)
            while inflight:
                [ref], _ = ray.wait(list(inflight), num_returns=1)
                slot, task = inflight.pop(ref)
                try:
                    rows, pid = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    raise RaysemiError(
                        f"giving up on {task[1]}: its actor died {MAX_ATTEMPTS} times ({_last_line(err)})"
                    ) from None
                except ray.exceptions.RayTaskError as err:
                    failures[task[0]] = failures.get(task[0], 0) + 1
                    if failures[task[0]] >= TASK_ATTEMPTS:
                        raise RaysemiError(
                            f"predicting {task[1]} failed {TASK_ATTEMPTS} times: {_last_line(err)}"
                        ) from None
                    log.warning("predicting %s failed (try %d of %d), retrying it: %s", task[1], failures[task[0]],
                                TASK_ATTEMPTS, _last_line(err))
                    self.task_retries += 1
                    queue.append(task)  # commit is idempotent: a retry rewrites the same two files
                    submit(slot)
                    continue
                self._pids[slot].add(pid)
                done_rows += rows
                done_shards += 1
                bar.update(rows)
                bar.set_postfix_str(f"shards {done_shards}/{len(tasks)}")
                submit(slot)
        finally:
            bar.close()
        return done_rows

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


# ---------------------------------------------------------------- entry point


def predict_shards(
    model_uri: str, shard_uris: list[str], out_uri: str, cfg: Config, *, progress: bool = True,
    predictor: type = ShardPredictor, input_sha256: list[str] | None = None, input_rows: list[int] | None = None,
) -> PredictionResult:
    """Predict every row of ``shard_uris`` with the classifier at ``model_uri`` into ``out_uri``.

    Shards already committed for the same model file are skipped; the rest go to a pool of
    ``pseudolabel.num_actors`` actors of class ``predictor`` (a ``ShardPredictor``). Ends with the exactly-once check (``RaysemiError`` if violated).
    ``input_sha256`` and ``input_rows``: the inputs' content hashes and row counts when the caller knows them (a
    dataset manifest's); else each input is hashed here (and by its actor) and its footer read. A shard
    committed from other content (swapped, re-ingested) is recomputed.
    """
    t0 = time.perf_counter()
    if not shard_uris:
        raise RaysemiError("pseudolabel: no input shards to predict")
    model_classes(model_uri)
    model_sha = rio.file_sha256(model_uri)
    try:
        rows = list(input_rows) if input_rows is not None else [rio.parquet_rows(u) for u in shard_uris]
        if input_sha256 is None:
            input_sha256 = [rio.file_sha256(u) for u in shard_uris]
    except FileNotFoundError as err:
        raise RaysemiError(f"pseudolabel: input shard missing ({err})") from None
    remove_stale(out_uri, len(shard_uris))
    hashes = {i: h for i, h in enumerate(input_sha256)}
    todo = [(*t, hashes[t[0]]) for t in pending_shards(out_uri, list(shard_uris), rows, model_sha, list(input_sha256))]
    skipped = len(shard_uris) - len(todo)
    if skipped:
        log.info("%d of %d shards already predicted by this model: skipped", skipped, len(shard_uris))

    computed_rows, restarts, run_s = 0, 0, 0.0
    if todo:
        ray_session.init_ray(cfg.ray.address)
        pool = PredictorPool(
            model_uri, model_sha, cfg, min(cfg.pseudolabel.num_actors, len(todo)), predictor
        )
        try:
            devices = pool.wait_ready()
            log.info("%d pseudolabel actors ready on %s", len(devices), ", ".join(sorted(set(devices))))
            t_run = time.perf_counter()
            computed_rows = pool.run(todo, out_uri, progress)
            run_s = time.perf_counter() - t_run
            restarts = pool.restarts
        finally:
            pool.shutdown()

    total = verify_exactly_once(out_uri, list(shard_uris), rows)
    result = PredictionResult(
        out_uri=out_uri,
        model_sha256=model_sha,
        shards_total=len(shard_uris),
        shards_computed=len(todo),
        shards_skipped=skipped,
        rows=total,
        images_per_s=computed_rows / run_s if run_s > 0 else 0.0,
        seconds=time.perf_counter() - t0,
        actor_restarts=restarts,
    )
    log.info(
        "pseudolabel: %d shards (%d computed, %d skipped), %d predictions, each input id exactly once; "
        "%.1f images/s, %d actor restarts, %.1f s",
        result.shards_total, result.shards_computed, result.shards_skipped, result.rows,
        result.images_per_s, result.actor_restarts, result.seconds,
    )
    return result
