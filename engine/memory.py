"""Will a training run fit in memory? An estimate before its first step, and the largest batch that fits.

The rule: need(B) = fixed + B × per_image, a line through the peak memory of two probe steps on real training
samples at the largest input the training transform can produce: batch 1 and batch 2, each a forward and backward
pass as training runs it (``DenseDetector.compute_losses`` + backward); plus what the probes do not hold: the
optimizer's state (Adam/AdamW: 2 tensors per parameter, SGD with momentum: 1) and the loader workers (their
prefetched uint8 batches and their own processes). Validation (no gradients) is probed the same way at its input.

Measured as peak resident memory, from the kernel: the OOM killer acts on resident memory, which holds what counting
tensors (``saved_tensors_hooks``) misses: gradients in flight during backward, oneDNN scratch buffers, the
assigner's temporaries, and free memory glibc keeps. Linux records the peak itself (VmHWM in /proc/self/status)
and resets it on request (``5`` into /proc/self/clear_refs): exact, and free of cost. Where that is refused, a
thread samples /proc/self/statm every millisecond instead. Peaks are absolute, not increments over the memory
before a step, so memory one probe freed and glibc kept, then reused by the next, is not counted twice.

The probe must never be what runs out of memory: a probe runs only if the line through what was measured before it
(all of the last increment taken as per-image: an over-estimate) says it fits, and an input over 512² pixels is
first probed at half its side. On CUDA (untested here: no GPU) the same probes run on the device and read
``torch.cuda.max_memory_reserved`` against ``torch.cuda.mem_get_info``.
"""

from __future__ import annotations

import ctypes
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from lightning.fabric.utilities.apply_func import move_data_to_device

from datamodules.transforms.resize import resize_sample
from detectors.batch import DetectionBatch, collate_detection

GiB = 2**30
# auto keeps 15 % of the memory at hand free: glibc's heap grows a few % over the steps after the probe (fragmentation),
# validation and Lightning hold some more, and other processes on the machine may grow after the snapshot
AUTO_MARGIN = 0.15
# a loader worker is a forked copy of this process: what Python's reference counting writes to (copy-on-write pages)
# and its own buffers, a few hundred MB; a rough figure, not measured per run
WORKER_BYTES = 256 * 2**20
GUARD_PIXELS = 512 * 512  # inputs larger than this are first probed at half their side


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) < 10 * GiB else f"{n / GiB:.1f} GiB"


# --- what there is -------------------------------------------------------------------------------------------------
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def cgroup_room() -> int | None:
    """Bytes this process's memory cgroup can still take (v2: memory.max − memory.current; v1: limit − usage), or
    None without a limit. The container's own cgroup is often mounted at /sys/fs/cgroup itself, so both are tried."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            files = ("memory.max", "memory.current")
            roots = (Path("/sys/fs/cgroup") / path.lstrip("/"), Path("/sys/fs/cgroup"))
        elif "memory" in controllers.split(","):  # v1
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            roots = (Path("/sys/fs/cgroup/memory") / path.lstrip("/"), Path("/sys/fs/cgroup/memory"))
        else:
            continue
        for root in roots:
            limit, used = (_read_int(root / f) for f in files)
            if limit is not None and used is not None and limit < 2**60:  # v1 writes ~2^63 for no limit
                return max(0, limit - used)
    return None


def rss() -> int:
    """This process's resident memory now, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: torch.device | None = None) -> int:
    """Bytes this process can hold in all: what it holds now + the smaller of /proc/meminfo's MemAvailable and its
    cgroup's room (CUDA: the device's free memory + what PyTorch reserved there)."""
    if device is not None and device.type == "cuda":  # untested here
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    room = int(meminfo["MemAvailable"].split()[0]) * 1024
    cgroup = cgroup_room()
    return rss() + (room if cgroup is None else min(room, cgroup))


# --- measuring a peak ----------------------------------------------------------------------------------------------
def _malloc_trim() -> None:
    """Hand glibc's free heap back to the system, so a probe starts from what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory(AbstractContextManager):
    """``with PeakMemory() as m: ...`` then ``m.peak``: the most bytes resident (CUDA: reserved) during the block."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.cuda = device is not None and device.type == "cuda"
        self.device, self.peak, self._stop, self._thread = device, 0, threading.Event(), None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_reserved(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss())
        else:
            status = Path("/proc/self/status").read_text()
            self.peak = int(status.split("VmHWM:")[1].split()[0]) * 1024


# --- the probe -----------------------------------------------------------------------------------------------------
def largest_input(transform: object, dataset: Dataset, size_divisible: int = 1) -> tuple[int, int]:
    """The largest (h, w) batch a transform makes from this data set, padded to ``size_divisible``: the largest of
    what the transform declares (``max_output_size``) for each aspect ratio of the data set (1000 px high), or,
    from a transform that declares none (or follows the image's size, or no transform), the data set's
    ``image_size`` (else its largest sample among the first 16). Every ratio, not only the two most elongated: with
    a cap on the longer side (RetinaNet's 800/1333) the largest area comes from a ratio in between (4:3 → 800×1066,
    more than a 2:1 image's 667×1333)."""
    shapes = []
    if hasattr(transform, "max_output_size"):
        ratios = dataset.aspect_ratios() if hasattr(dataset, "aspect_ratios") else [1.0]
        shapes = [transform.max_output_size((1000, round(1000 * r))) for r in sorted(set(ratios))]
    if shapes and None not in shapes:
        hw = max(shapes, key=lambda s: s[0] * s[1])
    elif getattr(dataset, "image_size", None):
        hw = (dataset.image_size, dataset.image_size)
    else:
        shapes = [dataset[i][0].shape[-2:] for i in range(min(16, len(dataset)))]
        hw = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    return tuple(-(-int(s) // size_divisible) * size_divisible for s in hw)


def input_settings(transform: object, key: str = "data.train_transform") -> str:
    """The settings that set a transform's input size (its ``size_settings``), for messages."""
    settings = getattr(transform, "size_settings", ())
    if settings:
        return " / ".join(f"{key}.{name}" for name in settings)
    return "data.image_size (or a resizing transform)"


def probe_batch(dataset: Dataset, batch_size: int, shape: tuple[int, int]) -> DetectionBatch:
    """The first ``batch_size`` training samples (as the transform makes them), resized to ``shape``."""
    samples = [resize_sample(*dataset[i % len(dataset)], *shape) for i in range(batch_size)]
    return collate_detection(samples)


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """The model and the random streams as they were: a probe must not change the run it checks (BatchNorm's
    running statistics move in training mode, and the transforms draw from the global generators)."""
    buffers = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items() if not isinstance(v, nn.Parameter)}
    training, py_state = model.training, random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                if k in buffers:
                    v.copy_(buffers[k])
        for p in model.parameters():
            p.grad = None
        model.train(training)


@contextmanager
def on_device(model: nn.Module, device: torch.device | None) -> Iterator[None]:
    """``model`` on ``device`` (None: where it is) inside the block, and back where it was after: the probes run
    before Lightning's strategy moves the model, which must find it where it was built."""
    home = next(model.parameters()).device
    model.to(device or home)
    try:
        yield
    finally:
        model.to(home)


def training_step(model: nn.Module, batch: DetectionBatch, autocast: Callable[[], AbstractContextManager]) -> None:
    """One training step's forward and backward, as Lightning runs ``DetectionModule.training_step`` (backward outside
    autocast); gradients are set to None first, as ``optimizer.zero_grad()`` leaves them."""
    model.train()
    for p in model.parameters():
        p.grad = None
    with autocast():
        total = sum(model.compute_losses(batch).values())
    total.backward()


def validation_step(model: nn.Module, batch: DetectionBatch, autocast: Callable[[], AbstractContextManager]) -> None:
    model.eval()
    with autocast():
        model.detect(batch)


@dataclass(frozen=True)
class Estimate:
    """need(B) = fixed + B × per_image bytes, at ``shape``; ``measured``: from probes at that shape (else
    an over-estimate from fewer or smaller probes)."""

    fixed: float
    per_image: float
    shape: tuple[int, int]
    measured: bool = True

    def need(self, batch_size: int) -> float:
        return self.fixed + batch_size * self.per_image

    def largest_batch(self, budget: float) -> int:
        """The largest batch whose need is ≤ ``budget`` (0: not even one)."""
        return max(0, math.floor((budget - self.fixed) / self.per_image)) if self.per_image > 0 else 1 << 30

    def describe(self) -> str:
        return f"{gib(self.fixed)} fixed + {gib(self.per_image)} per image at {self.shape[0]}×{self.shape[1]}" + (
            "" if self.measured else ", an over-estimate from fewer probes"
        )


def half_size(shape: tuple[int, int]) -> tuple[int, int]:
    return max(1, shape[0] // 2), max(1, shape[1] // 2)


def probe(
    step: Callable,
    model: nn.Module,
    dataset: Dataset,
    shape: tuple[int, int],
    available: float,
    batch_size: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    device: torch.device | None = None,
    extra: tuple[float, float] = (0, 0),
) -> Estimate:
    """need(B) of ``step(model, batch, autocast)`` at ``shape`` (the rule in the module's docstring), in stages that
    each cost more and over-estimate less: batch 1 at half the side if the input is large, batch 1, batch 2 (2 and
    3 for a model that cannot train on one image). Stops at the first stage whose over-estimate shows
    ``batch_size`` fits with the margin (None: measure the whole line, as ``auto`` needs), or where the next probe
    might not fit (then the estimate is that over-estimate).
    ``extra``: (fixed, per-image) bytes the probes do not hold, added to every stage's line."""
    run_on = device if device is not None and device.type == "cuda" else None
    budget = available * (1 - AUTO_MARGIN)

    def peak(batch: int, hw: tuple[int, int]) -> int:
        samples = probe_batch(dataset, batch, hw)
        if run_on is not None:
            samples = move_data_to_device(samples, run_on)
        with PeakMemory(run_on) as m:
            step(model, samples, autocast)
            del samples
        return m.peak

    def settled(estimate: Estimate) -> bool:
        return batch_size is not None and estimate.need(batch_size) <= budget

    with on_device(model, run_on):
        _malloc_trim()
        base = torch.cuda.memory_reserved(run_on) if run_on is not None else rss()

        def line(fixed: float, per_image: float, measured: bool = False) -> Estimate:
            return Estimate(fixed + extra[0], per_image + extra[1], shape, measured)

        guard = shape[0] * shape[1] > GUARD_PIXELS
        start = half_size(shape) if guard else shape
        try:  # batch 1, unless the model cannot train on one image (BatchNorm/GroupNorm on a 1×1 map): 2
            first, one = 1, peak(1, start)
        except ValueError as e:
            if "more than 1 value per channel" not in str(e):
                raise
            first, one = 2, peak(2, start)
        if guard:  # the whole increment, fixed parts included, scaled by the pixels: an over-estimate
            rough = line(base, (one - base) / first * shape[0] * shape[1] / (start[0] * start[1]))
            if settled(rough) or rough.need(first) > available:
                return rough
            one = peak(first, shape)
        rough = line(base, (one - base) / first)  # all of the first probe's increment per image
        if settled(rough) or rough.need(first + 1) > available:
            return rough
        two = peak(first + 1, shape)
        per_image = two - one if two > one else (one - base) / first  # (a flat pair: noise, take the over-estimate)
        return line(one - first * per_image, per_image, measured=True)


def optimizer_states(factory: object) -> int:
    """Tensors the size of the parameters an optimizer keeps: Adam/AdamW/... 2, SGD with momentum 1, plain SGD 0;
    an optimizer not known here counts 2."""
    func = getattr(factory, "func", factory)
    name = getattr(func, "__name__", "")
    if name == "SGD":
        return int(bool(getattr(factory, "keywords", {}).get("momentum")))
    return 2


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def training_estimate(
    model: nn.Module,
    dataset: Dataset,
    transform: object,
    size_divisible: int,
    available: float,
    batch_size: int | None = None,
    optimizer: object = None,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    device: torch.device | None = None,
) -> Estimate:
    """need(B) of training: the probes' line + the optimizer's state + the loader workers (each its own process,
    holding ``prefetch_factor`` uint8 batches in shared memory; on CUDA that is host memory, not counted)."""
    shape = largest_input(transform, dataset, size_divisible)
    fixed = optimizer_states(optimizer) * parameter_bytes(model)
    per_image = 0
    if device is None or device.type != "cuda":
        fixed += num_workers * WORKER_BYTES
        per_image += num_workers * prefetch_factor * 3 * shape[0] * shape[1]
    with untouched(model):
        return probe(training_step, model, dataset, shape, available, batch_size, autocast, device, (fixed, per_image))


def validation_estimate(
    model: nn.Module,
    dataset: Dataset,
    transform: object,
    size_divisible: int,
    available: float,
    batch_size: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    device: torch.device | None = None,
) -> Estimate:
    """need(B) of a validation step (no gradients) at the validation transform's largest input."""
    shape = largest_input(transform, dataset, size_divisible)
    with untouched(model):
        return probe(validation_step, model, dataset, shape, available, batch_size, autocast, device)


# --- the decision --------------------------------------------------------------------------------------------------
class NotEnoughMemory(MemoryError):
    """A configuration whose estimated need is more than the memory at hand (raised before any training step)."""


def too_big(key: str, batch_size: int, estimate: Estimate, available: float, settings: str, auto_hint: bool) -> str:
    fits = estimate.largest_batch(available * (1 - AUTO_MARGIN))
    fix = (
        f"set {key}≤{fits}" + (" (or auto)" if auto_hint else "") + f", or a smaller input ({settings})"
        if fits >= 1
        else f"even {key}=1 does not fit: a smaller input ({settings}) or a smaller model"
    )
    return (
        f"{key}={batch_size} needs ~{gib(estimate.need(batch_size))} (estimated: {estimate.describe()}) but "
        f"{gib(available)} is available: {fix}; memory_check=false skips this check"
    )


def choose_batch(estimate: Estimate, available: float, settings: str, key: str = "data.batch_size") -> int:
    """The largest batch whose need fits in ``available`` less ``AUTO_MARGIN``; raises ``NotEnoughMemory`` if none."""
    batch = estimate.largest_batch(available * (1 - AUTO_MARGIN))
    if batch < 1:
        raise NotEnoughMemory(too_big(key, 1, estimate, available, settings, auto_hint=False))
    return batch


def check_batch(
    estimate: Estimate,
    batch_size: int,
    available: float,
    settings: str,
    key: str = "data.batch_size",
    auto_hint: bool = True,
) -> str | None:
    """Raises ``NotEnoughMemory`` if ``batch_size`` needs more than ``available``; a warning (text) if it needs more
    than ``available`` less ``AUTO_MARGIN`` (it may fit, or be killed later), else None."""
    if estimate.need(batch_size) > available:
        raise NotEnoughMemory(too_big(key, batch_size, estimate, available, settings, auto_hint))
    if estimate.need(batch_size) > available * (1 - AUTO_MARGIN):
        return (
            f"{key}={batch_size} needs ~{gib(estimate.need(batch_size))} of {gib(available)} available: "
            f"within the {AUTO_MARGIN:.0%} margin, it may still run out later ({estimate.describe()})"
        )
    return None
