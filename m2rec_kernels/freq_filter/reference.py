"""PyTorch reference of the FFT-domain filter (DESIGN §2.2) — the spec the Triton kernel must match.

    y = irfft(rfft(x, n=n_fft, dim=1, norm="ortho") * weight, n=n_fft, dim=1, norm="ortho")[:, :L]

Circular mode (n_fft = L) is FMLP-Rec's ``FilterLayer`` (Woeee/FMLP-Rec ``modules.py``). Causal mode
passes ``weight = causal_weight(kernel, n_fft)`` with ``n_fft >= L + K - 1`` (see ``causal.py``).
"""
from __future__ import annotations

import torch

from .causal import causal_n_fft, causal_weight


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Real dtype the transform runs in: fp32 at least (torch.fft's half support is limited),
    fp64 when either input is double precision."""
    wide = (torch.float64, torch.complex128)
    return torch.float64 if x.dtype in wide or weight.dtype in wide else torch.float32


def as_complex_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Complex (F, d) view of ``weight`` in the complex dtype matching real ``dtype``.

    A real view (F, d, 2) is combined with ``torch.complex`` (differentiable, any strides), so the
    gradient comes back to the real view in its own form.
    """
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    if weight.is_complex():
        return weight.to(cdtype)
    w = weight.to(dtype)
    return torch.complex(w[..., 0], w[..., 1])


def fft_filter_reference(x: torch.Tensor, weight: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Unchecked reference: x (batch, L, d); weight complex (n_fft//2+1, d) or real view (…, 2).

    Output in x's dtype; computed in fp32 (fp64 for double inputs).
    """
    L = x.shape[1]
    if x.numel() == 0:  # torch.fft on CPU rejects an empty batch or no channels
        return x * 0
    dtype = compute_dtype(x, weight)
    spectrum = torch.fft.rfft(x.to(dtype), n=n_fft, dim=1, norm="ortho")
    y = torch.fft.irfft(spectrum * as_complex_weight(weight, dtype), n=n_fft, dim=1, norm="ortho")
    return y[:, :L].to(x.dtype)


def causal_filter_reference(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Unchecked spec of ``causal_filter``: y_t = sum_{j<K, j<=t} k_j·x_{t−j} per channel, computed as
    ``fft_filter_reference(x, causal_weight(kernel, n), n)`` with n = ``causal_n_fft(L, K)``. Taps
    j >= L cannot reach any output and are dropped first (their gradient is zero)."""
    L = x.shape[1]
    if x.numel() == 0:
        return x * 0
    k = kernel[:L]
    n = causal_n_fft(L, k.shape[0])
    return fft_filter_reference(x, causal_weight(k, n), n)
