"""Evaluate a checkpoint: `python eval.py ckpt_path=runs/.../checkpoints/best.ckpt [data=voc data.root=...]`.

The model is rebuilt from the checkpoint's own config (inference settings overridable: `model.postprocess.
score_thresh=0.01`); the data is the checkpoint's training data unless `data=<group>` names another, always
transformed as the model's validation was (see `engine.checkpoint_loading.resolve_preprocessing`). Validation runs
through Lightning (the trainer group: any device), with the same metric code as train.py. Writes into its run folder
(runs/eval/<date>_<time>/): metrics.json (train.py's keys), coco_results.json (COCO results format; for a COCO json
data set, its image and category ids), coco_ground_truth.json (for other data sets: the objects as COCO
annotations, so pycocotools re-evaluates the results to the same numbers) and pr_curve.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.ops import box_convert

import engine.config  # noqa: F401  (registers the config resolvers, e.g. ${len:...})
from datamodules.coco import COCODataset, coco_result_entries, write_coco_results
from detectors.batch import DetectionBatch
from engine.checkpoint_loading import (
    CheckpointError,
    build_model,
    check_classes,
    load_checkpoint,
    resolve_preprocessing,
    training_data_config,
)
from engine.known_warnings import ignore_known_harmless
from evaluation.visualization import plot_pr_curves

ignore_known_harmless()  # trainer.validate runs Lightning's loop, as train.py's does

log = logging.getLogger("eval")


def eval_data_config(data: DictConfig | None, checkpoint: dict[str, Any], ckpt_path: str) -> dict[str, Any]:
    """The data module's config: ``data`` when it names a group (has ``_target_``), else the checkpoint's training
    data with ``data``'s keys (``+data.val_batch_size=8``) on top; the validation transform and size_divisible
    from ``resolve_preprocessing``; no training augmentation (unused here, and it may refer to model.* keys)."""
    if data is not None and "_target_" in data:
        node = data
    else:
        trained, _ = training_data_config(checkpoint, ckpt_path)
        if trained is None:
            raise CheckpointError(
                f"ckpt_path={ckpt_path}: its training data config is unknown (no data_config in "
                f"the checkpoint, no .hydra/config.yaml in its run folder); name the data: "
                f"data=<shapes|voc|coco> (and data.root=...)"
            )
        node = OmegaConf.merge(OmegaConf.create(trained), data or {})
    # the command line's transform (data/transform=<name>) if it gave one, else the training run's
    transform, size_divisible, source = resolve_preprocessing(data, checkpoint, ckpt_path)
    # key by key, in place: the augmentation is left out (it may refer to model.*, absent here) and the rest keeps
    # its parents for interpolations such as ${paths.data_dir}
    config = {
        k: OmegaConf.to_container(node[k], resolve=True) if OmegaConf.is_config(node[k]) else node[k]
        for k in node
        if k not in ("train_transform", "val_transform", "size_divisible")
    }
    config.update(train_transform=None, val_transform=transform, size_divisible=size_divisible)
    log.info("eval transform %s, size_divisible %d (from %s)", transform, size_divisible, source)
    return config


class RecordDetections(L.Callback):
    """Keeps, for the result files, what each validation batch gave the metrics: the detections
    ``validation_step`` returns (the same forward pass), the data set indices, original image sizes and targets.
    Gathered onto every rank at the end."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.records = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: list[dict[str, torch.Tensor]],
        batch: DetectionBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        targets = batch.targets_in_original_frame()
        # the original size: input size ÷ scale (the image's own pixels, which boxes are reported in)
        sizes = (batch.image_sizes.double() / batch.scales.double().to(batch.image_sizes.device)).round().long()
        for i, det in enumerate(outputs):
            self.records.append(
                {
                    "index": int(batch.image_ids[i]),
                    "size": sizes[i].tolist(),
                    "detection": {k: v.detach().cpu() for k, v in det.items()},
                    "target": {k: v.detach().cpu() for k, v in targets[i].items()},
                }
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:  # each rank validated its own images (the data module never repeats one)
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, self.records)
            self.records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])


def coco_ground_truth(records: list[dict[str, Any]], class_names: list[str]) -> dict[str, Any]:
    """The validated objects as a COCO instances json: box areas (what the metrics use, not segment areas),
    ``iscrowd`` from the data's crowd flags; VOC's ``difficult`` kept as a field (the COCO suite counts them)."""
    images, annotations = [], []
    for r in records:
        h, w = r["size"]
        images.append({"id": r["index"], "height": h, "width": w})
        t = r["target"]
        xywh = box_convert(t["boxes"].double(), "xyxy", "xywh")
        difficult = t.get("difficult", torch.zeros(len(xywh), dtype=torch.bool))
        for box, label, crowd, diff in zip(
            xywh.tolist(), t["labels"].tolist(), t["iscrowd"].tolist(), difficult.tolist()
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": r["index"],
                    "category_id": label + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(crowd),
                    "difficult": int(diff),
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_results(records: list[dict[str, Any]], dataset: Any, class_names: list[str], output_dir: Path) -> list[Path]:
    """coco_results.json, and coco_ground_truth.json unless the data set is a COCO json (its file is the truth)."""
    detections = [r["detection"] for r in records]
    indices = [r["index"] for r in records]
    results = output_dir / "coco_results.json"
    if isinstance(dataset, COCODataset):
        write_coco_results(detections, dataset, indices, results)
        log.info("coco_results.json uses the ids of %s", dataset.annotation_file)
        everything = dataset.coco.dataset
        if len(dataset.image_ids) == len(everything["images"]):
            return [results]  # the json itself is the ground truth
        # a part of its json (data.val_fraction): the truth is that part, with the json's own ids
        kept = set(dataset.image_ids)
        truth = output_dir / "coco_ground_truth.json"
        part = {
            **everything,
            "images": [im for im in everything["images"] if im["id"] in kept],
            "annotations": [a for a in everything["annotations"] if a["image_id"] in kept],
        }
        truth.write_text(json.dumps(part))
        return [results, truth]
    results.write_text(json.dumps(coco_result_entries(detections, indices)))
    truth = output_dir / "coco_ground_truth.json"
    truth.write_text(json.dumps(coco_ground_truth(records, class_names)))
    return [results, truth]


def format_table(metrics: dict[str, float], pr_curves: dict[str, Any]) -> str:
    """The COCO suite, VOC AP and one row per class (COCO AP and AP@0.5 from its precision–recall curve)."""

    def row(name: str, key: str) -> str:
        return f"  {name:<32}{metrics[key]:8.4f}" if key in metrics else ""

    coco = [
        ("AP @[.5:.95]", "map"),
        ("AP @.5", "map_50"),
        ("AP @.75", "map_75"),
        ("AP small", "map_small"),
        ("AP medium", "map_medium"),
        ("AP large", "map_large"),
        ("AR @1", "mar_1"),
        ("AR @10", "mar_10"),
        ("AR @100", "mar_100"),
    ]
    lines = [
        "COCO suite:",
        *(row(n, f"val/{k}") for n, k in coco),
        "PASCAL VOC (IoU 0.5):",
        row("mAP, VOC07 11-point", "val/voc07_map_50"),
        row("mAP, area (VOC2010+)", "val/voc_map_50"),
    ]
    per_class = [k for k in metrics if k.startswith("val/ap/")]
    if per_class:
        lines.append(f"  {'per class':<32}{'AP':>8}{'AP@.5':>8}")
        for key in per_class:
            name = key.removeprefix("val/ap/")
            curve = pr_curves.get(name)
            ap50 = f"{float(curve[1].clamp(min=0).mean()):8.4f}" if curve is not None else f"{'-':>8}"
            lines.append(f"  {name:<32}{metrics[key]:8.4f}{ap50}")
    return "\n".join(line for line in lines if line)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    ckpt_path = str(cfg.ckpt_path)
    checkpoint = load_checkpoint(ckpt_path, trusted=bool(cfg.get("trust_checkpoint")))
    trained_classes = checkpoint.get("class_names") or checkpoint["model_config"]["class_names"]
    data_config = eval_data_config(cfg.get("data"), checkpoint, ckpt_path)
    if data_config.get("classes") is None:  # data.classes=null: the model's classes, the ones it was trained on
        data_config["classes"] = list(trained_classes)
        if "unknown_classes" in data_config:  # VOC, COCO: a class the model never saw cannot be scored
            data_config["unknown_classes"] = "skip"
        log.info(
            "data.classes=null: the checkpoint's %d classes %s; objects of any other class in the data are left "
            "out of the evaluation, with a count in the log (data.unknown_classes=skip)",
            len(trained_classes),
            list(trained_classes),
        )
    datamodule = instantiate(data_config)
    check_classes(trained_classes, datamodule.classes, ckpt_path)
    model = build_model(checkpoint, ckpt_path, cfg.get("model"), trusted=bool(cfg.get("trust_checkpoint")))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    recorder = RecordDetections()
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[recorder], enable_checkpointing=False)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    # what train.py writes for its best checkpoint: the logged validation metrics, same keys, same numbers
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if not trainer.is_global_zero:
        return metrics
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    written = write_results(recorder.records, datamodule.val_set, list(model.net.class_names), output_dir)
    curves = model.val_metrics.pr_curves
    if cfg.get("plot", True) and curves:
        plot_pr_curves(
            curves, output_dir / "pr_curve.png", title=f"precision-recall at IoU 0.5: {Path(ckpt_path).name}"
        )
    print(f"\nmetrics of {ckpt_path} on {len(recorder.records)} images:\n{format_table(metrics, curves)}")
    print(
        f"\nwrote {', '.join(p.name for p in [output_dir / 'metrics.json', *written])}"
        f"{', pr_curve.png' if (output_dir / 'pr_curve.png').is_file() else ''}\nrun folder: {output_dir}"
    )
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg).get("val/map")


if __name__ == "__main__":
    main()
