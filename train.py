"""Train a detector: `python train.py model=retinanet data=shapes trainer.max_epochs=2` (see conf/train.yaml).
Bare `python train.py` runs experiment=retinanet_shapes, the CPU recipe `make train` runs.

Writes into its run folder: checkpoints/best.ckpt (by val/map) and last.ckpt, the resolved config
(.hydra/), logs, and metrics.json with the best checkpoint's validation metrics.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

import engine.config  # noqa: F401  (registers the config resolvers, e.g. ${len:...})
from engine import layout, preflight, run_end
from engine.checkpoint_loading import finetune_from
from engine.detection_module import DetectionModule
from engine.distributed import SameConfigOnEveryRank
from engine.known_warnings import ignore_known_harmless
from engine.loggers import finish_loggers

ignore_known_harmless()  # at import: also in the processes ddp_spawn starts, which import this file

BARE_RUN = "experiment=retinanet_shapes"  # what `python train.py` with no arguments runs
bare_invocation = False

log = logging.getLogger("train")


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Callbacks and loggers are dicts of named `_target_` entries; a null group gives none."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (`python train.py -m ...`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def train(cfg: DictConfig) -> dict[str, float]:
    """Build → pre-flight → fit → validate and save, from the composed ``cfg``; the validation metrics. The loggers
    are finished however it ends: one W&B run per Hydra job, the next multirun job must not log into this one."""
    preflight.refuse_other_data(cfg)
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
        finish_loggers(loggers)


def fit_and_validate(
    cfg: DictConfig, datamodule: L.LightningDataModule, callbacks: list, loggers: list
) -> dict[str, float]:
    """The trainer and model built, the pre-flight (engine/preflight.py), the fit, then best.ckpt validated and
    the run's end written (engine/run_end.py)."""
    output_dir = Path(cfg.paths.output_dir)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    preflight.refuse_multirun_with_own_processes(trainer, in_multirun())
    model = DetectionModule.from_config(OmegaConf.to_container(cfg.model, resolve=True))

    preflight.settle_batch(cfg, trainer, model, datamodule)
    # model.channels_last=auto: rank 0 measures at setup, every rank takes its answer (engine/layout.py)
    trainer.callbacks.append(
        layout.ChannelsLastAuto(int(cfg.data.batch_size), OmegaConf.to_container(cfg.model, resolve=True))
    )
    # every rank's config is compared with rank 0's at setup; added once data.batch_size=auto is resolved
    trainer.callbacks.append(SameConfigOnEveryRank(OmegaConf.to_container(cfg, resolve=True)))
    if preflight.scale_learning_rate(cfg, trainer):
        model.use_optimizer(OmegaConf.to_container(cfg.model.optimizer, resolve=True))
    model.data_config = OmegaConf.to_container(cfg.data, resolve=True)  # with the batch size auto chose
    ckpt_path = preflight.resolve_ckpt_path(
        cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name, cfg.paths.output_dir
    )
    if cfg.model.get("finetune_from") and ckpt_path is None:  # a resumed run restores its own weights instead
        finetune_from(model, cfg.model.finetune_from)
    if cfg.get("compile"):
        model.net.compile_parts()
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if ckpt_path is None:
        preflight.refuse_zero_steps(trainer, datamodule)

    try:
        # weights_only: our checkpoints hold tensors and plain containers, so nothing in them can run code
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # last.ckpt is saved (CheckpointOnSignal); the grace period leaves no time to validate
        run_end.write_metrics(trainer, output_dir, "the last validation before SIGTERM")
        raise
    if trainer.global_step == 0 and ckpt_path is None:
        raise RuntimeError("the run trained zero steps (see the log above for Lightning's reason)")
    run_end.save_last_checkpoint(trainer)

    # the checkpoint callback that monitors a metric (conf/callbacks: best_checkpoint) holds best.ckpt
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
    if cfg.get("validate_best") and best:
        trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    metrics = run_end.write_metrics(trainer, output_dir, f"best checkpoint {best}" if best else "the last validation")
    if trainer.is_global_zero:
        run_end.list_bad_images(datamodule, output_dir)
        print(f"\nrun folder: {output_dir}")
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
