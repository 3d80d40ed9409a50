"""The causal filter's output at each sequence's last position from the compiled kernel
(``torch.ops.m2rec_scan_cpu.causal_filter_last``, used by ``FrequencyFilter.forward_last``) against the
full filter in float64, on odd shapes, mixed lengths and strided inputs; the PyTorch form runs where the
kernel cannot (gradients, backend "torch", float64)."""
import pytest
import torch

from _tolerance import assert_close
from m2rec.layers import FrequencyFilter
from m2rec_kernels.freq_filter.ring_step import causal_filter_last
from m2rec_kernels.scan.cpu import cpu_scan_status

needs_lib = pytest.mark.skipif(not cpu_scan_status().available, reason=cpu_scan_status().describe())


def _layer(d=48, max_len=40):
    torch.manual_seed(0)
    return FrequencyFilter(d, max_len, mode="causal")


def _want(layer, x, lengths):
    """forward(x)[b, lengths[b] - 1] in float64."""
    y = layer.double()(x.double())
    layer.float()
    return y[torch.arange(x.shape[0]), lengths - 1]


@needs_lib
@pytest.mark.parametrize("layout", ["contiguous", "batch-strided", "time-strided"])
def test_compiled_last_output_matches_the_full_filter_in_float64(layout):
    layer = _layer()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 37, 48 if layout != "time-strided" else 96, generator=g)
    x = {"contiguous": base, "batch-strided": torch.randn(6, 37, 48, generator=g)[::2],
         "time-strided": base[..., :48]}[layout]
    lengths = torch.tensor([37, 1, 20])
    with torch.no_grad():
        got = causal_filter_last(x, layer.kernel, lengths)
        assert got is not None  # the compiled kernel ran
        assert_close(got.double(), _want(layer, x, lengths), rtol=1e-5, atol=1e-5)
        assert torch.equal(layer.forward_last(x, lengths), got)


@needs_lib
def test_pytorch_form_where_the_kernel_cannot_run():
    layer = _layer(d=8, max_len=9)
    x = torch.randn(2, 9, 8, requires_grad=True)
    lengths = torch.tensor([9, 4])
    assert causal_filter_last(x, layer.kernel, lengths) is None  # a gradient is needed
    assert causal_filter_last(x.detach(), layer.kernel, lengths, backend="torch") is None
    assert causal_filter_last(x.detach().double(), layer.kernel.double(), lengths) is None
    y = layer.forward_last(x, lengths)
    y.sum().backward()  # gradients through the PyTorch form
    assert x.grad is not None and layer.kernel.grad is not None
    with torch.no_grad():
        assert_close(layer.forward_last(x.detach(), lengths).double(), _want(layer, x.detach(), lengths),
                     rtol=1e-5, atol=1e-5)


@needs_lib
def test_kernel_refuses_lengths_out_of_range():
    x, taps = torch.randn(2, 5, 4), torch.randn(5, 4)
    for bad in ([0, 3], [6, 3]):
        with pytest.raises(RuntimeError, match="lengths must lie in"):
            torch.ops.m2rec_scan_cpu.causal_filter_last(x, taps, torch.tensor(bad))
