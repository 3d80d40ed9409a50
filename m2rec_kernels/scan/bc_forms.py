"""The forms the selective scan's B and C take (DESIGN §2.1), as mamba_ssm's ``selective_scan_fn`` does
(state-spaces/mamba, ``selective_scan_ref``: a 2-D B/C is time-invariant, a 4-D one grouped):

* per sequence, (batch, N, L): one row per sequence and step, shared by every channel (the model's form);
* grouped, (batch, G, N, L) with dim % G == 0: channel d reads group d // (dim / G);
* time-invariant, (dim, N): one row per channel, the same at every step and in every sequence.

B and C take their forms independently (B grouped with C time-invariant is fine). Gradients come back in
each input's form: grouped dB[b, g] sums the group's channels, time-invariant dB[d] sums the batch and
time. A per-sequence B is the grouped form with G = 1, and the backends treat it so where that is free.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor

PER_SEQUENCE, GROUPED, TIME_INVARIANT = "per-sequence", "grouped", "time-invariant"


def bc_form(X: torch.Tensor) -> str:
    """The form of a checked B or C, from its number of dimensions."""
    return {2: TIME_INVARIANT, 3: PER_SEQUENCE, 4: GROUPED}[X.dim()]


def bc_groups(X: torch.Tensor) -> Optional[int]:
    """G of a per-sequence (1) or grouped B/C; None when it is time-invariant."""
    return None if X.dim() == 2 else (1 if X.dim() == 3 else X.shape[1])


def as_grouped(X: torch.Tensor) -> torch.Tensor:
    """A per-sequence (batch, N, L) B/C as the grouped (batch, 1, N, L); other forms unchanged."""
    return X.unsqueeze(1) if X.dim() == 3 else X


def check_bc(op: str, name: str, X, batch: int, dim: int, N: int, L: int, device) -> None:
    """B or C in one of the three forms, on ``device``; the error names the argument and the forms."""
    check_tensor(op, name, X, device=device)
    forms = (f"(batch={batch}, N={N}, L={L}), grouped (batch={batch}, G, N={N}, L={L}) with G dividing "
             f"dim={dim}, or time-invariant (dim={dim}, N={N})")
    if X.dim() == 4:
        G = X.shape[1]
        if G < 1 or dim % G:
            raise ValueError(f"{op}: {name} is grouped with G = {G} groups (shape {tuple(X.shape)}), but G must "
                             f"divide dim = {dim} (each group serves dim / G channels)")
        want = (batch, G, N, L)
    elif X.dim() == 3:
        want = (batch, N, L)
    elif X.dim() == 2:
        want = (dim, N)
    else:
        raise ValueError(f"{op}: {name} must have shape {forms}; got {X.dim()}-D shape {tuple(X.shape)}")
    if tuple(X.shape) != want:
        raise ValueError(f"{op}: {name} must have shape {forms}; got {tuple(X.shape)}")
