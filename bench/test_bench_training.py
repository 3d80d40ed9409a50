"""Training-step throughput: one Adam step on all-position cross-entropy over the whole catalogue.

Same model rows as the inference benchmark (dropout as configured, train mode). The tidy results turn
the latency per step into sequences per second (batch / mean step time).
"""
from __future__ import annotations

import pytest

from .grids import current_grid
from .memory_probe import cuda_peak_mb
from .model_rows import build_or_skip, first_call_or_skip
from .timing import run_timed
from .workloads import MODEL_CASES, random_batch, train_step_call

GRID = current_grid()


@pytest.mark.parametrize("L,batch", GRID.training, ids=[f"L{L}-b{b}" for L, b in GRID.training])
@pytest.mark.parametrize("name,backend", MODEL_CASES, ids=[f"{n}-{b}" for n, b in MODEL_CASES])
def test_train_step(benchmark, grid, bench_dev, not_run, name, backend, L, batch):
    fields = dict(kind="training", name=name, backend=backend, L=L, batch=batch, device=bench_dev.type)
    model, notes = build_or_skip(not_run, fields, name, backend, grid.n_items, L, bench_dev)
    fields["backend"] = notes.pop("backend_label", backend)
    seq, lengths, targets = random_batch(grid.n_items, L, batch, bench_dev)
    fn = train_step_call(model, seq, lengths, targets)
    first_call_or_skip(not_run, fields, fn)
    benchmark.group = f"training L={L} batch={batch}"
    benchmark.extra_info.update(fields, **notes)
    if bench_dev.type == "cuda":
        benchmark.extra_info["peak_mem_mb"] = cuda_peak_mb(fn, bench_dev)
        benchmark.extra_info["mem_method"] = "torch.cuda.max_memory_allocated above the pre-call allocation"
    run_timed(benchmark, fn, bench_dev, grid)
