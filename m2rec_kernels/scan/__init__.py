"""Selective scan (Mamba-1 SSM recurrence) and its one-step streaming form (DESIGN §2.1). B and C take
the forms of ``bc_forms.py`` (per sequence, grouped, time-invariant).

Public functions check their inputs, choose the backend (``m2rec_kernels._backend``) and dispatch to
the PyTorch reference (``reference.py``), the fused Triton kernels (``function.py``) or, for
``selective_scan`` and ``selective_scan_final`` on CPU tensors, the compiled C++ kernels (``cpu.py``,
sources in ``csrc/``, built by set-up: vectorised over channels with AVX-512 / AVX2 / a generic
variant chosen at run time, parallel over batch x channel blocks, backward from per-chunk checkpoints,
deterministic reductions). ``backend="auto"`` picks the compiled kernels on CPU when they are built,
for ``selective_state_update`` too (one step, ``csrc/state_update_*.cpp``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _library
from .._backend import resolve_backend
from .._checks import FLOAT_DTYPES, check_index_pool, check_lengths, check_range, check_tensor
from .bc_forms import check_bc
from .cpu import cpu_scan_unavailable
from .ops import SELECTIVE_SCAN, SELECTIVE_SCAN_FINAL, SELECTIVE_SCAN_LOWRANK, SELECTIVE_STATE_UPDATE, form_delta, \
    scan_backend
from .reference import last_positions, selective_scan_final_ref, selective_scan_ref, selective_state_update_ref

__all__ = ["selective_scan", "selective_scan_final", "selective_state_update", "selective_scan_ref",
           "selective_scan_final_ref", "selective_state_update_ref"]

_A_DTYPES = (torch.float32, torch.float64)
# The Triton and compiled CPU kernels keep state and accumulation in fp32; fp64 inputs stay on the reference.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_flag(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


def _kernel_dtypes_ok(op: str, backend: str, chosen: str, named: dict) -> bool:
    """Whether the chosen kernel ("triton" or "cpu") supports these dtypes; when that backend was
    asked for explicitly an unsupported dtype raises instead of silently computing in lower precision."""
    for name, t in named.items():
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            if backend == chosen:
                raise TypeError(
                    f"{op}: backend={backend!r} supports float16, bfloat16 and float32; {name} is "
                    f"{str(t.dtype).replace('torch.', '')} (use backend='torch' for float64)"
                )
            return False
    return True


def _cpu_kernel_takes_forms(op: str, backend: str, B, C) -> bool:
    """Whether the compiled CPU scan takes these forms of B and C: per sequence and grouped, not
    time-invariant (its lanes are channels sharing one B/C value per step). "auto" then runs the
    reference; an explicit backend="cpu" raises."""
    for name, X in (("B", B), ("C", C)):
        if X.dim() == 2:
            if backend == "cpu":
                raise ValueError(f"{op}: backend='cpu' does not take a time-invariant {name} (dim, N) (its "
                                 f"kernels take {name} per sequence (batch, N, L) or grouped (batch, G, N, L)); "
                                 "use backend='torch' or 'auto', which runs the reference for this form")
            return False
    return True


def _check_scan_inputs(op, u, delta, A, B, C, D, z, delta_bias, lengths) -> None:
    """Shapes, dtypes and devices of the scan's inputs (DESIGN §2.1); errors name the argument."""
    check_tensor(op, "u", u, ndim=3)
    batch, dim, L = u.shape
    dev = u.device
    if delta is not None:  # None: given in low-rank form (selective_scan_lowrank checks it)
        check_tensor(op, "delta", delta, shape=(batch, dim, L), device=dev)
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError(f"{op}: A is {str(A.dtype).replace('torch.', '')}; complex A (mamba_ssm's complex "
                        "state, with B/C as interleaved real/imaginary pairs) is not supported: A must be real "
                        "float32 or float64")
    check_tensor(op, "A", A, ndim=2, dtypes=_A_DTYPES, device=dev)
    if A.shape[0] != dim:
        raise ValueError(f"{op}: A must have shape (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    if N < 1:
        raise ValueError(f"{op}: A must have at least one state (N >= 1), got shape {tuple(A.shape)}")
    check_bc(op, "B", B, batch, dim, N, L, dev)
    check_bc(op, "C", C, batch, dim, N, L, dev)
    if D is not None:
        check_tensor(op, "D", D, shape=(dim,), device=dev)
    if z is not None:
        check_tensor(op, "z", z, shape=(batch, dim, L), device=dev)
    if delta_bias is not None:
        check_tensor(op, "delta_bias", delta_bias, shape=(dim,), device=dev)
    if lengths is not None:
        check_lengths(op, lengths, batch, L, dev)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    lengths: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """Selective scan, a drop-in for mamba_ssm's ``selective_scan_fn`` with real A.

    u, delta, z: (batch, dim, L); A: (dim, N) real fp32/fp64 (complex A raises TypeError);
    D, delta_bias: (dim,); lengths: (batch,) integers in [0, L] — steps t >= length are the identity,
    so the last state is the state after each sequence's own last item.
    B and C, each in one of three forms (``bc_forms.py``; they may differ):
    (batch, N, L) per sequence; grouped (batch, G, N, L) with dim % G == 0, channel d reading group
    d // (dim / G); time-invariant (dim, N), each channel's own row at every step.
    Their gradients come back in the same form: grouped dB sums the group's channels, time-invariant
    dB sums over the batch and time.

    Δ = delta (+ delta_bias) (→ softplus); h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·u_t·B_t (h_0 = 0, fp32);
    y_t = Σ_n h_t·C_t; out = y + D·u; out ← out·silu(z). Returns out in u's dtype, or (out, last_state)
    with last_state (batch, dim, N) fp32 (fp64 for fp64 inputs) when ``return_last_state``.

    Backends: every form runs on "torch" and "triton"; the compiled CPU kernels ("cpu") take B and C
    per sequence or grouped — with a time-invariant one "auto" runs the reference and "cpu" raises.
    """
    op = "selective_scan"
    _check_scan_inputs(op, u, delta, A, B, C, D, z, delta_bias, lengths)
    _check_flag(op, "delta_softplus", delta_softplus)
    _check_flag(op, "return_last_state", return_last_state)

    chosen = _chosen_backend(op, backend, u, delta, A, B, C, D, z, delta_bias)
    grad = _library.needs_grad(u, delta, A, B, C, D, z, delta_bias)
    out, last, _ = _library.call(
        SELECTIVE_SCAN, u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus,
        return_last_state, grad, scan_backend(chosen, u.shape[0], u.shape[1], u.shape[2], grad, (B, C)))
    return (out, last) if return_last_state else out


def _chosen_backend(op, backend, u, delta, A, B, C, D, z, delta_bias) -> str:
    """"torch", "cpu" or "triton": ``resolve_backend``'s choice, unless the chosen kernel does not take
    these dtypes (then the reference, or an error when that kernel was asked for by name)."""
    chosen = resolve_backend(backend, op, u, delta, A, B, C, cpu_kernel=cpu_scan_unavailable)
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    if chosen in ("triton", "cpu") and not _kernel_dtypes_ok(op, backend, chosen, named):
        return "torch"
    if chosen == "cpu" and not _cpu_kernel_takes_forms(op, backend, B, C):
        return "torch"
    return chosen


def selective_scan_final(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    lengths: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """The selective scan's output at each sequence's LAST step, and the final state — all that
    last-position inference (scoring the next item) needs from the last layer.

    Same inputs, B/C forms and semantics as ``selective_scan``; returns ``(out_last, last_state)`` with
    out_last (batch, dim) in u's dtype equal to ``selective_scan(...)[b, :, lengths[b] - 1]``
    (position L - 1 without ``lengths``) and last_state (batch, dim, N) as with
    ``return_last_state``. ``lengths`` must be >= 1. The per-step outputs y_t = <h_t, C_t> are never
    formed (without gradients), which saves their cost at every other step."""
    op = "selective_scan_final"
    _check_scan_inputs(op, u, delta, A, B, C, D, z, delta_bias, lengths)
    _check_flag(op, "delta_softplus", delta_softplus)
    if u.shape[2] < 1:
        raise ValueError(f"{op}: the sequence must have at least one step, got L = 0")
    if lengths is not None:
        check_range(op, "lengths", lengths, lo=1, hi=u.shape[2])  # every sequence needs at least one step
    chosen = _chosen_backend(op, backend, u, delta, A, B, C, D, z, delta_bias)
    batch, dim, L = u.shape
    if _library.needs_grad(u, delta, A, B, C, D, z, delta_bias):
        # the differentiable path: the whole scan (with its residual), then the last steps
        out, last, _ = _library.call(
            SELECTIVE_SCAN, u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus,
            True, True, scan_backend(chosen, batch, dim, L, True, (B, C)))
        idx = last_positions(lengths, batch, L, u.device)
        return out[torch.arange(batch, device=u.device), :, idx], last
    return _library.call(SELECTIVE_SCAN_FINAL, u, delta, A, B, C, D, z, delta_bias, lengths,
                         delta_softplus, scan_backend(chosen, batch, dim, L, False, (B, C)))


def selective_scan_lowrank(u, dt_low, dt_weight, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, lengths=None, final=False, backend="auto"):
    """``selective_scan`` (``final=False``) or ``selective_scan_final`` (``final=True``) with delta given
    by Mamba's low-rank dt projection: delta = dt_weight @ dt_low per position, dt_low (batch, R, L),
    dt_weight (dim, R) (``dt_proj.weight``; its bias is ``delta_bias``). Returns what those return.
    Internal (``MambaMixer``'s): without gradients on the compiled CPU scan, delta is formed per step
    in registers and the (batch, dim, L) delta tensor never exists; otherwise delta is formed and the
    public function runs (the same ops, layouts and gradients as forming it by hand)."""
    op = "selective_scan_final" if final else "selective_scan"
    check_tensor(op, "u", u, ndim=3)
    batch, dim, L = u.shape
    check_tensor(op, "dt_weight", dt_weight, ndim=2, device=u.device)
    if dt_weight.shape[0] != dim or dt_weight.shape[1] < 1:
        raise ValueError(f"{op}: dt_weight must have shape (dim={dim}, R >= 1), got {tuple(dt_weight.shape)}")
    check_tensor(op, "dt_low", dt_low, shape=(batch, dt_weight.shape[1], L), device=u.device)
    tensors = (u, dt_low, dt_weight, A, B, C, D, z, delta_bias)
    chosen = None
    if not _library.needs_grad(*tensors):
        chosen = _chosen_backend(op, backend, u, dt_low, A, B, C, D, z, delta_bias)
        if chosen == "cpu" and not _kernel_dtypes_ok(op, backend, chosen, dict(dt_weight=dt_weight)):
            chosen = None
    if chosen != "cpu":
        delta = form_delta(dt_low, dt_weight)
        if final:
            return selective_scan_final(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, backend)
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, lengths,
                              backend)
    _check_scan_inputs(op, u, None, A, B, C, D, z, delta_bias, lengths)
    _check_flag(op, "delta_softplus", delta_softplus)
    _check_flag(op, "return_last_state", return_last_state)
    if final:
        if L < 1:
            raise ValueError(f"{op}: the sequence must have at least one step, got L = 0")
        if lengths is not None:
            check_range(op, "lengths", lengths, lo=1, hi=L)
    out, last = _library.call(SELECTIVE_SCAN_LOWRANK, u, dt_low, dt_weight, A, B, C, D, z, delta_bias, lengths,
                              delta_softplus, return_last_state, final, "cpu")
    return (out, last) if final or return_last_state else out


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One step of the selective scan, updating ``state`` (batch, dim, N) IN PLACE (mamba_ssm's
    ``selective_state_update``): state ← exp(Δ·A)·state + Δ·x·B; out = Σ_n state·C + D·x, gated by
    silu(z). x, dt, z: (batch, dim); B, C: (batch, N); A: (dim, N); D, dt_bias: (dim,).
    Returns out (batch, dim) in x's dtype. The Triton kernel is inference-only (no autograd); "auto"
    uses it on CUDA when no gradient is needed.

    ``state_batch_indices`` (batch,) integers (mamba_ssm's continuous batching): ``state`` is then a
    pool (pool_size, dim, N) of per-user states and row b of x, dt, B, C, z updates pool row
    state_batch_indices[b]; a negative index marks a padding row (its output is 0, the pool is left as
    it is), as in mamba_ssm. Indices must lie below pool_size and must not repeat (two rows updating
    one state would race; mamba_ssm does not check either)."""
    op = "selective_state_update"
    check_tensor(op, "state", state, ndim=3)
    _, dim, N = state.shape
    dev = state.device
    check_tensor(op, "x", x, ndim=2)
    batch = x.shape[0] if state_batch_indices is not None else state.shape[0]
    if state_batch_indices is not None:
        check_index_pool(op, "state_batch_indices", state_batch_indices, batch, state.shape[0], dev)
    check_tensor(op, "x", x, shape=(batch, dim), device=dev)
    check_tensor(op, "dt", dt, shape=(batch, dim), device=dev)
    check_tensor(op, "A", A, shape=(dim, N), dtypes=_A_DTYPES, device=dev)
    check_tensor(op, "B", B, shape=(batch, N), device=dev)
    check_tensor(op, "C", C, shape=(batch, N), device=dev)
    if D is not None:
        check_tensor(op, "D", D, shape=(dim,), device=dev)
    if z is not None:
        check_tensor(op, "z", z, shape=(batch, dim), device=dev)
    if dt_bias is not None:
        check_tensor(op, "dt_bias", dt_bias, shape=(dim,), device=dev)
    _check_flag(op, "dt_softplus", dt_softplus)
    if state.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: state is updated in place and must not require grad")

    chosen = resolve_backend(backend, op, state, x, dt, A, B, C, cpu_kernel=cpu_scan_unavailable)
    named = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    wants_grad = _library.needs_grad(*named.values())
    if chosen == "triton" and wants_grad:
        if backend == "triton":
            raise ValueError(f"{op}: the Triton kernel is inference-only; an input requires grad (use backend='torch')")
        chosen = "torch"
    if wants_grad:  # an op that mutates an input has no autograd formula: the differentiable reference
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    if chosen == "torch" or not _kernel_dtypes_ok(op, backend, chosen, named):
        chosen = "torch"
    return _library.call(SELECTIVE_STATE_UPDATE, state, x, dt, A, B, C, D, z, dt_bias,
                         state_batch_indices, dt_softplus, chosen, mutates=state)
