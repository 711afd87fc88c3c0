"""The flat states both metric families keep."""

import torch

from evaluation.flat_states import flatten_images


def test_every_state_lies_on_the_device_of_the_boxes_it_came_from():
    """Checked on the meta device, which any machine has: the counts too (CPU counts beside GPU boxes were split
    across devices by the validation step's ``.to(device)`` and failed ``torch.cat`` at the first epoch's end)."""
    items = [{"boxes": torch.zeros(n, 4, device="meta"), "labels": torch.zeros(n, device="meta")} for n in (2, 0, 3)]
    *flat, counts = flatten_images(items, ("boxes", "labels"))
    assert all(t.device.type == "meta" for t in (*flat, counts)) and counts.shape == (3,)
