"""``python -m bench``: every comparison against its peer (torchvision; pycocotools for evaluation) in one run,
printed as one table.

Ratios are the peer's time ÷ ours (higher is better for us). Options: ``--device cuda``, ``--repeats N``,
``--json PATH`` to keep the figures, ``--only ssd`` (or ``retinanet``, ``data``, ``eval``, ``train``) for one group of rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import data_pipeline, evaluation, retinanet, ssd, training_step
from .timing import describe_machine, median_time, memory_bandwidth


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as json")
    parser.add_argument("--only", choices=("retinanet", "ssd", "data", "eval", "train"), default=None,
                        help="time one group's rows")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(f"machine: {describe_machine(device)}", flush=True)
    bandwidth = memory_bandwidth(device)
    print(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []

    def record(what: str, peer: float, ours: float, floor: float | None = None, peer_name: str = "torchvision") -> None:
        row = {"what": what, "peer": peer_name, "peer_s": peer, "ours_s": ours, "ratio": peer / ours,
               "ours_over_floor": ours / floor if floor else None}
        rows.append(row)
        print(f"  {what}: {peer_name} {peer * 1e3:.0f} ms, ours {ours * 1e3:.0f} ms, {peer / ours:.1f}×", flush=True)

    if args.only in (None, "retinanet"):
        retinanet_rows(device, args.repeats, bandwidth, record)
    if args.only in (None, "ssd"):
        ssd_rows(device, args.repeats, bandwidth, record)
    if args.only in (None, "data"):
        data_pipeline.pipeline_rows(args.repeats, record)
    if args.only in (None, "eval"):
        evaluation_rows(args.repeats, record)
    if args.only in (None, "train"):
        training_step.training_step_rows(device, args.repeats, record)

    print()
    print("| what | peer | peer time | ours | speed-up | ours ÷ memory floor |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        floor = f"{r['ours_over_floor']:.1f}×" if r["ours_over_floor"] else "–"
        print(f"| {r['what']} | {r['peer']} | {r['peer_s'] * 1e3:.0f} ms | {r['ours_s'] * 1e3:.0f} ms | "
              f"**{r['ratio']:.1f}×** | {floor} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": describe_machine(device), "rows": rows}, indent=2))
    return rows


def retinanet_rows(device: torch.device, repeats: int, bandwidth: float, record) -> None:
    fx = retinanet.make_fixture(device)
    n = fx.priors.boxes.shape[0]
    print(f"RetinaNet fixture: {fx.image_size}×{fx.image_size} → {n:,} anchors, batch {len(fx.batch)}, "
          f"{fx.num_classes} classes, {fx.batch.boxes.shape[1]} objects/image", flush=True)
    tv_loss, our_loss, floor_bytes = retinanet.loss_cases(fx, device)
    record("RetinaNet match + focal/box loss + backward", median_time(tv_loss, device, repeats),
           median_time(our_loss, device, repeats), floor_bytes / bandwidth)
    tv_post, our_post = retinanet.postprocess_cases(fx, device)
    # the floor: read every logit once
    record("RetinaNet postprocess (0.05, top-1k/level, NMS 0.5, 100/image)",
           median_time(tv_post, device, repeats), median_time(our_post, device, repeats),
           fx.logits.numel() * fx.logits.element_size() / bandwidth)


def ssd_rows(device: torch.device, repeats: int, bandwidth: float, record) -> None:
    sx = ssd.make_fixture(device)
    print(f"SSD300 fixture: 300×300 → {sx.priors.boxes.shape[0]:,} default boxes, batch {len(sx.batch)}, "
          f"{sx.num_classes + 1} classes, {sx.batch.boxes.shape[1]} objects/image", flush=True)
    tv_loss, our_loss, floor_bytes = ssd.loss_cases(sx, device)
    record("SSD300 match + MultiBox loss (3:1 hard negatives) + backward", median_time(tv_loss, device, repeats),
           median_time(our_loss, device, repeats), floor_bytes / bandwidth)
    tv_post, our_post = ssd.postprocess_cases(sx, device)
    record("SSD300 postprocess (softmax, 0.01, top-200/class, NMS 0.45, 200/image)",
           median_time(tv_post, device, repeats), median_time(our_post, device, repeats),
           sx.logits.numel() * sx.logits.element_size() / bandwidth)


def evaluation_rows(repeats: int, record) -> None:
    fx = evaluation.make_fixture()
    dets = sum(len(d["scores"]) for d in fx.detections)
    objects = sum(len(t["labels"]) for t in fx.targets)
    print(f"evaluation fixture: {len(fx.detections):,} images, {dets:,} detections, {objects:,} objects "
          f"({sum(int(t['iscrowd'].sum()) for t in fx.targets)} crowd), {fx.num_classes} classes", flush=True)
    run_pycocotools, run_ours = evaluation.cases(fx)
    (peer_map, _), (our_map, _) = run_pycocotools(), run_ours()
    print(f"  mAP: pycocotools {peer_map:.6f}, ours {our_map:.6f}", flush=True)
    # both are host-side (ours on CPU tensors); the first calls above were the warm-up
    cpu = torch.device("cpu")
    record("Validation metrics, 5k images × 100 detections (COCO suite + VOC AP + per-class AP)",
           median_time(run_pycocotools, cpu, repeats, warmup=0), median_time(run_ours, cpu, repeats, warmup=0),
           peer_name="pycocotools")


if __name__ == "__main__":
    main()
