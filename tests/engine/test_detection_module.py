"""The LightningModule around the network (engine/detection_module.py): built from a config, checkpoints of the
layout before it still load."""

import inspect

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detectors.ssd import SSD300_LAYERS
from engine.checkpoint_loading import build_model, load_checkpoint
from engine.detection_module import CONFIG_ONLY_KEYS, DetectionModule, upgrade_checkpoint, with_net_prefix

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
        module.trainer = SimpleNamespace(global_rank=rank, global_step=step)
        module.on_train_batch_start(None, 0)
        return torch.nn.functional.dropout(torch.ones(64), 0.5)

    assert torch.equal(masks_at(1, 5), masks_at(1, 5, draws_before=1000))
    assert not torch.equal(masks_at(1, 5), masks_at(0, 5))
    assert not torch.equal(masks_at(1, 5), masks_at(1, 6))


TINY_SSD = ("model=ssd", "model.backbone.width=0.125")


def test_the_layer_sweep_key_sets_the_backbone_and_the_priors_not_the_module():
    """``model.num_prediction_layers`` (SSD's Table 3 sweep key) is a config-only key: the backbone and the priors
    interpolate it, the module takes no such argument, and both ways of building from the config drop it."""
    assert "num_prediction_layers" in CONFIG_ONLY_KEYS
    assert not set(CONFIG_ONLY_KEYS) & set(inspect.signature(DetectionModule).parameters)
    cfg = compose(*TINY_SSD, "model.num_prediction_layers=4")
    resolved = OmegaConf.to_container(cfg.model, resolve=True)
    for module in (instantiate(cfg.model), DetectionModule.from_config(resolved)):
        assert module.net.backbone.layers == module.net.priors.layers == SSD300_LAYERS[:4]
        outputs, priors = module.net(torch.zeros(1, 3, 300, 300, dtype=torch.uint8))
        # Table 3's n = 4 row: 8,892 boxes on conv4_3 … conv9_2 (tests/detectors/test_ssd.py counts them)
        assert len(priors.level_sizes) == 4 and outputs["box_deltas"].shape[1] == len(priors.boxes) == 8892
    assert DetectionModule.from_config(resolved).model_config["num_prediction_layers"] == 4  # checkpoints keep it


def test_a_checkpoint_whose_config_gives_the_module_the_layer_key_still_loads(tmp_path):
    """Checkpoints written while the module took ``num_prediction_layers`` name the module itself as the target
    with that key beside its arguments: they rebuild the same network with the same weights."""
    module = DetectionModule.from_config(
        OmegaConf.to_container(compose(*TINY_SSD, "model.num_prediction_layers=3").model, resolve=True)
    )
    old_config = {**module.model_config, "_target_": "engine.detection_module.DetectionModule"}
    checkpoint = {"state_dict": module.state_dict(), "model_config": old_config, "class_names": module.net.class_names}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    rebuilt = build_model(load_checkpoint(tmp_path / "old.ckpt"), tmp_path / "old.ckpt")
    assert rebuilt.net.backbone.layers == SSD300_LAYERS[:3]
    assert rebuilt.state_dict().keys() == module.state_dict().keys()
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in rebuilt.state_dict().items())
