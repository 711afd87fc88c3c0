"""One-stage detectors (RetinaNet, SSD, YOLOv1) as compositions of plain parts."""

import os
from datetime import datetime

from omegaconf import OmegaConf

from .detector import Detector


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


# ${len:${data.classes}} in configs: the number of classes follows the data set's class list
if not OmegaConf.has_resolver("len"):
    OmegaConf.register_new_resolver("len", lambda x: len(x))
# ${run_id:} in conf/hydra/default.yaml; cached: resolved once per config, like Hydra's ${now:}
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)

# conf/hydra/default.yaml: under srun/torchrun every rank runs Hydra; one writes .hydra/, each its own log file
if not OmegaConf.has_resolver("rank_zero"):
    OmegaConf.register_new_resolver("rank_zero", lambda value: value if launched_rank() == 0 else None)
if not OmegaConf.has_resolver("rank_suffix"):
    OmegaConf.register_new_resolver("rank_suffix", lambda: f"_rank{launched_rank()}" if launched_rank() else "")

__all__ = ["Detector"]
