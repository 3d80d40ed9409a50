"""Which backends can be timed on this machine, and why not when they cannot.

The reasons end up verbatim in the results (rows with status "not run") and in the plots.
"""
from __future__ import annotations

import importlib
import os
import time
from typing import Callable, Optional, Tuple

import torch

from m2rec_kernels._backend import triton_available, triton_interpreter_enabled

from .grids import smoke_mode


def budget_not_run_reason() -> Optional[str]:
    """Why a row is skipped because the run's time budget is spent (``M2REC_BENCH_DEADLINE``, seconds
    since the epoch, set by gpu-check), or None. Checked before a row builds or compiles anything."""
    raw = os.environ.get("M2REC_BENCH_DEADLINE", "")
    if not raw:
        return None
    try:
        deadline = float(raw)
    except ValueError:
        raise ValueError(f"M2REC_BENCH_DEADLINE must be seconds since the epoch, got {raw!r}") from None
    if time.time() < deadline:
        return None
    return "the run's time budget was spent before this row (gpu-check runs rows in priority order)"


def triton_not_run_reason(device: torch.device) -> Optional[str]:
    """None when Triton rows run here; otherwise the reason they are not run.

    Compiled Triton needs CUDA. Under the interpreter Triton runs on CPU tensors but orders of magnitude
    slower than torch, so it is never timed: only the smoke run may execute those rows once.
    """
    if not triton_available():
        return "triton is not importable"
    if triton_interpreter_enabled():
        if smoke_mode():
            return None  # once, on tiny shapes, untimed (benchmarks are disabled in smoke runs)
        return "TRITON_INTERPRET is set: kernels under the Triton interpreter are never timed"
    if device.type != "cuda":
        return ("no CUDA device: compiled Triton needs a GPU, and the Triton interpreter "
                "(the only CPU path) is never timed")
    return None


def cpu_scan_not_run_reason(device: torch.device) -> Optional[str]:
    """None when the compiled CPU selective scan (backend "cpu") runs here; otherwise why not."""
    if device.type != "cpu":
        return "the compiled CPU scan (backend 'cpu') runs on CPU tensors; this is a CUDA run"
    from m2rec_kernels.scan.cpu import cpu_scan_status

    st = cpu_scan_status()
    return None if st.available else f"compiled CPU scan not available: {st.reason}"


def cpu_scan_note() -> str:
    """Which compiled scan variant a "cpu" row ran (for the results' ``impl``); the Mamba mixer's conv1d
    runs from the same library."""
    from m2rec_kernels.scan.cpu import cpu_scan_status

    st = cpu_scan_status()
    return (f"compiled C++ scan and conv1d, {st.isa} variant" if st.available
            else f"PyTorch reference scan ({st.reason})")


def mamba_cuda_scan() -> Tuple[Optional[Callable], str]:
    """mamba_ssm's ``selective_scan_fn`` backed by its CUDA extension, or (None, reason)."""
    from m2rec.mamba_ssm_compat import import_mamba_ssm

    mamba_ssm, how = import_mamba_ssm()
    if mamba_ssm is None:
        return None, how
    if how != "cuda":
        return None, "mamba_ssm is installed without its CUDA extension (selective_scan_cuda)"
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    return ssi.selective_scan_fn, "mamba_ssm selective_scan_fn (CUDA extension)"


def mamba_reference_scan() -> Tuple[Optional[Callable], str]:
    """mamba_ssm's own PyTorch ``selective_scan_ref`` (runs anywhere), or (None, reason)."""
    from m2rec.mamba_ssm_compat import import_mamba_ssm, selective_scan_ref

    mamba_ssm, how = import_mamba_ssm()
    if mamba_ssm is None:
        return None, how
    return selective_scan_ref(), "mamba_ssm selective_scan_ref (PyTorch, materialises (b, d, L, N))"


#: On CPU the unfused row runs mamba_ssm's ``selective_scan_ref``, which materialises exp(Δ·A) and Δ·B·u as
#: (batch, d_inner, L, N) fp32 tensors and walks L in Python, and whose backward is quadratic in L (it
#: scatters every step's gradient into a zero tensor of the whole sequence). Measured on the 2-core Xeon,
#: one thread, min of interleaved calls under load: inference 3.1 s per call at L 200 / batch 64 (5.4x
#: M2Rec on torch), 20 s at L 1000 / batch 64; a training step 1.9 s at L 50 / batch 32 but 74 s at
#: L 200 / batch 32. Rows above these limits would cost minutes each, more than the CPU suite's budget.
CPU_REF_SCAN_MAX_ELEMENTS = 2 ** 26      # inference: batch * d_inner * L * N (L 200 at batch 64 runs)
CPU_REF_SCAN_MAX_TRAINING_L = 64          # training: L 50 runs, L 200 does not


def unfused_m2rec_not_run_reason(device: torch.device, kind: str, L: int, batch: int) -> Optional[str]:
    """None when the "M2Rec, unfused" row runs here; otherwise why not (recorded as "not run")."""
    from .grids import D_MODEL, D_STATE, EXPAND
    from .unfused_m2rec import mamba_scan_label

    label, why = mamba_scan_label(device)
    if label is None:
        return why
    if device.type != "cpu" or smoke_mode():
        return None
    if kind == "training" and L > CPU_REF_SCAN_MAX_TRAINING_L:
        return ("on CPU its scan is mamba_ssm's selective_scan_ref, whose backward is quadratic in L: 74 s per "
                f"training step at L 200, batch 32 on a 2-core CPU; not run above L {CPU_REF_SCAN_MAX_TRAINING_L}")
    elements = batch * EXPAND * D_MODEL * L * D_STATE
    if elements > CPU_REF_SCAN_MAX_ELEMENTS:
        return (f"on CPU its scan is mamba_ssm's selective_scan_ref, which walks L in Python over two (batch, "
                f"d_inner, L, N) fp32 tensors, {4 * elements / 2 ** 30:.1f} GiB each here: 20 s per call at L 1000, "
                f"batch 64 on a 2-core CPU; not run above {CPU_REF_SCAN_MAX_ELEMENTS / 2 ** 20:.0f} M elements")
    return None
