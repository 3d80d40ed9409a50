"""The causal conv1d's registered ops (``m2rec::causal_conv1d`` and its backward; see
``m2rec_kernels/_library.py``). ``backend``: "torch" (the reference, ``F.conv1d``) or "cpu" (the
compiled kernel, ``torch.ops.m2rec_conv_cpu``, whose output and x's gradient follow x's layout:
time-major when x is, else contiguous).

The backward keeps nothing but the inputs (the compiled kernel recomputes the pre-activation from x;
the reference is recomputed under autograd).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _library
from ..scan.cpu import _isa_code
from .reference import causal_conv1d_ref


def _time_major(x: Tensor) -> bool:
    """The compiled kernel's layout test (csrc/conv_ops.cpp ``time_major``)."""
    return x.shape[1] <= 1 or x.stride(1) == 1


def _like_x(x: Tensor, dtype: torch.dtype) -> Tensor:
    batch, dim, L = x.shape
    if _time_major(x):
        return x.new_empty((batch, L, dim), dtype=dtype).transpose(1, 2)
    return x.new_empty((batch, dim, L), dtype=dtype)


def _isa() -> int:
    return _isa_code(None)  # the compiled scan library's variant (loads it on first use)


def _causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, backend: str) -> Tensor:
    if backend == "cpu":
        return torch.ops.m2rec_conv_cpu.forward(x, weight, bias, silu, _isa())
    return causal_conv1d_ref(x, weight, bias, silu).contiguous()


def _causal_conv1d_fake(x, weight, bias, silu, backend):
    return _like_x(x, x.dtype) if backend == "cpu" else x.new_empty(x.shape)


def _causal_conv1d_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) in the inputs' dtypes; dbias is an empty float32 tensor without a bias."""
    if backend == "cpu":
        return tuple(torch.ops.m2rec_conv_cpu.backward(x, weight, bias, silu, dy, _isa()))
    grads = _library.reference_vjp(lambda a, w, b: causal_conv1d_ref(a, w, b, silu), (x, weight, bias),
                                   (True, True, bias is not None), (dy,))
    dx, dw, db = grads
    return dx.contiguous(), dw.contiguous(), (x.new_empty(0, dtype=torch.float32) if db is None else db.contiguous())


def _causal_conv1d_backward_fake(dy, x, weight, bias, silu, backend):
    dx = _like_x(x, x.dtype) if backend == "cpu" else x.new_empty(x.shape)
    db = x.new_empty(0, dtype=torch.float32) if bias is None else bias.new_empty(bias.shape)
    return dx, weight.new_empty(weight.shape), db


def _setup(ctx, inputs, output):
    x, weight, bias, silu, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.backend = silu, backend


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.m2rec.causal_conv1d_backward(dy, x, weight, bias, ctx.silu, ctx.backend)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None), None, None


causal_conv1d_op = _library.register("causal_conv1d", _causal_conv1d, _causal_conv1d_fake)
causal_conv1d_backward_op = _library.register("causal_conv1d_backward", _causal_conv1d_backward,
                                              _causal_conv1d_backward_fake)
causal_conv1d_op.register_autograd(_backward, setup_context=_setup)
CAUSAL_CONV1D = torch.ops.m2rec.causal_conv1d.default  # the handle the public function calls
