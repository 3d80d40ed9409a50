"""Which implementation runs the filter on the "triton" backend: the crossover rule (DESIGN §4).

* L <= ``DIRECT_MAX_L`` (and x in fp32/fp16/bf16, no float64 weight): the direct Toeplitz kernel
  (``toeplitz_kernels.py``) — ``causal_filter`` with its taps as given, ``fft_filter`` with the taps
  irfft(W, n_fft) computed once per call;
* above it (or for float64): torch.fft — cuFFT on a GPU.

Why 256. The direct kernel costs L²/2 multiply-adds per (row, channel) for the causal filter (L² for a
general weight), cuFFT O(n log n). Compiled for sm_90 (static report, no GPU lent), the causal kernel
issues 0.049 warp instructions per multiply-add forward (0.046 for dx, 0.057 for dk), no spills. At
batch 64, d 64, on an H200 (132 SMs × 4 schedulers at 1.98 GHz, assumed to issue at half rate) that
is ≈ 14 µs forward at L 256 against ≈ 25 µs for the torch.fft chain (the review's 20–30 µs at n 512,
scaled by n·log n), and the curves meet near L 480 forward but near L 225 for forward + backward (the
direct backward costs 2.1× its forward, the FFT one about 1×). 256 is the training crossover rounded to
the power of two the issue suggested. The estimate is ±2× (issue 11); re-tune from a GPU run.

The dense-DFT kernel (``kernels.py``) is not routed: for every n_fft >= L it does at least twice the
direct kernel's multiply-adds (4·(n_fft/2+1)·L ≥ 2·L² against L², at about the same 0.044–0.054
instructions per multiply-add at num_stages 1) and runs B·d/BLOCK_D programs against the direct
kernel's d·L/32 (128 against 448 at the bench shape; 2 at batch 1). It stays, tested, for a GPU timing.
"""
from __future__ import annotations

import torch

#: longest sequence the direct kernel runs (forward and backward); torch.fft above it
DIRECT_MAX_L = 256
DIRECT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DOUBLE = (torch.float64, torch.complex128)


def direct_filter_runs(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the direct kernel takes x (B, L, d) with the filter tensors ``others`` (same rule for
    both ops): L <= DIRECT_MAX_L, x in fp32/fp16/bf16, no double-precision filter."""
    return (
        x.shape[1] <= DIRECT_MAX_L
        and x.dtype in DIRECT_DTYPES
        and not any(t.dtype in _DOUBLE for t in others)
    )
