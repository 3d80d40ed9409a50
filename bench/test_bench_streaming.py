"""Streaming updates: ``M2Rec.step`` for one new interaction per user after a warm state (issue 12).

The state comes from ``prefill`` of an (L - 1)-item history per user; the timed call is one ``step``
with the L-th item, scores over the whole catalogue included. Its row (kind "streaming") sits next to
the inference row at the same L and batch, a full ``scores()`` over the L-item histories: the plots
draw the two side by side with their ratio.
"""
from __future__ import annotations

import pytest

from .grids import current_grid
from .model_rows import prepare_model_row
from .timing import run_timed
from .workloads import STREAM_CASES, stream_step_call

GRID = current_grid()


@pytest.mark.parametrize("L,batch", GRID.streaming, ids=[f"L{L}-b{b}" for L, b in GRID.streaming])
@pytest.mark.parametrize("name,backend", STREAM_CASES, ids=[f"{n}-{b}" for n, b in STREAM_CASES])
def test_stream_step(benchmark, grid, bench_dev, not_run, name, backend, L, batch):
    fn = prepare_model_row(benchmark, not_run, grid, bench_dev, "streaming", name, backend, L, batch,
                           lambda model, seq, lengths, _targets: stream_step_call(model, seq, lengths))
    benchmark.extra_info["impl"] += f"; step: one new item per user after a {L - 1}-item prefill"
    run_timed(benchmark, fn, bench_dev, grid)
