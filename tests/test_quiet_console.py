"""A quiet console (issue 33): a default run prints none of the library warnings a user cannot act on. Loader
workers are capped at the CPUs the process may use, memory is pinned only for an accelerator, W&B is not handed
Lightning's `anonymous=None`, and Lightning's LeafSpec deprecation is filtered (engine/known_warnings.py)."""

import os

import pytest
import torch
from hydra.utils import instantiate

from datamodules.base import usable_cpus

from .conftest import DEVICES, ROOT, TINY, compose, quiet_trainer
from .preloaded import run_python

# what the console showed before, one line each: torch's worker and pin_memory warnings, W&B's, Lightning's
FIXED = (
    "worker processes in total. Our suggested max number of worker",
    "'pin_memory' argument is set as true but no accelerator is found",
    "The anonymous setting has no effect",
    "`isinstance(treespec, LeafSpec)` is deprecated",
)


def test_usable_cpus_is_this_process_affinity():
    assert usable_cpus() == len(os.sched_getaffinity(0)) >= 1


def test_workers_are_capped_at_the_usable_cpus():
    more = usable_cpus() + 3
    data = instantiate(compose(*TINY, f"data.num_workers={more}").data)
    assert data.num_workers == usable_cpus()
    assert data.train_dataloader().num_workers == data.val_dataloader().num_workers == usable_cpus()
    assert instantiate(compose(*TINY, "data.num_workers=0").data).num_workers == 0  # fewer stay as given


@pytest.mark.parametrize("device", DEVICES)
def test_memory_is_pinned_only_for_an_accelerator(tmp_path, device):
    data = instantiate(compose(*TINY, "data.pin_memory=true").data)
    # no trainer yet (train.py counts the batches before fit): pinned where an accelerator exists, as torch pins
    assert data.train_dataloader().pin_memory == (torch.cuda.is_available() or torch.backends.mps.is_available())
    data.trainer = quiet_trainer(tmp_path, device)
    assert data.train_dataloader().pin_memory == data.val_dataloader().pin_memory == (device == "cuda")
    unpinned = instantiate(compose(*TINY, "data.pin_memory=false").data)
    unpinned.trainer = data.trainer
    assert not unpinned.train_dataloader().pin_memory  # pin_memory=false stays off on any device


@pytest.mark.slow
def test_a_default_run_prints_none_of_the_fixed_warnings(tmp_path):
    """A short run with the defaults that warned: W&B on (offline), more workers than CPUs, pin_memory=true on a
    machine whose trainer has no GPU (trainer=cpu)."""
    done = run_python(
        [
            ROOT / "train.py",
            *TINY,
            "trainer=cpu",
            "trainer.max_steps=2",
            "model.channels_last=false",
            f"data.num_workers={usable_cpus() + 2}",
            "data.pin_memory=true",
            "logger=many",
            f"paths.log_dir={tmp_path}",
        ],
        tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "wandb sync" in out  # W&B ran, so its warning had its chance
    assert [line for line in FIXED if line in out] == []
