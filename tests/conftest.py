import atexit
import copy
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine.config  # noqa: E402,F401  (registers the config resolvers, e.g. ${len:...})
from bench.gpu_check import QUICK_NETWORKS  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
# a test's device parameter: every CPU run checks the test itself, `pytest -m cuda` (bench/gpu_check.py) its GPU case
DEVICES = (
    "cpu",
    pytest.param(
        "cuda", marks=(pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
    ),
)
# the default logger is CSV + W&B: no W&B run for every train.py the suite starts (engine/test_logging.py sets its own)
os.environ.setdefault("WANDB_MODE", "disabled")
# model.channels_last=auto caches its measurement (engine/layout.py): the suite's runs keep theirs out of ~/.cache
if "DETECTORS_CACHE_DIR" not in os.environ:
    os.environ["DETECTORS_CACHE_DIR"] = tempfile.mkdtemp(prefix="detectors-cache-")
    atexit.register(shutil.rmtree, os.environ["DETECTORS_CACHE_DIR"], ignore_errors=True)
# `pytest -n N` (pytest-xdist, what `make test` runs): the cores shared among the workers, the processes they start
# (train.py runs, the preloaded server's children) included; more threads than cores slows every one of them
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def compose(*overrides: str):
    """The training config as `python train.py <overrides>` would see it (Hydra's compose API); each caller gets
    its own copy of a composition cached by its overrides (Hydra takes ~0.4 s a composition here, the copy ~ms)."""
    return copy.deepcopy(_composed(overrides))


@functools.cache
def _composed(overrides: tuple[str, ...]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=True)


# each detector's tiny config: a step in well under a second on the CPU (the sizes `gpu_check --quick` trains too)
TINY_MODELS = {model: (f"experiment={model}_shapes", *sizes) for model, sizes in QUICK_NETWORKS.items()}
TINY = (*TINY_MODELS["retinanet"], "data.num_train=64", "data.num_val=16", "data.batch_size=8")


def quiet_trainer(tmp_path, device: str = "cpu", **kwargs):
    """A Lightning trainer on ``device`` for a test's few steps: no logger, checkpoint, progress bar, summary or
    validation."""
    import lightning as L

    return L.Trainer(
        **{
            "accelerator": "gpu" if device == "cuda" else "cpu",
            "devices": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": tmp_path,
            **kwargs,  # a test's own settings win
        }
    )


# our postprocesses decode and score in float32 (at least float32 under autocast), from float32 priors, whatever the
# network's dtype: one rounding of a coordinate of magnitude m is ≤ m·2^-24, and the decode chains ~4 of them
FLOAT32_ROUNDINGS_IN_DECODE = 4


def assert_same_detections(
    ours, theirs, label_offset: int = 0, min_detections: int = 10, box_atol: float = 1e-3, score_atol: float = 1e-5
):
    """Our per-image detections equal torchvision's: boxes to ``box_atol`` px, scores to ``score_atol``, same labels
    (``label_offset`` = 1 where torchvision counts background as class 0)."""
    for o, t in zip(ours, theirs, strict=True):
        assert len(t["scores"]) > min_detections
        assert len(o["scores"]) == len(t["scores"])
        torch.testing.assert_close(o["scores"].double(), t["scores"].double(), atol=score_atol, rtol=0)
        torch.testing.assert_close(o["boxes"].double(), t["boxes"].double(), atol=box_atol, rtol=0)
        assert torch.equal(o["labels"] + label_offset, t["labels"])


def detections_in_float64(ours, theirs, images: list) -> tuple[list, list]:
    """(our detections, torchvision's) of uint8 ``images`` with both models in float64: ours reads the uint8 batch,
    torchvision's the same pixels as float [0, 1], as its data loader would give them."""
    from detectors.batch import collate_detection

    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    batch = collate_detection([(im, {**empty, "image_id": torch.tensor(i)}) for i, im in enumerate(images)])
    ours.double(), theirs.double()
    with torch.no_grad():
        return ours.detect(batch), theirs([im.double() / 255 for im in images])


def float32_box_atol(model) -> float:
    """The box tolerance for a float64 ``model`` whose detections passed through our float32 decode: a few float32
    roundings of the largest coordinate involved, its priors' (those of the one input size it has seen)."""
    (priors,) = model.priors._cache.values()
    return FLOAT32_ROUNDINGS_IN_DECODE * 2.0**-24 * float(priors.boxes.abs().max())


def fit_fixed_batch(model, batch, steps: int) -> list[dict[str, float]]:
    """Train ``model`` (a DetectionModule) on one batch for ``steps`` steps with its own optimiser; the loss terms at
    each step."""
    opt = model.optimizer_factory(model.parameters())
    model.train()
    history = []
    for _ in range(steps):
        losses = model.net.compute_losses(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


def pytest_collection_finish(session):
    """Start the preloaded-interpreter server (tests/preloaded.py) as soon as tests that use it are selected: its
    ~10 s of imports then overlap the tests that run before them."""
    if not session.config.option.collectonly and any(
        getattr(getattr(item, "module", None), "run_python", None) for item in session.items
    ):
        from . import preloaded

        preloaded.start()
