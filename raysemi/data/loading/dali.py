"""The augmentation recipe of ``raysemi.data.loading.augment`` as NVIDIA DALI pipelines.

A pipeline is fed batches of encoded image bytes by ``fn.external_source`` (a Python callback), decodes
them once with ``fn.decoders.image`` (device ``"mixed"`` on a GPU: nvJPEG / the hardware decoder; ``"cpu"``
without one) and then runs two augmented branches (mode ``"byol"``), one light training branch
(``"train"``) or a deterministic eval branch (``"eval"``). Every branch ends in
``fn.crop_mirror_normalize``: float32, CHW, normalised with the config's mean/std (flip folded in).

Per-sample random parameters (``fn.random.*``) make the two views differ. Blur and solarize are applied
with DALI's conditional execution (``if`` on a per-sample coin), so only the chosen samples pay for them.
Colour jitter and greyscale are one ``fn.color_twist`` whose factors are blended to the identity when the
coin says no (greyscale = saturation 0, which gives the same luma weights as torchvision's Grayscale).

Known differences from the torchvision reference (same distributions, not bit-identical):
- ``color_twist`` applies brightness, contrast, saturation and hue in a fixed order (torchvision draws a
  random order) and centres contrast on mid-grey (128), where torchvision centres on the image's mean.
- Resampling (``random_resized_crop``, ``resize``; linear, antialiased) differs slightly from PIL's
  (eval: at most a few grey levels on smooth images; see tests/data/loading/test_dali.py).

DALI is imported only here (``dali_available`` / ``require_dali``), with an install hint when missing.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from raysemi.core.config import AugmentConfig
from raysemi.core.errors import RaysemiError
from raysemi.data.loading.augment import (
    BLUR_SIGMA,
    CROP_RATIO,
    RANDAUGMENT,
    SOLARIZE_THRESHOLD,
    blur_kernel_size,
)

Mode = Literal["byol", "train", "pair", "eval"]
INSTALL_HINT = "pip install nvidia-dali-cuda120"


class DaliUnavailable(RaysemiError):
    """The DALI loader was asked for but ``nvidia.dali`` does not import."""


def dali_available() -> bool:
    """True when ``nvidia.dali`` is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def require_dali():
    """Import and return ``nvidia.dali``, or raise with the install hint."""
    try:
        import nvidia.dali as dali
    except ImportError as err:
        raise DaliUnavailable(
            f"the DALI loader was requested but nvidia.dali does not import ({err}): {INSTALL_HINT}, "
            "or set data.loader=torch"
        ) from None
    return dali


# ---------------------------------------------------------------- the graph


def _coin(p: float):
    from nvidia.dali import fn, types

    return fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


def _factor(coin, strength: float):
    """A jitter factor ~ U(max(0, 1-s), 1+s) where ``coin`` is 1, exactly 1 where it is 0."""
    from nvidia.dali import fn

    u = fn.random.uniform(range=(max(0.0, 1.0 - strength), 1.0 + strength))
    return 1.0 + coin * (u - 1.0)


def _solarize_table() -> tuple[list[int], list[int]]:
    keys = list(range(256))
    return keys, [k if k < SOLARIZE_THRESHOLD else 255 - k for k in keys]


def _normalise(images, cfg: AugmentConfig, mirror=0):
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in cfg.mean],
        std=[255.0 * s for s in cfg.std],
        mirror=mirror,
    )


def _mirror(p: float):
    from nvidia.dali import fn

    return fn.random.coin_flip(probability=float(p)) if p > 0 else 0


def byol_view(images, cfg: AugmentConfig, size: int, blur_p: float, solarize_p: float):
    """One BYOL view of decoded HWC uint8 images (CPU or GPU): the graph of ``augment.byol_view``."""
    from nvidia.dali import fn, types

    v = fn.random_resized_crop(
        images, size=(size, size), random_area=list(cfg.crop_scale), random_aspect_ratio=list(CROP_RATIO),
        antialias=True,
    )
    if cfg.jitter_p > 0 or cfg.grey_p > 0:
        jit = fn.cast(_coin(cfg.jitter_p), dtype=types.FLOAT) if cfg.jitter_p > 0 else 0.0
        keep_colour = 1.0 - fn.cast(_coin(cfg.grey_p), dtype=types.FLOAT) if cfg.grey_p > 0 else 1.0
        kw: dict[str, Any] = {
            "brightness": _factor(jit, cfg.brightness) if cfg.brightness > 0 else 1.0,
            "contrast": _factor(jit, cfg.contrast) if cfg.contrast > 0 else 1.0,
            "saturation": (_factor(jit, cfg.saturation) if cfg.saturation > 0 else 1.0) * keep_colour,
        }
        if cfg.hue > 0:  # torchvision's hue is a fraction of the colour circle; DALI's is in degrees
            kw["hue"] = jit * fn.random.uniform(range=(-360.0 * cfg.hue, 360.0 * cfg.hue))
        v = fn.color_twist(v, **kw)
    if blur_p >= 1.0:
        v = _blur(v, size)
    elif blur_p > 0:
        v = _blur_sometimes(v, size, blur_p)
    if solarize_p > 0:
        v = _solarize_sometimes(v, solarize_p)
    return _normalise(v, cfg, mirror=_mirror(cfg.hflip_p))


def _blur(v, size: int):
    from nvidia.dali import fn

    return fn.gaussian_blur(v, window_size=blur_kernel_size(size), sigma=fn.random.uniform(range=BLUR_SIGMA))


def _blur_sometimes(v, size: int, p: float):
    # DALI conditional execution: only the samples whose coin is 1 go through the blur.
    if _coin(p):
        v = _blur(v, size)
    return v


def _solarize_sometimes(v, p: float):
    from nvidia.dali import fn, types

    keys, values = _solarize_table()
    if _coin(p):
        v = fn.lookup_table(v, keys=keys, values=values, dtype=types.UINT8)
    return v


def train_view(images, cfg: AugmentConfig, size: int):
    """Crop, the fine-tuning policy (DALI's own TrivialAugmentWide / RandAugment), flip, normalise:
    ``augment.train_transform`` (the same policies; the random draws differ between the libraries)."""
    from nvidia.dali import fn

    v = fn.random_resized_crop(
        images, size=(size, size), random_area=list(cfg.finetune_crop_scale),
        random_aspect_ratio=list(CROP_RATIO), antialias=True,
    )
    if cfg.finetune_policy == "trivialaugment":
        from nvidia.dali.auto_aug import trivial_augment

        v = trivial_augment.trivial_augment_wide(v, shape=(size, size))
    elif cfg.finetune_policy == "randaugment":
        from nvidia.dali.auto_aug import rand_augment

        v = rand_augment.rand_augment(v, n=RANDAUGMENT[0], m=RANDAUGMENT[1], shape=(size, size))
    return _normalise(v, cfg, mirror=_mirror(cfg.hflip_p))


def weak_view(images, cfg: AugmentConfig, size: int):
    """Resize to ``size x size``, flip, normalise: ``augment.weak_transform`` (FixMatch's weak view)."""
    from nvidia.dali import fn

    v = fn.resize(images, size=(float(size), float(size)), antialias=True)
    return _normalise(v, cfg, mirror=_mirror(cfg.hflip_p))


def eval_view(images, cfg: AugmentConfig, size: int):
    """Resize to ``size x size`` (linear, antialiased), normalise: ``augment.eval_transform``."""
    from nvidia.dali import fn

    v = fn.resize(images, size=(float(size), float(size)), antialias=True)
    return _normalise(v, cfg)


def _graph(source, mode: Mode, size: int, cfg: AugmentConfig, gpu: bool):
    from nvidia.dali import fn, types

    encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, name="encoded")
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    if mode == "byol":
        return (
            byol_view(images, cfg, size, cfg.blur_p[0], cfg.solarize_p[0]),
            byol_view(images, cfg, size, cfg.blur_p[1], cfg.solarize_p[1]),
        )
    if mode == "train":
        return (train_view(images, cfg, size),)
    if mode == "pair":  # one decode, FixMatch's weak and strong view of every image
        return weak_view(images, cfg, size), train_view(images, cfg, size)
    if mode == "eval":
        return (eval_view(images, cfg, size),)
    raise ValueError(f"unknown loader mode {mode!r}")


def build_pipeline(
    source,
    *,
    mode: Mode,
    size: int,
    augment: AugmentConfig,
    batch_size: int,
    num_threads: int = 2,
    seed: int = 0,
    device_id: int | None = None,
    prefetch_queue_depth: int = 2,
):
    """A built DALI pipeline for ``mode``; ``device_id=None`` runs everything on the CPU.

    ``source`` is called once per iteration and returns a list of 1-D uint8 arrays (at most
    ``batch_size``; a smaller last batch is fine) or raises ``StopIteration`` at the end of an epoch.
    """
    require_dali()
    from nvidia.dali import pipeline_def

    with warnings.catch_warnings():
        # DALI's own auto_aug policies call operators under their deprecated fn.experimental aliases: a
        # warning per worker and pipeline that no user can act on. DALI forces its filter to "default" around
        # the warning, so a filter cannot drop it; the display hook can (restored when the block ends).
        show = warnings.showwarning

        def _show(message, category, *args, **kwargs):
            if not (issubclass(category, DeprecationWarning) and "nvidia.dali.fn.experimental." in str(message)):
                show(message, category, *args, **kwargs)

        warnings.showwarning = _show
        pipe = pipeline_def(_graph, enable_conditionals=True)(
            source, mode, size, augment, device_id is not None,
            batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
            seed=int(seed) % (2**31 - 1), prefetch_queue_depth=prefetch_queue_depth,
        )
        pipe.build()
    return pipe


# ---------------------------------------------------------------- running it


class _Feed:
    """The external_source callback: pulls (encoded arrays, side data) pairs from the armed iterator and
    queues the side data (labels, ids, ...) in order, so it can be matched to the pipeline's outputs."""

    def __init__(self) -> None:
        self.items: Iterator[tuple[list[np.ndarray], Any]] = iter(())
        self.side: deque[Any] = deque()

    def arm(self, items: Iterable[tuple[list[np.ndarray], Any]]) -> None:
        self.items = iter(items)
        self.side.clear()

    def __call__(self):
        arrays, side = next(self.items)  # StopIteration ends DALI's epoch
        self.side.append(side)
        return arrays


def to_torch(tensor_list, device: torch.device, exec_dynamic: bool) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor on ``device``.

    With DALI's dynamic executor (the default since 2.0) outputs own their memory, so the tensor is shared
    zero-copy through DLPack (on the GPU on DALI's stream, synchronised by the DLPack protocol); otherwise
    it is copied on torch's current stream, as DALI's own PyTorch iterator does."""
    from nvidia.dali.backend import TensorGPU, TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    gpu = isinstance(tensor_list, TensorListGPU)
    dense = tensor_list.as_tensor()
    if exec_dynamic:
        if gpu:
            with torch.cuda.device(device):
                out = torch.from_dlpack(dense)
        else:
            out = torch.from_dlpack(dense)
        return out if out.device == device else out.to(device, non_blocking=True)
    target = device if gpu else torch.device("cpu")
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=target)
    if isinstance(dense, TensorGPU):
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device=target))
    else:
        feed_ndarray(dense, out)
    return out if out.device == device else out.to(device, non_blocking=True)


class DaliRunner:
    """One DALI pipeline, run over an iterable of batches per call to :meth:`run`.

    Each :meth:`run` is one DALI epoch: the feed is armed with the batches, the pipeline runs until the
    feed is exhausted, then it is reset. A run abandoned half way leaves batches in flight that a reset
    cannot drop (DALI ignores a reset before the source's StopIteration), so the next run rebuilds.
    """

    def __init__(
        self,
        *,
        mode: Mode,
        size: int,
        augment: AugmentConfig,
        batch_size: int,
        num_threads: int = 2,
        seed: int = 0,
        device: torch.device | None = None,
        prefetch_queue_depth: int = 2,
    ) -> None:
        require_dali()
        self.device = device if device is not None else torch.device("cpu")
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"the DALI loader runs on cpu or cuda devices, not {self.device}")
        self._kw = dict(
            mode=mode, size=size, augment=augment, batch_size=batch_size, num_threads=num_threads, seed=seed,
            device_id=self.device_id, prefetch_queue_depth=prefetch_queue_depth,
        )
        self.batch_size = batch_size
        self._feed = _Feed()
        self._pipe = None
        self._clean = False

    def _pipeline(self):
        if self._pipe is None or not self._clean:
            self._pipe = None  # free the old one (and its threads) first
            self._pipe = build_pipeline(self._feed, **self._kw)
        return self._pipe

    def run(self, batches: Iterable[tuple[list[np.ndarray], Any]]) -> Iterator[tuple[tuple[torch.Tensor, ...], Any]]:
        """Yield ``(outputs, side)`` per input batch, in order; ``outputs`` are torch tensors on the device."""
        self._feed.arm(batches)
        pipe = self._pipeline()
        self._clean = False
        exec_dynamic = bool(getattr(pipe, "exec_dynamic", False))
        while True:
            try:
                outs = pipe.run()
            except StopIteration:
                break
            side = self._feed.side.popleft()
            yield tuple(to_torch(o, self.device, exec_dynamic) for o in outs), side
        pipe.reset()
        self._clean = True
