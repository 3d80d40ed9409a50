"""Training-step throughput: one Adam step on all-position cross-entropy over the whole catalogue.

Same model rows as the inference benchmark (dropout as configured, train mode). The tidy results turn
the latency per step into sequences per second (batch / mean step time).
"""
from __future__ import annotations

import pytest

from .grids import current_grid
from .model_rows import prepare_model_row
from .timing import run_timed
from .workloads import MODEL_CASES, train_step_call

GRID = current_grid()


@pytest.mark.parametrize("L,batch", GRID.training, ids=[f"L{L}-b{b}" for L, b in GRID.training])
@pytest.mark.parametrize("name,backend", MODEL_CASES, ids=[f"{n}-{b}" for n, b in MODEL_CASES])
def test_train_step(benchmark, grid, bench_dev, not_run, name, backend, L, batch):
    fn = prepare_model_row(benchmark, not_run, grid, bench_dev, "training", name, backend, L, batch,
                           train_step_call)
    run_timed(benchmark, fn, bench_dev, grid)
