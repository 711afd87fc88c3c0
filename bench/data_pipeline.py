"""The SSD training pipeline per loader worker: decode a JPEG → augment → 300×300 uint8, ours against
torchvision's detection reference preset for SSD (``references/detection/presets.py``, ``data_augmentation="ssd"``:
PIL decode, ``RandomPhotometricDistort → RandomZoomOut → RandomIoUCrop → RandomHorizontalFlip``, then the
model's resize to 300), on the same files, one thread (as in a loader worker).

Files: the real VOC2012 photos of ``../shared/data`` when present (500×375 and the like), else generated
500×375 JPEGs of noise and shapes.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from datamodules.images import read_image
from datamodules.transforms import IMAGENET_MEAN, SSDAugmentation

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOCdevkit" / "VOC2012"


def jpeg_files(count: int, folder: Path) -> list[Path]:
    if (SAMPLE / "JPEGImages").is_dir():
        return sorted((SAMPLE / "JPEGImages").glob("*.jpg"))[:count]
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        pixels = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, generator=g)
        pixels[100:250, 150:350] = torch.tensor([200, 40, 40], dtype=torch.uint8)
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(pixels.numpy()).save(path, quality=90)
        paths.append(path)
    return paths


def samples(paths: list[Path]) -> list[tuple[Path, torch.Tensor, torch.Tensor]]:
    """Each file with two boxes inside it and their labels (the boxes' exact place does not change the cost)."""
    out = []
    for p in paths:
        w, h = Image.open(p).size
        out.append(
            (
                p,
                torch.tensor([[w * 0.1, h * 0.2, w * 0.5, h * 0.7], [w * 0.4, h * 0.1, w * 0.9, h * 0.6]]),
                torch.tensor([3, 7]),
            )
        )
    return out


def pipeline_rows(repeats: int, record, count: int = 100) -> None:
    fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
    preset = v2.Compose(
        [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill=list(fill)),
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.SanitizeBoundingBoxes(),
            v2.Resize((300, 300), antialias=True),
            v2.PILToTensor(),
        ]
    )
    ours = SSDAugmentation(size=300, photometric_variant="torchvision")  # the same distortion as the peer's

    with tempfile.TemporaryDirectory() as tmp:
        data = samples(jpeg_files(count, Path(tmp)))

        def run_torchvision():
            for path, boxes, labels in data:
                image = Image.open(path).convert("RGB")
                target = {
                    "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.size[::-1]),
                    "labels": labels,
                }
                preset(image, target)

        def run_ours():
            for path, boxes, labels in data:
                ours(read_image(path), {"boxes": boxes, "labels": labels, "image_id": torch.tensor(0)})

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one loader worker
        try:
            from .timing import median_time

            torch.manual_seed(0)
            peer = median_time(run_torchvision, torch.device("cpu"), repeats)
            torch.manual_seed(0)
            mine = median_time(run_ours, torch.device("cpu"), repeats)
        finally:
            torch.set_num_threads(threads)
    n = len(data)
    record(
        f"SSD training pipeline, {n} JPEGs → 300×300 uint8, one worker "
        f"(torchvision {n / peer:.0f} img/s, ours {n / mine:.0f} img/s)",
        peer,
        mine,
    )


def loader_rate(
    voc_root: Path,
    workers: int,
    batch_size: int,
    model: str = "retinanet",
    batches: int = 40,
    pin_memory: bool = False,
    repeat: int = 1,
) -> tuple[float, str]:
    """Training images/s of the project's own VOC loader for ``model`` (decode, the model's train augmentation,
    aspect-ratio grouping, collate and padding) with ``workers`` processes, after the first batch (worker
    start-up); and a description of what was loaded. ``voc_root`` is a VOCdevkit folder; ``repeat`` lists each
    trainval set that many times, so that a small sample's epoch still keeps every worker busy (an epoch's end
    drains the workers' queue)."""
    from hydra.utils import instantiate

    from .training_step import train_config

    years = sorted(p.name[3:] for p in voc_root.glob("VOC*") if (p / "ImageSets" / "Main" / "trainval.txt").is_file())
    if not years:
        raise FileNotFoundError(f"{voc_root}: no VOC<year>/ImageSets/Main/trainval.txt; give a VOCdevkit folder")
    sets = ",".join(f"[{y},trainval]" for y in years for _ in range(repeat))
    cfg = train_config(
        f"model={model}",
        "data=voc",
        f"data.root={voc_root}",
        f"data.train_sets=[{sets}]",
        f"data.val_sets=[{','.join(f'[{y},trainval]' for y in years)}]",
        f"data.num_workers={workers}",
        f"data.batch_size={batch_size}",
        f"data.pin_memory={pin_memory}",
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    if len(loader) == 0:
        raise ValueError(f"{voc_root}: fewer training images than one batch of {batch_size}")
    epochs = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch (persistent workers)
    next(epochs)  # the first batch waits for the workers to start
    start = time.perf_counter()
    seen = sum(len(batch) for batch in itertools.islice(epochs, batches))
    seconds = time.perf_counter() - start
    what = (
        f"{model}'s train transform on VOC {'+'.join(years)} trainval ({len(datamodule.train_set) // repeat} images"
        f"{f' × {repeat}' if repeat > 1 else ''}), "
        f"batch {batch_size}, {workers} workers"
    )
    return seen / seconds, what
