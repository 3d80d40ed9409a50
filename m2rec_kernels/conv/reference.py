"""PyTorch reference of the causal depthwise conv1d (+ SiLU) in front of Mamba's scan — the spec the
compiled CPU kernel matches.

    y[b, c, t] = act(bias[c] + sum_{k < K} weight[c, k] · x[b, c, t - (K - 1) + k]),   x = 0 before t = 0

i.e. ``F.conv1d`` with K - 1 zeros of left padding, one group per channel, the first L outputs kept:
mamba_ssm's slow path (``self.conv1d(x)[..., :seqlen]``) and ``causal_conv1d_ref`` of
Dao-AILab/causal-conv1d, whose interface (x (batch, dim, L), weight (dim, K)) this op follows.
Computed in fp32 (fp64 when any input is fp64); the output comes back in x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      silu: bool = False) -> torch.Tensor:
    """Inputs assumed valid (the public ``causal_conv1d`` checks them). Differentiable by autograd."""
    dtype = compute_dtype(x, weight, bias)
    L, K = x.shape[2], weight.shape[1]
    y = F.conv1d(x.to(dtype), weight.to(dtype).unsqueeze(1), None if bias is None else bias.to(dtype),
                 padding=K - 1, groups=x.shape[1])[..., :L]
    return (F.silu(y) if silu else y).to(x.dtype)
