"""The causal depthwise conv1d (+ SiLU) in front of Mamba's scan: the compiled CPU kernel
(``backend="cpu"``, m2rec_kernels/conv/cpu.py + scan/csrc/conv_*) against the reference in float64,
forward and backward (x, weight, bias), for every ISA variant this CPU runs; the reference against
mamba_ssm's definition; layouts, dtypes, thread counts, the public op's dispatch and its errors.

fp32 tolerances scale with the largest value of each compared tensor (tests/_tolerance.py). An output
is a sum of K products plus a bias (gradients: of K products, or of batch x L products for the weight
and bias), so the kernel is within a few fp32 roundings of float64; 1e-5 leaves a wide margin while a
wrong or missing term (O(1)) still fails.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_close
from m2rec_kernels import causal_conv1d
from m2rec_kernels.conv import causal_conv1d_ref
from m2rec_kernels.conv import cpu as conv_cpu
from m2rec_kernels.scan import cpu as scan_cpu

STATUS = scan_cpu.cpu_scan_status()
ISAS = ["avx512", "avx2", "generic"]
TOL = dict(rtol=1e-5, atol=1e-5)
LAYOUTS = ["time_major", "rows", "slice"]


def _isa_or_skip(isa):
    why = conv_cpu.cpu_conv_unavailable()
    if why is not None:
        pytest.skip(f"compiled conv not available: {why}")
    if not scan_cpu.isa_available(isa):
        pytest.skip(f"the {isa} variant is not built or this CPU lacks its instructions")
    return isa


def _make_x(batch, dim, L, layout, g, dtype=torch.float32):
    """x (batch, dim, L) in a layout: the transpose of a (batch, L, dim) tensor ("time_major", what
    MambaMixer passes on CPU), contiguous (batch, dim, L) ("rows", mamba's layout), or the first half
    of a (batch, L, 2 dim) tensor's channels ("slice": in_proj's x next to z)."""
    if layout == "time_major":
        x = torch.randn(batch, L, dim, generator=g).transpose(1, 2)
    elif layout == "rows":
        x = torch.randn(batch, dim, L, generator=g)
    else:
        x = torch.randn(batch, L, 2 * dim, generator=g)[..., :dim].transpose(1, 2)
    return x.to(dtype)


def _run(fn, x, w, b, dy, silu):
    """(y, dx, dw, db) of fn on fresh leaves; db None without a bias."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    if x.dim() == 3 and x.stride(1) == 1:  # keep the layout of x (clone() keeps strides for dense tensors)
        leaves[0] = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    y = fn(*leaves, silu)
    y.backward(dy.to(y.dtype))
    return (y.detach(), *(t.grad if t is not None else None for t in leaves))


def _against_float64(isa, batch, dim, L, K, silu, use_bias, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _make_x(batch, dim, L, layout, g)
    w = torch.randn(dim, K, generator=g) * 0.5
    b = torch.randn(dim, generator=g) if use_bias else None
    dy = torch.randn(batch, dim, L, generator=g)
    got = _run(lambda *a: conv_cpu.causal_conv1d_cpu(*a, isa=isa), x, w, b, dy, silu)
    want = _run(causal_conv1d_ref, x.double(), w.double(), None if b is None else b.double(), dy.double(), silu)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), got, want):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32, name
        assert_close(a.double(), e, **TOL, msg=lambda m: f"{name} ({isa}, {layout}, K={K}): {m}")
    return got


# ---------------------------------------------------------------- the reference

@pytest.mark.parametrize("K", [1, 2, 4, 5])
def test_reference_is_the_causal_conv_of_its_definition(K):
    """y_t = bias + sum_k w[k] x[t - (K - 1) + k], written as a loop, in float64."""
    g = torch.Generator().manual_seed(K)
    x, w, b = torch.randn(3, 7, 9, generator=g).double(), torch.randn(7, K, generator=g).double(), torch.randn(7).double()
    want = b[None, :, None].expand(3, 7, 9).clone()
    for t in range(9):
        for k in range(K):
            s = t - (K - 1) + k
            if s >= 0:
                want[:, :, t] += w[:, k] * x[:, :, s]
    torch.testing.assert_close(causal_conv1d_ref(x, w, b), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(causal_conv1d_ref(x, w, b, silu=True), F.silu(want), rtol=1e-12, atol=1e-12)


def test_reference_matches_mambas_conv_module():
    """MambaMixer's conv is nn.Conv1d(groups=dim, padding=K-1) cut to L, as in mamba_ssm's slow path."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(48, 48, 4, groups=48, padding=3)
    x = torch.randn(3, 48, 37)
    with torch.no_grad():
        want = F.silu(conv(x)[..., :37])
        assert_close(causal_conv1d_ref(x, conv.weight[:, 0], conv.bias, silu=True), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the compiled kernel against float64

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("silu,use_bias", list(itertools.product([True, False], repeat=2)))
def test_forward_backward_odd_shapes(isa, K, silu, use_bias):
    _isa_or_skip(isa)
    for layout in LAYOUTS:
        _against_float64(isa, 3, 48, 37, K, silu, use_bias, layout)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch,dim,L,K", [(1, 1, 1, 4), (2, 5, 3, 4), (2, 17, 2, 5), (1, 130, 64, 4),
                                           (2, 263, 11, 3), (1, 16, 300, 2)])
def test_channel_tails_short_and_long_sequences(isa, batch, dim, L, K):
    """dim not a multiple of the vector width or of a task's channel group, L shorter than the taps."""
    _isa_or_skip(isa)
    for layout in LAYOUTS:
        _against_float64(isa, batch, dim, L, K, True, True, layout, seed=dim)


@pytest.mark.parametrize("isa", ISAS)
def test_outputs_and_gradients_keep_the_input_layout(isa):
    _isa_or_skip(isa)
    for layout in LAYOUTS:
        y, dx, _, _ = _against_float64(isa, 2, 24, 9, 4, True, True, layout)
        time_major = layout != "rows"
        assert (y.stride(1) == 1) == time_major and (dx.stride(1) == 1) == time_major, layout


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(isa, dtype):
    """bf16/fp16 inputs are computed in fp32 and rounded once at the end, as the reference does: the
    kernel's error against float64 is at most twice the reference's (mamba's rule) plus a little."""
    _isa_or_skip(isa)
    g = torch.Generator().manual_seed(1)
    x = _make_x(3, 48, 37, "time_major", g, dtype)
    w, b = (torch.randn(48, 4, generator=g) * 0.5).to(dtype), torch.randn(48, generator=g).to(dtype)
    dy = torch.randn(3, 48, 37, generator=g).to(dtype)
    got = _run(lambda *a: conv_cpu.causal_conv1d_cpu(*a, isa=isa), x, w, b, dy, True)
    ref = _run(causal_conv1d_ref, x, w, b, dy, True)
    exact = _run(causal_conv1d_ref, x.double(), w.double(), b.double(), dy.double(), True)
    eps = torch.finfo(dtype).eps
    for name, a, r, e in zip(("y", "dx", "dweight", "dbias"), got, ref, exact):
        assert a.dtype == dtype, name
        err, ref_err = (a.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        assert err <= 2 * ref_err + eps * e.abs().max().item(), (name, err, ref_err)


@pytest.mark.parametrize("isa", ISAS)
def test_extreme_values(isa):
    """SiLU's tails (pre-activations of +-100, where exp overflows or vanishes) stay finite and exact."""
    _isa_or_skip(isa)
    x = torch.tensor([[[-100.0, -30.0, 0.0, 30.0, 100.0, 1e-30]]]).repeat(1, 5, 1)
    w, b = torch.zeros(5, 3), torch.zeros(5)
    w[:, -1] = 1.0  # y_t = silu(x_t)
    y = conv_cpu.causal_conv1d_cpu(x, w, b, True, isa=isa)
    assert torch.isfinite(y).all()
    assert_close(y, F.silu(x), rtol=1e-6, atol=1e-30)


def test_thread_count_does_not_change_a_bit():
    """Every output has one writer and the weight/bias sums run in a fixed order over the batch."""
    if conv_cpu.cpu_conv_unavailable() is not None:
        pytest.skip(conv_cpu.cpu_conv_unavailable())
    g = torch.Generator().manual_seed(2)
    x = _make_x(7, 70, 41, "time_major", g)
    w, b, dy = torch.randn(70, 4, generator=g), torch.randn(70, generator=g), torch.randn(7, 70, 41, generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            results.append(_run(conv_cpu.causal_conv1d_cpu, x, w, b, dy, True))
    finally:
        torch.set_num_threads(before)
    for a, e in zip(*results):
        assert torch.equal(a, e)


# ---------------------------------------------------------------- the public op

def test_auto_picks_the_compiled_kernel_and_float64_stays_on_the_reference():
    g = torch.Generator().manual_seed(3)
    x, w, b = _make_x(2, 9, 8, "time_major", g), torch.randn(9, 4, generator=g), torch.randn(9, generator=g)
    if conv_cpu.cpu_conv_unavailable() is None:
        assert torch.equal(causal_conv1d(x, w, b, activation="silu"), conv_cpu.causal_conv1d_cpu(x, w, b, True))
        with pytest.raises(TypeError, match="backend='cpu' supports float16, bfloat16 and float32"):
            causal_conv1d(x.double(), w.double(), backend="cpu")
    assert torch.equal(causal_conv1d(x, w, b, activation="swish", backend="torch"), causal_conv1d_ref(x, w, b, True))
    assert torch.equal(causal_conv1d(x.double(), w.double(), backend="auto"), causal_conv1d_ref(x.double(), w.double()))


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, b: causal_conv1d(x[0], w, b), ValueError, "x must be 3-D"),
    (lambda x, w, b: causal_conv1d(x, w[:5], b), ValueError, r"weight must have shape \(dim=9, K\)"),
    (lambda x, w, b: causal_conv1d(x, w[:, :0], b), ValueError, "K >= 1"),
    (lambda x, w, b: causal_conv1d(x, w[:, 0], b), ValueError, "weight must be 2-D"),
    (lambda x, w, b: causal_conv1d(x, w, b[:3]), ValueError, "bias must have shape"),
    (lambda x, w, b: causal_conv1d(x, w, b, activation="relu"), ValueError, "activation must be one of"),
    (lambda x, w, b: causal_conv1d(x.long(), w, b), TypeError, "x must have dtype"),
    (lambda x, w, b: causal_conv1d(x, w, b, backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_arguments_are_named(call, error, match):
    x, w, b = torch.randn(2, 9, 8), torch.randn(9, 4), torch.randn(9)
    with pytest.raises(error, match=match):
        call(x, w, b)
