"""PyTorch reference of the selective scan (the spec the Triton kernels match; DESIGN §2.1).

Same math as mamba_ssm's ``selective_scan_ref`` (state-spaces/mamba,
``mamba_ssm/ops/selective_scan_interface.py``): Euler form h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·u_t·B_t,
y_t = <h_t, C_t>. mamba's reference materialises exp(Δ·A) for the whole sequence, (batch, dim, L, N),
and lets autograd keep every step. Here time is processed in chunks of time-major buffers that are
reused, so memory is O(batch·dim·N·chunk) plus the outputs, in inference and in training alike:

* forward: per chunk, exp(Δ·A) and Δ·u·B in one batched op each, then one in-place fused
  multiply-add per step, then y for the whole chunk with one bmm;
* backward (hand-written, DESIGN §9, checked against autograd in the tests): the forward keeps only
  the state at each chunk start; the backward recomputes a chunk's states from it (never dividing
  by exp(Δ·A)), walks the chunk in reverse with two in-place ops per step to get dL/dh_t, and forms
  every gradient of the chunk with batched ops.

B and C take any of the forms of ``bc_forms.py`` (per sequence, grouped, time-invariant; mamba's
reference takes the same), each independently; the backward returns dB, dC in their inputs' forms.

The state is kept in fp32 (fp64 when A or u is fp64, so gradcheck works); outputs are in u's dtype.
Inputs are assumed valid: the public functions in ``m2rec_kernels.scan`` check them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .bc_forms import as_grouped, bc_groups

# Steps per chunk: bounds the (chunk, batch, dim, N) buffers while keeping exp, the input term and
# the output contraction batched over the chunk.
DEFAULT_CHUNK = 16  # the fastest of 8..64 at the model's shapes (2-core CPU): buffers stay in cache
SOFTPLUS_THRESHOLD = 20.0  # torch's default: softplus(x) = x above it


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 when any input is fp64 (double-precision checks), else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def effective_delta(
    delta: torch.Tensor,
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Δ after the bias and the softplus (threshold 20, as torch's default)."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        bias = delta_bias.to(dtype)
        delta = delta + (bias[:, None] if delta.dim() == 3 else bias)  # (b, d, L) or (b, d)
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _valid_steps(lengths: Optional[torch.Tensor], batch: int, L: int, dtype, device) -> Optional[torch.Tensor]:
    """(batch, L) 1.0 where t < length, else 0.0 (Δ = 0 there makes the step the identity)."""
    if lengths is None:
        return None
    return (torch.arange(L, device=device)[None, :] < lengths[:, None]).to(dtype)


def _delta_time_major(delta, delta_bias, delta_softplus, valid, t0, t1, dtype):
    """Δ for steps t0..t1 as a contiguous (T, batch, dim) tensor, lengths mask applied."""
    dt = effective_delta(delta[:, :, t0:t1], delta_bias, delta_softplus, dtype)
    if valid is not None:
        dt = dt * valid[:, None, t0:t1]
    return dt.permute(2, 0, 1).contiguous()


def _time_major(x: torch.Tensor, t0: int, t1: int, dtype) -> torch.Tensor:
    """x[..., t0:t1] of a (batch, ..., L) tensor as a contiguous (T, batch, ...) tensor."""
    return x[..., t0:t1].movedim(-1, 0).to(dtype).contiguous()


# B and C (bc_forms.py) enter the chunk's ops in one of two shapes: grouped, (T, b, G, N) per step
# (the per-sequence form is G = 1: the same ops and cost as a plain (T, b, N)), or time-invariant, (d, N).
# The three helpers below are the only places that tell them apart.

def _bc_chunk(X: torch.Tensor, t0: int, t1: int, dtype) -> torch.Tensor:
    """B or C for steps t0..t1: grouped (T, b, G, N) contiguous, or the time-invariant (d, N) itself."""
    if X.dim() == 2:
        return X.to(dtype)
    return _time_major(as_grouped(X), t0, t1, dtype)


def _mul_rows(x: torch.Tensor, X: torch.Tensor, out: torch.Tensor, add: Optional[torch.Tensor] = None) -> None:
    """out (..., d, N) = [add +] x (..., d) ⊗ X, X broadcast over its channels: grouped (..., G, N), each
    group's row to its d / G channels, or time-invariant (d, N)."""
    if X.dim() == 2 or X.shape[-2] == 1:  # (d, N) or (..., 1, N): broadcast as they are
        v, w, o, a = x.unsqueeze(-1), X, out, add
    else:
        G, N = X.shape[-2:]
        d = x.shape[-1]
        v, w = x.reshape(*x.shape[:-1], G, d // G, 1), X.unsqueeze(-2)
        o = out.view(*out.shape[:-2], G, d // G, N)
        a = None if add is None else add.view(o.shape)
    if a is None:
        torch.mul(v, w, out=o)
    else:
        torch.addcmul(a, v, w, out=o)


def _sum_states(S: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(..., d) = Σ_n S (..., d, N) · X, X as in ``_mul_rows``: batched matrix-vector products."""
    d, N = S.shape[-2:]
    if X.dim() == 2:
        return torch.einsum("...dn,dn->...d", S, X)
    G = X.shape[-2]
    rows = S.shape[:-2].numel() * G  # explicit: -1 is ambiguous for empty tensors
    return torch.bmm(S.reshape(rows, d // G, N), X.reshape(rows, N, 1)).view(S.shape[:-1])


def _sum_channels(S: torch.Tensor, x: torch.Tensor, groups: Optional[int]) -> torch.Tensor:
    """The gradient of a B/C chunk from S (T, b, d, N) and x (T, b, d): Σ_d S·x within each of its
    ``groups`` (T, b, G, N), or Σ_{t,b} S·x for a time-invariant one (groups None): (d, N)."""
    T, b, d, N = S.shape
    if groups is None:
        return torch.einsum("tbdn,tbd->dn", S, x)
    G = groups
    rows = T * b * G
    return torch.bmm(S.reshape(rows, d // G, N).transpose(1, 2), x.reshape(rows, d // G, 1)).view(T, b, G, N)


def _run_chunk(h0, dt, u_t, B_t, A, decay, states):
    """Fill ``decay`` (T, b, d, N) with exp(Δ·A) and ``states`` (T+1, b, d, N) with the state before
    the chunk (index 0) and after each step (index i + 1). Returns nothing; buffers are reused."""
    T = dt.shape[0]
    torch.mul(dt.unsqueeze(-1), A, out=decay)
    decay.exp_()
    states[0].copy_(h0)
    _mul_rows(dt * u_t, B_t, out=states[1:])  # Δ·u·B, then + exp(Δ·A)·h
    for i in range(T):
        states[i + 1].addcmul_(decay[i], states[i])


def _scan_forward(u, delta, A, B, C, delta_bias, delta_softplus, lengths, chunk, keep_checkpoints,
                  compute_y=True):
    """y (batch, dim, L) before D and the gate (None unless ``compute_y``), the last state, and
    (optionally) the state at every chunk start (n_chunks, batch, dim, N). No autograd."""
    cdt = compute_dtype(u, A)
    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device
    A_c = A.to(cdt)
    valid = _valid_steps(lengths, batch, L, cdt, dev)
    T_max = max(min(chunk, L), 1)
    decay_buf = torch.empty(T_max, batch, dim, N, dtype=cdt, device=dev)
    states_buf = torch.empty(T_max + 1, batch, dim, N, dtype=cdt, device=dev)
    y = torch.empty(L, batch, dim, dtype=cdt, device=dev) if compute_y else None
    h = torch.zeros(batch, dim, N, dtype=cdt, device=dev)
    checkpoints = []
    for t0 in range(0, L, chunk):
        t1 = min(t0 + chunk, L)
        T = t1 - t0
        if keep_checkpoints:
            checkpoints.append(h)
        dt = _delta_time_major(delta, delta_bias, delta_softplus, valid, t0, t1, cdt)
        states = states_buf[: T + 1]
        _run_chunk(h, dt, _time_major(u, t0, t1, cdt), _bc_chunk(B, t0, t1, cdt), A_c, decay_buf[:T], states)
        if compute_y:
            y[t0:t1] = _sum_states(states[1:], _bc_chunk(C, t0, t1, cdt))
        h = states[T].clone()  # the buffer is overwritten by the next chunk
    ckpt = torch.stack(checkpoints) if keep_checkpoints and checkpoints else None
    return (y.permute(1, 2, 0).contiguous() if compute_y else None), h, ckpt


def _finish_output(y, u, D, z, cdt):
    out = y if D is None else y + u.to(cdt) * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    return out.to(u.dtype)


class _SelectiveScanRefFn(torch.autograd.Function):
    """The chunked reference with the hand-written chunked backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, chunk):
        cdt = compute_dtype(u, A)
        y, last, ckpt = _scan_forward(u, delta, A, B, C, delta_bias, delta_softplus, lengths, chunk, True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, lengths, ckpt)
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        ctx.set_materialize_grads(False)
        return _finish_output(y, u, D, z, cdt), last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, lengths, ckpt = ctx.saved_tensors
        chunk = ctx.chunk
        cdt = compute_dtype(u, A)
        batch, dim, L = u.shape
        N = A.shape[1]
        dev = u.device
        A_c = A.to(cdt)
        valid = _valid_steps(lengths, batch, L, cdt, dev)
        dout = torch.zeros(batch, dim, L, dtype=cdt, device=dev) if dout is None else dout.to(cdt)
        # gradient reaching y + D·u through the gate
        g = dout if z is None else dout * F.silu(z.to(cdt))
        dh = torch.zeros(batch, dim, N, dtype=cdt, device=dev) if dlast is None else dlast.to(cdt).clone()

        T_max = max(min(chunk, L), 1)
        decay_buf = torch.empty(T_max, batch, dim, N, dtype=cdt, device=dev)
        states_buf = torch.empty(T_max + 1, batch, dim, N, dtype=cdt, device=dev)
        dH_buf = torch.empty(T_max, batch, dim, N, dtype=cdt, device=dev)
        # time-major results: (L, b, d)
        y_all = torch.empty(L, batch, dim, dtype=cdt, device=dev) if z is not None else None
        dhB_all = torch.empty(L, batch, dim, dtype=cdt, device=dev)  # Σ_n dh·B
        dEh_all = torch.empty(L, batch, dim, dtype=cdt, device=dev)  # Σ_n dh·A·exp(ΔA)·h_{t-1}
        # dB, dC in their inputs' forms: time-major (L, b, G, N) per step, or (d, N) summed over b and t
        dB_all, dC_all = (torch.zeros(dim, N, dtype=cdt, device=dev) if X.dim() == 2 else
                          torch.empty(L, batch, bc_groups(X), N, dtype=cdt, device=dev) for X in (B, C))
        dA = torch.zeros(dim, N, dtype=cdt, device=dev)

        n_chunks = (L + chunk - 1) // chunk
        for c in reversed(range(n_chunks)):
            t0, t1 = c * chunk, min((c + 1) * chunk, L)
            T = t1 - t0
            dt = _delta_time_major(delta, delta_bias, ctx.delta_softplus, valid, t0, t1, cdt)
            u_t = _time_major(u, t0, t1, cdt)
            B_t = _bc_chunk(B, t0, t1, cdt)
            C_t = _bc_chunk(C, t0, t1, cdt)
            g_t = _time_major(g, t0, t1, cdt)
            decay, states, dH = decay_buf[:T], states_buf[: T + 1], dH_buf[:T]
            _run_chunk(ckpt[c], dt, u_t, B_t, A_c, decay, states)  # recompute the chunk's states
            after, before = states[1:], states[:-1]
            # reverse walk: dH[i] = dL/dh at step i (output term included); dh ← dH[i]·exp(Δ_i·A)
            for i in reversed(range(T)):
                _mul_rows(g_t[i], C_t if C.dim() == 2 else C_t[i], out=dH[i], add=dh)
                torch.mul(dH[i], decay[i], out=dh)
            if y_all is not None:
                y_all[t0:t1] = _sum_states(after, C_t)
            dhB_all[t0:t1] = _sum_states(dH, B_t)
            for X, dX_all, S, x in ((C, dC_all, after, g_t), (B, dB_all, dH, dt * u_t)):
                if X.dim() == 2:
                    dX_all += _sum_channels(S, x, None)
                else:
                    dX_all[t0:t1] = _sum_channels(S, x, bc_groups(X))
            P = decay.mul_(dH).mul_(before)  # dh·exp(ΔA)·h_{t-1}, in the decay buffer (no longer needed)
            dEh_all[t0:t1] = (P * A_c).sum(-1)
            dA += P.mul_(dt.unsqueeze(-1)).sum((0, 1))

        def batch_major(x):  # (L, b, *) -> (b, *, L)
            return x.permute(1, 2, 0)

        dt_full = effective_delta(delta, delta_bias, ctx.delta_softplus, cdt)
        if valid is not None:
            dt_full = dt_full * valid[:, None, :]
        u_c = u.to(cdt)
        dhB = batch_major(dhB_all)
        du = dt_full * dhB
        ddelta = u_c * dhB + batch_major(dEh_all)
        if valid is not None:
            ddelta = ddelta * valid[:, None, :]
        if ctx.delta_softplus:
            x = delta.to(cdt) if delta_bias is None else delta.to(cdt) + delta_bias.to(cdt)[:, None]
            ddelta = torch.where(x <= SOFTPLUS_THRESHOLD, ddelta * torch.sigmoid(x), ddelta)
        dD = None
        if D is not None:
            du = du + D.to(cdt)[:, None] * g
            dD = (g * u_c).sum((0, 2)).to(D.dtype)
        dz = None
        if z is not None:
            pre = batch_major(y_all) if D is None else batch_major(y_all) + u_c * D.to(cdt)[:, None]
            zc = z.to(cdt)
            sig = torch.sigmoid(zc)
            dz = (dout * pre * sig * (1 + zc * (1 - sig))).to(z.dtype)  # silu'(z) = σ(1 + z(1 − σ))
        dbias = None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype)

        def in_form(dX, X):  # (L, b, G, N) -> (b, G, N, L), and (b, N, L) for a per-sequence X
            if X.dim() == 2:
                return dX.to(X.dtype)
            dX = dX.movedim(0, -1)
            return (dX.squeeze(1) if X.dim() == 3 else dX).to(X.dtype)

        return (
            du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), in_form(dB_all, B), in_form(dC_all, C),
            dD, dz, dbias, None, None, None,
        )


def selective_scan_ref(
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
    chunk: int = DEFAULT_CHUNK,
):
    """u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L), grouped (batch, G, N, L) or
    time-invariant (dim, N); D, delta_bias: (dim,); lengths: (batch,) — steps t >= lengths[b] are
    identity (decay 1, input 0).

    Returns out (batch, dim, L) in u's dtype, and with ``return_last_state`` also the final state
    (batch, dim, N) in the compute dtype (fp32, or fp64 for fp64 inputs). Differentiable in every
    floating input (not twice)."""
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, last = _SelectiveScanRefFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, chunk)
    else:
        y, last, _ = _scan_forward(u, delta, A, B, C, delta_bias, delta_softplus, lengths, chunk, False)
        out = _finish_output(y, u, D, z, compute_dtype(u, A))
    return (out, last) if return_last_state else out


def last_positions(lengths: Optional[torch.Tensor], batch: int, L: int, device) -> torch.Tensor:
    """(batch,) int64 index of each sequence's last step: lengths - 1, or L - 1 without lengths."""
    if lengths is None:
        return torch.full((batch,), L - 1, dtype=torch.int64, device=device)
    return lengths.long() - 1


def output_at(h: torch.Tensor, idx: torch.Tensor, u, C, D, z) -> torch.Tensor:
    """out at step idx[b] of each sequence from the state h (batch, dim, N) after that step:
    (Σ_n h·C_idx + D·u_idx)·silu(z_idx), in h's dtype, (batch, dim)."""
    rows = torch.arange(h.shape[0], device=h.device)
    cdt = h.dtype
    C_last = C if C.dim() == 2 else as_grouped(C)[rows, :, :, idx]  # (d, N) or (b, G, N)
    y = _sum_states(h, C_last.to(cdt))
    if D is not None:
        y = y + D.to(cdt) * u[rows, :, idx].to(cdt)
    if z is not None:
        y = y * F.silu(z[rows, :, idx].to(cdt))
    return y


def selective_scan_final_ref(
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
    chunk: int = DEFAULT_CHUNK,
):
    """The scan's output at each sequence's last step only, and the final state: what last-position
    inference needs. Returns (out_last (batch, dim) in u's dtype, last_state (batch, dim, N) fp32/fp64),
    with out_last[b] == selective_scan(...)[b, :, lengths[b] - 1] (L - 1 without lengths; lengths must
    be >= 1). Without gradients the per-step outputs are never formed; with them it goes through the
    differentiable full scan."""
    batch, _, L = u.shape
    idx = last_positions(lengths, batch, L, u.device)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, last = _SelectiveScanRefFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, chunk)
        return out[torch.arange(batch, device=u.device), :, idx], last
    _, last, _ = _scan_forward(u, delta, A, B, C, delta_bias, delta_softplus, lengths, chunk, False,
                               compute_y=False)
    return output_at(last, idx, u, C, D, z).to(u.dtype), last


def selective_state_update_ref(
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
) -> torch.Tensor:
    """One step of the scan (mamba_ssm ``ops/triton/selective_state_update.py`` semantics).

    state (batch, dim, N) is updated in place; x, dt, z: (batch, dim); B, C: (batch, N).
    Returns out (batch, dim) in x's dtype. The output is computed from the new state before it is
    rounded to the state's storage dtype (as mamba's Triton kernel does).

    With ``state_batch_indices`` (batch,) the state is a pool (pool_size, dim, N): row b of x, dt, B, C
    and z updates pool row state_batch_indices[b]; a negative index is padding (that row's output is
    0 and the pool is left as it is). Indices must be distinct and below pool_size (checked by the
    public function)."""
    cdt = compute_dtype(state, x, A)
    idx = state_batch_indices
    valid = None if idx is None else idx >= 0
    old = state if idx is None else state[idx.clamp(min=0)]  # padding rows read row 0, then are dropped
    dt = effective_delta(dt, dt_bias, dt_softplus, cdt)  # (b, d)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(cdt))  # (b, d, N)
    drive = (dt * x.to(cdt)).unsqueeze(-1) * B.to(cdt).unsqueeze(1)
    new_state = torch.addcmul(drive, decay, old.to(cdt))
    with torch.no_grad():
        if idx is None:
            state.copy_(new_state)
        else:
            rows = valid.nonzero()[:, 0]
            state.index_copy_(0, idx[rows].long(), new_state[rows].to(state.dtype))
    out = torch.einsum("bdn,bn->bd", new_state, C.to(cdt))
    if D is not None:
        out = out + x.to(cdt) * D.to(cdt)
    if z is not None:
        out = out * F.silu(z.to(cdt))
    if valid is not None:
        out = torch.where(valid[:, None], out, torch.zeros((), dtype=cdt, device=out.device))
    return out.to(x.dtype)
