"""FFT-domain filter along the sequence axis (DESIGN §2.2).

``fft_filter(x, weight, n_fft, backend="auto")`` with x (batch, L, d) and weight complex
(n_fft//2 + 1, d) or its real view (n_fft//2 + 1, d, 2):

    y = irfft(rfft(x, n=n_fft, dim=1, norm="ortho") * weight, n=n_fft, dim=1, norm="ortho")[:, :L]

* circular mode: n_fft = L and a learnable weight (FMLP-Rec's FilterLayer);
* causal mode: ``weight = causal_weight(kernel, n_fft)`` for a real kernel (K, d) and
  ``n_fft >= L + K - 1`` (``causal_n_fft(L, K)`` gives the cheapest), so y_t = sum_{s<=t} k_{t-s} x_s.

Backends: "torch" is the torch.fft reference (``reference.py``). "triton" is a dense-DFT kernel
(``kernels.py``, ``function.py``) for x in fp32/fp16/bf16 and **n_fft <= 1024** (``MAX_N_FFT``): circular
mode up to L = 1024, causal mode while L + K - 1 <= 1024 (L <= 512 with K = L taps). Beyond that, or
for float64, it falls back to torch.fft automatically (same result, same gradients).
"""
from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._checks import check_tensor
from .causal import causal_n_fft, causal_weight
from .reference import fft_filter_reference

__all__ = ["fft_filter", "fft_filter_reference", "causal_n_fft", "causal_weight"]

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

    ``backend``: "torch" (torch.fft reference), "triton" (dense-DFT Triton kernel, which falls back
    to torch.fft beyond its size limit or for float64), or "auto" (Triton on CUDA, torch otherwise).
    Gradients flow to x and weight (the weight's gradient has the weight's form).
    """
    _check_inputs(x, weight, n_fft)
    if resolve_backend(backend, _OP, x, weight) == "torch":
        return fft_filter_reference(x, weight, n_fft)
    from .function import fft_filter_triton, triton_supports  # imports triton only when asked

    if not triton_supports(x, weight, n_fft):  # beyond the kernel's size limit, or float64
        return fft_filter_reference(x, weight, n_fft)
    return fft_filter_triton(x, weight, n_fft)
