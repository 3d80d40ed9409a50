"""PyTorch reference of the selective scan (the spec the Triton kernels match; DESIGN §2.1).

Same math as mamba_ssm's ``selective_scan_ref`` (state-spaces/mamba,
``mamba_ssm/ops/selective_scan_interface.py``): Euler form h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·u_t·B_t,
y_t = <h_t, C_t>. mamba's reference materialises exp(Δ·A) for the whole sequence, (batch, dim, L, N);
here time is processed in chunks so that, without autograd, memory is O(batch·dim·N·chunk) plus the
outputs. Under autograd the per-step states are saved by autograd itself (what backward needs).

The state is kept in fp32 (fp64 when A or u is fp64, so gradcheck works); outputs are in u's dtype.
Inputs are assumed valid: the public functions in ``m2rec_kernels.scan`` check them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Steps per chunk: bounds the (batch, dim, chunk, N) temporaries while keeping exp and the output
# contraction batched over the chunk.
DEFAULT_CHUNK = 32


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
    """u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L); D, delta_bias: (dim,);
    lengths: (batch,) — steps t >= lengths[b] are identity (decay 1, input 0).

    Returns out (batch, dim, L) in u's dtype, and with ``return_last_state`` also the final state
    (batch, dim, N) in the compute dtype (fp32, or fp64 for fp64 inputs)."""
    cdt = compute_dtype(u, A)
    batch, dim, L = u.shape
    N = A.shape[1]
    A_c = A.to(cdt)
    valid = None
    if lengths is not None:
        valid = (torch.arange(L, device=u.device)[None, :] < lengths[:, None]).to(cdt)  # (batch, L)

    h = torch.zeros(batch, dim, N, dtype=cdt, device=u.device)
    ys = []
    for t0 in range(0, L, chunk):
        t1 = min(t0 + chunk, L)
        dt = effective_delta(delta[:, :, t0:t1], delta_bias, delta_softplus, cdt)  # (b, d, T)
        if valid is not None:
            dt = dt * valid[:, None, t0:t1]  # Δ = 0 makes the step the identity
        u_c = u[:, :, t0:t1].to(cdt)
        decay = torch.exp(dt.unsqueeze(-1) * A_c[:, None, :])  # (b, d, T, N)
        B_c = B[:, :, t0:t1].to(cdt).transpose(1, 2)  # (b, T, N)
        drive = (dt * u_c).unsqueeze(-1) * B_c.unsqueeze(1)  # (b, d, T, N)
        states = []
        # unbind, not decay[:, :, i]: autograd then stacks the step gradients once instead of
        # scattering each into a zero tensor of the whole chunk (quadratic in the chunk length).
        for decay_t, drive_t in zip(decay.unbind(2), drive.unbind(2)):
            h = torch.addcmul(drive_t, decay_t, h)
            states.append(h)
        hs = torch.stack(states, dim=2)  # (b, d, T, N)
        C_c = C[:, :, t0:t1].to(cdt)  # (b, N, T)
        ys.append(torch.einsum("bdtn,bnt->bdt", hs, C_c))
    y = torch.cat(ys, dim=2) if ys else torch.zeros(batch, dim, 0, dtype=cdt, device=u.device)
    out = y if D is None else y + u.to(cdt) * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(u.dtype)
    return (out, h) if return_last_state else out


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
) -> torch.Tensor:
    """One step of the scan (mamba_ssm ``ops/triton/selective_state_update.py`` semantics).

    state (batch, dim, N) is updated in place; x, dt, z: (batch, dim); B, C: (batch, N).
    Returns out (batch, dim) in x's dtype. The output is computed from the new state before it is
    rounded to the state's storage dtype (as mamba's Triton kernel does)."""
    cdt = compute_dtype(state, x, A)
    dt = effective_delta(dt, dt_bias, dt_softplus, cdt)  # (b, d)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(cdt))  # (b, d, N)
    drive = (dt * x.to(cdt)).unsqueeze(-1) * B.to(cdt).unsqueeze(1)
    new_state = torch.addcmul(drive, decay, state.to(cdt))
    with torch.no_grad():
        state.copy_(new_state)
    out = torch.einsum("bdn,bn->bd", new_state, C.to(cdt))
    if D is not None:
        out = out + x.to(cdt) * D.to(cdt)
    if z is not None:
        out = out * F.silu(z.to(cdt))
    return out.to(x.dtype)
