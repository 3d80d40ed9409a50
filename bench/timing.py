"""Timing helpers shared by the bench files.

Each benchmark is timed with pytest-benchmark's ``pedantic`` mode so that the number of rounds is chosen
here: a warm-up call (JIT, Triton autotune, allocator and thread-pool start-up) and, unless that call
alone already took a good share of the time target, a second one to estimate the cost of a call; then
as many rounds as fill the grid's time target, clamped to [min_rounds, max_rounds]. Slow CPU rows (a
Mamba scan at L = 1000 takes seconds) thus cost warm-up + min_rounds calls and no more. On CUDA every timed call ends with
``torch.cuda.synchronize()`` so the wall clock covers the kernels, not just their launch.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .grids import Grid


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation on CUDA (a no-op on CPU)."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def run_timed(benchmark, fn: Callable[[], object], device: torch.device, grid: Grid) -> None:
    """Warm up ``fn`` and time it with ``benchmark`` (once, untimed, when benchmarks are disabled)."""
    call = synchronized(fn, device)
    if getattr(benchmark, "disabled", False) or grid.max_rounds <= 1:
        benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
        return
    t0 = time.perf_counter()
    call()  # first call: one-time costs
    once = time.perf_counter() - t0
    if once < 0.25 * grid.target_s:  # cheap enough to afford a cleaner estimate
        t0 = time.perf_counter()
        call()
        once = time.perf_counter() - t0
    once = max(once, 1e-6)
    rounds = int(min(grid.max_rounds, max(grid.min_rounds, math.ceil(grid.target_s / once))))
    benchmark.extra_info["rounds_chosen"] = rounds
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
