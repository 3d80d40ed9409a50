"""Model inference, the main benchmark: last-position scores over the whole catalogue, in inference mode.

Rows: M2Rec on the Triton backend (CUDA only) and on the torch backend, Mamba4Rec (the real
``mamba_ssm.Mamba`` where its CUDA scan exists, else ``MambaMixer``; ``impl`` records which), SASRec
(SDPA) and "M2Rec, unfused" (the paper's build on mamba_ssm, ``bench/unfused_m2rec.py``), over the grid of
``bench/grids.py``. Latency per batch is pytest-benchmark's statistic; the
tidy results divide it by the batch for the per-sequence latency. Peak memory: on CUDA measured here
after a warm-up call, before the timing; on CPU by ``bench/memory_probe.py`` in a fresh process per configuration (run by
``bench/run_suite.py``), never inside the timed region.

Compiled rows (``test_inference_compiled``): M2Rec and SASRec through ``torch.compile(fullgraph=True)``
at the grid's ``compiled`` shapes, compiled by a warm-up call before the timing (its seconds are in
``compile_s``). The smoke pass records them as not run: a compilation costs tens of seconds on a CPU,
and tests/test_compile_export.py compiles M2Rec (forward, backward, export) for correctness.
"""
from __future__ import annotations

import pytest

from .grids import current_grid
from .model_rows import prepare_model_row
from .timing import run_timed
from .workloads import COMPILED_CASES, MODEL_CASES, compiled_inference_call, inference_call

GRID = current_grid()


@pytest.mark.parametrize("L,batch", GRID.inference, ids=[f"L{L}-b{b}" for L, b in GRID.inference])
@pytest.mark.parametrize("name,backend", MODEL_CASES, ids=[f"{n}-{b}" for n, b in MODEL_CASES])
def test_inference(benchmark, grid, bench_dev, not_run, name, backend, L, batch):
    fn = prepare_model_row(benchmark, not_run, grid, bench_dev, "inference", name, backend, L, batch,
                           lambda model, seq, lengths, _targets: inference_call(model, seq, lengths))
    run_timed(benchmark, fn, bench_dev, grid)


SMOKE_COMPILE_REASON = ("torch.compile costs tens of seconds per row on a CPU: the smoke pass skips it "
                        "(tests/test_compile_export.py compiles M2Rec forward, backward and export)")


@pytest.mark.parametrize("L,batch", GRID.compiled, ids=[f"L{L}-b{b}" for L, b in GRID.compiled])
@pytest.mark.parametrize("name,backend", COMPILED_CASES, ids=[f"{n}-{b}" for n, b in COMPILED_CASES])
def test_inference_compiled(benchmark, grid, bench_dev, not_run, name, backend, L, batch):
    if grid.mode == "smoke":
        not_run(SMOKE_COMPILE_REASON, kind="inference", name=name, backend=backend, L=L, batch=batch,
                device=bench_dev.type)
    fn = prepare_model_row(benchmark, not_run, grid, bench_dev, "inference", name, backend, L, batch,
                           lambda model, seq, lengths, _targets: compiled_inference_call(
                               model, seq, lengths, benchmark.extra_info))
    run_timed(benchmark, fn, bench_dev, grid)
