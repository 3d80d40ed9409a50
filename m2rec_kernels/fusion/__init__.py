"""Gated fusion of k = 2 or 3 branches with residual + LayerNorm (DESIGN §2.3).

Public entry point: :func:`gated_fusion`. ``backend="torch"`` runs the reference in
``reference.py``; ``backend="triton"`` the fused kernels (``function.py``); ``"auto"`` picks Triton for
CUDA tensors and torch otherwise (see ``m2rec_kernels/_backend.py``).

Dropout follows ``torch.nn.functional.dropout``: it is applied only when ``training=True`` (the
default, like ``F.dropout``) and ``dropout_p > 0``; a module passes ``training=self.training``, so
``model.eval()`` turns it off. ``seed`` makes the mask reproducible (per backend: the torch and the
Triton paths draw different random numbers); ``seed=None`` draws a seed from torch's global RNG (as a
tensor on the inputs' device, so no device sync and nothing a compiled graph cannot hold), so
``torch.manual_seed`` makes runs repeatable. The op itself (``ops.py``, ``m2rec::gated_fusion``) takes
the seed as an argument: the same seed gives the same mask, forward and backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _library
from .._backend import resolve_backend
from .._checks import check_tensor
from .ops import GATED_FUSION
from .reference import gated_fusion_ref

__all__ = ["gated_fusion", "gated_fusion_ref"]

_OP = "gated_fusion"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(branches, residual, gate_weight, gate_bias, ln_weight, ln_bias, eps, dropout_p):
    if isinstance(branches, torch.Tensor) or not isinstance(branches, (list, tuple)):
        raise TypeError(
            f"{_OP}: branches must be a list or tuple of 2 or 3 tensors (batch, L, d), "
            f"got {type(branches).__name__}"
        )
    k = len(branches)
    if k not in (2, 3):
        raise ValueError(f"{_OP}: branches must hold 2 or 3 tensors, got {k}")
    check_tensor(_OP, "residual", residual, ndim=3)
    batch, length, d = residual.shape
    device = residual.device
    for i, b in enumerate(branches):
        check_tensor(_OP, f"branches[{i}]", b, shape=(batch, length, d), device=device)
        if b.dtype != residual.dtype:
            raise TypeError(
                f"{_OP}: branches[{i}] has dtype {b.dtype} but residual has {residual.dtype}; "
                "branches and residual must share one dtype"
            )
    # Parameters may be kept in a wider dtype than the activations (e.g. fp32 params, fp16 inputs).
    check_tensor(_OP, "gate_weight", gate_weight, shape=(k, k * d), device=device)
    check_tensor(_OP, "gate_bias", gate_bias, shape=(k,), device=device)
    check_tensor(_OP, "ln_weight", ln_weight, shape=(d,), device=device)
    check_tensor(_OP, "ln_bias", ln_bias, shape=(d,), device=device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{_OP}: eps must be a positive number, got {eps!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_OP}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return k


def gated_fusion(
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
    backend: str = "auto",
):
    """Fuse k branches with a learned softmax gate, add the residual and apply LayerNorm.

    Args:
        branches: 2 or 3 tensors (batch, L, d), all of residual's shape, dtype and device.
        residual: (batch, L, d).
        gate_weight: (k, k*d); gate_bias: (k,) — gate logits = concat(branches) @ W.T + b.
        ln_weight, ln_bias: (d,) LayerNorm affine parameters; eps its epsilon.
        dropout_p: dropout on the fused branch sum (before the residual), in [0, 1).
        return_gates: also return the gates alpha (batch, L, k).
        training: apply dropout only when True (as ``F.dropout``).
        seed: integer seed for the dropout mask; None draws one from torch's RNG.
        backend: "auto" | "torch" | "triton".

    Returns:
        out (batch, L, d) in the input dtype, or (out, alpha) with ``return_gates``.
    """
    _validate(branches, residual, gate_weight, gate_bias, ln_weight, ln_bias, eps, dropout_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{_OP}: seed must be an int or None, got {type(seed).__name__}")
    tensors = (*branches, residual, gate_weight, gate_bias, ln_weight, ln_bias)
    chosen = resolve_backend(backend, _OP, *tensors)
    if chosen == "triton" and backend == "auto":
        from .function import MAX_FUSED_DIM

        if any(t.dtype not in _TRITON_DTYPES for t in tensors) or residual.shape[-1] > MAX_FUSED_DIM:
            chosen = "torch"  # no fused kernel for float64 or very wide rows: keep the exact reference
    if chosen == "triton":
        for name, t in zip(("residual", "gate_weight", "gate_bias", "ln_weight", "ln_bias"), tensors[-5:]):
            if t.dtype not in _TRITON_DTYPES:
                raise TypeError(
                    f"{_OP}: backend='triton' supports float16, bfloat16 and float32; {name} is {t.dtype} "
                    "(use backend='torch' for float64)"
                )
        from .function import _block_sizes

        _block_sizes(residual.shape[-1])  # names the width limit of the fused kernels before any launch
    p = float(dropout_p) if training else 0.0
    seed_tensor = None
    if p > 0.0:
        if seed is None:  # drawn from torch's RNG on the inputs' device: no sync, traceable
            seed_tensor = torch.randint(0, 2**31 - 1, (1,), device=residual.device)
        else:
            value = int(seed) % (2**31 - 1) if chosen == "triton" else int(seed)
            seed_tensor = torch.tensor([value], dtype=torch.int64, device=residual.device)
    out, gates, _, _ = _library.call(GATED_FUSION, list(branches), residual, gate_weight,
                                     gate_bias, ln_weight, ln_bias, float(eps), p, seed_tensor, chosen)
    if return_gates:
        return out, gates.to(residual.dtype)
    return out
