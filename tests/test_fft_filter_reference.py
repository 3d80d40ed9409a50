"""The FFT filter's torch reference (DESIGN §2.2) against independent computations written here:
explicit convolution loops, FMLP-Rec's FilterLayer formula, autograd gradcheck."""
import pytest
import torch

from _tolerance import assert_close
from m2rec_kernels.freq_filter import causal_n_fft, causal_weight, fft_filter


def causal_conv_loop(x, k):
    """y[b, t, c] = sum_{s <= t} k[t - s, c] * x[b, s, c], by explicit loops (float64)."""
    B, L, d = x.shape
    K = k.shape[0]
    y = torch.zeros(B, L, d, dtype=torch.float64)
    for t in range(L):
        for s in range(max(0, t - K + 1), t + 1):
            y[:, t] += k[t - s].double() * x[:, s].double()
    return y


def circular_conv_loop(x, h):
    """y[b, t, c] = sum_s h[(t - s) mod L, c] * x[b, s, c] (float64)."""
    B, L, d = x.shape
    y = torch.zeros(B, L, d, dtype=torch.float64)
    for t in range(L):
        for s in range(L):
            y[:, t] += h[(t - s) % L].double() * x[:, s].double()
    return y


def fmlp_filter_layer(x, complex_weight):
    """FMLP-Rec FilterLayer's filtering step (Woeee/FMLP-Rec modules.py), without dropout/LayerNorm:
    rfft(norm='ortho') along the sequence, times the complex weight, irfft(n=L, norm='ortho')."""
    spec = torch.fft.rfft(x, dim=1, norm="ortho")
    spec = spec * torch.view_as_complex(complex_weight)
    return torch.fft.irfft(spec, n=x.shape[1], dim=1, norm="ortho")


@pytest.mark.parametrize("L,K", [(37, 5), (16, 16), (9, 1)])
def test_causal_matches_explicit_convolution(L, K):
    x = torch.randn(3, L, 6, dtype=torch.float64)
    k = torch.randn(K, 6, dtype=torch.float64)
    n_fft = causal_n_fft(L, K)
    y = fft_filter(x, causal_weight(k, n_fft), n_fft, backend="torch")
    assert_close(y, causal_conv_loop(x, k), rtol=1e-10, atol=1e-10)


def test_causal_n_fft_is_smallest_power_of_two():
    for L in range(1, 40):
        for K in (1, 2, 7, 33):
            n = causal_n_fft(L, K)
            assert n >= L + K - 1 and n & (n - 1) == 0 and (n == 1 or n // 2 < L + K - 1)


def test_causal_any_long_enough_n_fft_gives_same_result():
    L, K = 21, 6
    x = torch.randn(2, L, 5, dtype=torch.float64)
    k = torch.randn(K, 5, dtype=torch.float64)
    outs = [fft_filter(x, causal_weight(k, n), n, backend="torch") for n in (L + K - 1, L + K, 32, 45, 64)]
    for y in outs[1:]:
        assert_close(y, outs[0], rtol=1e-10, atol=1e-10)
    # too short a transform wraps the kernel around: the first outputs see the last inputs
    short = fft_filter(x, causal_weight(k, L), L, backend="torch")
    assert not torch.allclose(short, outs[0])


def test_causal_does_not_look_ahead():
    L, K = 37, 37
    x = torch.randn(3, L, 4, dtype=torch.float64)
    n_fft = causal_n_fft(L, K)
    w = causal_weight(torch.randn(K, 4, dtype=torch.float64), n_fft)
    y = fft_filter(x, w, n_fft, backend="torch")
    for t in (0, 10, 36):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 10
        y2 = fft_filter(x2, w, n_fft, backend="torch")
        assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=1e-9, atol=1e-9)
        if t + 1 < L:
            assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])


@pytest.mark.parametrize("L", [37, 16])
def test_circular_equals_fmlp_filter_layer_and_circular_convolution(L):
    d = 6
    x = torch.randn(3, L, d, dtype=torch.float64)
    w_real = torch.randn(L // 2 + 1, d, 2, dtype=torch.float64) * 0.1
    y = fft_filter(x, w_real, L, backend="torch")
    assert_close(y, fmlp_filter_layer(x, w_real), rtol=1e-10, atol=1e-10)
    # the same operation as a circular convolution with the impulse response h = irfft(W) * sqrt(L)
    # (ortho forward and ortho inverse combine to the unscaled DFT, so W = rfft(h, ortho) * sqrt(L)
    # is the weight of a circular convolution with h)
    h = torch.fft.irfft(torch.view_as_complex(w_real), n=L, dim=0, norm="backward")
    assert_close(y, circular_conv_loop(x, h), rtol=1e-10, atol=1e-10)


def test_real_view_and_complex_weight_agree_in_value_and_gradient():
    x = torch.randn(2, 11, 3, dtype=torch.float64)
    w_real = torch.randn(7, 3, 2, dtype=torch.float64, requires_grad=True)   # n_fft = 12
    w_cplx = torch.view_as_complex(w_real.detach().clone()).requires_grad_(True)
    y1 = fft_filter(x, w_real, 12, backend="torch")
    y2 = fft_filter(x, w_cplx, 12, backend="torch")
    assert_close(y1, y2, rtol=0, atol=0)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert w_real.grad.shape == w_real.shape and w_cplx.grad.is_complex()
    assert_close(torch.view_as_real(w_cplx.grad), w_real.grad)


@pytest.mark.parametrize("n_fft", [7, 10, 13])
def test_gradcheck_float64(n_fft):
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n_fft // 2 + 1, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fft_filter(a, b, n_fft, backend="torch"), (x, w))


def test_half_inputs_computed_in_fp32_and_returned_in_input_dtype():
    x = torch.randn(2, 9, 4)
    w = torch.randn(9, 4, dtype=torch.complex64)
    y32 = fft_filter(x, w, 16, backend="torch")
    y16 = fft_filter(x.half(), w, 16, backend="torch")
    assert y16.dtype == torch.float16
    assert_close(y16.float(), y32, rtol=2e-3, atol=2e-3)


def test_bad_inputs_raise_and_name_the_argument():
    x = torch.randn(2, 8, 4)
    w = torch.randn(5, 4, dtype=torch.complex64)
    with pytest.raises(ValueError, match="n_fft"):
        fft_filter(x, torch.randn(4, 4, dtype=torch.complex64), 6)       # n_fft < L
    with pytest.raises(TypeError, match="n_fft"):
        fft_filter(x, w, 8.0)
    with pytest.raises(ValueError, match="n_fft"):
        fft_filter(x[:, :0], torch.randn(1, 4, dtype=torch.complex64), 0)
    with pytest.raises(ValueError, match="weight"):
        fft_filter(x, torch.randn(6, 4, dtype=torch.complex64), 8)       # wrong frequency count
    with pytest.raises(ValueError, match="weight"):
        fft_filter(x, torch.randn(5, 3, dtype=torch.complex64), 8)       # wrong channel count
    with pytest.raises(ValueError, match="weight"):
        fft_filter(x, torch.randn(5, 4), 8)                               # real but not a (…, 2) view
    with pytest.raises(ValueError, match="weight"):
        fft_filter(x, torch.randn(5, 4, 3), 8)
    with pytest.raises(TypeError, match="weight"):
        fft_filter(x, w.real.long(), 8)
    with pytest.raises(ValueError, match="x"):
        fft_filter(x[0], w, 8)
    with pytest.raises(TypeError, match="x"):
        fft_filter(x.long(), w, 8)
    with pytest.raises(TypeError, match="weight"):
        fft_filter(x, [[1.0]], 8)
    with pytest.raises(ValueError, match="backend"):
        fft_filter(x, w, 8, backend="cuda")
    with pytest.raises(ValueError, match="n_fft"):
        causal_weight(torch.randn(9, 4), 8)                               # n_fft < K
    with pytest.raises(ValueError, match="kernel"):
        causal_weight(torch.randn(9, 4, dtype=torch.complex64), 16)
    with pytest.raises(ValueError, match="K"):
        causal_n_fft(8, 0)


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 5, 0)])
def test_empty_batch_or_channels_give_empty_output_and_gradient(shape):
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(3, shape[2], 2)
    y = fft_filter(x, w, 5, backend="torch")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
