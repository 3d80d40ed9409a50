"""The filters' registered ops (``m2rec::fft_filter``, ``m2rec::causal_filter`` and their backwards; see
``m2rec_kernels/_library.py``). ``backend``: "torch" (torch.fft) or "triton" (the direct Toeplitz
kernel; the public functions route there only where ``paths.direct_filter_runs``).

Both paths are ATen ops and traceable launches only, so each op's fake implementation is the op itself
run on fake tensors (the launches skipped): the fake's shapes and strides are the real ones by
construction.

* ``fft_filter(x, weight, n_fft)``: torch — the reference; its backward recomputes it under autograd.
  triton — the taps irfft(weight, n_fft) over the whole L × L matrix; its backward is the direct
  kernel's, and the taps' gradient goes back through irfft by autograd.
* ``causal_filter(x, kernel)`` returns (y, X, Kf): torch — the FFT path of ``causal_fft.py`` with the
  spectra X = rfft(x), Kf = rfft(kernel) its backward reuses; triton — the direct kernel (X, Kf empty).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _library
from . import toeplitz_function as direct
from .causal_fft import causal_fft_backward, causal_fft_forward
from .reference import as_complex_weight, fft_filter_reference


def _taps(weight: Tensor, n_fft: int) -> Tensor:
    """The time-domain taps irfft(W, n_fft) (unscaled inverse), fp32: irfft_o(rfft_o(x)·W) = x ⊛ taps."""
    return torch.fft.irfft(as_complex_weight(weight, torch.float32), n=n_fft, dim=0)


def _fft_filter(x: Tensor, weight: Tensor, n_fft: int, backend: str) -> Tensor:
    if backend == "torch":  # (an op's kernel runs below autograd: nothing is recorded here)
        return fft_filter_reference(x, weight, n_fft)
    return direct.toeplitz_filter(x, _taps(weight, n_fft), wrap=n_fft)


def _fft_filter_backward(grad: Tensor, x: Tensor, weight: Tensor, n_fft: int, need_dx: bool, need_dweight: bool,
                         backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dweight) in the inputs' dtypes and forms (a real-view weight gets a real-view gradient); an
    empty tensor for a gradient not needed."""
    if backend == "torch":
        dx, dw = _library.reference_vjp(lambda a, w: fft_filter_reference(a, w, n_fft), (x, weight),
                                        (need_dx, need_dweight), (grad,))
    else:
        with _library.autograd_inside_kernel():
            w = weight.detach().requires_grad_(need_dweight)
            taps = _taps(w, n_fft)
            dx, dtaps = direct.direct_filter_backward(grad, x, taps.detach(), n_fft, need_dx, need_dweight)
            dw = torch.autograd.grad(taps, w, dtaps)[0] if need_dweight else None
        dx = None if dx is None else dx.to(x.dtype)
    return _present(dx, x), _present(dw, x)


def _present(g, like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32) if g is None else g.contiguous()


def _setup_fft(ctx, inputs, output):
    x, weight, n_fft, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.n_fft, ctx.backend = n_fft, backend


def _backward_fft(ctx, grad):
    x, weight = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx, dw = torch.ops.m2rec.fft_filter_backward(grad, x, weight, ctx.n_fft, need_dx, need_dw, ctx.backend)
    return (dx if need_dx else None), (dw if need_dw else None), None, None


fft_filter_op = _library.register("fft_filter", _fft_filter, _fft_filter)
fft_filter_backward_op = _library.register("fft_filter_backward", _fft_filter_backward, _fft_filter_backward)
fft_filter_op.register_autograd(_backward_fft, setup_context=_setup_fft)
FFT_FILTER = torch.ops.m2rec.fft_filter.default  # the handle public functions call (no lookups)


def _causal_filter(x: Tensor, kernel: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "torch":
        return causal_fft_forward(x, kernel)
    empty = x.new_empty(0, dtype=torch.float32)
    return direct.toeplitz_filter(x, kernel.float()), empty, empty.clone()


def _causal_filter_backward(grad: Tensor, x: Tensor, kernel: Tensor, spec_x: Tensor, spec_k: Tensor,
                            need_dx: bool, need_dkernel: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dkernel) in the inputs' dtypes; an empty tensor for a gradient not needed."""
    if backend == "torch":
        dx, dk = causal_fft_backward(grad, x, kernel, spec_x, spec_k, need_dx, need_dkernel)
    else:
        dx, dk = direct.direct_filter_backward(grad, x, kernel.float(), 0, need_dx, need_dkernel)
        dx = None if dx is None else dx.to(x.dtype)
        dk = None if dk is None else dk.to(kernel.dtype)
    return (x.new_empty(0, dtype=torch.float32) if dx is None else dx,
            x.new_empty(0, dtype=torch.float32) if dk is None else dk)


def _setup_causal(ctx, inputs, output):
    x, kernel, backend = inputs
    _, spec_x, spec_k = output
    ctx.save_for_backward(x, kernel, spec_x, spec_k)
    ctx.backend = backend


def _backward_causal(ctx, grad, _dspec_x, _dspec_k):
    x, kernel, spec_x, spec_k = ctx.saved_tensors
    need_dx, need_dk = ctx.needs_input_grad[:2]
    dx, dk = torch.ops.m2rec.causal_filter_backward(grad, x, kernel, spec_x, spec_k, need_dx, need_dk, ctx.backend)
    return (dx if need_dx else None), (dk if need_dk else None), None


causal_filter_op = _library.register("causal_filter", _causal_filter, _causal_filter)
causal_filter_backward_op = _library.register("causal_filter_backward", _causal_filter_backward,
                                              _causal_filter_backward)
causal_filter_op.register_autograd(_backward_causal, setup_context=_setup_causal)
CAUSAL_FILTER = torch.ops.m2rec.causal_filter.default
