"""Dense real-DFT matrices for the Triton filter kernel (DESIGN §9), built once per (L, n_fft, device).

For n = n_fft, F = n//2 + 1, f < F, t < L (only the first L samples exist on input and are kept on
output):
    Cr[f, t] = cos(2π f t / n) / √n          Ci[f, t] = −sin(2π f t / n) / √n      (forward, ortho)
    Ar[t, f] = c_f · cos(2π f t / n) / √n    Ai[t, f] = −c_f · sin(2π f t / n) / √n (inverse, ortho)
with c_f = 1 at DC and (even n) Nyquist, else 2 — so the imaginary parts there have no effect,
as in torch.fft. Angles use (f·t) mod n in integers so that large products lose no precision; the
sines at DC and Nyquist are set to exactly zero.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch


class DFTMatrices(NamedTuple):
    cr: torch.Tensor  # (F, L) fp32
    ci: torch.Tensor  # (F, L)
    ar: torch.Tensor  # (L, F)
    ai: torch.Tensor  # (L, F)


def inverse_weights(n_fft: int) -> torch.Tensor:
    """c_f (F,) float64: 1 at DC and (even n_fft) Nyquist, else 2."""
    c = torch.full((n_fft // 2 + 1,), 2.0, dtype=torch.float64)
    c[0] = 1.0
    if n_fft % 2 == 0:
        c[-1] = 1.0
    return c


@lru_cache(maxsize=32)
def dft_matrices(L: int, n_fft: int, device: torch.device) -> DFTMatrices:
    """The four fp32 matrices for sequence length L and transform length n_fft >= L (cached)."""
    n_freq = n_fft // 2 + 1
    f = torch.arange(n_freq, dtype=torch.int64)[:, None]
    t = torch.arange(L, dtype=torch.int64)[None, :]
    angle = (2.0 * math.pi / n_fft) * ((f * t) % n_fft).to(torch.float64)
    scale = 1.0 / math.sqrt(n_fft)
    cos = torch.cos(angle) * scale
    sin = torch.sin(angle) * scale
    sin[0] = 0.0
    if n_fft % 2 == 0:
        sin[-1] = 0.0
    c = inverse_weights(n_fft)[:, None]

    def put(m: torch.Tensor) -> torch.Tensor:
        return m.to(device=device, dtype=torch.float32).contiguous()

    return DFTMatrices(cr=put(cos), ci=put(-sin), ar=put((c * cos).T), ai=put((-c * sin).T))
