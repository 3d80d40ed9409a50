"""The comparison every numerical test uses: ``torch.testing.assert_close`` with ``atol`` scaled to the
size of the expected values (docs/DESIGN.md §5).

A value computed in fp32 from terms of size S is accurate to about eps·S, whatever its own size: an
output that is small because large terms cancel (y = Σ h·C with a large state h), or a gradient
summed over batch and time, carries the rounding of its terms. How large that rounding is depends on
the CPU's vector unit and summation order (AVX-512, AVX2, ``ATEN_CPU_CAPABILITY=default``), so a fixed
``atol`` tuned on one machine fails on another. Here ``atol`` is multiplied by max(1, max |expected|)
(finite entries), so tolerances are unchanged for values of order one and grow with the magnitude;
``rtol`` keeps its elementwise meaning and exact comparisons (``rtol=0, atol=0``) stay exact.
"""
from __future__ import annotations

import torch


def magnitude(expected) -> float:
    """max(1, largest finite |entry|) of a tensor (1 for anything else)."""
    if not isinstance(expected, torch.Tensor) or not (expected.is_floating_point() or expected.is_complex()):
        return 1.0
    finite = expected.detach().abs()
    finite = finite[torch.isfinite(finite)]
    return max(1.0, float(finite.max())) if finite.numel() else 1.0


def assert_close(actual, expected, *, rtol=None, atol=None, **kwargs) -> None:
    """``torch.testing.assert_close`` with ``atol`` scaled by :func:`magnitude` of ``expected``."""
    if atol is not None:
        atol = atol * magnitude(expected)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kwargs)
