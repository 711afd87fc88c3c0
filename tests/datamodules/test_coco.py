"""COCO: the real COCO2017 sample in ../shared/data against its json, our COCO metrics against pycocotools'
COCOeval on the same files, and fixture sets in tmp_path for the quirks of exported jsons."""

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.coco import COCODataModule, COCODataset, COCOFormatError, write_coco_results
from evaluation.detection_metrics import DetectionMetrics

from ..conftest import ROOT, SHARED_DATA, compose
from ..preloaded import run_python

COCO_SAMPLE = SHARED_DATA / "coco2017-sample"
needs_sample = pytest.mark.skipif(not COCO_SAMPLE.is_dir(), reason="../shared/data/coco2017-sample is absent")


def coco_classes():
    return list(compose("data=coco").data.classes)


@needs_sample
@pytest.mark.parametrize(("split", "num_annotations", "num_crowd"), [("train2017", 705, 6), ("val2017", 815, 11)])
def test_real_sample_loads_every_image_with_its_boxes_converted(split, num_annotations, num_crowd):
    data = COCODataset(COCO_SAMPLE, split, coco_classes())
    raw = json.loads((COCO_SAMPLE / "annotations" / f"instances_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in raw["categories"]}
    assert len(data) == 80 and data.image_ids == [im["id"] for im in raw["images"]]
    total = crowd = 0
    for i in range(len(data)):
        image, target = data[i]
        info = raw["images"][i]
        anns = [a for a in raw["annotations"] if a["image_id"] == info["id"]]
        assert image.dtype == torch.uint8 and image.shape == (3, info["height"], info["width"])
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        torch.testing.assert_close(target["boxes"], expected.float().clamp(min=0))  # [x, y, w, h] → xyxy
        assert [data.classes[k] for k in target["labels"]] == [names[a["category_id"]] for a in anns]
        assert target["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
        total += len(anns)
        crowd += sum(a["iscrowd"] for a in anns)
    assert (total, crowd) == (num_annotations, num_crowd)  # the sample's README
    assert data.category_of_label[data.classes.index("toothbrush")] == 90  # COCO's ids have gaps


@needs_sample
def test_our_coco_metrics_equal_pycocotools_on_the_same_files(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = COCODataset(COCO_SAMPLE, "val2017", coco_classes())
    g = torch.Generator().manual_seed(0)
    metrics = DetectionMetrics(data.classes)
    detections, indices = [], []
    for i in range(len(data)):
        _, target = data[i]
        boxes = target["boxes"]
        # noisy copies of most objects (some matching at 0.5 but not 0.75), a few with the wrong class, clutter
        jitter = boxes + torch.randn(boxes.shape, generator=g) * (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) * 0.08
        labels = target["labels"].clone()
        wrong = torch.rand(len(labels), generator=g) < 0.1
        labels[wrong] = torch.randint(0, 80, (int(wrong.sum()),), generator=g)
        clutter = torch.rand(5, 2, generator=g) * 300
        det_boxes = torch.cat((jitter, torch.cat((clutter, clutter + 40), 1)))
        det = {
            "boxes": det_boxes,
            "scores": torch.rand(len(det_boxes), generator=g),
            "labels": torch.cat((labels, torch.randint(0, 80, (5,), generator=g))),
        }
        keep = torch.rand(len(det_boxes), generator=g) < 0.9
        det = {k: v[keep][:100] for k, v in det.items()}
        detections.append(det)
        indices.append(i)
        metrics.update([det], [{**target, "difficult": torch.zeros_like(target["labels"], dtype=torch.bool)}])
    ours = metrics.compute("val")
    results = write_coco_results(detections, data, indices, tmp_path / "results.json")
    entries = json.loads(results.read_text())
    assert sum(len(d["scores"]) for d in detections) == len(entries) and {
        "image_id",
        "category_id",
        "bbox",
        "score",
    } <= set(entries[0])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(data.annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(str(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    reference = dict(zip(("map", "map_50", "map_75"), evaluator.stats[:3]))
    reference["mar_100"] = evaluator.stats[8]
    assert 0.2 < reference["map_50"] < 0.9  # a test that could tell numbers apart
    for key, value in reference.items():
        assert ours[f"val/{key}"] == pytest.approx(value, abs=2e-3), key


@pytest.mark.slow
@needs_sample
def test_config_trains_a_short_run_on_the_real_sample(tmp_path):
    cmd = [
        ROOT / "train.py",
        "model=ssd",
        "model.num_prediction_layers=4",
        "model.backbone.width=0.25",
        "model.backbone.norm=bn",
        "model/optimizer=adamw",
        "trainer=cpu",
        "task_name=coco_sample",
        "data=coco",
        f"data.root={COCO_SAMPLE}",
        "data.train_transform.size=128",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.pin_memory=false",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=3",
        "trainer.log_every_n_steps=1",
        "model.scheduler.warmup_steps=2",
        "model.scheduler.milestones=[8,9]",
        "model.postprocess.score_thresh=0.05",  # untrained: 1/81 > 0.01 would send every box to NMS
        f"paths.log_dir={tmp_path}",
    ]
    done = run_python(cmd, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = (tmp_path / "coco_sample").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["val/map_50"] <= 1 and "val/ap/person" in metrics


# --- fixture jsons for the quirks of exported files -----------------------------------------------------
def write_coco(
    root: Path,
    images: list[dict],
    annotations: list[dict],
    categories: list[dict],
    split: str = "val",
    extra_files: tuple[str, ...] = (),
) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for im in images:
        path = root / split / im["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (im["width"], im["height"]), (90, 120, 30)).save(path)
    for name in extra_files:
        Image.new("RGB", (8, 8)).save(root / split / name)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def image(i, name=None, w=64, h=48):
    return {"id": i, "file_name": name or f"{i:06d}.jpg", "width": w, "height": h}


def ann(i, image_id, category_id, bbox, iscrowd=0):
    return {
        "id": i,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": iscrowd,
        "area": bbox[2] * bbox[3],
    }


CATEGORIES = [{"id": 0, "name": "placeholder"}, {"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]


def test_sparse_ids_placeholder_category_sub_folders_and_json_order(tmp_path):
    images = [image(42, "day1/a.jpg"), image(5, "day2/b.jpg"), image(9)]
    anns = [ann(1, 42, 7, [10, 5, 20, 10]), ann(2, 5, 3, [0, 0, 64, 48]), ann(3, 5, 7, [30, 30, 10, 10], iscrowd=1)]
    root = write_coco(tmp_path, images, anns, CATEGORIES, extra_files=("stray.jpg",))
    data = COCODataset(root, "val", ["dog", "cat"])
    assert data.image_ids == [42, 5, 9]  # the json's order; the stray file in the folder is not an image of the set
    _, t = data[0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[10.0, 5.0, 30.0, 15.0]]))
    assert t["labels"].tolist() == [1] and t["iscrowd"].tolist() == [0]
    _, t = data[1]
    assert t["labels"].tolist() == [0, 1] and t["iscrowd"].tolist() == [0, 1]
    assert len(data[2][1]["boxes"]) == 0  # no annotations: kept for evaluation
    assert data.category_of_label == {0: 3, 1: 7}
    entries = json.loads(
        write_coco_results(
            [
                {
                    "boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]),
                    "scores": torch.tensor([0.5]),
                    "labels": torch.tensor([1]),
                }
            ],
            data,
            [1],
            tmp_path / "r.json",
        ).read_text()
    )
    assert entries == [{"image_id": 5, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
    train = COCODataset(root, "val", ["dog", "cat"], keep_empty=False)
    assert train.image_ids == [42, 5]


@pytest.mark.parametrize(
    ("images", "anns", "message"),
    [
        ([image(1), image(1)], [], r"image id 1 appears 2 times"),
        ([image(1)], [ann(1, 2, 7, [0, 0, 5, 5])], r"annotation id 1 refers to image id 2, which is not in 'images'"),
        ([image(1)], [ann(1, 1, 99, [0, 0, 5, 5])], r"annotation id 1 has category_id 99, not in 'categories'"),
        ([image(1)], [{"id": 4, "image_id": 1, "category_id": 7}], r"annotation id 4 has no 'bbox'"),
        (
            [image(1)],
            [ann(1, 1, 0, [0, 0, 5, 5])],
            r"category 0 'placeholder' has annotations but is not in data.classes",
        ),
    ],
)
def test_bad_jsons_name_the_file_and_entry(tmp_path, images, anns, message):
    root = write_coco(tmp_path, images, anns, CATEGORIES)
    with pytest.raises(COCOFormatError, match=rf"instances_val\.json: .*{message}"):
        COCODataset(root, "val", ["dog", "cat"])


def test_missing_json_and_root_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_val2017.json: no such annotation file"):
        COCODataset(tmp_path, "val2017", ["cat"])
    with pytest.raises(Exception, match="data.root"):
        from hydra.utils import instantiate

        instantiate(compose("data=coco").data)
    data = COCODataModule(str(tmp_path), ["cat"], val_split="nope")
    with pytest.raises(FileNotFoundError, match="instances_nope.json"):
        data.setup("validate")


# --- other layouts: explicit jsons (Roboflow, CVAT), a split of one json, classes from the data -----------------
def write_json(path: Path, images: list[dict], annotations: list[dict], categories: list[dict], image_dir=None) -> Path:
    """A COCO json at ``path`` with its images written under ``image_dir`` (default: beside it)."""
    image_dir = path.parent if image_dir is None else image_dir
    for im in images:
        file = image_dir / im["file_name"]
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (im["width"], im["height"]), (90, 120, 30)).save(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def xyxy(anns: list[dict]) -> torch.Tensor:
    return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)


# Roboflow: a placeholder category 0 named after the project, the real ones from 1 (listed out of id order here)
ROBOFLOW_CATEGORIES = [
    {"id": 2, "name": "RBC", "supercategory": "cells"},
    {"id": 0, "name": "cells", "supercategory": "none"},
    {"id": 3, "name": "Platelets", "supercategory": "cells"},
    {"id": 1, "name": "WBC", "supercategory": "cells"},
]


def test_roboflow_layout_reads_classes_and_images_beside_each_json(tmp_path, monkeypatch):
    import datamodules.coco as coco_module

    train_anns = [
        ann(1, 10, 2, [4, 6, 20, 10]),
        ann(2, 10, 1, [30, 8, 12.5, 30]),
        ann(3, 11, 3, [0, 0, 8, 8]),
        ann(4, 11, 2, [40, 20, 10, 10]),
    ]
    train = write_json(
        tmp_path / "train" / "_annotations.coco.json",
        [image(10, "a_jpg.rf.1.jpg"), image(11, "b_jpg.rf.2.jpg"), image(12, "c_jpg.rf.3.jpg")],
        train_anns,
        ROBOFLOW_CATEGORIES,
    )
    val = write_json(
        tmp_path / "valid" / "_annotations.coco.json",
        [image(1, "v_jpg.rf.4.jpg"), image(2, "w_jpg.rf.5.jpg")],
        [ann(1, 1, 1, [2, 2, 10, 10])],
        ROBOFLOW_CATEGORIES,
    )
    loads = []
    real_load = coco_module.load_coco
    monkeypatch.setattr(coco_module, "load_coco", lambda path, *a: loads.append(path) or real_load(path, *a))
    data = COCODataModule(root=None, classes=None, train_json=str(train), val_json=str(val))
    assert data.classes == ["WBC", "RBC", "Platelets"]  # the used categories in id order, placeholder 0 dropped
    data.setup("fit")
    assert sorted(map(str, loads)) == sorted([str(train), str(val)])  # each json read once (__init__, then setup)
    assert data.train_set.image_dir == train.parent and data.val_set.image_dir == val.parent
    assert data.train_set.image_ids == [10, 11]  # image 12 has no annotations: out of training
    assert data.val_set.image_ids == [1, 2]  # validation keeps every image
    for index, image_id in enumerate(data.train_set.image_ids):
        img, target = data.train_set[index]
        anns = [a for a in train_anns if a["image_id"] == image_id]
        assert img.shape == (3, 48, 64)
        torch.testing.assert_close(target["boxes"], xyxy(anns))
        names = {c["id"]: c["name"] for c in ROBOFLOW_CATEGORIES}
        assert [data.classes[k] for k in target["labels"]] == [names[a["category_id"]] for a in anns]
    assert data.train_set.category_of_label == {0: 1, 1: 2, 2: 3}  # results are written with the json's ids
    _, target = data.val_set[0]
    assert target["labels"].tolist() == [0]


def cvat_set(root: Path, num_images: int = 8, empty=(8,)) -> tuple[Path, list[int]]:
    """CVAT's export: annotations/instances_default.json, the images in images/; ids not in file order."""
    ids = [5, 3, 8, 1, 7, 2, 6, 4][:num_images]
    images = [image(i, f"frame_{i:04d}.png") for i in ids]
    anns = [ann(k + 1, i, 1, [k, k, 10, 12]) for k, i in enumerate(ids) if i not in empty]
    categories = [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}]  # bus: no annotations
    path = write_json(root / "annotations" / "instances_default.json", images, anns, categories, root / "images")
    return path, ids


def test_cvat_layout_with_one_json_splits_it_by_seed(tmp_path, caplog):
    path, ids = cvat_set(tmp_path)

    def split(seed: int, keep_empty: bool = True) -> tuple[list[int], list[int]]:
        data = COCODataModule(
            None, None, train_json=str(path), val_fraction=0.25, split_seed=seed, train_empty_images=keep_empty
        )
        data.setup("fit")
        assert data.classes == ["car"]
        assert data.train_set.image_dir == data.val_set.image_dir == tmp_path / "images"
        return data.train_set.image_ids, data.val_set.image_ids

    with caplog.at_level("INFO", logger="datamodules.coco"):
        train, val = split(0)
    assert f"its images are in {tmp_path / 'images'}" in caplog.text
    assert f"data.val_fraction=0.25 (data.split_seed=0): 6 training and 2 validation images of {path}" in caplog.text
    assert len(val) == 2 and len(train) == 6 and not set(train) & set(val) and sorted(train + val) == sorted(ids)
    assert train == [i for i in ids if i in train] and val == [i for i in ids if i in val]  # the json's order
    assert split(0) == (train, val)  # deterministic
    assert any(split(seed)[1] != val for seed in (1, 2, 3))  # another seed, another split
    train_no_empty, val_again = split(0, keep_empty=False)
    assert val_again == val and train_no_empty == [i for i in train if i != 8]  # empty images out of training only
    data = COCODataModule(None, None, train_json=str(path), val_fraction=0.25)
    data.setup("validate")
    img, target = data.val_set[0]
    assert img.shape == (3, 48, 64) and len(target["boxes"]) == (0 if data.val_set.image_ids[0] == 8 else 1)


def test_config_keys_build_a_split_with_classes_from_the_data(tmp_path):
    from hydra.utils import instantiate

    path, ids = cvat_set(tmp_path)
    overrides = (f"data.train_json={path}", "data.val_fraction=0.5", "data.train_empty_images=true")
    data = instantiate(compose("data=coco", *overrides, "data.classes=null").data)
    assert data.classes == ["car"] and data.root is None
    data.setup("fit")
    assert len(data.val_set) == 4 and sorted(data.train_set.image_ids + data.val_set.image_ids) == sorted(ids)


def test_file_name_with_sub_folders_and_explicit_images_folder(tmp_path):
    images = [image(1, "day1/cam0/a.jpg"), image(2, "day2/b.jpg")]
    anns = [ann(1, 1, 7, [1, 2, 10, 20]), ann(2, 2, 3, [5, 5, 5, 5])]
    train = write_json(tmp_path / "labels" / "train.json", images, anns, CATEGORIES, tmp_path / "pictures")
    val = write_json(tmp_path / "labels" / "val.json", images[:1], anns[:1], CATEGORIES, tmp_path / "pictures")
    data = COCODataModule(
        None,
        ["dog", "cat"],
        train_json=str(train),
        train_images=str(tmp_path / "pictures"),
        val_json=str(val),
        val_images=str(tmp_path / "pictures"),
    )
    data.setup("fit")
    _, target = data.train_set[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2.0, 11.0, 22.0]]))
    assert target["labels"].tolist() == [1] and len(data.val_set) == 1
    # left to be found, the images are neither beside the json nor in ../images/: the error names the fix
    data = COCODataModule(None, ["dog", "cat"], train_json=str(train), val_json=str(val))
    with pytest.raises(
        FileNotFoundError,
        match=r"train\.json: its images \(file_name 'day1/cam0/a\.jpg'.*labels.*"
        r"images; give their folder: data\.train_images=<folder>",
    ):
        data.setup("fit")


def test_validation_class_unseen_in_training(tmp_path, caplog):
    """data.classes=null: the categories the training or validation annotations use, in id order; labelme's
    ``_background_`` (id 0) and a category no annotation uses are left out; a validation-only one is a warning."""
    categories = [
        {"id": 0, "name": "_background_"},
        {"id": 1, "name": "apple"},
        {"id": 2, "name": "pear"},
        {"id": 3, "name": "plum"},
    ]
    train = write_json(tmp_path / "train" / "t.json", [image(1)], [ann(1, 1, 1, [0, 0, 5, 5])], categories)
    val = write_json(tmp_path / "val" / "v.json", [image(1)], [ann(1, 1, 2, [0, 0, 5, 5])], categories)
    with caplog.at_level(logging.WARNING):
        data = COCODataModule(None, None, train_json=str(train), val_json=str(val))
    assert data.classes == ["apple", "pear"]
    assert "class(es) ['pear'] have validation objects in" in caplog.text and "v.json" in caplog.text
    data.setup("fit")
    assert data.val_set[0][1]["labels"].tolist() == [1]
    data = COCODataModule(None, ["apple"], train_json=str(train), val_json=str(val))  # explicit: as before
    with pytest.raises(COCOFormatError, match=r"v\.json: category 2 'pear' has annotations but is not in data.classes"):
        data.setup("fit")
    skipping = COCODataModule(None, ["apple"], train_json=str(train), val_json=str(val), unknown_classes="skip")
    with caplog.at_level(logging.WARNING):
        skipping.setup("fit")
    assert skipping.val_set[0][1]["labels"].tolist() == [] and "skipped 1 annotation(s) of categories" in caplog.text
    empty = write_json(tmp_path / "empty" / "e.json", [image(1)], [], categories)
    with pytest.raises(ValueError, match=r"e\.json: data.classes=null .* has no annotations; give them: data.classes="):
        COCODataModule(None, None, train_json=str(empty), val_json=str(val))


def test_layout_errors_name_the_keys_to_set(tmp_path):
    path, _ = cvat_set(tmp_path)
    with pytest.raises(ValueError, match=r"data.root is not set: .*data.train_json=<file>"):
        COCODataModule(None, None)
    with pytest.raises(ValueError, match=r"without validation data: .*data.val_json=<file>.*data.val_fraction=0.2"):
        COCODataModule(None, None, train_json=str(path))
    with pytest.raises(ValueError, match=r"data.val_fraction=0.2 .*data.val_json=.*give one or the other"):
        COCODataModule(None, None, train_json=str(path), val_json=str(path), val_fraction=0.2)
    with pytest.raises(ValueError, match=r"data.val_fraction=1.5: give a fraction between 0 and 1"):
        COCODataModule(None, None, train_json=str(path), val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such annotation file; check data.train_json"):
        COCODataModule(None, None, train_json=str(tmp_path / "nope.json"), val_fraction=0.2)
    with pytest.raises(FileNotFoundError, match=r"data.train_images=.*missing: no such folder"):
        COCODataModule(
            None, ["car"], train_json=str(path), train_images=str(tmp_path / "missing"), val_fraction=0.2
        ).setup("fit")
