"""The papers' recipes (conf/experiment/) compose with the numbers the papers give, and their models build."""

import pytest
from hydra.utils import instantiate

from .conftest import compose

RECIPES = {
    # name: (lr, total batch, iterations, lr steps, warm-up, input size, devices)
    "retinanet_r50_coco_1x": (0.01, 16, 90000, [60000, 80000], 500, [800], 8),
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


CPU_RECIPES = {  # the photos' training transform and its input size per CPU recipe
    "retinanet": ("ShortSideAugmentation", 320),
    "ssd": ("SSDAugmentation", 256),
    "yolo": ("YOLOAugmentation", 160),
}


@pytest.mark.parametrize("name", sorted(CPU_RECIPES))
def test_the_shapes_recipe_is_the_cpu_recipe_on_the_shapes(name):
    from omegaconf import OmegaConf

    shapes, cpu = (
        OmegaConf.to_container(compose(f"experiment={name}_{kind}"), resolve=False) for kind in ("shapes", "cpu")
    )
    assert (shapes.pop("task_name"), cpu.pop("task_name")) == (f"{name}_shapes", f"{name}_cpu")
    shapes.pop("hydra"), cpu.pop("hydra")  # run folders are named by the task
    # the plan in epochs of 256 steps, each validated: the steps and validations of the plan in steps
    epochs, steps = shapes.pop("trainer"), cpu.pop("trainer")
    assert epochs["max_epochs"] * 256 == steps["max_steps"] and steps["val_check_interval"] == 256
    assert cpu["data"]["num_train"] // cpu["data"]["batch_size"] == 256
    assert (epochs["max_steps"], epochs["check_val_every_n_epoch"], steps["check_val_every_n_epoch"]) == (-1, 1, None)
    assert {k: v for k, v in epochs.items() if "val" not in k and "max_" not in k} == {
        k: v for k, v in steps.items() if "val" not in k and "max_" not in k
    }
    if name != "retinanet":  # these two always trained every planned step; the CPU recipe bounds the time
        assert (shapes["callbacks"].pop("time_budget")["minutes"], cpu["callbacks"].pop("time_budget")["minutes"]) == (
            None,
            9,
        )
    assert shapes == cpu and cpu["data"]["_target_"].endswith("ShapesDataModule")
    assert cpu["data"]["train_transform"]["size"] is None  # the shapes are drawn at the input size: flip only


@pytest.mark.parametrize("data", ["voc", "coco"])
@pytest.mark.parametrize("name", sorted(CPU_RECIPES))
def test_the_cpu_recipes_take_photos_at_their_own_size(name, data):
    cfg = compose(f"experiment={name}_cpu", f"data={data}", "data.root=/x", "data.classes=[a,b]")
    transform, size = CPU_RECIPES[name]
    assert cfg.data.train_transform._target_.endswith(transform)
    t = cfg.data.train_transform
    assert (t.min_sizes[len(t.min_sizes) // 2] if name == "retinanet" else t.size) == size
    assert "num_train" not in cfg.data  # nothing of the shapes' own settings
    assert cfg.trainer.max_steps > 0 and cfg.trainer.max_epochs == -1 and cfg.callbacks.time_budget.minutes == 9
    assert instantiate(cfg.model).net.num_classes == 2


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("retinanet_r50_coco_1x", "coco"),
        ("ssd300_voc0712", "voc"),
        ("ssd512_voc0712", "voc"),
        ("yolov1_voc0712", "voc"),
    ],
)
def test_a_paper_recipe_runs_on_its_data_and_refuses_other_data(name, data):
    from engine.preflight import refuse_other_data

    cfg = compose(f"experiment={name}", "data.root=/data")
    assert cfg.recipe_data == data and cfg.data._target_.endswith(f"{data}.{data.upper()}DataModule")
    refuse_other_data(cfg)  # its own data passes
    other = compose(f"experiment={name}", "data=shapes")
    with pytest.raises(ValueError, match=f"written for data={data}.*data=shapes.*recipe_data=null"):
        refuse_other_data(other)
    refuse_other_data(compose(f"experiment={name}", "data=shapes", "recipe_data=null"))  # said on purpose
