"""Setting up one model-level benchmark row (inference or training step) the same way in both files."""
from __future__ import annotations

import torch

from .availability import triton_not_run_reason
from .grids import D_MODEL
from .workloads import build_bench_model


def missing_backend(exc: BaseException) -> bool:
    """A backend whose kernels have not landed: NotImplementedError, or a missing m2rec_kernels module."""
    if isinstance(exc, NotImplementedError):
        return True
    return isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("m2rec_kernels")


def build_or_skip(not_run, fields: dict, name: str, backend: str, n_items: int, L: int, device: torch.device):
    """Build the model for a row, or record the row as not run (and skip) when it cannot run here."""
    if backend == "triton":
        reason = triton_not_run_reason(device)
        if reason is not None:
            not_run(reason, **fields)
    try:
        model, notes = build_bench_model(name, backend, n_items, L, device)
    except (NotImplementedError, ModuleNotFoundError) as exc:
        if not missing_backend(exc):
            raise
        not_run(f"backend not implemented: {exc}", **fields)
    notes = dict(notes, n_items=n_items, d_model=D_MODEL)
    return model, notes


def first_call_or_skip(not_run, fields: dict, fn) -> None:
    """Run ``fn`` once untimed so a backend that is missing at call time is recorded, not crashed on."""
    try:
        fn()
    except (NotImplementedError, ModuleNotFoundError) as exc:
        if not missing_backend(exc):
            raise
        not_run(f"backend not implemented: {exc}", **fields)
