"""PASCAL VOC: the real VOC2012 sample in ../shared/data against its own XML files, and fixture folders in
tmp_path for each quirk of real annotation files (float coordinates, missing tags, unknown names, unsafe XML,
odd image modes, EXIF rotation)."""

import io
import json
import logging
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from datamodules.images import ImageReadError, read_image
from datamodules.voc import VOC_CLASSES, VOCDataModule, VOCDataset, VOCFormatError

from ..conftest import ROOT, SHARED_DATA, compose
from ..preloaded import run_python

VOC_SAMPLE = SHARED_DATA / "voc2012-sample" / "VOCdevkit"
needs_sample = pytest.mark.skipif(not VOC_SAMPLE.is_dir(), reason="../shared/data/voc2012-sample is absent")


def reference_objects(xml_path: Path) -> list[tuple[str, list[float], bool]]:
    """(name, [xmin, ymin, xmax, ymax] as written, difficult) read with the standard library."""
    root = ET.parse(xml_path).getroot()
    out = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        d = obj.find("difficult")
        out.append(
            (
                obj.find("name").text,
                [float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")],
                d is not None and d.text is not None and d.text.strip() == "1",
            )
        )
    return out


@needs_sample
def test_real_sample_loads_every_image_with_its_boxes_converted():
    data = VOCDataset(VOC_SAMPLE, 2012, "trainval")
    assert len(data) == 100
    total = difficult = 0
    seen = set()
    for i in range(len(data)):
        image, target = data[i]
        record = data.records[i]
        ref = reference_objects(VOC_SAMPLE / "VOC2012" / "Annotations" / f"{data.ids[i]}.xml")
        assert image.dtype == torch.uint8 and image.shape == (3, record.height, record.width)
        assert [VOC_CLASSES[k] for k in target["labels"]] == [name for name, _, _ in ref]
        expected = torch.tensor([[x0 - 1, y0 - 1, x1, y1] for _, (x0, y0, x1, y1), _ in ref])
        torch.testing.assert_close(target["boxes"], expected)  # 1-based inclusive → 0-based continuous
        assert target["difficult"].tolist() == [d for _, _, d in ref]
        assert int(target["image_id"]) == i
        total += len(ref)
        difficult += sum(d for _, _, d in ref)
        seen |= {name for name, _, _ in ref}
    assert (total, difficult, len(seen)) == (273, 38, 20)  # the sample's README


@needs_sample
def test_training_split_drops_difficult_and_validation_keeps_them_flagged():
    data = VOCDataModule(
        str(VOC_SAMPLE), train_sets=[[2012, "train"]], val_sets=[[2012, "val"], [2012, "val"]], num_workers=0
    )
    data.setup("fit")
    assert len(data.train_set) == 80 and len(data.val_set) == 40
    train_targets = [data.train_set[i][1] for i in range(len(data.train_set))]
    assert not any(t["difficult"].any() for t in train_targets)
    val_ids = [int(data.val_set[i][1]["image_id"]) for i in range(len(data.val_set))]
    assert val_ids == list(range(40))  # unique across the concatenated sets
    kept = sum(len(data.val_set[i][1]["labels"]) for i in range(20))
    ref = sum(
        len(reference_objects(r.image_path.parent.parent / "Annotations" / f"{r.image_path.stem}.xml"))
        for r in data.val_set.datasets[0].records
    )
    assert kept == ref


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
        "model.optimizer.lr=0.001",
        "trainer=cpu",
        "task_name=voc_sample",
        "data=voc",
        f"data.root={VOC_SAMPLE}",
        "data.train_sets=[[2012,train]]",
        "data.val_sets=[[2012,val]]",
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
        f"paths.log_dir={tmp_path}",
    ]
    done = run_python(cmd, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = (tmp_path / "voc_sample").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["val/voc07_map_50"] <= 1 and "val/ap/person" in metrics
    csv_log = (run / "csv" / "metrics.csv").read_text()
    assert "train/loss" in csv_log


def test_data_root_is_required_and_pairs_are_checked(tmp_path):
    cfg = compose("data=voc")
    with pytest.raises(Exception, match="data.root"):
        instantiate(cfg.data)
    (tmp_path / "VOCdevkit" / "VOC2007").mkdir(parents=True)  # a VOCdevkit: its sets are [year, split] pairs
    with pytest.raises(ValueError, match=r"\[year, split\] pairs"):
        VOCDataModule(str(tmp_path / "VOCdevkit"), train_sets=["2007"])
    with pytest.raises(FileNotFoundError, match=r"VOC2099/ImageSets/Main/train.txt: no such split file"):
        VOCDataset("/nonexistent", 2099, "train")


# --- fixture folders for the quirks of real files ---------------------------------------------------------
def write_devkit(
    root: Path,
    annotations: dict[str, str],
    images: dict[str, Image.Image | bytes | None],
    year: int = 2007,
    split: str = "train",
) -> Path:
    base = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for image_id, xml in annotations.items():
        (base / "Annotations" / f"{image_id}.xml").write_text(xml)
    for image_id, image in images.items():
        path = base / "JPEGImages" / f"{image_id}.jpg"
        if isinstance(image, bytes):
            path.write_bytes(image)
        elif image is not None:
            image.save(path, format="PNG" if image.mode in ("P", "RGBA", "I;16") else "JPEG")
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in annotations))
    return root / "VOCdevkit"


def voc_xml(
    objects: str,
    size: str = "<size><width>60</width><height>40</height><depth>3</depth></size>",
    filename: str | None = None,
    prolog: str = "",
) -> str:
    name = f"<filename>{filename}</filename>" if filename else ""
    return f"{prolog}<annotation>{name}{size}{objects}</annotation>"


def obj(name: str, box: str, extra: str = "") -> str:
    x0, y0, x1, y1 = box.split()
    return (
        f"<object>{extra}<name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
    )


def rgb(w=60, h=40):
    return Image.new("RGB", (w, h), (200, 100, 50))


def test_quirks_of_real_files_are_read(tmp_path):
    xmls = {
        # float coordinates, empty <difficult/>, an extra tag and attribute, no <filename>
        "a": voc_xml(
            obj("dog", "10.5 5.5 30.25 20", "<difficult/><truncated>1</truncated><pose>Left</pose>")
            + obj("cat", "1 1 60 40", "<difficult>1</difficult><occluded>0</occluded>")
        ),
        # no <size> at all: read from the image
        "b": voc_xml(obj("person", "2 3 10 12"), size=""),
    }
    root = write_devkit(tmp_path, xmls, {"a": rgb(), "b": rgb(30, 20)})
    data = VOCDataset(root, 2007, "train")
    image, t = data[0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[9.5, 4.5, 30.25, 20.0], [0.0, 0.0, 60.0, 40.0]]))
    assert [VOC_CLASSES[k] for k in t["labels"]] == ["dog", "cat"] and t["difficult"].tolist() == [False, True]
    image, t = data[1]
    assert image.shape == (3, 20, 30) and data.records[1].height == 0
    torch.testing.assert_close(t["boxes"], torch.tensor([[1.0, 2.0, 10.0, 12.0]]))
    dropped = VOCDataset(root, 2007, "train", keep_difficult=False)[0][1]
    assert [VOC_CLASSES[k] for k in dropped["labels"]] == ["dog"]


def test_custom_classes_and_unknown_names(tmp_path):
    root = write_devkit(tmp_path, {"a": voc_xml(obj("dog", "1 1 5 5") + obj("zebra", "2 2 8 8"))}, {"a": rgb()})
    with pytest.raises(
        VOCFormatError,
        match=r"a\.xml: <object> 1 has class 'zebra', not in data.classes.*"
        r"data.unknown_classes=skip",
    ):
        VOCDataset(root, 2007, "train")
    skipped = VOCDataset(root, 2007, "train", unknown_classes="skip")
    assert skipped.skipped_objects == 1 and skipped[0][1]["labels"].tolist() == [VOC_CLASSES.index("dog")]
    custom = VOCDataset(root, 2007, "train", classes=["zebra", "dog"])
    assert custom[0][1]["labels"].tolist() == [1, 0]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (voc_xml(obj("dog", "30 5 10 20")), r"xmin/ymin beyond xmax/ymax"),
        (voc_xml(obj("dog", "nan 5 10 20")), r"xmin/ymin beyond xmax/ymax"),
        (voc_xml(obj("dog", "a 5 10 20")), r"is not numeric"),
        (voc_xml("<object><name>dog</name></object>"), r"lacks <bndbox>"),
        (voc_xml(obj("dog", "1 1 5 5", "<difficult>maybe</difficult>")), r"<difficult>maybe</difficult> is not 0 or 1"),
        ("<annotation><object>", r"not well-formed XML"),
    ],
)
def test_bad_annotations_name_the_file_and_field(tmp_path, xml, message):
    root = write_devkit(tmp_path, {"bad": xml}, {"bad": rgb()})
    with pytest.raises(VOCFormatError, match=rf"bad\.xml: .*{message}"):
        VOCDataset(root, 2007, "train")


def test_entity_expansion_is_refused_quickly(tmp_path):
    entities = '<!ENTITY a0 "lol">' + "".join(f'<!ENTITY a{i} "{f"&a{i - 1};" * 10}">' for i in range(1, 10))
    bomb = voc_xml(obj("&a9;", "1 1 5 5"), prolog=f"<?xml version='1.0'?><!DOCTYPE annotation [{entities}]>")
    root = write_devkit(tmp_path, {"bomb": bomb}, {"bomb": rgb()})
    start = time.perf_counter()
    with pytest.raises(VOCFormatError, match=r"bomb\.xml: refused unsafe XML"):
        VOCDataset(root, 2007, "train")
    assert time.perf_counter() - start < 2


def test_boxes_are_clipped_and_degenerate_ones_dropped_with_a_warning(tmp_path, caplog):
    xml = voc_xml(obj("dog", "-5 -3 70 50") + obj("cat", "61 10 80 20"))  # the cat lies right of the 60 px image
    root = write_devkit(tmp_path, {"a": xml}, {"a": rgb()})
    with caplog.at_level(logging.WARNING):
        _, t = VOCDataset(root, 2007, "train")[0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0.0, 60.0, 40.0]]))
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog")] and len(t["difficult"]) == 1
    assert "a.jpg: dropped 1 box(es) of zero width or height" in caplog.text


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_any_image_mode_decodes_to_uint8_rgb(tmp_path, mode):
    import numpy as np

    if mode == "I;16":
        image = Image.fromarray(np.full((40, 60), 51400, dtype=np.uint16))  # 51400 / 257 = 200 in 8 bits
    else:
        image = rgb().convert(mode)
    path = tmp_path / "x.img"
    image.save(path, format="JPEG" if mode in ("L", "CMYK") else "PNG")
    out = read_image(path)
    assert out.dtype == torch.uint8 and out.shape == (3, 40, 60)
    if mode == "I;16":
        assert (out.int() - 200).abs().max() <= 1
    else:  # PIL's own conversion of the file to RGB as the reference
        reference = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert (out.int() - reference.int()).abs().max() <= 3


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 40), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # white top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "r.jpg"
    image.save(path, exif=exif.tobytes())
    out = read_image(path)
    assert out.shape == (3, 60, 40) and out[:, 2, 37].min() > 200  # the corner is now top-right


def test_missing_empty_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.jpg: cannot read"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.jpg: the image file is empty"):
        read_image(tmp_path / "empty.jpg")
    buf = io.BytesIO()
    rgb().save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(b"not an image" + buf.getvalue()[:50])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: cannot decode"):
        read_image(tmp_path / "cut.jpg")


def test_unreadable_images_are_skipped_named_and_counted_or_stop_the_run(tmp_path, caplog):
    """Found from the files' first bytes when a loader is made (b: empty, d: no image), or when a decode fails
    (c: a JPEG's signature, then noise): each replaced by the next readable image, named in the log and in
    ``bad_files``; more than ``max_bad_fraction`` of a set, or ``bad_images=error``, stops the run naming them."""
    xmls = {i: voc_xml(obj("dog", "1 1 20 20")) for i in "abcdefgh"}
    no_image, damaged = b"<html>not found</html>", b"\xff\xd8\xff" + bytes(range(256)) * 2
    images = {i: rgb() for i in "aefgh"} | {"b": b"", "c": damaged, "d": no_image}
    root = write_devkit(tmp_path, xmls, images)

    def data(**kw):
        module = VOCDataModule(
            str(root), train_sets=[[2007, "train"]], val_sets=[[2007, "train"]], num_workers=0, batch_size=8, **kw
        )
        module.setup("fit")
        return module

    skipping = data(max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(skipping.val_dataloader()))
    # b and d known at the start (no read tried), c when its decode failed: each replaced by the next readable
    assert batch.image_ids.tolist() == [0, 4, 4, 4, 4, 5, 6, 7]
    assert "2 of the 8 evaluation image files cannot be read and are skipped" in caplog.text
    assert "b.jpg: empty (0 bytes)" in caplog.text and "d.jpg: not an image (it starts b'<html>no')" in caplog.text
    assert "c.jpg: cannot decode the image" in caplog.text and "1 image(s) skipped so far" in caplog.text
    assert set(skipping.bad_files) == {str(root / "VOC2007" / "JPEGImages" / f"{i}.jpg") for i in "bd"}
    with pytest.raises(ImageReadError, match=r"3 of 8 images cannot be read, more than data.max_bad_fraction"):
        next(iter(data(max_bad_fraction=0.25).val_dataloader()))  # 2 known: within 0.25; c makes 3
    with pytest.raises(ImageReadError, match=r"2 of the 8 training .*more than data.max_bad_fraction=0.01: .*b\.jpg"):
        data().train_dataloader()  # the default: 1 %
    with pytest.raises(ImageReadError, match=r"2 training image file\(s\) cannot be read \(data.bad_images=error\)"):
        data(bad_images="error").train_dataloader()
    with pytest.raises(ValueError, match="data.bad_images='maybe'"):
        VOCDataModule(str(root), bad_images="maybe")


# --- one exported folder: a BCCD-like folder with split lists, a labelImg folder without -------------------------
def write_folder(
    root: Path,
    count: int,
    annotations: str,
    images: str,
    lists: dict[str, list[int]] | None = None,
    filename=lambda i: f"img{i}.jpg",
    image_name=lambda i: f"img{i}.jpg",
    seed: int = 0,
) -> Path:
    """``count`` shapes images with their VOC XML, as a tool exports them: ``annotations/`` and ``images/``
    folders named as given, split lists only if ``lists``; ``filename(i)`` is what the XML's <filename> says,
    ``image_name(i)`` the file actually written."""
    from datamodules.shapes import SHAPE_CLASSES, render_shapes_image

    (root / annotations).mkdir(parents=True)
    (root / images).mkdir(parents=True)
    for i in range(count):
        image, boxes, labels = render_shapes_image(seed + i, 64, SHAPE_CLASSES[:3], 1, 3, 12, 0.6)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / images / image_name(i))
        objects = "".join(
            obj(SHAPE_CLASSES[k], f"{x0 + 1:.0f} {y0 + 1:.0f} {x1:.0f} {y1:.0f}")
            for (x0, y0, x1, y1), k in zip(boxes.tolist(), labels.tolist())
        )
        (root / annotations / f"img{i}.xml").write_text(voc_xml(objects, filename=filename(i)))
    for split, members in (lists or {}).items():
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"img{i}\n" for i in members))
    return root


def test_one_folder_with_split_lists_reads_its_classes_and_named_splits(tmp_path):
    root = write_folder(
        tmp_path / "BCCD", 8, "Annotations", "JPEGImages", {"train": [0, 1, 2, 3, 4], "val": [5, 6], "test": [7]}
    )
    data = VOCDataModule(str(root), train_sets=["train"], val_sets=["test"], classes=None, num_workers=0)
    names = set()
    for i in range(5):
        names |= {o.find("name").text for o in ET.parse(root / "Annotations" / f"img{i}.xml").getroot().iter("object")}
    assert data.classes == sorted(names)  # from the training annotations, sorted
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (5, 1)
    image, target = data.train_set[2]
    ref = reference_objects(root / "Annotations" / "img2.xml")
    assert [data.classes[k] for k in target["labels"]] == [name for name, _, _ in ref]
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[x0 - 1, y0 - 1, x1, y1] for _, (x0, y0, x1, y1), _ in ref])
    )
    # the devkit's default [year, split] pairs mean nothing here: its train and val lists are taken
    default = VOCDataModule(str(root), classes=None, num_workers=0)
    default.setup("fit")
    assert (len(default.train_set), len(default.val_set)) == (5, 2)


def test_a_labelimg_folder_is_split_by_val_fraction_and_finds_images_by_stem(tmp_path):
    # <filename> stale (as after renaming files) for every image, and the files themselves PNG
    root = write_folder(
        tmp_path / "export",
        20,
        "annotations",
        "images",
        filename=lambda i: f"IMG_{i}.jpeg",
        image_name=lambda i: f"img{i}.png",
    )
    kw = dict(classes=None, annotations_dir="annotations", images_dir="images", num_workers=0)
    data = VOCDataModule(str(root), val_fraction=0.3, **kw)
    (train,), (val,) = data.train_sets, data.val_sets
    assert (len(train.ids), len(val.ids)) == (14, 6) and not set(train.ids) & set(val.ids)
    assert sorted(train.ids + val.ids) == sorted(f"img{i}" for i in range(20))
    assert VOCDataModule(str(root), val_fraction=0.3, **kw).val_sets == data.val_sets  # deterministic
    assert VOCDataModule(str(root), val_fraction=0.3, split_seed=1, **kw).val_sets != data.val_sets
    data.setup("fit")
    image, _ = data.val_set[0]
    assert data.val_set.records[0].image_path.name == f"{val.ids[0]}.png" and image.shape == (3, 64, 64)


def test_one_folder_errors_name_the_way_out(tmp_path):
    root = write_folder(tmp_path / "export", 4, "annotations", "images")
    with pytest.raises(
        FileNotFoundError,
        match=r"neither VOC<year>/ folders .* nor Annotations/.*'annotations', "
        r"'images'.*data.annotations_dir",
    ):
        VOCDataModule(str(root))
    kw = dict(annotations_dir="annotations", images_dir="images")
    with pytest.raises(ValueError, match=r"one VOC-style folder .*it has none.*data.val_fraction=0.2"):
        VOCDataModule(str(root), **kw)
    with pytest.raises(ValueError, match=r"data.val_fraction=0.5 splits every annotation.*\['train', 'val'\]"):
        VOCDataModule(str(root), train_sets=["train"], val_sets=["val"], val_fraction=0.5, **kw)
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/train.txt: no such split list.*val_fraction"):
        VOCDataModule(str(root), train_sets=["train"], val_sets=["val"], **kw).setup("fit")


def test_a_validation_class_the_training_data_lacks_stays_a_class_with_a_warning(tmp_path, caplog):
    """data.classes=null: the names of the training and the validation XMLs, sorted; one that only validation has
    is a warning naming it (a rare class missing from one split is ordinary), scored as any class."""
    root = write_devkit(tmp_path, {"a": voc_xml(obj("dog", "1 1 5 5"))}, {"a": rgb()})
    write_devkit(tmp_path, {"b": voc_xml(obj("dog", "1 1 5 5") + obj("zebra", "2 2 8 8"))}, {"b": rgb()}, split="val")
    with caplog.at_level(logging.WARNING):
        data = VOCDataModule(str(root), train_sets=[[2007, "train"]], val_sets=[[2007, "val"]], classes=None)
    assert data.classes == ["dog", "zebra"]
    assert "class(es) ['zebra'] have validation objects" in caplog.text and "no training object" in caplog.text
    data.setup("fit")
    assert data.val_set[0][1]["labels"].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"is a VOCdevkit.*val_fraction splits one exported folder"):
        VOCDataModule(str(root), val_fraction=0.2)


BCCD = SHARED_DATA / "bccd" / "BCCD"


@pytest.mark.skipif(not BCCD.is_dir(), reason="../shared/data/bccd is absent")
def test_the_real_bccd_folder_trains_as_exported():
    data = VOCDataModule(str(BCCD), train_sets=["train"], val_sets=["test"], classes=None, num_workers=0)
    assert data.classes == ["Platelets", "RBC", "WBC"]
    data.setup("fit")
    listed = [len((BCCD / "ImageSets" / "Main" / f"{s}.txt").read_text().split()) for s in ("train", "test")]
    assert [len(data.train_set), len(data.val_set)] == listed
    image, target = data.val_set[0]
    assert image.shape[0] == 3 and len(target["labels"]) > 0


@pytest.mark.slow
def test_train_and_eval_take_the_classes_from_an_exported_folder(tmp_path):
    """A labelImg export trained as it is (no split lists, no class list) with a CPU recipe, then evaluated with the
    checkpoint's classes: the checkpoint holds the classes the annotations name."""
    root = write_folder(tmp_path / "export", 12, "annotations", "images")
    data = [
        "data=voc",
        f"data.root={root}",
        "data.classes=null",
        "data.annotations_dir=annotations",
        "data.images_dir=images",
        "data.val_fraction=0.25",
        "data.num_workers=0",
        "data.pin_memory=false",
    ]
    train = [
        ROOT / "train.py",
        "experiment=ssd_cpu",  # the CPU recipe on photos: SSD's augmentation at 256 px
        *data,
        "task_name=labelimg",
        "model.backbone.width=0.125",
        "data.batch_size=4",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "memory_check=false",
        "logger=csv",
        f"paths.log_dir={tmp_path}",
    ]
    done = run_python(train, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = set()
    for xml in (root / "annotations").glob("*.xml"):
        names |= {o.find("name").text for o in ET.parse(xml).getroot().iter("object")}
    (run,) = (tmp_path / "labelimg").iterdir()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["class_names"] == sorted(names) == checkpoint["data_config"]["classes"]
    assert {f"val/ap/{n}" for n in names} <= set(json.loads((run / "metrics.json").read_text()))
    done = run_python(
        [
            ROOT / "eval.py",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            *data,
            "trainer=cpu",
            f"paths.log_dir={tmp_path}",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 3 images" in done.stdout  # the same val_fraction split: 3 of 12
