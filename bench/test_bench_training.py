"""Training-step throughput: one Adam step on all-position cross-entropy over the whole catalogue.

Same model rows as the inference benchmark (dropout as configured, train mode). The tidy results turn
the latency per step into sequences per second (batch / mean step time).

The scaling rows (kind "training_processes"): M2Rec (torch) taking m2rec's own training step on 1 and
on 2 processes (DDP over gloo, ``bench/process_scaling.py``), the global batch split between them,
each process with the suite's CPU threads (``M2REC_BENCH_THREADS``, default 1).
"""
from __future__ import annotations

import pytest

from .grids import cpu_threads, current_grid
from .model_rows import prepare_model_row
from .process_scaling import StepPool
from .timing import run_timed
from .workloads import MODEL_CASES, train_step_call

GRID = current_grid()
PROCESSES = (1, 2)


@pytest.mark.parametrize("L,batch", GRID.training, ids=[f"L{L}-b{b}" for L, b in GRID.training])
@pytest.mark.parametrize("name,backend", MODEL_CASES, ids=[f"{n}-{b}" for n, b in MODEL_CASES])
def test_train_step(benchmark, grid, bench_dev, not_run, name, backend, L, batch):
    fn = prepare_model_row(benchmark, not_run, grid, bench_dev, "training", name, backend, L, batch,
                           train_step_call)
    run_timed(benchmark, fn, bench_dev, grid, target_s=grid.training_target_s)


@pytest.mark.parametrize("processes", PROCESSES, ids=[f"{n}proc" for n in PROCESSES])
@pytest.mark.parametrize("L,batch", GRID.processes, ids=[f"L{L}-b{b}" for L, b in GRID.processes])
def test_train_step_processes(benchmark, grid, bench_dev, not_run, L, batch, processes):
    threads = cpu_threads()
    label = f"{processes} process{'es' if processes > 1 else ''}"
    with StepPool(processes, "m2rec", "torch", grid.n_items, L, batch, threads) as pool:
        benchmark.group = f"training_processes L={L} batch={batch}"
        benchmark.extra_info.update(
            kind="training_processes", name="m2rec", backend=f"torch, {label}", L=L, batch=batch, device="cpu",
            n_items=grid.n_items, processes=processes, threads_per_process=threads,
            impl=f"{pool.notes['impl']}; {label} x {threads} thread{'s' if threads > 1 else ''}, "
                 f"{batch // processes} sequences each" + (", DDP over gloo (127.0.0.1)" if processes > 1 else ""))
        run_timed(benchmark, pool.step, bench_dev, grid)
