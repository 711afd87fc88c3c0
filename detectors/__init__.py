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


# ${len:${data.classes}} in configs: the number of classes follows the data set's class list
if not OmegaConf.has_resolver("len"):
    OmegaConf.register_new_resolver("len", lambda x: len(x))
# ${run_id:} in conf/hydra/default.yaml; cached: resolved once per config, like Hydra's ${now:}
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)

__all__ = ["Detector"]
