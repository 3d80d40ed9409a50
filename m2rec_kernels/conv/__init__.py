"""Causal depthwise conv1d (+ SiLU): the short convolution in front of Mamba's selective scan.

``causal_conv1d(x, weight, bias=None, activation=None, backend="auto")`` with x (batch, dim, L),
weight (dim, K), bias (dim,):

    y[b, c, t] = act(bias[c] + sum_{k < K} weight[c, k] · x[b, c, t - (K - 1) + k])   (zeros before t = 0)

— Dao-AILab/causal-conv1d's ``causal_conv1d_fn`` semantics (activation None or "silu"/"swish").

Backends: "torch" runs the reference (``reference.py``: ``F.conv1d``); "cpu" the compiled kernel
(``cpu.py``, sources in ``m2rec_kernels/scan/csrc/conv_*``), vectorised along channels over
time-major inputs (x with unit stride along dim, as the transpose of a (batch, L, dim) tensor), which
it reads in place; its output and x's gradient come back in x's layout. "auto" picks the compiled
kernel for CPU tensors when it is built, the reference otherwise (on CUDA: cuDNN through F.conv1d —
there is no Triton kernel for this op); "triton" runs the reference too. float64 stays on the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _library
from .._backend import resolve_backend
from .._checks import check_tensor
from .cpu import CPU_DTYPES, cpu_conv_unavailable
from .ops import CAUSAL_CONV1D
from .reference import causal_conv1d_ref

__all__ = ["causal_conv1d", "causal_conv1d_ref"]

_OP = "causal_conv1d"
ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, backend: str = "auto") -> torch.Tensor:
    """Causal depthwise conv1d of x (batch, dim, L) with weight (dim, K) and bias (dim,), then SiLU
    when ``activation`` is "silu" (or "swish"). Returns (batch, dim, L) in x's dtype. Gradients flow
    to x, weight and bias."""
    check_tensor(_OP, "x", x, ndim=3)
    batch, dim, L = x.shape
    check_tensor(_OP, "weight", weight, ndim=2, device=x.device)
    if weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"{_OP}: weight must have shape (dim={dim}, K) with K >= 1 taps, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(_OP, "bias", bias, shape=(dim,), device=x.device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    silu = activation is not None
    chosen = resolve_backend(backend, _OP, x, weight, cpu_kernel=cpu_conv_unavailable)
    if chosen == "cpu":
        named = dict(x=x, weight=weight, bias=bias)
        wide = [name for name, t in named.items() if t is not None and t.dtype not in CPU_DTYPES]
        if wide:
            if backend == "cpu":
                raise TypeError(f"{_OP}: backend='cpu' supports float16, bfloat16 and float32; {wide[0]} is "
                                f"{str(named[wide[0]].dtype).replace('torch.', '')} (use backend='torch' for float64)")
            chosen = "torch"
    else:
        chosen = "torch"  # no Triton kernel: the reference (cuDNN through F.conv1d on CUDA)
    return _library.call(CAUSAL_CONV1D, x, weight, bias, silu, chosen)
