"""Pre-flight: what train.py checks and settles between building the run and its first step.

A recipe on the data it was written for, no multirun of self-launching DDP, the checkpoint a resume starts from,
bf16 beside trainable BatchNorm (a warning), the memory check (which resolves ``data.batch_size=auto``), the batch
fitted to a small training set, the linear learning-rate scaling, and a fit that would train zero steps stopped.
Each takes the run's config and built parts; none reads Hydra's global state.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, open_dict
from torch import nn

from engine import memory
from engine.detection_module import DetectionModule
from engine.distributed import launches_its_own_processes

log = logging.getLogger(__name__)

# the BatchNorm layers whose weights train (torchvision's FrozenBatchNorm2d is none of them)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def refuse_other_data(cfg: DictConfig) -> None:
    """A paper recipe (``recipe_data: voc``) trained on other data would run its schedule silently on the wrong
    set: stopped, unless ``recipe_data=null`` says it is meant."""
    written_for = cfg.get("recipe_data")
    given = str(cfg.data.get("_target_", "")).rsplit(".", 2)[-2]  # datamodules.voc.VOCDataModule → voc
    if written_for is not None and given != written_for:
        raise ValueError(
            f"experiment {cfg.task_name} is written for data={written_for} (its schedule, input size and metric "
            f"are that data set's) but data={given} was given: drop the data override, or add recipe_data=null "
            f"to run the recipe on this data as it is"
        )


def refuse_multirun_with_own_processes(trainer: L.Trainer, multirun: bool) -> None:
    """Lightning starts local DDP ranks by re-running the command line, which in a multirun (``multirun``: this
    is a job of a Hydra ``-m`` sweep) re-launches the sweep in each child: a rank would silently train with
    another job's hyper-parameters."""
    if multirun and launches_its_own_processes(trainer):
        raise RuntimeError(
            f"a Hydra multirun (-m) cannot use {type(trainer.strategy).__name__} with "
            f"{trainer.world_size} processes started by Lightning: each would re-run the whole sweep. Use "
            f"trainer.strategy=ddp_spawn for a local sweep, a cluster launcher (hydra/launcher=slurm), or one "
            f"`python train.py` per setting"
        )


def newest_own_checkpoint(output_dir: str) -> Path | None:
    """This run folder's checkpoints/last.ckpt or Lightning's SLURM hpc_ckpt_<n>.ckpt, whichever is newer."""
    found = [
        p
        for p in (Path(output_dir, "checkpoints", "last.ckpt"), *Path(output_dir).glob("hpc_ckpt_*.ckpt"))
        if p.is_file()
    ]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str, task_name: str, output_dir: str | None = None) -> str | None:
    """`last` means this run folder's last.ckpt when it has one (a requeued SLURM job keyed by its job id), else
    the newest last.ckpt under runs/<task>/; `auto` is this run folder's last.ckpt if there is one, else a fresh
    start (what a requeued cluster job runs); anything else must be an existing file."""
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        own = newest_own_checkpoint(output_dir or ".")
        if own is not None:
            log.info("ckpt_path=auto: resuming from %s", own)
            return str(own)
        log.info("ckpt_path=auto: no checkpoint in %s yet, starting fresh", output_dir)
        return None
    if ckpt_path == "last":
        own = newest_own_checkpoint(output_dir) if output_dir else None
        if own is not None:
            log.info("resuming from %s", own)
            return str(own)
        found = sorted(Path(log_dir, task_name).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoints/last.ckpt under {Path(log_dir, task_name)}; "
                f"give ckpt_path=<file> or train without ckpt_path first"
            )
        log.info("resuming from %s", found[-1])
        return str(found[-1])
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file (use `last` or a path to a .ckpt)")
    return ckpt_path


def settle_batch(
    cfg: DictConfig, trainer: L.Trainer, model: DetectionModule, datamodule: L.LightningDataModule
) -> None:
    """The checks that settle the training batch, in order: bf16 beside trainable BatchNorm (a warning), the
    memory check (data.batch_size=auto chosen there), and the batch fitted to the training set."""
    warn_bf16_with_trainable_batchnorm(trainer, model)
    check_memory(cfg, trainer, model, datamodule)  # before lr_scaling: it reads the batch size auto chooses
    fit_batch_to_data(cfg, trainer, datamodule)


def warn_bf16_with_trainable_batchnorm(trainer: L.Trainer, model: DetectionModule) -> str | None:
    """bf16-mixed beside trainable BatchNorm: a warning (also returned), measured, not a refusal."""
    if not str(trainer.precision).startswith("bf16"):
        return None
    norms = [m for m in model.net.modules() if isinstance(m, BATCH_NORMS)]
    trainable = [m for m in norms if any(p.requires_grad for p in m.parameters())]
    if not trainable:
        return None
    message = (
        f"trainer.precision={trainer.precision} with {len(trainable)} trainable BatchNorm layers: from random "
        "weights their backbone's bf16 gradient is mostly rounding (RetinaNet R50-FPN: cosine 0.12 with the exact "
        "gradient, float32 1.000, frozen BatchNorm 0.994; python -m bench.bf16_gradients), and model=retinanet "
        "diverged so on a GPU where float32 trained. Use trainer.precision=32, or ImageNet weights with "
        "model.backbone.norm=frozen_bn (the paper's recipe)"
    )
    log.warning(message)
    return message


def check_memory(
    cfg: DictConfig, trainer: L.Trainer, model: DetectionModule, datamodule: L.LightningDataModule
) -> None:
    """memory_check: estimate the run's peak memory from probe steps (engine/memory.py) and stop before the first
    step if it cannot fit; data.batch_size=auto becomes the largest batch that fits (in cfg and the datamodule).
    Processes of a multi-process CPU run share the machine's memory equally; `auto` needs a single process."""
    auto = cfg.data.batch_size == "auto"
    if auto and not cfg.get("memory_check", True):
        raise ValueError("data.batch_size=auto is chosen by the memory check: set memory_check=true or give a number")
    if auto and trainer.world_size > 1:
        raise ValueError(
            f"data.batch_size=auto is chosen by one process's probe; with {trainer.world_size} processes "
            f"give a number (run with trainer.devices=1 data.batch_size=auto to see what fits one)"
        )
    if not cfg.get("memory_check", True) or int(os.environ.get("LOCAL_RANK", 0)) > 0:
        return  # ranks > 0: local rank 0 checked for the whole machine before it started them
    start = time.perf_counter()
    datamodule.prepare_data()
    datamodule.setup("fit")
    device = trainer.strategy.root_device
    share = trainer.world_size // trainer.num_nodes if device.type == "cpu" else 1  # processes on this memory
    available = memory.available_memory(device) / share
    train_input = memory.input_settings(datamodule.train_transform)
    common = dict(available=available, autocast=trainer.precision_plugin.forward_context, device=device)
    estimate = memory.training_estimate(
        model.net,
        datamodule.train_set,
        datamodule.train_transform,
        datamodule.size_divisible,
        batch_size=None if auto else cfg.data.batch_size,
        optimizer=model.optimizer_factory,
        num_workers=datamodule.num_workers,
        **common,
    )
    if auto:
        # no more than the training set: drop_last would leave an epoch without a batch
        batch = min(memory.choose_batch(estimate, available, train_input), len(datamodule.train_set))
        log.info(
            "data.batch_size=auto: %d, the largest batch whose estimated need (~%s: %s) fits %s available "
            "less a %.0f%% margin",
            batch,
            memory.gib(estimate.need(batch)),
            estimate.describe(),
            memory.gib(available),
            100 * memory.AUTO_MARGIN,
        )
        cfg.data.batch_size = datamodule.batch_size = batch
    warnings = [memory.check_batch(estimate, cfg.data.batch_size, available, train_input)]
    val_key = "data.val_batch_size" if cfg.data.get("val_batch_size") else "data.batch_size"
    if datamodule.val_set is not None and trainer.limit_val_batches != 0:
        val = memory.validation_estimate(
            model.net,
            datamodule.val_set,
            datamodule.val_transform,
            datamodule.size_divisible,
            batch_size=datamodule.val_batch_size,
            **common,
        )
        warnings.append(
            memory.check_batch(
                val,
                datamodule.val_batch_size,
                available,
                memory.input_settings(datamodule.val_transform, "data.val_transform"),
                key=val_key,
                auto_hint=False,
            )
        )
    for warning in filter(None, warnings):
        log.warning("memory check: %s", warning)
    log.info(
        "memory check (%.1f s; memory_check=false skips it): data.batch_size=%d needs ~%s of %s available (%s)",
        time.perf_counter() - start,
        cfg.data.batch_size,
        memory.gib(estimate.need(cfg.data.batch_size)),
        memory.gib(available),
        estimate.describe(),
    )


def fit_batch_to_data(cfg: DictConfig, trainer: L.Trainer, datamodule: L.LightningDataModule) -> None:
    """A training set smaller than a batch trains with the batch shrunk to it (a warning says so; the loader drops
    an incomplete last batch, so it would otherwise train nothing); a set with no image per process stops."""
    datamodule.setup("fit")
    images, ranks = len(datamodule.train_set), trainer.world_size
    per_rank = images // ranks
    if per_rank == 0:
        raise ValueError(
            f"the training data holds {images} image(s) for {ranks} process(es): nothing to train on. Check "
            f"data.root and the training split ({describe_training_data(cfg)}), or train on fewer devices"
        )
    batch = int(cfg.data.batch_size)
    fits = min(batch, per_rank)
    if fits == batch:
        return
    log.warning(
        "data.batch_size=%d is more than the %d training image(s)%s: training with batches of %d (give "
        "data.batch_size=%d to silence this; the learning rate is the recipe's, for its batch of %d)",
        batch,
        images,
        f" ({per_rank} per process)" if ranks > 1 else "",
        fits,
        fits,
        batch,
    )
    cfg.data.batch_size = datamodule.batch_size = fits


def describe_training_data(cfg: DictConfig) -> str:
    """The data keys that choose the training images, as `data.key=value` pairs for an error message."""
    keys = ("root", "train_sets", "train_json", "train_images", "num_train")
    return ", ".join(f"data.{k}={cfg.data[k]}" for k in keys if cfg.data.get(k) is not None)


def scale_learning_rate(cfg: DictConfig, trainer: L.Trainer) -> bool:
    """The linear scaling rule (Goyal et al. 2017): lr × total batch ÷ the batch the recipe's lr was set for.
    Returns whether it changed cfg.model.optimizer.lr."""
    scaling = cfg.get("lr_scaling") or {}
    if not scaling.get("enabled"):
        return False
    base = scaling.get("base_batch_size")
    if not base or base < 1:
        raise ValueError(
            f"lr_scaling.base_batch_size={base}: give the total batch size model.optimizer.lr was "
            f"set for (e.g. 16 for RetinaNet's 0.01), or lr_scaling.enabled=false"
        )
    total = cfg.data.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    lr = cfg.model.optimizer.lr * total / base
    log.info(
        "lr_scaling: total batch %d (%d per device × %d devices × %d accumulated) ÷ %d → lr %.6g (from %.6g)",
        total,
        cfg.data.batch_size,
        trainer.world_size,
        trainer.accumulate_grad_batches,
        base,
        lr,
        cfg.model.optimizer.lr,
    )
    with open_dict(cfg):
        cfg.model.optimizer.lr = lr
    return True


def refuse_zero_steps(trainer: L.Trainer, datamodule: L.LightningDataModule) -> None:
    """A fit that would run no training step stops before it starts, naming why (Lightning's own stop, "No
    training batches", exits 0: a run that trained nothing would look like a success)."""
    batches = len(datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    limited = batches if limit is None else (min(batches, limit) if isinstance(limit, int) else int(batches * limit))
    why = None
    if batches == 0:
        why = (
            f"the training loader makes no batch of {datamodule.batch_size} from {len(datamodule.train_set)} images"
            + (
                " (batches hold one orientation: data.aspect_ratio_grouping=false mixes them)"
                if getattr(datamodule, "aspect_ratio_grouping", False)
                else ""
            )
        )
    elif limited == 0:
        why = f"trainer.limit_train_batches={limit} leaves none of the epoch's {batches} batches"
    elif trainer.max_steps == 0:
        why = "trainer.max_steps=0"
    elif trainer.max_epochs == 0:
        why = "trainer.max_epochs=0"
    if why:
        raise ValueError(f"this run would train zero steps: {why}")
