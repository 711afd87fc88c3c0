"""COCO: ``<root>/annotations/instances_<split>.json`` and the images under ``<root>/<split>/``
(docs/ARCHITECTURE.md §1), read with pycocotools, iterating the json (never the folder); ``file_name`` may hold
sub-folders.

Category ids map to contiguous labels 0..K-1 by name, in the order of ``data.classes`` (default: COCO's 80 in
id order), and back to the json's ids in written results (``write_coco_results``). A category with no
annotations that is not in ``data.classes`` (a placeholder id 0, as some exporters write) is allowed.
COCO's ``[x, y, w, h]`` converts at this edge: ``x1 = x + w`` (docs/ARCHITECTURE.md §3).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from .base import DetectionDataModule, SampleTransform
from .images import clip_boxes, read_image

log = logging.getLogger(__name__)


class COCOFormatError(ValueError):
    """An annotation json that cannot be used as it is; the message names the file, the entry and the fix."""


def _number(value) -> bool:
    """A finite int or float (not a bool, a string or None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_coco(path: Path) -> COCO:
    """The json checked for what pycocotools would silently accept (duplicate image ids, annotations of unknown
    images or categories, missing boxes), then indexed by pycocotools."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no such annotation file; data.root must hold "
            f"annotations/instances_<split>.json (data.train_split / data.val_split)"
        ) from None
    except json.JSONDecodeError as e:
        raise COCOFormatError(f"{path}: not valid json ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise COCOFormatError(f"{path}: no {key!r} list; is this a COCO instances file?")
    dup = [i for i, n in Counter(im.get("id") for im in data["images"]).items() if n > 1]
    if dup:
        count = sum(im.get("id") == dup[0] for im in data["images"])
        raise COCOFormatError(
            f"{path}: image id {dup[0]} appears {count} "
            f"times in 'images' ({len(dup)} duplicated ids); ids must be unique"
        )
    for im in data["images"]:
        if not isinstance(im.get("file_name"), str) or not all(
            _number(im.get(k)) and im[k] > 0 for k in ("width", "height")
        ):
            raise COCOFormatError(
                f"{path}: image id {im.get('id')} needs file_name (text) and width, height "
                f"(positive numbers); got file_name={im.get('file_name')!r}, "
                f"width={im.get('width')!r}, height={im.get('height')!r}"
            )
    image_ids = {im["id"] for im in data["images"]}
    category_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        where = f"{path}: annotation id {ann.get('id')}"
        if ann.get("image_id") not in image_ids:
            raise COCOFormatError(f"{where} refers to image id {ann.get('image_id')}, which is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise COCOFormatError(f"{where} has category_id {ann.get('category_id')}, not in 'categories'")
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4:
            raise COCOFormatError(f"{where} has no 'bbox' [x, y, w, h] (got {box!r})")
        if not all(_number(v) for v in box) or box[2] < 0 or box[3] < 0:  # inf/NaN/text would pass as boxes
            raise COCOFormatError(
                f"{where} has bbox {box}: need [x, y, w, h] as finite numbers with w, h ≥ 0; fix "
                f"or remove the annotation"
            )
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


class COCODataset(Dataset):
    """One split of a COCO-format data set. Items are (uint8 image (3, H, W), target) with ``boxes`` (xyxy px),
    ``labels``, ``iscrowd``, ``image_id`` (the index in this set; ``self.image_ids`` holds the json's ids), then
    ``transform``. ``keep_empty=False`` leaves out images without (non-crowd) annotations (training)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Sequence[str],
        keep_empty: bool = True,
        transform: SampleTransform | None = None,
    ) -> None:
        self.root = Path(root)
        self.annotation_file = self.root / "annotations" / f"instances_{split}.json"
        self.image_dir = self.root / split
        self.coco = load_coco(self.annotation_file)
        self.classes, self.transform = list(classes), transform
        label_of_name = {name: i for i, name in enumerate(self.classes)}
        used = {ann["category_id"] for ann in self.coco.dataset["annotations"]}
        self.label_of_category: dict[int, int] = {}
        for cat in self.coco.dataset["categories"]:
            if cat["name"] in label_of_name:
                self.label_of_category[cat["id"]] = label_of_name[cat["name"]]
            elif cat["id"] in used:
                raise COCOFormatError(
                    f"{self.annotation_file}: category {cat['id']} {cat['name']!r} has annotations "
                    f"but is not in data.classes; add it to data.classes"
                )
        self.category_of_label = {label: cat for cat, label in self.label_of_category.items()}
        ids = [im["id"] for im in self.coco.dataset["images"]]  # the json's order, never the folder's
        if not keep_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns[i])]
        self.image_ids = ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def aspect_ratios(self) -> list[float]:
        """Width ÷ height from the json, without decoding images."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.image_ids]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        info = self.coco.imgs[self.image_ids[index]]
        path = self.image_dir / info["file_name"]
        image = read_image(path)
        h, w = image.shape[-2:]
        if (info.get("height"), info.get("width")) not in ((h, w), (None, None)):
            log.warning(
                "%s: the json says %sx%s but the image is %dx%d; boxes are kept in the json's pixels",
                path,
                info.get("width"),
                info.get("height"),
                w,
                h,
            )
        anns = self.coco.imgToAnns[info["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), dim=1)  # [x, y, w, h] → xyxy
        labels = torch.tensor([self.label_of_category[a["category_id"]] for a in anns], dtype=torch.long)
        crowd = torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.long)
        boxes, fields = clip_boxes(boxes, h, w, str(path), {"labels": labels, "iscrowd": crowd})
        target = {"boxes": boxes, **fields, "image_id": torch.tensor(index)}
        return (image, target) if self.transform is None else self.transform(image, target)


def coco_result_entries(
    detections: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    category_ids: Mapping[int, int] | None = None,
    extra: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """COCO results-format entries (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``) of per-image
    detections (boxes xyxy in the image's pixels). ``category_ids`` maps labels to the json's ids (default:
    label + 1, COCO's 1-based convention); ``extra`` adds fields per image (``file_name``). Full precision: the
    box as the metrics take it (float64 of the float32 corners, w = x1 − x0), so pycocotools re-evaluates a
    results file to exactly the metrics' numbers."""
    out = []
    for i, (det, image_id) in enumerate(zip(detections, image_ids, strict=True)):
        xyxy = det["boxes"].detach().cpu().double()
        xywh = torch.cat((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), dim=1).tolist()
        fields = dict(extra[i]) if extra is not None else {}
        for box, score, label in zip(xywh, det["scores"].detach().cpu().tolist(), det["labels"].cpu().tolist()):
            category = category_ids[int(label)] if category_ids is not None else int(label) + 1
            out.append(
                {"image_id": int(image_id), "category_id": category, "bbox": box, "score": float(score), **fields}
            )
    return out


def coco_results(detections: Sequence[dict[str, Tensor]], dataset: COCODataset, indices: Sequence[int]) -> list[dict]:
    """Detections (boxes xyxy in original pixels, scores, labels) of ``dataset[indices[i]]`` as COCO result
    entries with the json's image and category ids."""
    return coco_result_entries(detections, [dataset.image_ids[int(i)] for i in indices], dataset.category_of_label)


def write_coco_results(
    detections: Sequence[dict[str, Tensor]], dataset: COCODataset, indices: Sequence[int], path: str | Path
) -> Path:
    """The standard COCO detection-results json, for the official tools or a submission."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_results(detections, dataset, indices)))
    return path


class COCODataModule(DetectionDataModule):
    """COCO train/val splits (``data.train_split`` / ``data.val_split``). Training leaves out images without
    annotations unless ``train_empty_images``; validation keeps every image of the json."""

    def __init__(
        self,
        root: str,
        classes: Sequence[str],
        train_split: str = "train2017",
        val_split: str = "val2017",
        train_empty_images: bool = False,
        batch_size: int = 16,
        num_workers: int = 4,
        **loader: Any,
    ) -> None:
        super().__init__(classes, batch_size, num_workers=num_workers, **loader)  # see DetectionDataModule
        if root is None or str(root) in ("", "???"):
            raise ValueError(
                "data.root is not set: give the folder holding annotations/ and the split folders, "
                "e.g. data.root=/data/coco"
            )
        self.root, self.train_split, self.val_split = Path(root), train_split, val_split
        self.train_empty_images = train_empty_images

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = COCODataset(
                self.root, self.train_split, self.classes, self.train_empty_images, self.train_transform
            )
        if stage in ("fit", "validate", "test", None) and self.val_set is None:
            self.val_set = COCODataset(self.root, self.val_split, self.classes, True, self.val_transform)
