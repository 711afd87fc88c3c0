"""The SSD training pipeline per loader worker: decode a JPEG → augment → 300×300 uint8, ours against
torchvision's detection reference preset for SSD (``references/detection/presets.py``, ``data_augmentation="ssd"``:
PIL decode, ``RandomPhotometricDistort → RandomZoomOut → RandomIoUCrop → RandomHorizontalFlip``, then the
model's resize to 300), on the same files, one thread (as in a loader worker).

Files: the real VOC2012 photos of ``../shared/data`` when present (500×375 and the like), else generated
500×375 JPEGs of noise and shapes.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from datamodules.images import read_image
from datamodules.transforms import SSDAugmentation
from datamodules.transforms.ssd import IMAGENET_MEAN

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOCdevkit" / "VOC2012"
BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd" / "BCCD"  # 364 blood-smear photos, 640×480


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


def voc_sets(root: Path, repeat: int = 1) -> tuple[list[str], str, str]:
    """The training and validation set overrides for ``root``, a VOCdevkit (each ``VOC<year>``'s trainval) or one
    VOC-style folder with split lists (its ``train``, else ``trainval``, list), and how to name it."""
    years = sorted(p.name[3:] for p in root.glob("VOC*") if (p / "ImageSets" / "Main" / "trainval.txt").is_file())
    if years:
        train = ",".join(f"[{y},trainval]" for y in years for _ in range(repeat))
        val = ",".join(f"[{y},trainval]" for y in years)
        return [f"data.train_sets=[{train}]", f"data.val_sets=[{val}]"], f"VOC {'+'.join(years)} trainval", "VOC"
    main = root / "ImageSets" / "Main"
    split = next((s for s in ("train", "trainval") if (main / f"{s}.txt").is_file()), None)
    if split is None:
        raise FileNotFoundError(
            f"{root}: no VOC<year>/ImageSets/Main/trainval.txt nor ImageSets/Main/train.txt; give a VOCdevkit "
            "folder or one VOC-style folder with split lists"
        )
    sets = ",".join([split] * repeat)
    overrides = [f"data.train_sets=[{sets}]", f"data.val_sets=[{split}]", "data.classes=null"]
    return overrides, f"{root.name} {split}", root.name


def loader_rate(
    voc_root: Path,
    workers: int,
    batch_size: int,
    model: str = "retinanet",
    batches: int = 40,
    pin_memory: bool = False,
    repeat: int = 1,
) -> tuple[float, str]:
    """Training images/s of the project's own VOC loader for ``model`` (decode, the paper's train augmentation,
    aspect-ratio grouping, collate and padding) with ``workers`` processes, after the first batch (worker
    start-up); and a description of what was loaded. ``voc_root`` is a VOCdevkit folder or one VOC-style folder;
    ``repeat`` lists each training set that many times, so that a small sample's epoch still keeps every worker
    busy (an epoch's end drains the workers' queue)."""
    from hydra.utils import instantiate

    from .training_step import train_config

    sets, name, _ = voc_sets(voc_root, repeat)
    cfg = train_config(
        f"model={model}",
        "data=voc",
        f"data.root={voc_root}",
        *sets,
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
        f"{model}'s train transform on {name} ({len(datamodule.train_set) // repeat} images"
        f"{f' × {repeat}' if repeat > 1 else ''}), "
        f"batch {batch_size}, {workers} workers"
    )
    return seen / seconds, what


# the training step's images/s on one GPU, the rate a loader must keep up with: ``python -m bench.gpu_check``'s
# step bench on one H200, 2026-12-04 (docs/BENCHMARKS.md, "On a GPU"; bf16, channels-last, each paper's batch)
GPU_STEP_RATES = {"retinanet": 291.0, "ssd": 1110.0, "yolo": 1755.0}
GPU_CORES = 16  # the GPU machines this project is measured on: one H100 or H200 with 16 CPU cores


def per_core_rows(roots: list[Path], step_rates: dict[str, float], batches: int = 50, repeats: int = 3) -> list[dict]:
    """Each paper's training pipeline (its own augmentation and input size, ``model=<paper> data=voc``) in one
    worker process, the work of one CPU core, on each folder of real JPEGs in ``roots``; and the cores it takes to
    feed ``step_rates`` (images/s of the training step, per model). The median of ``repeats`` measurements: one
    moves by a third between runs on a shared 2-core machine."""
    rows = []
    for root in roots:
        _, _, data = voc_sets(root)
        for model in ("retinanet", "ssd", "yolo"):
            batch = 4  # small: a 100-image sample's epoch holds many batches; the rate is per image
            measured = [
                loader_rate(root, 1, batch, model, batches=batches, repeat=max(1, batches * batch // 100))
                for _ in range(repeats)
            ]
            rate, what = statistics.median(r for r, _ in measured), measured[0][1]
            need = step_rates.get(model)
            rows.append(
                {
                    "model": model,
                    "data": data,
                    "what": what,
                    "images_per_s_per_core": rate,
                    "step_images_per_s": need,
                    "cores_needed": need / rate if need else None,
                }
            )
            spread = ", ".join(f"{r:.0f}" for r, _ in measured)
            print(f"  loader, one core: {what}: {rate:.1f} img/s (runs: {spread})", flush=True)
    return rows
