"""Real training steps on the device, through Lightning as train.py takes them: each detector's loss is finite and
falls on a fixed batch, bf16-mixed on the GPU (its fast paths included: RetinaNet's sparse box subnet, the fused focal
loss under autocast) and 32-true on the CPU; a non-finite loss there stops the run naming its step (a skipped one:
tests/engine/test_reliability.py)."""

from dataclasses import replace

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from detectors.batch import DetectionBatch, collate_detection
from engine.detection_module import DetectionModule

from ..conftest import DEVICES, TINY, TINY_MODELS, compose, quiet_trainer

MODELS = {
    **TINY_MODELS,
    "retinanet": (*TINY, "model.head.norm=none"),
}  # the paper's head: its box subnet trains sparsely
PRECISION = {"cpu": "32-true", "cuda": "bf16-mixed"}  # what the CPU and the GPU recipes train at
POISONED = 100  # image ids from here on: a batch whose loss_box is NaN (``poison``)


def module_and_batch(name: str, *overrides: str) -> tuple[DetectionModule, DetectionBatch]:
    """The tiny ``name`` detector (its recipe's optimiser and warm-up: without it YOLO's second step diverges) and a
    fixed batch of 4 of its training images."""
    cfg = compose(*MODELS[name], *overrides)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    return model, collate_detection([data.train_set[i] for i in range(4)])


def poison(model: DetectionModule) -> None:
    """loss_box NaN, through the graph, on batches of POISONED ids (a backward pass would spread it to every weight)."""
    real = model.net.compute_losses

    def compute_losses(batch):
        losses = real(batch)
        if int(batch.image_ids[0]) >= POISONED:
            losses["loss_box"] = losses["loss_box"] * float("nan")
        return losses

    model.net.compute_losses = compute_losses


class Steps(Callback):
    """Each training step's loss (None: skipped), whether it changed the weights and where it ran (Lightning moves
    the module back to the CPU when fit ends)."""

    def __init__(self) -> None:
        self.losses: list[float | None] = []
        self.moved: list[bool] = []
        self.devices: set[str] = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = [p.detach().clone() for p in module.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = (outputs or {}).get("loss")  # none from a skipped step
        self.losses.append(None if loss is None else float(loss))
        self.moved.append(any(not torch.equal(p, b) for p, b in zip(module.parameters(), self.before, strict=True)))
        self.devices |= {module.device.type, batch.images.device.type}


def fit(model: DetectionModule, batches: list[DetectionBatch], device: str, tmp_path) -> Steps:
    """One step per batch, on ``device`` at its precision, as train.py's trainer takes them (no validation)."""
    steps = Steps()
    trainer = quiet_trainer(tmp_path, device, precision=PRECISION[device], max_steps=len(batches), callbacks=[steps])
    trainer.fit(model, DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    assert steps.devices == {device} and trainer.global_step == len(batches)
    return steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_loss_falls_on_a_fixed_batch(name, device, tmp_path):
    model, batch = module_and_batch(name)
    steps = fit(model, [batch] * 8, device, tmp_path)  # no dropout in these recipes: 8 steps of one function
    assert all(loss is not None and torch.isfinite(torch.tensor(loss)) for loss in steps.losses), steps.losses
    assert all(steps.moved)
    # 8 warm-up steps lower RetinaNet's loss by 9 %, SSD's by 50 %, YOLO's by 85 % (CPU; bf16-mixed there the same
    # to 1 %, its rounding averaged over the loss's terms): 5 % is training, not noise
    assert steps.losses[-1] < 0.95 * steps.losses[0], steps.losses


@pytest.mark.parametrize("device", DEVICES)
def test_a_nonfinite_loss_stops_the_run_naming_its_step_and_images(device, tmp_path):
    model, batch = module_and_batch("retinanet")
    poison(model)
    bad = replace(batch, image_ids=batch.image_ids + POISONED)
    ids = ", ".join(str(i) for i in bad.image_ids.tolist())
    with pytest.raises(
        FloatingPointError, match=rf"step 2: non-finite loss_box \(.*\) on the batch of image ids \[{ids}\]"
    ):
        fit(model, [batch, batch, bad, batch], device, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_validation_on_the_device_gives_the_cpus_metrics(name, device, tmp_path):
    """Issue 31: the same weights validated through Lightning on ``device`` and on the CPU give the same COCO and VOC
    figures (within 1e-4), the metrics' device-side counts included (38c428a). Both in float32 with TF32 off: the
    check is of the validation path, not of the GPU's convolution rounding (which may reorder near-equal scores)."""
    model, batch = module_and_batch(name)
    fit(model, [batch] * 40, "cpu", tmp_path / "fit")  # 40 steps on the batch validated: AP above 0
    images = DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    results = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for on in dict.fromkeys(("cpu", device)):
            trainer = quiet_trainer(tmp_path / on, on, precision="32-true", limit_val_batches=1.0)
            results[on] = trainer.validate(model, images, verbose=False)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    cpu, other = results["cpu"], results[device]
    assert cpu["val/map_50"] > 0, cpu  # the model detects something: the comparison is not of zeros
    assert set(cpu) == set(other)
    for key in sorted(cpu):
        assert abs(cpu[key] - other[key]) <= 1e-4, (key, cpu[key], other[key])
