"""Choosing between the PyTorch reference, the Triton kernels and the compiled CPU kernels.

Every public op takes ``backend="auto" | "torch" | "triton" | "cpu"``:

* ``"torch"``  — the differentiable PyTorch reference (the spec).
* ``"triton"`` — the fused Triton kernels. They run compiled on CUDA tensors and, for testing, on CPU
  tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
* ``"cpu"``    — compiled C++ kernels for CPU tensors (built by set-up, ``m2rec_kernels/scan/cpu.py``);
  the selective scan and the causal conv1d have one. An op without a compiled CPU kernel runs its PyTorch reference,
  so a model built with ``backend="cpu"`` runs whole.
* ``"auto"``   — Triton for CUDA tensors; on CPU the compiled kernel where the op has one and it is
  built, torch otherwise. The interpreter is never picked automatically: it is orders of magnitude
  slower than torch and only meant for tests.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cpu")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def resolve_backend(backend: str, op: str, *tensors: torch.Tensor,
                    cpu_kernel: Optional[Callable[[], Optional[str]]] = None) -> str:
    """Return "torch", "triton" or "cpu" for ``backend`` given the op's input tensors.

    ``cpu_kernel`` is given by ops with a compiled CPU kernel: it returns None when that kernel can
    run here, else the reason. Raises ``ValueError`` for an unknown backend name and ``RuntimeError``
    when a backend was asked for explicitly but cannot run on these tensors (Triton on CPU tensors
    without the interpreter, no triton; "cpu" on CUDA tensors, or its kernel not built).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if on_cuda:
            return "triton" if triton_available() else "torch"
        return "cpu" if cpu_kernel is not None and cpu_kernel() is None else "torch"
    if backend == "cpu":
        if on_cuda:
            raise RuntimeError(f"{op}: backend='cpu' runs on CPU tensors, these are on CUDA "
                               "(use backend='triton' or 'auto')")
        if cpu_kernel is None:
            return "torch"  # no compiled CPU kernel for this op: its reference is its CPU path
        why = cpu_kernel()
        if why is not None:
            raise RuntimeError(f"{op}: backend='cpu' cannot run: {why}")
        return "cpu"
    # backend == "triton"
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' needs the 'triton' package, which is not importable")
    if not on_cuda and not triton_interpreter_enabled():
        raise RuntimeError(
            f"{op}: backend='triton' on CPU tensors needs the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton); use backend='torch' or move the "
            "tensors to CUDA"
        )
    return "triton"


def check_backend_runs(backend: str, device, what: str = "backend") -> None:
    """Raise ``ValueError`` up front when ``backend`` cannot run on ``device`` — for command lines and
    configs, which should fail before loading data rather than at the first kernel call. For "cpu"
    that includes the compiled selective scan (the causal conv1d lives in the same library)."""
    from .scan.cpu import cpu_scan_unavailable

    try:
        resolve_backend(backend, what, torch.empty(0, device=device), cpu_kernel=cpu_scan_unavailable)
    except RuntimeError as exc:
        raise ValueError(f"{exc} (device {device})") from None
