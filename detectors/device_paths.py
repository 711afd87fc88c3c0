"""Which code path a part takes on a tensor's device: the GPU's, or the CPU's where reading a value is free.

On a GPU every read of a tensor's value on the host (``int(t)``, ``nonzero``, boolean-mask indexing) stalls the
host until the GPU has caught up, so the parts avoid them there; on the CPU such a read costs nothing, and a few
parts use one to skip work (the IoU in cache-sized blocks, a multiply by 1 left out). ``gpu_paths()`` makes every
part take its GPU path on any device, so that the host reads a GPU step would make can be counted on a CPU
(``bench/host_syncs.py``), and the two paths tested equal on one machine.

Example:
    >>> with gpu_paths():
    ...     takes_gpu_path(torch.zeros(1))
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

_forced = 0  # how many gpu_paths() contexts are open


def takes_gpu_path(tensor: Tensor) -> bool:
    """Whether a part working on ``tensor`` must avoid host reads: on a GPU, or inside ``gpu_paths()``."""
    return tensor.device.type != "cpu" or _forced > 0


@contextmanager
def gpu_paths() -> Iterator[None]:
    """Every part takes its GPU path inside this block, on any device (same results: each pair is tested equal)."""
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1
