"""The config resolvers every entry point registers on import, and the run's id and rank they read.

``${len:${data.classes}}`` sizes the heads from the class list; ``${run_id:}`` names the run folder
(conf/hydra/default.yaml); ``${rank_zero:...}`` and ``${rank_suffix:}`` keep one ``.hydra/`` and a log file a rank
when srun or torchrun starts every rank.
"""

from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf


def _length(items: object) -> int:
    """``${len:...}``; a null class list is the one that has to be read from the data first (train.py does)."""
    if items is None:
        raise ValueError(
            "data.classes is null here: the class names are read from the training data when train.py starts; "
            "elsewhere give them: data.classes=[name, ...]"
        )
    return len(items)


def run_id() -> str:
    """The run folder's name: ``slurm-<job id>`` inside a SLURM job step, so a requeued job (same id) finds its own
    folder and checkpoints again and every task of the step agrees on it; else the start time."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if job and step is not None:
        return f"slurm-{job}" if step == "0" else f"slurm-{job}.{step}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def launched_rank() -> int:
    """This process's global rank when a cluster launcher started every rank (SLURM's srun, torchrun), else 0."""
    return int(os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or 0)


def register_resolvers() -> None:
    """Idempotent: every entry point (train/eval/predict/export, the bench, the tests) imports this module."""
    if not OmegaConf.has_resolver("len"):
        OmegaConf.register_new_resolver("len", _length)
    if not OmegaConf.has_resolver("run_id"):  # cached: resolved once per config, like Hydra's ${now:}
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("rank_zero"):
        OmegaConf.register_new_resolver("rank_zero", lambda value: value if launched_rank() == 0 else None)
    if not OmegaConf.has_resolver("rank_suffix"):
        OmegaConf.register_new_resolver("rank_suffix", lambda: f"_rank{launched_rank()}" if launched_rank() else "")


register_resolvers()
