"""Host side of the Triton selective scan: launch wrappers and the autograd Function.

Block sizes come from a small heuristic instead of autotune: the backward's partial-sum buffers are
sized by the channel block, so the block must be known before the launch, and the state update
must never be rerun on a live state (which autotuning would do).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
from torch.autograd.function import once_differentiable

from .._backend import triton_interpreter_enabled
from .kernels import selective_scan_bwd_kernel, selective_scan_fwd_kernel, selective_state_update_kernel


def _block_n(N: int) -> int:
    return triton.next_power_of_2(N)


# Channels per program under the interpreter, where a program costs about the same whatever its
# size: large blocks mean few programs. Tests lower it to exercise several channel blocks (the
# partial-sum reductions).
INTERPRETER_BLOCK_D = 64


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fwd_config_gpu(batch: int, dim: int, N: int, sms: int):
    """(BLOCK_D, num_warps) of the forward on a GPU with ``sms`` SMs. The GPU choices come from
    compiling for sm_90 and reading the register use (no GPU was available to time them): 32
    channels × N <= 128 states on 4 warps stays under 255 registers without spilling; smaller blocks
    (down to 8) when batch × channel blocks would leave SMs idle — the scan is sequential in time, so
    those are its only parallelism."""
    block_n = _block_n(N)
    block = 32 if block_n <= 128 else 16
    warps = 4 if block_n <= 128 else 8
    while block > 8 and batch * triton.cdiv(dim, block) < 2 * sms:
        block //= 2
    return block, warps


def _fwd_config(batch: int, dim: int, N: int, device: torch.device):
    if triton_interpreter_enabled() or device.type != "cuda":
        return INTERPRETER_BLOCK_D, 4
    return fwd_config_gpu(batch, dim, N, sm_count(device))


def bwd_config_gpu(N: int):
    """(BLOCK_D, num_warps) of the backward, which keeps ~6 state-sized tiles live: 8 channels per
    program with 1-4 warps by N compiles without spills for N <= 128 (sm_90, as above); 16 and 32
    channels spilled. Its dB/dC partial buffers are (dim / BLOCK_D, batch, N, L) fp32."""
    block_n = _block_n(N)
    return 8, (1 if block_n <= 8 else 2 if block_n <= 32 else 4 if block_n <= 128 else 8)


def _bwd_config(N: int, device: torch.device):
    if triton_interpreter_enabled() or device.type != "cuda":
        return INTERPRETER_BLOCK_D, 4
    return bwd_config_gpu(N)


def _chunk(L: int) -> int:
    """Checkpoint spacing: memory is (L/CHUNK + CHUNK) states per (sequence, channel), least near
    CHUNK = sqrt(L); a power of two between 8 and 64 keeps the number of compiled variants small."""
    return max(8, min(64, triton.next_power_of_2(int(math.isqrt(max(L, 1))))))


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, store_last, store_ckpt):
    batch, dim, L = u.shape
    N = A.shape[1]
    (BLOCK_D, num_warps), BLOCK_N, CHUNK = _fwd_config(batch, dim, N, u.device), _block_n(N), _chunk(L)
    n_chunks = triton.cdiv(L, CHUNK)
    alloc = torch.zeros if batch * dim == 0 else torch.empty  # the kernel writes all of them
    out = torch.empty_like(u)
    last = alloc(batch, dim, N, device=u.device, dtype=torch.float32) if store_last else None
    ckpt = alloc(batch, max(n_chunks, 1), N, dim, device=u.device, dtype=torch.float32) if store_ckpt else None
    if batch * dim == 0:
        return out, last, ckpt  # nothing to launch (an empty grid is an error)
    dummy = u  # stands in for absent optional pointers (never read: the flag is off)
    grid = (batch, triton.cdiv(dim, BLOCK_D))
    selective_scan_fwd_kernel[grid](
        u, delta, A.t().contiguous(), B, C,
        dummy if D is None else D, dummy if z is None else z,
        dummy if delta_bias is None else delta_bias, dummy if lengths is None else lengths,
        out, dummy if last is None else last, dummy if ckpt is None else ckpt,
        dim, L, N, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_LENGTHS=lengths is not None,
        STORE_LAST=store_last, STORE_CKPT=store_ckpt,
        CHUNK=CHUNK, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, num_warps=num_warps,
    )
    return out, last, ckpt


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, lengths):
        u, delta, A, B, C, D, z, delta_bias, lengths = map(_contig, (u, delta, A, B, C, D, z, delta_bias, lengths))
        needs_grad = any(ctx.needs_input_grad)
        out, last, ckpt = _scan_forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths,
            store_last=return_last_state, store_ckpt=needs_grad,
        )
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, lengths, ckpt)
            ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        if return_last_state:
            return out, last
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, lengths, ckpt = ctx.saved_tensors
        batch, dim, L = u.shape
        N = A.shape[1]
        if dout is None:
            dout = torch.zeros_like(u)
        dout = dout.contiguous()
        dlast = None if dlast is None else dlast.contiguous()
        (BLOCK_D, num_warps), BLOCK_N, CHUNK = _bwd_config(N, u.device), _block_n(N), _chunk(L)
        n_chunks = triton.cdiv(L, CHUNK)
        n_dblocks = triton.cdiv(dim, BLOCK_D)
        dev, f32 = u.device, torch.float32
        empty = batch * dim == 0  # nothing to launch (an empty grid is an error): zero partials
        alloc = torch.zeros if empty else torch.empty
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        scratch = torch.empty(batch, CHUNK, N, dim, device=dev, dtype=f32)
        dA_part = alloc(batch, N, dim, device=dev, dtype=f32)
        dB_part = alloc(n_dblocks, batch, N, L, device=dev, dtype=f32)
        dC_part = alloc(n_dblocks, batch, N, L, device=dev, dtype=f32)
        dD_part = alloc(batch, dim, device=dev, dtype=f32) if D is not None else None
        dbias_part = alloc(batch, dim, device=dev, dtype=f32) if delta_bias is not None else None
        dummy = dA_part  # stands in for absent optional pointers (never touched: the flag is off)
        if not empty:
            selective_scan_bwd_kernel[(batch, n_dblocks)](
                u, delta, A.t().contiguous(), B, C,
                dummy if D is None else D, dummy if z is None else z,
                dummy if delta_bias is None else delta_bias, dummy if lengths is None else lengths,
                dout, dummy if dlast is None else dlast, ckpt, scratch,
                du, ddelta, dummy if dz is None else dz,
                dA_part, dB_part, dC_part,
                dummy if dD_part is None else dD_part, dummy if dbias_part is None else dbias_part,
                batch, dim, L, N, n_chunks,
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=ctx.delta_softplus, HAS_LENGTHS=lengths is not None, HAS_DLAST=dlast is not None,
                CHUNK=CHUNK, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, num_warps=num_warps,
            )
        # Deterministic host reductions of the per-program partials (fixed order, no atomics).
        dA = dA_part.sum(0).t().contiguous().to(A.dtype)
        dB = dB_part.sum(0).to(B.dtype)
        dC = dC_part.sum(0).to(C.dtype)
        dD = None if D is None else dD_part.sum(0).to(D.dtype)
        dbias = None if delta_bias is None else dbias_part.sum(0).to(delta_bias.dtype)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None


def selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, lengths):
    """Fused Triton selective scan (inputs already validated by the public op)."""
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, lengths)


def selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One fused step; ``state`` is updated in place (through a contiguous copy if it is strided)."""
    batch, dim, N = state.shape
    work = state if state.is_contiguous() else state.contiguous()
    x, dt, A, B, C, D, z, dt_bias = map(_contig, (x, dt, A, B, C, D, z, dt_bias))
    out = torch.empty_like(x)
    BLOCK_N = _block_n(N)
    # No occupancy search here: one step is memory-bound and tiny; fewer, fuller programs suffice.
    BLOCK_D = INTERPRETER_BLOCK_D if triton_interpreter_enabled() else max(16, min(64, 4096 // BLOCK_N))
    dummy = x
    selective_state_update_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        work, x, dt, A, B, C,
        dummy if D is None else D, dummy if z is None else z, dummy if dt_bias is None else dt_bias,
        out, dim, N,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
    )
    if work is not state:
        state.copy_(work)
    return out
