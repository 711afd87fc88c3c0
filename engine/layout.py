"""Channels-last or not: measured on the machine at hand, once, then remembered.

NHWC activations (``torch.channels_last``) make oneDNN's convolutions faster on CPUs with AVX-512 and cuDNN's on
GPUs with tensor cores, but not everywhere: on an AVX2-only CPU (a 2-core AMD EPYC, torch 2.14) a forward and
backward took 25.8 s NHWC against 18.1 s NCHW for SSD300 (batch 8) and 12.7 s against 10.5 s for RetinaNet
R50-FPN (640 px, batch 2). A layout fixed to the machine it was tuned on loses on the other, so
``model.channels_last=auto`` times one training step's forward and backward in each layout, on the run's own
samples at its largest input, and keeps the faster. The answer is cached per machine (CPU model and ISA, or GPU
name), thread count, torch version, model config and probe input in ``memory_format.json`` under
``$DETECTORS_CACHE_DIR`` (default ``~/.cache/detectors``): a later run with the same key pays nothing. The probe
leaves the model's weights, BatchNorm statistics and random streams as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.data import Dataset

from engine.detection_module import DetectionModule
from engine.machine import cpu_model
from engine.memory import largest_input, on_device, probe_batch, training_step, untouched

log = logging.getLogger(__name__)
PROBE_PIXELS = 2 * 512 * 512  # the probe batch: at most this many input pixels (and at most the run's batch)
REPEATS = 2  # timed steps per layout at most, interleaved, after one untimed warm-up step each
SETTLED = (0.05, 0.20)  # after a timed round, a difference under 5 % (a tie) or over 20 % needs no other round


def cache_file() -> Path:
    """$DETECTORS_CACHE_DIR/memory_format.json, by default under $XDG_CACHE_HOME (~/.cache)/detectors."""
    base = os.environ.get("DETECTORS_CACHE_DIR")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "detectors"
    return Path(base) / "memory_format.json"


def machine(device: torch.device) -> str:
    """What the timing depends on besides the model: the chip, its instruction set as torch uses it, threads."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    parts = [
        "cpu",
        cpu_model(),
        torch.backends.cpu.get_cpu_capability(),
        os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        f"threads={torch.get_num_threads()}",
    ]
    return " ".join(p for p in parts if p)


def cache_key(device: torch.device, model_config: object, shape: tuple[int, int], batch_size: int) -> str:
    config = hashlib.sha256(json.dumps(model_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{machine(device)} | torch {torch.__version__} | model {config} | {batch_size}x{shape[0]}x{shape[1]}"


def time_layouts(
    model: nn.Module,
    batch: object,
    set_layout: Callable[[bool], None],
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[bool, float]:
    """Median seconds of a training step's forward and backward with channels-last off (False) and on (True),
    the layouts taking turns so that a machine slowing down mid-probe slows both; up to ``repeats`` timed rounds,
    fewer where the first already settles it (``SETTLED``: a tie, where either layout will do, or a clear gap)."""
    seconds: dict[bool, list[float]] = {False: [], True: []}
    with untouched(model):
        for round_ in range(repeats + 1):
            for layout in (False, True):
                set_layout(layout)
                start = clock()
                training_step(model, batch, autocast)
                if batch.images.device.type == "cuda":
                    torch.cuda.synchronize(batch.images.device)
                if round_ > 0:  # the first round warms up each layout (oneDNN primitives, allocator)
                    seconds[layout].append(clock() - start)
            if round_ > 0:
                gap = abs(statistics.median(seconds[True]) / statistics.median(seconds[False]) - 1)
                if gap < SETTLED[0] or gap > SETTLED[1]:
                    break
    return {layout: statistics.median(times) for layout, times in seconds.items()}


def choose_channels_last(
    model: nn.Module,
    dataset: Dataset,
    transform: object,
    size_divisible: int,
    batch_size: int,
    device: torch.device,
    model_config: object,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    cache: Path | None = None,
) -> bool:
    """Whether ``model`` (a ``DenseDetector``) trains faster channels-last here; measured or cached.
    The model is left in the chosen layout."""
    shape = largest_input(transform, dataset, size_divisible)
    images = max(1, min(batch_size, PROBE_PIXELS // (shape[0] * shape[1])))
    key = cache_key(device, model_config, shape, images)
    cache = cache or cache_file()
    known = _read(cache)
    if key in known:
        choice = bool(known[key]["channels_last"])
        log.info("model.channels_last=auto: %s (measured before on this machine: %s)", choice, cache)
        model.use_channels_last(choice)
        return choice
    start = time.perf_counter()
    with untouched(model):  # the samples' augmentation draws from the global generators: restored after
        batch = probe_batch(dataset, images, shape)
    with on_device(model, device):  # at Lightning's setup the model is still where it was built
        seconds = time_layouts(model, move_data_to_device(batch, device), model.use_channels_last, autocast)
    choice = seconds[True] < seconds[False]
    model.use_channels_last(choice)
    log.info(
        "model.channels_last=auto: %s — a step of %d image(s) at %dx%d took %.3f s channels-last, %.3f s NCHW "
        "(probe %.1f s; cached in %s)",
        choice,
        images,
        *shape,
        seconds[True],
        seconds[False],
        time.perf_counter() - start,
        cache,
    )
    known[key] = {
        "channels_last": choice,
        "seconds_channels_last": round(seconds[True], 5),
        "seconds_nchw": round(seconds[False], 5),
    }
    _write(cache, known)
    return choice


class ChannelsLastAuto(L.Callback):
    """``model.channels_last=auto`` in ``train.py``: at setup, once the processes are up and before DDP wraps the
    model, global rank 0 measures (or reads its cache) and every rank takes its answer. Ranks that chose apart
    would hold parameters of different strides, which DDP refuses; a tie measured twice can fall either way."""

    def __init__(self, batch_size: int, model_config: object) -> None:
        self.batch_size = batch_size
        self.model_config = model_config

    def setup(self, trainer: L.Trainer, pl_module: DetectionModule, stage: str) -> None:
        if stage != "fit" or not pl_module.channels_last_auto:
            return
        choice = None
        if trainer.is_global_zero:
            data = trainer.datamodule  # set up for "fit" by Lightning before the callbacks
            choice = choose_channels_last(
                pl_module.net,
                data.train_set,
                data.train_transform,
                data.size_divisible,
                self.batch_size,
                trainer.strategy.root_device,
                self.model_config,
                autocast=trainer.precision_plugin.forward_context,
            )
        pl_module.net.use_channels_last(bool(trainer.strategy.broadcast(choice, src=0)))


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_text(json.dumps(data, indent=1, sort_keys=True))
        part.replace(path)  # atomic: two runs starting together never leave a half-written file
    except OSError as e:
        log.warning(
            "model.channels_last=auto: could not cache the choice in %s (%s); it is measured again next run", path, e
        )
