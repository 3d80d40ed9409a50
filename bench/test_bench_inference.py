"""Model inference, the main benchmark: last-position scores over the whole catalogue, in inference mode.

Rows: M2Rec on the Triton backend (CUDA only) and on the torch backend, Mamba4Rec (the real
``mamba_ssm.Mamba`` where its CUDA scan exists, else ``MambaMixer``; ``impl`` records which) and SASRec
(SDPA), over the grid of ``bench/grids.py``. Latency per batch is pytest-benchmark's statistic; the
tidy results divide it by the batch for the per-sequence latency. Peak memory: on CUDA measured here
after the timing; on CPU by ``bench/memory_probe.py`` in a fresh process per configuration (run by
``bench/run_suite.py``), never inside the timed region.
"""
from __future__ import annotations

import pytest

from .grids import current_grid
from .memory_probe import cuda_peak_mb
from .model_rows import build_or_skip, first_call_or_skip
from .timing import run_timed
from .workloads import MODEL_CASES, inference_call, random_batch

GRID = current_grid()


@pytest.mark.parametrize("L,batch", GRID.inference, ids=[f"L{L}-b{b}" for L, b in GRID.inference])
@pytest.mark.parametrize("name,backend", MODEL_CASES, ids=[f"{n}-{b}" for n, b in MODEL_CASES])
def test_inference(benchmark, grid, bench_dev, not_run, name, backend, L, batch):
    fields = dict(kind="inference", name=name, backend=backend, L=L, batch=batch, device=bench_dev.type)
    model, notes = build_or_skip(not_run, fields, name, backend, grid.n_items, L, bench_dev)
    fields["backend"] = notes.pop("backend_label", backend)
    seq, lengths, _ = random_batch(grid.n_items, L, batch, bench_dev)
    fn = inference_call(model, seq, lengths)
    first_call_or_skip(not_run, fields, fn)
    benchmark.group = f"inference L={L} batch={batch}"
    benchmark.extra_info.update(fields, **notes)
    if bench_dev.type == "cuda":
        benchmark.extra_info["peak_mem_mb"] = cuda_peak_mb(fn, bench_dev)
        benchmark.extra_info["mem_method"] = "torch.cuda.max_memory_allocated above the pre-call allocation"
    run_timed(benchmark, fn, bench_dev, grid)
