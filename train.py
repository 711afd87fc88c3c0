"""Train a detector: `python train.py model=retinanet data=shapes trainer.max_epochs=2` (see conf/train.yaml).

Writes into its run folder: checkpoints/best.ckpt (by val/map) and last.ckpt, the resolved config
(.hydra/), logs, and metrics.json with the best checkpoint's validation metrics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import detectors  # noqa: F401  (registers the ${len:...} resolver)

log = logging.getLogger("train")


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Callbacks and loggers are dicts of named `_target_` entries; a null group gives none."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str, task_name: str) -> str | None:
    """`last` means the newest last.ckpt under runs/<task>/; anything else must be an existing file."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        found = sorted(Path(log_dir, task_name).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"ckpt_path=last: no checkpoints/last.ckpt under {Path(log_dir, task_name)}; "
                                    f"give ckpt_path=<file> or train without ckpt_path first")
        log.info("resuming from %s", found[-1])
        return str(found[-1])
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file (use `last` or a path to a .ckpt)")
    return ckpt_path


def format_metrics(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"  {k:<{width}}  {v:8.4f}" for k, v in metrics.items())


def train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    model.model_config = OmegaConf.to_container(cfg.model, resolve=True)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    # the checkpoint callback that monitors a metric (conf/callbacks: best_checkpoint) holds best.ckpt
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
    if cfg.get("validate_best") and best:
        trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if not trainer.sanity_checking and metrics:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if metrics:
        print(f"\nvalidation metrics ({'best checkpoint ' + best if best else 'last epoch'}):\n"
              f"{format_metrics(metrics)}")
    print(f"\nrun folder: {output_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
