"""The papers' recipes (conf/experiment/) compose with the numbers the papers give, and their models build."""

import pytest
from hydra.utils import instantiate

from .conftest import compose

RECIPES = {
    # name: (lr, total batch, iterations, lr steps, warm-up, input size, devices)
    "retinanet_r50_coco_1x": (0.01, 16, 90000, [60000, 80000], 1000, [800], 8),
    "ssd300_voc0712": (0.001, 32, 120000, [80000, 100000], 0, 300, 1),
    "ssd512_voc0712": (0.001, 32, 120000, [80000, 100000], 0, 512, 1),
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_holds_the_papers_schedule(name):
    lr, batch, iterations, steps, warmup, size, devices = RECIPES[name]
    cfg = compose(f"experiment={name}", "data.root=/data")
    assert cfg.model.optimizer.lr == lr and cfg.model.optimizer.momentum == 0.9
    assert cfg.data.batch_size * cfg.trainer.devices == batch == cfg.lr_scaling.base_batch_size
    assert cfg.lr_scaling.enabled and cfg.trainer.devices == devices
    assert cfg.trainer.max_steps == iterations and cfg.trainer.max_epochs == -1
    assert list(cfg.model.scheduler.milestones) == steps and cfg.model.scheduler.gamma == 0.1
    assert cfg.model.scheduler.warmup_steps == warmup
    train_size = cfg.data.train_transform.get("size", cfg.data.train_transform.get("min_sizes"))
    assert (list(train_size) if isinstance(size, list) else train_size) == size
    assert cfg.task_name == name


def test_ssd_recipes_keep_the_papers_augmentation_and_decay():
    for name, layers in (("ssd300_voc0712", 6), ("ssd512_voc0712", 7)):
        cfg = compose(f"experiment={name}", "data.root=/data")
        assert cfg.model.optimizer.weight_decay == 0.0005 and cfg.data.train_transform.expand
        assert cfg.data.train_transform.photometric and cfg.model.num_prediction_layers == layers
        assert cfg.data._target_.endswith("VOCDataModule") and cfg.optimized_metric == "val/voc07_map_50"


@pytest.mark.parametrize(
    ("name", "priors"), [("retinanet_r50_coco_1x", None), ("ssd300_voc0712", 8732), ("ssd512_voc0712", 24564)]
)
def test_recipe_models_build(name, priors):
    cfg = compose(f"experiment={name}", "data.root=/data", "model.backbone.weights=null")
    model = instantiate(cfg.model).net
    assert model.num_classes == len(cfg.data.classes)
    if priors is not None:  # SSD300: 8,732 default boxes (§2.3); SSD512: 24,564 (Table 7's released model)
        size = cfg.data.train_transform.size
        import torch

        outputs, boxes = model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
        assert outputs["class_scores"].shape[1] == priors
