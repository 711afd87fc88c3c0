"""PASCAL VOC XML annotations: a VOCdevkit folder (``VOC2007/``, ``VOC2012/``, … each with ``Annotations/``,
``JPEGImages/`` and ``ImageSets/Main/<split>.txt``) read as any list of ``[year, split]`` pairs
(docs/ARCHITECTURE.md §1), or one VOC-style folder as annotation tools export it (labelImg, CVAT, Roboflow): its
split lists by name, or all its annotations split by ``val_fraction``; folder names are settings.

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

from .base import DetectionDataModule, SampleTransform, fraction_split, warn_validation_only_classes
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


# image files tried for an annotation whose <filename> is missing or names no file: <xml stem><suffix>
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


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


def _xml_root(xml_path: Path):
    try:
        return SafeET.parse(xml_path).getroot()
    except DefusedXmlException as e:
        raise VOCFormatError(
            f"{xml_path}: refused unsafe XML ({type(e).__name__}: entities or DTDs are not allowed in annotations)"
        ) from e
    except SafeET.ParseError as e:
        raise VOCFormatError(f"{xml_path}: not well-formed XML ({e})") from e
    except OSError as e:
        raise VOCFormatError(f"{xml_path}: cannot read the annotation ({e.strerror or e})") from e


def image_of(xml_path: Path, filename: str | None, image_dir: Path) -> Path:
    """The image an annotation describes: ``image_dir/<filename>`` when that file exists, else the image named as
    the XML file (``<stem>.jpg``, ``.png``, …: tools write stale or bare names), else ``<filename>`` as written (its
    read then fails naming it)."""
    named = image_dir / filename if filename else None
    if named is not None and named.is_file():
        return named
    by_stem = next((p for p in (image_dir / f"{xml_path.stem}{s}" for s in IMAGE_SUFFIXES) if p.is_file()), None)
    return by_stem or named or image_dir / f"{xml_path.stem}.jpg"


def voc_class_names(xml_paths: Sequence[Path]) -> set[str]:
    """The object names used in these annotation files (a names-only pass, for data.classes=null)."""
    names = set()
    for xml_path in xml_paths:
        for obj in _xml_root(xml_path).iter("object"):
            name = _text(obj, "name")
            if name is None:
                raise VOCFormatError(f"{xml_path}: an <object> has no <name>")
            names.add(name)
    return names


def parse_voc_xml(
    xml_path: Path, image_dir: Path, class_index: dict[str, int], unknown_classes: str = "error"
) -> tuple[VOCRecord, int]:
    """Read one VOC annotation file; returns the record and how many objects of unknown classes were skipped."""
    root = _xml_root(xml_path)
    image_path = image_of(xml_path, _text(root, "filename"), image_dir)
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
        image_path,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(difficult, dtype=torch.bool),
        height,
        width,
    )
    return record, skipped


def split_ids(folder: Path, split: str | None, year: int | str | None = None) -> list[str]:
    """The annotation ids (file stems) listed in ``folder/ImageSets/Main/<split>.txt``."""
    list_file = folder / "ImageSets" / "Main" / f"{split}.txt"
    if list_file.is_file():
        return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if year is not None:
        raise FileNotFoundError(
            f"{list_file}: no such split file; data.root must be the VOCdevkit folder "
            f"holding VOC{year}/ (or set data.download=true)"
        )
    listed = sorted(p.stem for p in (folder / "ImageSets" / "Main").glob("*.txt"))
    raise FileNotFoundError(
        f"{list_file}: no such split list; "
        + (
            f"the split lists of {folder} are {listed}: name them, e.g. 'data.train_sets=[{listed[0]}]'"
            if listed
            else f"{folder} has no ImageSets/Main/*.txt"
        )
        + "; or split all its annotations with data.val_fraction=0.2"
    )


class VOCDataset(Dataset):
    """One split of VOC-style annotations: ``VOC<year>/ImageSets/Main/<split>.txt`` of a VOCdevkit folder, or with
    ``year=None`` one VOC-style folder's ``ImageSets/Main/<split>.txt``, or the annotation ``ids`` given (file
    stems in ``annotations_dir``). ``<filename>`` names each image in ``images_dir`` (else the XML's stem does).

    ``keep_difficult=False`` drops "difficult" objects from the targets (training); with True they stay, flagged,
    so the evaluator ignores them as the devkit does. Items are (uint8 image (3, H, W), target) with ``boxes``,
    ``labels``, ``difficult``, ``image_id`` (the index in this set) then ``transform``.
    """

    def __init__(
        self,
        root: str | Path,
        year: int | str | None,
        split: str | None,
        classes: Sequence[str] = VOC_CLASSES,
        keep_difficult: bool = True,
        unknown_classes: str = "error",
        transform: SampleTransform | None = None,
        annotations_dir: str = "Annotations",
        images_dir: str = "JPEGImages",
        ids: Sequence[str] | None = None,
    ) -> None:
        if unknown_classes not in ("error", "skip"):
            raise ValueError(f"data.unknown_classes={unknown_classes!r}: choose 'error' or 'skip'")
        self.root = Path(root) / f"VOC{year}" if year is not None else Path(root)
        self.ids = list(ids) if ids is not None else split_ids(self.root, split, year)
        self.classes = list(classes)
        self.keep_difficult, self.transform = keep_difficult, transform
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.records: list[VOCRecord] = []
        skipped = 0
        for image_id in self.ids:
            record, n = parse_voc_xml(
                self.root / annotations_dir / f"{image_id}.xml", self.root / images_dir, class_index, unknown_classes
            )
            self.records.append(record)
            skipped += n
        if skipped:
            log.warning(
                "%s (%s): skipped %d object(s) of classes not in data.classes (data.unknown_classes=skip)",
                self.root,
                split or f"{len(self.ids)} annotations",
                skipped,
            )
        self.skipped_objects = skipped

    def __len__(self) -> int:
        return len(self.records)

    def image_paths(self) -> list[Path]:
        return [r.image_path for r in self.records]

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


@dataclass(frozen=True)
class VOCSet:
    """One set of a VOC data module: a devkit's ``(year, split)``, a folder's ``split`` (year None), or the
    annotation ``ids`` a ``val_fraction`` split chose (split names the part)."""

    year: str | None
    split: str
    ids: tuple[str, ...] | None = None


class VOCDataModule(DetectionDataModule):
    """VOC-style annotations, from a VOCdevkit folder or one exported folder (``root``).

    * VOCdevkit (``root`` holds ``VOC<year>/``): ``train_sets`` / ``val_sets`` are ``[year, split]`` pairs (default
      07+12 trainval / 07 test).
    * One folder (``root`` holds ``annotations_dir``, e.g. ``BCCD/``, a labelImg ``images/`` + ``annotations/``):
      the sets are split names (``[train]``, ``[val]``: ``ImageSets/Main/<split>.txt``); or ``val_fraction`` splits
      every annotation file of the folder by ``split_seed``; given neither, its ``train``/``val`` lists if it has them.

    ``classes=None`` takes the class names from the training and validation annotations (sorted); a class only
    validation has is a warning naming it. Training drops "difficult" objects unless ``train_difficult``; validation
    keeps them flagged for the metrics.
    """

    def __init__(
        self,
        root: str,
        train_sets: Sequence = ((2007, "trainval"), (2012, "trainval")),
        val_sets: Sequence = ((2007, "test"),),
        classes: Sequence[str] | None = VOC_CLASSES,
        annotations_dir: str = "Annotations",
        images_dir: str = "JPEGImages",
        val_fraction: float | None = None,
        split_seed: int = 0,
        train_difficult: bool = False,
        unknown_classes: str = "error",
        download: bool = False,
        batch_size: int = 32,
        num_workers: int = 4,
        **loader: Any,
    ) -> None:
        super().__init__(classes, batch_size, num_workers=num_workers, **loader)  # see DetectionDataModule
        if root is None or str(root) in ("", "???"):
            raise ValueError(
                "data.root is not set: give the VOCdevkit folder (data.root=/data/VOCdevkit) or one VOC-style "
                "folder holding Annotations/ (data.annotations_dir) and JPEGImages/ (data.images_dir)"
            )
        self.root = Path(root)
        self.annotations_dir, self.images_dir = annotations_dir, images_dir
        self.train_difficult, self.unknown_classes, self.download = train_difficult, unknown_classes, download
        self.devkit = download or any(p.is_dir() for p in self.root.glob("VOC*"))
        self.fraction_split = val_fraction is not None and not self.devkit
        if self.devkit:
            if val_fraction is not None:
                raise ValueError(
                    f"data.val_fraction={val_fraction}: data.root={root} is a VOCdevkit, whose splits are its "
                    f"[year, split] lists (data.train_sets, data.val_sets); val_fraction splits one exported folder"
                )
            self.train_sets = [VOCSet(*pair) for pair in self._pairs(train_sets, "train_sets")]
            self.val_sets = [VOCSet(*pair) for pair in self._pairs(val_sets, "val_sets")]
        else:
            self.train_sets, self.val_sets = self._folder_sets(train_sets, val_sets, val_fraction, split_seed)
        if classes is None:
            self.classes = self._classes_from_training_data()

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

    def _folder_sets(
        self, train_sets: Sequence, val_sets: Sequence, val_fraction: float | None, split_seed: int
    ) -> tuple[list[VOCSet], list[VOCSet]]:
        annotations = self.root / self.annotations_dir
        if not annotations.is_dir():
            found = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else None
            raise FileNotFoundError(
                f"data.root={self.root} holds neither VOC<year>/ folders (a VOCdevkit) nor {self.annotations_dir}/ "
                f"(one VOC-style folder); "
                + (f"it holds {found[:20]}: " if found is not None else "no such folder: ")
                + "point data.root at one, or name the folders: data.annotations_dir=<xml folder> "
                "data.images_dir=<image folder> (labelImg: annotations, images)"
            )
        named = [s for s in (*train_sets, *val_sets) if isinstance(s, str)]
        if val_fraction is not None:
            if named:
                raise ValueError(
                    f"data.val_fraction={val_fraction} splits every annotation of {annotations}; the split lists "
                    f"{named} (data.train_sets, data.val_sets) name another split: give one or the other"
                )
            ids = sorted(p.stem for p in annotations.glob("*.xml"))
            train, val = fraction_split(ids, val_fraction, split_seed)
            log.info(
                "data.val_fraction=%g (data.split_seed=%d): %d training and %d validation images of the %d "
                "annotations in %s",
                val_fraction,
                split_seed,
                len(train),
                len(val),
                len(ids),
                annotations,
            )
            return [VOCSet(None, "train", tuple(train))], [VOCSet(None, "val", tuple(val))]
        if all(isinstance(s, str) for s in (*train_sets, *val_sets)) and train_sets and val_sets:
            return [VOCSet(None, s) for s in train_sets], [VOCSet(None, s) for s in val_sets]
        lists = self.root / "ImageSets" / "Main"
        if (lists / "train.txt").is_file() and (lists / "val.txt").is_file():
            log.info("data.root=%s is one VOC-style folder: training on its train split, validating on val", self.root)
            return [VOCSet(None, "train")], [VOCSet(None, "val")]
        listed = sorted(p.stem for p in lists.glob("*.txt"))
        raise ValueError(
            f"data.root={self.root} is one VOC-style folder (not a VOCdevkit), so data.train_sets / data.val_sets "
            f"name its split lists (ImageSets/Main/<split>.txt"
            + (
                f": it has {listed}), e.g. 'data.train_sets=[{listed[0]}]' 'data.val_sets=[{listed[-1]}]'"
                if listed
                else ": it has none)"
            )
            + "; or split its annotations: data.val_fraction=0.2"
        )

    def _folder(self, voc_set: VOCSet) -> Path:
        return self.root / f"VOC{voc_set.year}" if voc_set.year is not None else self.root

    def _ids(self, voc_set: VOCSet) -> list[str]:
        return (
            list(voc_set.ids)
            if voc_set.ids is not None
            else split_ids(self._folder(voc_set), voc_set.split, voc_set.year)
        )

    def _xml_files(self, sets: list[VOCSet]) -> list[Path]:
        return [self._folder(s) / self.annotations_dir / f"{i}.xml" for s in sets for i in self._ids(s)]

    def _classes_from_training_data(self) -> list[str]:
        """data.classes=null: the names in the training and validation annotations, sorted; a name that only
        validation uses is a warning naming it."""
        training = voc_class_names(self._xml_files(self.train_sets))
        validation = voc_class_names(self._xml_files(self.val_sets))
        classes = sorted(training | validation)
        if not classes:
            raise ValueError(f"data.classes=null: the annotations under {self.root} hold no objects")
        log.info("data.classes from the training and validation annotations: %s", classes)
        where = f"{self.root} ({', '.join(s.split for s in self.val_sets)})"
        warn_validation_only_classes(validation - training, where)
        return classes

    def prepare_data(self) -> None:
        if self.download:  # Lightning runs this on one process per node
            for voc_set in {*self.train_sets, *self.val_sets}:
                download_voc(self.root, voc_set.year, voc_set.split)

    def _concat(self, sets: list[VOCSet], keep_difficult: bool, transform) -> Dataset:
        datasets = [
            VOCDataset(
                self.root,
                s.year,
                s.split,
                self.classes,
                keep_difficult,
                self.unknown_classes,
                transform,
                self.annotations_dir,
                self.images_dir,
                s.ids,
            )
            for s in sets
        ]
        return datasets[0] if len(datasets) == 1 else ImageIdOffsets(datasets)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._concat(self.train_sets, self.train_difficult, self.train_transform)
        if stage in ("fit", "validate", "test", None) and self.val_set is None:
            self.val_set = self._concat(self.val_sets, True, self.val_transform)


class ImageIdOffsets(ConcatDataset):
    """Concatenated sets with ``image_id`` made unique across them (each set numbers its images from 0)."""

    def aspect_ratios(self) -> list[float]:
        return [r for d in self.datasets for r in d.aspect_ratios()]

    def image_paths(self) -> list[Path]:
        return [p for d in self.datasets for p in d.image_paths()]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, target = super().__getitem__(index)
        return image, {**target, "image_id": torch.tensor(index)}
