"""Logging: the W&B logger never waits for a login, one W&B run per job, and the pictures of the run folder
(predictions grid, precision–recall plot). All offline: nothing here reaches W&B's servers."""

import json
import logging
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image

from engine.loggers import finish_loggers, wandb_logger, wandb_mode
from evaluation.visualization import class_colors, plot_pr_curves, prediction_grid

from ..conftest import TINY, compose

NAMES = ["ellipse", "rectangle", "triangle", "cross", "diamond"]


@pytest.fixture(autouse=True)
def _wandb_sandbox(tmp_path, monkeypatch):
    """No login, no W&B files outside tmp_path, whatever the machine's own W&B set-up."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    import wandb

    if wandb.run is not None:  # a failed test must not leave its run to the next one
        wandb.run.finish()


def wandb_records(run_dir, timeout: float = 30.0):
    """The records of an offline run's ``run-<id>.wandb`` file (LevelDB log format: 7-byte file header, 32 KiB
    blocks of chunks with a 7-byte header each) decoded as wandb's protobuf Records, once the run's exit record
    is there: wandb-core writes the file in the background and may finish it a moment after ``run.finish()``."""
    from wandb.proto import wandb_internal_pb2

    path, deadline = next(run_dir.glob("run-*.wandb")), time.monotonic() + timeout
    while True:
        records = _read_records(path.read_bytes(), wandb_internal_pb2.Record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _read_records(data: bytes, record_type) -> list:
    assert data[:4] == b":W&B"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = record_type()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_config(run_dir) -> dict:
    config = {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in items})
    return config


def test_mode_comes_from_env_and_falls_back_to_offline_without_login(monkeypatch, caplog):
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    with caplog.at_level(logging.WARNING, logger="engine.loggers"):
        assert wandb_mode() == "offline"
    assert "wandb sync" in caplog.text
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    with pytest.raises(ValueError, match="online, offline, disabled"):
        wandb_mode("sometimes")


def test_disabled_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lg = wandb_logger(project="p", name="n", save_dir=str(tmp_path / "run"))
    lg.log_hyperparams({"model": {"lr": 0.1}})
    lg.log_metrics({"val/map": 0.5}, step=1)
    finish_loggers([lg])
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]


def test_multirun_jobs_are_named_and_grouped(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    hydra_config = HydraConfig.instance()
    monkeypatch.setattr(hydra_config, "cfg", hydra_config.cfg)  # restored after the test
    hydra_config.set_config(compose("hydra.mode=MULTIRUN", "hydra.job.num=3", f"paths.log_dir={tmp_path}"))
    lg = wandb_logger(project="p", name="task", save_dir=str(tmp_path), mode="disabled")
    sweep = Path(HydraConfig.get().sweep.dir).name
    assert lg._wandb_init["name"] == "task-3" and lg._wandb_init["group"] == f"task-{sweep}"
    assert wandb_logger(project="p", name="task", group="mine", mode="disabled")._wandb_init["group"] == "mine"


def test_offline_run_folder_is_written_and_finish_starts_a_new_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ids = []
    for job in range(2):  # two multirun jobs in one process
        lg = wandb_logger(project="p", name="n", save_dir=str(tmp_path / f"job{job}"), tags=["t"], group="g")
        lg.log_hyperparams({"model": {"lr": 0.1 * (job + 1)}})
        ids.append(lg.experiment.id)
        finish_loggers([lg])
        finish_loggers([lg])  # twice: a no-op
    assert ids[0] != ids[1]
    for job, run_id in enumerate(ids):
        (run_dir,) = (tmp_path / f"job{job}" / "wandb").glob(f"offline-run-*-{run_id}")  # what `wandb sync` takes
        assert run_config(run_dir)["model"] == {"lr": pytest.approx(0.1 * (job + 1))}


def test_finish_loggers_ignores_other_loggers_and_unstarted_runs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    lg = wandb_logger(project="p", save_dir=str(tmp_path), mode="offline")
    import wandb

    finish_loggers([CSVLogger(tmp_path), lg])
    assert wandb.run is None and not (tmp_path / "wandb").exists()  # finishing started no run


def colour_pixels(picture: np.ndarray, color) -> int:
    return int((picture[..., :3] == np.array(color, dtype=np.uint8)).all(-1).sum())


def test_prediction_grid_draws_boxes_in_class_colours():
    image = torch.full((3, 64, 48), 40, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    pred = {
        "boxes": torch.tensor([[6.0, 5.0, 28.0, 38.0], [0.0, 0.0, 10.0, 10.0]]),
        "scores": torch.tensor([0.9, 0.1]),
        "labels": torch.tensor([3, 2]),
    }
    grid = prediction_grid([image], [target], [pred], NAMES, score_threshold=0.3, tile=128).permute(1, 2, 0).numpy()
    colors = class_colors(len(NAMES))
    assert grid.shape == (128 + 8, 2 * 128 + 12, 3)
    left, right = grid[:, : grid.shape[1] // 2], grid[:, grid.shape[1] // 2 :]
    assert colour_pixels(left, colors[1]) > 100 and colour_pixels(left, colors[3]) == 0  # ground truth
    assert colour_pixels(right, colors[3]) > 100 and colour_pixels(right, colors[1]) == 0  # predictions ≥ 0.3
    assert colour_pixels(right, colors[2]) == 0  # the 0.1 one is not shown


def test_pr_plot_has_a_line_per_class(tmp_path):
    recall = torch.linspace(0, 1, 101)
    curves = {"ellipse": (recall, 1 - 0.5 * recall), "rectangle": (recall, torch.full((101,), -1.0))}
    picture = plot_pr_curves(curves, tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 5_000 and picture.ndim == 3
    line = tuple(round(c * 0.8) for c in class_colors(2)[0])
    assert np.abs(picture.astype(int) - line).sum(-1).min() < 10  # the ellipse line, in its colour


# the second job only needs its W&B run: no checkpoints, no re-validation
SECOND_JOB = ("validate_best=false", "callbacks.best_checkpoint=null", "callbacks.last_checkpoint=null")
FAST = (
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=1",
    "trainer.log_every_n_steps=1",
    "data.num_val=8",
    "callbacks.prediction_images.num_images=4",
    "callbacks.progress_bar=null",
)


@pytest.mark.slow
def test_tiny_training_writes_pictures_and_one_wandb_run_per_job(tmp_path, monkeypatch):
    import train  # train.py's train(), run twice in one process as Hydra runs the jobs of a multirun

    monkeypatch.setenv("WANDB_MODE", "offline")
    started = []  # the loggers of each job, to finish them as train() does at its end
    instantiate_group = train.instantiate_group
    monkeypatch.setattr(train, "instantiate_group", lambda cfg: started.append(instantiate_group(cfg)) or started[-1])
    runs = []
    for job in range(2):
        out = tmp_path / f"job{job}"
        cfg = compose(
            *TINY,
            *FAST,
            "logger=many",
            f"paths.output_dir={out}",
            f"paths.root_dir={tmp_path}",
            *(() if job == 0 else SECOND_JOB),
        )
        with open_dict(cfg):
            del cfg["hydra"]  # as @hydra.main hands it to train()
        train.train(cfg)
        finish_loggers(started[-1])  # a no-op where train() finished them itself
        runs.append(out)

    first = runs[0]
    grid = np.asarray(Image.open(first / "predictions" / "epoch_000.png").convert("RGB"))
    assert grid.shape[1] == 4 * 320 + 5 * 4  # 2 images per row, ground truth + predictions each
    val_set = instantiate(compose(*TINY, "data.num_val=8").data).val_set
    for k in {int(k) for i in range(4) for k in val_set[i][1]["labels"]}:  # the classes in the images shown
        assert colour_pixels(grid, class_colors(len(NAMES))[k]) > 50, NAMES[k]
    assert (first / "predictions" / "validate.png").is_file()  # the re-validation of best.ckpt
    assert (first / "pr_curve.png").stat().st_size > 10_000
    assert (first / "csv" / "metrics.csv").is_file()

    ids = []
    for out in runs:
        (run_dir,) = (out / "wandb").glob("offline-run-*")
        ids.append(run_dir.name.rsplit("-", 1)[1])
        config = run_config(run_dir)  # the resolved Hydra config, as train.py logs it
        assert config["model"]["backbone"]["depth"] == 18 and config["data"]["num_val"] == 8
        assert config["logger"]["wandb"]["project"] == "one-stage-detectors"
    assert ids[0] != ids[1]
    history = [
        r.history
        for r in wandb_records(next((first / "wandb").glob("offline-run-*")))
        if r.WhichOneof("record_type") == "history"
    ]
    logged = {item.key or item.nested_key[0] for h in history for item in h.item}
    assert {"val/predictions", "val/pr_curve", "val/ap_per_class", "val/map", "train/loss_cls", "lr-AdamW"} <= logged
