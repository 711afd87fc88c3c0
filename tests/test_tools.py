"""eval.py, predict.py, export.py and engine/checkpoint_loading.py on one tiny checkpoint trained here by train.py."""

import copy
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from datamodules.images import read_image
from datamodules.shapes import SHAPE_CLASSES, render_shapes_image
from detectors.batch import collate_detection
from engine.checkpoint_loading import (
    MOVED_TARGETS,
    CheckpointError,
    ClassMismatchError,
    build_model,
    finetune_from,
    load_checkpoint,
)
from engine.detection_module import DetectionModule

from .conftest import ROOT, TINY, compose
from .preloaded import run_python

pytestmark = pytest.mark.slow  # a module fixture trains the run whose checkpoint every test reads

TINY_DATA = [o for o in TINY if o.startswith("data.")]
LOW_THRESHOLD = "model.postprocess.score_thresh=0.001"  # a one-epoch model: many low-score boxes to compare


def compose_tool(name: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


def run_tool(script: str, cwd: Path, *args: str) -> str:
    done = run_python([ROOT / script, *args], cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One train.py run of the tiny RetinaNet (1 epoch, 8 steps); its threshold 0.01 leaves detections to score."""
    logs = tmp_path_factory.mktemp("train")
    run_tool(
        "train.py",
        logs,
        *TINY,
        f"paths.log_dir={logs}",
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks.prediction_images=null",
        "callbacks.pr_curves=null",
        "model.scheduler.warmup_steps=2",
        "model.postprocess.score_thresh=0.01",
    )
    (folder,) = (logs / "retinanet_shapes").iterdir()
    return folder


@pytest.fixture(scope="module")
def best(run) -> Path:
    return run / "checkpoints" / "best.ckpt"


def tiny_images(folder: Path) -> list[Path]:
    """Two 64×64 PNGs and two 80×96 JPEGs (h×w): batches of equal sizes at batch_size=2, sorted by name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (size, suffix) in enumerate([(64, "png"), (64, "png"), (96, "jpg"), (96, "jpg")]):
        image, _, _ = render_shapes_image(500 + i, size, SHAPE_CLASSES, 2, 5, 10, 0.8)
        image = image[:, :80] if suffix == "jpg" else image
        paths.append(folder / f"img{i}.{suffix}")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def xywh_to_xyxy(boxes: list[list[float]]) -> torch.Tensor:
    b = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat((b[:, :2], b[:, :2] + b[:, 2:]), 1)


# --- eval.py --------------------------------------------------------------------------------------------------
def test_eval_reproduces_train_metrics_and_its_coco_files_reevaluate(run, best, tmp_path):
    out = run_tool(
        "eval.py", tmp_path, f"ckpt_path={best}", f"paths.log_dir={tmp_path}", "data=shapes", *TINY_DATA, "trainer=cpu"
    )
    (folder,) = (tmp_path / "eval").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics == json.loads((run / "metrics.json").read_text())  # same data, same numbers, same keys
    assert "AP @[.5:.95]" in out and "mAP, VOC07 11-point" in out and "ellipse" in out
    assert (folder / "pr_curve.png").stat().st_size > 5_000

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = json.loads((folder / "coco_results.json").read_text())
    assert len(results) > 10
    truth = COCO(str(folder / "coco_ground_truth.json"))
    evaluator = COCOeval(truth, truth.loadRes(str(folder / "coco_results.json")), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    for stat, key in ((0, "map"), (1, "map_50"), (8, "mar_100")):  # metrics.json holds float32s, as logged
        assert evaluator.stats[stat] == pytest.approx(metrics[f"val/{key}"], rel=1e-6, abs=1e-7)


def test_eval_data_defaults_to_the_training_run_and_transform_overrides(best):
    from eval import eval_data_config

    checkpoint = load_checkpoint(best)
    trained = eval_data_config(None, checkpoint, str(best))  # no data group: the run's own data
    assert trained["image_size"] == 64 and trained["num_val"] == 16 and trained["val_transform"] is None
    assert trained["train_transform"] is None and trained["size_divisible"] == 1
    cfg = compose_tool("eval", f"ckpt_path={best}", "data/transform=ssd", "+data.val_batch_size=4")
    resized = eval_data_config(cfg.data, checkpoint, str(best))
    assert resized["val_transform"] == {"_target_": "datamodules.transforms.ResizeTo", "size": 300}
    assert resized["val_batch_size"] == 4 and resized["image_size"] == 64


def test_eval_refuses_other_classes_naming_both_lists(best, tmp_path):
    from eval import evaluate

    cfg = compose_tool(
        "eval",
        f"ckpt_path={best}",
        "data=shapes",
        "data.classes=[ellipse,rectangle,triangle]",
        f"paths.output_dir={tmp_path}",
    )
    with pytest.raises(ClassMismatchError) as e:
        evaluate(cfg)
    message = str(e.value)
    assert str(list(SHAPE_CLASSES)) in message and "['ellipse', 'rectangle', 'triangle']" in message
    assert "model.finetune_from=" in message


def test_eval_takes_the_checkpoints_classes_and_leaves_a_sets_other_class_out_with_a_count(best, tmp_path):
    """data.classes=null on a checkpoint: its classes, in its order; objects of a class it never learned (here a
    VOC folder's "zebra") cannot be scored, so they are left out of the evaluation and counted in the log."""
    from .datamodules.test_voc import obj, write_folder

    root = write_folder(tmp_path / "export", 4, "Annotations", "JPEGImages", {"val": [0, 1, 2, 3]})
    xml = root / "Annotations" / "img0.xml"
    xml.write_text(xml.read_text().replace("</annotation>", obj("zebra", "2 2 20 20") + "</annotation>"))
    out = run_tool(
        "eval.py",
        tmp_path,
        f"ckpt_path={best}",
        f"paths.log_dir={tmp_path}",
        "data=voc",
        f"data.root={root}",
        "data.train_sets=[val]",
        "data.val_sets=[val]",
        "data.classes=null",
        "trainer=cpu",
    )
    assert f"data.classes=null: the checkpoint's 5 classes {list(SHAPE_CLASSES)}" in out
    assert "skipped 1 object(s) of classes not in data.classes (data.unknown_classes=skip)" in out
    (folder,) = (tmp_path / "eval").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert "val/ap/zebra" not in metrics and all(f"val/ap/{name}" in metrics for name in SHAPE_CLASSES)


# --- predict.py -----------------------------------------------------------------------------------------------
def test_predict_draws_each_image_at_its_size_and_writes_model_detections(best, tmp_path):
    inputs = tiny_images(tmp_path / "in")
    out = tmp_path / "out"
    run_tool(
        "predict.py",
        tmp_path,
        f"ckpt_path={best}",
        f"input={tmp_path / 'in'}",
        f"output={out}",
        f"paths.log_dir={tmp_path}",
        "score_thresh=0",
        "batch_size=2",
        "num_workers=0",
        LOW_THRESHOLD,
    )
    for path in inputs:
        picture = out / path.name
        with Image.open(path) as original, Image.open(picture) as drawn:
            assert drawn.format == original.format and drawn.size == original.size
            changed = np.abs(np.asarray(drawn, dtype=int) - np.asarray(original, dtype=int)).max(axis=2) > 40
            assert changed.mean() > 0.02  # box outlines and captions, far beyond JPEG re-encoding
    entries = json.loads((out / "detections.json").read_text())

    model = build_model(load_checkpoint(best), best, {"postprocess": {"score_thresh": 0.001}}).net
    images = [read_image(p) for p in inputs]
    expected = []
    for pair in (images[:2], images[2:]):  # predict.py's batches
        expected += model.detect(
            collate_detection(
                [
                    (
                        img,
                        {
                            "boxes": torch.zeros(0, 4),
                            "labels": torch.zeros(0, dtype=torch.long),
                            "image_id": torch.tensor(0),
                        },
                    )
                    for img in pair
                ]
            )
        )
    for index, (path, det) in enumerate(zip(inputs, expected)):
        mine = [e for e in entries if e["image_id"] == index]
        assert len(mine) == len(det["scores"]) > 0 and {e["file_name"] for e in mine} == {str(path)}
        torch.testing.assert_close(xywh_to_xyxy([e["bbox"] for e in mine]), det["boxes"].double(), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor([e["score"] for e in mine]), det["scores"], atol=1e-5, rtol=0)
        assert [e["category_id"] - 1 for e in mine] == det["labels"].tolist()
        assert [e["category_name"] for e in mine] == [SHAPE_CLASSES[k] for k in det["labels"].tolist()]


def test_predict_input_errors_name_the_input(tmp_path):
    from predict import find_images

    with pytest.raises(FileNotFoundError, match="input=nowhere/x.jpg: no such file or folder"):
        find_images("nowhere/x.jpg")
    with pytest.raises(FileNotFoundError, match="matches no image files"):
        find_images(str(tmp_path / "*.png"))


# --- export.py ------------------------------------------------------------------------------------------------
def assert_export_matches(path: Path, best: Path, tolerance: float) -> None:
    """The exported file's raw outputs and detections equal the PyTorch module's on the same validation images."""
    from export import ExportedDetector

    exported = ExportedDetector(path, postprocess={"score_thresh": 0.001})
    assert exported.class_names == list(SHAPE_CLASSES) and exported.input_size == (64, 64)
    model = build_model(load_checkpoint(best), best, {"postprocess": {"score_thresh": 0.001}}).net
    data = instantiate(compose(*TINY).data)
    images = [data.val_set[i][0] for i in range(3)]
    batch = exported.batch(images)
    outputs, priors = exported.run(batch.images)
    with torch.no_grad():
        expected, expected_priors = model(batch.images)
    for name, value in expected.items():
        torch.testing.assert_close(outputs[name], value, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(priors.boxes, expected_priors.boxes)
    for mine, theirs in zip(exported.detect(images), model.detect(batch), strict=True):
        assert len(mine["scores"]) == len(theirs["scores"]) > 0
        assert torch.equal(mine["labels"], theirs["labels"])
        torch.testing.assert_close(mine["scores"], theirs["scores"], atol=tolerance, rtol=0)
        torch.testing.assert_close(mine["boxes"], theirs["boxes"], atol=10 * tolerance, rtol=0)


# ONNX Runtime's kernels round float32 differently; TorchScript runs PyTorch's own
@pytest.mark.parametrize(("fmt", "suffix", "tolerance"), [("onnx", "onnx", 1e-4), ("torchscript", "pt", 1e-6)])
def test_export_round_trip(best, tmp_path, capsys, fmt, suffix, tolerance):
    from export import export

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    path = tmp_path / f"tiny.{suffix}"
    # in-process (what `python export.py` runs, without another interpreter start), its own check included
    export(compose_tool("export", f"ckpt_path={best}", f"format={fmt}", f"output={path}"))
    assert "outputs box_deltas, class_scores, priors" in capsys.readouterr().out
    assert_export_matches(path, best, tolerance)


# --- checkpoints ----------------------------------------------------------------------------------------------
def test_checkpoint_loads_weights_only_and_gpu_saved_on_cpu(best, tmp_path, monkeypatch):
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)  # train.py's format needs no pickle
    assert checkpoint["class_names"] == list(SHAPE_CLASSES) and checkpoint["model_config"]["_target_"]
    # a file as a GPU run writes it: every storage tagged cuda:0
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint, tmp_path / "gpu.ckpt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.ckpt", weights_only=True)
    loaded = load_checkpoint(tmp_path / "gpu.ckpt")
    assert all(v.device.type == "cpu" for v in loaded["state_dict"].values())
    model = build_model(loaded, tmp_path / "gpu.ckpt")
    assert torch.equal(model.net.head.cls_score.weight, checkpoint["state_dict"]["net.head.cls_score.weight"])

    checkpoint["note"] = Fraction(1, 3)  # an object weights_only loading refuses
    torch.save(checkpoint, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match=r"fractions.Fraction.*trust_checkpoint=true"):
        load_checkpoint(tmp_path / "pickled.ckpt")
    assert load_checkpoint(tmp_path / "pickled.ckpt", trusted=True)["note"] == Fraction(1, 3)
    with pytest.raises(CheckpointError, match=r"model.postprocess.score_treshold"):
        build_model(loaded, best, {"postprocess": {"score_treshold": 0.1}})


def old_layout_checkpoint(best: Path, path: Path) -> Path:
    """``best`` as checkpoints were written before the parts moved into their papers' modules and the network
    into its own module: the old ``_target_``s in the model config, the state dict without the ``net.`` prefix."""
    checkpoint = load_checkpoint(best)
    old = {new: old for old, new in MOVED_TARGETS.items()}
    renamed = copy.deepcopy(checkpoint)
    renamed["model_config"]["_target_"] = old[renamed["model_config"]["_target_"]]
    for part in ("assigner", "loss", "postprocess"):
        target = renamed["model_config"][part]["_target_"]
        renamed["model_config"][part]["_target_"] = old[target]  # as an old checkpoint holds it
    renamed["state_dict"] = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()}
    torch.save(renamed, path)
    return path


def test_a_checkpoint_of_the_old_layout_still_builds_and_resumes(best, tmp_path):
    """An old checkpoint builds the same model for the tools, which gives the same detections, and Lightning
    restores it into the module (``on_load_checkpoint`` renames the keys before the state dict is loaded)."""
    checkpoint = load_checkpoint(best)
    old_ckpt = old_layout_checkpoint(best, tmp_path / "old.ckpt")
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": torch.tensor(0)}
    batch = collate_detection(
        [(render_shapes_image(seed, 64, SHAPE_CLASSES, 2, 5, 10, 0.8)[0], empty) for seed in (1, 2)]
    )
    new_model, old_model = (build_model(c, best).net.eval() for c in (checkpoint, load_checkpoint(old_ckpt)))
    assert type(old_model.postprocess) is type(new_model.postprocess)
    for mine, theirs in zip(old_model.detect(batch), new_model.detect(batch), strict=True):
        assert all(torch.equal(mine[k], theirs[k]) for k in ("boxes", "scores", "labels"))

    module = instantiate(compose(*TINY).model)
    trainer = instantiate(
        compose(*TINY).trainer,
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        default_root_dir=str(tmp_path),
    )
    trainer.validate(
        module, datamodule=instantiate(compose(*TINY).data), ckpt_path=old_ckpt, verbose=False, weights_only=True
    )
    assert torch.equal(module.net.head.cls_score.weight, checkpoint["state_dict"]["net.head.cls_score.weight"])


@pytest.mark.parametrize("classes", [["ellipse", "rectangle", "triangle"], list(reversed(SHAPE_CLASSES))])
def test_finetune_loads_all_but_the_class_dependent_layers(best, classes):
    cfg = compose(*TINY, f"data.classes=[{','.join(classes)}]")
    model = DetectionModule.from_config(OmegaConf.to_container(cfg.model, resolve=True))  # as train.py builds it
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = finetune_from(model, best)
    assert report["reinitialised"] == ["net.head.cls_score.bias", "net.head.cls_score.weight"]  # 5 names reordered too
    trained = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh[key] if key in report["reinitialised"] else trained[key]), key

    same = DetectionModule.from_config(OmegaConf.to_container(compose(*TINY).model, resolve=True))
    assert finetune_from(same, best)["reinitialised"] == []


def torchvision_finetune_module(classes: str = "[a,b,c]") -> DetectionModule:
    cfg = compose("model=retinanet_torchvision", f"data.classes={classes}", "model.backbone.weights=null")
    return DetectionModule.from_config(OmegaConf.to_container(cfg.model, resolve=True))


@pytest.mark.slow
def test_finetune_from_torchvision_weights_loads_all_but_the_class_layers(tmp_path):
    """model.finetune_from=<torchvision's weights file> (what `torchvision` downloads): every weight of
    torchvision's RetinaNet mapped onto ours, the classifier left for these classes."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from detectors.retinanet import torchvision_retinanet_state_dict
    from engine.detection_module import with_net_prefix

    torch.manual_seed(0)
    theirs = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(theirs.state_dict(), tmp_path / "retinanet_resnet50_fpn_coco.pth")
    module = torchvision_finetune_module()
    fresh = {k: v.clone() for k, v in module.state_dict().items()}
    report = finetune_from(module, tmp_path / "retinanet_resnet50_fpn_coco.pth")
    assert report["reinitialised"] == ["net.head.cls_score.bias", "net.head.cls_score.weight"]  # 91 slots → 3
    mapped = with_net_prefix(torchvision_retinanet_state_dict(theirs.state_dict()))
    for key, value in module.state_dict().items():
        assert torch.equal(value, fresh[key] if key in report["reinitialised"] else mapped[key]), key


def test_finetune_from_torchvision_offline_says_where_its_file_goes(monkeypatch, tmp_path):
    import urllib.error

    import torchvision.models._api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    module = torchvision_finetune_module()
    with pytest.raises(
        CheckpointError,
        match=r"could not fetch .*retinanet_resnet50_fpn_coco.*put it at .*hub/"
        r"checkpoints/retinanet_resnet50_fpn_coco.*model.finetune_from=<",
    ):
        finetune_from(module, "torchvision")
    yolo = DetectionModule.from_config(OmegaConf.to_container(compose(*TINY_YOLO).model, resolve=True))
    with pytest.raises(CheckpointError, match=r"torchvision has COCO weights for RetinaNet .* not for a YOLOv1Head"):
        finetune_from(yolo, "torchvision")


TINY_YOLO = ("experiment=yolo_shapes", "data.image_size=64", "model.head.hidden=32")


def test_checkpoint_configs_may_only_target_this_project_and_torch():
    from engine.checkpoint_loading import CheckpointError, check_targets

    safe = {
        "_target_": "engine.detection_module.DetectionModule",
        "backbone": {"_target_": "torchvision.ops.FeaturePyramidNetwork"},
        "steps": [{"_target_": "datamodules.transforms.ResizeTo", "size": 64}],
    }
    check_targets(safe, "x.ckpt")
    crafted = {**safe, "steps": [{"_target_": "os.system", "_args_": ["echo pwned"]}]}
    with pytest.raises(CheckpointError, match=r"model_config\.steps\.0\._target_ is 'os.system'.*trust_checkpoint"):
        check_targets(crafted, "x.ckpt")
    # of the training machinery only the module is safe: a callback that signals the process is not
    signal = {**safe, "steps": [{"_target_": "engine.checkpoint_saving.SignalAtStep", "step": 0}]}
    with pytest.raises(CheckpointError, match=r"SignalAtStep"):
        check_targets(signal, "x.ckpt")
    check_targets(crafted, "x.ckpt", trusted=True)  # the user's explicit choice


def test_predict_draws_from_the_checkpoints_best_f1_threshold_unless_told(best):
    from predict import drawing_threshold

    checkpoint = load_checkpoint(best)
    stored = checkpoint["f1_score_thresh"]  # written with the checkpoint, from its last validation
    assert stored is not None and 0 <= stored <= 1
    assert drawing_threshold(None, checkpoint) == (stored, "the checkpoint's best-F1 threshold")
    assert drawing_threshold(0.5, checkpoint)[0] == 0.5
    assert drawing_threshold(None, {})[0] == 0.3  # an older checkpoint
    with pytest.raises(ValueError, match=r"score_thresh=2: .* in \[0, 1\]"):
        drawing_threshold(2, checkpoint)
    metrics = json.loads((best.parent.parent / "metrics.json").read_text())
    assert {"val/best_f1", "val/f1_score_thresh"} <= set(metrics)
