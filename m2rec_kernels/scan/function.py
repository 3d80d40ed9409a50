"""Host side of the Triton selective scan: launch wrappers and the kernel choice (the registered ops in
``ops.py`` call them; their autograd formulas live there).

Two kernel families (DESIGN §4):

* time-parallel (``parallel_kernels.py``, mamba's CUDA design): one program per (sequence, channel),
  tiles of up to 512 steps on a GPU (``parallel_config_gpu``), a loop over states with an associative
  scan along time. It is the default.
* sequential (``kernels.py``): one program per (sequence, block of channels) walks time with all N
  states in registers. It is kept where it wins and for determinism.

The rule (``use_time_parallel``), from the sm_90 compile of both (``python -m bench.kernel_stats``;
no GPU was lent to time them): at short L the sequential forward is the cheaper in instructions
(0.41 warp instructions per element on one warp against 1.5 for the time-parallel one at L 32, whose
tile of 32 steps holds one step per thread; 0.34-0.58 at L 200-2000), but each program is one warp
walking L dependent steps of ~420 instructions, with batch × dim / 32 programs; the time-parallel
kernel runs batch × dim programs whose dependent chain is N scan passes (~45 instructions at a 16-
or 32-step tile, 117 at 256). So the sequential kernel wins only when L is short AND there are enough channels for the
time-parallel kernel to be throughput-bound: L <= SEQUENTIAL_MAX_L (32) and batch × dim >=
SEQUENTIAL_MIN_CHANNELS (4096; e.g. batch 64 × d_inner 128 at L 32: ~13.5k cycles of one warp's
issue against ~24k cycles of the whole GPU's for the parallel kernel; at batch 1 the parallel kernel
wins by spreading 128 programs over the SMs). Everything else runs time-parallel, and so do
grouped and time-invariant B/C at every L (``bc_forms.py``; the sequential backward spills 8 bytes
with them at N 32, the time-parallel kernels take them at the cost of the per-sequence form). Under
``torch.use_deterministic_algorithms(True)``, a call that needs gradients runs the sequential
kernels (whose reductions are all deterministic partial sums): the time-parallel backward adds dB
and dC with atomics.

Block sizes come from small heuristics instead of autotune: the partial-sum buffers are sized by the
blocks, so they must be known before the launch, and the state update must never be rerun on a live
state (which autotuning would do). Heuristics that depend on the GPU take its SM count, so that
``bench/kernel_stats.py`` can ask them for an H200 without one.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from .._backend import triton_interpreter_enabled
from .._library import traceable_kernel
from .kernels import selective_scan_bwd_kernel, selective_scan_fwd_kernel, selective_state_update_kernel
from .parallel_kernels import selective_scan_parallel_bwd_kernel, selective_scan_parallel_fwd_kernel

# Launches that tracing understands (m2rec_kernels/_library.py): skipped inside a fake implementation,
# recorded through wrap_triton under torch.compile on CUDA, plain launches otherwise.
(selective_scan_fwd_kernel, selective_scan_bwd_kernel, selective_state_update_kernel,
 selective_scan_parallel_fwd_kernel, selective_scan_parallel_bwd_kernel) = map(traceable_kernel, (
    selective_scan_fwd_kernel, selective_scan_bwd_kernel, selective_state_update_kernel,
    selective_scan_parallel_fwd_kernel, selective_scan_parallel_bwd_kernel))


def _block_n(N: int) -> int:
    return triton.next_power_of_2(N)


# Channels per program under the interpreter, where a program costs about the same whatever its
# size: large blocks mean few programs. Tests lower it to exercise several channel blocks (the
# partial-sum reductions).
INTERPRETER_BLOCK_D = 64

# The sequential kernels run for L <= SEQUENTIAL_MAX_L when batch × dim >= SEQUENTIAL_MIN_CHANNELS
# (module docstring); tests change them to pick either kernel.
SEQUENTIAL_MAX_L = 32
SEQUENTIAL_MIN_CHANNELS = 4096
# Longest time tile of the time-parallel kernels (mamba's chunk: 2048). Tests lower it to cross
# tile boundaries on tiny shapes.
MAX_TILE = 2048


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def use_time_parallel(batch: int, dim: int, L: int, needs_grad: bool = False, bcs=()) -> bool:
    """Whether the time-parallel kernels run this call (the rule in the module docstring).

    ``bcs``: B and C. The sequential kernels' share at short L is for B and C per sequence only: a
    grouped or time-invariant B/C runs time-parallel, where it costs nothing (sm_90: 0.39 warp
    instructions per element forward, 1.05 backward at L 2000, no spills), while the sequential
    backward spills with it (8 bytes at N 32). Under deterministic algorithms every form runs
    sequential, grouped ones on channel blocks shrunk to lie in one group (``_fit_groups``)."""
    if needs_grad and torch.are_deterministic_algorithms_enabled():
        return False
    if any(X.dim() != 3 for X in bcs):
        return True
    return not (L <= SEQUENTIAL_MAX_L and batch * dim >= SEQUENTIAL_MIN_CHANNELS)


def group_sizes(dim: int, *bcs: torch.Tensor) -> tuple:
    """dim / G of each grouped (4-D) B / C."""
    return tuple(dim // X.shape[1] for X in bcs if X.dim() == 4)


def _fit_groups(block_d: int, dim: int, B: torch.Tensor, C: torch.Tensor) -> int:
    """The sequential kernels' channel block: the largest power of two <= ``block_d`` that divides the
    channels per group of every grouped B / C, so that each block lies in one group."""
    for gs in group_sizes(dim, B, C):
        if gs > 0:
            block_d = min(block_d, gs & -gs)
    return block_d


def parallel_tile(L: int) -> int:
    return max(16, min(MAX_TILE, triton.next_power_of_2(max(L, 1))))


#: Longest time tile of the time-parallel kernels on a GPU (one warp: 16 steps per thread).
GPU_MAX_TILE = 512


def parallel_config_gpu(L: int):
    """(TILE, BLOCK_D, num_warps) of the time-parallel forward and backward on a GPU — one rule for
    both, since the backward restarts each tile from the state the forward stored at its end.

    One channel and one warp per program, and tiles of up to GPU_MAX_TILE = 512 steps: 16 consecutive
    steps per thread (8 at L 200, whose tile is 256), and L > 512 runs as several tiles with the state
    carried between them (L 2000: 4 tiles). Compiled for sm_90 (triton 3.9, ``python -m
    bench.kernel_stats``; warp instructions per (d, n, t) element of the loop over states, programs
    per SM by registers):

    ========================  ===============  ====================================
    L 2000                    forward          backward
    ========================  ===============  ====================================
    TILE 2048, 8 warps        —                2.12, 1 / SM (8 steps per thread)
    TILE 2048, 4 warps        0.44, 4 / SM     1.48, 2 / SM
    TILE 1024, 2 warps        0.47, 8 / SM     1.37, 4 / SM
    TILE 512, 1 warp (rule)   0.41, 16 / SM    1.06, 8 / SM
    TILE 256, 1 warp          0.55, 24 / SM    1.31, 12 / SM (8 steps per thread)
    ========================  ===============  ====================================

    Every choice issues (warp instructions per element) × batch·dim·N·L instructions in all (batch
    64: 8192 programs, 3.9 waves of 16 per SM for the forward, 7.8 waves of 8 for the backward), so
    the rule takes the fewest instructions per element and, among near ties, the most programs per
    SM to hide latency. More warps per tile add a combine across warps through shared memory to
    every scan; shorter tiles spend more of each scan on its steps across lanes (five shuffle rounds
    per 8 or 16 steps per thread). The backward at tile 512 needs ~230 registers (8 programs of one
    warp per SM, as many warps as the 8-warp tile it replaced, which ran one program per SM in
    lock-step); at tile 256 it fits 12 per SM but issues 23% more instructions, and the forward 33%
    more."""
    tile = min(GPU_MAX_TILE, parallel_tile(L))
    return tile, 1, 1


def _triton_version() -> tuple:
    parts = []
    for piece in triton.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


#: How the time-parallel backward runs its reverse scan (its kernel's FLIP_BY_GATHER). Triton's
#: ``associative_scan(..., reverse=True)`` flips the tile in and out; compiled for sm_90 that flip
#: is one warp shuffle per step a thread holds from triton 3.9 on, but about five before (3.6-3.8:
#: 146-266 shuffles per state at L 200-2000, ~40% of the backward's instructions). Before 3.9 the
#: kernel flips the tile itself (``parallel_kernels._flip_steps``: reshape / split / join and one
#: gather) and runs a forward scan; on 3.9 that form costs more than the native one (1.39 against
#: 1.05 warp instructions per element at L 2000), so it runs there only if set here.
FLIP_BY_GATHER = _triton_version() < (3, 9)


def thread_steps(tile: int, num_warps: int) -> int:
    """Consecutive steps each thread holds in the time-parallel kernels' tiles (their layout anchor
    makes it up to 16); the kernels' reshapes are written for it, and need a multiple of 4."""
    return max(4, min(16, tile // (32 * num_warps)))


def fwd_config_gpu(batch: int, dim: int, N: int, sms: int):
    """(BLOCK_D, num_warps) of the sequential forward on a GPU with ``sms`` SMs. One warp, one
    channel per lane, all N states of a channel in that lane's registers: the sum over N stays in
    the thread (no shared memory, no barrier; compiled for sm_90 this cut the instructions per
    element from 2.9 at BLOCK_D 16 on 4 warps); 8 warps and 16 channels beyond N = 64."""
    block_n = _block_n(N)
    if block_n <= 64:
        return 32, 1
    return 16, 8


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


def _alignment(L: int, dtype: torch.dtype, *tensors_strides) -> int:
    """ALIGN of the time-parallel kernels: the largest power of two <= 16 bytes / element size that
    divides L and every given stride (in elements), so rows start on 16-byte boundaries."""
    size = torch.empty((), dtype=dtype).element_size()
    a = max(1, 16 // size)
    values = [L] + [int(s) for s in tensors_strides]
    while a > 1 and any(v % a for v in values):
        a //= 2
    return a


def _time_strided(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t itself when its time axis (last) has unit stride — the time-parallel kernels take the other
    two strides — else a contiguous copy (z is the second half of the in_proj output: a view)."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


# ------------------------------------------------------------------------------ sequential kernels

#: A register cap for the sequential backward (None: none). It needs 168 registers at its host
#: configuration (8 channels, 2 warps: 6 programs per SM, 1.3 waves at batch 64); capped at 128
#: (8 programs per SM, one wave) it spills 128 bytes per thread (sm_90, triton 3.9), so no cap is set.
#: (``maxnreg`` is an option of the NVIDIA backend in every Triton 3.x, CUDAOptions; only 3.9 was run here.)
SEQUENTIAL_BWD_MAXNREG = None


def _sequential_bc(X: torch.Tensor, dim: int):
    """(tensor, batch stride, group stride, channels per group, form) of B or C for the sequential
    kernels: contiguous (batch, N, L) or (batch, G, N, L), or a time-invariant (dim, N) transposed
    to (N, dim) like A."""
    if X.dim() == 2:
        return X.t().contiguous(), 0, 0, 1, 2
    X = X.contiguous()
    if X.dim() == 3:
        return X, 0, 0, 1, 0
    return X, X.stride(0), X.stride(1), max(dim // X.shape[1], 1), 1


def _sequential_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, store_last, store_ckpt):
    batch, dim, L = u.shape
    N = A.shape[1]
    (BLOCK_D, num_warps), BLOCK_N, CHUNK = _fwd_config(batch, dim, N, u.device), _block_n(N), _chunk(L)
    BLOCK_D = _fit_groups(BLOCK_D, dim, B, C)
    B, s_B_b, s_B_g, B_gs, B_FORM = _sequential_bc(B, dim)
    C, s_C_b, s_C_g, C_gs, C_FORM = _sequential_bc(C, dim)
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
        dim, L, N, n_chunks, s_B_b, s_B_g, s_C_b, s_C_g, B_gs, C_gs,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_LENGTHS=lengths is not None,
        STORE_LAST=store_last, STORE_CKPT=store_ckpt,
        CHUNK=CHUNK, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, B_FORM=B_FORM, C_FORM=C_FORM, num_warps=num_warps,
    )
    return out, last, ckpt


def _sequential_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, ckpt, dout, dlast):
    batch, dim, L = u.shape
    N = A.shape[1]
    (BLOCK_D, num_warps), BLOCK_N, CHUNK = _bwd_config(N, u.device), _block_n(N), _chunk(L)
    BLOCK_D = _fit_groups(BLOCK_D, dim, B, C)
    B_in, C_in = B, C
    B, s_B_b, s_B_g, B_gs, B_FORM = _sequential_bc(B, dim)
    C, s_C_b, s_C_g, C_gs, C_FORM = _sequential_bc(C, dim)
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
    # per channel block and step, or per sequence for a time-invariant B / C (summed over time)
    dB_part = alloc(*((batch, N, dim) if B_FORM == 2 else (n_dblocks, batch, N, L)), device=dev, dtype=f32)
    dC_part = alloc(*((batch, N, dim) if C_FORM == 2 else (n_dblocks, batch, N, L)), device=dev, dtype=f32)
    dD_part = alloc(batch, dim, device=dev, dtype=f32) if D is not None else None
    dbias_part = alloc(batch, dim, device=dev, dtype=f32) if delta_bias is not None else None
    dummy = dA_part  # stands in for absent optional pointers (never touched: the flag is off)
    extra = {}
    if SEQUENTIAL_BWD_MAXNREG and dev.type == "cuda" and not triton_interpreter_enabled():
        extra["maxnreg"] = SEQUENTIAL_BWD_MAXNREG
    if not empty:
        selective_scan_bwd_kernel[(batch, n_dblocks)](
            u, delta, A.t().contiguous(), B, C,
            dummy if D is None else D, dummy if z is None else z,
            dummy if delta_bias is None else delta_bias, dummy if lengths is None else lengths,
            dout, dummy if dlast is None else dlast, ckpt, scratch,
            du, ddelta, dummy if dz is None else dz,
            dA_part, dB_part, dC_part,
            dummy if dD_part is None else dD_part, dummy if dbias_part is None else dbias_part,
            batch, dim, L, N, n_chunks, s_B_b, s_B_g, s_C_b, s_C_g, B_gs, C_gs,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_LENGTHS=lengths is not None, HAS_DLAST=dlast is not None,
            CHUNK=CHUNK, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, B_FORM=B_FORM, C_FORM=C_FORM, num_warps=num_warps,
            **extra,
        )
    # Deterministic host reductions of the per-program partials (fixed order, no atomics).
    dA = dA_part.sum(0).t()
    dB = _sequential_bc_grad(dB_part, B_in, batch, N, L)
    dC = _sequential_bc_grad(dC_part, C_in, batch, N, L)
    dD = None if D is None else dD_part.sum(0)
    dbias = None if delta_bias is None else dbias_part.sum(0)
    return du, ddelta, dz, dA, dB, dC, dD, dbias


def _sequential_bc_grad(part: torch.Tensor, X: torch.Tensor, batch: int, N: int, L: int) -> torch.Tensor:
    """dB or dC in X's form from the sequential backward's partials: (batch, N, dim) per sequence
    (time-invariant X: Σ_b, transposed), or (n_dblocks, batch, N, L) per channel block, whose blocks
    are summed per group (the blocks of a group are consecutive and equally many)."""
    if X.dim() == 2:
        return part.sum(0).t()
    if X.dim() == 3:
        return part.sum(0)
    G = X.shape[1]
    return part.view(G, part.shape[0] // G, batch, N, L).sum(1).permute(1, 0, 2, 3)


# --------------------------------------------------------------------------- time-parallel kernels

def _parallel_config(L: int, device: torch.device):
    if triton_interpreter_enabled() or device.type != "cuda":
        return parallel_tile(L), INTERPRETER_BLOCK_D, 4
    return parallel_config_gpu(L)


_ANCHORS = {}


def _layout_anchor(device: torch.device, tile: int) -> torch.Tensor:
    """int8 zeros, at least ``tile`` of them, 16-byte aligned: the pointer behind the time-parallel
    kernels' layout anchor (see parallel_kernels; its load is masked off, so the buffer is never
    read), allocated once per device."""
    anchor = _ANCHORS.get(device)
    if anchor is None or anchor.numel() < tile:
        anchor = _ANCHORS[device] = torch.zeros(max(tile, MAX_TILE, 2048), device=device, dtype=torch.int8)
    return anchor


def _parallel_bc(X: torch.Tensor, dim: int):
    """(batch stride, group or channel stride, state stride, channels per group, form, the strides
    that ALIGN must divide) of B or C for the time-parallel kernels, which read it in place (unit
    stride in time: ``_time_strided``)."""
    if X.dim() == 2:  # time-invariant (dim, N): no time axis to align
        return 0, X.stride(0), X.stride(1), 1, 2, ()
    if X.dim() == 3:
        return X.stride(0), 0, X.stride(1), 1, 0, X.stride()[:2]
    return X.stride(0), X.stride(1), X.stride(2), max(dim // X.shape[1], 1), 1, X.stride()[:3]


def _parallel_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths,
                      store_out: bool, store_states: bool, last_out: bool):
    """Returns (out or None, states (batch, n_tiles, dim, N) fp32 or None, out_last or None)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    TILE, BLOCK_D, num_warps = _parallel_config(L, u.device)
    n_tiles = max(1, triton.cdiv(L, TILE))
    store_states = store_states or last_out or n_tiles > 1  # several tiles carry the state through it
    dev = u.device
    out = torch.empty(batch, dim, L, device=dev, dtype=u.dtype) if store_out else None
    states = torch.zeros(batch, n_tiles, dim, N, device=dev, dtype=torch.float32) if store_states else None
    out_last = torch.empty(batch, dim, device=dev, dtype=u.dtype) if last_out else None
    if batch * dim == 0 or L == 0:
        return out, states, out_last  # nothing to launch: the states stay 0
    zz = u if z is None else z
    dummy = u  # stands in for absent optional pointers (never read: the flag is off)
    s_B_b, s_B_g, s_B_n, B_gs, B_FORM, B_align = _parallel_bc(B, dim)
    s_C_b, s_C_g, s_C_n, C_gs, C_FORM, C_align = _parallel_bc(C, dim)
    ALIGN = _alignment(L, u.dtype, *u.stride()[:2], *delta.stride()[:2], *zz.stride()[:2], *B_align,
                       *C_align, dim * L)
    selective_scan_parallel_fwd_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        u, delta, A, B, C, dummy if D is None else D, zz,
        dummy if delta_bias is None else delta_bias, dummy if lengths is None else lengths,
        _layout_anchor(dev, TILE),
        dummy if out is None else out, dummy if states is None else states, dummy if out_last is None else out_last,
        dim, L, N, n_tiles,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1), dim * L, L,
        s_B_b, s_B_n, s_C_b, s_C_n, s_B_g, s_C_g, B_gs, C_gs,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_LENGTHS=lengths is not None, STORE_OUT=store_out, STORE_STATES=store_states,
        STORE_LAST_OUT=last_out, MULTI_TILE=n_tiles > 1,
        ALIGN=ALIGN, TILE=TILE, BLOCK_D=BLOCK_D, BLOCK_N=_block_n(N), B_FORM=B_FORM, C_FORM=C_FORM,
        num_warps=num_warps,
    )
    return out, states, out_last


def _parallel_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, states, dout, dlast):
    batch, dim, L = u.shape
    N = A.shape[1]
    TILE, BLOCK_D, num_warps = _parallel_config(L, u.device)
    n_tiles = max(1, triton.cdiv(L, TILE))
    dev, f32 = u.device, torch.float32
    du = torch.empty(batch, dim, L, device=dev, dtype=u.dtype)
    ddelta = torch.empty(batch, dim, L, device=dev, dtype=delta.dtype)
    dz = torch.empty(batch, dim, L, device=dev, dtype=z.dtype) if z is not None else None
    # dB, dC: (batch, N, L) / (batch, G, N, L) added to atomically, or time-invariant partials
    dB, dC = (torch.zeros(batch, n_tiles, dim, N, device=dev, dtype=f32) if X.dim() == 2 else
              torch.zeros(X.shape[:-1] + (L,), device=dev, dtype=f32) for X in (B, C))
    dA_part = torch.zeros(batch, n_tiles, dim, N, device=dev, dtype=f32)
    dD_part = torch.zeros(batch, n_tiles, dim, device=dev, dtype=f32) if D is not None else None
    dbias_part = torch.zeros(batch, n_tiles, dim, device=dev, dtype=f32) if delta_bias is not None else None
    has_dstate = dlast is not None or n_tiles > 1
    dstate = None
    if has_dstate:
        dstate = torch.zeros(2, batch, dim, N, device=dev, dtype=f32)
        if dlast is not None:
            dstate[n_tiles % 2] = dlast
    if batch * dim > 0 and L > 0:
        zz = u if z is None else z
        dummy = dA_part
        # the kernel's time tiles are re-read from the states of the forward only with several tiles
        s_B_b, s_B_g, s_B_n, B_gs, B_FORM, B_align = _parallel_bc(B, dim)
        s_C_b, s_C_g, s_C_n, C_gs, C_FORM, C_align = _parallel_bc(C, dim)
        ALIGN = _alignment(L, u.dtype, *u.stride()[:2], *delta.stride()[:2], *zz.stride()[:2], *dout.stride()[:2],
                           *B_align, *C_align, dim * L, N * L)
        selective_scan_parallel_bwd_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
            u, delta, A, B, C, dummy if D is None else D, zz,
            dummy if delta_bias is None else delta_bias, dummy if lengths is None else lengths,
            _layout_anchor(dev, TILE),
            dout, dummy if states is None else states, dummy if dstate is None else dstate,
            du, ddelta, du if dz is None else dz, dB, dC, dA_part,
            dummy if dD_part is None else dD_part, dummy if dbias_part is None else dbias_part,
            batch, dim, L, N, n_tiles,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
            dout.stride(0), dout.stride(1), s_B_b, s_B_n, s_C_b, s_C_n, s_B_g, s_C_g, B_gs, C_gs,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_LENGTHS=lengths is not None, HAS_DSTATE=has_dstate, MULTI_TILE=n_tiles > 1,
            ALIGN=ALIGN, TILE=TILE, BLOCK_D=BLOCK_D, THREAD_STEPS=thread_steps(TILE, num_warps),
            FLIP_BY_GATHER=FLIP_BY_GATHER, B_FORM=B_FORM, C_FORM=C_FORM, num_warps=num_warps,
        )
    if B.dim() == 2:  # time-invariant: Σ over the batch and the tiles, on the host (deterministic)
        dB = dB.sum((0, 1))
    if C.dim() == 2:
        dC = dC.sum((0, 1))
    dA = dA_part.sum((0, 1))
    dD = None if D is None else dD_part.sum((0, 1))
    dbias = None if delta_bias is None else dbias_part.sum((0, 1))
    return du, ddelta, dz, dA, dB, dC, dD, dbias


def selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=None):
    """One fused step; ``state`` is updated in place (through a contiguous copy if it is strided). With
    ``state_batch_indices`` (batch,) the state is a pool and row b updates pool row indices[b] (< 0:
    padding, output 0, pool untouched)."""
    batch, dim = x.shape
    N = state.shape[2]
    work = state if state.is_contiguous() else state.contiguous()
    x, dt, A, B, C, D, z, dt_bias = map(_contig, (x, dt, A, B, C, D, z, dt_bias))
    indices = _contig(state_batch_indices)
    out = torch.empty_like(x)
    BLOCK_N = _block_n(N)
    # No occupancy search here: one step is memory-bound and tiny; fewer, fuller programs suffice.
    BLOCK_D = INTERPRETER_BLOCK_D if triton_interpreter_enabled() else max(16, min(64, 4096 // BLOCK_N))
    dummy = x
    selective_state_update_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        work, x, dt, A, B, C,
        dummy if D is None else D, dummy if z is None else z, dummy if dt_bias is None else dt_bias,
        dummy if indices is None else indices, out, dim, N,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        HAS_INDICES=indices is not None, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
    )
    if work is not state:
        state.copy_(work)
    return out
