"""PASCAL VOC: a VOCdevkit folder (``VOC2007/``, ``VOC2012/``, … each with ``Annotations/``, ``JPEGImages/`` and
``ImageSets/Main/<split>.txt``) read as any list of ``[year, split]`` pairs (docs/ARCHITECTURE.md §1).

Annotations are parsed once, when the data set is built, so a bad file fails before training starts and every
problem names its file. The XML comes from users' folders, so it is parsed with ``defusedxml`` (entity
expansion and external entities refused). VOC's 1-based inclusive pixels convert at this edge (docs/ARCHITECTURE.md §3):
``x0 = xmin − 1, y0 = ymin − 1, x1 = xmax, y1 = ymax``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import defusedxml.ElementTree as SafeET
import torch
from defusedxml import DefusedXmlException
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from .base import DetectionDataModule, SampleTransform
from .images import clip_boxes, read_image

log = logging.getLogger(__name__)

# the 20 VOC classes in the devkit's order (VOCdevkit/VOCcode/VOCinit.m)
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class VOCFormatError(ValueError):
    """An annotation file that cannot be used as it is; the message names the file, the field and the fix."""


@dataclass
class VOCRecord:
    """One image's annotation: boxes (n, 4) xyxy in 0-based continuous pixels, labels, difficult flags, and the
    size written in the file ((0, 0) when the file has none: read from the image)."""

    image_path: Path
    boxes: Tensor
    labels: Tensor
    difficult: Tensor
    height: int
    width: int


def _text(node, tag: str) -> str | None:
    child = node.find(tag)
    return None if child is None or child.text is None or not child.text.strip() else child.text.strip()


def _flag(node, tag: str, xml_path: Path) -> bool:
    """``difficult``/``truncated``: missing or empty means 0 (real files have both); "0"/"1" (or "0.0")."""
    value = _text(node, tag)
    if value is None:
        return False
    try:
        return float(value) != 0
    except ValueError:
        raise VOCFormatError(f"{xml_path}: <{tag}>{value}</{tag}> is not 0 or 1") from None


def parse_voc_xml(
    xml_path: Path, image_dir: Path, class_index: dict[str, int], unknown_classes: str = "error"
) -> tuple[VOCRecord, int]:
    """Read one VOC annotation file; returns the record and how many objects of unknown classes were skipped."""
    try:
        root = SafeET.parse(xml_path).getroot()
    except DefusedXmlException as e:
        raise VOCFormatError(
            f"{xml_path}: refused unsafe XML ({type(e).__name__}: entities or DTDs are not allowed in annotations)"
        ) from e
    except SafeET.ParseError as e:
        raise VOCFormatError(f"{xml_path}: not well-formed XML ({e})") from e
    except OSError as e:
        raise VOCFormatError(f"{xml_path}: cannot read the annotation ({e.strerror or e})") from e
    filename = _text(root, "filename") or f"{xml_path.stem}.jpg"
    size = root.find("size")
    height = width = 0
    if size is not None and _text(size, "height") and _text(size, "width"):
        try:
            height, width = int(float(_text(size, "height"))), int(float(_text(size, "width")))
        except ValueError:
            raise VOCFormatError(
                f"{xml_path}: <size> holds non-numbers; fix or delete the <size> element "
                f"(the size is then read from the image)"
            ) from None
    boxes, labels, difficult, skipped = [], [], [], 0
    for i, obj in enumerate(root.iter("object")):
        name = _text(obj, "name")
        if name is None:
            raise VOCFormatError(f"{xml_path}: <object> {i} has no <name>")
        if name not in class_index:
            if unknown_classes == "skip":
                skipped += 1
                continue
            raise VOCFormatError(
                f"{xml_path}: <object> {i} has class {name!r}, not in data.classes; add it to "
                f"data.classes or set data.unknown_classes=skip"
            )
        bndbox = obj.find("bndbox")
        coords = [None if bndbox is None else _text(bndbox, k) for k in ("xmin", "ymin", "xmax", "ymax")]
        if None in coords:
            raise VOCFormatError(f"{xml_path}: <object> {i} ({name}) lacks <bndbox> xmin/ymin/xmax/ymax")
        try:
            xmin, ymin, xmax, ymax = (float(c) for c in coords)
        except ValueError:
            raise VOCFormatError(f"{xml_path}: <object> {i} ({name}) <bndbox> {coords} is not numeric") from None
        if not xmin <= xmax or not ymin <= ymax:  # also catches NaN
            raise VOCFormatError(
                f"{xml_path}: <object> {i} ({name}) has xmin/ymin beyond xmax/ymax "
                f"({xmin}, {ymin}, {xmax}, {ymax}); fix the file or remove the object"
            )
        if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):  # inf would clip to an image-wide box
            raise VOCFormatError(
                f"{xml_path}: <object> {i} ({name}) <bndbox> {coords} is not finite; fix the file or remove the object"
            )
        boxes.append((xmin - 1, ymin - 1, xmax, ymax))  # 1-based inclusive → 0-based continuous
        labels.append(class_index[name])
        difficult.append(_flag(obj, "difficult", xml_path))
    record = VOCRecord(
        image_dir / filename,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(difficult, dtype=torch.bool),
        height,
        width,
    )
    return record, skipped


class VOCDataset(Dataset):
    """One ``VOC<year>/ImageSets/Main/<split>.txt`` of a VOCdevkit folder.

    ``keep_difficult=False`` drops "difficult" objects from the targets (training); with True they stay, flagged,
    so the evaluator ignores them as the devkit does. Items are (uint8 image (3, H, W), target) with ``boxes``,
    ``labels``, ``difficult``, ``image_id`` (the index in this set) then ``transform``.
    """

    def __init__(
        self,
        root: str | Path,
        year: int | str,
        split: str,
        classes: Sequence[str] = VOC_CLASSES,
        keep_difficult: bool = True,
        unknown_classes: str = "error",
        transform: SampleTransform | None = None,
    ) -> None:
        if unknown_classes not in ("error", "skip"):
            raise ValueError(f"data.unknown_classes={unknown_classes!r}: choose 'error' or 'skip'")
        self.root = Path(root) / f"VOC{year}"
        list_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(
                f"{list_file}: no such split file; data.root must be the VOCdevkit folder "
                f"holding VOC{year}/ (or set data.download=true)"
            )
        self.ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        self.classes = list(classes)
        self.keep_difficult, self.transform = keep_difficult, transform
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.records: list[VOCRecord] = []
        skipped = 0
        for image_id in self.ids:
            record, n = parse_voc_xml(
                self.root / "Annotations" / f"{image_id}.xml", self.root / "JPEGImages", class_index, unknown_classes
            )
            self.records.append(record)
            skipped += n
        if skipped:
            log.warning(
                "%s: skipped %d object(s) of classes not in data.classes (data.unknown_classes=skip)",
                list_file,
                skipped,
            )
        self.skipped_objects = skipped

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        """Width ÷ height from the annotations, without decoding images (1.0 where <size> is missing)."""
        return [r.width / r.height if r.height and r.width else 1.0 for r in self.records]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        record = self.records[index]
        image = read_image(record.image_path)
        h, w = image.shape[-2:]
        if record.height and (record.height, record.width) != (h, w):
            log.warning(
                "%s: the annotation's <size> is %dx%d but the image is %dx%d; boxes are kept in the image's pixels",
                record.image_path,
                record.width,
                record.height,
                w,
                h,
            )
        keep = torch.ones_like(record.difficult) if self.keep_difficult else ~record.difficult
        boxes, fields = clip_boxes(
            record.boxes[keep],
            h,
            w,
            str(record.image_path),
            {"labels": record.labels[keep], "difficult": record.difficult[keep]},
        )
        target = {"boxes": boxes, **fields, "image_id": torch.tensor(index)}
        return (image, target) if self.transform is None else self.transform(image, target)


def download_voc(root: Path, year: int | str, split: str) -> None:
    """Fetch VOC<year> <split> into the VOCdevkit folder ``root`` with torchvision's downloader (its URLs, MD5s)."""
    from torchvision.datasets import VOCDetection

    if (root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt").is_file():
        return
    if root.name != "VOCdevkit":
        raise ValueError(
            f"data.root={root}: with data.download=true it must be a folder named VOCdevkit "
            f"(torchvision extracts the archives as <parent>/VOCdevkit/VOC<year>)"
        )
    VOCDetection(str(root.parent), year=str(year), image_set=split, download=True)


class VOCDataModule(DetectionDataModule):
    """VOC as ``train_sets`` / ``val_sets`` lists of ``[year, split]`` pairs (default 07+12 trainval / 07 test).
    Training drops "difficult" objects unless ``train_difficult``; validation keeps them flagged for the metrics."""

    def __init__(
        self,
        root: str,
        train_sets: Sequence[Sequence] = ((2007, "trainval"), (2012, "trainval")),
        val_sets: Sequence[Sequence] = ((2007, "test"),),
        classes: Sequence[str] = VOC_CLASSES,
        train_difficult: bool = False,
        unknown_classes: str = "error",
        download: bool = False,
        batch_size: int = 32,
        num_workers: int = 4,
        **loader: Any,
    ) -> None:
        super().__init__(classes, batch_size, num_workers=num_workers, **loader)  # see DetectionDataModule
        if root is None or str(root) in ("", "???"):
            raise ValueError("data.root is not set: give the VOCdevkit folder, e.g. data.root=/data/VOCdevkit")
        self.root = Path(root)
        self.train_sets, self.val_sets = self._pairs(train_sets, "train_sets"), self._pairs(val_sets, "val_sets")
        self.train_difficult, self.unknown_classes, self.download = train_difficult, unknown_classes, download

    @staticmethod
    def _pairs(sets: Sequence[Sequence], key: str) -> list[tuple[str, str]]:
        pairs = []
        for pair in sets:
            if isinstance(pair, str) or len(pair) != 2:
                raise ValueError(
                    f"data.{key}={list(sets)}: give a list of [year, split] pairs, "
                    f"e.g. [[2007, trainval], [2012, trainval]]"
                )
            pairs.append((str(pair[0]), str(pair[1])))
        return pairs

    def prepare_data(self) -> None:
        if self.download:  # Lightning runs this on one process per node
            for year, split in {*self.train_sets, *self.val_sets}:
                download_voc(self.root, year, split)

    def _concat(self, pairs: list[tuple[str, str]], keep_difficult: bool, transform) -> Dataset:
        sets = [
            VOCDataset(self.root, year, split, self.classes, keep_difficult, self.unknown_classes, transform)
            for year, split in pairs
        ]
        return sets[0] if len(sets) == 1 else ImageIdOffsets(sets)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._concat(self.train_sets, self.train_difficult, self.train_transform)
        if stage in ("fit", "validate", "test", None) and self.val_set is None:
            self.val_set = self._concat(self.val_sets, True, self.val_transform)


class ImageIdOffsets(ConcatDataset):
    """Concatenated sets with ``image_id`` made unique across them (each set numbers its images from 0)."""

    def aspect_ratios(self) -> list[float]:
        return [r for d in self.datasets for r in d.aspect_ratios()]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, target = super().__getitem__(index)
        return image, {**target, "image_id": torch.tensor(index)}
