"""Train a detector: `python train.py model=retinanet data=shapes trainer.max_epochs=2` (see conf/train.yaml).
Bare `python train.py` runs experiment=retinanet_shapes, the CPU recipe `make train` runs.

Writes into its run folder: checkpoints/best.ckpt (by val/map) and last.ckpt, the resolved config
(.hydra/), logs, and metrics.json with the best checkpoint's validation metrics.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

import engine.config  # noqa: F401  (registers the config resolvers, e.g. ${len:...})
from engine import layout, memory
from engine.callbacks import ValidateAtTheEnd
from engine.checkpoint_loading import finetune_from
from engine.detection_module import DetectionModule
from engine.distributed import SameConfigOnEveryRank, launches_its_own_processes
from engine.loggers import finish_loggers

BARE_RUN = "experiment=retinanet_shapes"  # what `python train.py` with no arguments runs
bare_invocation = False

log = logging.getLogger("train")


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Callbacks and loggers are dicts of named `_target_` entries; a null group gives none."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


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


def format_metrics(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"  {k:<{width}}  {v:8.4f}" for k, v in metrics.items())


def refuse_multirun_with_own_processes(trainer: L.Trainer) -> None:
    """Lightning starts local DDP ranks by re-running the command line, which in a multirun re-launches the
    sweep in each child: a rank would silently train with another job's hyper-parameters."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and launches_its_own_processes(trainer):
        raise RuntimeError(
            f"a Hydra multirun (-m) cannot use {type(trainer.strategy).__name__} with "
            f"{trainer.world_size} processes started by Lightning: each would re-run the whole sweep. Use "
            f"trainer.strategy=ddp_spawn for a local sweep, a cluster launcher (hydra/launcher=slurm), or one "
            f"`python train.py` per setting"
        )


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


def warn_bf16_with_trainable_batchnorm(trainer: L.Trainer, model: DetectionModule) -> str | None:
    """bf16-mixed beside trainable BatchNorm: a warning (also returned), measured, not a refusal."""
    if not str(trainer.precision).startswith("bf16"):
        return None
    norms = [m for m in model.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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
    keys = ("root", "train_sets", "train_json", "train_images", "num_train")
    return ", ".join(f"data.{k}={cfg.data[k]}" for k in keys if cfg.data.get(k) is not None)


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


def train(cfg: DictConfig) -> dict[str, float]:
    refuse_other_data(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if cfg.data.get("classes") is None:  # data.classes=null: the training data named them; the model is sized by them
        log.info("data.classes from the training data: %d classes %s", len(datamodule.classes), datamodule.classes)
        with open_dict(cfg):
            cfg.data.classes = list(datamodule.classes)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    try:
        return fit_and_validate(cfg, datamodule, callbacks, loggers)
    except BaseException:
        finish_loggers(loggers, exit_code=1)  # the W&B run shows as failed
        raise
    finally:
        finish_loggers(loggers)  # one W&B run per Hydra job: the next multirun job must not log into this one


def fit_and_validate(
    cfg: DictConfig, datamodule: L.LightningDataModule, callbacks: list, loggers: list
) -> dict[str, float]:
    output_dir = Path(cfg.paths.output_dir)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    refuse_multirun_with_own_processes(trainer)
    model = DetectionModule.from_config(OmegaConf.to_container(cfg.model, resolve=True))
    warn_bf16_with_trainable_batchnorm(trainer, model)
    check_memory(cfg, trainer, model, datamodule)  # before lr_scaling: it reads the batch size auto chooses
    fit_batch_to_data(cfg, trainer, datamodule)
    # model.channels_last=auto: rank 0 measures at setup, every rank takes its answer (engine/layout.py)
    trainer.callbacks.append(
        layout.ChannelsLastAuto(int(cfg.data.batch_size), OmegaConf.to_container(cfg.model, resolve=True))
    )
    # every rank's config is compared with rank 0's at setup; added once data.batch_size=auto is resolved
    trainer.callbacks.append(SameConfigOnEveryRank(OmegaConf.to_container(cfg, resolve=True)))
    if scale_learning_rate(cfg, trainer):
        model.use_optimizer(OmegaConf.to_container(cfg.model.optimizer, resolve=True))
    model.data_config = OmegaConf.to_container(cfg.data, resolve=True)  # with the batch size auto chose
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name, cfg.paths.output_dir)
    if cfg.model.get("finetune_from") and ckpt_path is None:  # a resumed run restores its own weights instead
        finetune_from(model, cfg.model.finetune_from)
    if cfg.get("compile"):
        model.net.compile_parts()
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if ckpt_path is None:
        refuse_zero_steps(trainer, datamodule)
    try:
        # weights_only: our checkpoints hold tensors and plain containers, so nothing in them can run code
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # last.ckpt is saved (CheckpointOnSignal); the grace period leaves no time to validate
        write_metrics(trainer, output_dir, "the last validation before SIGTERM")
        raise
    if trainer.global_step == 0 and ckpt_path is None:
        raise RuntimeError("the run trained zero steps (see the log above for Lightning's reason)")
    save_last_checkpoint(trainer)

    # the checkpoint callback that monitors a metric (conf/callbacks: best_checkpoint) holds best.ckpt
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
    if cfg.get("validate_best") and best:
        trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    metrics = write_metrics(trainer, output_dir, f"best checkpoint {best}" if best else "the last validation")
    if trainer.is_global_zero:
        list_bad_images(datamodule, output_dir)
        print(f"\nrun folder: {output_dir}")
    return metrics


def list_bad_images(datamodule: L.LightningDataModule, output_dir: Path) -> None:
    """The image files the run skipped as unreadable (data.bad_images=skip), in bad_images.txt and the summary."""
    bad = getattr(datamodule, "bad_files", None)
    if not bad:
        return
    path = output_dir / "bad_images.txt"
    path.write_text("".join(f"{file}: {problem}\n" for file, problem in bad.items()))
    print(f"\n{len(bad)} unreadable image file(s) were skipped (data.bad_images=skip), listed in {path}")


def save_last_checkpoint(trainer: L.Trainer) -> None:
    """last.ckpt at the final step where the loop saved none there (a run without validation data ends between
    its epoch-end saves); the ``ValidateAtTheEnd`` callback knows the step of the last save."""
    end = next((c for c in trainer.callbacks if isinstance(c, ValidateAtTheEnd)), None)
    last = next((c for c in trainer.checkpoint_callbacks if not c.monitor), None)
    if end is None or last is None or end.saved_step == trainer.global_step:
        return
    path = Path(last.dirpath, f"{last.filename}{last.FILE_EXTENSION}")
    trainer.save_checkpoint(path)
    log.info("saved %s at the final step %d", path, trainer.global_step)


def write_metrics(trainer: L.Trainer, output_dir: Path, what: str) -> dict[str, float]:
    """The validation metrics Lightning holds now, into metrics.json and the console (rank 0)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if metrics and trainer.is_global_zero:  # every rank holds the same gathered metrics; one writes them
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"\nvalidation metrics ({what}):\n{format_metrics(metrics)}")
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if bare_invocation:
        log.info(
            "no arguments: running %s (the CPU recipe `make train` runs); choose another with e.g. "
            "`python train.py model=ssd data=voc data.root=...` or `python train.py experiment=<name>`",
            BARE_RUN,
        )
    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)


def run() -> None:
    """`python train.py` with no arguments runs BARE_RUN: added to the command line before Hydra reads it, so the
    run folder's .hydra/overrides.yaml records it (and DDP ranks, which re-run the command line, see it too)."""
    if len(sys.argv) == 1:
        global bare_invocation
        sys.argv.append(BARE_RUN)
        bare_invocation = True  # main logs it, once Hydra has set up logging
    main()


if __name__ == "__main__":
    run()
