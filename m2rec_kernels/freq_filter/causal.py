"""Helpers for the causal mode of the FFT filter (DESIGN §2.2).

A real time-domain kernel k (K, d) gives y_t = sum_{s<=t} k_{t-s} x_s exactly when its *unscaled* rfft
is used as the weight and the transform is long enough that the circular wrap-around never reaches the
first L outputs: n_fft >= L + K - 1. (rfft/irfft with norm="ortho" compose to the unscaled forward and
1/n inverse transform, so the ortho norm does not rescale the convolution.)
"""
from __future__ import annotations

import torch


def causal_n_fft(L: int, K: int) -> int:
    """Smallest power of two >= L + K - 1: the cheapest transform length for a causal filter of a
    length-L sequence with a K-tap kernel (any n_fft >= L + K - 1 gives the same output)."""
    for name, v in (("L", L), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"causal_n_fft: {name} must be a positive int, got {v!r}")
    need = L + K - 1
    return 1 << (need - 1).bit_length()


def causal_weight(kernel: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Complex weight (n_fft//2 + 1, d) = torch.fft.rfft(kernel, n=n_fft, dim=0) (unscaled) for a real
    time-domain kernel (K, d); differentiable. Needs n_fft >= K; for exact causal filtering of length-L
    inputs also n_fft >= L + K - 1 (checked by the caller, who knows L)."""
    if not isinstance(kernel, torch.Tensor):
        raise TypeError(f"causal_weight: kernel must be a torch.Tensor, got {type(kernel).__name__}")
    if kernel.dim() != 2 or kernel.is_complex() or not kernel.dtype.is_floating_point:
        raise ValueError(f"causal_weight: kernel must be a real 2-D (K, d) tensor, got {kernel.dtype} "
                         f"shape {tuple(kernel.shape)}")
    if isinstance(n_fft, bool) or not isinstance(n_fft, int) or n_fft < kernel.shape[0]:
        raise ValueError(f"causal_weight: n_fft must be an int >= K = {kernel.shape[0]}, got {n_fft!r}")
    k = kernel if kernel.dtype in (torch.float32, torch.float64) else kernel.float()
    return torch.fft.rfft(k, n=n_fft, dim=0)
