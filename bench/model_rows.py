"""One model-level benchmark row (inference or training step), set up the same way in both files."""
from __future__ import annotations

from typing import Callable

import torch

from .availability import (budget_not_run_reason, cpu_scan_not_run_reason, mamba_cuda_scan,
                           triton_not_run_reason, unfused_m2rec_not_run_reason)
from .grids import D_MODEL, Grid
from .memory_probe import cuda_peak_mb
from .workloads import build_bench_model, random_batch

CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated above the pre-call allocation"


def prepare_model_row(benchmark, not_run, grid: Grid, device: torch.device, kind: str, name: str,
                      backend: str, L: int, batch: int, make_call: Callable) -> Callable[[], object]:
    """Build the model, record the row's fields in ``benchmark.extra_info`` (and the CUDA peak memory,
    measured after one warm-up call so compilation is not counted), and return the call to time.
    ``make_call(model, item_seq, lengths, targets)`` builds that call. A Triton or compiled-CPU row
    that cannot run here is recorded as not run (and skipped) instead."""
    fields = dict(kind=kind, name=name, backend=backend, L=L, batch=batch, device=device.type)
    if budget_not_run_reason() is not None:
        not_run(budget_not_run_reason(), **fields)
    if backend in ("triton", "cpu"):
        reason = (triton_not_run_reason if backend == "triton" else cpu_scan_not_run_reason)(device)
        if reason is not None:
            not_run(reason, **fields)
    if name == "m2rec_unfused":
        reason = unfused_m2rec_not_run_reason(device, kind, L, batch)
        if reason is not None:
            not_run(reason, **fields)
    model, notes = build_bench_model(name, backend, grid.n_items, L, device)
    fields["backend"] = notes.pop("backend_label", backend)
    if name == "mamba4rec" and device.type == "cuda" and fields["backend"] != "mamba_ssm":
        # the peer on a GPU is mamba_ssm's CUDA path: say why it is missing beside the row that stands in
        why = mamba_cuda_scan()[1]
        not_run(f"Mamba4Rec on mamba_ssm's CUDA scan: {why}; the {fields['backend']} row stands in", skip=False,
                **dict(fields, backend="mamba_ssm"))
    seq, lengths, targets = random_batch(grid.n_items, L, batch, device)
    fn = make_call(model, seq, lengths, targets)
    benchmark.group = f"{kind} L={L} batch={batch}"
    benchmark.extra_info.update(fields, **notes, n_items=grid.n_items, d_model=D_MODEL)
    if device.type == "cuda":
        fn()  # warm-up: Triton compilation and autotuning stay out of the peak
        benchmark.extra_info["peak_mem_mb"] = cuda_peak_mb(fn, device)
        benchmark.extra_info["mem_method"] = CUDA_MEM_METHOD
    return fn
