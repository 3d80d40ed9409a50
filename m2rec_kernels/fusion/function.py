"""Host wrappers for the gated fusion Triton kernels (``kernels.py``); the op that calls them, with its
autograd formula, is ``ops.py``."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import triton

from .._backend import triton_interpreter_enabled
from .._library import traceable_kernel
from .kernels import _gated_fusion_bwd_kernel, _gated_fusion_fwd_kernel

# Launches that tracing understands (m2rec_kernels/_library.py).
_gated_fusion_fwd_kernel, _gated_fusion_bwd_kernel = map(traceable_kernel, (_gated_fusion_fwd_kernel,
                                                                            _gated_fusion_bwd_kernel))

# A tile holds BLOCK_M rows of the padded width in registers for each of the k + 1 inputs; beyond
# this width the row no longer fits and the public op must use the torch backend.
MAX_FUSED_DIM = 8192


def _block_sizes(d: int):
    block_d = triton.next_power_of_2(d)
    if block_d > MAX_FUSED_DIM:
        raise ValueError(
            f"gated_fusion: backend='triton' supports d <= {MAX_FUSED_DIM} (one row per tile), got d = {d}; "
            "use backend='torch'"
        )
    # about 4K fp32 elements per input tile; at least one row, at most 16
    block_m = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_d * block_m <= 4096 else 8
    return block_m, block_d, num_warps


def _check_numel(m: int, d: int):
    # element indices (pointer offsets and the dropout RNG counter) are 32-bit in the kernels
    if m * d >= 2**31:
        raise ValueError(
            f"gated_fusion: backend='triton' supports fewer than 2**31 elements per input, got "
            f"{m} rows x {d}; split the batch or use backend='torch'"
        )


def _on_device(t: torch.Tensor):
    """Launch on t's GPU (not the current one); nothing to do for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def gated_fusion_forward(branches: List[torch.Tensor], residual, gate_weight, gate_bias, ln_weight, ln_bias,
                         eps: float, dropout_p: float, seed: Optional[torch.Tensor]):
    """Launch the forward kernel on contiguous inputs. Returns out (input shape/dtype) and the fp32
    saved tensors alpha (M, k), mean (M,), rstd (M,) with M = batch * L. ``seed``: an int64 tensor (1,)
    on the inputs' device, read by the kernel when dropout_p > 0."""
    k = len(branches)
    d = residual.shape[-1]
    m = residual.numel() // d
    block_m, block_d, num_warps = _block_sizes(d)
    _check_numel(m, d)
    xs = [b.reshape(m, d) for b in branches]
    out = torch.empty_like(residual)
    alpha = torch.empty(m, k, device=residual.device, dtype=torch.float32)
    mean = torch.empty(m, device=residual.device, dtype=torch.float32)
    rstd = torch.empty(m, device=residual.device, dtype=torch.float32)
    has_dropout = dropout_p > 0.0
    grid = (triton.cdiv(m, block_m),)
    with _on_device(residual):
        _gated_fusion_fwd_kernel[grid](
            xs[0], xs[1], xs[2] if k == 3 else xs[0], residual.reshape(m, d),
            gate_weight, gate_bias, ln_weight, ln_bias,
            out, alpha, mean, rstd,
            m, d, eps, dropout_p, 1.0 / (1.0 - dropout_p), alpha if seed is None else seed,
            K=k, HAS_DROPOUT=has_dropout, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return out, alpha, mean, rstd


def bwd_programs_gpu(n_tiles: int, sms: int) -> int:
    """Programs for the backward on a GPU with ``sms`` SMs: each loops over tiles, so partial
    buffers stay small."""
    return max(1, min(n_tiles, 4 * sms))


def _programs_for(n_tiles: int, device: torch.device) -> int:
    if device.type == "cuda" and not triton_interpreter_enabled():
        return bwd_programs_gpu(n_tiles, torch.cuda.get_device_properties(device).multi_processor_count)
    return n_tiles  # the interpreter pays per loop step, not per program


def gated_fusion_backward(dout, dgates, branches, residual, gate_weight, ln_weight, alpha, mean, rstd,
                          dropout_p: float, seed: Optional[torch.Tensor]):
    """Launch the backward kernel; returns (dbranches list, dresidual, dgate_weight, dgate_bias,
    dln_weight, dln_bias) with parameter gradients in fp32 (summed on the host in a fixed order)."""
    k = len(branches)
    d = residual.shape[-1]
    m = residual.numel() // d
    block_m, block_d, num_warps = _block_sizes(d)
    n_tiles = triton.cdiv(m, block_m)
    programs = _programs_for(n_tiles, residual.device)
    tiles_per_program = triton.cdiv(n_tiles, programs)
    programs = triton.cdiv(n_tiles, tiles_per_program)
    dev = residual.device
    f32 = dict(device=dev, dtype=torch.float32)
    xs = [b.reshape(m, d) for b in branches]
    dxs = [torch.empty_like(x) for x in xs]
    dres = torch.empty_like(residual)
    dw_part = torch.zeros(programs, k * k * d, **f32)
    dbg_part = torch.zeros(programs, k, **f32)
    dlw_part = torch.zeros(programs, d, **f32)
    dlb_part = torch.zeros(programs, d, **f32)
    dout = dout.reshape(m, d)
    has_dgates = dgates is not None
    dgates = dgates.reshape(m, k).float().contiguous() if has_dgates else alpha
    with _on_device(residual):
        _gated_fusion_bwd_kernel[(programs,)](
            xs[0], xs[1], xs[2] if k == 3 else xs[0], residual.reshape(m, d), gate_weight, ln_weight,
            alpha, mean, rstd,
            dout, dgates,
            dxs[0], dxs[1], dxs[2] if k == 3 else dxs[0], dres.reshape(m, d),
            dw_part, dbg_part, dlw_part, dlb_part,
            m, d, tiles_per_program, dropout_p, 1.0 / (1.0 - dropout_p), alpha if seed is None else seed,
            K=k, HAS_DROPOUT=dropout_p > 0.0, HAS_DGATES=has_dgates,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    shape = residual.shape
    return ([dx.reshape(shape) for dx in dxs], dres,
            dw_part.sum(0).reshape(k, k * d), dbg_part.sum(0), dlw_part.sum(0), dlb_part.sum(0))
