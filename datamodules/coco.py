"""COCO-format data, read with pycocotools, iterating the json (never the folder); ``file_name`` may hold
sub-folders. COCO's own layout is ``<root>/annotations/instances_<split>.json`` with the images under
``<root>/<split>/`` (docs/ARCHITECTURE.md §1); other exports name their files (``data.train_json``, ``data.val_json``,
their images' folders found beside them) or split one json (``data.val_fraction``).

Category ids map to contiguous labels 0..K-1 by name, in the order of ``data.classes`` (default: COCO's 80 in
id order; null: the training json's categories that have annotations, in id order), and back to the json's ids in
written results (``write_coco_results``). A category with no annotations that is not in ``data.classes`` (a
placeholder id 0, as some exporters write) is allowed.
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
from torchvision.ops import box_convert

from .base import DetectionDataModule, SampleTransform, fraction_split, warn_validation_only_classes
from .images import clip_boxes, read_image

log = logging.getLogger(__name__)


class COCOFormatError(ValueError):
    """An annotation json that cannot be used as it is; the message names the file, the entry and the fix."""


def _number(value) -> bool:
    """A finite int or float (not a bool, a string or None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


LAYOUT_HINT = "data.root must hold annotations/instances_<split>.json (data.train_split / data.val_split)"


def load_coco(path: Path, missing_hint: str = LAYOUT_HINT) -> COCO:
    """The json checked for what pycocotools would silently accept (duplicate image or category ids, annotations of
    unknown images or categories, missing boxes), then indexed by pycocotools. ``missing_hint``: the fix named
    when there is no such file (the data key that named it)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such annotation file; {missing_hint}") from None
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
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not _number(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise COCOFormatError(
                f"{path}: category {cat!r} needs an id (a number) and a name (text), as COCO's categories have"
            )
    dup = [i for i, n in Counter(c["id"] for c in data["categories"]).items() if n > 1]
    if dup:
        raise COCOFormatError(
            f"{path}: category id {dup[0]} appears more than once in 'categories'; ids must be unique"
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


def used_category_names(coco: COCO) -> list[str]:
    """The names of the categories that have at least one annotation, in category-id order, each name once."""
    used = {a["category_id"] for a in coco.dataset["annotations"]}
    names: list[str] = []
    for cat in sorted(coco.dataset["categories"], key=lambda c: c["id"]):
        if cat["id"] in used and cat["name"] not in names:
            names.append(cat["name"])
    return names


class COCODataset(Dataset):
    """One split of a COCO-format data set. Items are (uint8 image (3, H, W), target) with ``boxes`` (xyxy px),
    ``labels``, ``iscrowd``, ``image_id`` (the index in this set; ``self.image_ids`` holds the json's ids), then
    ``transform``. ``keep_empty=False`` leaves out images without (non-crowd) annotations (training).

    The json is ``<root>/annotations/instances_<split>.json`` and its images are under ``<root>/<split>/``, unless
    ``annotation_file`` / ``image_dir`` name them (any layout; ``root`` and ``split`` may then be None); ``coco`` is
    that json already loaded (``load_coco``), ``image_ids`` the images of the json to keep (in the json's order;
    ``keep_empty`` applies after)."""

    def __init__(
        self,
        root: str | Path | None,
        split: str | None,
        classes: Sequence[str],
        keep_empty: bool = True,
        transform: SampleTransform | None = None,
        *,
        annotation_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        coco: COCO | None = None,
        image_ids: Sequence[int] | None = None,
        unknown_classes: str = "error",
    ) -> None:
        if unknown_classes not in ("error", "skip"):
            raise ValueError(f"data.unknown_classes={unknown_classes!r}: choose 'error' or 'skip'")
        self.root = Path(root) if root is not None else None
        if (annotation_file is None or image_dir is None) and (self.root is None or split is None):
            raise ValueError("COCODataset: give root and split, or annotation_file and image_dir")
        self.annotation_file = (
            Path(annotation_file)
            if annotation_file is not None
            else self.root / "annotations" / f"instances_{split}.json"
        )
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / split
        self.coco = coco if coco is not None else load_coco(self.annotation_file)
        self.classes, self.transform = list(classes), transform
        label_of_name = {name: i for i, name in enumerate(self.classes)}
        used = {ann["category_id"] for ann in self.coco.dataset["annotations"]}
        self.label_of_category: dict[int, int] = {}
        for cat in self.coco.dataset["categories"]:
            if cat["name"] in label_of_name:
                self.label_of_category[cat["id"]] = label_of_name[cat["name"]]
            elif cat["id"] in used and unknown_classes == "error":
                raise COCOFormatError(
                    f"{self.annotation_file}: category {cat['id']} {cat['name']!r} has annotations "
                    f"but is not in data.classes; add it to data.classes or set data.unknown_classes=skip"
                )
        self.category_of_label = {label: cat for cat, label in self.label_of_category.items()}
        skipped = [a for a in self.coco.dataset["annotations"] if a["category_id"] not in self.label_of_category]
        if skipped:
            names = {c["id"]: c["name"] for c in self.coco.dataset["categories"]}
            log.warning(
                "%s: skipped %d annotation(s) of categories not in data.classes %s (data.unknown_classes=skip)",
                self.annotation_file,
                len(skipped),
                sorted({names.get(a["category_id"], str(a["category_id"])) for a in skipped}),
            )
        ids = [im["id"] for im in self.coco.dataset["images"]]  # the json's order, never the folder's
        if image_ids is not None:
            wanted = set(image_ids)
            unknown = wanted - set(ids)
            if unknown:
                raise ValueError(
                    f"{self.annotation_file}: image id(s) {sorted(unknown, key=str)[:10]} are not in its 'images'"
                )
            ids = [i for i in ids if i in wanted]
        if not keep_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns[i])]
        self.image_ids = ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_paths(self) -> list[Path]:
        return [self.image_dir / self.coco.imgs[i]["file_name"] for i in self.image_ids]

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
        anns = [a for a in self.coco.imgToAnns[info["id"]] if a["category_id"] in self.label_of_category]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = box_convert(xywh, "xywh", "xyxy")
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
        xywh = box_convert(det["boxes"].detach().cpu().double(), "xyxy", "xywh").tolist()
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
    """COCO-format train/val data, in COCO's layout or an exporter's.

    * ``root``: COCO's own, ``<root>/annotations/instances_<split>.json`` with the images under ``<root>/<split>/``
      (``train_split`` / ``val_split``).
    * ``train_json`` / ``val_json`` name the files themselves (Roboflow's ``train/_annotations.coco.json``, CVAT's
      ``annotations/instances_default.json``), each in place of its part of the ``root`` layout; their images are in
      ``train_images`` / ``val_images``, by default the json's own folder or, when its images are not there,
      ``<json folder>/../images/`` (the folder chosen is logged).
    * ``val_fraction`` validates on that fraction of the training json's images, drawn by ``split_seed`` (instead of
      a validation json); given only ``train_json``, it is needed.

    ``classes=None`` takes the names of the categories that the training or validation annotations use
    (placeholders dropped), in id order, here in ``__init__`` (the model is sized by them before ``setup``); a
    class only validation uses is a warning naming it. The loaded jsons are kept for ``setup``. Training leaves out
    images without annotations unless ``train_empty_images`` (after a split, from its training part only);
    validation keeps every image of its json or part."""

    def __init__(
        self,
        root: str | None = None,
        classes: Sequence[str] | None = None,
        train_split: str = "train2017",
        val_split: str = "val2017",
        train_empty_images: bool = False,
        batch_size: int = 16,
        num_workers: int = 4,
        train_json: str | None = None,
        train_images: str | None = None,
        val_json: str | None = None,
        val_images: str | None = None,
        val_fraction: float | None = None,
        split_seed: int = 0,
        unknown_classes: str = "error",
        **loader: Any,
    ) -> None:
        super().__init__(classes, batch_size, num_workers=num_workers, **loader)  # see DetectionDataModule
        self.unknown_classes = unknown_classes
        self.root = Path(root) if root is not None and str(root) not in ("", "???") else None
        if self.root is None and train_json is None:
            raise ValueError(
                "data.root is not set: give the folder holding annotations/instances_<split>.json and the split "
                "folders (data.root=/data/coco), or the training json itself: data.train_json=<file> "
                "(with data.val_json=<file> or data.val_fraction=0.2)"
            )
        self.train_split, self.val_split = train_split, val_split
        self.train_empty_images = train_empty_images
        self.val_fraction, self.split_seed = val_fraction, split_seed
        if val_fraction is not None:
            if val_json is not None:
                raise ValueError(
                    f"data.val_fraction={val_fraction} splits the training json for validation, and "
                    f"data.val_json={val_json} names a validation json: give one or the other"
                )
            if val_images is not None:
                raise ValueError(
                    f"data.val_images={val_images} is the folder of data.val_json's images; with "
                    f"data.val_fraction={val_fraction} the validation images are the training json's "
                    f"(data.train_images): leave data.val_images out"
                )
            if not (_number(val_fraction) and 0 < val_fraction < 1):
                raise ValueError(f"data.val_fraction={val_fraction}: give a fraction between 0 and 1, e.g. 0.2")
        elif val_json is None and self.root is None:
            raise ValueError(
                f"data.train_json={train_json} is given without validation data: give the validation json, "
                f"data.val_json=<file> (and data.val_images=<folder> unless its images are beside it), or "
                f"validate on part of the training images: data.val_fraction=0.2"
            )
        # per part (train / val): the json, the data key that named it (None: the root layout), the images' folder
        # given (None: found beside the json, or <root>/<split>)
        self._json_key = {"train": "data.train_json" if train_json is not None else None}
        self._json_key["val"] = "data.val_json" if val_json is not None else None
        self.train_json = Path(train_json) if train_json is not None else self._layout_json(train_split)
        if val_fraction is not None:
            self.val_json, self._json_key["val"] = self.train_json, self._json_key["train"]
        else:
            self.val_json = Path(val_json) if val_json is not None else self._layout_json(val_split)
        self._images_given = {"train": train_images, "val": val_images}
        self._image_dirs: dict[str, Path] = {}
        self._cocos: dict[Path, COCO] = {}  # loaded once: in __init__ (classes=None) and again in setup
        self._split_ids: dict[str, list] | None = None
        if classes is None:
            self.classes = self._classes_from_training_data()

    def _layout_json(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def _coco(self, part: str) -> COCO:
        """The loaded json of ``part`` (train / val), loaded once (the same object when both parts share a file)."""
        path = self.train_json if part == "train" else self.val_json
        if path not in self._cocos:
            key = self._json_key[part]
            self._cocos[path] = load_coco(path, f"check {key}" if key is not None else LAYOUT_HINT)
        return self._cocos[path]

    def _classes_from_training_data(self) -> list[str]:
        """data.classes=null: the categories that the training or validation annotations use, in the training
        json's id order (a validation json's own category after them), each name once: a placeholder no annotation
        uses (Roboflow's category 0, labelme's ``_background_``) is left out. A class only validation uses is a
        warning naming it."""
        train = self._coco("train")
        training = used_category_names(train)
        validation = used_category_names(self._coco("val")) if self.val_json != self.train_json else []
        used = set(training) | set(validation)
        classes = [c["name"] for c in sorted(train.dataset["categories"], key=lambda c: c["id"]) if c["name"] in used]
        classes = list(dict.fromkeys(classes + [name for name in validation if name not in classes]))
        if not training:
            raise ValueError(
                f"{self.train_json}: data.classes=null reads the classes from the categories the annotations use, "
                f"and the training json has no annotations; give them: data.classes=[name, ...]"
            )
        log.info("data.classes from the categories with annotations in %s: %s", self.train_json, classes)
        warn_validation_only_classes(set(validation) - set(training), str(self.val_json))
        return classes

    def _images(self, part: str) -> Path:
        """The folder of ``part``'s images: given, <root>/<split> for the root layout, or found beside the json."""
        if self.val_fraction is not None:
            part = "train"  # both parts are images of the training json
        if part not in self._image_dirs:
            given, key = self._images_given[part], f"data.{part}_images"
            if given is not None:
                folder = Path(given)
                if not folder.is_dir():
                    raise FileNotFoundError(f"{key}={given}: no such folder; give the folder of its json's images")
            elif self._json_key[part] is None:
                folder = self.root / (self.train_split if part == "train" else self.val_split)
            else:
                folder = self._find_images(part, key)
            self._image_dirs[part] = folder
        return self._image_dirs[part]

    def _find_images(self, part: str, key: str, probe: int = 20) -> Path:
        """The json's own folder (Roboflow: images beside ``_annotations.coco.json``) or ``../images/`` (CVAT:
        ``annotations/instances_default.json`` + ``images/``): the first holding one of the json's first images."""
        path = self.train_json if part == "train" else self.val_json
        names = [im["file_name"] for im in self._coco(part).dataset["images"][:probe]]
        folders = [path.parent, path.parent.parent / "images"]
        if not names:
            return folders[0]
        for folder in folders:
            if any((folder / name).is_file() for name in names):
                log.info("%s: its images are in %s (%s=<folder> chooses another)", path, folder, key)
                return folder
        raise FileNotFoundError(
            f"{path}: its images (file_name {names[0]!r}"
            + (f" and the next {len(names) - 1}" if len(names) > 1 else "")
            + f") are neither in {folders[0]} nor in {folders[1]}; give their folder: {key}=<folder>"
        )

    def _image_ids(self, part: str) -> list | None:
        """With val_fraction, ``part``'s share of the training json's images (split once, by split_seed)."""
        if self.val_fraction is None:
            return None
        if self._split_ids is None:
            ids = [im["id"] for im in self._coco("train").dataset["images"]]
            train, val = fraction_split(ids, self.val_fraction, self.split_seed)
            log.info(
                "data.val_fraction=%g (data.split_seed=%d): %d training and %d validation images of %s",
                self.val_fraction,
                self.split_seed,
                len(train),
                len(val),
                self.train_json,
            )
            self._split_ids = {"train": train, "val": val}
        return self._split_ids[part]

    def _dataset(self, part: str, keep_empty: bool, transform: SampleTransform | None) -> COCODataset:
        return COCODataset(
            None,
            None,
            self.classes,
            keep_empty,
            transform,
            annotation_file=self.train_json if part == "train" else self.val_json,
            image_dir=self._images(part),
            coco=self._coco(part),
            image_ids=self._image_ids(part),
            unknown_classes=self.unknown_classes,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._dataset("train", self.train_empty_images, self.train_transform)
        if stage in ("fit", "validate", "test", None) and self.val_set is None:
            self.val_set = self._dataset("val", True, self.val_transform)
