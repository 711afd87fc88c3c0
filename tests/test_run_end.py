"""Every run ends validated and saved, on data sets of any size (issue 32): a set smaller than a batch trains with
the batch shrunk to it, a run that would train zero steps stops with a non-zero exit naming why, and a run that
ends between two of its recipe's validations (a smoke test of a few steps) still validates its last weights and
writes metrics.json and last.ckpt."""

import json
from pathlib import Path

import pytest
import torch

from .conftest import ROOT
from .datamodules.test_coco import ann, image, write_json
from .datamodules.test_voc import write_folder
from .preloaded import run_python

# each paper's CPU recipe, cut to toy sizes: a few steps of a narrow network on 64-px shapes photos
SMOKE = (
    "callbacks.time_budget.minutes=null",
    "memory_check=false",
    "model.channels_last=false",
    "data.num_workers=0",
    "data.pin_memory=false",
    "logger=csv",
    "callbacks.prediction_images=null",
    "callbacks.pr_curves=null",
    "data.classes=null",
)
NARROW = {
    "ssd_cpu": ("model.backbone.width=0.125", "data.train_transform.size=64"),
    "retinanet_cpu": (
        "data.train_transform.min_sizes=[64]",
        "data.train_transform.max_size=64",
        "data.val_transform.min_size=64",
        "data.val_transform.max_size=64",
    ),
}


def train(tmp_path: Path, recipe: str, *overrides: str):
    done = run_python(
        [ROOT / "train.py", f"experiment={recipe}", *SMOKE, *NARROW[recipe], f"paths.log_dir={tmp_path}", *overrides],
        tmp_path,
    )
    return done, done.stdout + done.stderr


def run_folder(tmp_path: Path, recipe: str) -> Path:
    (run,) = (tmp_path / recipe).iterdir()
    return run


def three_image_voc(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "export", 5, "Annotations", "JPEGImages", {"train": [0, 1, 2], "val": [3, 4]})


def test_three_images_train_with_the_batch_shrunk_and_the_run_ends_validated_and_saved(tmp_path):
    root = three_image_voc(tmp_path)
    data = (f"data.root={root}", "data=voc", "data.train_sets=[train]", "data.val_sets=[val]")
    done, out = train(tmp_path, "ssd_cpu", *data, "trainer.max_steps=2")
    assert done.returncode == 0, out[-3000:]
    assert "data.batch_size=8 is more than the 3 training image(s): training with batches of 3" in out
    run = run_folder(tmp_path, "ssd_cpu")
    # the recipe validates every 256 steps; its 2 steps end between two validations: validated all the same
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["val/map_50"] <= 1
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 and (run / "checkpoints" / "best.ckpt").is_file()


def test_three_images_of_a_coco_json_train_and_validate(tmp_path):
    categories = [{"id": 0, "name": "_background_"}, {"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}]
    anns = [ann(i, i, 1 + i % 2, [4, 4, 30, 20]) for i in range(1, 4)]
    train_json = write_json(tmp_path / "train" / "t.json", [image(i) for i in range(1, 4)], anns, categories)
    val_json = write_json(tmp_path / "val" / "v.json", [image(1)], [ann(1, 1, 2, [4, 4, 30, 20])], categories)
    data = ("data=coco", "data.root=null", f"data.train_json={train_json}", f"data.val_json={val_json}")
    done, out = train(tmp_path, "retinanet_cpu", *data, "trainer.max_epochs=1", "+trainer.limit_train_batches=1")
    assert done.returncode == 0, out[-3000:]
    assert "training with batches of 3" in out
    run = run_folder(tmp_path, "retinanet_cpu")
    assert "val/map" in json.loads((run / "metrics.json").read_text())
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 1


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (("+trainer.limit_train_batches=0",), "trainer.limit_train_batches=0 leaves none of the epoch's 1 batches"),
        (
            ("data.train_sets=[empty]", "data.classes=[ellipse,rectangle,triangle]"),
            "the training data holds 0 image(s) for 1 process(es): nothing to train on",
        ),
    ],
)
def test_a_run_that_would_train_zero_steps_stops_with_an_error_naming_why(tmp_path, overrides, why):
    root = three_image_voc(tmp_path)
    (root / "ImageSets" / "Main" / "empty.txt").write_text("")
    data = (f"data.root={root}", "data=voc", "data.train_sets=[train]", "data.val_sets=[val]")
    done, out = train(tmp_path, "ssd_cpu", *data, *overrides)
    assert done.returncode != 0 and why in out, out[-3000:]


def test_a_run_without_validation_still_saves_its_last_step(tmp_path):
    root = three_image_voc(tmp_path)
    data = (f"data.root={root}", "data=voc", "data.train_sets=[train]", "data.val_sets=[val]")
    done, out = train(tmp_path, "ssd_cpu", *data, "trainer.max_steps=2", "+trainer.limit_val_batches=0")
    assert done.returncode == 0, out[-3000:]
    run = run_folder(tmp_path, "ssd_cpu")
    assert "saved" in out and "at the final step 2" in out
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2


def test_one_bad_file_never_loses_a_run(tmp_path):
    """A truncated JPEG is read as far as it goes; a missing and an empty file are skipped, named, counted and listed
    in the run folder; the run trains, validates and saves."""
    splits = {"train": [0, 1, 2, 3, 4, 5], "val": [6, 7]}
    root = write_folder(tmp_path / "export", 8, "Annotations", "JPEGImages", splits)
    images = root / "JPEGImages"
    raw = (images / "img0.jpg").read_bytes()
    (images / "img0.jpg").write_bytes(raw[: len(raw) // 2])  # truncated: a copy that stopped part way
    (images / "img1.jpg").unlink()
    (images / "img2.jpg").write_bytes(b"")
    data = (f"data.root={root}", "data=voc", "data.train_sets=[train]", "data.val_sets=[val]")
    done, out = train(tmp_path, "ssd_cpu", *data, "trainer.max_steps=2", "data.max_bad_fraction=0.5")
    assert done.returncode == 0, out[-3000:]
    assert "img0.jpg: the file is truncated" in out and "read as far as it goes" in out
    run = run_folder(tmp_path, "ssd_cpu")
    listed = (run / "bad_images.txt").read_text().splitlines()
    assert listed == [f"{images / 'img1.jpg'}: no such file", f"{images / 'img2.jpg'}: empty (0 bytes)"]
    assert "2 unreadable image file(s) were skipped" in out and (run / "metrics.json").is_file()
    # the default share, 1 %: two of six stop the run before its first step, naming them
    (tmp_path / "strict").mkdir()
    done, out = train(tmp_path / "strict", "ssd_cpu", *data, "trainer.max_steps=2")
    assert done.returncode != 0 and "more than data.max_bad_fraction=0.01" in out and "img1.jpg: no such file" in out
