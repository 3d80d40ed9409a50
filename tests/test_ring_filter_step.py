"""The causal filter's compiled streaming step (``ring_filter_step``, csrc/ring_filter_*.cpp) against its
PyTorch reference in float64, for every ISA variant this CPU runs: the slot written in place, the
output at one phase and at mixed phases (users at different positions), wrap-around past max_len, and
channel counts around the vector widths (partial vectors). fp32 tolerance: a sum of max_len products,
within a few fp32 roundings of float64 (1e-5 of the largest value); a wrong tap is O(1) and fails.
"""
import pytest
import torch

from _tolerance import assert_close
from m2rec_kernels.freq_filter.ring_step import ring_filter_step, ring_filter_step_reference
from m2rec_kernels.scan import cpu as scan_cpu
from _cpu_library import ISAS, STATUS, needs_lib  # noqa: F401
from _cpu_library import isa_or_skip as _isa_or_skip

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [1, 7, 48, 64, 67, 130])
@pytest.mark.parametrize("phase", ["one", "mixed"])
@pytest.mark.parametrize("batch", [3, 11])  # 11: blocks of 4 (AVX-512) or 2 rows and a row left over
def test_against_the_float64_reference(isa, d, phase, batch):
    _isa_or_skip(isa)
    g = torch.Generator().manual_seed(d)
    M = 37
    history = torch.randn(batch, M, d, generator=g)
    x = torch.randn(batch, d, generator=g)
    kernel = torch.randn(M, d, generator=g)
    # mixed: every row at its own phase, wrapped (>= M) or not, the newest slot at either end
    mixed = torch.tensor([0, 36, 100, 7, 73, 2, 111, 36, 1, 19, 58])[:batch]
    positions = torch.full((batch,), 5) if phase == "one" else mixed
    want_hist = history.double().clone()
    want = ring_filter_step_reference(want_hist, x.double(), kernel.double(), positions)
    got = ring_filter_step(history, x, kernel, positions, backend="cpu", isa=isa)
    assert got.dtype == torch.float32 and got.shape == (batch, d)
    assert_close(got.double(), want, **FP32_TOL)
    assert torch.equal(history.double(), want_hist), "the slot is x, the rest of the history untouched"


@pytest.mark.parametrize("isa", ISAS)
def test_strided_history_and_input(isa):
    """A history that is a slice of a bigger buffer (row strides), x a slice of wider rows."""
    _isa_or_skip(isa)
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(4, 40, 70, generator=g)
    history = buf[1:, 2:39, 3:51]
    xw = torch.randn(3, 96, generator=g)
    kernel = torch.randn(37, 48, generator=g)
    positions = torch.tensor([3, 40, 74])
    want_hist = history.double().clone()
    want = ring_filter_step_reference(want_hist, xw[:, :48].double(), kernel.double(), positions)
    before = buf.clone()
    got = ring_filter_step(history, xw[:, :48], kernel, positions, backend="cpu", isa=isa)
    assert_close(got.double(), want, **FP32_TOL)
    assert torch.equal(history.double(), want_hist)
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[1:, 2:39, 3:51] = False
    assert torch.equal(buf[mask], before[mask])


def test_falls_back_to_the_reference_where_the_kernel_does_not_apply():
    """fp64 and a gradient take the reference (same result as calling it)."""
    g = torch.Generator().manual_seed(1)
    history = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    x, kernel = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    pos = torch.tensor([1, 7])
    h2 = history.clone()
    assert torch.equal(ring_filter_step(history, x, kernel, pos), ring_filter_step_reference(h2, x, kernel, pos))
    k = kernel.float().requires_grad_()
    out = ring_filter_step(history.float(), x.float(), k, pos)
    out.sum().backward()
    assert k.grad is not None
