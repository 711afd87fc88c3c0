"""Timing helpers: median of repetitions after warm-up, with device synchronisation, and machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from engine.machine import cpu_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Measured copy bandwidth in bytes/s (read + write), the floor for memory-bound kernels."""
    n = megabytes * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, repeats=5)
    return 2 * src.numel() * 4 / seconds


def matmul_rate(device: torch.device, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of an n×n matrix product (2n³ FLOPs), the floor for compute-bound work such as convolutions."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = median_time(lambda: a @ b, device, repeats=5)
    return 2 * n**3 / seconds


def step_flops(step: Callable[[], object]) -> int:
    """FLOPs that ``step()`` spends in matrix products and convolutions, forward and backward (torch's
    FlopCounterMode; elementwise work is not counted, so the floor it gives is a lower bound)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def describe_machine(device: torch.device) -> str:
    """The device, and on a CPU its model, the instruction set torch's kernels use (AVX2, AVX512) and threads."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = (
            f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads of "
            f"{os.cpu_count()} cores"
        )
    return f"{what}; torch {torch.__version__}; {platform.python_implementation()} {platform.python_version()}"
