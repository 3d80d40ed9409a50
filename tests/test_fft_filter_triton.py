"""The dense-DFT Triton filter kernel against the torch.fft reference, forward and backward.

``fft_filter`` no longer routes to this kernel (the direct Toeplitz kernel is cheaper wherever either
runs, see m2rec_kernels/freq_filter/paths.py; its tests are in test_direct_filter.py); it is called here
through ``function.fft_filter_triton``. On CPU the kernel runs under the Triton interpreter (conftest
sets TRITON_INTERPRET=1), so the shapes stay tiny but odd (batch 3, L 37, d 48) and cover masking and
the multi-block loops. fp32 tl.dot runs with input_precision="ieee" (torch's TF32 flag is off), so fp32
is compared at 1e-4.
"""
import pytest
import torch

from _tolerance import assert_close, magnitude
from m2rec_kernels._backend import triton_interpreter_enabled
from m2rec_kernels.freq_filter import causal_n_fft, causal_weight, fft_filter
from m2rec_kernels.freq_filter import function as triton_function


@pytest.fixture(autouse=True)
def _needs_a_triton_target(device):
    if device.type == "cpu" and not triton_interpreter_enabled():
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")


def _inputs(device, B, L, d, n_fft, dtype=torch.float32, complex_weight=True, scale=1.0):
    x = torch.randn(B, L, d, device=device).to(dtype).requires_grad_(True)
    w = torch.randn(n_fft // 2 + 1, d, 2, device=device) * scale
    if complex_weight:
        w = torch.view_as_complex(w)
    return x, w.requires_grad_(True)


def _filter(x, w, n_fft, backend):
    """backend "triton": the dense-DFT kernel; "torch": the reference through the public op."""
    if backend == "triton":
        return triton_function.fft_filter_triton(x, w, n_fft)
    return fft_filter(x, w, n_fft, backend=backend)


def _run(x, w, n_fft, backend, grad_y):
    y = _filter(x, w, n_fft, backend)
    dx, dw = torch.autograd.grad(y, (x, w), grad_y)
    return y, dx, dw


# circular (n_fft = L), causal with a power-of-two and a non-power-of-two n_fft >= L + K - 1,
# and a longer one that needs several time and frequency blocks (L 70 > 64, F 71 > 64)
CASES = [
    pytest.param(3, 37, 48, 37, id="circular-L37"),
    pytest.param(3, 37, 48, causal_n_fft(37, 5), id="causal-pow2-n64"),
    pytest.param(3, 37, 48, 37 + 9 - 1, id="causal-n45"),
    pytest.param(1, 70, 20, 140, id="multiblock-L70-n140"),
]


@pytest.mark.parametrize("complex_weight", [True, False], ids=["complex", "realview"])
@pytest.mark.parametrize("B,L,d,n_fft", CASES)
def test_fp32_forward_backward_match_reference(device, B, L, d, n_fft, complex_weight):
    x, w = _inputs(device, B, L, d, n_fft, complex_weight=complex_weight)
    grad_y = torch.randn(B, L, d, device=device)
    y, dx, dw = _run(x, w, n_fft, "triton", grad_y)
    y_ref, dx_ref, dw_ref = _run(x, w, n_fft, "torch", grad_y)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert dw.dtype == w.dtype and dw.shape == w.shape
    assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)
    assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4)


def test_imaginary_weight_at_dc_and_nyquist_has_no_effect(device):
    """DESIGN §9: with even n_fft, Im W at DC and Nyquist drops out (as in torch.fft) and gets an
    exactly zero gradient from the kernel (the reference's is zero up to rounding)."""
    B, L, d, n_fft = 3, 37, 48, 64
    x, w = _inputs(device, B, L, d, n_fft)
    grad_y = torch.randn(B, L, d, device=device)
    y, _, dw = _run(x, w, n_fft, "triton", grad_y)
    w2 = w.detach().clone()
    w2[0] += 5j
    w2[-1] -= 3j
    assert_close(_filter(x, w2, n_fft, "triton"), y, rtol=1e-5, atol=1e-5)
    assert torch.equal(dw.imag[0], torch.zeros_like(dw.imag[0]))
    assert torch.equal(dw.imag[-1], torch.zeros_like(dw.imag[-1]))
    _, _, dw_ref = _run(x, w, n_fft, "torch", grad_y)
    assert dw_ref.imag[[0, -1]].abs().max() < 1e-5


def test_causal_kernel_gradient_through_causal_weight(device):
    """The model's causal path: a real kernel k -> causal_weight -> fft_filter; dk agrees and the
    output is the explicit causal convolution."""
    B, L, d, K = 3, 37, 48, 6
    n_fft = causal_n_fft(L, K)
    x = torch.randn(B, L, d, device=device, requires_grad=True)
    k = torch.randn(K, d, device=device, requires_grad=True)
    grad_y = torch.randn(B, L, d, device=device)
    outs = {}
    for backend in ("triton", "torch"):
        y = _filter(x, causal_weight(k, n_fft), n_fft, backend)
        outs[backend] = (y, *torch.autograd.grad(y, (x, k), grad_y))
    for got, want in zip(outs["triton"], outs["torch"]):
        assert_close(got, want, rtol=1e-4, atol=1e-4)
    conv = sum(k[s].double() * torch.nn.functional.pad(x.double(), (0, 0, s, 0))[:, :L] for s in range(K))
    assert_close(outs["triton"][0].double(), conv, rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs_and_single_gradients(device):
    B, L, d, n_fft = 2, 19, 33, 19
    x = torch.randn(B, d, L, device=device).transpose(1, 2).requires_grad_(True)   # strided x
    w = torch.randn(d, n_fft // 2 + 1, device=device, dtype=torch.complex64).T.requires_grad_(True)
    grad_y = torch.randn(B, d, L, device=device).transpose(1, 2)
    y_ref = fft_filter(x, w, n_fft, backend="torch")
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), grad_y)
    # only dx wanted (the kernel skips the weight-gradient rows) ...
    y = _filter(x, w.detach(), n_fft, "triton")
    assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    (dx,) = torch.autograd.grad(y, (x,), grad_y)
    assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)
    # ... and only dW wanted (the kernel skips writing dx)
    y = _filter(x.detach(), w, n_fft, "triton")
    (dw,) = torch.autograd.grad(y, (w,), grad_y)
    assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4)


def test_weight_gradient_is_deterministic(device):
    x, w = _inputs(device, 3, 37, 48, 37)
    grad_y = torch.randn(3, 37, 48, device=device)
    first = _run(x, w, 37, "triton", grad_y)
    second = _run(x, w, 37, "triton", grad_y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _low_precision_check(device, dtype, atol):
    """DESIGN §5: kernel error <= 2 x the reference's own error in that dtype + atol (scaled to the
    magnitude), against fp64."""
    B, L, d, n_fft = 3, 37, 48, 64
    x, w = _inputs(device, B, L, d, n_fft, dtype=dtype, scale=0.3)
    grad_y = torch.randn(B, L, d, device=device).to(dtype)
    exact = _run(x.detach().double().requires_grad_(True), w.detach().to(torch.complex128).requires_grad_(True),
                 n_fft, "torch", grad_y.double())
    kernel = _run(x, w, n_fft, "triton", grad_y)
    reference = _run(x, w, n_fft, "torch", grad_y)
    for name, k, r, e in zip(("y", "dx", "dw"), kernel, reference, exact):
        assert k.dtype == r.dtype
        err_k = (k.to(e.dtype) - e).abs().max().item()
        err_r = (r.to(e.dtype) - e).abs().max().item()
        assert err_k <= 2 * err_r + atol * magnitude(e), f"{name}: kernel error {err_k:.3g} vs reference {err_r:.3g}"


def test_fp16_within_twice_reference_error(device):
    _low_precision_check(device, torch.float16, atol=1e-3)


@pytest.mark.gpu
def test_bf16_within_twice_reference_error(device):
    _low_precision_check(device, torch.bfloat16, atol=1e-2)


@pytest.mark.gpu
def test_tf32_dot_when_torch_allows_tf32(device):
    """With torch's TF32 matmul flag on, the kernel's fp32 tl.dot uses TF32: ~1e-3 relative."""
    x, w = _inputs(device, 3, 37, 48, 64)
    grad_y = torch.randn(3, 37, 48, device=device)
    y_ref, dx_ref, dw_ref = _run(x, w, 64, "torch", grad_y)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        y, dx, dw = _run(x, w, 64, "triton", grad_y)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_larger_shapes_up_to_the_limit(device):
    """Compiled kernel at the model's shapes and at the size limit (n_fft = MAX_N_FFT)."""
    for B, L, d, n_fft in ((64, 200, 64, 200), (8, 200, 64, 512), (4, 512, 64, triton_function.MAX_N_FFT)):
        x, w = _inputs(device, B, L, d, n_fft, scale=0.3)
        grad_y = torch.randn(B, L, d, device=device)
        for got, want in zip(_run(x, w, n_fft, "triton", grad_y), _run(x, w, n_fft, "torch", grad_y)):
            assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_kernel_refuses_what_it_does_not_take(device):
    """Beyond MAX_N_FFT, or for float64, the dense-DFT entry point says so instead of launching."""
    B, L, d = 2, 9, 5
    n_fft = triton_function.MAX_N_FFT + 2
    x, w = _inputs(device, B, L, d, n_fft)
    with pytest.raises(ValueError, match="n_fft <= 1024"):
        triton_function.fft_filter_triton(x, w, n_fft)
    x64, w64 = _inputs(device, B, L, d, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        triton_function.fft_filter_triton(x64, w64, 16)


def test_autotuned_launch_path(device, monkeypatch):
    """The compiled (CUDA) launch goes through triton.autotune with a grid from the chosen BLOCK_D;
    exercised here with one small config (the interpreter cannot benchmark several)."""
    import triton

    one = [triton.Config({"BLOCK_T": 16, "BLOCK_F": 16, "BLOCK_D": 16}, num_warps=4)]
    monkeypatch.setattr(triton_function, "GPU_CONFIGS", one)
    monkeypatch.setattr(triton_function, "_use_autotune", lambda x: True)
    B, L, d, n_fft = 2, 37, 20, 45        # 3 time blocks, 2 frequency blocks, 2 channel blocks
    x, w = _inputs(device, B, L, d, n_fft)
    grad_y = torch.randn(B, L, d, device=device)
    for got, want in zip(_run(x, w, n_fft, "triton", grad_y), _run(x, w, n_fft, "torch", grad_y)):
        assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert id(one) in triton_function._tuned_kernels   # the autotuned launcher was the one used
