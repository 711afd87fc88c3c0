"""Training end to end: the loss falls, train.py writes its run folder, configs compose."""

import json
import pytest
import torch
from hydra.utils import instantiate

from bench.training_curve import plot_run, plot_runs, read_metrics, run_label, timed_validations
from detectors.batch import collate_detection

from .conftest import ROOT, TINY, compose, fit_fixed_batch
from .preloaded import run_python


def tiny_model_and_data(*overrides):
    cfg = compose(*TINY, *overrides)
    return instantiate(cfg.model), instantiate(cfg.data)


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch():
    model, data = tiny_model_and_data()
    batch = collate_detection([data.train_set[i] for i in range(8)])
    history = fit_fixed_batch(model, batch, 60)  # the shapes recipe's AdamW, without warm-up
    assert history[-1]["loss_cls"] < 0.5 * history[0]["loss_cls"]
    assert history[-1]["loss_box"] < 0.5 * history[0]["loss_box"]


def test_image_without_objects_trains():
    model, data = tiny_model_and_data()
    image, _ = data.train_set[0]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": torch.tensor(0)}
    batch = collate_detection([(image, empty), (image, empty)])
    losses = model.net.compute_losses(batch)
    assert losses["loss_box"] == 0 and torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("model", ["retinanet", "retinanet_torchvision"])
def test_model_configs_instantiate(model):
    cfg = compose(f"model={model}", "model.backbone.depth=18")
    detector = instantiate(cfg.model).net
    assert detector.head.num_anchors == 9 and detector.num_classes == len(cfg.data.classes)


def run_train(tmp_path, *overrides):
    done = run_python(
        [
            ROOT / "train.py",
            *TINY,
            f"paths.log_dir={tmp_path}",
            "trainer.max_epochs=2",
            "model.scheduler.milestones=[6,7]",
            "model.scheduler.warmup_steps=2",
            *overrides,
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_train_py_writes_checkpoints_metrics_and_resumes(tmp_path):
    out = run_train(tmp_path)
    run_dirs = list((tmp_path / "retinanet_shapes").iterdir())
    assert len(run_dirs) == 1
    run = run_dirs[0]
    assert f"run folder: {run}" in out
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "val/map",
        "val/map_50",
        "val/map_75",
        "val/map_small",
        "val/mar_100",
        "val/voc07_map_50",
        "val/voc_map_50",
        "val/ap/ellipse",
    ):
        assert key in metrics and -1 <= metrics[key] <= 1
    timed = [r["time/train_min"] for r in read_metrics(run) if "time/train_min" in r]
    assert len(timed) == 2 and 0 < timed[0] < timed[1]  # one per validation, growing
    assert plot_run(run, tmp_path / "curve.png").stat().st_size > 10_000
    assert len(timed_validations(run)) == 2  # the re-validation of best.ckpt carries no clock
    assert plot_runs([run, run], tmp_path / "compare.png").stat().st_size > 10_000
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 16 and ckpt["model_config"]["backbone"]["depth"] == 18
    assert ckpt["class_names"] == ["ellipse", "rectangle", "triangle", "cross", "diamond"]

    # resume from last.ckpt for one more epoch: global step continues from 16
    run_train(tmp_path, "ckpt_path=last", "trainer.max_epochs=3")
    newest = max((tmp_path / "retinanet_shapes").iterdir(), key=lambda p: p.name)
    resumed = torch.load(newest / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 24


def test_a_run_is_named_by_its_task_and_seed_on_the_comparison_plot(tmp_path):
    run = tmp_path / "anywhere" / "ssd_b8"  # hydra.run.dir elsewhere: the folder names nothing
    (run / ".hydra").mkdir(parents=True)
    assert run_label(run) == "anywhere"  # no saved config: the folder above, as runs/<task>/<date>
    (run / ".hydra" / "config.yaml").write_text("task_name: ssd_cpu\nseed: 7\n")
    assert run_label(run) == "ssd_cpu, seed 7"


def test_help_lists_config_groups():
    done = run_python([ROOT / "train.py", "--help"], ROOT, timeout=120)
    assert done.returncode == 0
    for group in ("model", "data", "trainer", "logger", "callbacks", "experiment", "debug"):
        assert f"{group}:" in done.stdout


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    done = run_python(
        [ROOT / "train.py", *TINY, f"paths.log_dir={tmp_path}", "ckpt_path=nope.ckpt"], tmp_path, timeout=300
    )
    assert done.returncode != 0 and "ckpt_path=nope.ckpt: no such file" in done.stderr


@pytest.mark.parametrize(
    "precision, overrides, warned",
    [
        ("bf16-mixed", (), True),  # ResNet-18 with trainable BatchNorm
        ("32-true", (), False),
        ("bf16-mixed", ("model.backbone.norm=frozen_bn",), False),
    ],
)
def test_bf16_beside_trainable_batchnorm_is_warned_with_the_fix(precision, overrides, warned, caplog):
    from types import SimpleNamespace

    from engine.preflight import warn_bf16_with_trainable_batchnorm

    module = instantiate(compose(*TINY, *overrides).model)
    message = warn_bf16_with_trainable_batchnorm(SimpleNamespace(precision=precision), module)
    assert (message is not None) == warned
    if warned:
        assert "trainer.precision=bf16-mixed with 20 trainable BatchNorm layers" in message
        assert "trainer.precision=32" in message and "model.backbone.norm=frozen_bn" in message
        assert message in caplog.text
