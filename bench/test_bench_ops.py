"""Op benchmarks: each public op of ``m2rec_kernels``, forward and forward+backward, at the model's shapes.

Backends compared per op:

* ``selective_scan`` — ``triton`` (fused kernel), ``cpu`` (the compiled C++ scan, CPU only; ``impl``
  names its ISA variant), ``torch`` (our reference), ``mamba_ssm`` (its ``selective_scan_fn`` with the
  CUDA extension, the op a Mamba user would call) and ``mamba_ssm_ref`` (mamba_ssm's own PyTorch
  ``selective_scan_ref``, the only mamba_ssm path on a CPU);
* ``selective_scan_final`` (forward only: the output at each sequence's last step and the final state,
  what last-position inference needs) — ``cpu`` and ``torch``;
* ``fft_filter`` (causal weight, K = L taps, n_fft = next power of two >= 2L-1) — ``triton`` (the direct
  kernel on the taps irfft(W) for L <= 256, over the whole L × L matrix), ``triton-dft`` (the dense-DFT
  kernel, which fft_filter no longer routes to: timed so that a GPU run can confirm the static estimate
  behind that rule, ``freq_filter/paths.py``), ``torch`` and ``torch.fft`` (the plain rfft/irfft formula
  FMLP-Rec uses, no checks);
* ``causal_filter`` (K = L taps: the model's causal filter) — ``triton`` (direct kernel, L²/2 per row and
  channel, for L <= 256; torch.fft above), ``torch`` (FFT with a written-out backward) and ``torch.fft``
  (rfft of the kernel and the plain formula under autograd);
* ``gated_fusion`` (3 branches) — ``triton`` and ``torch`` (there is no ecosystem op);
* ``causal_conv1d`` (Mamba's depthwise conv, 4 taps, + SiLU, at the scan's shape, x time-major as
  ``MambaMixer`` passes it on CPU) — ``cpu`` (the compiled kernel) and ``torch`` (``F.conv1d``).

Forward runs under ``torch.no_grad``; forward+backward backpropagates a fixed random output gradient into
every input that a training step would differentiate.
"""
from __future__ import annotations

import math

import pytest
import torch

from m2rec_kernels.freq_filter import causal_n_fft, causal_weight

from .availability import (budget_not_run_reason, cpu_scan_not_run_reason, cpu_scan_note, mamba_cuda_scan,
                           mamba_reference_scan, triton_not_run_reason)
from .grids import smoke_mode
from .memory_probe import cuda_peak_mb
from .model_rows import CUDA_MEM_METHOD
from .timing import run_timed

PASSES = ("forward", "forward_backward")
CASES = [
    ("selective_scan", "triton"), ("selective_scan", "cpu"), ("selective_scan", "torch"),
    ("selective_scan", "mamba_ssm"), ("selective_scan", "mamba_ssm_ref"),
    ("fft_filter", "triton"), ("fft_filter", "triton-dft"), ("fft_filter", "torch"), ("fft_filter", "torch.fft"),
    ("causal_filter", "triton"), ("causal_filter", "torch"), ("causal_filter", "torch.fft"),
    ("gated_fusion", "triton"), ("gated_fusion", "torch"),
    ("causal_conv1d", "cpu"), ("causal_conv1d", "torch"),
]


def _scan_inputs(batch, L, d, N, device, requires_grad):
    """Inputs as ``MambaMixer`` passes them: raw delta with a softplus bias, A = -exp(A_log), D skip, z gate."""
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).requires_grad_(requires_grad)

    dt = torch.exp(torch.rand(d, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    delta_bias = (dt + torch.log(-torch.expm1(-dt))).requires_grad_(requires_grad)  # inverse softplus
    A = (-torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(d, 1)).requires_grad_(requires_grad)
    D = torch.ones(d, device=device).requires_grad_(requires_grad)
    args = dict(u=t(batch, d, L), delta=t(batch, d, L, scale=0.5), A=A, B=t(batch, N, L), C=t(batch, N, L),
                D=D, z=t(batch, d, L), delta_bias=delta_bias)
    return args


def _scan_call(backend):
    if backend in ("torch", "triton", "cpu"):
        from m2rec_kernels import selective_scan

        return lambda a: selective_scan(**a, delta_softplus=True, backend=backend)
    fn = (mamba_cuda_scan() if backend == "mamba_ssm" else mamba_reference_scan())[0]
    return lambda a: fn(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], z=a["z"],
                        delta_bias=a["delta_bias"], delta_softplus=True)


def _filter_inputs(batch, L, d, device, requires_grad):
    n_fft = causal_n_fft(L, L)
    kernel = torch.randn(L, d, device=device) * 0.02
    weight = causal_weight(kernel, n_fft).detach().requires_grad_(requires_grad)
    x = torch.randn(batch, L, d, device=device).requires_grad_(requires_grad)
    return dict(x=x, weight=weight, n_fft=n_fft)


def _filter_call(backend):
    if backend == "torch.fft":
        def plain(a):
            L, n = a["x"].shape[1], a["n_fft"]
            spec = torch.fft.rfft(a["x"], n=n, dim=1, norm="ortho") * a["weight"]
            return torch.fft.irfft(spec, n=n, dim=1, norm="ortho")[:, :L]
        return plain
    from m2rec_kernels import fft_filter

    if backend == "triton-dft":  # the dense-DFT kernel, no longer routed: timed so a GPU run can settle it
        from m2rec_kernels.freq_filter.function import fft_filter_triton

        return lambda a: fft_filter_triton(a["x"], a["weight"], a["n_fft"])
    return lambda a: fft_filter(a["x"], a["weight"], a["n_fft"], backend=backend)


def _causal_inputs(batch, L, d, device, requires_grad):
    kernel = (torch.randn(L, d, device=device) * 0.02).requires_grad_(requires_grad)
    return dict(x=torch.randn(batch, L, d, device=device).requires_grad_(requires_grad), kernel=kernel)


def _causal_call(backend):
    if backend == "torch.fft":
        def plain(a):
            L = a["x"].shape[1]
            n = causal_n_fft(L, L)
            spec = torch.fft.rfft(a["x"], n=n, dim=1) * torch.fft.rfft(a["kernel"], n=n, dim=0)
            return torch.fft.irfft(spec, n=n, dim=1)[:, :L]
        return plain
    from m2rec_kernels import causal_filter

    return lambda a: causal_filter(a["x"], a["kernel"], backend=backend)


def _fusion_inputs(batch, L, d, device, requires_grad):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).requires_grad_(requires_grad)

    return dict(branches=[t(batch, L, d) for _ in range(3)], residual=t(batch, L, d),
                gate_weight=t(3, 3 * d, scale=0.02), gate_bias=t(3, scale=0.0),
                ln_weight=(torch.ones(d, device=device)).requires_grad_(requires_grad),
                ln_bias=t(d, scale=0.0))


def _fusion_call(backend, training):
    from m2rec_kernels import gated_fusion

    return lambda a: gated_fusion(**a, training=training, backend=backend)


def _conv_inputs(batch, L, d, device, requires_grad):
    """x (batch, d, L) as the transpose of a (batch, L, d) tensor (MambaMixer's layout on CPU)."""
    x = torch.randn(batch, L, d, device=device).transpose(1, 2).requires_grad_(requires_grad)
    weight = (torch.randn(d, 4, device=device) * 0.5).requires_grad_(requires_grad)
    return dict(x=x, weight=weight, bias=torch.randn(d, device=device).requires_grad_(requires_grad))


def _conv_call(backend):
    from m2rec_kernels import causal_conv1d

    return lambda a: causal_conv1d(**a, activation="silu", backend=backend)


def _leaves(args):
    out = []
    for v in args.values():
        for t in (v if isinstance(v, list) else [v]):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                out.append(t)
    return out


def _case(op, backend, pass_, grid, device, scan_L=None):
    """(callable timed by the benchmark, shape fields for the results); ``scan_L`` overrides the scan's L."""
    backward = pass_ == "forward_backward"
    if op == "selective_scan":
        batch, L, d, N = grid.scan
        L = scan_L or L
        args = _scan_inputs(batch, L, d, N, device, backward)
        call = _scan_call(backend)
        shape = dict(batch=batch, L=L, d=d, d_state=N)
    elif op == "fft_filter":
        batch, L, d = grid.seq_op
        args = _filter_inputs(batch, L, d, device, backward)
        call = _filter_call(backend)
        shape = dict(batch=batch, L=L, d=d, n_fft=args["n_fft"])
    elif op == "causal_filter":
        batch, L, d = grid.seq_op
        args = _causal_inputs(batch, L, d, device, backward)
        call = _causal_call(backend)
        shape = dict(batch=batch, L=L, d=d, K=L)
    elif op == "causal_conv1d":
        batch, L, d, _ = grid.scan
        args = _conv_inputs(batch, L, d, device, backward)
        call = _conv_call(backend)
        shape = dict(batch=batch, L=L, d=d, K=4)
    else:
        batch, L, d = grid.seq_op
        args = _fusion_inputs(batch, L, d, device, backward)
        call = _fusion_call(backend, training=backward)
        shape = dict(batch=batch, L=L, d=d, branches=3)
    if not backward:
        def forward():
            with torch.no_grad():
                return call(args)
        return forward, shape
    leaves = _leaves(args)
    out0 = call(args)
    grad_out = torch.randn_like(out0)

    def forward_backward():
        for t in leaves:
            t.grad = None
        call(args).backward(grad_out)
    return forward_backward, shape


# mamba_ssm's selective_scan_ref indexes one step at a time out of (b, d, L, N) tensors; on the way back
# autograd scatters each step's gradient into a zero tensor of the whole sequence, so its backward is
# quadratic in L: trial runs on the 2-core CPU took 100-160 s per call at the model's shapes, more than
# the whole CPU suite may take. On CUDA the same pattern is fast enough to time.
SLOW_REF_BACKWARD = ("mamba_ssm's selective_scan_ref backward is quadratic in L (it scatters every step's "
                     "gradient into a zero (b, d, L, N) tensor): 100-160 s per call at these shapes in trial runs "
                     "on a 2-core CPU, beyond the CPU suite's time budget")


# ... and its forward materialises exp(Δ·A) and Δ·u·B as (b, d, L, N) tensors: 2 GB each in fp32 at
# batch 64, d 128, N 32, L 2000, more than a CPU machine of the suite's size should be asked for.
HUGE_REF_FORWARD = ("mamba_ssm's selective_scan_ref materialises (b, d, L, N) fp32 tensors, 2 GB each at "
                    "L 2000: beyond the CPU suite's memory budget")


def _unavailable(op, backend, pass_, device, L=None):
    if budget_not_run_reason() is not None:
        return budget_not_run_reason()
    if backend == "mamba_ssm_ref" and pass_ == "forward_backward" and device.type == "cpu" and not smoke_mode():
        return SLOW_REF_BACKWARD
    if backend == "mamba_ssm_ref" and device.type == "cpu" and (L or 0) >= 1000:
        return HUGE_REF_FORWARD
    if backend in ("triton", "triton-dft"):
        return triton_not_run_reason(device)
    if backend == "cpu":
        return cpu_scan_not_run_reason(device)
    if backend == "mamba_ssm":
        fn, why = mamba_cuda_scan()
        return None if fn is not None else why
    if backend == "mamba_ssm_ref":
        fn, why = mamba_reference_scan()
        return None if fn is not None else why
    return None


def _impl_note(op, backend):
    if backend == "mamba_ssm":
        return mamba_cuda_scan()[1]
    if backend == "mamba_ssm_ref":
        return mamba_reference_scan()[1]
    if backend == "triton-dft":
        return "dense-DFT Triton kernel (freq_filter/kernels.py), not routed by fft_filter (paths.py)"
    if backend == "torch.fft":
        return "plain torch.fft.rfft/irfft (FMLP-Rec formula)" + (", rfft of the kernel" if op == "causal_filter" else "")
    if backend == "cpu":
        return f"m2rec_kernels.{op}(backend='cpu'): {cpu_scan_note()}"
    return f"m2rec_kernels.{op}(backend={backend!r})"


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("op,backend", CASES, ids=[f"{o}-{b}" for o, b in CASES])
def test_op(benchmark, grid, bench_dev, not_run, op, backend, pass_):
    _time_op(benchmark, grid, bench_dev, not_run, op, backend, pass_)


LONG_SCAN_BACKENDS = tuple(b for o, b in CASES if o == "selective_scan")


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("backend", LONG_SCAN_BACKENDS)
def test_scan_long(benchmark, grid, bench_dev, not_run, backend, pass_):
    """The scan rows again at the grid's long L (issue 11's goals are at L 200 and 2000)."""
    _time_op(benchmark, grid, bench_dev, not_run, "selective_scan", backend, pass_, scan_L=grid.scan_long_L)


def _time_op(benchmark, grid, bench_dev, not_run, op, backend, pass_, scan_L=None):
    kind = f"op_{pass_}"
    if op == "selective_scan":
        shape = dict(batch=grid.scan[0], L=scan_L or grid.scan[1])
    elif op == "causal_conv1d":
        shape = dict(batch=grid.scan[0], L=grid.scan[1])
    else:
        shape = dict(zip(("batch", "L"), grid.seq_op[:2]))
    reason = _unavailable(op, backend, pass_, bench_dev, shape["L"])
    fields = dict(kind=kind, name=op, backend=backend, device=bench_dev.type, **shape)
    if reason is not None:
        not_run(reason, **fields)
    fn, shape = _case(op, backend, pass_, grid, bench_dev, scan_L)
    benchmark.group = f"{op} {pass_}" + (f" L={scan_L}" if scan_L else "")
    benchmark.extra_info.update(fields, impl=_impl_note(op, backend), shape=shape, dtype="float32")
    if bench_dev.type == "cuda":
        fn()  # warm-up: Triton compilation and autotuning stay out of the peak
        benchmark.extra_info["peak_mem_mb"] = cuda_peak_mb(fn, bench_dev)
        benchmark.extra_info["mem_method"] = CUDA_MEM_METHOD
    run_timed(benchmark, fn, bench_dev, grid)


FINAL_BACKENDS = ("triton", "cpu", "torch")


@pytest.mark.parametrize("backend", FINAL_BACKENDS)
def test_selective_scan_final(benchmark, grid, bench_dev, not_run, backend):
    """``selective_scan_final`` forward (no gradients): the compiled CPU kernel never forms the per-step
    outputs; the reference skips them too."""
    batch, L, d, N = grid.scan
    fields = dict(kind="op_forward", name="selective_scan_final", backend=backend, device=bench_dev.type,
                  batch=batch, L=L)
    reason = budget_not_run_reason() or {"triton": triton_not_run_reason, "cpu": cpu_scan_not_run_reason}.get(
        backend, lambda _: None)(bench_dev)
    if reason is not None:
        not_run(reason, **fields)
    from m2rec_kernels import selective_scan_final

    args = _scan_inputs(batch, L, d, N, bench_dev, False)

    def forward():
        with torch.no_grad():
            return selective_scan_final(**args, delta_softplus=True, backend=backend)

    benchmark.group = "selective_scan_final forward"
    benchmark.extra_info.update(fields, impl=_impl_note("selective_scan_final", backend),
                                shape=dict(batch=batch, L=L, d=d, d_state=N), dtype="float32")
    if bench_dev.type == "cuda":
        forward()  # warm-up: Triton compilation stays out of the peak
        benchmark.extra_info["peak_mem_mb"] = cuda_peak_mb(forward, bench_dev)
        benchmark.extra_info["mem_method"] = CUDA_MEM_METHOD
    run_timed(benchmark, forward, bench_dev, grid)
