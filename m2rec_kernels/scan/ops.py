"""The selective scan's registered ops (``m2rec::selective_scan``, ``m2rec::selective_scan_backward``,
``m2rec::selective_scan_final``, ``m2rec::selective_scan_lowrank`` (internal: delta from Mamba's
low-rank dt projection), ``m2rec::selective_state_update``; see ``m2rec_kernels/_library.py``).

The public functions in ``__init__.py`` validate, choose the backend and call these. ``backend`` is one
of "torch" (the reference), "cpu" (the compiled CPU scan), "triton" (the time-parallel Triton kernels)
or "triton_seq" (the sequential Triton kernels; which of the two runs is decided in Python, by
``function.use_time_parallel``, so that the fake and the backward know it).

Outputs an op cannot leave out (a tensor op returns tensors, never None) are empty float32 tensors:
``last_state`` without ``return_last_state``, the residual without ``save_for_backward``, the
gradients of absent inputs.

The forward returns, besides out and the last state, the residual its backward needs: the compiled CPU
scan's per-chunk checkpoints, the sequential Triton kernel's checkpoints or the time-parallel kernel's
tile-end states (several time tiles only). The PyTorch backend keeps none: its backward recomputes the
reference under autograd (the reference is the spec; its speed is not the point of that backend).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _library
from .cpu import _isa_code
from .reference import compute_dtype, last_positions, selective_scan_final_ref, selective_scan_ref, \
    selective_state_update_ref

# The compiled CPU scan's checkpoint spacing (csrc/scan_isa.cpp kChunk) and forward modes (scan_api.h).
CPU_CHUNK = 64
_CPU_MODE_OUT, _CPU_MODE_OUT_CKPT, _CPU_MODE_FINAL = 0, 1, 2


def scan_backend(chosen: str, batch: int, dim: int, L: int, needs_grad: bool, bcs=()) -> str:
    """The ops' backend for the backend ``resolve_backend`` chose: "triton" becomes "triton_seq" where
    the sequential kernels run (``function.use_time_parallel``; ``bcs``: B and C, whose forms count)."""
    if chosen != "triton":
        return chosen
    from . import function

    return "triton" if function.use_time_parallel(batch, dim, L, needs_grad, bcs) else "triton_seq"


def _placeholder(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _cpu_isa() -> int:
    return _isa_code(None)  # loads the library on first use


def _cpu_like(t: Tensor, dtype) -> Tensor:
    """A new (batch, dim, L) tensor laid out as the compiled CPU scan lays out what follows ``t``:
    time-major (unit stride along dim) when t is, else rows (csrc/scan_ops.cpp seq_f32, seq_new)."""
    batch, dim, L = t.shape
    if L > 1 and t.stride(2) != 1 and (dim <= 1 or t.stride(1) == 1):
        return t.new_empty((batch, L, dim), dtype=dtype).transpose(1, 2)
    return t.new_empty((batch, dim, L), dtype=dtype)


# ------------------------------------------------------------------------------------ selective_scan

def _triton_forward(u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, return_last_state, save,
                    parallel):
    from . import function as F

    A, D, delta_bias, lengths = map(F._contig, (A, D, delta_bias, lengths))
    if parallel:
        u, delta, z, B, C = map(F._time_strided, (u, delta, z, B, C))
        out, states, _ = F._parallel_forward(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus, lengths,
                                             store_out=True, store_states=return_last_state, last_out=False)
        n_tiles = 1 if states is None else states.shape[1]
        last = states[:, -1].clone() if return_last_state else _placeholder(u)
        residual = states if save and n_tiles > 1 else _placeholder(u)
        return out, last, residual
    u, delta, B, C, z = map(F._contig, (u, delta, B, C, z))
    out, last, ckpt = F._sequential_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths,
                                            store_last=return_last_state, store_ckpt=save)
    return out, (_placeholder(u) if last is None else last), (_placeholder(u) if ckpt is None else ckpt)


def _selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    z: Optional[Tensor], delta_bias: Optional[Tensor], lengths: Optional[Tensor],
                    delta_softplus: bool, return_last_state: bool, save_for_backward: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(out, last_state, residual); see the module docstring."""
    if backend == "torch":
        with torch.no_grad():
            out, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, lengths)
        return out.contiguous(), (last if return_last_state else _placeholder(u)), _placeholder(u)
    if backend == "cpu":
        mode, isa = (_CPU_MODE_OUT_CKPT if save_for_backward else _CPU_MODE_OUT), _cpu_isa()  # isa: loads it
        return torch.ops.m2rec_scan_cpu.forward(u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus,
                                                mode, return_last_state, isa)
    return _triton_forward(u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, return_last_state,
                           save_for_backward, parallel=backend == "triton")


def _selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, return_last_state,
                         save_for_backward, backend):
    batch, dim, L = u.shape
    N = A.shape[1]
    if backend == "cpu":
        last = u.new_empty((batch, dim, N), dtype=torch.float32) if return_last_state else _placeholder(u)
        n_chunks = (L + CPU_CHUNK - 1) // CPU_CHUNK
        ckpt = (u.new_empty((batch, n_chunks, N, dim), dtype=torch.float32) if save_for_backward
                else _placeholder(u))
        return _cpu_like(u, u.dtype), last, ckpt
    wide = compute_dtype(u, A)
    last = u.new_empty((batch, dim, N), dtype=wide) if return_last_state else _placeholder(u)
    return u.new_empty((batch, dim, L)), last, _placeholder(u)


def _selective_scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                             z: Optional[Tensor], delta_bias: Optional[Tensor], lengths: Optional[Tensor],
                             residual: Tensor, dout: Optional[Tensor], dlast: Optional[Tensor],
                             delta_softplus: bool, backend: str
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype; an empty
    float32 tensor for an absent input. dout / dlast: None when no gradient reaches out / the state."""
    present = (u, delta, A, B, C, D, z, delta_bias)
    _check_output_grads(u, A, dout, dlast)
    if backend == "torch":
        def scan(*ins):
            return selective_scan_ref(*ins, delta_softplus, True, lengths)

        grads = _library.reference_vjp(scan, present, [t is not None for t in present], (dout, dlast))
        return tuple(_placeholder(u) if g is None else g.contiguous() for g in grads)
    if backend == "cpu":
        isa = _cpu_isa()
        grads = torch.ops.m2rec_scan_cpu.backward(u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus,
                                                  residual, dout, dlast, isa)
        return tuple(grads)
    from . import function as F

    dlast = None if dlast is None else dlast.contiguous()
    dtypes = [t.dtype if t is not None else None for t in present]
    A32, D, delta_bias, lengths = map(F._contig, (A, D, delta_bias, lengths))
    if dout is None:
        dout = torch.zeros_like(u)
    if backend == "triton":
        u, delta, z, B, C = map(F._time_strided, (u, delta, z, B, C))
        states = residual if residual.numel() else None
        grads = F._parallel_backward(u, delta, A32.float(), B, C, D, z, delta_bias, delta_softplus, lengths, states,
                                     F._time_strided(dout), dlast)
    else:
        u, delta, B, C, z = map(F._contig, (u, delta, B, C, z))
        grads = F._sequential_backward(u, delta, A32, B, C, D, z, delta_bias, delta_softplus, lengths, residual,
                                       dout.contiguous(), dlast)
    du, ddelta, dz, dA, dB, dC, dD, dbias = grads
    ordered = (du, ddelta, dA.contiguous(), dB, dC, dD, dz, dbias)
    return tuple(_placeholder(u) if dt is None else g.to(dt) for g, dt in zip(ordered, dtypes))


def _check_output_grads(u, A, dout, dlast) -> None:
    """The kernels read dout and dlast without bounds: a wrong shape must stop here."""
    batch, dim, L = u.shape
    for name, g, shape in (("dout", dout, (batch, dim, L)), ("dlast", dlast, (batch, dim, A.shape[1]))):
        if g is not None and tuple(g.shape) != shape:
            raise ValueError(f"selective_scan_backward: {name} must have shape {shape}, got {tuple(g.shape)}")


def _selective_scan_backward_fake(u, delta, A, B, C, D, z, delta_bias, lengths, residual, dout, dlast,
                                  delta_softplus, backend):
    present = (u, delta, A, B, C, D, z, delta_bias)
    if backend == "cpu":
        seq = {0: u, 1: delta, 6: z}  # outputs that follow their input's layout
        return tuple(_placeholder(u) if t is None else
                     (_cpu_like(t, t.dtype) if i in seq else t.new_empty(t.shape))
                     for i, t in enumerate(present))
    return tuple(_placeholder(u) if t is None else t.new_empty(t.shape) for t in present)


def _setup_scan(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, _, _, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, lengths, output[2])
    ctx.delta_softplus, ctx.backend, ctx.has_last = delta_softplus, backend, inputs[10]
    ctx.set_materialize_grads(False)


def _backward_scan(ctx, dout, dlast, _dresidual):
    u, delta, A, B, C, D, z, delta_bias, lengths, residual = ctx.saved_tensors
    if not ctx.has_last:
        dlast = None  # the last state was an empty placeholder: nothing flows back from it
    grads = torch.ops.m2rec.selective_scan_backward(u, delta, A, B, C, D, z, delta_bias, lengths, residual, dout,
                                                    dlast, ctx.delta_softplus, ctx.backend)
    present = (u, delta, A, B, C, D, z, delta_bias)
    return (*(None if t is None else g for g, t in zip(grads, present)), None, None, None, None, None)


selective_scan_op = _library.register("selective_scan", _selective_scan, _selective_scan_fake)
selective_scan_backward_op = _library.register("selective_scan_backward", _selective_scan_backward,
                                               _selective_scan_backward_fake)
selective_scan_op.register_autograd(_backward_scan, setup_context=_setup_scan)
SELECTIVE_SCAN = torch.ops.m2rec.selective_scan.default  # the handle public functions call (no lookups)


# ------------------------------------------------------------------------------ selective_scan_final

def _selective_scan_final(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                          z: Optional[Tensor], delta_bias: Optional[Tensor], lengths: Optional[Tensor],
                          delta_softplus: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(out at each sequence's last step (batch, dim), last state (batch, dim, N))."""
    if backend == "torch":
        with torch.no_grad():
            out_last, last = selective_scan_final_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths)
        return out_last.contiguous(), last
    if backend == "cpu":
        isa = _cpu_isa()
        out_last, last, _ = torch.ops.m2rec_scan_cpu.forward(u, delta, A, B, C, D, z, delta_bias, lengths,
                                                             delta_softplus, _CPU_MODE_FINAL, True, isa)
        return out_last, last
    from . import function as F

    if backend == "triton":  # the kernel stores the end states and y at the last step only
        A, D, delta_bias, lengths = map(F._contig, (A.float(), D, delta_bias, lengths))
        u, delta, z, B, C = map(F._time_strided, (u, delta, z, B, C))
        _, states, out_last = F._parallel_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths,
                                                  store_out=False, store_states=True, last_out=True)
        return out_last, states[:, -1].clone()
    out, last, _ = _triton_forward(u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, True, False,
                                   parallel=False)
    idx = last_positions(lengths, u.shape[0], u.shape[2], u.device)
    return out[torch.arange(u.shape[0], device=u.device), :, idx], last


def _selective_scan_final_fake(u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, backend):
    batch, dim, _ = u.shape
    wide = torch.float32 if backend == "cpu" else compute_dtype(u, A)
    return u.new_empty((batch, dim)), u.new_empty((batch, dim, A.shape[1]), dtype=wide)


def _setup_final(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, lengths)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend
    ctx.set_materialize_grads(False)


def _backward_final(ctx, dout_last, dlast):
    """The final op keeps nothing for a backward (inference is its purpose): this reruns the scan with
    its residual and puts dout_last at each sequence's last step. The public ``selective_scan_final``
    never gets here: with gradients it runs ``selective_scan`` and gathers."""
    u, delta, A, B, C, D, z, delta_bias, lengths = ctx.saved_tensors
    batch, dim, L = u.shape
    base = "triton" if ctx.backend in _library.TRITON_BACKENDS else ctx.backend
    backend = scan_backend(base, batch, dim, L, True, (B, C))
    _, _, residual = torch.ops.m2rec.selective_scan(u, delta, A, B, C, D, z, delta_bias, lengths, ctx.delta_softplus,
                                                    False, True, backend)
    dout = None
    if dout_last is not None:
        idx = last_positions(lengths, batch, L, u.device)
        dout = u.new_zeros((batch, dim, L))
        dout[torch.arange(batch, device=u.device), :, idx] = dout_last.to(u.dtype)
    grads = torch.ops.m2rec.selective_scan_backward(u, delta, A, B, C, D, z, delta_bias, lengths, residual, dout,
                                                    dlast, ctx.delta_softplus, backend)
    present = (u, delta, A, B, C, D, z, delta_bias)
    return (*(None if t is None else g for g, t in zip(grads, present)), None, None, None)


selective_scan_final_op = _library.register("selective_scan_final", _selective_scan_final,
                                            _selective_scan_final_fake)
selective_scan_final_op.register_autograd(_backward_final, setup_context=_setup_final)
SELECTIVE_SCAN_FINAL = torch.ops.m2rec.selective_scan_final.default


# ---------------------------------------------------------------------------- selective_scan_lowrank

def form_delta(dt_low: Tensor, dt_weight: Tensor) -> Tensor:
    """delta = dt_weight @ dt_low per position, (batch, dim, L), laid out as dt_low: time-major (a
    (batch * L, R) x (R, dim) product) when dt_low is the (batch, R, L) transpose of a time-major
    tensor, else channels-first."""
    w = dt_weight.to(dt_low.dtype)
    if dt_low.shape[2] > 1 and dt_low.stride(2) != 1 and dt_low.stride(1) == 1:
        return torch.nn.functional.linear(dt_low.transpose(1, 2), w).transpose(1, 2)
    return torch.matmul(w, dt_low)


def _selective_scan_lowrank(u: Tensor, dt_low: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                            lengths: Optional[Tensor], delta_softplus: bool, return_last_state: bool, final: bool,
                            backend: str) -> tuple[Tensor, Tensor]:
    """The scan with delta = dt_weight @ dt_low (Mamba's dt_proj, its bias being delta_bias): (out, last
    state) as ``selective_scan`` (``final=False``; last state an empty placeholder without
    ``return_last_state``) or ``selective_scan_final`` (``final=True``). The compiled CPU scan forms
    delta per step in registers (csrc/scan_api.h delta_weight); the other backends form it first."""
    if backend == "cpu":
        mode = _CPU_MODE_FINAL if final else _CPU_MODE_OUT
        out, last, _ = torch.ops.m2rec_scan_cpu.forward(u, dt_low, A, B, C, D, z, delta_bias, lengths, delta_softplus,
                                                        mode, return_last_state or final, _cpu_isa(), dt_weight)
        return out, last
    delta = form_delta(dt_low, dt_weight)
    if final:
        return _selective_scan_final(u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, backend)
    out, last, _ = _selective_scan(u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, return_last_state,
                                   False, backend)
    return out, last


def _selective_scan_lowrank_fake(u, dt_low, dt_weight, A, B, C, D, z, delta_bias, lengths, delta_softplus,
                                 return_last_state, final, backend):
    if final:
        return _selective_scan_final_fake(u, u, A, B, C, D, z, delta_bias, lengths, delta_softplus, backend)
    out, last, _ = _selective_scan_fake(u, u, A, B, C, D, z, delta_bias, lengths, delta_softplus, return_last_state,
                                        False, backend)
    return out, last


def _setup_lowrank(ctx, inputs, output):
    u, dt_low, dt_weight, A, B, C, D, z, delta_bias, lengths, delta_softplus, return_last_state, final, backend = inputs
    ctx.save_for_backward(u, dt_low, dt_weight, A, B, C, D, z, delta_bias, lengths)
    ctx.delta_softplus, ctx.backend, ctx.final = delta_softplus, backend, final
    ctx.has_last = return_last_state or final
    ctx.set_materialize_grads(False)


def _backward_lowrank(ctx, dout, dlast):
    """Not the serving path (``lowrank.selective_scan_lowrank`` forms delta and runs the plain scan when
    a gradient is needed): the gradients of the formed-delta scan, through its registered autograd."""
    u, dt_low, dt_weight, A, B, C, D, z, delta_bias, lengths = ctx.saved_tensors
    batch, dim, L = u.shape
    base = "triton" if ctx.backend in _library.TRITON_BACKENDS else ctx.backend
    backend = scan_backend(base, batch, dim, L, True, (B, C))

    def scan(u, dt_low, dt_weight, A, B, C, D, z, delta_bias):
        out, last, _ = torch.ops.m2rec.selective_scan(u, form_delta(dt_low, dt_weight), A, B, C, D, z, delta_bias,
                                                      lengths, ctx.delta_softplus, True, True, backend)
        if ctx.final:
            out = out[torch.arange(batch, device=u.device), :, last_positions(lengths, batch, L, u.device)]
        return out, last

    present = (u, dt_low, dt_weight, A, B, C, D, z, delta_bias)
    grads = _library.reference_vjp(scan, present, ctx.needs_input_grad[:9],
                                   (dout, dlast if ctx.has_last else None))
    return (*grads, None, None, None, None, None)


selective_scan_lowrank_op = _library.register("selective_scan_lowrank", _selective_scan_lowrank,
                                              _selective_scan_lowrank_fake)
selective_scan_lowrank_op.register_autograd(_backward_lowrank, setup_context=_setup_lowrank)
SELECTIVE_SCAN_LOWRANK = torch.ops.m2rec.selective_scan_lowrank.default


# ---------------------------------------------------------------------------- selective_state_update

def _selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                            state_batch_indices: Optional[Tensor], dt_softplus: bool, backend: str) -> Tensor:
    """One step; ``state`` is updated in place. No autograd formula (torch.library refuses one for an
    op that mutates an input): the public function runs the reference when a gradient is needed."""
    if backend in _library.TRITON_BACKENDS:
        from .function import selective_state_update_triton

        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    if backend == "cpu":  # csrc/state_update_*.cpp
        return torch.ops.m2rec_scan_cpu.state_update(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices,
                                                     dt_softplus, _cpu_isa())
    with torch.no_grad():
        out = selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    return out.contiguous()


def _selective_state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, dt_softplus, backend):
    return x.new_empty(x.shape)


selective_state_update_op = _library.register("selective_state_update", _selective_state_update,
                                              _selective_state_update_fake, mutates_args=("state",))
SELECTIVE_STATE_UPDATE = torch.ops.m2rec.selective_state_update.default
