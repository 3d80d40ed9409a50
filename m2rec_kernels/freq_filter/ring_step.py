"""The causal filter's streaming step over a ring of past inputs (``FrequencyFilter.step``):

    history[b, slot] = x[b], slot = positions[b] mod M;   y[b] = sum_s history[b, s] * kernel[(slot - s) mod M]

history (batch, M, d) holds the input at position i in slot i mod M (zeros where there was none yet),
kernel (M, d) the taps by age. ``history`` is updated in place.

``backend``: "torch" gathers the taps by age and takes one vector dot along the slots (the reference);
"cpu" (``csrc/ring_filter_*.cpp``) writes the slot and sums in one pass over the history, without the
(batch, M, d) tap table or product. "auto" takes the compiled step for fp32 CPU tensors when the
library is built, no gradient is needed and nothing traces the call; else the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import tracing


def ring_filter_step_reference(history: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor,
                               positions: torch.Tensor) -> torch.Tensor:
    batch, M, _ = history.shape
    slot = torch.remainder(positions, M)
    history[torch.arange(batch, device=x.device), slot] = x.to(history.dtype)
    # tap of slot s = kernel[age], age = (slot of the newest - s) mod M
    slots = torch.arange(M, device=x.device)
    if bool((slot == slot[0]).all()):  # one phase for the whole batch: one (M, d) tap table
        ages = torch.remainder(slot[0] - slots, M)
    else:
        ages = torch.remainder(slot[:, None] - slots[None, :], M)
    return weighted_sum(history, kernel[ages])


def weighted_sum(window: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """sum_w taps[.., w, :] · window[:, w, :] -> (batch, d), in fp32 at least. A vector dot along the
    window, not einsum: einsum lowers this to a bmm over channels with a transposed copy, 5x slower at
    (64, 200, 64) on one CPU thread."""
    wide = torch.float64 if window.dtype == torch.float64 or taps.dtype == torch.float64 else torch.float32
    return torch.linalg.vecdot(window.to(wide), taps.to(wide), dim=-2).to(window.dtype)


def _compiled_step_unavailable(history, x, kernel) -> Optional[str]:
    """None when the compiled step can run on these tensors, else why not."""
    from ..scan.cpu import library_op_unavailable

    if history.device.type != "cpu":
        return "the tensors are not on the CPU"
    if history.dtype != torch.float32 or kernel.dtype != torch.float32 or x.dtype != torch.float32:
        return "it takes float32 history, input and kernel"
    if history.shape[2] > 1 and history.stride(2) != 1:
        return "it takes a history with unit stride along d"
    return library_op_unavailable("m2rec_scan_cpu", "ring_filter_step", "ring filter step")


def ring_filter_step(history: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, positions: torch.Tensor,
                     backend: str = "auto", isa: Optional[str] = None) -> torch.Tensor:
    """See the module docstring. The caller checks shapes (history (batch, M, d), x (batch, d), kernel
    (M, d), positions (batch,) non-negative integers on one device). ``isa`` picks the compiled
    variant (tests); ``backend``: "auto", "cpu" or "torch" (a model's "triton" runs the reference)."""
    if backend in ("auto", "cpu"):
        why = _compiled_step_unavailable(history, x, kernel)
        if why is None and (tracing() or (torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad
                                                                       or history.requires_grad))):
            why = "a gradient is needed or the call is traced"
        if why is None:
            from ..scan.cpu import _isa_code

            return torch.ops.m2rec_scan_cpu.ring_filter_step(history, x, kernel, positions, _isa_code(isa))
        if backend == "cpu" and isa is not None:
            raise RuntimeError(f"ring_filter_step: the compiled step cannot run: {why}")
    return ring_filter_step_reference(history, x, kernel, positions)


def causal_filter_last(x: torch.Tensor, kernel: torch.Tensor, lengths: torch.Tensor,
                       backend: str = "auto") -> Optional[torch.Tensor]:
    """The causal filter's output at each sequence's last position, y[b] = sum_{t < n_b} x[b, t] *
    kernel[n_b - 1 - t] (n_b = lengths[b] in [1, L]), from the compiled kernel
    (``csrc/ring_filter_ops.cpp``: one pass over the history, no tap table or product formed) — or None
    where it cannot run (backend "torch", not fp32 CPU with unit stride along d, a gradient needed, a
    traced call, the library not built): the caller then takes its PyTorch form. The caller checks
    shapes and lengths (the kernel checks the lengths again before reading)."""
    if backend not in ("auto", "cpu") or tracing():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad):
        return None
    if x.device.type != "cpu" or x.dtype != torch.float32 or kernel.dtype != torch.float32:
        return None
    if x.shape[2] > 1 and x.stride(2) != 1:
        return None
    from ..scan.cpu import library_op_unavailable

    if library_op_unavailable("m2rec_scan_cpu", "causal_filter_last", "causal filter at the last position"):
        return None
    return torch.ops.m2rec_scan_cpu.causal_filter_last(x, kernel, lengths)

