"""Which backends can be timed on this machine, and why not when they cannot.

The reasons end up verbatim in the results (rows with status "not run") and in the plots.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Tuple

import torch

from m2rec_kernels._backend import triton_available, triton_interpreter_enabled

from .grids import smoke_mode


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
    """Which compiled scan variant a "cpu" row ran (for the results' ``impl``)."""
    from m2rec_kernels.scan.cpu import cpu_scan_status

    st = cpu_scan_status()
    return f"compiled C++ scan, {st.isa} variant" if st.available else f"PyTorch reference scan ({st.reason})"


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
