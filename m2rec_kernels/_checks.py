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


def check_lengths(op: str, lengths, batch: int, max_len: int, device: torch.device, lo: int = 0) -> torch.Tensor:
    """``lengths`` (batch,) integer tensor with lo <= length <= max_len."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{op}: lengths must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{op}: lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{op}: lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"{op}: lengths is on {lengths.device} but the other inputs are on {device}")
    check_range(op, "lengths", lengths, lo=lo, hi=max_len)
    return lengths


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing this call: value checks then cannot read the
    data, and become assertions in the graph (``require``)."""
    return torch.compiler.is_compiling()


def require(cond: torch.Tensor, message: str) -> None:
    """Inside a traced region (``tracing()``): an assertion on a boolean tensor that stays in the
    graph and raises RuntimeError(message) when the compiled or exported code meets bad data — a value
    check is never dropped. (Eager code reads the values and raises ValueError with them instead.)"""
    torch._assert_async(cond, message)


def check_range(op: str, name: str, t: torch.Tensor, lo: Optional[int] = None, hi: Optional[int] = None,
                what: Optional[str] = None) -> None:
    """Every value of the integer tensor ``t`` lies in [lo, hi] (None: unbounded). Raises ValueError
    naming the range and the min/max found; traced, an assertion with the same message (``require``).
    ``what`` replaces the default "<name> must lie in [lo, hi]"."""
    if t.numel() == 0:
        return

    def message():  # formatted only when needed: this check runs on every call
        if what:
            return f"{op}: {what}"
        low, high = ("-inf" if lo is None else lo), ("inf" if hi is None else hi)
        return f"{op}: {name} must lie in [{low}, {high}]"

    if tracing():
        ok = torch.ones((), dtype=torch.bool, device=t.device)
        if lo is not None:
            ok = ok & (t.min() >= lo)
        if hi is not None:
            ok = ok & (t.max() <= hi)
        require(ok, message() + " (checked in the compiled graph)")
        return
    found_lo, found_hi = torch.stack(torch.aminmax(t)).tolist()  # one pass, one sync
    if (lo is not None and found_lo < lo) or (hi is not None and found_hi > hi):
        raise ValueError(f"{message()}, got min {found_lo}, max {found_hi}")


def check_index_pool(op: str, name: str, idx, batch: int, pool: int, device: torch.device) -> torch.Tensor:
    """``idx`` (batch,) integer rows of a pool of ``pool`` rows: each < pool, negative = padding (no
    row), no row named twice."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(f"{op}: {name} must be an integer tensor, got {idx.dtype}")
    if idx.shape != (batch,):
        raise ValueError(f"{op}: {name} must have shape (batch,) = ({batch},), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{op}: {name} is on {idx.device} but the state is on {device}")
    if batch == 0:
        return idx
    rows = idx.long()
    # a repeated row: among the sorted non-negative indices, two equal neighbours
    ordered = torch.where(rows >= 0, rows, -1 - torch.arange(batch, device=device)).sort().values
    repeats = (ordered[1:] == ordered[:-1]).any() if batch > 1 else torch.zeros((), dtype=torch.bool, device=device)
    bad_range = f"{op}: {name} must hold state rows in [0, pool_size={pool}) (negative = padding)"
    bad_repeat = (f"{op}: {name} must not name a state row twice (two requests would update one state "
                  "at once)")
    if tracing():
        require(rows.max() < pool, bad_range + " (checked in the compiled graph)")
        require(~repeats, bad_repeat + " (checked in the compiled graph)")
        return idx
    hi, repeated = torch.stack([rows.max(), repeats.long()]).tolist()
    if hi >= pool:
        raise ValueError(f"{bad_range}, got {hi}")
    if repeated:
        dup = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
        raise ValueError(f"{bad_repeat}: row {dup} appears more than once")
    return idx
