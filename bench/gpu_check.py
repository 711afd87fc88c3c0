"""``python -m bench.gpu_check`` (``make gpu-check``): prove a CUDA machine in one command, within 8 minutes.

Writes one report, ``report.md`` and ``report.json``, into ``--out`` (default ``runs/gpu_check/<date>_<time>``),
rewritten after every section so that an interrupted check keeps what it measured. The sections:

1. **environment**: the GPU, torch and CUDA, and which of this project's requirements are missing (with the
   ``pip install`` line), and whether ``nvidia-smi`` is there to sample utilisation.
2. **tests**: ``pytest -m cuda``, the CUDA case of every test of a fast path (each equal to its plain twin on the
   GPU, bf16 within its argued tolerance, compile equal to eager; ``tests/conftest.py`` ``DEVICES``).
3. **bench**: one training step of ours against torchvision's same model, same weights and inputs, on this GPU:
   RetinaNet R50-FPN 800×800 batch 16, SSD300 batch 32 (both bf16 autocast, channels-last) and YOLOv1 448×448
   batch 64 (no torchvision peer: ours alone); images/s and the step's activation peak (GPU memory above what
   the models and optimisers hold).
4. **train**: ``train.py`` for about a minute per detector (the paper's network on the built-in shapes at its
   own input size, bf16-mixed), and again with ``compile=true`` (``--compile``, recompiles counted), counting
   each host-device synchronisation in the training steps and where it comes from
   (``torch.cuda.set_sync_debug_mode``: :class:`HostSyncCounter`), the time the step waits for its batch, and
   the GPU's utilisation sampled by ``nvidia-smi``.
5. **loader**: the project's VOC training loader on real JPEGs (``../shared/data``'s VOC2012 sample and BCCD, or
   ``--voc-root``) with 1–16 worker processes, for each model's own augmentation, next to that model's training
   rate from (3): the fewest workers that keep the GPU fed.

Then the issue's goals, each marked met or not. ``--device cpu --quick`` runs every section's plumbing on the CPU
at toy sizes in about a minute (``tests/test_gpu_check.py``). Exit status: 0 when every section ran (goals may be
unmet: read the report), 1 when one failed, 2 when a requirement is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # the environment section names what is missing
    Callback = object

ROOT = Path(__file__).resolve().parents[1]
VOC_SAMPLE = ROOT.parent / "shared" / "data" / "voc2012-sample" / "VOCdevkit"
BCCD = ROOT.parent / "shared" / "data" / "bccd" / "BCCD"
GOAL_MINUTES = 8
# issue 31's goals: our training step's images/s ÷ torchvision's on the same GPU and precision, ...
SPEED_GOALS = {"retinanet": 2.0, "ssd": 2.0}
TRAIN_SHARE_GOAL = 0.9  # ... train.py's training images/s ÷ that step's, for the models with a peer ...
BUSY_GOAL = 0.9  # ... and the GPU busy (nvidia-smi) during train.py's steps; the loader keeps it this fed
# distribution name → module, where they differ
MODULE_OF = {
    "hydra-core": "hydra",
    "hydra-colorlog": "hydra_plugins.hydra_colorlog",
    "faster-coco-eval": "faster_coco_eval",
    "opencv-python-headless": "cv2",
}


class PartlyFailed(RuntimeError):
    """A section some of whose parts failed: ``results`` keeps what the others measured."""

    def __init__(self, message: str, results: dict[str, Any]) -> None:
        super().__init__(message)
        self.results = results


@dataclass
class Section:
    name: str
    status: str = "not run"  # ok | failed | skipped | not run
    seconds: float = 0.0
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# --- 1. environment -------------------------------------------------------------------------------------------
def requirement_names() -> list[str]:
    """The distribution names in pyproject.toml's dependencies, versions dropped (read with a pattern: Python 3.10
    has no tomllib)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    deps = re.findall(r'^\s*"([^"]+)"', block.group(1), re.M)
    names = []
    for dep in deps:
        name = dep.split(";")[0]
        for stop in "<>=!~[ ":
            name = name.split(stop)[0]
        names.append(name.strip())
    return names


def missing_modules(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        module = MODULE_OF.get(name, name.replace("-", "_"))
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package missing (hydra_plugins)
            found = False
        if not found:
            missing.append(name)
    return missing


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "missing_requirements": missing_modules(requirement_names()),
        "missing_for_tests": missing_modules(["pytest"]),
        "nvidia_smi": shutil.which("nvidia-smi"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
    else:
        from .timing import describe_machine

        env["gpu"] = None
        env["cpu"] = describe_machine(device)
    return env


# --- 2. tests -------------------------------------------------------------------------------------------------
def run_cuda_tests(out: Path, timeout_s: float, paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """``pytest -m cuda [paths]`` in a child process; its counts and failures from the JUnit XML it writes."""
    xml = out / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    command += list(paths)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    if not xml.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    from defusedxml.ElementTree import parse  # the project's rule for XML (a requirement, checked above)

    suite = parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed.append(
                {"test": f"{case.get('classname')}::{case.get('name')}", "message": problem.get("message", "")[:500]}
            )
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {
        "command": " ".join(command[1:]),
        "exit_status": proc.returncode,
        **counts,
        "failed": failed,
        "seconds": time.perf_counter() - started,
        "log": str(out / "cuda_tests.log"),
    }


# --- 3. bench: a training step, ours against torchvision -----------------------------------------------------
@dataclass
class OwnStep:
    """A model without a torchvision peer (YOLOv1): its training step and batch."""

    step: Callable[[], torch.Tensor]
    images: int


def yolo_step(
    device: torch.device, batch_size: int, autocast: torch.dtype | None, channels_last: bool, size: int = 448
) -> OwnStep:
    from hydra.utils import instantiate

    from lightning.fabric.utilities.apply_func import move_data_to_device

    from detectors.batch import collate_detection

    from .training_step import _step, _trainable, model_config, random_samples

    classes = ",".join(f"c{i}" for i in range(20))
    # lr 1e-4: from random weights on noise images a larger step can overflow (the lr changes none of the work)
    module = instantiate(model_config("model=yolo", f"data.classes=[{classes}]", "model.optimizer.lr=1e-4"))
    net = module.net.to(device).train()
    net.use_channels_last(channels_last)
    batch = collate_detection(random_samples(batch_size, size, 20, 5, size / 28, size * 25 / 28, 0), 1)  # 16–400 at 448
    batch = move_data_to_device(batch, device)
    optimizer = module.optimizer_factory(_trainable(net))

    def losses():
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return net.compute_losses(batch)

    return OwnStep(lambda: _step(losses, optimizer), batch_size)


def step_peak(step: Callable[[], object], device: torch.device) -> float | None:
    """GiB that one step allocates above what was held before it (activations, gradients' first allocation
    excluded by the warm-up before); None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def bench_cases(device: torch.device, quick: bool) -> list[tuple[str, str, Callable[[], Any]]]:
    """(model, description, builder) for each row: the issue's sizes on a GPU, toy sizes with --quick."""
    from functools import partial

    from .training_step import retinanet_case, ssd_case

    if quick:  # the plumbing only: float32, NCHW (no layout timing), one image
        return [
            (
                "retinanet",
                "RetinaNet R50-FPN, 128×128, batch 1",
                partial(retinanet_case, device, 128, 1, channels_last=False),
            ),
            ("ssd", "SSD300 VGG16, batch 1", partial(ssd_case, device, batch_size=1, channels_last=False)),
            ("yolo", "YOLOv1, 224×224, batch 1", partial(yolo_step, device, 1, None, False, 224)),
        ]
    bf16 = torch.bfloat16
    return [
        (
            "retinanet",
            "RetinaNet R50-FPN, 800×800, batch 16, bf16, channels-last",
            partial(retinanet_case, device, 800, 16, autocast=bf16, channels_last=True),
        ),
        (
            "ssd",
            "SSD300 VGG16, batch 32, bf16, channels-last",
            partial(ssd_case, device, batch_size=32, autocast=bf16, channels_last=True),
        ),
        ("yolo", "YOLOv1, 448×448, batch 64, bf16, channels-last", partial(yolo_step, device, 64, bf16, True)),
    ]


def bench_rows(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    from .training_step import alternating_times

    repeats, warmup = (1, 0) if quick else (5, 2)  # --quick: one step a side, its figures not timings
    rows = []
    for model, what, build in bench_cases(device, quick):
        case = build()
        row: dict[str, Any] = {"model": model, "what": what}
        if isinstance(case, OwnStep):
            for _ in range(warmup):  # the first steps allocate gradients and the optimizer's state
                case.step()
            row["peak_gib"] = step_peak(case.step, device)  # then a step's own peak, as for the rows below
            seconds = [_timed(case.step, device) for _ in range(repeats)]
            row.update(images=case.images, ours_s=statistics.median(seconds), peer=None)
        else:
            bad = case.mismatches()
            if bad:
                raise RuntimeError(f"{what}: the two models differ in {bad[:5]}")
            for _ in range(warmup):  # the first steps allocate gradients and momentum
                case.their_step(), case.ours_step()
            row["peer_peak_gib"] = step_peak(case.their_step, device)
            row["peak_gib"] = step_peak(case.ours_step, device)
            theirs, ours = alternating_times(case.their_step, case.ours_step, device, repeats, warmup=0)
            row.update(
                images=len(case.batch),
                ours_s=statistics.median(ours),
                peer="torchvision",
                peer_s=statistics.median(theirs),
            )
            row["peer_images_per_s"] = row["images"] / row["peer_s"]
            row["speedup"] = row["peer_s"] / row["ours_s"]
        row["images_per_s"] = row["images"] / row["ours_s"]
        print(f"  {what}: {_describe_row(row)}", flush=True)
        rows.append(row)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    from .timing import synchronize

    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _describe_row(row: dict[str, Any]) -> str:
    text = f"ours {row['images_per_s']:.1f} img/s"
    if row.get("peer"):
        text += f", torchvision {row['peer_images_per_s']:.1f} img/s: {row['speedup']:.2f}×"
    return text


# --- 4. train: a minute of train.py per detector, host syncs counted ------------------------------------------
class HostSyncCounter(Callback):
    """Counts the host-device synchronisations inside each training step (forward, loss, backward, optimizer
    step: from ``on_train_batch_start`` to ``on_train_batch_end``) with ``torch.cuda.set_sync_debug_mode("warn")``,
    each attributed to the innermost frame outside torch and torchvision (this repository's ``file:line``, else the
    package, e.g. lightning); and the time each step waited for its batch (loader and host-to-device copy). Writes
    ``path`` (json) when training ends. The first ``skip_steps`` steps are left out (cuDNN autotuning, allocations).

    Example::

        python train.py model=ssd trainer=gpu +callbacks.host_syncs._target_=bench.gpu_check.HostSyncCounter \\
            +callbacks.host_syncs.path=host_syncs.json
    """

    def __init__(self, path: str, skip_steps: int = 5) -> None:
        self.path, self.skip_steps = Path(path), skip_steps
        self.sites: Counter[tuple[str, str]] = Counter()
        self.steps = self.images = 0
        self.waits: list[float] = []
        self.window: list[float] = []  # wall clock (time.time) of the first counted step's start, the last's end
        self._catch: warnings.catch_warnings | None = None
        self._shown = warnings.showwarning
        self._batch_end: float | None = None
        self._counted = False
        self._device = "cpu"
        self.sync_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        counting = self._counted = trainer.global_step >= self.skip_steps
        if counting and self._batch_end is not None:
            self.waits.append(now - self._batch_end)
        if counting and not self.window:
            self.window = [time.time(), time.time()]
        self._device = pl_module.device.type
        if counting and pl_module.device.type == "cuda":
            self._catch = warnings.catch_warnings()
            self._catch.__enter__()
            warnings.simplefilter("always")  # every occurrence, not the first per place
            self._shown, warnings.showwarning = warnings.showwarning, self.on_warning
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            self._catch = None
        self._batch_end = time.perf_counter()
        if self._counted:
            self.steps += 1
            self.images += len(batch)
            self.window[1] = time.time()

    def on_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """``warnings.showwarning`` while a step is counted: a sync is counted at its site, the rest shown."""
        if "synchroniz" in str(message):
            self.sites[self._site()] += 1
            if self._device == "cuda":  # the wait this sync makes: the GPU finishing what was queued before it
                start = time.perf_counter()
                torch.cuda.synchronize()
                self.sync_seconds += time.perf_counter() - start
        else:
            self._shown(message, category, filename, lineno, file, line)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._batch_end = None  # the wait across a validation is not the loader's

    @staticmethod
    def _site() -> tuple[str, str]:
        """(file:line, function) in this repository, else (package, function): ``bench.host_syncs.site``."""
        from .host_syncs import site

        where, line, function = site(skip=(Path(__file__).resolve(),))
        return (f"{where}:{line}" if line is not None else where), function

    def summary(self) -> dict[str, Any]:
        seconds = (self.window[1] - self.window[0]) if self.window else 0.0
        total = sum(self.sites.values())
        return {
            "device": self._device,
            "steps": self.steps,
            "images": self.images,
            "seconds": seconds,
            "images_per_s": self.images / seconds if seconds else None,
            "wait_share": sum(self.waits) / seconds if seconds else None,
            "window": self.window,
            "syncs_per_step": total / self.steps if self.steps else None,
            "sync_s": self.sync_seconds / self.steps if self.steps else None,
            "compiled_graphs": _dynamo_count("stats", "unique_graphs"),  # compile=true: graphs made, ...
            "recompiles": _dynamo_count("recompiles"),  # ... and recompilations (a guard failed: a new shape)
            "sites": [
                {
                    "site": site,
                    "function": function,
                    "per_step": n / max(self.steps, 1),
                    "named": named_sync(site, function),
                }
                for (site, function), n in self.sites.most_common()
            ],
        }

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.summary(), indent=2))


def _dynamo_count(group: str, key: str | None = None) -> int:
    """torch._dynamo's counter ``group``/``key`` (its sum when ``key`` is None), 0 where nothing was compiled."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    values = counters.get(group, {})
    return int(values.get(key, 0) if key else sum(values.values()))


try:
    from lightning.pytorch.profilers import Profiler
except ImportError:  # the environment section names what is missing
    Profiler = object


class StepProfiler(Profiler):
    """Where a ``train.py`` training step's wall time goes, from Lightning's own profiler actions: **data** (the
    loader's next batch and its copy to the device), **step** (training_step: forward and loss; backward; the
    optimiser's own step), and the **rest** (the loop, callbacks, logging, the progress bar: wall − data − step).
    The host syncs' share comes from ``HostSyncCounter`` (the time the host waits at them, inside the step).
    Steps before ``skip_steps`` are left out; ``path`` (json) is written at teardown.

    Example::

        python train.py model=ssd '+trainer.profiler={_target_: bench.gpu_check.StepProfiler, path: split.json}'
    """

    PARTS = {
        "data": ("train_dataloader_next", ".batch_to_device", ".on_before_batch_transfer", ".on_after_batch_transfer"),
        "forward": (".training_step",),
        "backward": (".backward",),
        "optimizer": (".optimizer_step",),  # holds the closure (training_step and backward): they are taken off
    }

    def __init__(self, path: str, skip_steps: int = 5) -> None:
        super().__init__()
        self.path, self.skip_steps = Path(path), skip_steps
        self.seconds: Counter[str] = Counter()
        self.steps, self.window, self.validating_s = 0, [0.0, 0.0], 0.0
        self._started: dict[str, float] = {}
        self._fetches = 0
        self._validation_began: float | None = None  # a validation between steps: neither a part nor the wall

    def _part(self, action: str) -> str | None:
        for part, endings in self.PARTS.items():
            if action.endswith(endings) and ("[Strategy]" in action or part in ("data", "optimizer")):
                return part
        return None

    def start(self, action_name: str) -> None:
        now = time.perf_counter()
        if action_name.endswith("on_validation_start") and self._validation_began is None:
            self._validation_began = now
        if action_name.endswith("train_dataloader_next"):
            if self._validation_began is not None:  # training resumes: the validation ends here
                if self._fetches > self.skip_steps:
                    self.validating_s += now - self._validation_began
                self._validation_began = None
            self._fetches += 1
            if self._fetches == self.skip_steps + 1:
                self.window[0] = now
        self._started[action_name] = now

    def stop(self, action_name: str) -> None:
        now = time.perf_counter()
        started = self._started.pop(action_name, None)
        if started is None or self._fetches <= self.skip_steps or self._validation_began is not None:
            return
        part = self._part(action_name)
        if part:
            self.seconds[part] += now - started
        if action_name == "run_training_batch":
            self.steps += 1
            self.window[1] = now

    def split(self) -> dict[str, Any]:
        """Seconds a step in each part, and the wall seconds a step (from the first counted fetch to the last
        counted step's end, less the validations between)."""
        if not self.steps:
            return {"steps": 0}
        s = {k: v / self.steps for k, v in self.seconds.items()}
        step = {"forward": s.get("forward", 0.0), "backward": s.get("backward", 0.0)}
        step["optimizer"] = max(0.0, s.get("optimizer", 0.0) - step["forward"] - step["backward"])
        wall = (self.window[1] - self.window[0] - self.validating_s) / self.steps
        data = s.get("data", 0.0)
        return {
            "steps": self.steps,
            "wall_s": wall,
            "data_s": data,
            **{f"{k}_s": v for k, v in step.items()},
            "rest_s": max(0.0, wall - data - sum(step.values())),
        }

    def summary(self) -> str:
        return json.dumps(self.split())

    def teardown(self, stage: str | None) -> None:
        if stage == "fit" or stage is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.split(), indent=2))
        super().teardown(stage)


def named_sync(site: str, function: str) -> str | None:
    """Why the design makes this sync (``bench.host_syncs``' tables), or None: a site is ``file:line`` in this
    repository, else a package."""
    from .host_syncs import reason

    return reason(site.rsplit(":", 1)[0] if ".py:" in site else site, function)


# --quick: the plumbing, so one file's CUDA tests (collecting the whole suite alone takes ~20 s on 2 cores)
QUICK_CUDA_TESTS = ("tests/detectors/test_focal_loss.py",)
# --quick: each network at a tiny size (the tests' too: tests/conftest.py), 64 px shapes: a step in well under
# a second, so the train section checks its plumbing in seconds
QUICK_NETWORKS = {
    "retinanet": ("data.image_size=64", "model.backbone.out_channels=32", "model.priors.size_factor=0.125"),
    "ssd": ("data.image_size=64", "model.backbone.width=0.125"),
    "yolo": ("data.image_size=64", "model.head.hidden=32"),
}


def training_overrides(model: str, device: torch.device, quick: bool, minutes: float, workers: int) -> list[str]:
    if quick:  # the CPU recipes made tiny, a few toy batches: the command, the callback and the report, not speed
        return [
            f"experiment={model}_shapes",
            *QUICK_NETWORKS[model],
            "data.num_train=16",
            "data.num_val=8",
            "data.batch_size=4",
            "data.val_batch_size=8",
            "trainer.max_steps=4",
            "trainer.max_epochs=1",
            "trainer.val_check_interval=1.0",
            "trainer.check_val_every_n_epoch=1",
            "callbacks.time_budget.minutes=null",
            "memory_check=false",
            "model.channels_last=false",
        ]
    batch = {"retinanet": 16, "ssd": 32, "yolo": 64}[model]
    # RetinaNet as the paper fine-tunes it (frozen BatchNorm, conv1 and res2 fixed; random weights offline): with
    # trainable BatchNorm its bf16 gradient is mostly rounding and it diverged here (python -m bench.bf16_gradients)
    paper = ["model.backbone.norm=frozen_bn", "model.backbone.trainable_layers=3"] if model == "retinanet" else []
    return [
        f"model={model}",  # the paper's network (random weights) and its own input size, on the built-in shapes
        *paper,
        "data=shapes",
        f"data.batch_size={batch}",
        f"data.num_workers={workers}",
        "trainer=gpu" if device.type == "cuda" else "trainer=cpu",
        "trainer.precision=bf16-mixed",
        f"callbacks.time_budget.minutes={minutes}",
    ]


class UtilisationSampler:
    """``nvidia-smi``'s GPU utilisation every 200 ms in a thread, each sample stamped with the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
                + ["-lms", "200"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip())))
            except ValueError:
                pass

    def mean_between(self, start: float, end: float) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return statistics.mean(inside) / 100 if inside else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def run_training(
    model: str, device: torch.device, out: Path, quick: bool, minutes: float, workers: int, compile: bool = False
) -> dict[str, Any]:
    run_dir = out / f"train_{model}{'_compiled' if compile else ''}"
    syncs = run_dir / "host_syncs.json"
    overrides = [
        *training_overrides(model, device, quick, minutes, workers),
        *(["compile=true"] if compile else []),
        "logger=csv",
        "validate_best=false",
        "callbacks.prediction_images=null",  # drawing, not training
        "callbacks.pr_curves=null",
        f"task_name=gpu_check_{model}{'_compiled' if compile else ''}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.host_syncs._target_=bench.gpu_check.HostSyncCounter",
        f"+callbacks.host_syncs.path={syncs}",
        f"+callbacks.host_syncs.skip_steps={1 if quick else 5}",
        "+trainer.profiler._target_=bench.gpu_check.StepProfiler",
        f"+trainer.profiler.path={run_dir / 'step_split.json'}",
        f"+trainer.profiler.skip_steps={1 if quick else 5}",
    ]
    command = [sys.executable, "train.py", *overrides]
    sampler = UtilisationSampler(device)
    started = time.perf_counter()
    try:
        env = {**os.environ, "WANDB_MODE": "disabled"}
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=minutes * 60 + 240)
    finally:
        sampler.stop()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not syncs.is_file():
        raise RuntimeError(
            f"train.py {model} exited {proc.returncode} (log: {run_dir / 'train.log'}): "
            f"{(proc.stdout + proc.stderr)[-1500:]}"
        )
    result = json.loads(syncs.read_text())
    split = run_dir / "step_split.json"
    result["split"] = json.loads(split.read_text()) if split.is_file() else {}
    result.update(
        command="python train.py " + " ".join(overrides),
        wall_s=time.perf_counter() - started,
        gpu_utilisation=sampler.mean_between(*result["window"]) if result["window"] else None,
        unnamed_syncs=[s for s in result["sites"] if not s["named"]],
    )
    return result


# --- 5. loader -------------------------------------------------------------------------------------------------
def loader_rows(
    roots: list[Path], device: torch.device, quick: bool, workers: list[int], training: dict[str, float]
) -> dict[str, Any]:
    """Images/s of each model's VOC training loader at each worker count, on each folder of real JPEGs (a VOCdevkit
    or one VOC-style folder such as BCCD), and the fewest workers that outrun that model's training rate (its GPU
    then never waits; the goal asks ≥ 90 % busy)."""
    from .data_pipeline import loader_rate, voc_sets

    batch = 2 if quick else 8  # small batches: the sample's epoch must hold several per worker
    result: dict[str, Any] = {"sets": {}}
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"--voc-root {root}: not a folder; give a VOCdevkit or one VOC-style folder")
        models = {}
        for model in ("retinanet", "ssd", "yolo"):
            rates = {}
            for n in workers:
                rate, what = loader_rate(
                    root,
                    n,
                    batch,
                    model,
                    batches=2 if quick else max(20, 3 * n),
                    pin_memory=device.type == "cuda",
                    repeat=1 if quick else max(1, 4 * n * batch // 100),
                )
                rates[n] = rate
                print(f"  loader {what}: {rate:.0f} img/s", flush=True)
            needed = training.get(model)
            enough = [n for n in workers if needed and rates[n] >= needed]
            recommended = min(enough) if enough else max(workers, key=lambda n: rates[n])
            models[model] = {
                "images_per_s": rates,
                "training_images_per_s": needed,
                "recommended_workers": recommended,
                "busy_at_recommended": min(1.0, rates[recommended] / needed) if needed else None,
            }
        result["sets"][voc_sets(root)[2]] = {"root": str(root), "models": models}
    return result


# --- the report ------------------------------------------------------------------------------------------------
def goals(sections: dict[str, Section], total_s: float) -> list[dict[str, Any]]:
    """The issue's goals with what was measured; ``met`` is None where they do not apply (a CPU run)."""
    on_gpu = bool(sections["environment"].results.get("gpu"))
    out = [
        {
            "goal": f"the check finishes in ≤ {GOAL_MINUTES} minutes",
            "value": f"{total_s / 60:.1f} min",
            "met": total_s <= GOAL_MINUTES * 60,
        }
    ]
    tests = sections["tests"].results
    if "passed" in tests:  # a skipped section holds only its reason
        out.append(
            {
                "goal": "every CUDA test passes",
                "value": f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                f"{tests['skipped']} skipped",
                "met": tests["failures"] + tests["errors"] == 0 and tests["passed"] > 0 if on_gpu else None,
            }
        )
    for row in sections["bench"].results.get("rows", []):
        if row["model"] in SPEED_GOALS:
            want = SPEED_GOALS[row["model"]]
            out.append(
                {
                    "goal": f"{row['what']}: training images/s ≥ {want}× torchvision's",
                    "value": f"{row['speedup']:.2f}×",
                    "met": row["speedup"] >= want if on_gpu else None,
                }
            )
    bench = {r["model"]: r for r in sections["bench"].results.get("rows", [])}
    for model, run in sections["train"].results.items():
        if model in SPEED_GOALS and run["device"] == "cuda":
            step = bench.get(model, {}).get("images_per_s")
            share = run["images_per_s"] / step if step and run.get("images_per_s") else None
            out.append(
                {
                    "goal": f"{model}: train.py's training images/s ≥ {TRAIN_SHARE_GOAL:.0%} of the step bench's",
                    "value": _num(share, ".0%"),
                    "met": share is not None and share >= TRAIN_SHARE_GOAL,
                }
            )
            busy = run.get("gpu_utilisation")
            out.append(
                {
                    "goal": f"{model}: the GPU busy ≥ {BUSY_GOAL:.0%} of train.py's steps (nvidia-smi)",
                    "value": _num(busy, ".0%"),
                    "met": busy is not None and busy >= BUSY_GOAL,
                }
            )
        compiled = run.get("compiled")
        if compiled and compiled.get("images_per_s") and run.get("images_per_s"):
            ratio = compiled["images_per_s"] / run["images_per_s"]
            out.append(
                {
                    "goal": f"{model}: compile=true trains faster than eager (else off, with this reason)",
                    "value": f"{ratio:.2f}×, {compiled['recompiles']} recompiles",
                    "met": ratio > 1 if run["device"] == "cuda" else None,
                }
            )
        unnamed = run["unnamed_syncs"]
        out.append(
            {
                "goal": f"{model}: no host sync in a training step beyond those the design names",
                "value": "not counted off a GPU"
                if run["device"] != "cuda"
                else "none"
                if not unnamed
                else "; ".join(f"{s['site']} ({s['function']})" for s in unnamed),
                "met": not unnamed if run["device"] == "cuda" else None,
            }
        )
    for data, loaded in sections["loader"].results.get("sets", {}).items():
        for model, m in loaded["models"].items():
            if m["busy_at_recommended"] is None:
                continue
            out.append(
                {
                    "goal": f"the loader keeps {model} ≥ {BUSY_GOAL:.0%} busy on {data}",
                    "value": f"{m['busy_at_recommended']:.0%} at {m['recommended_workers']} workers",
                    "met": m["busy_at_recommended"] >= BUSY_GOAL if on_gpu else None,
                }
            )
    return out


def markdown(sections: dict[str, Section], total_s: float, argv: list[str]) -> str:
    env = sections["environment"].results
    lines = [
        "# GPU check",
        "",
        f"`python -m bench.gpu_check {' '.join(argv)}` on {env.get('gpu') or env.get('cpu')}, torch "
        f"{env.get('torch')} (CUDA {env.get('cuda_runtime')}), {env.get('cpu_cores')} CPU cores; "
        f"{datetime.now():%Y-%m-%d %H:%M}; {total_s / 60:.1f} min.",
        "",
    ]
    if env.get("missing_requirements"):
        lines += [f"**Missing:** `pip install {' '.join(env['missing_requirements'])}`", ""]
    if env.get("missing_for_tests"):
        lines += ["**Missing for the CUDA tests:** `pip install pytest`", ""]
    lines += ["| section | status | seconds |", "|---|---|---:|"]
    for s in sections.values():
        reason = f" ({s.results['reason']})" if "reason" in s.results else ""
        lines.append(f"| {s.name} | {s.status}{reason} | {s.seconds:.0f} |")
    for s in sections.values():
        if s.error:
            lines += ["", f"**{s.name} failed:**", "```", s.error.strip()[-3000:], "```"]
    if any(s.status == "ok" for s in sections.values()):
        lines += ["", "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['value']} | {_met(g['met'])} |" for g in goals(sections, total_s)]
    tests = sections["tests"].results
    if "passed" in tests:  # a skipped section holds only its reason
        lines += [
            "",
            "## CUDA tests",
            "",
            f"`{tests['command']}`: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped in {tests['seconds']:.0f} s.",
        ]
        lines += [f"- **{f['test']}**: {f['message']}" for f in tests["failed"]]
    rows = sections["bench"].results.get("rows", [])
    if rows:
        lines += [
            "",
            "## A training step, ours against torchvision (same weights and inputs)",
            "",
            "| step | ours img/s | torchvision img/s | speed-up | ours peak GiB | torchvision peak GiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['what']} | {r['images_per_s']:.1f} | {_num(r.get('peer_images_per_s'), '.1f')} | "
                f"{_num(r.get('speedup'), '.2f', '×')} | {_num(r['peak_gib'], '.2f')} | "
                f"{_num(r.get('peer_peak_gib'), '.2f')} |"
            )
        lines += ["", "Peak: what one step allocates above the models, gradients and optimizer state it started with."]
    runs = sections["train"].results
    if runs:
        lines += [
            "",
            "## train.py for a minute each (the built-in shapes at the model's own input)",
            "",
            "| model | steps | img/s | waiting for data | GPU busy (nvidia-smi) | host syncs a step | not by design |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for model, r in runs.items():
            unnamed = ", ".join(s["site"] for s in r["unnamed_syncs"]) or "none"
            lines.append(
                f"| {model} | {r['steps']} | {_num(r['images_per_s'], '.1f')} | {_num(r['wait_share'], '.0%')} | "
                f"{_num(r['gpu_utilisation'], '.0%')} | {_num(r['syncs_per_step'], '.1f')} | {unnamed} |"
            )
        bench = {r["model"]: r for r in sections["bench"].results.get("rows", [])}
        lines += [
            "",
            "Where a train.py step's time goes (host time a step; the syncs' wait is inside the step's parts):",
            "",
            "| model | train.py img/s | step bench img/s | train.py ÷ bench | wall ms | data | forward | backward "
            "| optimiser | syncs' wait | rest |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for model, r in runs.items():
            sp, b = r.get("split") or {}, bench.get(model, {})
            if not sp.get("steps"):
                continue
            wall = sp["wall_s"]
            same_case = r["device"] == "cuda"  # --quick: the bench's toy size and the CPU recipe differ
            ratio = r["images_per_s"] / b["images_per_s"] if same_case and b.get("images_per_s") else None
            shares = [sp["data_s"], sp["forward_s"], sp["backward_s"], sp["optimizer_s"], r.get("sync_s") or 0.0]
            lines.append(
                f"| {model} | {_num(r.get('images_per_s'), '.1f')} | {_num(b.get('images_per_s'), '.1f')} | "
                f"{_num(ratio, '.0%')} | {wall * 1e3:.0f} | "
                + " | ".join(f"{v / wall:.0%}" for v in shares)
                + f" | {sp['rest_s'] / wall:.0%} |"
            )
        lines += [
            "",
            "The step bench's row is its own case (section 3: the same paper's network, its batch and precision; "
            "with --quick a toy size, and train.py the CPU recipe): read the ratio as the loop's cost on a GPU only.",
        ]
        compiled = {model: r["compiled"] for model, r in runs.items() if r.get("compiled")}
        if compiled:
            lines += [
                "",
                "`compile=true` (the backbone and head parts through torch.compile) against eager, same run length:",
                "",
                "| model | eager img/s | compiled img/s | compiled ÷ eager | graphs | recompiles | eager wall s "
                "| compiled wall s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for model, c in compiled.items():
                e = runs[model]
                ratio = c["images_per_s"] / e["images_per_s"] if c["images_per_s"] and e["images_per_s"] else None
                lines.append(
                    f"| {model} | {_num(e['images_per_s'], '.1f')} | {_num(c['images_per_s'], '.1f')} | "
                    f"{_num(ratio, '.2f', '×')} | {c['compiled_graphs']} | {c['recompiles']} | {e['wall_s']:.0f} | "
                    f"{c['wall_s']:.0f} |"
                )
            lines += ["", "Wall includes the compilation; img/s counts steps after the first few only."]
        lines += ["", "Where the synchronisations come from (per step):", ""]
        for model, r in runs.items():
            for s in r["sites"]:
                named = s["named"] or "**not named by the design**"
                lines.append(f"- {model}: `{s['site']}` in `{s['function']}`: {s['per_step']:.2f}; {named}")
        lines += ["", "Commands (each also writes its run folder beside this report):", ""]
        lines += [f"- `{r['command']}`" for r in runs.values()]
    for data, loaded in sections["loader"].results.get("sets", {}).items():
        workers = list(next(iter(loaded["models"].values()))["images_per_s"])
        lines += [
            "",
            f"## The training loader on {data} ({loaded['root']}), images/s by worker processes",
            "",
            "| model | "
            + " | ".join(f"{n} worker{'s' * (n != 1)}" for n in workers)
            + " | training img/s | recommended |",
            "|---|" + "---:|" * (len(workers) + 2),
        ]
        for model, m in loaded["models"].items():
            rates = " | ".join(f"{m['images_per_s'][n]:.0f}" for n in workers)
            lines.append(
                f"| {model} | {rates} | {_num(m['training_images_per_s'], '.0f')} | "
                f"{m['recommended_workers']} (GPU {_num(m['busy_at_recommended'], '.0%')} fed) |"
            )
        lines += ["", "Set it with `data.num_workers=N`; a loader slower than training leaves the GPU waiting."]
    return "\n".join(lines) + "\n"


def _met(met: bool | None) -> str:
    return "– (not on a GPU)" if met is None else "yes" if met else "**no**"


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def write_report(out: Path, sections: dict[str, Section], started: float, argv: list[str]) -> str:
    total = time.perf_counter() - started
    text = markdown(sections, total, argv)
    (out / "report.md").write_text(text)
    payload = {
        "argv": argv,
        "total_s": total,
        "sections": {k: asdict(v) for k, v in sections.items()},
        "goals": goals(sections, total),
    }
    (out / "report.json").write_text(json.dumps(payload, indent=2, default=str))
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --quick)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, one test file: the plumbing in a minute")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default runs/gpu_check/<time>)")
    parser.add_argument("--train-minutes", type=float, default=1.0, help="train.py's time budget per detector")
    parser.add_argument("--workers", default=None, help="loader worker counts, e.g. 2,4,8,16 (default: up to cores)")
    parser.add_argument(
        "--voc-root",
        type=Path,
        action="append",
        default=None,
        help="a VOCdevkit or one VOC-style folder, repeatable (default: ../shared/data's VOC sample and BCCD)",
    )
    parser.add_argument(
        "--compile",
        default=None,
        help="detectors to train again with compile=true, e.g. ssd (default: all three; none with --quick)",
    )
    parser.add_argument("--skip", default="", help="sections to leave out, comma-separated: tests,bench,train,loader")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    compiled = (
        {m for m in args.compile.split(",") if m}
        if args.compile is not None
        else (set() if args.quick else {"retinanet", "ssd", "yolo"})
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: torch {torch.__version__} sees no CUDA device (built for CUDA "
            f"{torch.version.cuda}); on a CPU, `--device cpu --quick` checks the plumbing"
        )
    if device.type == "cpu" and not args.quick:
        parser.error("--device cpu runs only with --quick (the check's sizes are a GPU's)")
    out = args.out or ROOT / "runs" / "gpu_check" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    workers = (
        [int(n) for n in args.workers.split(",")]
        if args.workers
        else ([0, 1] if args.quick else [n for n in (1, 2, 4, 8, 16) if n <= cores] or [cores])
    )
    # --quick: the VOC sample alone (the plumbing); else BCCD too, the photos the CPU recipes learn
    roots = args.voc_root or [r for r in (VOC_SAMPLE, BCCD)[: 1 if args.quick else 2] if r.is_dir()]
    skip = {s: "--skip" for s in args.skip.split(",") if s}
    if not roots:
        skip["loader"] = f"no VOC sample at {VOC_SAMPLE}: give a VOCdevkit with --voc-root"
    sections = {n: Section(n) for n in ("environment", "tests", "bench", "train", "loader")}
    started = time.perf_counter()

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        section = sections[name]
        if name in skip:
            section.status, section.results = "skipped", {"reason": skip[name]}
            print(f"\n== {name}: skipped ({skip[name]})", flush=True)
            return
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        try:
            section.results = fn()
            section.status = "ok"
        except PartlyFailed as e:
            section.status, section.results, section.error = "failed", e.results, str(e)
            print(section.error, file=sys.stderr, flush=True)
        except Exception:  # the report keeps what the other sections measured
            section.status, section.error = "failed", traceback.format_exc()
            print(section.error, file=sys.stderr, flush=True)
        section.seconds = time.perf_counter() - t
        write_report(out, sections, started, argv)

    run("environment", lambda: environment(device))
    missing = sections["environment"].results.get("missing_requirements")
    if missing:
        print(f"missing requirements: pip install {' '.join(missing)}", file=sys.stderr)
        for name in ("tests", "bench", "train", "loader"):
            sections[name].status = "skipped"
        print(write_report(out, sections, started, argv))
        return 2
    if sections["environment"].results.get("missing_for_tests"):
        skip["tests"] = "pytest is not installed: pip install pytest"
    run("tests", lambda: run_cuda_tests(out, timeout_s=300, paths=QUICK_CUDA_TESTS if args.quick else ()))
    run("bench", lambda: {"rows": bench_rows(device, args.quick)})

    def trainings() -> dict[str, Any]:
        runs, failed = {}, {}
        for model in ("retinanet", "ssd", "yolo"):
            try:
                runs[model] = run_training(model, device, out, args.quick, args.train_minutes, min(8, cores))
            except Exception as e:  # one detector's failure must not hide the others' figures
                failed[model] = f"{type(e).__name__}: {e}"
                print(f"  {model}: failed", flush=True)
                continue
            r = runs[model]
            print(
                f"  {model}: {r['steps']} steps, {_num(r['images_per_s'], '.1f')} img/s, "
                f"{_num(r['syncs_per_step'], '.1f')} host syncs a step",
                flush=True,
            )
            if model not in compiled:
                continue
            try:  # the same run with compile=true: faster than eager, or the setting stays off (issue 31)
                runs[model]["compiled"] = c = run_training(
                    model, device, out, args.quick, args.train_minutes, min(8, cores), compile=True
                )
            except Exception as e:
                failed[f"{model} compile=true"] = f"{type(e).__name__}: {e}"
                continue
            print(
                f"  {model} compile=true: {c['steps']} steps, {_num(c['images_per_s'], '.1f')} img/s, "
                f"{c['compiled_graphs']} graphs, {c['recompiles']} recompiles, {c['wall_s']:.0f} s",
                flush=True,
            )
        if failed:
            raise PartlyFailed("\n\n".join(f"{model}: {error}" for model, error in failed.items()), runs)
        return runs

    run("train", trainings)
    rates = {r["model"]: r["images_per_s"] for r in sections["bench"].results.get("rows", [])}
    run("loader", lambda: loader_rows(roots, device, args.quick, workers, rates))
    print("\n" + write_report(out, sections, started, argv))
    print(f"report: {out / 'report.md'} and report.json", flush=True)
    return 1 if any(s.status == "failed" for s in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
