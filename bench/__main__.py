"""``python -m bench``: every comparison against its peer (torchvision; pycocotools for evaluation) in one run,
printed as one table.

Ratios are the peer's time ÷ ours (higher is better for us); the last column is ours ÷ a physical floor: bytes
moved ÷ measured copy bandwidth (memory) or matmul/conv FLOPs ÷ measured matmul rate (FLOPs). Options:
``--device cuda``, ``--repeats N``, ``--json PATH`` to keep the figures, ``--only ssd`` (or ``retinanet``, ``data``,
``eval``, ``train``, ``loader``) for one group of rows. ``loader`` measures the project's VOC training loader
(``--voc-root``, ``--workers``) in images/s, against the training rate when the ``train`` rows ran too.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from . import data_pipeline, evaluation, retinanet, ssd, training_step
from .timing import describe_machine, matmul_rate, median_time, memory_bandwidth


def times(ratio: float) -> str:
    """A speed-up as printed: two decimals below 10×, so 1.19× is not shown as the 1.2× goal."""
    return f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.1f}×"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as json")
    parser.add_argument(
        "--only",
        choices=("retinanet", "ssd", "data", "eval", "train", "loader"),
        default=None,
        help="time one group's rows",
    )
    parser.add_argument(
        "--voc-root",
        type=Path,
        default=data_pipeline.SAMPLE.parent,
        help="loader: a VOCdevkit folder (default: the sample in ../shared/data)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader: worker processes (default: 16 on a GPU, else the number of cores)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(f"machine: {describe_machine(device)}", flush=True)
    bandwidth, flops = memory_bandwidth(device), matmul_rate(device)
    print(
        f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s; float32 matmul rate: {flops / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    rows, loader = [], None

    def record(
        what: str,
        peer: float,
        ours: float,
        floor: float | None = None,
        peer_name: str = "torchvision",
        floor_kind: str = "memory",
    ) -> None:
        row = {
            "what": what,
            "peer": peer_name,
            "peer_s": peer,
            "ours_s": ours,
            "ratio": peer / ours,
            "ours_over_floor": ours / floor if floor else None,
            "floor": floor_kind if floor else None,
        }
        rows.append(row)
        print(f"  {what}: {peer_name} {peer * 1e3:.0f} ms, ours {ours * 1e3:.0f} ms, {times(peer / ours)}", flush=True)

    if args.only in (None, "retinanet"):
        retinanet_rows(device, args.repeats, bandwidth, record)
    if args.only in (None, "ssd"):
        ssd_rows(device, args.repeats, bandwidth, record)
    if args.only in (None, "data"):
        data_pipeline.pipeline_rows(args.repeats, record)
    if args.only in (None, "eval"):
        evaluation_rows(args.repeats, record)
    training_rates = {}
    if args.only in (None, "train"):
        training_rates = training_step.training_step_rows(device, args.repeats, record, flops)
    if args.only in (None, "loader"):
        loader = loader_row(device, args, training_rates)

    if rows:
        print("\n| what | peer | peer time | ours | speed-up | ours ÷ floor |")
        print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        floor = f"{r['ours_over_floor']:.1f}× ({r['floor']})" if r["ours_over_floor"] else "–"
        print(
            f"| {r['what']} | {r['peer']} | {r['peer_s'] * 1e3:.0f} ms | {r['ours_s'] * 1e3:.0f} ms | "
            f"**{times(r['ratio'])}** | {floor} |"
        )
    if loader:
        print(
            f"\nloader: {loader['what']}: {loader['images_per_s']:.1f} img/s"
            + (
                f"; training ({loader['against']}) {loader['training_images_per_s']:.1f} img/s: "
                f"{loader['headroom']:.1f}× headroom"
                if loader.get("against")
                else ""
            )
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": describe_machine(device),
                    "copy_bandwidth": bandwidth,
                    "matmul_flops_per_s": flops,
                    "rows": rows,
                    "loader": loader,
                },
                indent=2,
            )
        )
    return rows


def loader_row(device: torch.device, args, training_rates: dict[str, float]) -> dict | None:
    """The VOC training loader's images/s with the workers a training run would use, and whether it keeps up with
    the training rate measured above (on a GPU: the 800 px bf16 row, the loader's own resolution)."""
    if not args.voc_root.is_dir():
        print(f"loader: {args.voc_root} is not a folder; give a VOCdevkit with --voc-root", flush=True)
        return None
    workers = args.workers if args.workers is not None else (16 if device.type == "cuda" else os.cpu_count())
    batch = 16 if device.type == "cuda" else 2
    rate, what = data_pipeline.loader_rate(args.voc_root, workers, batch, pin_memory=device.type == "cuda")
    print(f"loader: {what}: {rate:.1f} img/s", flush=True)
    row = {"what": what, "images_per_s": rate}
    if training_rates:
        against = list(training_rates)[-1] if device.type == "cuda" else next(iter(training_rates))
        row.update(
            against=against, training_images_per_s=training_rates[against], headroom=rate / training_rates[against]
        )
    return row


def retinanet_rows(device: torch.device, repeats: int, bandwidth: float, record) -> None:
    fx = retinanet.make_fixture(device)
    n = fx.priors.boxes.shape[0]
    print(
        f"RetinaNet fixture: {fx.image_size}×{fx.image_size} → {n:,} anchors, batch {len(fx.batch)}, "
        f"{fx.num_classes} classes, {fx.batch.boxes.shape[1]} objects/image",
        flush=True,
    )
    tv_loss, our_loss, floor_bytes = retinanet.loss_cases(fx, device)
    record(
        "RetinaNet match + focal/box loss + backward",
        median_time(tv_loss, device, repeats),
        median_time(our_loss, device, repeats),
        floor_bytes / bandwidth,
    )
    tv_post, our_post = retinanet.postprocess_cases(fx, device)
    # the floor: read every logit once
    record(
        "RetinaNet postprocess (0.05, top-1k/level, NMS 0.5, 100/image)",
        median_time(tv_post, device, repeats),
        median_time(our_post, device, repeats),
        fx.logits.numel() * fx.logits.element_size() / bandwidth,
    )


def ssd_rows(device: torch.device, repeats: int, bandwidth: float, record) -> None:
    sx = ssd.make_fixture(device)
    print(
        f"SSD300 fixture: 300×300 → {sx.priors.boxes.shape[0]:,} default boxes, batch {len(sx.batch)}, "
        f"{sx.num_classes + 1} classes, {sx.batch.boxes.shape[1]} objects/image",
        flush=True,
    )
    tv_loss, our_loss, floor_bytes = ssd.loss_cases(sx, device)
    record(
        "SSD300 match + MultiBox loss (3:1 hard negatives) + backward",
        median_time(tv_loss, device, repeats),
        median_time(our_loss, device, repeats),
        floor_bytes / bandwidth,
    )
    tv_post, our_post = ssd.postprocess_cases(sx, device)
    record(
        "SSD300 postprocess (softmax, 0.01, top-200/class, NMS 0.45, 200/image)",
        median_time(tv_post, device, repeats),
        median_time(our_post, device, repeats),
        sx.logits.numel() * sx.logits.element_size() / bandwidth,
    )


def evaluation_rows(repeats: int, record) -> None:
    fx = evaluation.make_fixture()
    dets = sum(len(d["scores"]) for d in fx.detections)
    objects = sum(len(t["labels"]) for t in fx.targets)
    print(
        f"evaluation fixture: {len(fx.detections):,} images, {dets:,} detections, {objects:,} objects "
        f"({sum(int(t['iscrowd'].sum()) for t in fx.targets)} crowd), {fx.num_classes} classes",
        flush=True,
    )
    run_pycocotools, run_ours = evaluation.cases(fx)
    (peer_map, _), (our_map, _) = run_pycocotools(), run_ours()
    print(f"  mAP: pycocotools {peer_map:.6f}, ours {our_map:.6f}", flush=True)
    # both are host-side (ours on CPU tensors); the first calls above were the warm-up
    cpu = torch.device("cpu")
    record(
        "Validation metrics, 5k images × 100 detections (COCO suite + VOC AP + per-class AP)",
        median_time(run_pycocotools, cpu, repeats, warmup=0),
        median_time(run_ours, cpu, repeats, warmup=0),
        peer_name="pycocotools",
    )


if __name__ == "__main__":
    main()
