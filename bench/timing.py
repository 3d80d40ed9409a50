"""Timing helpers shared by the bench files.

Each benchmark is timed with pytest-benchmark's ``pedantic`` mode so that the number of rounds is chosen
here: a warm-up call (JIT, Triton autotune, allocator and thread-pool start-up) and, unless that call
alone already took a good share of the time target, a second one to estimate the cost of a call; then
as many rounds as fill the grid's time target, clamped to [min_rounds, max_rounds], each round at least
``MIN_ROUND_S`` long (a fast call repeats within a round, and its mean is the round's figure). Slow CPU rows (a
Mamba scan at L = 1000 takes seconds) thus cost warm-up + min_rounds calls and no more. On CUDA every timed call ends with
``torch.cuda.synchronize()`` so the wall clock covers the kernels, not just their launch.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

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


def run_timed(benchmark, fn: Callable[[], object], device: torch.device, grid: Grid,
              target_s: Optional[float] = None) -> None:
    """Warm up ``fn`` and time it with ``benchmark`` (once, untimed, when benchmarks are disabled),
    for about ``target_s`` seconds (default: the grid's)."""
    call = synchronized(fn, device)
    if getattr(benchmark, "disabled", False) or grid.max_rounds <= 1:
        benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
        return
    t0 = time.perf_counter()
    call()  # first call: one-time costs
    once = time.perf_counter() - t0
    target_s = grid.target_s if target_s is None else target_s
    if once < 0.25 * target_s:  # cheap enough to afford a cleaner estimate
        t0 = time.perf_counter()
        call()
        once = time.perf_counter() - t0
    rounds, iterations = plan_rounds(once, grid, target_s)
    benchmark.extra_info["rounds_chosen"] = rounds
    benchmark.extra_info["iterations_chosen"] = iterations
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)


#: The shortest timed round. A call faster than this is repeated within a round (pytest-benchmark's
#: ``iterations``; its statistics are per call) so that a 1 ms streaming step is timed over 20 ms
#: stretches: one call slowed by a neighbour then moves one round's mean a little, not the median.
MIN_ROUND_S = 0.02


def plan_rounds(once: float, grid: Grid, target_s: Optional[float] = None) -> tuple:
    """(rounds, calls per round) for a call that took ``once`` seconds: rounds of at least
    ``MIN_ROUND_S``, as many as fill ``target_s`` (default: the grid's time target), clamped to
    [min_rounds, max_rounds]."""
    once = max(once, 1e-6)
    target_s = grid.target_s if target_s is None else target_s
    iterations = max(1, math.ceil(MIN_ROUND_S / once))
    rounds = int(min(grid.max_rounds, max(grid.min_rounds, math.ceil(target_s / (once * iterations)))))
    return rounds, iterations
