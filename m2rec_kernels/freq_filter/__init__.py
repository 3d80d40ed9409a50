"""FFT-domain filter along the sequence axis (DESIGN §2.2), and its causal form.

``fft_filter(x, weight, n_fft, backend="auto")`` with x (batch, L, d) and weight complex
(n_fft//2 + 1, d) or its real view (n_fft//2 + 1, d, 2):

    y = irfft(rfft(x, n=n_fft, dim=1, norm="ortho") * weight, n=n_fft, dim=1, norm="ortho")[:, :L]

* circular mode: n_fft = L and a learnable weight (FMLP-Rec's FilterLayer);
* causal mode: ``weight = causal_weight(kernel, n_fft)`` for a real kernel (K, d) and
  ``n_fft >= L + K - 1`` (``causal_n_fft(L, K)`` gives the cheapest), so y_t = sum_{s<=t} k_{t-s} x_s.

``causal_filter(x, kernel, backend="auto")`` is the causal mode taking the kernel (K, d) itself:
y_t = sum_{j<K, j<=t} k_j·x_{t-j}, exactly ``fft_filter(x, causal_weight(kernel, n), n)`` for any
n >= L + K - 1 (``causal_filter_reference``), without the rfft/irfft round trip of the kernel.

Backends: "torch" runs torch.fft — the reference (``reference.py``) for ``fft_filter``; for
``causal_filter`` an FFT with a written-out backward (``causal_fft.py``), which is faster on CPU.
"triton" (``paths.py``, the crossover rule) runs, for L <= ``DIRECT_MAX_L`` (256) and x in
fp32/fp16/bf16, the direct Toeplitz kernel (``toeplitz_kernels.py``: L²/2 multiply-adds per row and
channel for the causal filter; for ``fft_filter`` the taps irfft(weight, n_fft), computed once per call,
over the whole L × L matrix, exact for any weight); above that, or for float64, torch.fft (cuFFT) — same
result, same gradients. The dense-DFT kernel (``kernels.py``, ``function.py``) is no longer routed (see
``paths.py``).
"""
from __future__ import annotations

import torch

from .. import _library
from .._backend import resolve_backend
from .._checks import check_tensor
from .causal import causal_n_fft, causal_weight
from .ops import CAUSAL_FILTER, FFT_FILTER
from .paths import direct_filter_runs
from .reference import causal_filter_reference, fft_filter_reference

__all__ = ["fft_filter", "causal_filter", "fft_filter_reference", "causal_filter_reference", "causal_n_fft",
           "causal_weight"]

_OP = "fft_filter"
_REAL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPLEX = (torch.complex64, torch.complex128)


def _check_inputs(x, weight, n_fft) -> None:
    check_tensor(_OP, "x", x, ndim=3, dtypes=_REAL)
    L, d = x.shape[1], x.shape[2]
    if isinstance(n_fft, bool) or not isinstance(n_fft, int):
        raise TypeError(f"{_OP}: n_fft must be an int, got {type(n_fft).__name__}")
    if n_fft < max(L, 1):
        raise ValueError(
            f"{_OP}: n_fft must be >= the sequence length L = {L} (x.shape[1]) and >= 1, got n_fft = {n_fft}"
        )
    n_freq = n_fft // 2 + 1
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{_OP}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.is_complex():
        check_tensor(_OP, "weight", weight, shape=(n_freq, d), dtypes=_COMPLEX, device=x.device)
    else:
        check_tensor(_OP, "weight", weight, dtypes=_REAL + _COMPLEX)
        if weight.dim() != 3:
            raise ValueError(
                f"{_OP}: weight must be complex ({n_freq}, {d}) or its real view ({n_freq}, {d}, 2) "
                f"for n_fft = {n_fft}, d = {d}; got real shape {tuple(weight.shape)}"
            )
        check_tensor(_OP, "weight", weight, shape=(n_freq, d, 2), dtypes=_REAL, device=x.device)


def fft_filter(x: torch.Tensor, weight: torch.Tensor, n_fft: int, backend: str = "auto") -> torch.Tensor:
    """Filter x (batch, L, d) in the rfft domain of length ``n_fft`` (>= L); output in x's dtype.

    ``backend``: "torch" (torch.fft reference), "triton" (the direct kernel on the taps irfft(weight)
    for L <= DIRECT_MAX_L, torch.fft beyond or for float64), or "auto" (Triton on CUDA, torch otherwise).
    Gradients flow to x and weight (the weight's gradient has the weight's form).
    """
    _check_inputs(x, weight, n_fft)
    chosen = resolve_backend(backend, _OP, x, weight)
    chosen = "triton" if chosen == "triton" and direct_filter_runs(x, weight) else "torch"
    return _library.call(FFT_FILTER, x, weight, n_fft, chosen)


def _check_causal_inputs(x, kernel) -> None:
    op = "causal_filter"
    check_tensor(op, "x", x, ndim=3, dtypes=_REAL)
    check_tensor(op, "kernel", kernel, ndim=2, dtypes=_REAL, device=x.device)
    if kernel.shape[0] < 1 or kernel.shape[1] != x.shape[2]:
        raise ValueError(
            f"{op}: kernel must have shape (K, d) with K >= 1 taps and d = x.shape[2] = {x.shape[2]}, "
            f"got {tuple(kernel.shape)}"
        )


def causal_filter(x: torch.Tensor, kernel: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal depthwise filter: x (batch, L, d), kernel (K, d) real taps -> y (batch, L, d) in x's dtype,
    y_t = sum_{j<K, j<=t} kernel_j·x_{t-j}. Taps j >= L do not reach any output (zero gradient).

    ``backend``: "torch" (torch.fft), "triton" (direct kernel for L <= DIRECT_MAX_L, torch.fft beyond or
    for float64) or "auto" (Triton on CUDA, torch otherwise). Gradients flow to x and kernel.
    """
    _check_causal_inputs(x, kernel)
    k = kernel[: x.shape[1]]
    chosen = resolve_backend(backend, "causal_filter", x, kernel)
    chosen = "triton" if chosen == "triton" and direct_filter_runs(x, kernel) else "torch"
    return _library.call(CAUSAL_FILTER, x, k, chosen)[0]
