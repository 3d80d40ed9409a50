"""Choosing between the PyTorch reference and the Triton kernels.

Every public op takes ``backend="auto" | "torch" | "triton"``:

* ``"torch"``  — the differentiable PyTorch reference (the spec).
* ``"triton"`` — the fused Triton kernels. They run compiled on CUDA tensors and, for testing, on CPU
  tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
* ``"auto"``   — Triton for CUDA tensors, torch otherwise. The interpreter is never picked
  automatically: it is orders of magnitude slower than torch and only meant for tests.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def resolve_backend(backend: str, op: str, *tensors: torch.Tensor) -> str:
    """Return "torch" or "triton" for ``backend`` given the op's input tensors.

    Raises ``ValueError`` for an unknown backend name and ``RuntimeError`` when Triton was asked for
    explicitly but cannot run on these tensors (CPU tensors without the interpreter, no triton).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
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
    configs, which should fail before loading data rather than at the first kernel call."""
    try:
        resolve_backend(backend, what, torch.empty(0, device=device))
    except RuntimeError as exc:
        raise ValueError(f"{exc} (device {device})") from None
