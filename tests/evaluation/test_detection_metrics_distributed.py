"""DetectionMetrics under torch.distributed: two gloo processes on CPU, each updating with its own (uneven)
part of the images, compute the numbers of one process that saw them all, with one collective per compute."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation.detection_metrics import DetectionMetrics

from .cases import random_coco_set

NAMES = [f"c{k}" for k in range(7)]
SPLIT = 7  # rank 0 updates with the first 7 images, rank 1 with the other 4


def update(metrics, detections, targets, batch_size=3):
    for i in range(0, len(detections), batch_size):
        metrics.update(detections[i : i + batch_size], targets[i : i + batch_size])


def _worker(rank, world_size, init_file, detections, targets, out_dir):
    torch.set_num_threads(1)  # two processes on a shared CPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    calls = {}

    def counted(name):
        fn = getattr(dist, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    # torchmetrics' own sync goes through dist.all_gather (and barrier); ours is one all_gather_object
    for name in ("all_gather_object", "all_gather", "all_reduce", "barrier", "broadcast", "gather_object"):
        setattr(dist, name, counted(name))
    try:
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        metrics = DetectionMetrics(NAMES)
        update(metrics, detections[part], targets[part])
        out = metrics.compute("val")
        first_calls = dict(calls)
        again = metrics.compute("val")  # the states are left as they were: computing twice gives the same
        metrics.coco.compute(), metrics.voc.compute()  # torchmetrics' compute, its sync off: no collective
        torch.save(
            {"out": out, "again": again, "curves": metrics.pr_curves, "calls": first_calls, "calls_after": calls},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")
def test_two_processes_give_the_numbers_of_one(tmp_path):
    detections, targets = random_coco_set(4, num_images=9)  # 9 random images and 2 crafted ones: 7 + 4
    assert len(detections) == SPLIT + 4
    # fork where there is one: spawn re-imports torch and Lightning in each process (several seconds apiece)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker, args=(2, tmp_path / "init", detections, targets, tmp_path), nprocs=2, start_method=method
    )
    single = DetectionMetrics(NAMES)
    update(single, detections, targets)
    expected = single.compute("val")
    assert 0.1 < expected["val/map"] < 0.9 and expected["val/voc_map_50"] > 0.1
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["out"] == expected and result["again"] == expected, rank
        assert result["curves"].keys() == single.pr_curves.keys()
        for name, (recall, precision) in single.pr_curves.items():
            assert torch.equal(result["curves"][name][0], recall) and torch.equal(result["curves"][name][1], precision)
        assert result["calls"] == {"all_gather_object": 1}, rank  # one collective, no torchmetrics sync
        assert result["calls_after"] == {"all_gather_object": 2}, rank
