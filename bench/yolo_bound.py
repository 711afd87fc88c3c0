"""YOLOv1's design bound on a data set: ``python -m bench.yolo_bound --root /data/BCCD --split test --grid 5 7 10``.

One object a cell (paper §2, §2.4: the cell holding its centre is responsible, one set of class probabilities a
cell; where centres share a cell the largest object takes it, ``detectors.yolo.responsible_objects``): an object
that loses its cell has no predictor, so no YOLOv1 of that grid can detect it, however well trained. Per class,
the share of objects that keep a cell is the highest recall the design allows, and the highest AP (every kept
object found first, at precision 1; VOC's all-point AP and COCO's 101-point AP both stay at or below it). The
mean over classes bounds mAP@0.5 (and every IoU threshold's mAP). Difficult objects are left out, as VOC's
evaluation leaves them out; the input size does not matter (a resize keeps which cell a centre falls in).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


from datamodules.voc import VOCDataset, voc_class_names
from detectors.yolo import responsible_objects


def kept_share(dataset: VOCDataset, grid_size: int) -> dict[str, tuple[int, int]]:
    """Per class: (objects that keep a cell of the S×S grid, objects), difficult ones left out."""
    kept = {name: [0, 0] for name in dataset.classes}
    for record in dataset.records:
        ok = ~record.difficult
        if not len(record.boxes):
            continue
        size = (record.height, record.width) if record.height else _image_size(record.image_path)
        cell_gt = responsible_objects(record.boxes[None].double(), ok[None], size, grid_size)[0]
        winners = set(cell_gt[cell_gt >= 0].tolist())
        for j, label in enumerate(record.labels.tolist()):
            if ok[j]:
                kept[dataset.classes[label]][1] += 1
                kept[dataset.classes[label]][0] += j in winners
    return {name: (k, n) for name, (k, n) in kept.items()}


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def bound_table(dataset: VOCDataset, grids: Sequence[int]) -> tuple[str, dict[int, float]]:
    """A Markdown table of each class's kept share per grid size, and the mean over classes (the mAP bound)."""
    shares = {s: kept_share(dataset, s) for s in grids}
    lines = ["| class | objects | " + " | ".join(f"S = {s}" for s in grids) + " |", "|---|---:|" + "---:|" * len(grids)]
    means = {}
    for name in dataset.classes:
        n = shares[grids[0]][name][1]
        lines.append(f"| {name} | {n} | " + " | ".join(f"{_share(shares[s][name]):.3f}" for s in grids) + " |")
    for s in grids:
        present = [_share(v) for v in shares[s].values() if v[1]]
        means[s] = sum(present) / len(present) if present else 0.0
    lines.append("| **mean (mAP bound)** | | " + " | ".join(f"**{means[s]:.3f}**" for s in grids) + " |")
    return "\n".join(lines), means


def _share(kept_and_total: tuple[int, int]) -> float:
    kept, total = kept_and_total
    return kept / total if total else 0.0


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(prog="python -m bench.yolo_bound", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a VOC-style folder (Annotations/, ImageSets/Main/)")
    parser.add_argument("--split", default="test", help="the split list, ImageSets/Main/<split>.txt")
    parser.add_argument("--grid", type=int, nargs="+", default=[5, 7, 10], help="grid sizes S (paper 7, recipe 10)")
    parser.add_argument("--goal-share", type=float, default=0.9, help="print this share of each bound too")
    args = parser.parse_args(argv)
    folder = args.root
    ids = (folder / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    classes = sorted(voc_class_names([folder / "Annotations" / f"{i}.xml" for i in ids]))
    dataset = VOCDataset(folder, None, args.split, classes=classes)
    table, means = bound_table(dataset, args.grid)
    print(f"YOLOv1's one-object-a-cell bound on {folder} ({args.split}, {len(dataset)} images):\n\n{table}\n")
    for s, bound in means.items():
        print(f"S = {s}: mAP@0.5 at most {bound:.3f}; {args.goal_share:.0%} of it: {args.goal_share * bound:.3f}")
    return means


if __name__ == "__main__":
    main()
