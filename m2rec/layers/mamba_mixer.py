"""The temporal branch: a Mamba (selective state space) mixer, interchangeable with ``mamba_ssm.Mamba``.

Same parameter names, shapes and initialisation as ``mamba_ssm.Mamba`` (state-spaces/mamba,
``mamba_ssm/modules/mamba_simple.py``, read to learn its conventions), so a state_dict moves between
the two in either direction. The math is Mamba's "slow path" (no fused ``mamba_inner_fn``):

    x, z = split(in_proj(h));  x = silu(causal depthwise conv1d(x))
    dt, B, C = split(x_proj(x));  dt = dt_proj.weight @ dt   (bias applied inside the scan)
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z, delta_bias = dt_proj.bias, softplus)
    out = out_proj(y)

The scan is ``m2rec_kernels.selective_scan`` with a selectable backend ("auto" | "torch" | "triton").
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2rec_kernels import selective_scan
from m2rec_kernels._checks import check_tensor


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MambaMixer: {name} must be a positive int, got {value!r}")
    return value


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """A, D and the dt bias enter the scan in fp32 (as in mamba_ssm), or fp64 for a double model."""
    return t if t.dtype == torch.float64 else t.float()


class MambaMixer(nn.Module):
    """Mamba-1 mixer over (batch, L, d_model) sequences; causal along L.

    Args mirror ``mamba_ssm.Mamba`` (random dt init, dt_scale 1, conv bias, no in/out projection
    bias); ``backend`` selects the selective-scan implementation.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        backend: str = "auto",
    ):
        super().__init__()
        self.d_model = _check_positive_int("d_model", d_model)
        self.d_state = _check_positive_int("d_state", d_state)
        self.d_conv = _check_positive_int("d_conv", d_conv)
        self.expand = expand
        self.d_inner = int(expand * d_model)
        if self.d_inner < 1:
            raise ValueError(f"MambaMixer: expand * d_model must be >= 1, got expand={expand!r}")
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else _check_positive_int("dt_rank", dt_rank)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"MambaMixer: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.backend = backend

        # Projections and convolution use PyTorch's default initialisation, as mamba_ssm.Mamba does.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=True
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # dt_proj: weight uniform in ±dt_rank^-1/2 (variance-preserving); bias = softplus^-1(dt) with dt
        # log-uniform in [dt_min, dt_max], floored, so the initial step sizes span two decades.
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # Model-level re-initialisers (e.g. RecBole style) leave this bias alone, as mamba_ssm's do.
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation A = -(1..N) for every channel, stored as log; D skip = 1. Both fp32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True
        # Created last, as in mamba_ssm.Mamba: the same seed then draws the same initial parameters.
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
                f"dt_rank={self.dt_rank}, backend={self.backend!r}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model)."""
        check_tensor("MambaMixer", "hidden", hidden, shape=(None, None, self.d_model))
        L = hidden.shape[1]
        # (2·d_inner, d) @ (batch, d, L) -> (batch, 2·d_inner, L): channels-first, as the scan expects.
        xz = torch.matmul(self.in_proj.weight, hidden.transpose(1, 2))
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :L])  # left padding d_conv-1, keep the first L: causal
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.matmul(self.dt_proj.weight, dt.transpose(1, 2))  # (batch, d_inner, L); bias in the scan
        y = selective_scan(
            x,
            delta,
            -torch.exp(_at_least_fp32(self.A_log)),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            D=_at_least_fp32(self.D),
            z=z,
            delta_bias=_at_least_fp32(self.dt_proj.bias),
            delta_softplus=True,
            backend=self.backend,
        )
        return self.out_proj(y.transpose(1, 2))
