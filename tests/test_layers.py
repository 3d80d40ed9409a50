"""Layers of m2rec against independent computations written here (explicit loops, float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_close
from m2rec.layers import FeedForward, FrequencyFilter, M2RecLayer, MambaMixer


def _perturb(module, scale=0.3):
    """Move every parameter away from its structured initialisation (D = 1, zero biases, ...) so that
    a wrongly wired term cannot hide behind a special value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def naive_mamba(mixer: MambaMixer, h: torch.Tensor) -> torch.Tensor:
    """Mamba-1 slow path written out per batch element, time step, channel and state."""
    W_in, W_x = mixer.in_proj.weight, mixer.x_proj.weight
    W_dt, b_dt = mixer.dt_proj.weight, mixer.dt_proj.bias
    conv_w, conv_b = mixer.conv1d.weight[:, 0, :], mixer.conv1d.bias  # (d_inner, K)
    A = -torch.exp(mixer.A_log)
    D, W_out = mixer.D, mixer.out_proj.weight
    di, N, R, K = mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv
    batch, L, _ = h.shape
    out = torch.zeros(batch, L, mixer.d_model, dtype=h.dtype)
    for b in range(batch):
        xz = h[b] @ W_in.T  # (L, 2 di)
        x_raw, z = xz[:, :di], xz[:, di:]
        state = torch.zeros(di, N, dtype=h.dtype)
        for t in range(L):
            # causal depthwise conv: tap j of the kernel sees x[t - (K - 1 - j)]
            xc = conv_b.clone()
            for j in range(K):
                s = t - (K - 1 - j)
                if s >= 0:
                    xc = xc + conv_w[:, j] * x_raw[s]
            xc = xc * torch.sigmoid(xc)
            proj = W_x @ xc
            dt_in, Bt, Ct = proj[:R], proj[R:R + N], proj[R + N:]
            delta = torch.log1p(torch.exp(W_dt @ dt_in + b_dt))  # softplus (values stay well below 20)
            y = torch.zeros(di, dtype=h.dtype)
            for d in range(di):
                for n in range(N):
                    state[d, n] = math.exp(float(delta[d] * A[d, n])) * state[d, n] + delta[d] * Bt[n] * xc[d]
                y[d] = (state[d] * Ct).sum() + D[d] * xc[d]
            y = y * z[t] * torch.sigmoid(z[t])
            out[b, t] = W_out @ y
    return out


def test_mamba_mixer_matches_naive_loops():
    mixer = MambaMixer(8, d_state=3, d_conv=3, expand=2, backend="torch").double()
    _perturb(mixer, 0.2)
    h = torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        got = mixer(h)
        want = naive_mamba(mixer, h)
    assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_mamba_mixer_initialisation_follows_mamba():
    dt_min, dt_max = 0.002, 0.05
    mixer = MambaMixer(40, d_state=5, d_conv=3, expand=2, dt_min=dt_min, dt_max=dt_max)
    di = 80
    assert mixer.dt_rank == math.ceil(40 / 16)
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.x_proj.bias is None
    assert mixer.conv1d.bias is not None and mixer.conv1d.weight.shape == (di, 1, 3)
    assert mixer.conv1d.padding == (2,) and mixer.conv1d.groups == di
    assert mixer.x_proj.weight.shape == (mixer.dt_rank + 10, di)
    assert_close(mixer.A_log, torch.log(torch.arange(1.0, 6.0)).expand(di, 5))
    assert_close(mixer.D, torch.ones(di))
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    # log-uniform: the log step sizes spread over the range rather than sitting at one value
    assert torch.log(dt).std() > 0.2 * (math.log(dt_max) - math.log(dt_min)) / math.sqrt(12)
    bound = mixer.dt_rank ** -0.5
    assert mixer.dt_proj.weight.abs().max() <= bound


def test_mamba_mixer_is_causal_and_checks_input():
    mixer = MambaMixer(8, d_state=4, backend="torch")
    _perturb(mixer, 0.1)
    h = torch.randn(2, 10, 8)
    h2 = h.clone()
    h2[:, 6:] = torch.randn(2, 4, 8)
    with torch.no_grad():
        a, b = mixer(h), mixer(h2)
    assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    with pytest.raises(ValueError, match="hidden"):
        mixer(torch.randn(2, 10, 9))
    with pytest.raises(TypeError, match="hidden"):
        mixer(torch.ones(2, 10, 8, dtype=torch.int64))


def test_causal_filter_is_an_explicit_causal_convolution():
    filt = FrequencyFilter(6, max_len=15, mode="causal", backend="torch").double()
    with torch.no_grad():
        filt.kernel.normal_()
    x = torch.randn(3, 11, 6, dtype=torch.float64)
    k = filt.kernel
    want = torch.zeros_like(x)
    for t in range(11):
        for s in range(t + 1):
            want[:, t] += k[t - s] * x[:, s]
    assert_close(filt(x), want, rtol=1e-10, atol=1e-10)


def test_causal_filter_does_not_look_ahead_and_ignores_right_padding():
    filt = FrequencyFilter(5, max_len=20, mode="causal", backend="torch")
    with torch.no_grad():
        filt.kernel.normal_()
    x = torch.randn(2, 17, 5)
    y = filt(x)
    for t in (0, 8, 15):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        y2 = filt(x2)
        assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:], atol=1e-3)
        # the prefix alone (shorter transform, fewer kernel taps) gives the same outputs
        assert_close(filt(x[:, : t + 1]), y[:, : t + 1], rtol=1e-5, atol=1e-5)


def test_circular_filter_is_fmlp_rec_and_needs_max_len():
    filt = FrequencyFilter(4, max_len=9, mode="circular", backend="torch")
    x = torch.randn(2, 9, 4)
    w = torch.view_as_complex(filt.complex_weight)
    want = torch.fft.irfft(torch.fft.rfft(x, dim=1, norm="ortho") * w, n=9, dim=1, norm="ortho")
    assert_close(filt(x), want, rtol=1e-5, atol=1e-6)
    # every position sees every other: changing the last input moves the first output
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(filt(x2)[:, 0], filt(x)[:, 0])
    with pytest.raises(ValueError, match="max_len"):
        filt(torch.randn(2, 8, 4))


def test_frequency_filter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        FrequencyFilter(4, 8, mode="fourier")
    filt = FrequencyFilter(4, 8, backend="torch")
    with pytest.raises(ValueError, match="max_len"):
        filt(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match="x"):
        filt(torch.randn(1, 5, 3))


def _manual_layer(layer: M2RecLayer, h, s):
    """M2RecLayer recomputed from its sub-modules with the gate written out (DESIGN §3)."""
    branches = [layer.mamba(h)]
    if layer.filter is not None:
        branches.append(layer.filter(h))
    if s is not None:
        branches.append(s)
    if len(branches) > 1:
        logits = torch.stack([torch.cat(branches, -1) @ layer.gate_weight[i] for i in range(len(branches))], -1)
        alpha = torch.softmax(logits + layer.gate_bias, -1)
        fused_in = sum(alpha[..., i:i + 1] * b for i, b in enumerate(branches))
    else:
        fused_in = branches[0]
    n = layer.fusion_norm
    fused = F.layer_norm(h + fused_in, (h.shape[-1],), n.weight, n.bias, n.eps)
    f = layer.ffn
    return F.layer_norm(fused + f.w_2(F.gelu(f.w_1(fused))), (h.shape[-1],), f.layer_norm.weight,
                        f.layer_norm.bias, f.layer_norm.eps)


@pytest.mark.parametrize("semantic,frequency", [(True, True), (False, True), (True, False), (False, False)])
def test_m2rec_layer_matches_manual_composition(semantic, frequency):
    layer = M2RecLayer(d_model=8, d_state=4, max_len=12, dropout=0.3, semantic=semantic, frequency=frequency,
                       backend="torch").eval()
    _perturb(layer, 0.1)
    h, s = torch.randn(2, 12, 8), (torch.randn(2, 12, 8) if semantic else None)
    assert layer.n_branches == 1 + semantic + frequency
    assert hasattr(layer, "gate_weight") == (layer.n_branches > 1)
    with torch.no_grad():
        assert_close(layer(h, s), _manual_layer(layer, h, s), rtol=1e-5, atol=1e-5)


def test_m2rec_layer_gates_and_padding_invariance():
    layer = M2RecLayer(d_model=8, d_state=4, max_len=16, dropout=0.0, backend="torch").eval()
    _perturb(layer, 0.1)
    h, s = torch.randn(2, 14, 8), torch.randn(2, 14, 8)
    with torch.no_grad():
        out, gates = layer(h, s, return_gates=True)
        assert gates.shape == (2, 14, 3)
        assert_close(gates.sum(-1), torch.ones(2, 14))
        # causal layer: a right-padded batch gives the same outputs on the valid prefix
        assert_close(layer(h[:, :9], s[:, :9]), out[:, :9], rtol=1e-5, atol=1e-5)


def test_m2rec_layer_circular_is_not_padding_invariant():
    layer = M2RecLayer(d_model=8, d_state=4, max_len=10, filter="circular", dropout=0.0, semantic=False,
                       backend="torch").eval()
    _perturb(layer, 0.1)
    assert not layer.causal
    h = torch.randn(1, 10, 8)
    h2 = h.clone()
    h2[:, 6:] = 0.0  # different "padding" after position 5
    with torch.no_grad():
        assert not torch.allclose(layer(h)[:, :6], layer(h2)[:, :6], atol=1e-4)


def test_m2rec_layer_dropout_only_in_training_and_semantic_checks():
    layer = M2RecLayer(d_model=8, d_state=4, max_len=10, dropout=0.5, backend="torch")
    h, s = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    torch.manual_seed(1)
    a = layer(h, s)
    torch.manual_seed(2)
    b = layer(h, s)
    assert not torch.allclose(a, b)
    layer.eval()
    assert_close(layer(h, s), layer(h, s))
    with pytest.raises(ValueError, match="semantic"):
        layer(h)
    with pytest.raises(ValueError, match="s"):
        layer(h, torch.randn(2, 9, 8))
    with pytest.raises(ValueError, match="semantic=False"):
        M2RecLayer(d_model=8, d_state=4, max_len=10, semantic=False, backend="torch")(h, s)


def test_feed_forward_matches_formula():
    ffn = FeedForward(6, 24, dropout=0.0)
    _perturb(ffn)
    x = torch.randn(3, 5, 6)
    a = x @ ffn.w_1.weight.T + ffn.w_1.bias
    inner = a * 0.5 * (1 + torch.erf(a / math.sqrt(2)))  # exact (erf) GELU
    r = x + inner @ ffn.w_2.weight.T + ffn.w_2.bias
    want = (r - r.mean(-1, keepdim=True)) / torch.sqrt(r.var(-1, unbiased=False, keepdim=True) + 1e-12)
    want = want * ffn.layer_norm.weight + ffn.layer_norm.bias
    assert_close(ffn(x), want, rtol=1e-5, atol=1e-5)
