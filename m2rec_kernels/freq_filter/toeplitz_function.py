"""Host side of the direct (Toeplitz) filter: tile choice, launches and the backward's launches (the op
that calls them, with its autograd formula, is ``ops.py``).

Forward and backward of y = T_k·x (``toeplitz_kernels.py``):
    dx = T_kᵀ·dy                       (the same kernel with ANTI: the anti-causal product)
    dk[j] = Σ_b Σ_t dy[b, t]·x[b, t − j]   (``toeplitz_corr_kernel``; partial rows summed here, in a fixed
                                            order, so the result is deterministic)
With WRAP = n (a general spectral weight, taps = irfft(W, n)), lag j ≡ t − s (mod n) collects both the
causal correlation (j < L) and the anti-causal one (n − j < L), i.e. corr(x, dy) mirrored.

Tiles are fixed per batch size rather than autotuned (each compiled variant costs GPU time, and the
static report picks them): every config below compiles for sm_90 without spills at num_stages 1
(tests/test_filter_sm90.py).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton

from .._library import traceable_kernel
from .toeplitz_kernels import toeplitz_corr_kernel, toeplitz_filter_kernel

# Launches that tracing understands (m2rec_kernels/_library.py).
toeplitz_corr_kernel, toeplitz_filter_kernel = map(traceable_kernel, (toeplitz_corr_kernel, toeplitz_filter_kernel))

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Tiles(NamedTuple):
    block_t: int    # output steps per program (also the contraction tile and the correlation band)
    block_b: int    # batch rows per program: the dot's N (forward) or K (correlation) dimension
    num_warps: int


def tiles_for(B: int, L: int) -> Tiles:
    """Static choice (sm_90 report): 32-step tiles (16 for L <= 16), the batch block the next power of
    two of B clamped to [16, 64] — every tl.dot dimension must be >= 16 — and 4 warps, 2 for 16 rows."""
    block_t = 16 if L <= 16 else 32
    block_b = max(16, min(64, triton.next_power_of_2(max(B, 1))))
    return Tiles(block_t, block_b, 4 if block_b >= 32 else 2)


#: every tile choice ``tiles_for`` can make (the configurations the sm_90 compile test checks)
HOST_TILES = tuple(sorted({tiles_for(B, L) for B in (1, 17, 33) for L in (16, 17)}))


def _precision(x: torch.Tensor) -> str:
    # fp32 tl.dot is TF32 on NVIDIA unless told otherwise: follow torch's matmul flag, default exact
    return "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _on_device(x: torch.Tensor):
    # launch on the tensors' GPU, not the current one (and never touch torch.cuda for CPU tensors)
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def toeplitz_filter(x: torch.Tensor, taps: torch.Tensor, *, anti: bool = False, wrap: int = 0) -> torch.Tensor:
    """y (B, L, d) in x's dtype: y[t] = Σ_s taps[t − s]·x[s] over 0 <= t − s < K (``anti``: the transpose;
    ``wrap`` = n > 0: lags mod n over the whole L × L matrix). ``taps`` (K, d) fp32."""
    B, L, d = x.shape
    y = torch.empty(B, L, d, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    # taps gathered along the lag: channel-major storage keeps a tile's taps in a few sectors
    k_t = taps.t().contiguous()
    tiles = tiles_for(B, L)
    grid = (d, triton.cdiv(L, tiles.block_t), triton.cdiv(B, tiles.block_b))
    with _on_device(x):
        toeplitz_filter_kernel[grid](
            x, k_t, y, B, L, taps.shape[0], wrap,
            x.stride(0), x.stride(1), x.stride(2),
            k_t.stride(1), k_t.stride(0),
            y.stride(0), y.stride(1), y.stride(2),
            ANTI=anti, WRAP=wrap > 0, PRECISION=_precision(x),
            BLOCK_T=tiles.block_t, BLOCK_S=tiles.block_t, BLOCK_B=tiles.block_b,
            num_warps=tiles.num_warps, num_stages=1,
        )
    return y


def toeplitz_corr(a: torch.Tensor, v: torch.Tensor, n_lags: int) -> torch.Tensor:
    """(n_lags, d) fp32: out[j] = Σ_b Σ_t a[b, t]·v[b, t − j] (zero for j >= L)."""
    B, L, d = a.shape
    out = torch.zeros(n_lags, d, device=a.device, dtype=torch.float32)
    if B == 0 or L == 0 or d == 0:
        return out
    tiles = tiles_for(B, L)
    P = tiles.block_t
    lag_blocks = triton.cdiv(min(n_lags, L), P)
    # band q holds lags q·P .. (q+1)·P − 1 and spills the block below: one band past the last block
    bands = min(triton.cdiv(L, P), lag_blocks + 1)
    chunks = triton.cdiv(B, tiles.block_b)
    part = torch.empty(chunks, bands, 2, P, d, device=a.device, dtype=torch.float32)
    with _on_device(a):
        toeplitz_corr_kernel[(d, bands, chunks)](
            a, v, part, B, L, d, bands,
            a.stride(0), a.stride(1), a.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            PRECISION=_precision(a), BLOCK_P=P, BLOCK_B=tiles.block_b,
            num_warps=tiles.num_warps, num_stages=1,
        )
    part = part.sum(dim=0)                      # over batch chunks: a fixed-order (deterministic) sum
    blocks = part[:, 0].clone()                 # (bands, P, d): each band's own lags
    blocks[:-1] += part[1:, 1]                  # plus what the band above spilled into them
    n = min(n_lags, bands * P)
    out[:n] = blocks.reshape(bands * P, d)[:n]
    return out


def direct_filter_backward(grad_y: torch.Tensor, x: torch.Tensor, taps: torch.Tensor, wrap: int,
                           need_dx: bool = True, need_dtaps: bool = True):
    """(dx or None, dtaps or None) of y = T_taps·x (see the module docstring); taps (K, d) fp32."""
    L = x.shape[1]
    dx = dtaps = None
    if need_dx:
        dx = toeplitz_filter(grad_y, taps, anti=True, wrap=wrap)
    if need_dtaps:
        if not wrap:
            dtaps = toeplitz_corr(grad_y, x, taps.shape[0])
        else:
            dtaps = torch.zeros_like(taps)
            dtaps[:L] += toeplitz_corr(grad_y, x, L)                  # lags t − s = j >= 0
            if L > 1:                                                 # lags t − s = −j ≡ n − j
                dtaps[wrap - L + 1:] += toeplitz_corr(x, grad_y, L)[1:].flip(0)
    return dx, dtaps
