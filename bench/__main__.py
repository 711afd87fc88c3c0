"""``python -m bench``: every comparison against its peer (torchvision; pycocotools for evaluation) in one run,
printed as one table.

Ratios are the peer's time ÷ ours (higher is better for us); the last column is ours ÷ a physical floor: bytes
moved ÷ measured copy bandwidth (memory) or matmul/conv FLOPs ÷ measured matmul rate (FLOPs). Options:
``--device cuda``, ``--repeats N``, ``--json PATH`` to keep the figures, ``--only ssd`` (or ``retinanet``, ``data``,
``eval``, ``train``, ``loader``) for one group of rows. ``loader`` measures each paper's training pipeline in
one loader worker (one CPU core) on real JPEGs (``../shared/data``'s VOC sample and BCCD, or ``--voc-root``), and
the cores it takes to feed the training step on one GPU (this run's step rate on a GPU, else the H200's).
"""

from __future__ import annotations

import argparse
import json
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
        action="append",
        default=None,
        help="loader: a VOCdevkit or one VOC-style folder, repeatable (default: ../shared/data's VOC sample, BCCD)",
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
    rows, loader = [], []

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
    if args.only in (None, "train"):
        training_step.training_step_rows(device, args.repeats, record, flops)
    if args.only in (None, "loader"):
        loader = loader_rows(args.voc_root, args.repeats)

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
            f"\n| training pipeline, one loader worker | img/s a core | H200 step img/s | cores to feed it "
            f"({data_pipeline.GPU_CORES} on the GPU machines) |"
        )
        print("|---|---:|---:|---:|")
        for r in loader:
            cores = f"{r['cores_needed']:.1f}" if r["cores_needed"] else "–"
            print(
                f"| {r['model']} on {r['data']} | {r['images_per_s_per_core']:.1f} | "
                f"{r['step_images_per_s'] or 0:.0f} | {cores} |"
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


def loader_rows(roots: list[Path] | None, repeats: int) -> list[dict]:
    """Each paper's training pipeline on one core, on each folder of real JPEGs, against the GPU step's rate
    measured on an H200 (``data_pipeline.GPU_STEP_RATES``; ``bench.gpu_check`` compares with its own GPU's)."""
    roots = roots or [r for r in (data_pipeline.SAMPLE.parent, data_pipeline.BCCD) if r.is_dir()]
    if not roots:
        print("loader: no JPEGs in ../shared/data; give a VOCdevkit or one VOC-style folder: --voc-root", flush=True)
        return []
    return data_pipeline.per_core_rows(roots, data_pipeline.GPU_STEP_RATES, repeats=repeats)


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
