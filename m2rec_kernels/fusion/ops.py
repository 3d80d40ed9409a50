"""Gated fusion's registered ops (``m2rec::gated_fusion`` and ``m2rec::gated_fusion_backward``; see
``m2rec_kernels/_library.py``). ``backend``: "torch" (the reference) or "triton" (the fused kernels).

The dropout mask is a function of ``seed`` (an int64 tensor (1,) on the inputs' device, or None
without dropout), so the op is functional: the backward regenerates the forward's mask from the same
seed (the Triton kernels from ``tl.rand(seed, element)``, the reference from a ``torch.Generator``
seeded with it), and a traced graph draws the seed as a tensor, never as a Python number.

Outputs: out (batch, L, d) in the input dtype, the gates (batch, L, k) (fp32; fp64 for fp64 inputs),
and the LayerNorm statistics mean, rstd (batch·L,) fp32 that the Triton backward reads (empty for
"torch", whose backward recomputes the reference under autograd).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _library
from .reference import compute_dtype, gated_fusion_ref


def _seed_value(seed: Optional[Tensor]) -> Optional[int]:
    return None if seed is None else int(seed.reshape(-1)[0])


def _reference(branches, residual, gate_weight, gate_bias, ln_weight, ln_bias, eps, dropout_p, seed):
    """(out, gates) of the reference with the mask of ``seed``."""
    return gated_fusion_ref(branches, residual, gate_weight, gate_bias, ln_weight, ln_bias, eps=eps,
                            dropout_p=dropout_p, return_gates=True, training=True, seed=_seed_value(seed))


def _gated_fusion(branches: list[Tensor], residual: Tensor, gate_weight: Tensor, gate_bias: Tensor,
                  ln_weight: Tensor, ln_bias: Tensor, eps: float, dropout_p: float, seed: Optional[Tensor],
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, gates, mean, rstd); see the module docstring."""
    if backend == "torch":  # (an op's kernel runs below autograd: nothing is recorded here)
        out, gates = _reference(branches, residual, gate_weight, gate_bias, ln_weight, ln_bias, eps, dropout_p, seed)
        if gates.dtype != torch.float32 and gates.dtype != torch.float64:
            gates = gates.float()
        empty = residual.new_empty(0, dtype=torch.float32)
        return out.contiguous(), gates.contiguous(), empty, empty.clone()
    from .function import gated_fusion_forward

    k = len(branches)
    out, alpha, mean, rstd = gated_fusion_forward(
        [b.contiguous() for b in branches], residual.contiguous(), gate_weight.contiguous(), gate_bias.contiguous(),
        ln_weight.contiguous(), ln_bias.contiguous(), eps, dropout_p, seed)
    return out, alpha.reshape(*residual.shape[:-1], k), mean, rstd


def _gated_fusion_fake(branches, residual, gate_weight, gate_bias, ln_weight, ln_bias, eps, dropout_p, seed,
                       backend):
    *lead, _ = residual.shape
    gates = residual.new_empty((*lead, len(branches)), dtype=compute_dtype(residual.dtype))
    empty = residual.new_empty(0, dtype=torch.float32)
    return residual.new_empty(residual.shape), gates, empty, empty.clone()


def _gated_fusion_backward(dout: Optional[Tensor], dgates: Optional[Tensor], branches: list[Tensor],
                           residual: Tensor, gate_weight: Tensor, gate_bias: Tensor, ln_weight: Tensor,
                           ln_bias: Tensor, gates: Tensor, mean: Tensor, rstd: Tensor, eps: float,
                           dropout_p: float, seed: Optional[Tensor], backend: str
                           ) -> tuple[list[Tensor], Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dbranches, dresidual, dgate_weight, dgate_bias, dln_weight, dln_bias), in the inputs' dtypes."""
    k = len(branches)
    params = (gate_weight, gate_bias, ln_weight, ln_bias)
    if backend == "torch":
        def fused(*ins):
            return _reference(list(ins[:k]), *ins[k:], eps, dropout_p, seed)

        inputs = (*branches, residual, *params)
        grads = _library.reference_vjp(fused, inputs, [True] * len(inputs),
                                       (dout, None if dgates is None else dgates.to(residual.dtype)))
        grads = [g.contiguous() for g in grads]
        return grads[:k], grads[k], grads[k + 1], grads[k + 2], grads[k + 3], grads[k + 4]
    from .function import gated_fusion_backward

    if dout is None:
        dout = torch.zeros_like(residual)
    m = residual.numel() // residual.shape[-1]
    dbranches, dres, dgw, dgb, dlw, dlb = gated_fusion_backward(
        dout.contiguous(), dgates, [b.contiguous() for b in branches], residual.contiguous(),
        gate_weight.contiguous(), ln_weight.contiguous(), gates.reshape(m, k), mean, rstd, dropout_p, seed)
    dparams = [g.to(p.dtype) for g, p in zip((dgw, dgb, dlw, dlb), params)]
    return dbranches, dres, *dparams


def _gated_fusion_backward_fake(dout, dgates, branches, residual, gate_weight, gate_bias, ln_weight, ln_bias,
                                gates, mean, rstd, eps, dropout_p, seed, backend):
    grads = [t.new_empty(t.shape) for t in (*branches, residual, gate_weight, gate_bias, ln_weight, ln_bias)]
    k = len(branches)
    return grads[:k], *grads[k:]


def _setup(ctx, inputs, output):
    branches, residual, gate_weight, gate_bias, ln_weight, ln_bias, eps, dropout_p, seed, backend = inputs
    _, gates, mean, rstd = output
    ctx.k = len(branches)
    ctx.save_for_backward(*branches, residual, gate_weight, gate_bias, ln_weight, ln_bias, gates, mean, rstd, seed)
    ctx.eps, ctx.dropout_p, ctx.backend = eps, dropout_p, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dgates, _dmean, _drstd):
    saved = ctx.saved_tensors
    k = ctx.k
    branches, (residual, gate_weight, gate_bias, ln_weight, ln_bias, gates, mean, rstd, seed) = saved[:k], saved[k:]
    dbranches, *rest = torch.ops.m2rec.gated_fusion_backward(
        dout, dgates, list(branches), residual, gate_weight, gate_bias, ln_weight, ln_bias, gates, mean, rstd,
        ctx.eps, ctx.dropout_p, seed, ctx.backend)
    return list(dbranches), *rest, None, None, None, None


gated_fusion_op = _library.register("gated_fusion", _gated_fusion, _gated_fusion_fake)
gated_fusion_backward_op = _library.register("gated_fusion_backward", _gated_fusion_backward,
                                             _gated_fusion_backward_fake)
gated_fusion_op.register_autograd(_backward, setup_context=_setup)
GATED_FUSION = torch.ops.m2rec.gated_fusion.default  # the handle public functions call (no lookups)
