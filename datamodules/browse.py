"""Look at what the model receives: a PNG grid of samples after augmentation, boxes and class names drawn.

    python -m datamodules.browse data=shapes split=train n=16 out=browse.png
    python -m datamodules.browse data/transform=ssd data.train_transform.size=300 seed=1

Any override of `python train.py` works (the config is conf/train.yaml composed with them); the extra keys are
``split`` (train or val), ``n`` (images), ``out`` (the PNG), ``zoom`` (whole-pixel enlargement, so that names
cover less of small objects; default: the least making images at least 384 px) and ``seed`` (train.py's: which
images and augmentations). Relies only on the data module's ``train_set`` / ``val_set`` and ``classes``, so it
works for any data module. Images are batched with the training collate, so the grid shows their padding too.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from matplotlib import colormaps
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

from detectors.batch import collate_detection

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BROWSE_KEYS = {"split": "train", "n": "16", "out": "browse.png", "zoom": ""}  # ours; other key=values go to Hydra
MIN_SHOWN_SIDE = 384  # px: the default zoom enlarges images at least to this (names are ~12 px high)


def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """One colour per class from matplotlib's qualitative palettes (tab10, tab20 beyond 10; repeats beyond 20)."""
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [tuple(round(255 * c) for c in cmap(i % cmap.N)[:3]) for i in range(num_classes)]


def draw_sample(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    classes: list[str],
    difficult: Tensor | None = None,
    crowd: Tensor | None = None,
) -> Tensor:
    """The image (uint8 (3, H, W)) with each box outlined in its class colour and named ("*": difficult/crowd)."""
    if len(boxes) == 0:  # torchvision warns on empty boxes; an image without objects is normal after a crop
        return image
    colours = class_colours(len(classes))
    names = [classes[int(k)] for k in labels]
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    for flags in (difficult, crowd):
        if flags is not None:
            flagged |= flags.bool()
    names = [f"{name}*" if f else name for name, f in zip(names, flagged.tolist())]
    return draw_bounding_boxes(
        image,
        boxes,
        labels=names,
        colors=[colours[int(k)] for k in labels],
        width=2,
        fill_labels=True,
        label_colors="black",
    )


def browse(
    overrides: list[str], split: str = "train", n: int = 16, out: str | Path = "browse.png", zoom: int | None = None
) -> Path:
    """Write the grid of ``n`` samples of ``split`` under the config ``overrides``, each pixel drawn ``zoom``×``zoom``
    (None: enough for MIN_SHOWN_SIDE); return the PNG's path."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split}: must be train or val")
    if n < 1:
        raise ValueError(f"n={n}: must be ≥ 1")
    if zoom is not None and zoom < 1:
        raise ValueError(f"zoom={zoom}: must be a whole number ≥ 1")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(cfg.seed)  # the transforms draw from torch's global generator
    datamodule = instantiate(cfg.data)
    dataset = getattr(datamodule, f"{split}_set")
    if dataset is None:  # data modules that build their sets in setup()
        datamodule.setup("fit")
        dataset = getattr(datamodule, f"{split}_set")
    indices = torch.randperm(len(dataset))[:n].tolist()
    batch = collate_detection([dataset[i] for i in indices], getattr(datamodule, "size_divisible", 1))
    zoom = zoom or max(1, math.ceil(MIN_SHOWN_SIDE / min(batch.input_size)))
    images = batch.images.repeat_interleave(zoom, dim=-2).repeat_interleave(zoom, dim=-1)  # nearest: pixels kept
    drawn = [
        draw_sample(
            images[i],
            batch.boxes[i][batch.valid[i]] * zoom,
            batch.labels[i][batch.valid[i]],
            datamodule.classes,
            batch.difficult[i][batch.valid[i]],
            batch.crowd[i][batch.valid[i]],
        )
        for i in range(len(batch))
    ]
    grid = make_grid(drawn, nrow=math.ceil(math.sqrt(len(drawn))), padding=2, pad_value=255)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, str(out))
    return out


def main(argv: list[str] | None = None) -> Path:
    args = sys.argv[1:] if argv is None else argv
    ours = dict(BROWSE_KEYS)
    overrides = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ours:
            ours[key] = value
        else:
            overrides.append(arg)
    try:
        n, zoom = int(ours["n"]), int(ours["zoom"]) if ours["zoom"] else None
    except ValueError:
        raise ValueError(f"n={ours['n']}, zoom={ours['zoom']}: must be whole numbers") from None
    path = browse(overrides, split=ours["split"], n=n, out=ours["out"], zoom=zoom)
    print(path.resolve())
    return path


if __name__ == "__main__":
    main()
