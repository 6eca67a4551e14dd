"""One model, many shards: ``ShardPredictor`` loads the classifier once and predicts (and commits) whole shards.

It decodes with the eval transform of the model's own config (its image size and normalisation), on its
GPU when it has one, else the CPU. It is a Ray actor in ``PredictorPool`` or a plain object in one process.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import torch

from raysemi.core import io as rio
from raysemi.core.config import Config
from raysemi.core.errors import RaysemiError
from raysemi.data.shards import read_shard
from raysemi.distributed import ray_utils
from raysemi.ml.compute import Compute, compute_for
from raysemi.stages.commits import PRED_SCHEMA, commit

STAGE = "pseudolabel"


def model_classes(model_uri: str) -> list[str]:
    """The class names in a classifier file's safetensors header: a cheap check, in the driver, that the
    file is a raysemi classifier before any actor starts (the header only; no tensors read)."""
    if not rio.exists(model_uri):
        raise RaysemiError(f"pseudolabel: model {model_uri} does not exist")
    try:
        meta = rio.weights_metadata(model_uri)
    except rio.CheckpointError:
        meta = {}
    if "classes" not in meta or "config" not in meta:
        raise RaysemiError(f"pseudolabel: {model_uri} is not a raysemi classifier (safetensors with classes/config)")
    return list(json.loads(meta["classes"]))


def predict_batch(model: torch.nn.Module, images: torch.Tensor, compute: Compute) -> tuple[torch.Tensor, ...]:
    """``pred, confidence, probs`` on the CPU for one batch, in ``compute``'s precision and layout."""
    with torch.inference_mode(), compute.autocast():
        logits = model(compute.images(images))
    probs = logits.float().softmax(dim=1).cpu()
    conf, pred = probs.max(dim=1)
    return pred, conf, probs


class ShardPredictor:
    """Loads the classifier once, then predicts whole shards. A Ray actor in the pool
    (``ray.remote(ShardPredictor)``), or a plain object in one process (the benchmark's baseline)."""

    def __init__(
        self, model_uri: str, cfg: Config, model_sha256: str, num_threads: int = 1) -> None:
        from raysemi.models.checkpoint import load_classifier

        torch.set_num_threads(max(1, num_threads))
        self.device = ray_utils.get_device()
        self.model, self.model_cfg, self.classes = load_classifier(model_uri, self.device)
        self.compute = compute_for(self.device, cfg.finetune.precision, cfg.finetune.channels_last)
        self.compute.model(self.model).eval()
        self.cfg, self.model_sha256 = cfg, model_sha256

    def ready(self) -> tuple[str, int]:
        """One forward pass on a zero batch (kernel selection, allocations), then the device's name and this
        process's id (the pool counts actor restarts by it)."""
        size = self.model_cfg.data.image_size
        zeros = torch.zeros(min(self.cfg.pseudolabel.batch_size, 8), 3, size, size, device=self.device)
        predict_batch(self.model, zeros, self.compute)
        return str(self.device), os.getpid()

    def predict_table(self, shard_uri: str) -> pa.Table:
        """Predictions for every row of one input shard, in the shard's row order."""
        from raysemi.data.loading.loader import build_loader, resolve_backend

        backend = resolve_backend(self.cfg.data.loader)
        # On the CPU the model already uses the actor's cores: torch decode workers would only compete
        # with it (and fork per shard), so decoding stays in the actor's thread there.
        threads = 0 if backend == "torch" and self.device.type == "cpu" else self.cfg.data.num_threads
        loader = build_loader(
            [shard_uri], mode="eval", size=self.model_cfg.data.image_size, batch_size=self.cfg.pseudolabel.batch_size,
            augment=self.model_cfg.augment, backend=backend, device=self.device, num_threads=threads,
        )
        ids: list[str] = []
        preds, confs, probs = [], [], []
        for batch in loader:
            p, c, pr = predict_batch(self.model, batch["image"], self.compute)
            ids.extend(batch["id"])
            preds.append(p)
            confs.append(c)
            probs.append(pr)
        return predictions_table(ids, preds, confs, probs, len(self.classes))

    def run(self, index: int, shard_uri: str, out_uri: str, rows: int,
            input_sha256: str | None = None) -> tuple[int, int]:
        """Predict input shard ``index`` and commit it under ``out_uri``, its exactly-once check first (the
        predictions' ids against the input's); returns the row count and this process's id. The marker
        records the sha256 of the input's content: the manifest's when given, else hashed here."""
        input_sha256 = input_sha256 or rio.file_sha256(shard_uri)
        table = self.predict_table(shard_uri)
        if table.num_rows != rows:
            raise RuntimeError(f"the loader gave {table.num_rows} rows of {shard_uri}, which holds {rows}")
        commit(out_uri, index, shard_uri, table, self.model_sha256, input_sha256,
               input_ids=read_shard(shard_uri, ["id"]).column("id"))
        return table.num_rows, os.getpid()


def predictions_table(ids, preds, confs, probs, num_classes: int) -> pa.Table:
    if not ids:
        return PRED_SCHEMA.empty_table()
    p = torch.cat(probs).numpy()
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "pred": pa.array(torch.cat(preds).numpy().astype("int16")),
            "confidence": pa.array(torch.cat(confs).numpy()),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(p.reshape(-1)), num_classes).cast(
                pa.list_(pa.float32())
            ),
        },
        schema=PRED_SCHEMA,
    )
