"""The LightningModule around the network (engine/detection_module.py): built from a config, checkpoints of the
layout before it still load."""

import pytest
import torch
from omegaconf import OmegaConf

from engine.detection_module import DetectionModule, upgrade_checkpoint, with_net_prefix

from ..conftest import TINY, compose


def test_from_config_records_the_config_and_refuses_another_target():
    config = OmegaConf.to_container(compose(*TINY).model, resolve=True)
    module = DetectionModule.from_config(config)
    assert module.model_config == config and module.net.class_names == config["class_names"]
    assert all(k.startswith("net.") for k in module.state_dict())
    with pytest.raises(TypeError, match=r"model._target_='torch.nn.Identity' builds a Identity, not a DetectionModule"):
        DetectionModule.from_config({"_target_": "torch.nn.Identity"})


def test_an_old_checkpoint_is_brought_up_to_date_once():
    weight = torch.ones(2)
    old = {
        "state_dict": {"backbone.w": weight, "head.b": weight},
        "callbacks": {
            "AtomicModelCheckpoint{'monitor': 'val/map', 'mode': 'max'}": {"best_model_score": 0.5},
            "RandomStateCheckpoint": {"torch": weight},
        },
    }
    upgraded = upgrade_checkpoint(old)
    assert set(upgraded["state_dict"]) == {"net.backbone.w", "net.head.b"}
    assert set(upgraded["callbacks"]) == {
        "ModelCheckpoint{'monitor': 'val/map', 'mode': 'max'}",
        "RandomStateCheckpoint",
    }
    assert with_net_prefix(upgraded["state_dict"]) == upgraded["state_dict"]  # a current checkpoint is left as it is


def test_each_step_draws_from_its_seed_rank_and_step(monkeypatch):
    """Dropout masks are a function of (seed, rank, step) whatever was drawn before: a resumed run, on any DDP rank,
    draws the uninterrupted run's masks without a saved generator state."""
    from types import SimpleNamespace

    module = DetectionModule.from_config(OmegaConf.to_container(compose(*TINY).model, resolve=True))
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")

    def masks_at(rank: int, step: int, draws_before: int = 0) -> torch.Tensor:
        torch.rand(draws_before)  # what else ran before this step (a validation, a probe, another process)
        module._trainer = SimpleNamespace(global_rank=rank, global_step=step)
        module.on_train_batch_start(None, 0)
        return torch.nn.functional.dropout(torch.ones(64), 0.5)

    assert torch.equal(masks_at(1, 5), masks_at(1, 5, draws_before=1000))
    assert not torch.equal(masks_at(1, 5), masks_at(0, 5))
    assert not torch.equal(masks_at(1, 5), masks_at(1, 6))
