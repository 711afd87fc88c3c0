"""Surviving faults in a training run: checkpoints that are never half-written, a checkpoint when the job is told
to stop (SIGTERM: SLURM's time limit or scancel), and the random state a resumed run needs to draw the same data
order and augmentation as an uninterrupted one (conf/trainer/default.yaml and conf/callbacks/default.yaml).

Lightning 2.6 writes a checkpoint to a temporary file in the system's temp folder and moves it into place
(fsspec's local transaction): a rename when both are on one filesystem, but a copy straight into the final file
when they are not (``/tmp`` on a node's local disk, checkpoints on a shared one), so a kill during that copy leaves
a truncated ``last.ckpt``. ``AtomicCheckpointIO`` writes next to the final file and ``os.replace``s it.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer (a ``trainer.plugins`` entry, conf/trainer/default.yaml) that writes
    ``<path>.part`` and renames it over ``path``: a reader, or a resumed run, sees the old checkpoint or the new
    one, never a partial file. Every file the trainer saves goes through it (``ModelCheckpoint``'s,
    ``CheckpointOnSignal``'s, ``trainer.save_checkpoint``), on the rank that writes. Each save's size and time
    are logged (the first at INFO: what ``every_n_train_steps`` would cost)."""

    saves = 0  # checkpoints this writer saved (per instance once it saves)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        path = os.fspath(path)
        if "://" in path:  # object stores (s3://, gs://) replace whole objects; there is no rename to do
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        start = time.perf_counter()
        partial = f"{path}.part"
        super().save_checkpoint(checkpoint, partial, storage_options)
        _fsync(partial)  # the bytes are on disk before the name points at them (a power cut after the rename)
        os.replace(partial, path)
        _fsync(os.path.dirname(os.path.abspath(path)))  # and the rename itself is on disk
        seconds, size = time.perf_counter() - start, os.path.getsize(path) / 2**20
        self.saves += 1  # the first save said at INFO, what a save every N steps would cost; the others at DEBUG
        log.log(
            logging.INFO if self.saves == 1 else logging.DEBUG, "%s: %.1f MiB written in %.2f s", path, size, seconds
        )


class CheckpointOnSignal(Callback):
    """On SIGTERM (SLURM sends it at the time limit and on scancel/preemption; Lightning then stops after the current
    batch), and on Ctrl-C, save ``<dirpath>/<filename>.ckpt``, so ``ckpt_path=last`` or ``auto`` resumes from that step
    rather than from the last epoch end. The process then exits with code 0, as Lightning's SIGTERM stop does.

    Under SLURM with auto-requeue (``#SBATCH --signal=SIGUSR1@120``), Lightning's handler of the requeue signal saves
    ``hpc_ckpt_<n>.ckpt`` and requeues the job the moment the signal lands, which can be mid-step: weights from before
    the optimizer step beside a data position that counts the batch as trained, so the resumed run would skip it.
    This callback holds that handler back to the end of the step in flight (at most one step later).

    The checkpoint is mid-epoch: the training loader (``datamodules.sampling.ResumableDataLoader``) goes on with
    the rest of that epoch's batches on resume, as the uninterrupted run would.
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.dirpath, self.filename = dirpath, filename
        self._held: list[tuple[Any, int, Any]] = []  # (Lightning's handler, signum, frame) to run at the step's end

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # private, as Lightning's own signal connector reads it: the public `trainer.strategy.cluster_environment`
        # exists on parallel strategies only, not on a one-GPU SLURM job's (docs/ARCHITECTURE.md §3)
        environment = trainer._accelerator_connector.cluster_environment
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        signum = environment.requeue_signal
        handler = signal.getsignal(signum)
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signum, lambda num, frame: self._held.append((handler, num, frame)))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        while self._held:
            handler, signum, frame = self._held.pop(0)
            log.warning(
                "signal %d at step %d: Lightning's SLURM requeue runs now, between steps", signum, trainer.global_step
            )
            handler(signum, frame)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # Ctrl-C: the same save, nothing trained is lost
            what = "Ctrl-C"
        elif isinstance(exception, SIGTERMException) or trainer.received_sigterm:
            what = "SIGTERM"
        else:
            return
        path = os.path.join(self.dirpath, f"{self.filename}.ckpt")
        os.makedirs(self.dirpath, exist_ok=True)
        trainer.save_checkpoint(path)  # atomic through the trainer's AtomicCheckpointIO
        log.warning(
            "%s: saved %s at step %d (epoch %d); resume with ckpt_path=last (or auto)",
            what,
            path,
            trainer.global_step,
            trainer.current_epoch,
        )


class RandomStateCheckpoint(Callback):
    """Keeps torch's, NumPy's and Python's global random states in each checkpoint and restores them on resume.

    The loaders' shuffling, their workers' seeds and the augmentations all draw from torch's global generator, which
    Lightning neither saves nor restores: without this a resumed run sees a different data order and different
    augmentations from the epoch it resumes at (and so different weights). Stored as tensors and lists, so the
    checkpoint still loads with ``torch.load(weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, python_state, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": {"version": version, "state": list(python_state), "gauss": gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        n = state_dict["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        p = state_dict["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class SignalAtStep(Callback):
    """Fault injection: sends ``signum`` (9 SIGKILL, 15 SIGTERM, 10 SIGUSR1) to this process when training reaches
    ``step`` optimizer steps, to rehearse a crash or a cluster's stop, e.g.
    ``python train.py +callbacks.fault._target_=engine.checkpoint_saving.SignalAtStep +callbacks.fault.step=100``."""

    def __init__(self, step: int, signum: int = int(signal.SIGKILL)) -> None:
        self.step, self.signum = int(step), int(signum)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            log.warning("SignalAtStep: sending signal %d at step %d", self.signum, self.step)
            os.kill(os.getpid(), self.signum)
