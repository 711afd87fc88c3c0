"""Guards for multi-process runs under Hydra: every rank must train with the same settings."""

from __future__ import annotations

from typing import Any

import lightning as L


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as {"a.b.0": value}."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(reference: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The flattened keys whose values differ (or exist in one config only)."""
    return sorted(k for k in reference.keys() | other.keys() if reference.get(k, ...) != other.get(k, ...))


class SameConfigOnEveryRank(L.Callback):
    """At setup, compares each rank's resolved config with rank 0's and stops, naming the ranks and the keys.

    Lightning's launcher re-runs the command line on ranks 1..N-1, and Hydra composes the config again there:
    anything that differs between processes (an environment variable, a time-stamped value, a sweep) would
    otherwise train each rank with other hyper-parameters, silently.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = flatten(config)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        configs = _all_gather_object(self.config)  # once per run: a few kB per rank
        differing = {rank: config_differences(configs[0], c) for rank, c in enumerate(configs)}
        differing = {rank: keys for rank, keys in differing.items() if keys}
        if differing:
            shown = "; ".join(f"rank {r}: {', '.join(keys[:5])}" for r, keys in differing.items())
            raise RuntimeError(
                f"processes composed different configs from rank 0's ({shown}): every process must "
                f"see the same command line and environment (check ${{now:}} and ${{oc.env:}} "
                f"interpolations, and do not combine a multirun with trainer.strategy=ddp)"
            )


def _all_gather_object(obj: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def launches_its_own_processes(trainer: L.Trainer) -> bool:
    """True when Lightning will start the other ranks by re-running this command (local DDP), as opposed to a
    cluster (SLURM, torchrun) that started every rank itself, or to ``ddp_spawn`` which forks this process."""
    launcher = trainer.strategy.launcher
    # the launchers have no public names (lightning.pytorch.strategies.launchers exports only `_`-prefixed ones) and
    # no public property tells the command re-run from ddp_spawn (is_interactive_compatible is False for both)
    if launcher is None or type(launcher).__name__ != "_SubprocessScriptLauncher":
        return False
    return trainer.world_size > 1 and not launcher.cluster_environment.creates_processes_externally
