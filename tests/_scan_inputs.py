"""Shared by the selective-scan tests: random inputs in the ranges the model produces, and an
independent naive scan (explicit Python loops over batch and time, float64) to compare against.

The inputs keep the dynamics decaying as in a trained Mamba (Δ > 0 and A < 0, so exp(Δ·A) < 1 and the
state stays of the size of its inputs): a growing state (Δ < 0) reaches ~1e9 in 37 steps, and fp32
comparisons then measure the CPU's rounding instead of the scan
(``test_scan_inputs_keep_the_state_bounded`` checks this for every option)."""
from __future__ import annotations

from typing import Optional

import torch

# The odd shapes every scan test uses (dim not a power of two, N = 7, L = 37).
ODD = dict(batch=3, dim=48, L=37, N=7)


def make_lengths(batch: int, L: int, device) -> torch.Tensor:
    """Full, partial and empty sequences."""
    pattern = [L, max(L // 3, 1), 0]
    return torch.tensor([pattern[i % 3] for i in range(batch)], dtype=torch.int64, device=device)


def bc_shape(form, batch: int, dim: int, L: int, N: int) -> tuple:
    """The shape of B or C in ``form`` ("seq", "inv" or the number of groups G)."""
    if form == "seq":
        return (batch, N, L)
    if form == "inv":
        return (dim, N)
    return (batch, int(form), N, L)


def per_channel(X: torch.Tensor, batch: int, dim: int, L: int) -> torch.Tensor:
    """B or C in any form as (batch, dim, N, L): each channel's own row at each step, written out
    (channel d of a grouped X reads group d // (dim / G))."""
    if X.dim() == 2:
        return X[None, :, :, None].expand(batch, dim, X.shape[1], L)
    if X.dim() == 3:
        return X[:, None].expand(batch, dim, *X.shape[1:])
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def make_scan_inputs(
    batch: int,
    dim: int,
    L: int,
    N: int,
    *,
    use_D: bool = True,
    use_z: bool = True,
    use_bias: bool = True,
    softplus: bool = True,
    use_lengths: bool = False,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    generator_seed: int = 0,
    B_form="seq",
    C_form="seq",
) -> dict:
    """Keyword arguments for ``selective_scan`` (without return_last_state/backend). ``B_form`` and
    ``C_form``: "seq" (batch, N, L), an int G for the grouped (batch, G, N, L), or "inv" for the
    time-invariant (dim, N)."""
    g = torch.Generator().manual_seed(generator_seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=device)

    if softplus:
        delta = rnd(batch, dim, L, scale=0.5, shift=-1.0)
    else:  # Δ itself: keep it positive as the model's softplus output is
        delta = (torch.rand(batch, dim, L, generator=g) * 0.5 + 0.05).to(dtype=dtype, device=device)
    A_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    A = (-(torch.rand(dim, N, generator=g) * 1.5 + 0.25)).to(dtype=A_dtype, device=device)
    kw = dict(
        u=rnd(batch, dim, L),
        delta=delta,
        A=A,
        B=rnd(*bc_shape(B_form, batch, dim, L, N)),
        C=rnd(*bc_shape(C_form, batch, dim, L, N)),
        D=rnd(dim) if use_D else None,
        z=rnd(batch, dim, L) if use_z else None,
        delta_bias=None,
        delta_softplus=softplus,
        lengths=make_lengths(batch, L, device) if use_lengths else None,
    )
    if use_bias:
        if softplus:
            bias = torch.randn(dim, generator=g) * 0.3
            bias[:2] = 21.0  # above softplus' threshold: Δ = x there (and the gradient is 1)
        else:  # Δ + bias is the step itself: it must stay positive, or exp(Δ·A) > 1 and the state grows
            bias = torch.rand(dim, generator=g) * 0.2
        kw["delta_bias"] = bias.to(dtype=dtype, device=device)
    return kw


def naive_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, lengths=None
):
    """Explicit loops over batch and time in float64; a sequence simply stops updating its state
    after its length (an independent formulation of the identity-step rule). B and C in any form,
    written out per channel. Differentiable by
    autograd (the gradient tests use it as the spec of the hand-written backward).
    Returns (out float64 (batch, dim, L), last_state float64 (batch, dim, N))."""
    f = torch.float64
    u, delta, A, B, C = (t.to(f) for t in (u, delta, A, B, C))
    D = None if D is None else D.to(f)
    z = None if z is None else z.to(f)
    bias = None if delta_bias is None else delta_bias.to(f)
    batch, dim, L = u.shape
    B, C = per_channel(B, batch, dim, L), per_channel(C, batch, dim, L)  # (batch, dim, N, L)
    N = A.shape[1]
    outs, lasts = [], []
    for b in range(batch):
        n_valid = L if lengths is None else int(lengths[b])
        h = torch.zeros(dim, N, dtype=f, device=u.device)
        row = []
        for t in range(L):
            if t < n_valid:
                dt = delta[b, :, t] if bias is None else delta[b, :, t] + bias
                if delta_softplus:
                    dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(dt)))
                h = torch.exp(dt[:, None] * A) * h + (dt * u[b, :, t])[:, None] * B[b, :, :, t]
            o = (h * C[b, :, :, t]).sum(-1)
            if D is not None:
                o = o + D * u[b, :, t]
            if z is not None:
                o = o * z[b, :, t] / (1 + torch.exp(-z[b, :, t]))
            row.append(o)
        outs.append(torch.stack(row, dim=-1) if row else torch.zeros(dim, 0, dtype=f, device=u.device))
        lasts.append(h)
    return torch.stack(outs), torch.stack(lasts)


def scan_args(kw: dict) -> tuple:
    """The positional order of ``selective_scan`` / mamba's ``selective_scan_ref`` up to delta_softplus."""
    return (kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"], kw["delta_softplus"])


def clone_inputs(kw: dict, requires_grad: bool = True, dtype: Optional[torch.dtype] = None) -> dict:
    """Fresh leaf copies (optionally cast; A stays fp32/fp64) so each backend gets its own grads."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().clone()
            if dtype is not None and k != "A":
                v = v.to(dtype)
            out[k] = v.requires_grad_(requires_grad)
        else:
            out[k] = v
    return out
