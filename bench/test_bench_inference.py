"""Model inference, the main benchmark: last-position scores over the whole catalogue, in inference mode.

Rows: M2Rec on the Triton backend (CUDA only) and on the torch backend, Mamba4Rec (the real
``mamba_ssm.Mamba`` where its CUDA scan exists, else ``MambaMixer``; ``impl`` records which), SASRec
(SDPA) and "M2Rec, unfused" (the paper's build on mamba_ssm, ``bench/unfused_m2rec.py``), over the grid of
``bench/grids.py``. Latency per batch is pytest-benchmark's statistic; the
tidy results divide it by the batch for the per-sequence latency. Peak memory: on CUDA measured here
after a warm-up call, before the timing; on CPU by ``bench/memory_probe.py`` in a fresh process per configuration (run by
``bench/run_suite.py``), never inside the timed region.
"""
from __future__ import annotations

import pytest

from .grids import current_grid
from .model_rows import prepare_model_row
from .timing import run_timed
from .workloads import MODEL_CASES, inference_call

GRID = current_grid()


@pytest.mark.parametrize("L,batch", GRID.inference, ids=[f"L{L}-b{b}" for L, b in GRID.inference])
@pytest.mark.parametrize("name,backend", MODEL_CASES, ids=[f"{n}-{b}" for n, b in MODEL_CASES])
def test_inference(benchmark, grid, bench_dev, not_run, name, backend, L, batch):
    fn = prepare_model_row(benchmark, not_run, grid, bench_dev, "inference", name, backend, L, batch,
                           lambda model, seq, lengths, _targets: inference_call(model, seq, lengths))
    run_timed(benchmark, fn, bench_dev, grid)
