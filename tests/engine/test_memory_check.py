"""The memory check before training (engine/memory.py, engine/preflight.py) and what bare `python train.py` runs."""

import runpy
import sys

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import train
from engine import memory, preflight
from tests.conftest import ROOT, TINY, compose

GiB = 2**30


def in_use_plus(extra: float) -> float:
    """A fake "available": the memory in use plus ``extra``, with glibc's free heap handed back first, as the probe
    does before its base (earlier tests in this worker can leave GiBs free on the heap; counted here as in use, they
    would widen the room by that much and let a run that should not fit pass)."""
    memory._malloc_trim()
    return memory.rss() + extra


def parts(*overrides: str, tmp_path=None):
    cfg = compose(*TINY, *overrides)
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path or "."),
    )
    return cfg, trainer, instantiate(cfg.model), instantiate(cfg.data)


def test_estimate_matches_the_measured_peak_of_real_steps():
    """The line from the probes (batch 1 and 2) predicts the peak of a real AdamW step at batch 4 (the optimizer's
    state created by a step before). Compared above the process's memory before the probes, which the estimate
    carries unchanged: under-estimated by at most the 15 % auto keeps free (more would let auto pick a batch that
    is killed), over-estimated by at most 30 % (more would waste batches). The probe leaves weights, BatchNorm
    statistics and the random stream as they were."""
    cfg = compose(*TINY, "data.image_size=256", "data.batch_size=4")
    data, module = instantiate(cfg.data), instantiate(cfg.model)
    model = module.net
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    memory._malloc_trim()  # free heap earlier tests left in this process is not memory in use
    base = memory.rss()
    estimate = memory.training_estimate(
        model,
        data.train_set,
        data.train_transform,
        data.size_divisible,
        memory.available_memory(),
        optimizer=module.optimizer_factory,
    )
    assert estimate.measured and estimate.shape == (256, 256)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())

    optimizer = module.optimizer_factory(model.parameters())
    batch = memory.probe_batch(data.train_set, 4, estimate.shape)
    memory.training_step(model, batch, memory.nullcontext)
    optimizer.step()  # creates the optimizer's state, held through the next step
    with memory.PeakMemory() as measured:
        memory.training_step(model, batch, memory.nullcontext)
        optimizer.step()
    ratio = (estimate.need(4) - base) / (measured.peak - base)
    assert 0.85 <= ratio <= 1.3, (memory.gib(estimate.need(4)), memory.gib(measured.peak), memory.gib(base))


def test_a_run_that_cannot_fit_stops_before_its_first_step_naming_need_available_and_settings(tmp_path, monkeypatch):
    """train.train with 1 GiB more than the process holds: no step is taken (Trainer.fit is never reached) and the
    error gives the estimate, the memory available and the settings that lower the need."""
    available = in_use_plus(GiB)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: available)
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("fit reached"))
    cfg = compose(*TINY, "data.image_size=256", "data.batch_size=64", f"paths.output_dir={tmp_path}", "logger=csv")
    with pytest.raises(memory.NotEnoughMemory) as e:
        train.train(cfg)
    message = str(e.value)
    assert message.startswith("data.batch_size=64 needs ~") and "per image at 256×256" in message, message
    assert "is available: set data.batch_size≤" in message
    assert "(or auto), or a smaller input (data.image_size" in message
    assert "memory_check=false" in message


def test_auto_picks_the_largest_batch_that_fits_and_lr_scaling_sees_it(tmp_path, monkeypatch):
    cfg, trainer, model, data = parts(
        "data.batch_size=auto",
        "data.image_size=160",
        "lr_scaling.enabled=true",
        "lr_scaling.base_batch_size=16",
        tmp_path=tmp_path,
    )
    available = in_use_plus(0.5 * GiB)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: available)
    seen = {}
    real = memory.training_estimate
    monkeypatch.setattr(memory, "training_estimate", lambda *a, **k: seen.setdefault("e", real(*a, **k)))
    preflight.check_memory(cfg, trainer, model, data)
    batch, estimate = cfg.data.batch_size, seen["e"]
    assert isinstance(batch, int) and 2 <= batch < len(data.train_set) and data.batch_size == batch
    budget = available * (1 - memory.AUTO_MARGIN)
    assert estimate.need(batch) <= budget < estimate.need(batch + 1)
    lr = cfg.model.optimizer.lr
    assert preflight.scale_learning_rate(cfg, trainer)
    assert cfg.model.optimizer.lr == pytest.approx(lr * batch / 16)


def test_the_switch_and_what_auto_refuses(tmp_path, monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("memory_check=false must not probe")

    monkeypatch.setattr(memory, "training_estimate", no_probe)
    preflight.check_memory(*parts("memory_check=false", tmp_path=tmp_path))  # off: no probe, no error
    with pytest.raises(ValueError, match="batch_size=auto is chosen by the memory check: set memory_check=true"):
        preflight.check_memory(*parts("memory_check=false", "data.batch_size=auto", tmp_path=tmp_path))
    with pytest.raises(ValueError, match="with 2 processes give a number"):
        preflight.check_memory(*parts("trainer=ddp_sim", "data.batch_size=auto", tmp_path=tmp_path))


def test_bare_train_py_runs_the_cpu_recipe_and_says_so(tmp_path, monkeypatch):
    """`python train.py` alone composes exactly experiment=retinanet_shapes, recorded in .hydra/overrides.yaml and
    logged. Run as a script (runpy), stopped where training would start (L.seed_everything, train's first call)."""
    from hydra.core.global_hydra import GlobalHydra

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(L, "seed_everything", stop)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py")])
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))  # the run folder under tmp_path/runs
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # Hydra re-raises Stop instead of exiting
    try:
        with pytest.raises(Stop):
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
    run = next((tmp_path / "runs" / "retinanet_shapes").iterdir())
    assert OmegaConf.load(run / ".hydra" / "overrides.yaml") == ["experiment=retinanet_shapes"]
    expected = compose("experiment=retinanet_shapes")
    with open_dict(expected):
        expected.pop("hydra")
    assert OmegaConf.load(run / ".hydra" / "config.yaml") == expected
    assert "no arguments: running experiment=retinanet_shapes" in (run / "train.log").read_text()


class Photos:
    """A data set as the memory check sees one: aspect ratios (w ÷ h) from its annotations, and samples."""

    def __init__(self, ratios: list[float], shapes: list[tuple[int, int]]) -> None:
        self.ratios, self.shapes = ratios, shapes

    def aspect_ratios(self) -> list[float]:
        return self.ratios

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int):
        return torch.zeros((3, *self.shapes[index]), dtype=torch.uint8), {}


def test_the_probed_input_is_what_the_transform_declares():
    """The probe's input comes from the transform's ``max_output_size`` at each of the data set's aspect ratios
    (the largest output), padded; a transform that declares none, or keeps the image's size, or no transform at
    all, falls back to the data set's largest sample. The messages name the transform's ``size_settings``."""
    from datamodules.transforms import ResizeTo, ShortSideAugmentation, ShortSideResize, SSDAugmentation

    photos = Photos([0.5, 1.33, 2.0], [(90, 70), (50, 120)])
    assert memory.largest_input(ResizeTo([48, 80]), photos, 32) == (64, 96)
    # ratio 0.5: 1000×500 → shorter side 320 → 640×320; ratio 2: 1000×2000 → longer side capped 640 → 320×640
    assert memory.largest_input(ShortSideAugmentation([256, 320], 640), photos) == (640, 320)
    assert memory.largest_input(ShortSideResize(300, 400), Photos([1.25], [(8, 8)]), 32) == (320, 384)  # 300×375
    # 800/1333: a 1.6 ratio in between makes 800×1280 (scale 0.8), more than either end's 667×1333
    assert memory.largest_input(ShortSideResize(800, 1333), Photos([0.5, 1.6, 2.0], [(8, 8)])) == (800, 1280)
    for keeps_size in (SSDAugmentation(size=None), None, lambda image, target: (image, target)):
        assert memory.largest_input(keeps_size, photos) == (90, 120)  # the largest sample, side by side

    assert memory.input_settings(ResizeTo(64), "data.val_transform") == "data.val_transform.size"
    assert memory.input_settings(ShortSideAugmentation(), "k") == "k.min_sizes / k.max_size"
    assert memory.input_settings(ShortSideResize()) == "data.train_transform.min_size / data.train_transform.max_size"
    assert memory.input_settings(SSDAugmentation(size=None)) == "data.image_size (or a resizing transform)"
