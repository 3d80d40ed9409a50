"""Input validation shared by the public ops: errors name the argument and what was expected."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Check one tensor argument of ``op``; ``shape`` entries that are None are not checked."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                expected = tuple("*" if s is None else s for s in shape)
                raise ValueError(
                    f"{op}: {name} must have shape {expected} (dim {i} = {want}), got {tuple(t.shape)}"
                )
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    return t


def check_lengths(op: str, lengths, batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    """``lengths`` (batch,) integer tensor with 0 <= length <= max_len."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{op}: lengths must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{op}: lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{op}: lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"{op}: lengths is on {lengths.device} but the other inputs are on {device}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > max_len):
        raise ValueError(
            f"{op}: lengths must lie in [0, {max_len}], got min {int(lengths.min())}, max {int(lengths.max())}"
        )
    return lengths
