"""The direct (Toeplitz) filter kernel, the causal_filter op and the crossover rule, against the references.

Paths checked, forward and backward (dx and the kernel's / weight's gradient):
* the direct kernel — ``causal_filter`` (causal taps) and ``fft_filter`` (taps irfft(W), lags mod n_fft)
  on the "triton" backend for L <= DIRECT_MAX_L, under the Triton interpreter on CPU;
* the torch path of ``causal_filter`` (FFT with a written-out backward, ``causal_fft.py``);
* the torch.fft fallback above the crossover and for float64.
The references are ``causal_filter_reference`` / ``fft_filter_reference`` run in float64. fp32 tl.dot
runs with input_precision="ieee" (torch's TF32 flag is off), so fp32 is compared at 1e-4 of the
magnitude. Interpreter shapes stay small (one program per channel and 32-step tile) but odd: batch 3,
L 37 (two tiles, masked edges), d 48, K < L, L not a power of two.
"""
import pytest
import torch

from _tolerance import assert_close

from m2rec_kernels import causal_filter, fft_filter
from m2rec_kernels._backend import triton_interpreter_enabled
from m2rec_kernels.freq_filter import causal_filter_reference, causal_n_fft, fft_filter_reference, paths
from m2rec_kernels.freq_filter import function as dft_function
from m2rec_kernels.freq_filter.causal_fft import causal_filter_fft, smooth_fft_length


@pytest.fixture
def needs_triton(device):
    if device.type == "cpu" and not triton_interpreter_enabled():
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts the direct kernel's launches by kind (forward / dx / tap-gradient correlation)."""
    from m2rec_kernels.freq_filter import toeplitz_function as tf

    calls = []
    filt, corr = tf.toeplitz_filter, tf.toeplitz_corr

    def counting_filter(x, taps, *, anti=False, wrap=0):
        calls.append("dx" if anti else "y")
        return filt(x, taps, anti=anti, wrap=wrap)

    def counting_corr(a, v, n_lags):
        calls.append("dk")
        return corr(a, v, n_lags)

    monkeypatch.setattr(tf, "toeplitz_filter", counting_filter)
    monkeypatch.setattr(tf, "toeplitz_corr", counting_corr)
    return calls


def _grads(fn, x, f, grad_y):
    y = fn(x, f)
    return (y, *torch.autograd.grad(y, (x, f), grad_y))


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def _assert_close_scaled(got, want, rel=1e-4, what=""):
    """|got − want| <= rel · max|want| (+ a tiny floor): fp32 tolerance that follows the magnitude."""
    assert got.shape == want.shape, what
    err = (got.double() - want.double()).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * scale + 1e-6, f"{what}: error {err:.3g} vs scale {scale:.3g}"


def _causal_case(device, B, L, d, K, backend, dtype=torch.float32):
    x = torch.randn(B, L, d, device=device)
    k = torch.randn(K, d, device=device) * 0.3
    g = torch.randn(B, L, d, device=device)
    got = _grads(lambda a, b: causal_filter(a, b, backend=backend), _leaf(x, dtype), _leaf(k), g.to(dtype))
    want = _grads(causal_filter_reference, _leaf(x, torch.float64), _leaf(k, torch.float64), g.double())
    return got, want


# ---- causal_filter on the direct kernel ------------------------------------------------------------------

@pytest.mark.parametrize("B,L,d,K", [
    pytest.param(3, 37, 48, 37, id="odd-K=L"),
    pytest.param(3, 37, 6, 5, id="K<L"),
    pytest.param(2, 37, 5, 60, id="K>L"),
    pytest.param(3, 9, 7, 9, id="L9-16-step-tiles"),
    pytest.param(20, 70, 3, 70, id="B20-three-tiles"),
    pytest.param(70, 33, 2, 33, id="B70-two-batch-blocks"),
])
def test_causal_filter_kernel_matches_reference(device, needs_triton, kernel_launches, B, L, d, K):
    got, want = _causal_case(device, B, L, d, K, "triton")
    assert kernel_launches == ["y", "dx", "dk"]
    assert got[0].dtype == torch.float32 and got[2].shape == (K, d)
    for name, a, b in zip(("y", "dx", "dk"), got, want):
        _assert_close_scaled(a, b, what=name)
    if K > L:  # taps that reach no output get exactly zero gradient
        assert torch.equal(got[2][L:], torch.zeros_like(got[2][L:]))


def test_causal_filter_kernel_strided_inputs_and_single_gradients(device, needs_triton):
    B, L, d, K = 2, 19, 5, 11
    x = torch.randn(B, d, L, device=device).transpose(1, 2)          # strided x
    k = torch.randn(d, K, device=device).t()                          # strided kernel
    g = torch.randn(B, d, L, device=device).transpose(1, 2)
    want = _grads(causal_filter_reference, _leaf(x, torch.float64), _leaf(k, torch.float64), g.double())
    xl = _leaf(x)
    (dx,) = torch.autograd.grad(causal_filter(xl, k, backend="triton"), (xl,), g)
    kl = _leaf(k)
    (dk,) = torch.autograd.grad(causal_filter(x, kl, backend="triton"), (kl,), g)
    _assert_close_scaled(dx, want[1])
    _assert_close_scaled(dk, want[2])


def test_kernel_gradient_is_deterministic(device, needs_triton):
    x, k, g = torch.randn(3, 37, 4, device=device), torch.randn(37, 4, device=device), torch.randn(3, 37, 4, device=device)
    first = _grads(lambda a, b: causal_filter(a, b, backend="triton"), _leaf(x), _leaf(k), g)
    second = _grads(lambda a, b: causal_filter(a, b, backend="triton"), _leaf(x), _leaf(k), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _low_precision_check(device, dtype, atol, op):
    """DESIGN §5 (mamba's rule): kernel error <= 2 × the error of the same PyTorch math in that dtype
    (the reference with inputs in ``dtype``) + atol, both measured against float64."""
    B, L, d = 3, 37, 6
    x = torch.randn(B, L, d, device=device).to(dtype)
    g = torch.randn(B, L, d, device=device).to(dtype)
    if op == "causal":
        f = torch.randn(L, d, device=device) * 0.3
        kernel_fn = lambda a, b: causal_filter(a, b, backend="triton")  # noqa: E731
        ref_fn = causal_filter_reference
        f64 = f.double()
    else:
        n = 48
        f = torch.randn(n // 2 + 1, d, device=device, dtype=torch.complex64) * 0.3
        kernel_fn = lambda a, b: fft_filter(a, b, n, backend="triton")  # noqa: E731
        ref_fn = lambda a, b: fft_filter_reference(a, b, n)  # noqa: E731
        f64 = f.to(torch.complex128)
    exact = _grads(ref_fn, _leaf(x, torch.float64), _leaf(f64), g.double())
    kernel = _grads(kernel_fn, _leaf(x), _leaf(f), g)
    reference = _grads(ref_fn, _leaf(x), _leaf(f), g)
    for name, k, r, e in zip(("y", "dx", "dfilter"), kernel, reference, exact):
        assert k.dtype == r.dtype
        err_k = (k.to(e.dtype) - e).abs().max().item()
        err_r = (r.to(e.dtype) - e).abs().max().item()
        assert err_k <= 2 * err_r + atol, f"{name}: kernel error {err_k:.3g} vs reference {err_r:.3g}"


@pytest.mark.parametrize("op", ["causal", "fft_filter"])
def test_fp16_within_twice_reference_error(device, needs_triton, op):
    _low_precision_check(device, torch.float16, 1e-3, op)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["causal", "fft_filter"])
def test_bf16_within_twice_reference_error(device, op):
    _low_precision_check(device, torch.bfloat16, 1e-2, op)


@pytest.mark.gpu
def test_gpu_model_shapes_up_to_the_crossover(device):
    """Compiled kernels at the bench shape and at the crossover, both ops, forward and backward."""
    for B, L in ((64, 200), (1, 200), (8, paths.DIRECT_MAX_L)):
        got, want = _causal_case(device, B, L, 64, L, "triton")
        for a, b in zip(got, want):
            _assert_close_scaled(a, b, rel=1e-3)
        w = torch.randn(L // 2 + 1, 64, device=device, dtype=torch.complex64) * 0.3
        x, g = torch.randn(B, L, 64, device=device), torch.randn(B, L, 64, device=device)
        got = _grads(lambda a, b: fft_filter(a, b, L, backend="triton"), _leaf(x), _leaf(w), g)
        want = _grads(lambda a, b: fft_filter_reference(a, b, L), _leaf(x, torch.float64),
                      _leaf(w, torch.complex128), g.double())
        for a, b in zip(got, want):
            _assert_close_scaled(torch.view_as_real(a) if a.is_complex() else a,
                                 torch.view_as_real(b) if b.is_complex() else b, rel=1e-3)


# ---- fft_filter on the direct kernel (taps irfft(W), lags mod n_fft) ---------------------------------------

@pytest.mark.parametrize("B,L,d,n_fft,complex_weight", [
    pytest.param(3, 37, 48, 37, True, id="circular-L37"),
    pytest.param(3, 37, 5, causal_n_fft(37, 37), True, id="causal-pow2-n128"),
    pytest.param(2, 37, 5, 45, True, id="n45-both-triangles-wrap"),
    pytest.param(2, 37, 5, 45, False, id="n45-realview"),
    pytest.param(1, 9, 3, 9, False, id="circular-L9-realview"),
])
def test_fft_filter_direct_path_matches_reference(device, needs_triton, kernel_launches, B, L, d, n_fft,
                                                  complex_weight):
    x, g = torch.randn(B, L, d, device=device), torch.randn(B, L, d, device=device)
    w = torch.randn(n_fft // 2 + 1, d, 2, device=device) * 0.3
    if complex_weight:
        w = torch.view_as_complex(w)
    got = _grads(lambda a, b: fft_filter(a, b, n_fft, backend="triton"), _leaf(x), _leaf(w), g)
    w64 = w.to(torch.complex128) if complex_weight else w.double()
    want = _grads(lambda a, b: fft_filter_reference(a, b, n_fft), _leaf(x, torch.float64), _leaf(w64), g.double())
    assert kernel_launches == ["y", "dx", "dk", "dk"]
    assert got[2].dtype == w.dtype and got[2].shape == w.shape
    for a, b in zip(got, want):
        _assert_close_scaled(torch.view_as_real(a) if a.is_complex() else a,
                             torch.view_as_real(b) if b.is_complex() else b)


def test_fft_filter_direct_path_dc_and_nyquist_imaginary_parts(device, needs_triton):
    """DESIGN §9: with even n_fft, Im W at DC and Nyquist drops out and gets exactly zero gradient."""
    B, L, d, n_fft = 2, 20, 3, 40
    x = torch.randn(B, L, d, device=device)
    w = (torch.randn(n_fft // 2 + 1, d, device=device, dtype=torch.complex64)).requires_grad_(True)
    y = fft_filter(x, w, n_fft, backend="triton")
    (dw,) = torch.autograd.grad(y, (w,), torch.randn_like(y))
    w2 = w.detach().clone()
    w2[0] += 5j
    w2[-1] -= 3j
    assert_close(fft_filter(x, w2, n_fft, backend="triton"), y, rtol=1e-5, atol=1e-5)
    assert torch.equal(dw.imag[0], torch.zeros_like(dw.imag[0]))
    assert torch.equal(dw.imag[-1], torch.zeros_like(dw.imag[-1]))


# ---- the torch path of causal_filter ----------------------------------------------------------------------

@pytest.mark.parametrize("B,L,d,K", [(3, 37, 48, 37), (3, 37, 5, 4), (2, 6, 3, 9), (1, 1, 2, 1)])
def test_causal_filter_torch_path_matches_reference(device, B, L, d, K):
    x, k, g = torch.randn(B, L, d, device=device), torch.randn(K, d, device=device), torch.randn(B, L, d, device=device)
    exact = _grads(causal_filter_reference, _leaf(x, torch.float64), _leaf(k, torch.float64), g.double())
    fast64 = _grads(lambda a, b: causal_filter(a, b, backend="torch"), _leaf(x, torch.float64),
                    _leaf(k, torch.float64), g.double())
    fast32 = _grads(lambda a, b: causal_filter(a, b, backend="torch"), _leaf(x), _leaf(k), g)
    for a64, a32, e in zip(fast64, fast32, exact):
        assert a32.dtype == torch.float32 and a64.dtype == torch.float64 and a32.shape == e.shape
        assert_close(a64, e, rtol=1e-10, atol=1e-10)
        _assert_close_scaled(a32, e)


def test_causal_filter_torch_path_half_inputs_keep_their_dtypes(device):
    x = torch.randn(2, 10, 3, device=device).half().requires_grad_(True)
    k = torch.randn(10, 3, device=device).requires_grad_(True)
    y = causal_filter(x, k, backend="torch")
    y.float().sum().backward()
    assert y.dtype == torch.float16 and x.grad.dtype == torch.float16 and k.grad.dtype == torch.float32
    want = causal_filter_reference(x.detach().double(), k.detach().double())
    assert (y.double() - want).abs().max() < 1e-2


def test_smooth_fft_length():
    assert [smooth_fft_length(n) for n in (1, 7, 11, 399, 401, 1999)] == [1, 8, 12, 400, 405, 2000]
    with pytest.raises(ValueError, match="n must be >= 1"):
        smooth_fft_length(0)


def test_empty_inputs(device):
    for B, L in ((0, 5), (2, 0)):
        x = torch.randn(B, L, 3, device=device)
        assert causal_filter(x, torch.randn(4, 3, device=device), backend="torch").shape == (B, L, 3)
        assert causal_filter_fft(x, torch.randn(4, 3, device=device)).shape == (B, L, 3)


def test_empty_inputs_on_the_direct_path(device, needs_triton):
    for B, L in ((0, 5), (2, 0)):
        x = torch.randn(B, L, 3, device=device, requires_grad=True)
        k = torch.randn(4, 3, device=device, requires_grad=True)
        w = torch.randn(5, 3, device=device, dtype=torch.complex64, requires_grad=True)
        for y in (causal_filter(x, k, backend="triton"), fft_filter(x, w, 8, backend="triton")):
            assert y.shape == (B, L, 3)
            y.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w.grad))


# ---- the crossover rule: each path is taken somewhere ------------------------------------------------------

def test_crossover_rule():
    small, long = torch.empty(2, paths.DIRECT_MAX_L, 3), torch.empty(2, paths.DIRECT_MAX_L + 1, 3)
    assert paths.direct_filter_runs(small, torch.empty(4, 3))
    assert not paths.direct_filter_runs(long, torch.empty(4, 3))
    assert not paths.direct_filter_runs(small.double(), torch.empty(4, 3))
    assert not paths.direct_filter_runs(small, torch.empty(4, 3, dtype=torch.complex128))
    assert paths.direct_filter_runs(small.half(), torch.empty(4, 3, dtype=torch.complex64))


def test_above_the_crossover_and_for_float64_torch_fft_runs(device, needs_triton, kernel_launches, monkeypatch):
    monkeypatch.setattr(paths, "DIRECT_MAX_L", 8)   # a cheap stand-in for "long"
    x, k, g = torch.randn(2, 9, 3, device=device), torch.randn(9, 3, device=device), torch.randn(2, 9, 3, device=device)
    for got, want in zip(_grads(lambda a, b: causal_filter(a, b, backend="triton"), _leaf(x), _leaf(k), g),
                         _grads(lambda a, b: causal_filter(a, b, backend="torch"), _leaf(x), _leaf(k), g)):
        assert torch.equal(got, want)
    w = torch.randn(9, 3, device=device, dtype=torch.complex64)
    for got, want in zip(_grads(lambda a, b: fft_filter(a, b, 16, backend="triton"), _leaf(x), _leaf(w), g),
                         _grads(lambda a, b: fft_filter(a, b, 16, backend="torch"), _leaf(x), _leaf(w), g)):
        assert torch.equal(got, want)
    x64 = torch.randn(2, 5, 3, device=device, dtype=torch.float64)
    k64 = torch.randn(5, 3, device=device, dtype=torch.float64)
    assert torch.equal(causal_filter(x64, k64, backend="triton"), causal_filter(x64, k64, backend="torch"))
    assert kernel_launches == []
    # at the (patched) limit the direct kernel runs again
    causal_filter(torch.randn(1, 8, 2, device=device), torch.randn(8, 2, device=device), backend="triton")
    assert kernel_launches == ["y"]


def test_fft_filter_no_longer_launches_the_dense_dft(device, needs_triton, kernel_launches, monkeypatch):
    def no_dft(*args, **kwargs):
        raise AssertionError("fft_filter must not route to the dense-DFT kernel")

    monkeypatch.setattr(dft_function, "launch_dft_filter", no_dft)
    x = torch.randn(1, 9, 2, device=device, requires_grad=True)
    fft_filter(x, torch.randn(9, 2, device=device, dtype=torch.complex64), 16, backend="triton").sum().backward()
    assert kernel_launches == ["y", "dx"]


# ---- the tap-gradient correlation and the tile choice ------------------------------------------------------

@pytest.mark.parametrize("B,L,n_lags", [(3, 37, 37), (3, 37, 10), (2, 37, 50), (70, 20, 20), (2, 70, 70)])
def test_correlation_kernel(device, needs_triton, B, L, n_lags):
    """out[j] = sum_b sum_t a[b, t]·v[b, t − j]: bands, spills across bands, batch chunks, lags >= L."""
    from m2rec_kernels.freq_filter.toeplitz_function import toeplitz_corr

    d = 2
    a, v = torch.randn(B, L, d, device=device), torch.randn(B, L, d, device=device)
    want = torch.zeros(n_lags, d, dtype=torch.float64, device=device)
    for j in range(min(n_lags, L)):
        want[j] = (a[:, j:].double() * v[:, : L - j].double()).sum(dim=(0, 1))
    _assert_close_scaled(toeplitz_corr(a, v, n_lags), want)


def test_tile_choice_keeps_dot_dimensions_legal():
    from m2rec_kernels.freq_filter.toeplitz_function import HOST_TILES, tiles_for

    for B in (1, 3, 16, 17, 33, 64, 65, 1000):
        for L in (1, 16, 17, 200, 256):
            t = tiles_for(B, L)
            assert t in HOST_TILES
            assert t.block_t >= 16 and t.block_b >= 16
            assert t.block_b & (t.block_b - 1) == 0 and t.block_t & (t.block_t - 1) == 0
    assert tiles_for(64, 200) == (32, 64, 4) and tiles_for(1, 200) == (32, 16, 2)


# ---- input checks ------------------------------------------------------------------------------------------

def test_causal_filter_rejects_bad_inputs(device):
    x = torch.randn(2, 5, 3, device=device)
    with pytest.raises(ValueError, match="kernel must have shape"):
        causal_filter(x, torch.randn(4, 2, device=device))
    with pytest.raises(ValueError, match="kernel must have shape"):
        causal_filter(x, torch.randn(0, 3, device=device))
    with pytest.raises(ValueError, match="kernel must be 2-D"):
        causal_filter(x, torch.randn(4, 3, 1, device=device))
    with pytest.raises(TypeError, match="kernel must have dtype"):
        causal_filter(x, torch.randn(4, 3, device=device, dtype=torch.complex64))
    with pytest.raises(ValueError, match="x must be 3-D"):
        causal_filter(x[0], torch.randn(4, 3, device=device))
    with pytest.raises(ValueError, match="backend must be one of"):
        causal_filter(x, torch.randn(4, 3, device=device), backend="cuda")
