"""Every transform a config names (conf/data/transform/*.yaml) builds: a ``_target_`` that moved or an argument
that was renamed fails here, not at the start of a run, nor when a tool rebuilds a checkpoint's validation transform.

The groups are read as Hydra merges them (each file's ``defaults`` from the same folder first, then the file
itself), without composing the whole training config: 0.4 s a composition here would be 8 s for the folder.
"""

from pathlib import Path

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ..conftest import ROOT

TRANSFORM_GROUP = ROOT / "conf" / "data" / "transform"
PIXEL_MEAN = [0.485, 0.456, 0.406]  # what ${model.pixel_mean} resolves to in the models' configs


def merged_group(path: Path) -> DictConfig:
    """The ``data`` keys a ``data/transform=<path.stem>`` choice sets: its defaults (same folder), then itself."""
    own = OmegaConf.load(path)
    defaults = own.pop("defaults", [])
    parts = [merged_group(TRANSFORM_GROUP / f"{name}.yaml") for name in defaults if name != "_self_"]
    return OmegaConf.merge(*parts, own)


@pytest.mark.parametrize("path", sorted(TRANSFORM_GROUP.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_transform_group_instantiates_both_splits(path):
    config = OmegaConf.create({"model": {"pixel_mean": PIXEL_MEAN}, "data": merged_group(path)})
    for split in ("train_transform", "val_transform"):
        node = config.data[split]
        if node is None:  # none.yaml, flip.yaml's validation: the samples as the data set makes them
            continue
        cls = get_class(node._target_)
        transform = instantiate(node)
        assert type(transform) is cls and callable(transform), (path.name, split)


def test_the_groups_name_targets_that_the_package_exports():
    """The configs, and the checkpoints that recorded them, name transforms by the package
    (``datamodules.transforms.<Class>``), which re-exports each paper's module."""
    import datamodules.transforms as package

    targets = {
        node._target_
        for path in TRANSFORM_GROUP.glob("*.yaml")
        for split in ("train_transform", "val_transform")
        if (node := merged_group(path).get(split)) is not None
    }
    assert targets == {
        "datamodules.transforms.ResizeTo",
        "datamodules.transforms.ShortSideAugmentation",
        "datamodules.transforms.ShortSideResize",
        "datamodules.transforms.SSDAugmentation",
        "datamodules.transforms.YOLOAugmentation",
    }
    assert all(target.rsplit(".", 1)[1] in package.__all__ for target in targets)
