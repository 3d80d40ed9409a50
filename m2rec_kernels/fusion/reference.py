"""PyTorch reference for gated fusion (DESIGN §2.3) — the spec the Triton kernels match.

alpha = softmax(concat(branches, -1) @ gate_weight.T + gate_bias) over the k branches;
o = sum_i alpha_i * branch_i; out = LayerNorm(residual + dropout(o)).

Math runs in float32 for float16/bfloat16 inputs (float64 stays float64, for gradcheck); the output
and the gates come back in the input dtype. Differentiable through torch autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp16/bf16/fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep_mask(
    shape, p: float, device: torch.device, seed: Optional[int] = None
) -> torch.Tensor:
    """Boolean keep-mask with P(keep) = 1 - p, from ``seed`` if given, else torch's global RNG."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    return torch.rand(shape, device=device, generator=generator) >= p


def gated_fusion_ref(
    branches: Sequence[torch.Tensor],
    residual: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    return_gates: bool = False,
    training: bool = True,
    seed: Optional[int] = None,
    keep_mask: Optional[torch.Tensor] = None,
):
    """Gated fusion in plain PyTorch (inputs assumed validated by the public ``gated_fusion``).

    ``keep_mask`` (batch, L, d) bool overrides the random dropout mask; tests use it to replay a
    mask recovered from another implementation.
    """
    out_dtype = residual.dtype
    ct = compute_dtype(out_dtype)
    xs = [b.to(ct) for b in branches]
    logits = torch.cat(xs, dim=-1) @ gate_weight.to(ct).t() + gate_bias.to(ct)
    alpha = torch.softmax(logits, dim=-1)  # (batch, L, k)
    o = sum(alpha[..., i : i + 1] * x for i, x in enumerate(xs))
    if training and dropout_p > 0.0:
        if keep_mask is None:
            keep_mask = dropout_keep_mask(o.shape, dropout_p, o.device, seed)
        o = o * keep_mask.to(ct) / (1.0 - dropout_p)
    r = residual.to(ct) + o
    out = F.layer_norm(r, (r.shape[-1],), ln_weight.to(ct), ln_bias.to(ct), eps).to(out_dtype)
    if return_gates:
        return out, alpha.to(out_dtype)
    return out
