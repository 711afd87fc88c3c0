"""``python -m bench.memory``: host memory (resident set size) across repeated evaluations and training epochs, to
show that nothing accumulates from one epoch to the next (slow: a few minutes on 2 CPU cores; not a test).

* evaluation: ``DetectionMetrics`` fed 5,000 images × 100 detections per "epoch", then ``compute`` and ``reset``,
  as ``DetectionModule.on_validation_epoch_end`` does; RSS after each of 5 evaluations.
* training: the tiny RetinaNet of tests/conftest.py (``TINY``) for 20 short epochs, each with its validation, in a
  Lightning ``Trainer`` with the CSV logger; RSS at the end of each epoch.

Each part prints RSS per epoch and the least-squares slope in MiB per epoch over the epochs after the first two
(allocator and first-call caches settle there). Options: ``--only eval|train``, ``--epochs N``, ``--images N``.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TINY = (
    "experiment=retinanet_shapes",
    "data.image_size=64",
    "data.num_train=64",
    "data.num_val=16",
    "data.batch_size=8",
    "model.backbone.out_channels=32",
    "model.priors.size_factor=0.125",
)


def rss_mib() -> float:
    """This process's resident set size now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope(values: list[float], skip: int = 2) -> float:
    """Least-squares growth per epoch (MiB/epoch) of ``values`` after the first ``skip``."""
    ys = values[skip:] if len(values) > skip + 1 else values
    n = len(ys)
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in range(n))
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(ys)) / var if var else 0.0


def report(what: str, values: list[float]) -> float:
    per_epoch = ", ".join(f"{v:.0f}" for v in values)
    growth = slope(values)
    print(
        f"{what}: RSS MiB per epoch [{per_epoch}]; slope {growth:+.2f} MiB/epoch (after epoch 2); "
        f"max − min {max(values) - min(values):.0f} MiB",
        flush=True,
    )
    return growth


def synthetic_batches(images: int, detections: int, num_classes: int, per_batch: int = 50) -> list[tuple[list, list]]:
    """Fixed predictions and targets (made once, fed every epoch): 5 objects an image, ``detections`` boxes near
    them or random, in a 640 px frame."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, images, per_batch):
        preds, targets = [], []
        for _ in range(min(per_batch, images - start)):
            xy = torch.rand(5, 2, generator=g) * 500
            gt = torch.cat((xy, xy + 20 + torch.rand(5, 2, generator=g) * 120), 1)
            labels = torch.randint(0, num_classes, (5,), generator=g)
            near = gt[torch.randint(0, 5, (detections,), generator=g)] + torch.randn(detections, 4, generator=g) * 8
            preds.append(
                {
                    "boxes": near,
                    "scores": torch.rand(detections, generator=g),
                    "labels": torch.randint(0, num_classes, (detections,), generator=g),
                }
            )
            targets.append(
                {
                    "boxes": gt,
                    "labels": labels,
                    "difficult": torch.zeros(5, dtype=torch.bool),
                    "iscrowd": torch.zeros(5, dtype=torch.long),
                }
            )
        batches.append((preds, targets))
    return batches


def evaluation_memory(images: int = 5000, detections: int = 100, epochs: int = 5) -> list[float]:
    from evaluation.detection_metrics import DetectionMetrics

    names = [f"class{i}" for i in range(20)]
    batches = synthetic_batches(images, detections, len(names))
    metrics = DetectionMetrics(names)
    values = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for preds, targets in batches:
            metrics.update(preds, targets)
        held = rss_mib()
        result = metrics.compute("val")
        metrics.reset()
        gc.collect()
        values.append(rss_mib())
        print(
            f"  evaluation {epoch + 1}: {images} images × {detections} detections, RSS with states {held:.0f} "
            f"MiB, after reset {values[-1]:.0f} MiB, map {result['val/map']:.3f}, "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return values


def training_memory(epochs: int = 20) -> list[float]:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    import engine.config  # noqa: F401  (registers the config resolvers, e.g. ${len:...})

    class RSSPerEpoch(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            gc.collect()  # what remains is held, not garbage waiting for a collection
            self.values.append(rss_mib())
            print(f"  epoch {trainer.current_epoch + 1}: RSS {self.values[-1]:.0f} MiB", flush=True)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(TINY))
    L.seed_everything(0, workers=True, verbose=False)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    probe = RSSPerEpoch()
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=CSVLogger(folder),
            callbacks=[probe],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=4,
        )
        trainer.fit(model, datamodule=data)
    return probe.values


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("eval", "train"), default=None)
    parser.add_argument("--epochs", type=int, default=None, help="evaluations (default 5) or epochs (default 20)")
    parser.add_argument("--images", type=int, default=5000, help="images per evaluation")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    slopes = {}
    if args.only in (None, "eval"):
        values = evaluation_memory(args.images, epochs=args.epochs or 5)
        slopes["eval"] = report(f"evaluation ({args.images} images × 100 detections)", values)
    if args.only in (None, "train"):
        values = training_memory(args.epochs or 20)
        slopes["train"] = report("training (tiny RetinaNet, 64 images + 16 validation images an epoch)", values)
    return slopes


if __name__ == "__main__":
    main()
