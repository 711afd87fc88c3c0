"""Detect objects in images: `python predict.py ckpt_path=<file.ckpt> input=<image|folder|'glob'> [output=<folder>]`.

Each image goes through the model's validation transform (from its training run, or `data/transform=<name>`), in
batches on `device` (cuda when available); its detections come back in the image's own pixels. Writes into
`output` (default: the run folder runs/predict/<date>_<time>/):

* one picture per input, at its original resolution, with the boxes of score ≥ `score_thresh` (default: the
  checkpoint's threshold of the best F1 on its validation) drawn in their class colours and captioned
  "<class> <score>"; JPEG stays JPEG, PNG stays PNG, other formats become PNG;
  sub-folders of a folder/glob input are kept, relative to the inputs' common folder;
* detections.json: every detection of the model (its own post-processing threshold, `model.postprocess.
  score_thresh`), COCO results format (`image_id` = position in the sorted input list, `category_id` = label + 1,
  `bbox` [x, y, w, h]) with `file_name` and `category_name`.

Images are read with their EXIF rotation applied, so boxes are in the picture as it is shown.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import engine.config  # noqa: F401  (registers the config resolvers, e.g. ${len:...})
from datamodules.coco import coco_result_entries
from datamodules.images import read_image
from datamodules.transforms import Preprocess
from detectors.batch import DetectionBatch, collate_detection
from engine.checkpoint_loading import build_model, load_checkpoint, resolve_preprocessing
from evaluation.visualization import DEFAULT_DRAWING_THRESHOLD, draw_boxes

log = logging.getLogger("predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # what torchvision's decoder reads
KEPT_SUFFIXES = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}  # written in the input's format; others as PNG


def find_images(spec: str) -> list[Path]:
    """The images of ``input``: one file, a folder's image files (sorted; not its sub-folders) or a glob's
    (sorted; ``**`` recurses)."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        where = f"input={spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder (sub-folders are not read; "
        if not files:
            raise FileNotFoundError(where + "use a glob such as 'folder/**/*.jpg')")
        return files
    if any(c in spec for c in "*?["):
        files = sorted(
            Path(p)
            for p in glob.glob(spec, recursive=True)
            if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise FileNotFoundError(f"input={spec}: the pattern matches no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    raise FileNotFoundError(
        f"input={spec}: no such file or folder; give an image, a folder of images or a glob "
        f"pattern in quotes, e.g. input='photos/**/*.jpg'"
    )


def output_paths(files: list[Path], output: Path) -> list[Path]:
    """Where each picture goes: its path relative to the inputs' common folder, under ``output`` (so equal names
    in different folders do not collide), JPEG/PNG suffix kept, others → .png. Never onto an input."""
    resolved = [f.resolve() for f in files]
    common = Path(os.path.commonpath([f.parent for f in resolved]))
    out = []
    for f in resolved:
        target = output.resolve() / f.relative_to(common)
        target = target if f.suffix.lower() in KEPT_SUFFIXES else target.with_suffix(".png")
        if target == f:
            raise ValueError(
                f"output={output}: writing the pictures there would overwrite the input {f}; give another folder"
            )
        out.append(target)
    return out


class ImageFiles(Dataset):
    """(network input, target, original image) of each file: the original is what the picture is drawn on."""

    def __init__(self, files: list[Path], preprocess: Preprocess) -> None:
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        image = read_image(self.files[index])
        x, target = self.preprocess(image, index)
        return x, target, image


def collate(
    samples: list[tuple[Tensor, dict[str, Tensor], Tensor]], size_divisible: int
) -> tuple[DetectionBatch, list[Tensor]]:
    return collate_detection([(x, t) for x, t, _ in samples], size_divisible), [img for *_, img in samples]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: give auto, cpu, cuda, cuda:<index> or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: CUDA is not available on this machine; use device=auto or cpu")
    return device


def save_picture(image: Tensor, path: Path, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    if KEPT_SUFFIXES.get(path.suffix.lower()) == "JPEG":
        picture.save(path, quality=quality)
    else:
        picture.save(path)


def drawing_threshold(given: float | None, checkpoint: dict[str, Any]) -> tuple[float, str]:
    """The score boxes are drawn from, and where it came from: ``score_thresh`` if given, else the checkpoint's
    threshold of the best F1 on its last validation, else 0.3."""
    if given is not None:
        if not 0 <= float(given) <= 1:
            raise ValueError(f"score_thresh={given}: the drawing threshold is a score in [0, 1]")
        return float(given), "score_thresh"
    best = checkpoint.get("f1_score_thresh")
    if best is not None:
        return float(best), "the checkpoint's best-F1 threshold"
    return DEFAULT_DRAWING_THRESHOLD, "the default; this checkpoint holds no best-F1 threshold"


def predict(cfg: DictConfig) -> Path:
    ckpt_path = str(cfg.ckpt_path)
    checkpoint = load_checkpoint(ckpt_path, trusted=bool(cfg.get("trust_checkpoint")))
    score_thresh, chosen = drawing_threshold(cfg.get("score_thresh"), checkpoint)
    if int(cfg.batch_size) < 1:
        raise ValueError(f"batch_size={cfg.batch_size}: must be ≥ 1")
    files = find_images(str(cfg.input))
    output = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir)
    pictures = output_paths(files, output)
    transform, size_divisible, source = resolve_preprocessing(cfg.get("data"), checkpoint, ckpt_path)
    preprocess = Preprocess(transform, size_divisible)
    device = pick_device(str(cfg.device))
    detector = build_model(checkpoint, ckpt_path, cfg.get("model"), trusted=bool(cfg.get("trust_checkpoint"))).net
    detector.to(device)
    names = list(detector.class_names)
    log.info(
        "%d image(s) from %s; transform %s (from %s); %s on %s",
        len(files),
        cfg.input,
        preprocess,
        source,
        Path(ckpt_path).name,
        device,
    )

    loader = DataLoader(
        ImageFiles(files, preprocess),
        batch_size=int(cfg.batch_size),
        shuffle=False,
        num_workers=int(cfg.num_workers),
        collate_fn=partial(collate, size_divisible=size_divisible),
        pin_memory=device.type == "cuda",
    )
    entries: list[dict[str, Any]] = []
    drawn = 0
    with tqdm(total=len(files), unit="img", desc="predict") as bar:
        for batch, originals in loader:
            detections = detector.detect(move_data_to_device(batch, device))
            for i, det in enumerate(detections):
                index = int(batch.image_ids[i])
                det = {k: v.detach().cpu() for k, v in det.items()}
                entries += coco_result_entries([det], [index], extra=[{"file_name": str(files[index])}])
                image = originals[i]
                keep = det["scores"] >= score_thresh
                width = cfg.get("line_width") or max(2, round(2 * max(image.shape[-2:]) / 500))
                picture = draw_boxes(
                    image, det["boxes"][keep], det["labels"][keep], names, det["scores"][keep], width=int(width)
                )
                save_picture(picture, pictures[index], int(cfg.jpeg_quality))
                drawn += int(keep.sum())
            bar.update(len(detections))
    for entry in entries:
        entry["category_name"] = names[entry["category_id"] - 1]
    output.mkdir(parents=True, exist_ok=True)
    result = output / "detections.json"
    result.write_text(json.dumps(entries))
    print(
        f"\n{len(files)} picture(s) with {drawn} box(es) of score ≥ {score_thresh:.2f} ({chosen}) and detections.json "
        f"({len(entries)} detections) in {output}"
    )
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
