"""Host side of the dense-DFT Triton filter: launch wrapper and the autograd Function (DESIGN §9).
Not routed by ``fft_filter`` any more (``paths.py``); called as ``fft_filter_triton`` directly.

Backward reuses the forward kernel. With G = rfft_ortho(dy) (the kernel's phase-1 spectrum of dy):
    dx = irfft_ortho(G · conj(W))            (the same filter with the conjugate weight)
    dW = c_f · Σ_b conj(X_b) · G_b           (X_b: the forward spectrum, kept from the forward pass)
The kernel writes c_f·conj(X_b)·G_b per batch row; the sum over the batch is a deterministic torch sum.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton

from .._backend import triton_interpreter_enabled
from .dft import dft_matrices
from .kernels import dft_filter_kernel

# Longest transform the dense DFT takes (its matrices hold ~4·L·n_fft/2 fp32 values, 2 MiB at 512/1024).
# The public op no longer routes here: the direct Toeplitz kernel does at most half the multiply-adds
# at any n_fft >= L (see paths.py); this kernel stays, tested, for a GPU comparison.
MAX_N_FFT = 1024
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_supports(x: torch.Tensor, weight: torch.Tensor, n_fft: int) -> bool:
    """Whether the dense-DFT kernel handles these inputs
    (n_fft <= MAX_N_FFT; x fp32/fp16/bf16; weight not double precision)."""
    return (
        n_fft <= MAX_N_FFT
        and x.dtype in KERNEL_DTYPES
        and weight.dtype not in (torch.float64, torch.complex128)
    )


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(v, 1))))


def _tiles(L: int, n_freq: int, d: int) -> dict:
    """Tiles for the interpreter (one config, as large as the tiny test shapes need: fewer programs
    and loop steps). Every tl.dot dimension >= 16 and a power of two; edges are masked."""
    return dict(
        BLOCK_T=_pow2_clamp(L, 16, 64),
        BLOCK_F=_pow2_clamp(n_freq, 16, 64),
        BLOCK_D=_pow2_clamp(d, 16, 64),
        num_warps=4,
    )


# Compiled (CUDA) launches autotune over these, keyed on the sizes that set the loop trip counts.
# num_stages 1: compiled for sm_90 (Triton 3.9), every "ieee" config spilled registers at the default
# num_stages 3 (48 B at 32/32/16 up to 1.8 KB forward / 3.7 KB backward at 64/64/16), none at num_stages 1;
# these two are the cheapest per multiply-add there (0.042-0.054 warp instructions, forward and
# backward flags; 80 and 104 registers; 16 and 24 KiB shared memory). Two configs keep the compile
# cost on a lent GPU small.
GPU_CONFIGS = [
    triton.Config({"BLOCK_T": 32, "BLOCK_F": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_T": 64, "BLOCK_F": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1),
]
_tuned_kernels: dict = {}


def _tuned_kernel(configs=None):
    """dft_filter_kernel autotuned over ``configs`` (default GPU_CONFIGS); built once per config list.
    Every launch overwrites all its outputs, so the autotuner's repeated runs are harmless."""
    configs = GPU_CONFIGS if configs is None else configs
    key = id(configs)
    if key not in _tuned_kernels:
        _tuned_kernels[key] = triton.autotune(configs=configs, key=["L", "F", "D", "PRECISION"])(dft_filter_kernel)
    return _tuned_kernels[key]


def _use_autotune(x: torch.Tensor) -> bool:
    return x.is_cuda and not triton_interpreter_enabled()


def _precision(x: torch.Tensor) -> str:
    # fp32 tl.dot is TF32 on NVIDIA unless told otherwise: follow torch's matmul flag, default exact
    return "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def weight_real_view(weight: torch.Tensor) -> torch.Tensor:
    """Weight as a real (F, d, 2) fp32 tensor the kernel reads (complex64 -> its real view)."""
    if weight.is_complex():
        return torch.view_as_real(weight.to(torch.complex64))
    return weight.to(torch.float32)


def launch_dft_filter(
    x: torch.Tensor,
    w_real: torch.Tensor,
    n_fft: int,
    *,
    conj_weight: bool = False,
    saved_spectrum: Optional[torch.Tensor] = None,
    write_y: bool = True,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Run the kernel on x (B, L, d). Returns (y or None, spectrum (B, 2, F, d) fp32,
    per-row weight gradient (B, F, d, 2) fp32 or None — the latter when ``saved_spectrum`` is given)."""
    B, L, d = x.shape
    n_freq = n_fft // 2 + 1
    mats = dft_matrices(L, n_fft, x.device)
    spec = torch.empty(B, 2, n_freq, d, device=x.device, dtype=torch.float32)
    y = torch.empty(B, L, d, device=x.device, dtype=x.dtype) if write_y else None
    with_dw = saved_spectrum is not None
    dw = torch.empty(B, n_freq, d, 2, device=x.device, dtype=torch.float32) if with_dw else None
    if B == 0 or d == 0:
        if with_dw:
            dw.zero_()
        return y, spec, dw
    y_arg = y if write_y else x
    args = (
        x, w_real, y_arg, spec, saved_spectrum if with_dw else spec, dw if with_dw else spec,
        mats.cr, mats.ci, mats.ar, mats.ai,
        L, d, n_freq, n_fft,
        x.stride(0), x.stride(1), x.stride(2),
        w_real.stride(0), w_real.stride(1), w_real.stride(2),
        y_arg.stride(0), y_arg.stride(1), y_arg.stride(2),
    )
    flags = dict(CONJ_W=conj_weight, WITH_DW=with_dw, WRITE_Y=write_y, PRECISION=_precision(x))
    # launch on the tensors' GPU, not the current one (and never touch torch.cuda for CPU tensors)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if _use_autotune(x):
            _tuned_kernel()[lambda meta: (B, triton.cdiv(d, meta["BLOCK_D"]))](*args, **flags)
        else:
            tiles = _tiles(L, n_freq, d)
            dft_filter_kernel[(B, triton.cdiv(d, tiles["BLOCK_D"]))](*args, **flags, **tiles)
    return y, spec, dw


class FFTFilterTriton(torch.autograd.Function):
    """y = fft_filter(x, weight, n_fft) through the dense-DFT kernel; gradients for x and weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, n_fft: int) -> torch.Tensor:
        w_real = weight_real_view(weight)
        y, spec, _ = launch_dft_filter(x, w_real, n_fft)
        ctx.save_for_backward(spec, w_real)
        ctx.n_fft = n_fft
        ctx.weight_dtype = weight.dtype
        ctx.weight_is_complex = weight.is_complex()
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        spec, w_real = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return None, None, None
        dx, _, dw_rows = launch_dft_filter(
            grad_y, w_real, ctx.n_fft, conj_weight=True,
            saved_spectrum=spec if need_dw else None, write_y=need_dx,
        )
        dw = None
        if need_dw:
            dw = dw_rows.sum(dim=0)  # deterministic reduction over the batch
            dw = torch.view_as_complex(dw).to(ctx.weight_dtype) if ctx.weight_is_complex else dw.to(ctx.weight_dtype)
        return dx, dw, None


def fft_filter_triton(x: torch.Tensor, weight: torch.Tensor, n_fft: int) -> torch.Tensor:
    """fft_filter through the dense-DFT kernel (inputs checked by the caller, as ``fft_filter`` does)."""
    if not triton_supports(x, weight, n_fft):
        raise ValueError(f"fft_filter_triton: the dense-DFT kernel takes n_fft <= {MAX_N_FFT} and x in "
                         f"fp32/fp16/bf16 with a single-precision weight; got n_fft = {n_fft}, x {x.dtype}, "
                         f"weight {weight.dtype}")
    return FFTFilterTriton.apply(x, weight, n_fft)
