"""Reliability (issue 9): a NaN/Inf loss stops the run naming its step, term and images (or is skipped and counted);
box decoding cannot overflow; mixed precision keeps losses and IoU in float32; checkpoints are never half-written; a
run killed mid-epoch and resumed from last.ckpt ends with the weights of an uninterrupted run; SIGTERM saves a
checkpoint and exits cleanly; and no config, annotation or checkpoint file can run code."""

import errno
import importlib
import json
import os
import pkgutil
import re
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from detectors.batch import collate_detection
from detectors.boxes import BoxCoder, batched_box_iou
from engine.checkpoint_saving import AtomicCheckpointIO

from ..conftest import DEVICES, ROOT, TINY, TINY_MODELS, compose, quiet_trainer
from ..preloaded import run_python


def tiny(*overrides):
    cfg = compose(*TINY, *overrides)
    return instantiate(cfg.model), instantiate(cfg.data)


def poison(model, term: str = "loss_box", value: float = float("nan")) -> None:
    """Make one loss term non-finite, through the graph (so a backward pass would spread it to every weight)."""
    real = model.net.compute_losses

    def compute_losses(batch):
        losses = real(batch)
        return {**losses, term: losses[term] * value}

    model.net.compute_losses = compute_losses


# --- non-finite losses -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("term", "value"), [("loss_box", float("nan")), ("loss_cls", float("inf"))])
def test_nonfinite_loss_stops_naming_step_term_and_image_ids(term, value):
    model, data = tiny()
    batch = collate_detection([data.train_set[i] for i in (3, 5)])
    poison(model, term, value)
    with pytest.raises(
        FloatingPointError,
        match=rf"step 0: non-finite {term} \(loss_cls=.*, loss_box=.*\) on the "
        rf"batch of image ids \[3, 5\].*model.nonfinite_loss=skip",
    ):
        model.training_step(batch, 0)


def test_nonfinite_loss_setting_is_checked():
    with pytest.raises(Exception, match=r"model.nonfinite_loss='maybe': choose 'error' .* or 'skip'"):
        tiny("++model.nonfinite_loss=maybe")


@pytest.mark.parametrize("device", DEVICES)
def test_skipped_batches_leave_the_weights_untouched_and_are_counted(tmp_path, caplog, device):
    model, data = tiny("++model.nonfinite_loss=skip")
    poison(model)  # every batch: a NaN loss whose backward pass would make every weight NaN
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = quiet_trainer(tmp_path, device, max_steps=3)
    trainer.fit(model, datamodule=data)  # the module is back on the CPU after fit
    assert model.skipped_batches == 3 and float(trainer.callback_metrics["train/skipped_batches"]) == 3
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no optimizer step was taken
    assert re.search(
        r"step \d+: non-finite loss_box .* image ids \[.*\]: batch skipped .* 3 skipped so far", caplog.text
    )


# --- box decoding and mixed precision ---------------------------------------------------------------------------
MODELS = TINY_MODELS


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])  # RetinaNet's, SSD's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_box_deltas_decode_to_finite_boxes(weights, dtype):
    priors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [100.0, 100.0, 164.0, 132.0]])
    deltas = torch.tensor([[[0.0, 0.0, 1e4, 1e4]], [[1e4, -1e4, 1e30, 88.8]], [[0.0, 0.0, 3e38, -1e30]]])
    boxes = BoxCoder(weights).decode(deltas.to(dtype), priors)  # (3, 2, 4): every delta against both priors
    assert torch.isfinite(boxes).all()
    widths = boxes[..., 2] - boxes[..., 0]
    slack = 1.001 if dtype == torch.float32 else 1.05  # bf16 rounds the clamp itself (log 62.5 → 4.156)
    assert (widths <= (priors[:, 2] - priors[:, 0]) * 1000 / 16 * slack).all()  # torchvision's log(1000/16) clamp


def test_huge_yolo_sizes_decode_to_finite_boxes():
    from detectors.yolo import decode_boxes

    model = instantiate(compose(*MODELS["yolo"]).model).net
    outputs, priors = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    box = torch.full_like(outputs["box_deltas"], 1e20)
    assert torch.isfinite(decode_boxes(box, priors, (64, 64), 5)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["retinanet", "ssd", "yolo"])
def test_losses_under_bf16_autocast_are_float32_and_finite(name, device):
    cfg = compose(*MODELS[name])
    model, data = instantiate(cfg.model).net.to(device), instantiate(cfg.data)
    if name == "yolo":  # at initialisation a cell's two boxes are near-ties in RMSE to its object (darknet's rule
        model.assigner.no_overlap = "first"  # without overlap): bf16 rounding would swap whole terms between them
    batch = move_data_to_device(collate_detection([data.train_set[i] for i in range(4)]), device)
    full = model.compute_losses(batch)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        outputs, _ = model(batch.images)
        losses = model.compute_losses(batch)
    assert any(v.dtype == torch.bfloat16 for v in outputs.values())  # autocast is on: the network runs in bf16
    for key, value in losses.items():
        assert value.dtype == torch.float32, key
        # bf16 rounds each activation to 8 significant bits (≤ 2^-9 ≈ 0.2 %), compounding over the layers; the loss
        # terms, sums over many priors, moved ≤ 0.4 % on the CPU but YOLO's objectness (IoU − C)², a difference of
        # near-equal numbers at initialisation, 3 %: 5 %
        assert torch.isfinite(value) and value.item() == pytest.approx(full[key].item(), rel=0.05), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_iou_of_low_precision_boxes_is_computed_in_float32(dtype):
    a = torch.tensor([[0.0, 0.0, 300.0, 300.0], [10.0, 20.0, 200.0, 120.0]]).to(dtype)
    b = torch.tensor([[2.0, 0.0, 300.0, 296.0], [12.0, 24.0, 210.0, 124.0]]).to(dtype)
    iou = batched_box_iou(a, b)
    assert iou.dtype == torch.float32  # areas of 90,000 px² round to 512 px² steps in bf16
    torch.testing.assert_close(iou, batched_box_iou(a.float(), b.float()), atol=1e-6, rtol=0)


# --- atomic checkpoints ------------------------------------------------------------------------------------------
class Toy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)), batch_size=4)


def fit_toy(tmp_path: Path, checkpoint: ModelCheckpoint, plugins: list | None = None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[checkpoint],
        logger=False,
        plugins=plugins,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Toy())
    return trainer


def crash_in_torch_save(monkeypatch) -> None:
    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("killed during torch.save")

    monkeypatch.setattr(torch, "save", dies_midway)


def crash_while_moving_into_place(monkeypatch) -> None:
    """Lightning writes to the system temp folder and moves the file into place: with /tmp on another filesystem
    than the checkpoints (a node's local disk), the move is a copy, and here the process dies halfway through it."""

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", src)

    def half_copy(src, dst, *, follow_symlinks=True):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError("killed during the copy")

    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(shutil, "copyfile", half_copy)


def test_the_first_save_reports_its_size_and_time(tmp_path, caplog):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="last", monitor=None)
    with caplog.at_level("INFO", logger="engine.checkpoint_saving"):
        trainer = fit_toy(tmp_path, checkpoint, plugins=[AtomicCheckpointIO()])
        trainer.save_checkpoint(tmp_path / "again.ckpt")
    reports = [r.getMessage() for r in caplog.records if "MiB written in" in r.getMessage()]
    assert len(reports) == 1 and "last.ckpt" in reports[0]  # the first at INFO, later ones at DEBUG


@pytest.mark.parametrize("crash", [crash_in_torch_save, crash_while_moving_into_place])
def test_a_crash_during_a_save_leaves_the_previous_last_ckpt_intact(tmp_path, monkeypatch, crash):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="last", monitor=None)
    trainer = fit_toy(tmp_path, checkpoint, plugins=[AtomicCheckpointIO()])
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    assert torch.load(last, weights_only=True)["global_step"] == 2
    with torch.no_grad():
        trainer.lightning_module.layer.weight += 1  # the next checkpoint differs
    crash(monkeypatch)
    with pytest.raises((OSError, RuntimeError), match="killed during"):
        trainer.save_checkpoint(last)
    monkeypatch.undo()
    assert last.read_bytes() == saved  # the old checkpoint, whole
    trainer.save_checkpoint(last)  # the next save goes through and leaves no partial file
    assert last.read_bytes() != saved and not list(last.parent.glob("*.part"))
    torch.load(last, weights_only=True)


def test_lightning_alone_can_leave_a_truncated_last_ckpt(tmp_path, monkeypatch):
    """Why AtomicCheckpointIO exists: Lightning 2.6's checkpoint writer, with /tmp and the checkpoints on different
    filesystems, copies into last.ckpt itself. (If this starts failing, Lightning became atomic on its own.)"""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="last", monitor=None)
    trainer = fit_toy(tmp_path, checkpoint)
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    crash_while_moving_into_place(monkeypatch)
    with pytest.raises(OSError, match="killed during the copy"):
        trainer.save_checkpoint(last)
    monkeypatch.undo()
    assert last.read_bytes() != saved
    with pytest.raises(Exception):
        torch.load(last, weights_only=True)


# --- killed and resumed runs -------------------------------------------------------------------------------------
# a tiny SSD (6 MB checkpoints), 4 steps an epoch, 3 epochs, deterministic, with the fault-handling callbacks of
# conf/callbacks/default.yaml (++: whether or not a callbacks group in use has them)
RUN = (
    "experiment=ssd_shapes",
    "data.image_size=64",
    "model.backbone.width=0.125",
    "data.num_train=16",
    "data.num_val=4",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "data.num_workers=0",
    "seed=3",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "model.scheduler.warmup_steps=2",
    "model.scheduler.milestones=[6,9]",
    "logger=csv",
    "validate_best=false",
    # one layout for both runs: `auto` re-measures when the shared cache lost its entry (another test's run
    # rewrote the file), and a resumed run in the other layout rounds differently
    "model.channels_last=false",
    "~callbacks.prediction_images",
    "~callbacks.pr_curves",
    "++callbacks.random_state._target_=engine.checkpoint_saving.RandomStateCheckpoint",
    "++callbacks.checkpoint_on_signal._target_=engine.checkpoint_saving.CheckpointOnSignal",
    "++callbacks.checkpoint_on_signal.dirpath=${paths.output_dir}/checkpoints",
)


def train(
    log_dir: Path, *overrides: str, returncode: int = 0, env: dict[str, str] | None = None, run: tuple = RUN
) -> str:
    log_dir.mkdir(exist_ok=True)
    done = run_python([ROOT / "train.py", *run, f"paths.log_dir={log_dir}", *overrides], log_dir, env=env)
    assert done.returncode == returncode, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def last_checkpoint(log_dir: Path, task: str = "ssd_shapes") -> tuple[Path, dict]:
    """The newest run folder's last.ckpt, loaded as train.py's resume loads it: tensors and plain types only."""
    run = max((log_dir / task).iterdir(), key=lambda p: p.name)
    return run, torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_training_state(resumed: dict, whole: dict) -> None:
    """Weights and AdamW's moments equal to 1e-6 (the same steps on the same batches, in the same order)."""
    assert resumed["global_step"] == whole["global_step"]
    assert resumed["lr_schedulers"][0]["_last_lr"] == whole["lr_schedulers"][0]["_last_lr"]
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, atol=1e-6, rtol=0, msg=key)
    for index, state in whole["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(
                resumed["optimizer_states"][0]["state"][index][name], value, atol=1e-6, rtol=0, msg=f"{index}.{name}"
            )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    train(tmp_path / "whole")
    fault = ("++callbacks.fault._target_=engine.checkpoint_saving.SignalAtStep", "++callbacks.fault.step=10")
    train(tmp_path / "killed", *fault, returncode=-signal.SIGKILL)  # mid-epoch 3 of 3 (steps 8..11)
    _, at_kill = last_checkpoint(tmp_path / "killed")
    assert (at_kill["global_step"], at_kill["epoch"]) == (8, 1)  # the end of epoch 2, intact
    train(tmp_path / "killed", "ckpt_path=last")
    assert last_checkpoint(tmp_path / "killed")[1]["global_step"] == 12
    assert_same_training_state(last_checkpoint(tmp_path / "killed")[1], last_checkpoint(tmp_path / "whole")[1])


@pytest.mark.slow
@pytest.mark.parametrize(("step", "workers"), [(1, 0), (6, 2), (9, 0)])  # epochs are steps 0-3, 4-7, 8-11
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, step, workers):
    loader = (f"data.num_workers={workers}",)
    train(tmp_path / "whole", *loader)
    fault = ("++callbacks.fault._target_=engine.checkpoint_saving.SignalAtStep", f"++callbacks.fault.step={step}")
    train(tmp_path / "stopped", *loader, *fault, "++callbacks.fault.signum=15")
    _, at_stop = last_checkpoint(tmp_path / "stopped")
    assert at_stop["global_step"] == step + 1 and (step + 1) % 4  # mid-epoch: the batch in flight finished
    train(tmp_path / "stopped", *loader, "ckpt_path=last")
    assert_same_training_state(last_checkpoint(tmp_path / "stopped")[1], last_checkpoint(tmp_path / "whole")[1])


@pytest.mark.slow
def test_sigkill_after_a_save_every_n_steps_resumes_mid_epoch_exactly(tmp_path):
    every = ("callbacks.last_checkpoint.every_n_train_steps=3", "data.num_workers=2")
    train(tmp_path / "whole", *every)
    fault = ("++callbacks.fault._target_=engine.checkpoint_saving.SignalAtStep", "++callbacks.fault.step=10")
    train(tmp_path / "killed", *every, *fault, returncode=-signal.SIGKILL)
    _, at_kill = last_checkpoint(tmp_path / "killed")
    assert at_kill["global_step"] == 9  # saved after step 9: the second batch of epoch 3 (steps 8..11)
    train(tmp_path / "killed", *every, "ckpt_path=last")
    assert_same_training_state(last_checkpoint(tmp_path / "killed")[1], last_checkpoint(tmp_path / "whole")[1])


@pytest.mark.slow
def test_slurm_requeue_signal_then_kill_resumes_exactly(tmp_path):
    """SLURM's warning before a time limit or preemption (`#SBATCH --signal=USR1@90`): Lightning saves
    hpc_ckpt_1.ckpt and requeues the job, which is killed later; the requeued job (same id, `ckpt_path=auto`) resumes
    from that file and ends as the uninterrupted run. The signal lands at a step's start, where Lightning's own
    handler would save weights that have not trained on the batch its data position counts as trained."""
    train(tmp_path / "whole")
    slurm = {
        **os.environ,
        **dict.fromkeys(("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_ID"), "0"),
        **{"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242"},
    }
    faults = [
        f"++callbacks.{name}.{key}={value}"
        for name, step, signum in (("usr1", 5, signal.SIGUSR1), ("kill", 7, signal.SIGKILL))
        for key, value in (
            ("_target_", "engine.checkpoint_saving.SignalAtStep"),
            ("step", step),
            ("signum", int(signum)),
        )
    ]
    out = train(tmp_path / "job", *faults, returncode=-signal.SIGKILL, env=slurm)
    run = tmp_path / "job" / "ssd_shapes" / "slurm-4242"
    assert "SLURM requeue runs now" in out
    requeue = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert requeue["global_step"] == 6  # held to the end of the step in flight (5), then saved
    assert last_checkpoint(tmp_path / "job")[1]["global_step"] == 4  # the end of epoch 1: older than hpc_ckpt_1
    train(tmp_path / "job", "ckpt_path=auto", env=slurm)
    assert_same_training_state(last_checkpoint(tmp_path / "job")[1], last_checkpoint(tmp_path / "whole")[1])


@pytest.mark.slow
def test_ddp_with_dropout_resumes_mid_epoch_exactly(tmp_path):
    """2 ranks × 4 images a step, 32 images: 4 steps an epoch; the uninterrupted run also saves at step 6 (epoch 2
    of 3), and a run resumed from that file ends as it does. The sampler's position and, with YOLOv1's dropout,
    each rank's masks come back: they are drawn from (seed, rank, step), as a checkpoint holds rank 0's random
    state alone. (Two DDP runs, not a stopped third: each DDP run starts a fresh interpreter for rank 1.)"""
    ssd_only = ("experiment=", "model.backbone.width=")
    yolo = (
        *(o for o in RUN if not o.startswith(ssd_only)),
        "experiment=yolo_shapes",
        "model.head.dropout=0.5",
        "model.head.hidden=32",
        "trainer=ddp_sim",
        "data.num_train=32",
    )
    at_step_6 = [  # a second ModelCheckpoint, every 6 steps, keeping each file: step_6.ckpt, step_12.ckpt
        f"++callbacks.at_step_6.{key}={value}"
        for key, value in (
            ("_target_", "lightning.pytorch.callbacks.ModelCheckpoint"),
            ("dirpath", tmp_path / "at_step_6"),
            ("filename", "'step_{step}'"),
            ("auto_insert_metric_name", "false"),
            ("every_n_train_steps", 6),
            ("save_top_k", -1),
        )
    ]
    train(tmp_path / "whole", *at_step_6, run=yolo)
    mid = tmp_path / "at_step_6" / "step_6.ckpt"
    assert torch.load(mid, map_location="cpu", weights_only=True)["global_step"] == 6
    train(tmp_path / "resumed", f"ckpt_path={mid}", run=yolo)
    whole = last_checkpoint(tmp_path / "whole", "yolo_shapes")[1]
    assert_same_training_state(last_checkpoint(tmp_path / "resumed", "yolo_shapes")[1], whole)


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_at_the_current_step_and_exits_cleanly(tmp_path):
    out = train(
        tmp_path,
        "++callbacks.fault._target_=engine.checkpoint_saving.SignalAtStep",
        "++callbacks.fault.step=6",
        "++callbacks.fault.signum=15",
    )  # exit code 0: Lightning's graceful stop
    stopped, checkpoint = last_checkpoint(tmp_path)
    assert "SIGTERM: saved" in out and checkpoint["global_step"] == 7  # the batch in flight finishes first
    # metrics.json holds the last validation's (epoch 1's, step 4): the signal's grace period leaves no time for one
    assert "validation metrics (the last validation before SIGTERM)" in out
    assert json.loads((stopped / "metrics.json").read_text())["val/map"] >= 0
    train(tmp_path, "ckpt_path=last")
    finished, checkpoint = last_checkpoint(tmp_path)
    assert finished != stopped and checkpoint["global_step"] == 12 and (finished / "metrics.json").is_file()


# --- nothing runs code from files --------------------------------------------------------------------------------
def test_pil_decompression_bomb_limit_stays_on_after_importing_our_modules():
    import datamodules
    import detectors
    import engine
    import evaluation

    for package in (detectors, datamodules, engine, evaluation):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    importlib.import_module("train")
    from PIL import Image

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0


def test_yaml_configs_load_without_python_tags():
    import yaml
    from omegaconf import OmegaConf
    from omegaconf._utils import get_yaml_loader

    assert issubclass(get_yaml_loader(), yaml.SafeLoader)  # Hydra reads conf/*.yaml through OmegaConf's loader
    with pytest.raises(yaml.constructor.ConstructorError):
        OmegaConf.create("x: !!python/object/apply:os.system ['echo pwned']")


def _calls(source: str, name: str) -> list[str]:
    """The text of each ``name(...)`` call in ``source`` (parentheses matched)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", source):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        calls.append(source[match.start() : end + 1])
    return calls


def test_no_loader_in_our_code_can_run_code_from_a_file():
    """YAML through safe loaders, XML through defusedxml, no pickle/eval/exec, and every torch.load states its
    weights_only (True unless a caller opted into trusting a file)."""
    files = [p for d in ("detectors", "datamodules", "bench", "sweeps") for p in (ROOT / d).rglob("*.py")]
    files += sorted(ROOT.glob("*.py"))
    forbidden = [
        r"yaml\.(load|unsafe_load|full_load)\(",
        r"yaml\.(Unsafe|Full)?Loader\b",
        r"pickle\.loads?\(",
        r"(?<![.\w])(eval|exec)\(",
        r"^\s*(import|from) (xml|lxml)\b",
        r"shell=True",
    ]
    for path in files:
        source = path.read_text()
        for pattern in forbidden:
            found = re.search(pattern, source, re.MULTILINE)
            assert found is None, f"{path.relative_to(ROOT)}: {found.group(0)!r}"
        for call in _calls(source, "torch.load"):
            assert "weights_only=" in call, f"{path.relative_to(ROOT)}: {call} (say weights_only=True)"
