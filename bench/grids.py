"""What each benchmark runs, by mode.

* ``gpu``   — a CUDA device is present: the full grid of the issue (L 50..2000 x batch 1/64/256).
* ``cpu``   — no CUDA device: a grid trimmed so the whole suite (timings + memory probes + plots) fits in
  about 7 minutes on a 2-core machine, keeping L in {50, 200, 1000} at batch 64.
* ``smoke`` — ``M2REC_BENCH_SMOKE=1`` (the test command sets it with ``--benchmark-disable``): every
  benchmark once on tiny shapes so the suite cannot rot; Triton rows may run once under the interpreter
  (correctness of the bench path only, never timed).

Widths follow the paper's set-up (DESIGN §7): hidden 64, d_state 32, expand 2, ML-1M's 3,706 items and
384-d text embeddings (all-MiniLM-L6-v2's width).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

D_MODEL = 64
D_STATE = 32
EXPAND = 2
N_ITEMS_ML1M = 3706
TEXT_DIM = 384
MODEL_NAMES = ("m2rec", "mamba4rec", "sasrec")


def smoke_mode() -> bool:
    return os.environ.get("M2REC_BENCH_SMOKE", "0") not in ("", "0")


def grid_override() -> str:
    """``M2REC_BENCH_GRID`` ("gpu", "cpu" or empty): run another machine's grid here. gpu-check's stub
    (``bench/gpu_check.py --stub``) uses "gpu" on a CPU machine to time its own overheads."""
    value = os.environ.get("M2REC_BENCH_GRID", "")
    if value not in ("", "gpu", "cpu"):
        raise ValueError(f"M2REC_BENCH_GRID must be 'gpu', 'cpu' or empty, got {value!r}")
    return value


def machine_tag() -> str:
    """``gpu`` with a CUDA device, else ``cpu`` (or the grid override); used in every output file name."""
    return grid_override() or ("gpu" if torch.cuda.is_available() else "cpu")


def cpu_threads() -> int:
    """Math threads for CPU timings: ``M2REC_BENCH_THREADS``, default 1.

    One thread by default because CPU machines here are shared: with two OpenMP threads on two busy
    cores every parallel region waits for a descheduled thread, and a Mamba forward (thousands of small
    parallel regions) measured 13x slower than on one thread, while SASRec (few large ops) lost far less
    — the ratios between models would measure the neighbours. Set it to the core count on a dedicated
    machine."""
    raw = os.environ.get("M2REC_BENCH_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"M2REC_BENCH_THREADS must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"M2REC_BENCH_THREADS must be a positive integer, got {raw!r}")
    return n


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Grid:
    mode: str
    n_items: int
    inference: Tuple[Tuple[int, int], ...]   # (L, batch) pairs for model inference
    training: Tuple[Tuple[int, int], ...]    # (L, batch) pairs for a training step
    streaming: Tuple[Tuple[int, int], ...]   # (L, batch): one streaming step after an (L - 1)-item history
    processes: Tuple[Tuple[int, int], ...]   # (L, global batch): a training step on 1 and on 2 processes
    scan: Tuple[int, int, int, int]          # selective scan (batch, L, d_inner, d_state)
    scan_long_L: int                         # the scan op rows again at this L (the long-sequence goal)
    seq_op: Tuple[int, int, int]             # fft_filter / causal_filter / gated_fusion (batch, L, d)
    target_s: float                          # timed seconds aimed at per benchmark (adaptive rounds)
    min_rounds: int
    max_rounds: int
    # (L, batch) of the torch.compile'd inference rows: a compilation per row (tens of seconds on a CPU)
    # keeps them to the headline shapes
    compiled: Tuple[Tuple[int, int], ...] = ()
    # timed seconds aimed at per training row (None: target_s): more where a row's step is long and
    # the ratio of two such rows is a goal
    training_target_s: Optional[float] = None


def _product(lengths, batches):
    return tuple((L, b) for b in batches for L in lengths)


GPU = Grid(
    mode="gpu",
    n_items=N_ITEMS_ML1M,
    inference=_product((50, 200, 1000, 2000), (1, 64, 256)),
    # batch 64 up to L 2000 (the goals: Triton vs unfused at L 200 and 2000), 256 at short L
    training=_product((50, 200, 1000, 2000), (64,)) + _product((50, 200), (256,)),
    streaming=((200, 64), (200, 256)),
    processes=(),  # process scaling is a CPU measurement (DDP over gloo); a GPU lease has one GPU
    scan=(64, 200, EXPAND * D_MODEL, D_STATE),
    scan_long_L=2000,
    seq_op=(64, 200, D_MODEL),
    # a lent GPU has minutes, not hours: ~0.3 s of timed calls per row (at least 5) keeps the
    # inference rows + ops + training within a few minutes, Triton compilation included;
    # gpu-check (bench/gpu_check.py) runs them in priority order under a time budget
    target_s=0.3,
    min_rounds=5,
    max_rounds=100,
    compiled=((200, 64), (200, 1), (2000, 64)),
)

# Measured on a 2-core Xeon, one thread: at batch 64 one forward of the Mamba models costs ~0.25 s at
# L = 200 and ~1.5 s at L = 1000 (the torch scan updates a (64, 128, 32) state L times), ~3 s at L = 2000;
# batch 256 is left to the GPU grid and training runs at batch 32, so the suite stays within minutes.
CPU = Grid(
    mode="cpu",
    n_items=N_ITEMS_ML1M,
    inference=_product((50, 200, 1000, 2000), (64,)) + _product((50, 200, 1000, 2000), (1,)),
    training=_product((50, 200), (32,)),
    streaming=((200, 64),),  # next to the inference row at L 200, batch 64 (issue 12: step <= 1/20 of it)
    processes=((200, 64),),  # M2Rec (torch) at the paper's ML length, global batch 64 (issue 10)
    scan=(64, 200, EXPAND * D_MODEL, D_STATE),
    scan_long_L=2000,
    seq_op=(64, 200, D_MODEL),
    target_s=1.0,
    min_rounds=3,
    max_rounds=50,
    compiled=((200, 64), (200, 1)),
    # a training step is 0.1-1 s here: at target_s a row had 3-4 rounds, and one burst of another
    # tenant of the host moved M2Rec / SASRec at L 200 between 0.81 and 1.09 over five runs
    training_target_s=4.0,
)

SMOKE = Grid(
    mode="smoke",
    n_items=50,
    inference=((8, 2),),
    training=((8, 2),),
    streaming=((8, 2),),
    processes=((8, 4),),
    scan=(2, 8, 16, 4),
    scan_long_L=12,
    seq_op=(2, 8, 16),
    target_s=0.0,
    min_rounds=1,
    max_rounds=1,
    compiled=((8, 2),),
)


def current_grid() -> Grid:
    if smoke_mode():
        return SMOKE
    return GPU if machine_tag() == "gpu" else CPU
