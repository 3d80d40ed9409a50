"""The compiled CPU selective scan (``backend="cpu"``, m2rec_kernels/scan/cpu.py + csrc/) against float64
math, forward and backward, for every ISA variant this CPU runs; its exp; thread-count independence;
strided inputs; the models on ``backend="cpu"``; and the fallback when the library is not there.

The truth is the PyTorch reference run in float64 on the same inputs (the reference is itself checked
against an independent naive loop and gradcheck in test_scan_reference.py). fp32 tolerances scale
with the largest value of each compared tensor (tests/_tolerance.py): the kernels differ from float64
by rounding in fp32 sums of O(L * N) terms, measured at ~2e-7 of the largest value (1e-5 allowed, so
a wrong term, which is O(1), still fails). Without the built library every test here skips and says why; the session
header (tests/conftest.py) names the path the scan runs on.
"""
import itertools
import warnings

import pytest
import torch

from _scan_inputs import ODD, clone_inputs, make_scan_inputs
from _tolerance import assert_close
from m2rec_kernels import fft_filter, gated_fusion, selective_scan, selective_scan_final
from m2rec_kernels._backend import check_backend_runs, resolve_backend
from m2rec_kernels.scan import cpu as scan_cpu
from m2rec_kernels.scan import cpu_build
from m2rec_kernels.scan import ops as scan_ops
from m2rec_kernels.scan.reference import selective_scan_ref
from _cpu_library import ISAS, STATUS, needs_lib  # noqa: F401
from _cpu_library import isa_or_skip as _isa_or_skip

GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
OPTION_GRID = list(itertools.product([False, True], repeat=4))  # D, z, delta_bias, softplus


def _run(kw, impl, grad_out=None, grad_last=None, isa=None, dtype=None, f64=False):
    """(out, last, grads) on fresh leaves. impl "cpu": the compiled scan (variant ``isa``);
    "ref": the PyTorch reference in float64 (inputs cast up exactly)."""
    inputs = clone_inputs(kw, dtype=dtype)
    if f64:
        inputs = {k: (v.detach().double().requires_grad_(True) if isinstance(v, torch.Tensor)
                      and v.is_floating_point() else v) for k, v in inputs.items()}
    if impl == "cpu":
        args = [inputs[n] for n in GRAD_NAMES]
        out, last = scan_cpu.selective_scan_cpu(*args, inputs["delta_softplus"], True, inputs["lengths"], isa=isa)
    else:
        out, last = selective_scan_ref(**inputs, return_last_state=True)
    grads = {}
    if grad_out is not None or grad_last is not None:
        pairs = [(t, g) for t, g in ((out, grad_out), (last, grad_last)) if g is not None]
        torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])
        grads = {n: torch.zeros_like(inputs[n]) if inputs[n].grad is None else inputs[n].grad
                 for n in GRAD_NAMES if inputs[n] is not None}
    return out.detach(), last.detach(), grads


def _close(got, want, name, rel_to_max=1e-5, rtol=1e-4):
    """|got - want| <= rtol |want| + rel_to_max * max(1, max|want|) (got cast to float64)."""
    assert_close(got.double(), want.double(), rtol=rtol, atol=rel_to_max, msg=lambda m: f"{name}: {m}")


def _grads(shape_out, shape_last, which, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(shape_out, generator=g) if which in ("out", "both") else None
    grad_last = torch.randn(shape_last, generator=g) if which in ("last", "both") else None
    return grad_out, grad_last


# ---------------------------------------------------------------- availability and dispatch

def test_library_built_by_setup_loads():
    """Set-up built it (manifest "ok" for these sources and this torch) => it must load and run here."""
    m = cpu_build.read_manifest()
    if m is None or m.get("status") != "ok" or m.get("key") != cpu_build.build_key():
        pytest.skip(f"no up-to-date successful build here: {STATUS.describe()}")
    assert STATUS.available, STATUS.describe()
    assert STATUS.isa in m["variants"]


@needs_lib
def test_auto_picks_the_compiled_scan_on_cpu():
    kw = make_scan_inputs(**ODD)
    assert resolve_backend("auto", "op", kw["u"], cpu_kernel=scan_cpu.cpu_scan_unavailable) == "cpu"
    out_auto = selective_scan(**kw, backend="auto")
    out_cpu = selective_scan(**kw, backend="cpu")
    assert torch.equal(out_auto, out_cpu)
    # float64 stays on the reference: "auto" goes there, an explicit "cpu" says so
    kw64 = clone_inputs(kw, requires_grad=False, dtype=torch.float64)
    assert torch.equal(selective_scan(**kw64, backend="auto"), selective_scan(**kw64, backend="torch"))
    with pytest.raises(TypeError, match="backend='cpu' supports float16, bfloat16 and float32"):
        selective_scan(**kw64, backend="cpu")


def test_ops_without_a_compiled_cpu_kernel_run_their_reference_on_backend_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 8, generator=g)
    w = torch.randn(5, 8, 2, generator=g)
    assert torch.equal(fft_filter(x, w, 9, backend="cpu"), fft_filter(x, w, 9, backend="torch"))
    branches = [torch.randn(2, 5, 8, generator=g) for _ in range(2)]
    args = dict(residual=torch.randn(2, 5, 8, generator=g), gate_weight=torch.randn(2, 16, generator=g),
                gate_bias=torch.zeros(2), ln_weight=torch.ones(8), ln_bias=torch.zeros(8))
    assert torch.equal(gated_fusion(branches, **args, backend="cpu"), gated_fusion(branches, **args, backend="torch"))
    assert resolve_backend("cpu", "op", x) == "torch"


@pytest.mark.gpu
def test_backend_cpu_on_cuda_tensors_is_an_error():
    kw = make_scan_inputs(**ODD, device="cuda")
    with pytest.raises(RuntimeError, match="backend='cpu' runs on CPU tensors"):
        selective_scan(**kw, backend="cpu")
    with pytest.raises(ValueError, match="backend='cpu'"):
        check_backend_runs("cpu", "cuda")


# ---------------------------------------------------------------- correctness against float64

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", OPTION_GRID)
def test_fp32_forward_backward_every_option(isa, use_D, use_z, use_bias, softplus, use_lengths):
    """Odd shapes (batch 3, L 37, dim 48, N 7; lengths L, L/3 and 0), every option, gradients of every
    input through out and the last state together."""
    _isa_or_skip(isa)
    kw = make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus,
                          use_lengths=use_lengths)
    grad_out, grad_last = _grads(kw["u"].shape, (ODD["batch"], ODD["dim"], ODD["N"]), "both")
    out, last, grads = _run(kw, "cpu", grad_out, grad_last, isa=isa)
    want_out, want_last, want_grads = _run(kw, "ref", grad_out, grad_last, f64=True)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    _close(out, want_out, "out")
    _close(last, want_last, "last_state")
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        assert grads[name].dtype == kw[name].dtype, name
        _close(grads[name], want_grads[name], f"grad of {name}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("which", ["out", "last"])
def test_gradient_through_one_output_only(isa, which):
    """dout absent (only the last state is used) or d(last_state) absent."""
    _isa_or_skip(isa)
    kw = make_scan_inputs(**ODD, use_lengths=True)
    grad_out, grad_last = _grads(kw["u"].shape, (ODD["batch"], ODD["dim"], ODD["N"]), which)
    _, _, grads = _run(kw, "cpu", grad_out, grad_last, isa=isa)
    _, _, want = _run(kw, "ref", grad_out, grad_last, f64=True)
    for name in want:
        _close(grads[name], want[name], f"grad of {name} ({which} only)")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs_against_float64(isa, dtype):
    """fp16/bf16 inputs, fp32 state. The truth is float64 math on the same (already rounded) inputs, so
    the kernel's error is the rounding of each result to the input dtype (unit roundoff u = 2^-8 for
    bf16, 2^-11 for fp16, relative) plus fp32 sums (~1e-7 of the largest value): 2u relative + 1e-5
    of the largest value is allowed. The last state and dA stay fp32 (A is fp32): fp32 tolerance."""
    _isa_or_skip(isa)
    kw = make_scan_inputs(**ODD, use_lengths=True)
    lp = clone_inputs(kw, requires_grad=False, dtype=dtype)  # the rounded inputs, A stays fp32
    grad_out, grad_last = _grads(kw["u"].shape, (ODD["batch"], ODD["dim"], ODD["N"]), "both")
    grad_out = grad_out.to(dtype)
    out, last, grads = _run(lp, "cpu", grad_out, grad_last, isa=isa)
    want_out, want_last, want_grads = _run(lp, "ref", grad_out, grad_last, f64=True)
    two_u = 2 * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11)
    assert out.dtype == dtype and last.dtype == torch.float32
    _close(out, want_out, "out", rtol=two_u)
    _close(last, want_last, "last_state")
    for name in want_grads:
        assert grads[name].dtype == lp[name].dtype, name
        _close(grads[name], want_grads[name], f"grad of {name}",
               rtol=1e-4 if lp[name].dtype == torch.float32 else two_u)


@pytest.mark.parametrize("isa", ISAS)
def test_long_sequence_against_float64(isa):
    """L = 2000 (31 checkpoint chunks and a partial one), lengths 2000 and 1234: fp32 rounding over a long
    recurrence stays within 2e-5 of the largest value (measured ~1e-6)."""
    _isa_or_skip(isa)
    kw = make_scan_inputs(batch=2, dim=20, L=2000, N=5)
    kw["lengths"] = torch.tensor([2000, 1234])
    grad_out, grad_last = _grads(kw["u"].shape, (2, 20, 5), "both")
    out, last, grads = _run(kw, "cpu", grad_out, grad_last, isa=isa)
    want_out, want_last, want_grads = _run(kw, "ref", grad_out, grad_last, f64=True)
    _close(out, want_out, "out", rel_to_max=2e-5, rtol=1e-3)
    _close(last, want_last, "last_state", rel_to_max=2e-5, rtol=1e-3)
    for name in want_grads:
        _close(grads[name], want_grads[name], f"grad of {name}", rel_to_max=2e-5, rtol=1e-3)


@pytest.mark.parametrize("isa", ISAS)
def test_extreme_deltas_softplus_branches(isa):
    """delta (+ bias) from -30 to 30: softplus far below zero (tiny steps), across its threshold of 20
    (identity and gradient 1 above it), and large steps whose decays underflow to 0."""
    _isa_or_skip(isa)
    kw = make_scan_inputs(**ODD, use_lengths=True)
    g = torch.Generator().manual_seed(5)
    kw["delta"] = torch.rand(kw["delta"].shape, generator=g) * 60 - 30
    grad_out, grad_last = _grads(kw["u"].shape, (ODD["batch"], ODD["dim"], ODD["N"]), "both")
    out, last, grads = _run(kw, "cpu", grad_out, grad_last, isa=isa)
    want_out, want_last, want_grads = _run(kw, "ref", grad_out, grad_last, f64=True)
    _close(out, want_out, "out")
    _close(last, want_last, "last_state")
    for name in want_grads:
        _close(grads[name], want_grads[name], f"grad of {name}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
def test_final_form_against_float64(isa, use_lengths):
    """selective_scan_final: the output at each sequence's last step and the final state, without the
    other steps' outputs; with gradients it goes through the full scan."""
    _isa_or_skip(isa)
    kw = make_scan_inputs(**ODD, use_lengths=use_lengths)
    if use_lengths:
        kw["lengths"] = torch.tensor([ODD["L"], 1, 20])
    out_last, last = scan_cpu.selective_scan_final_cpu(*[kw[n] for n in GRAD_NAMES], kw["delta_softplus"],
                                                       kw["lengths"], isa=isa)
    kw64 = clone_inputs(kw, requires_grad=False, dtype=torch.float64)
    kw64["A"] = kw64["A"].double()
    want_out, want_last = selective_scan_ref(**kw64, return_last_state=True)
    idx = kw["lengths"] - 1 if use_lengths else torch.full((ODD["batch"],), ODD["L"] - 1)
    want_out_last = want_out[torch.arange(ODD["batch"]), :, idx]
    assert out_last.shape == (ODD["batch"], ODD["dim"]) and out_last.dtype == torch.float32
    _close(out_last, want_out_last, "out_last")
    _close(last, want_last, "last_state")
    # gradients (full scan underneath) against the reference's
    ours, ref = clone_inputs(kw), clone_inputs(kw)
    got, got_last = scan_cpu.selective_scan_final_cpu(*[ours[n] for n in GRAD_NAMES], kw["delta_softplus"],
                                                      kw["lengths"], isa=isa)
    want, want_l = selective_scan_final(**ref, backend="torch")
    (got.sum() + got_last.sum()).backward()
    (want.sum() + want_l.sum()).backward()
    for name in GRAD_NAMES:
        _close(ours[name].grad, ref[name].grad, f"grad of {name} through the final form", rel_to_max=1e-4)


@needs_lib
def test_public_final_form_dispatches_to_the_kernel():
    kw = make_scan_inputs(**ODD, use_lengths=True)
    kw["lengths"] = kw["lengths"].clamp(min=1)
    got, got_last = selective_scan_final(**kw, backend="cpu")
    want, want_last = selective_scan_final(**kw, backend="torch")
    _close(got, want, "out_last", rel_to_max=1e-5)
    _close(got_last, want_last, "last_state", rel_to_max=1e-5)
    bf = clone_inputs(kw, requires_grad=False, dtype=torch.bfloat16)
    out_bf, last_bf = selective_scan_final(**bf, backend="cpu")
    assert out_bf.dtype == torch.bfloat16 and last_bf.dtype == torch.float32


# ---------------------------------------------------------------- grouped and time-invariant B / C

# (B form, C form, dim): G groups of B / C ("seq": per sequence). The task blocks must not straddle a
# group of either: at dim 45 with G 5 and 3 the groups hold 9 and 15 channels, so blocks are cut at
# multiples of 3 (partial vectors everywhere); G = 48 is one channel per group.
CPU_GROUPED = [(2, "seq", 48), ("seq", 3, 48), (3, 2, 48), (48, 48, 48), (5, 3, 45), (1, 16, 48)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B_form,C_form,dim", CPU_GROUPED, ids=[f"B{b}-C{c}-d{d}" for b, c, d in CPU_GROUPED])
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
def test_grouped_bc_against_float64(isa, B_form, C_form, dim, use_lengths):
    """Grouped B / C (batch, G, N, L): forward, last state and every gradient (dB, dC summed over each
    group's channels, in (batch, G, N, L)) against the float64 reference, every option on."""
    _isa_or_skip(isa)
    kw = make_scan_inputs(3, dim, 37, 7, use_lengths=use_lengths, B_form=B_form, C_form=C_form)
    grad_out, grad_last = _grads(kw["u"].shape, (3, dim, 7), "both")
    out, last, grads = _run(kw, "cpu", grad_out, grad_last, isa=isa)
    want_out, want_last, want_grads = _run(kw, "ref", grad_out, grad_last, f64=True)
    _close(out, want_out, "out")
    _close(last, want_last, "last_state")
    for name in want_grads:
        assert grads[name].shape == kw[name].shape, name
        _close(grads[name], want_grads[name], f"grad of {name}")


@needs_lib
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
def test_grouped_bc_public_ops_dispatch_to_the_kernel(monkeypatch, use_lengths):
    """selective_scan / selective_scan_final with grouped B / C run the compiled kernels ("auto" and
    "cpu"), the final form without gradients in its output-free mode."""
    kw = make_scan_inputs(**ODD, use_lengths=use_lengths, B_form=3, C_form=2)
    if use_lengths:
        kw["lengths"] = kw["lengths"].clamp(min=1)
    calls = []
    real = torch.ops.m2rec_scan_cpu.forward

    class Spy:
        def __call__(self, *a):
            calls.append(a[10])  # the mode
            return real(*a)
    monkeypatch.setattr(scan_cpu.torch.ops.m2rec_scan_cpu, "forward", Spy(), raising=False)
    got = selective_scan(**kw, backend="auto")
    got_final, got_last = selective_scan_final(**kw, backend="cpu")
    assert calls == [scan_cpu._MODE_OUT, scan_cpu._MODE_FINAL]
    want, want_last = selective_scan(**kw, return_last_state=True, backend="torch")
    idx = kw["lengths"] - 1 if use_lengths else torch.full((ODD["batch"],), ODD["L"] - 1)
    _close(got, want, "out")
    _close(got_final, want[torch.arange(ODD["batch"]), :, idx], "out_last")
    _close(got_last, want_last, "last_state")


@needs_lib
@pytest.mark.parametrize("B_form,C_form", [("inv", "seq"), (2, "inv")], ids=["Binv", "Cinv"])
def test_time_invariant_bc_runs_the_reference_on_auto_and_is_refused_by_cpu(monkeypatch, B_form, C_form):
    """A time-invariant B or C (dim, N) does not fit the kernels' lanes (channels sharing one B/C value per
    step): "auto" runs the reference (same bits), an explicit backend="cpu" names the form."""
    kw = make_scan_inputs(**ODD, use_lengths=True, B_form=B_form, C_form=C_form)
    kw["lengths"] = kw["lengths"].clamp(min=1)

    def no_kernel(*a, **k):
        raise AssertionError("the compiled kernel ran")
    monkeypatch.setattr(scan_ops, "_cpu_isa", no_kernel)  # the ops' "cpu" backend asks it first
    assert torch.equal(selective_scan(**kw, backend="auto"), selective_scan(**kw, backend="torch"))
    got, want = selective_scan_final(**kw, backend="auto"), selective_scan_final(**kw, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    name = "B" if B_form == "inv" else "C"
    for op in (selective_scan, selective_scan_final):
        with pytest.raises(ValueError, match=f"backend='cpu' does not take a time-invariant {name} \\(dim, N\\)"):
            op(**kw, backend="cpu")


# ---------------------------------------------------------------- determinism, layouts, edge cases

@needs_lib
@pytest.mark.parametrize("bc", [dict(), dict(B_form=4, C_form=6)], ids=["per-sequence", "grouped"])
def test_thread_count_does_not_change_a_bit(bc):
    """Every reduction (dA, dD, d(delta_bias) over the batch, dB/dC over channel blocks, or over a
    group's channels) is summed in a fixed order: 1, 2 and 3 threads give identical results."""
    kw = make_scan_inputs(batch=5, dim=60, L=70, N=6, use_lengths=True, **bc)
    grad_out, grad_last = _grads(kw["u"].shape, (5, 60, 6), "both")
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run(kw, "cpu", grad_out, grad_last))
    finally:
        torch.set_num_threads(before)
    out0, last0, g0 = results[0]
    for out, last, g in results[1:]:
        assert torch.equal(out, out0) and torch.equal(last, last0)
        for name in g0:
            assert torch.equal(g[name], g0[name]), name


@needs_lib
def test_strided_inputs_give_the_same_result():
    """z as a channel-slice of a wider tensor (as MambaMixer passes it), u with a batch stride of its
    own, B/C as transposed views: read in place, same bits as contiguous inputs."""
    kw = make_scan_inputs(**ODD, use_lengths=True)
    want = selective_scan(**kw, return_last_state=True, backend="cpu")
    b, d, L = ODD["batch"], ODD["dim"], ODD["L"]
    zz = torch.randn(b, 2 * d, L)
    zz[:, d:] = kw["z"]
    uu = torch.cat([kw["u"], torch.zeros(b, d, L)], dim=1)[:, :d]
    strided = dict(kw, z=zz[:, d:], B=kw["B"].transpose(1, 2).contiguous().transpose(1, 2),
                   C=kw["C"].transpose(1, 2).contiguous().transpose(1, 2), u=uu)
    assert not strided["z"].is_contiguous() and strided["B"].stride(-1) != 1 and not strided["u"].is_contiguous()
    got = selective_scan(**strided, return_last_state=True, backend="cpu")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_lib
@pytest.mark.parametrize("isa", ISAS)
def test_time_major_layout(isa):
    """u, delta, z (and dout) as transposes of (batch, L, dim) tensors, B/C of (batch, L, N): read in
    place (one vector per step, no transposes), out and the gradients come back in the same layout,
    and every value equals the one from mamba's (batch, dim, L) layout."""
    _isa_or_skip(isa)
    kw = make_scan_inputs(**ODD, use_lengths=True)
    grad_out, grad_last = _grads(kw["u"].shape, (ODD["batch"], ODD["dim"], ODD["N"]), "both")
    out, last, grads = _run(kw, "cpu", grad_out, grad_last, isa=isa)
    tm = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z", "B", "C") else v)
          for k, v in kw.items()}
    assert tm["u"].stride(1) == 1
    inputs = clone_inputs(tm)
    for k in ("u", "delta", "z", "B", "C"):  # clone_inputs keeps strides
        assert inputs[k].stride(1) == 1, k
    args = [inputs[n] for n in GRAD_NAMES]
    out_tm, last_tm = scan_cpu.selective_scan_cpu(*args, tm["delta_softplus"], True, tm["lengths"], isa=isa)
    assert out_tm.stride(1) == 1, "out follows u's layout"
    torch.autograd.backward([out_tm, last_tm], [grad_out.transpose(1, 2).contiguous().transpose(1, 2), grad_last])
    assert torch.equal(out_tm, out) and torch.equal(last_tm, last)
    for name in GRAD_NAMES:
        assert torch.equal(inputs[name].grad, grads[name]), name
    assert inputs["u"].grad.stride(1) == 1 and inputs["z"].grad.stride(1) == 1


@needs_lib
@pytest.mark.parametrize("shape", [(0, 48, 37, 7), (3, 0, 37, 7), (3, 48, 0, 7)], ids=["batch0", "dim0", "L0"])
def test_empty_shapes(shape):
    b, d, L, N = shape
    kw = make_scan_inputs(batch=b, dim=d, L=L, N=N)
    inputs = clone_inputs(kw)
    out, last = selective_scan(**inputs, return_last_state=True, backend="cpu")
    assert out.shape == (b, d, L) and last.shape == (b, d, N)
    assert not last.any()
    (out.sum() + last.sum()).backward()
    for name in GRAD_NAMES:
        assert inputs[name].grad is not None and not inputs[name].grad.any(), name


# ---------------------------------------------------------------- the exp

@pytest.mark.parametrize("isa", ISAS)
def test_exp_accuracy_and_special_values(isa):
    """The kernels' exp against float64 on the fp32 inputs, over the normal range (results above 2^-125.5
    are not flushed). The scan's decay path forms 2^(x * fp32(log2 e)), so its error grows with |x|
    like the rounding of the argument itself (as fl(delta * A) in the reference): AVX-512 takes the
    product exactly inside an FMA, leaving the rounding of log2 e (1.3e-8 |x|; measured <= 2.4e-8 |x|,
    1.3e-6 at |x| = 87, 3.4e-7 on [-20, 0]); AVX2 and generic also round the product (bound 2^-23 |x|;
    measured <= 7.8e-8 |x|, 3.9e-6 at |x| = 87, 1e-6 on [-20, 0]). The general exp (softplus, sigmoid)
    reduces x by ln 2 in two steps (Cody-Waite): measured <= 1.2e-7 everywhere."""
    _isa_or_skip(isa)
    code = scan_cpu.ISA_CODES[isa]
    x = torch.linspace(-86.5, 88.7, 2_000_001)
    truth = torch.exp(x.double())
    per_x = 3e-8 if isa == "avx512" else 1.2e-7
    for scan_path, bound in ((True, 2e-7 + per_x * x.double().abs()), (False, torch.full_like(truth, 2e-7))):
        got = torch.ops.m2rec_scan_cpu.vector_exp(x, code, scan_path).double()
        rel = (got - truth).abs() / truth
        worst = int((rel / bound).argmax())
        assert (rel <= bound).all(), f"scan_path={scan_path}: rel err {rel[worst]:.3g} at x={x[worst]:.6g}"
        special = torch.tensor([0.0, -0.0, float("-inf"), float("inf"), float("nan"), -87.5, -100.0, -1e30,
                                88.7, 89.0, 1e30])
        out = torch.ops.m2rec_scan_cpu.vector_exp(special, code, scan_path)
        assert out[0] == 1.0 and out[1] == 1.0, "exp(0) must be exactly 1 (identity steps)"
        assert out[2] == 0.0 and out[3] == float("inf") and torch.isnan(out[4])
        assert (out[5:8] == 0.0).all(), "underflow flushes to +0"
        assert torch.isfinite(out[8]) and out[9] == float("inf") and out[10] == float("inf"), "overflow"


# ---------------------------------------------------------------- models on backend="cpu"

@needs_lib
def test_models_run_on_backend_cpu():
    """A model built with backend="cpu" runs (the scan compiled, the filter and fusion on torch) and
    matches backend="torch": outputs and every parameter gradient."""
    from m2rec.models import build_model

    torch.manual_seed(0)
    lengths = torch.tensor([11, 6, 1])
    valid = torch.arange(11)[None, :] < lengths[:, None]
    seq = torch.randint(1, 30, (3, 11)) * valid  # right-padded
    targets = torch.randint(1, 30, (3, 11)) * valid  # 0 (ignored) at padding
    for name, extra in (("m2rec", dict(text_embeddings=torch.randn(31, 12))), ("mamba4rec", {})):
        models = {}
        for backend in ("cpu", "torch"):
            torch.manual_seed(0)
            models[backend] = build_model(name, 30, d_model=16, max_len=11, backend=backend, **extra).train()
        assert models["cpu"].state_dict().keys() == models["torch"].state_dict().keys()
        for backend, model in models.items():
            torch.manual_seed(1)  # the same dropout masks
            model.zero_grad()
            model.loss(seq, lengths, targets=targets, all_positions=True).backward()
        for (pname, p_cpu), (_, p_ref) in zip(models["cpu"].named_parameters(), models["torch"].named_parameters()):
            if p_ref.grad is None:
                continue
            _close(p_cpu.grad, p_ref.grad, f"{name}: grad of {pname}", rel_to_max=1e-4, rtol=1e-3)
        models["cpu"].eval()
        models["torch"].eval()
        with torch.no_grad():
            _close(models["cpu"].scores(seq, lengths)[:, 1:], models["torch"].scores(seq, lengths)[:, 1:],
                   f"{name}: scores", rel_to_max=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the fallback path

@pytest.fixture
def fresh_status(monkeypatch):
    """Forget the load result before and after the test (the library itself stays loaded)."""
    scan_cpu.reset_cpu_scan_status()
    yield monkeypatch
    monkeypatch.undo()
    scan_cpu.reset_cpu_scan_status()
    scan_cpu.cpu_scan_status()


def _write_manifest(path, **fields):
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(fields))


@pytest.mark.parametrize("case", ["missing", "failed", "stale"])
def test_fallback_to_the_reference_with_one_warning(fresh_status, tmp_path, case):
    """No build, a failed build or a stale one: one RuntimeWarning naming the reason, "auto" runs the
    reference (bit-identical to backend="torch"), an explicit "cpu" raises with the reason."""
    lib = tmp_path / "lib"
    if case == "failed":
        _write_manifest(lib, status="failed", error="c++: command not found", key=cpu_build.build_key())
    elif case == "stale":
        _write_manifest(lib, status="ok", key=dict(cpu_build.build_key(), sources="0" * 64),
                        variants=["generic"])
    fresh_status.setenv("M2REC_CPU_SCAN_LIB", str(lib))
    fresh_status.delenv("M2REC_CPU_SCAN", raising=False)
    kw = make_scan_inputs(**ODD, use_lengths=True)
    reason = {"missing": "not built", "failed": "build failed", "stale": "stale"}[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [selective_scan(**kw, backend="auto") for _ in range(3)]
        got_final = selective_scan_final(**dict(kw, lengths=kw["lengths"].clamp(min=1)), backend="auto")
    ours = [w for w in caught if "compiled CPU scan" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert reason in str(ours[0].message) and "PyTorch reference" in str(ours[0].message)
    want = selective_scan(**kw, backend="torch")
    assert all(torch.equal(g, want) for g in got)
    assert torch.equal(got_final[0], selective_scan_final(**dict(kw, lengths=kw["lengths"].clamp(min=1)),
                                                          backend="torch")[0])
    with pytest.raises(RuntimeError, match=f"backend='cpu' cannot run: .*{reason}"):
        selective_scan(**kw, backend="cpu")
    with pytest.raises(ValueError, match=reason):
        check_backend_runs("cpu", "cpu", "--backend")


def test_turned_off_by_environment_without_warning(fresh_status):
    fresh_status.setenv("M2REC_CPU_SCAN", "0")
    kw = make_scan_inputs(**ODD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(selective_scan(**kw, backend="auto"), selective_scan(**kw, backend="torch"))
    assert "M2REC_CPU_SCAN=0" in scan_cpu.cpu_scan_status().describe()


@needs_lib
def test_forced_variant_and_capability(fresh_status):
    """M2REC_CPU_SCAN_ISA forces a variant; an unknown name is a reason, not a crash."""
    fresh_status.setenv("M2REC_CPU_SCAN_ISA", "generic")
    assert scan_cpu.cpu_scan_status().isa == "generic"
    scan_cpu.reset_cpu_scan_status()
    fresh_status.setenv("M2REC_CPU_SCAN_ISA", "sse9")
    with pytest.warns(RuntimeWarning, match="M2REC_CPU_SCAN_ISA"):
        assert not scan_cpu.cpu_scan_status().available


def test_capability_maps_to_variants(monkeypatch):
    """torch's CPU capability (ATEN_CPU_CAPABILITY) bounds the variant: DEFAULT means generic only."""
    built = ["avx512", "avx2", "generic"]
    for cap, want in (("AVX512", built), ("AVX2", ["avx2", "generic"]), ("DEFAULT", ["generic"]),
                      ("ZVECTOR", ["generic"])):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=cap: c)
        assert scan_cpu._variant_for_capability(built) == want, cap
