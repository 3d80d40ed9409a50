"""The fused streaming steps (csrc/mamba_step_*.cpp, csrc/fusion_step_ops.cpp) against the op-by-op step
in float64.

``m2rec_scan_cpu.mamba_step`` is MambaMixer's whole step for one token in one call (in_proj, conv window
update + taps + SiLU, x_proj, dt_proj, state update with D and the silu(z) gate, out_proj); it must give
the output, conv window and SSM state of the unfused ``MambaMixer.step_unchecked`` run in float64 on the
same weights, over several steps (the states are updated in place), for every ISA variant, on odd shapes
(batch 3, d_inner 48, N 7, dt_rank 3, d_conv 3 and 4, with and without the conv and projection biases).
``fusion_ffn_step`` (the M2Rec layer's gate, LayerNorm and FFN) must equal the Python form it replaces.
Tolerances scale with the values (tests/_tolerance.py); a wrong term is O(1) and fails.
"""
import itertools

import pytest
import torch

import m2rec.layers.m2rec_layer as m2rec_layer_module
from _tolerance import assert_close
from m2rec.layers import M2RecLayer
from m2rec.layers.mamba_mixer import MambaMixer, padded_transpose
from m2rec_kernels.scan import cpu as scan_cpu

STATUS = scan_cpu.cpu_scan_status()
ISAS = ["avx512", "avx2", "generic"]
TOL = dict(rtol=2e-5, atol=2e-5)
pytestmark = pytest.mark.skipif(not STATUS.available, reason=STATUS.describe())


def _isa_or_skip(isa):
    if not scan_cpu.isa_available(isa):
        pytest.skip(f"the {isa} variant is not built or this CPU lacks its instructions")
    return isa


def _mixers(d_conv, conv_bias, bias, seed=0):
    """An fp32 mixer at the odd shape and its float64 twin (same weights), both in eval mode."""
    torch.manual_seed(seed)
    m = MambaMixer(24, d_state=7, d_conv=d_conv, expand=2, dt_rank=3, conv_bias=conv_bias, bias=bias).eval()
    with torch.no_grad():  # make every parameter matter (zero-initialised biases, D = 1, A = -n)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m64 = MambaMixer(24, d_state=7, d_conv=d_conv, expand=2, dt_rank=3, conv_bias=conv_bias, bias=bias).double().eval()
    m64.load_state_dict(m.state_dict())
    return m, m64


def _fused(m, hidden, conv_state, ssm_state, isa):
    A, taps, D, dt_bias, in_t, x_t, dt_t, out_t = m._fused_step_params()
    return torch.ops.m2rec_scan_cpu.mamba_step(
        hidden, conv_state, ssm_state, in_t, m.in_proj.bias, taps, m.conv1d.bias, x_t, dt_t, A, D, dt_bias, out_t,
        m.out_proj.bias, m.d_model, scan_cpu.ISA_CODES[isa])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d_conv,conv_bias,bias", list(itertools.product([3, 4], [False, True], [False, True])))
def test_mamba_step_matches_unfused_fp64(isa, d_conv, conv_bias, bias):
    _isa_or_skip(isa)
    m, m64 = _mixers(d_conv, conv_bias, bias)
    batch = 3
    gen = torch.Generator().manual_seed(1)
    conv, ssm = m.zero_states(batch)
    conv.normal_(generator=gen)
    ssm.normal_(generator=gen)
    conv64, ssm64 = conv.double(), ssm.double()
    with torch.no_grad():
        for _ in range(d_conv + 2):  # past the initial window: every slot is overwritten by a step
            h = torch.randn(batch, 24, generator=gen)
            out = _fused(m, h, conv, ssm, isa)
            out64 = m64.step_unchecked(h.double(), conv64, ssm64)
            assert_close(out.double(), out64, **TOL)
            assert_close(conv.double(), conv64, **TOL)
            assert_close(ssm.double(), ssm64, **TOL)


def test_step_unchecked_routes_through_fused_op_and_falls_back():
    m, _ = _mixers(4, True, False)
    conv, ssm = m.zero_states(3)
    h = torch.randn(3, 24)
    with torch.no_grad():
        assert m._fused_step(h, conv, ssm)
        assert not m._fused_step(h.double(), conv, ssm)  # not fp32: the op-by-op path
        strided = torch.zeros(3, 7, m.d_inner).transpose(1, 2)
        assert not m._fused_step(h, conv, strided)  # state without unit stride along N
    assert not m._fused_step(h, conv, ssm)  # a gradient may be needed
    half = MambaMixer(24, d_state=7, expand=2, dt_rank=3)
    half.out_proj.bias = torch.nn.Parameter(torch.zeros(24, dtype=torch.float64))
    assert half._fused_step_params() is None  # a non-fp32 parameter: the op-by-op path
    # the two paths agree in fp32 (the fallback forced), state by state
    conv2, ssm2 = conv.clone(), ssm.clone()
    with torch.no_grad():
        for _ in range(3):
            h = torch.randn(3, 24)
            out = m.step_unchecked(h, conv, ssm)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(MambaMixer, "_fused_step", lambda *a: False)
                ref = m.step_unchecked(h, conv2, ssm2)
            assert_close(out, ref, **TOL)
            assert_close(conv, conv2, **TOL)
            assert_close(ssm, ssm2, **TOL)


def test_fused_step_params_follow_weight_changes():
    m, _ = _mixers(4, True, False)  # out_proj without bias: doubling its weight doubles the output
    conv, ssm = m.zero_states(3)
    h = torch.randn(3, 24)
    with torch.no_grad():
        before = m.step_unchecked(h, conv.clone(), ssm.clone())
        m.out_proj.weight.mul_(2.0)
        after = m.step_unchecked(h, conv.clone(), ssm.clone())
    assert_close(after, 2.0 * before, **TOL)


def test_mamba_step_bad_input_names_argument():
    m, _ = _mixers(4, True, False)
    conv, ssm = m.zero_states(3)
    h = torch.randn(3, 24)
    with pytest.raises(RuntimeError, match="conv_state must be an fp32"):
        _fused(m, h, conv.double(), ssm, "generic")
    with pytest.raises(RuntimeError, match="ssm_state must have shape"):
        _fused(m, h, conv, ssm[:, :, :5], "generic")
    A, taps, D, dt_bias, in_t, x_t, dt_t, out_t = m._fused_step_params()
    with pytest.raises(RuntimeError, match="in_weight_t must be"):
        torch.ops.m2rec_scan_cpu.mamba_step(h, conv, ssm, m.in_proj.weight, None, taps,  # not transposed
                                            m.conv1d.bias, x_t, dt_t, A, D, dt_bias, out_t, None, 24, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("semantic,frequency", [(True, True), (False, True), (True, False)])
def test_fusion_ffn_step_matches_python_form(dtype, semantic, frequency):
    torch.manual_seed(0)
    layer = M2RecLayer(d_model=24, d_state=7, d_conv=3, max_len=9, semantic=semantic, frequency=frequency)
    layer = layer.to(dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = 3
    state = layer.init_state(batch, dtype=dtype)
    state2 = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for pos in range(4):
            h = torch.randn(batch, 24, dtype=dtype)
            s = torch.randn(batch, 24, dtype=dtype) if semantic else None
            positions = torch.full((batch,), pos, dtype=torch.long)
            out = layer.step_unchecked(h, s, state, positions)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(m2rec_layer_module, "_compiled_fusion_step", lambda: False)
                ref = layer.step_unchecked(h, s, state2, positions)
            tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else TOL  # another summation order
            assert_close(out, ref, **tol)


def test_fusion_ffn_step_bad_branch_names_problem():
    h = torch.randn(3, 8)
    w = torch.randn(2, 16)
    ones, zeros = torch.ones(8), torch.zeros(8)
    args = (w, torch.zeros(2), ones, zeros, 1e-12, torch.randn(32, 8), torch.zeros(32), torch.randn(8, 32),
            torch.zeros(8), ones, zeros, 1e-12, None, None, 0)
    with pytest.raises(RuntimeError, match="every branch must be"):
        torch.ops.m2rec_scan_cpu.fusion_ffn_step([h, torch.randn(3, 7)], h, *args)
    with pytest.raises(RuntimeError, match="gate_weight must be"):
        torch.ops.m2rec_scan_cpu.fusion_ffn_step([h, h, h], h, *args)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [3, 1, 6])  # branches: the gate's logits in groups of up to 4, then the rest
def test_fusion_ffn_step_compiled_ffn_matches_fp64(isa, k):
    """The fp32 form with the gate, LayerNorms, the FFN's products and GELU on the step kernels (w1_t,
    w2_t) against the ATen form in float64 on the same weights; odd widths (d 24: a partial vector;
    inner 40: padded columns) and large inputs (GELU's tails)."""
    _isa_or_skip(isa)
    gen = torch.Generator().manual_seed(3)
    batch, d, inner = 5, 24, 40
    h = 3 * torch.randn(batch, d, generator=gen)
    branches = [3 * torch.randn(batch, d, generator=gen) for _ in range(k)]
    params = [0.3 * torch.randn(k, k * d, generator=gen), torch.randn(k, generator=gen),
              1 + 0.1 * torch.randn(d, generator=gen), 0.1 * torch.randn(d, generator=gen), 1e-12,
              torch.randn(inner, d, generator=gen) / d ** 0.5, torch.randn(inner, generator=gen),
              torch.randn(d, inner, generator=gen) / inner ** 0.5, torch.randn(d, generator=gen),
              1 + 0.1 * torch.randn(d, generator=gen), 0.1 * torch.randn(d, generator=gen), 1e-12]
    w1, w2 = params[5], params[7]
    out = torch.ops.m2rec_scan_cpu.fusion_ffn_step(branches, h, *params, padded_transpose(w1), padded_transpose(w2),
                                                   scan_cpu.ISA_CODES[isa])
    as64 = [p.double() if isinstance(p, torch.Tensor) else p for p in params]
    ref = torch.ops.m2rec_scan_cpu.fusion_ffn_step([b.double() for b in branches], h.double(), *as64, None, None, 0)
    assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)  # after LayerNorm: values O(1), fp32 erf to 1.5e-7
    # rows read in place at any row stride (the step's h and semantic stream are halves of one table
    # row), copied when their elements are not adjacent: the same result
    wide = torch.cat([h, branches[-1]], dim=1)
    cols = torch.stack(branches[:-1] + [h], dim=2).contiguous()  # (batch, d, k): elements k apart
    strided = torch.ops.m2rec_scan_cpu.fusion_ffn_step(
        [cols[:, :, i] for i in range(k - 1)] + [wide[:, d:]], wide[:, :d], *params, padded_transpose(w1),
        padded_transpose(w2), scan_cpu.ISA_CODES[isa])
    assert torch.equal(strided, out)
    with pytest.raises(RuntimeError, match="w1_t must be"):
        torch.ops.m2rec_scan_cpu.fusion_ffn_step(branches, h, *params, w1, padded_transpose(w2),  # not transposed
                                                 scan_cpu.ISA_CODES[isa])
