"""Host side of the compiled causal conv1d on CPU (``backend="cpu"``): the autograd Function over
``torch.ops.m2rec_conv_cpu`` (``scan/csrc/conv_ops.cpp``, ``conv_isa.cpp``).

The kernels live in the compiled scan's library (built by set-up, ``m2rec_kernels/scan/cpu_build.py``)
and use its ISA variant (``m2rec_kernels.scan.cpu``: the same knobs, the same single warning when the
library is missing). They read time-major inputs in place — x of shape (batch, dim, L) with unit
stride along dim, the transpose of a (batch, L, dim) tensor — and return outputs and gradients in the
input's layout (other layouts are copied to time-major first). fp16/bf16 inputs are computed in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..scan.cpu import _isa_code, library_op_unavailable

#: dtypes the compiled kernel takes (computed in fp32); fp64 stays on the reference.
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.compiler.assume_constant_result  # loaded once per process: torch.compile takes the answer as given
def cpu_conv_unavailable() -> Optional[str]:
    """None when ``backend="cpu"`` can run the compiled conv here, else the reason."""
    return library_op_unavailable("m2rec_conv_cpu", "forward", "conv1d kernels")


class CausalConv1dCpuFn(torch.autograd.Function):
    """The backward recomputes the pre-activation from x (nothing but the inputs is saved)."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, isa):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu, ctx.isa = silu, isa
        return torch.ops.m2rec_conv_cpu.forward(x, weight, bias, silu, isa)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.m2rec_conv_cpu.backward(x, weight, bias, ctx.silu, dy, ctx.isa)
        return dx, dweight, (dbias if bias is not None else None), None, None


def causal_conv1d_cpu(x, weight, bias, silu: bool, isa: Optional[str] = None):
    """The compiled conv (inputs already validated by the public op). ``isa`` overrides the variant."""
    return CausalConv1dCpuFn.apply(x, weight, bias, silu, _isa_code(isa))
