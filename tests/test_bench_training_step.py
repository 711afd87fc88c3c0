"""The training-step bench compares like with like: same weights, trainable set, images and targets, and
(one image per batch, where the two libraries' loss normalisations coincide) the same losses step after step."""

import pytest
import torch

from bench.data_pipeline import loader_rate
from bench.timing import step_flops
from bench.training_step import retinanet_case, ssd_case


def _assert_same_steps(case, steps: int = 2) -> None:
    assert case.mismatches() == []
    for _ in range(steps):  # equal totals at every step: equal losses, gradients and SGD updates
        torch.testing.assert_close(case.ours_step(), case.their_step(), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_retinanet_step_matches_torchvision():
    case = retinanet_case(
        torch.device("cpu"), image_size=128, batch_size=1, num_classes=80, objects=3, channels_last=False
    )  # the layout probe (engine/layout.py) is tested apart
    assert case.batch.images.shape == (1, 3, 128, 128)
    assert not case.theirs.backbone.body.conv1.weight.requires_grad  # fine-tuning build: 3 trainable stages
    _assert_same_steps(case)


@pytest.mark.slow
def test_ssd_step_matches_torchvision():
    case = ssd_case(torch.device("cpu"), batch_size=1, objects=3, channels_last=False)
    assert case.targets[0]["labels"].min() >= 1  # torchvision's background is class 0
    _assert_same_steps(case)


@pytest.mark.slow
def test_mixed_precision_channels_last_case_runs_both_sides_alike():
    """The GPU row's settings (bf16 autocast, NHWC weights on both sides), here on the CPU at 64 px (bf16 kernels
    are emulated on CPUs without AVX-512 BF16: 128 px took 30 s)."""
    case = retinanet_case(
        torch.device("cpu"), image_size=64, batch_size=1, objects=3, autocast=torch.bfloat16, channels_last=True
    )
    assert case.mismatches() == []
    assert case.theirs.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with case._precision():
        assert case.ours.backbone.body.conv1(case.batch.images.float()).dtype == torch.bfloat16
    # the first step, from identical weights and inputs: only bf16 rounding (2⁻⁸ relative a product, summed over
    # ~60 layers) tells the losses apart. Later steps follow each side's rounded update from random weights, a
    # trajectory that depends on the CPU's bf16 kernels (AMX's diverged to a non-finite loss on torchvision's side)
    ours, theirs = case.ours_step(), case.their_step()
    assert torch.isfinite(ours) and torch.isfinite(theirs)
    torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)
    # the floor counts the same convolutions on both sides (the losses have no matrix products)
    their_flops, our_flops = step_flops(case.their_step), step_flops(case.ours_step)
    assert our_flops > 1e9 and abs(our_flops - their_flops) <= 0.01 * their_flops


def test_loader_rate_runs_the_projects_voc_loader(tmp_path):
    from PIL import Image

    from .datamodules.test_voc import obj, voc_xml, write_devkit

    xml = voc_xml(obj("dog", "5 5 40 30"), size="<size><width>64</width><height>48</height><depth>3</depth></size>")
    root = write_devkit(
        tmp_path,
        {f"{i:03d}": xml for i in range(6)},
        {f"{i:03d}": Image.new("RGB", (64, 48), (i * 40, 90, 30)) for i in range(6)},
        year=2012,
        split="trainval",
    )
    rate, what = loader_rate(root, workers=1, batch_size=2, batches=4)
    assert rate > 0 and "VOC 2012 trainval (6 images), batch 2, 1 workers" in what
    with pytest.raises(FileNotFoundError, match="VOCdevkit"):
        loader_rate(tmp_path / "nothing", workers=0, batch_size=2)


def test_loader_rows_measure_each_papers_pipeline_in_one_folder(tmp_path):
    from bench.data_pipeline import per_core_rows

    from .datamodules.test_voc import write_folder

    # one exported folder (BCCD's layout): Annotations/, JPEGImages/, ImageSets/Main/train.txt; classes from XMLs
    folder = write_folder(tmp_path / "export", 8, "Annotations", "JPEGImages", lists={"train": list(range(8))})
    rows = per_core_rows([folder], {"ssd": 100.0}, batches=2, repeats=1)
    assert [r["model"] for r in rows] == ["retinanet", "ssd", "yolo"] and {r["data"] for r in rows} == {"export"}
    assert all(r["images_per_s_per_core"] > 0 and "export train (8 images" in r["what"] for r in rows)
    ssd = rows[1]
    assert ssd["cores_needed"] == pytest.approx(100.0 / ssd["images_per_s_per_core"])
    assert rows[0]["cores_needed"] is None  # no step rate given for it


def test_speed_ups_near_a_goal_print_with_two_decimals():
    from bench.__main__ import times

    assert (times(4645 / 3907), times(1.2), times(4404 / 296)) == ("1.19×", "1.20×", "14.9×")
