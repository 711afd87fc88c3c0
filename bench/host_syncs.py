"""The host syncs of a training step: which ops make one, a counter that sees them on any device, and the table of
those the design keeps, each with its reason.

A GPU runs ahead of the host until the host reads a value back: ``int(t)``, ``nonzero``, boolean-mask indexing, a
tensor built from a Python list. Each such read stalls the host until the GPU's queue has drained, and the GPU then
idles while the host queues the next work. ``HostSyncCount`` is a ``TorchDispatchMode``: it sees the ATen ops of a
step on the CPU as on a GPU, and counts those that would synchronise there, each at its site (this repository's
file and function; ``backward`` for an autograd node's op). Inside ``detectors.device_paths.gpu_paths()`` the parts
take their GPU paths, so a CPU count is the GPU's (``tests/test_host_syncs.py`` holds each paper to
``BUDGETS``). On a GPU, ``bench.gpu_check.HostSyncCounter`` counts the same syncs in ``train.py`` with
``torch.cuda.set_sync_debug_mode`` and names them from ``DESIGNED_SYNCS`` too.

Example::

    with gpu_paths(), HostSyncCount() as count:
        training_step()
    count.total, count.sites  # 2, {("detectors/retinanet.py", "_active_tiles"): 1, ...}
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]

#: The most host syncs one training step of each paper's network may make (issue 31's goal).
BUDGETS = {"retinanet": 3, "ssd": 3, "yolo": 2}

#: The syncs a training step makes by design, by (file, function's qualified name): the most a step makes there,
#: and why. Anything else a step makes is a regression (the test fails; the GPU check's report names it).
#: Outside this repository: by (package, function), or the package's "*" (counted on a GPU only).
DESIGNED_SYNCS: dict[tuple[str, str], tuple[int, str]] = {
    ("engine/detection_module.py", "DetectionModule._nonfinite"): (
        1,
        "the NaN/Inf check of the loss: every rank must skip or stop before the optimiser step",
    ),
    ("detectors/retinanet.py", "_active_tiles"): (
        1,
        "sparse box subnet: how many tiles hold positive anchors, which sizes its work",
    ),
    ("detectors/ssd.py", "BestMatchIoUAssigner.match_bipartite"): (
        2,
        "bipartite matching: whether a free pair is left, read every second round (1–2 rounds: 1 read)",
    ),
    ("detectors/batch.py", "DetectionBatch.crowd_bound"): (
        1,
        "the crowd boxes' count, only for a batch not collated by collate_detection (it counts them on the host)",
    ),
}
#: Sites seen only on a GPU, by train.py's machinery rather than the step (``bench.gpu_check`` names them).
OUTSIDE_THE_STEP = {
    ("detectors/retinanet.py", "AnchorGenerator._generate"): "anchors for an input size not seen before (cached)",
    ("detectors/ssd.py", "DefaultBoxGenerator._generate"): "default boxes for an input size not seen before (cached)",
    ("detectors/yolo.py", "GridCells._generate"): "grid cells for an input size not seen before (cached)",
    ("detectors/retinanet.py", "_TileLayout.make.table"): "the sparse box subnet's tables for an input size (cached)",
    ("lightning", "*"): "Lightning: the progress bar's refresh and the loggers (every log_every_n_steps)",
}

# ATen ops whose result's size or value the host must know: on a GPU each waits for the queue to drain
SYNCING_OPS = {
    "_local_scalar_dense": "a value read on the host (item, int, float, bool)",
    "nonzero": "nonzero (its size)",
    "masked_select": "masked_select (its size)",
    "unique": "unique",
    "_unique": "unique",
    "_unique2": "unique",
    "unique_dim": "unique",
    "unique_consecutive": "unique",
    "unique_dim_consecutive": "unique",
    "bincount": "bincount (its length)",
    "equal": "equal (a bool on the host)",
    "allclose": "allclose (a bool on the host)",
    "lift_fresh": "a tensor from Python data (a copy from the host)",
}
INDEXING_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostSyncCount(TorchDispatchMode):
    """Counts, while active, the ops that would make a CUDA host sync: ``SYNCING_OPS``, indexing with a boolean
    mask (a ``nonzero`` inside), and ``repeat_interleave`` without ``output_size``. ``sites``: count by (file,
    function) of the innermost frame of this repository (``backward``: an autograd node's op, named by its node);
    ``ops``: count by the op's description."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[tuple[str, str]] = Counter()
        self.ops: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = syncing(func, args, kwargs)
        if what:
            where, _, function = site()
            self.ops[what] += 1
            self.sites[where, function] += 1
        return func(*args, **kwargs)

    def unexpected(self, designed: dict[tuple[str, str], tuple[int, str]] = DESIGNED_SYNCS) -> dict[str, int]:
        """Sites not in ``designed``, or counted more often than it allows: ``file:function`` → count."""
        return {
            f"{file}:{function}": n
            for (file, function), n in self.sites.items()
            if (file, function) not in designed or n > designed[file, function][0]
        }


def syncing(func, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """What makes ``func(*args, **kwargs)`` a host sync on a GPU, or None."""
    name = func.overloadpacket.__name__
    if SYNCING_OPS.get(name):
        return SYNCING_OPS[name]
    if name in INDEXING_OPS and len(args) > 1:
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            return f"boolean-mask {'indexing' if name == 'index' else 'assignment'} (a nonzero inside)"
    if name == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size (its size)"
    return None


def site(skip: tuple[Path, ...] = ()) -> tuple[str, int | None, str]:
    """(where, line, function) of the innermost frame that is not torch's, torchvision's, the warnings module's,
    this file's or in ``skip``: where is a file relative to the repository (with its line), else the package of
    an installed one, or ("backward", None, <autograd node>) inside an autograd node's backward. The function is
    its qualified name without ``<locals>``/``<genexpr>`` (a generator expression counts for the function around
    it)."""
    node = torch._C._current_autograd_node()
    if node is not None:
        return "backward", None, type(node).__name__
    passed = {Path(__file__).resolve(), *skip}
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if not (path in passed or path.name == "warnings.py" or {"torch", "torchvision"} & set(path.parts)):
            qualname = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)  # Python 3.11+
            function = ".".join(p for p in qualname.split(".") if not p.startswith("<")) or qualname
            if "site-packages" in path.parts:
                return path.parts[path.parts.index("site-packages") + 1], None, frame.f_code.co_name
            if path.is_relative_to(ROOT):
                return str(path.relative_to(ROOT)), frame.f_lineno, function
            return str(path), None, function
        frame = frame.f_back
    return "torch", None, "?"


def reason(file: str, function: str) -> str | None:
    """Why the design makes a sync at this site (``DESIGNED_SYNCS``, ``OUTSIDE_THE_STEP``), or None. On Python 3.10
    (no qualified names) by the function name's last part."""
    reasons = {**{k: why for k, (_, why) in DESIGNED_SYNCS.items()}, **OUTSIDE_THE_STEP}
    found = reasons.get((file, function)) or reasons.get((file, "*"))
    if found is None and "." not in function:
        found = next((why for (f, q), why in reasons.items() if f == file and q.rsplit(".", 1)[-1] == function), None)
    return found


#: Each paper's network as ``model=<paper>`` builds it, and the input side a counted step uses: the paper's own
#: for SSD300 and YOLOv1; RetinaNet's 800 px cut to 256 (a CPU step in seconds; the count does not depend on it)
PAPER_INPUT = {"retinanet": 256, "ssd": 300, "yolo": 448}


def count_training_step(
    model: str, batch_size: int = 2, crowd: bool = True, overrides: Sequence[str] = ()
) -> HostSyncCount:
    """The host syncs of one training step (the module's ``training_step``, backward, the optimiser's step) of
    ``model=<model>``'s network on a batch collated as the loaders collate it, on the CPU with the parts' GPU paths,
    after one uncounted step (priors and tables are made once per input size). ``crowd``: the first image holds
    a crowd box too (COCO's ``iscrowd``), so the crowd rule runs."""
    import warnings

    from hydra.utils import instantiate

    import engine.config  # noqa: F401  (registers the config resolvers)
    from detectors.batch import collate_detection
    from detectors.device_paths import gpu_paths

    from .training_step import _trainable, model_config, random_samples

    classes = ",".join(f"c{i}" for i in range(20))
    module = instantiate(model_config(f"model={model}", f"data.classes=[{classes}]", *overrides))
    size = PAPER_INPUT[model]
    samples = random_samples(batch_size, size, 20, 4, size / 16, size / 2, 0)
    if crowd:
        samples[0][1]["iscrowd"] = torch.tensor([1, 0, 0, 0])
    batch = collate_detection(samples, 32 if model == "retinanet" else 1)
    optimizer = module.optimizer_factory(_trainable(module))
    module.train()

    def step() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    with gpu_paths():
        step()
        with HostSyncCount() as count:
            step()
    return count


def main() -> None:
    """``python -m bench.host_syncs``: each paper's count, by site, against its budget."""
    for model, budget in BUDGETS.items():
        count = count_training_step(model)
        print(f"{model}: {count.total} host syncs a training step (budget {budget})", flush=True)
        for (file, function), n in count.sites.most_common():
            print(f"  {n} × {file}:{function}: {reason(file, function) or 'NOT BY DESIGN'}")


if __name__ == "__main__":
    main()
