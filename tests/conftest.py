import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import detectors  # noqa: E402,F401  (registers config resolvers)

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def compose(*overrides: str):
    """The training config as `python train.py <overrides>` would see it (Hydra's compose API)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=True)


TINY = ("experiment=retinanet_shapes", "data.image_size=64", "data.num_train=64", "data.num_val=16",
        "data.batch_size=8", "model.backbone.out_channels=32", "model.priors.size_factor=0.125")
