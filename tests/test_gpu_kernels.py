"""Every public op, compiled on a GPU, against its reference at two shapes: forward and backward.

gpu-check's first step (bench/gpu_check.py) runs this file with the ``*_triton`` kernel tests. The
other kernel tests use tiny shapes (they also run under the interpreter); these use an odd small shape
and a benchmark-sized one (L up to 2100, so kernels that tile time cross a 2048-step tile, and a host
that picks its kernel by shape picks the one the benchmark times). The reference runs in float64 on
the same device; fp32 results must agree to 1e-4 of the output's magnitude (TF32 off: torch's matmul
flag is left at its default, which the kernels follow). Marked ``gpu``: skipped without CUDA.
"""
import os
import sys

import pytest
import torch

from m2rec_kernels import fft_filter, gated_fusion, selective_scan, selective_state_update
from m2rec_kernels.freq_filter import causal_n_fft, causal_weight

sys.path.insert(0, os.path.dirname(__file__))
from _scan_inputs import make_scan_inputs  # noqa: E402

pytestmark = pytest.mark.gpu

REL = 1e-4


def _close(name, got, ref, rel=REL):
    scale = max(ref.abs().max().item(), 1e-6)
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x max |ref| = {scale:.3g}"


def _fwd_bwd(fn, inputs, grad_out):
    """(output, gradients of every floating input that takes one) for one call."""
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    for v in leaves.values():
        v.grad = None
        v.requires_grad_(True)
    out = fn(**inputs)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_out)
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def _as64(inputs):
    return {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


def _compare(fn_kernel, fn_ref, inputs, out_shape_from):
    grad_out = torch.randn_like(out_shape_from)
    out, grads = _fwd_bwd(fn_kernel, inputs, grad_out)
    ref, ref_grads = _fwd_bwd(fn_ref, _as64(inputs), grad_out.double())
    _close("output", out, ref)
    for k, g in ref_grads.items():
        assert grads[k] is not None, f"no gradient for {k}"
        _close(f"d{k}", grads[k], g)


SCAN_SHAPES = [dict(batch=3, dim=48, L=37, N=7), dict(batch=4, dim=128, L=2100, N=32)]


@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=["odd", "long"])
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
def test_selective_scan(shape, use_lengths):
    dev = torch.device("cuda")
    kw = make_scan_inputs(**shape, use_lengths=use_lengths, device=dev)
    if use_lengths:
        kw["lengths"][kw["lengths"] == 0] = 1  # the model never passes empty sequences

    def run(backend):
        return lambda **a: selective_scan(**a, return_last_state=True, backend=backend)

    _compare(run("triton"), run("torch"), kw, kw["u"])


@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=["odd", "long"])
def test_selective_scan_last_state(shape):
    dev = torch.device("cuda")
    kw = make_scan_inputs(**shape, device=dev)
    out, last = selective_scan(**kw, return_last_state=True, backend="triton")
    ref, ref_last = selective_scan(**_as64(kw), return_last_state=True, backend="torch")
    _close("output", out, ref)
    _close("last_state", last, ref_last)


@pytest.mark.parametrize("batch,dim,N", [(3, 48, 7), (64, 128, 32)])
def test_selective_state_update(batch, dim, N):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*s, scale=1.0):
        return torch.randn(*s, device=dev, generator=g) * scale

    state = r(batch, dim, N)
    args = dict(x=r(batch, dim), dt=r(batch, dim, scale=0.5), A=-(r(dim, N).abs() + 0.25), B=r(batch, N),
                C=r(batch, N), D=r(dim), z=r(batch, dim), dt_bias=r(dim, scale=0.3), dt_softplus=True)
    ref_state = state.double()
    ref = selective_state_update(ref_state, **_as64(args), backend="torch")
    out = selective_state_update(state, **args, backend="triton")
    _close("output", out, ref)
    _close("state (updated in place)", state, ref_state)


FILTER_CASES = [
    # (batch, L, d, mode): causal at the odd shape and at L 2000, circular at the model's L 200
    (3, 37, 48, "causal"), (4, 2000, 64, "causal"), (4, 200, 64, "circular"),
]


@pytest.mark.parametrize("batch,L,d,mode", FILTER_CASES, ids=[f"{m}-L{L}" for _, L, _, m in FILTER_CASES])
def test_fft_filter(batch, L, d, mode):
    dev = torch.device("cuda")
    x = torch.randn(batch, L, d, device=dev)
    if mode == "causal":
        n_fft = causal_n_fft(L, L)
        weight = causal_weight(torch.randn(L, d, device=dev) * 0.05, n_fft).detach()
        weight = torch.view_as_real(weight).contiguous()
    else:
        n_fft = L
        weight = torch.randn(L // 2 + 1, d, 2, device=dev) * 0.5

    def run(backend):
        return lambda x, weight: fft_filter(x, weight, n_fft, backend=backend)

    _compare(run("triton"), run("torch"), dict(x=x, weight=weight), x)


@pytest.mark.parametrize("batch,L,d", [(3, 37, 48), (64, 2000, 64)])
@pytest.mark.parametrize("k", [2, 3])
def test_gated_fusion(batch, L, d, k):
    dev = torch.device("cuda")
    branches = [torch.randn(batch, L, d, device=dev) for _ in range(k)]
    inputs = dict(residual=torch.randn(batch, L, d, device=dev), gate_weight=torch.randn(k, k * d, device=dev) * 0.1,
                  gate_bias=torch.randn(k, device=dev) * 0.1, ln_weight=torch.rand(d, device=dev) + 0.5,
                  ln_bias=torch.randn(d, device=dev) * 0.1)
    inputs.update({f"b{i}": b for i, b in enumerate(branches)})

    def run(backend):
        def call(**a):
            bs = [a[f"b{i}"] for i in range(k)]
            rest = {n: a[n] for n in ("residual", "gate_weight", "gate_bias", "ln_weight", "ln_bias")}
            return gated_fusion(bs, **rest, eps=1e-5, backend=backend)
        return call

    _compare(run("triton"), run("torch"), inputs, inputs["residual"])


@pytest.mark.parametrize("batch,L", [(64, 200), (2, 2000)])
def test_m2rec_layer_triton_matches_torch(batch, L):
    """The whole layer at the benchmark's widths: outputs and every parameter gradient (fp32 both)."""
    from m2rec.layers import M2RecLayer

    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = M2RecLayer(d_model=64, d_state=32, max_len=L, dropout=0.0, backend="torch").to(dev)
    h, s = torch.randn(batch, L, 64, device=dev), torch.randn(batch, L, 64, device=dev)
    grad = torch.randn(batch, L, 64, device=dev)
    results = {}
    for backend in ("torch", "triton"):
        layer.zero_grad(set_to_none=True)
        for m in layer.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        out = layer(h, s)
        out.backward(grad)
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    _close("layer output", results["triton"][0], results["torch"][0], rel=1e-3)
    for name, g in results["torch"][1].items():
        _close(f"d{name}", results["triton"][1][name], g, rel=1e-3)


def _mamba_cuda_or_skip():
    from m2rec.mamba_ssm_compat import import_mamba_ssm

    mamba_ssm, how = import_mamba_ssm()
    if mamba_ssm is None or how != "cuda":
        pytest.skip("mamba_ssm's CUDA scan is not installed here (gpu-check activates a carried "
                    f"bench/build_mamba_scan.py build when there is one): {how}")


@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=["odd", "long"])
def test_mamba_ssm_cuda_scan_matches_reference(shape):
    """The carried mamba_ssm build computes the scan: the baseline rows time a correct kernel. mamba's
    kernel uses fast-math exponentials, hence its own tests' looser tolerance."""
    _mamba_cuda_or_skip()
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    kw = make_scan_inputs(**shape, device=torch.device("cuda"))
    kw.pop("lengths")

    def theirs(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)

    grad_out = torch.randn_like(kw["u"])
    out, grads = _fwd_bwd(theirs, dict(kw), grad_out)
    ref, ref_grads = _fwd_bwd(lambda **a: selective_scan(**a, backend="torch"), _as64(kw), grad_out.double())
    _close("output", out, ref, rel=2e-3)
    for k, g in ref_grads.items():
        _close(f"d{k}", grads[k], g, rel=2e-3)


def test_unfused_m2rec_on_gpu_matches_m2rec_triton():
    """The "M2Rec, unfused" row (mamba's CUDA scan, torch.fft, torch ops) computes M2Rec's function."""
    _mamba_cuda_or_skip()
    from bench.unfused_m2rec import UnfusedM2Rec
    from bench.workloads import random_batch, random_text_table
    from m2rec.models import M2Rec

    dev = torch.device("cuda")
    kwargs = dict(d_model=64, max_len=200, d_state=32, text_embeddings=random_text_table(100), dropout=0.0)
    ours = M2Rec(100, backend="triton", **kwargs).to(dev).eval()
    unfused = UnfusedM2Rec(100, **kwargs).to(dev).eval()
    unfused.load_state_dict(ours.state_dict())
    seq, lengths, _ = random_batch(100, 200, 8, dev)
    with torch.no_grad():
        _close("scores", unfused.scores(seq, lengths)[:, 1:], ours.scores(seq, lengths)[:, 1:], rel=2e-3)
