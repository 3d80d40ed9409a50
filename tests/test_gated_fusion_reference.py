"""gated_fusion (torch backend) against an independent per-row implementation (DESIGN §2.3).

Also holds the helpers the Triton tests reuse: ``make_inputs``, ``naive_gated_fusion`` and
``check_dropout`` (a backend-agnostic dropout test that recovers the mask from gradients).
"""
import math

import pytest
import torch

from _tolerance import assert_close
from m2rec_kernels.fusion import gated_fusion

BATCH, LENGTH, DIM = 3, 37, 48  # odd on purpose: d is not a power of two, L is prime


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a loaded 2-core machine
    their spin-waits made each small op take milliseconds (gradcheck went from 1 s to 12 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_inputs(k, batch=BATCH, length=LENGTH, d=DIM, dtype=torch.float32, device="cpu", param_dtype=None):
    """Branches, residual and parameters with non-trivial gates and LayerNorm affine."""
    param_dtype = param_dtype or dtype
    branches = [torch.randn(batch, length, d, dtype=dtype, device=device) for _ in range(k)]
    residual = torch.randn(batch, length, d, dtype=dtype, device=device)
    gate_weight = (torch.randn(k, k * d) / math.sqrt(d)).to(param_dtype).to(device)
    gate_bias = torch.randn(k).to(param_dtype).to(device)
    ln_weight = (1.0 + 0.5 * torch.randn(d)).to(param_dtype).to(device)
    ln_bias = (0.5 * torch.randn(d)).to(param_dtype).to(device)
    return branches, residual, gate_weight, gate_bias, ln_weight, ln_bias


def naive_gated_fusion(branches, residual, gate_weight, gate_bias, ln_weight, ln_bias, eps=1e-12,
                       keep_mask=None, dropout_p=0.0):
    """Row by row in float64, with a hand-written softmax and LayerNorm; differentiable.

    Returns (out, gates) in float64. ``keep_mask`` (batch, L, d) applies dropout with that mask.
    """
    f64 = [t.double() for t in branches]
    res, w, bias, lw, lb = (t.double() for t in (residual, gate_weight, gate_bias, ln_weight, ln_bias))
    k = len(f64)
    batch, length, d = res.shape
    outs, gates = [], []
    for b in range(batch):
        for t in range(length):
            xs = [x[b, t] for x in f64]
            logits = []
            for j in range(k):
                logit = bias[j]
                for i in range(k):
                    logit = logit + (w[j, i * d:(i + 1) * d] * xs[i]).sum()
                logits.append(logit)
            top = max(float(v.detach()) for v in logits)  # a constant shift: no gradient
            exps = [torch.exp(v - top) for v in logits]
            total = sum(exps)
            alpha = [e / total for e in exps]
            o = sum(a * x for a, x in zip(alpha, xs))
            if keep_mask is not None:
                o = o * keep_mask[b, t].double() / (1.0 - dropout_p)
            r = res[b, t] + o
            mean = r.sum() / d
            var = ((r - mean) ** 2).sum() / d
            outs.append((r - mean) / torch.sqrt(var + eps) * lw + lb)
            gates.append(torch.stack(alpha))
    return torch.stack(outs).reshape(batch, length, d), torch.stack(gates).reshape(batch, length, k)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=False)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_naive_forward_and_backward(k, dtype, device):
    args = make_inputs(k, dtype=dtype, device=device)
    leaves = [*args[0], *args[1:]]
    for t in leaves:
        t.requires_grad_(True)
    out, gates = gated_fusion(*args, eps=1e-5, return_gates=True, backend="torch")
    assert out.dtype == dtype and gates.dtype == dtype
    assert out.shape == (BATCH, LENGTH, DIM) and gates.shape == (BATCH, LENGTH, k)
    want_out, want_gates = naive_gated_fusion(*args, eps=1e-5)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(out.double(), want_out, **tol)
    assert_close(gates.double(), want_gates, **tol)

    grad_out = torch.randn_like(out)
    got = _grads(out, leaves, grad_out)
    want = _grads(want_out, leaves, grad_out.double())
    names = [f"branches[{i}]" for i in range(k)] + ["residual", "gate_weight", "gate_bias", "ln_weight", "ln_bias"]
    gtol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, g, w in zip(names, got, want):
        assert_close(g.double(), w.double(), **gtol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs(dtype, tol):
    args = make_inputs(3, dtype=dtype)
    out, gates = gated_fusion(*args, return_gates=True, backend="torch")
    assert out.dtype == dtype and gates.dtype == dtype
    want_out, want_gates = naive_gated_fusion(*args)  # float64 math on the same low-precision inputs
    # the only error left is the final rounding to the low precision dtype (math runs in fp32)
    assert_close(out.double(), want_out, rtol=tol, atol=tol)
    assert_close(gates.double(), want_gates, rtol=tol, atol=tol)


def test_fp32_parameters_with_fp16_activations():
    args = make_inputs(2, dtype=torch.float16, param_dtype=torch.float32)
    out = gated_fusion(*args, backend="torch")
    assert out.dtype == torch.float16
    assert_close(out.double(), naive_gated_fusion(*args)[0], rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_gradcheck_float64(k, dropout_p):
    branches, residual, w, b, lw, lb = make_inputs(k, batch=2, length=3, d=5, dtype=torch.float64)
    leaves = [*branches, residual, w, b, lw, lb]
    for t in leaves:
        t.requires_grad_(True)

    def fn(*xs):
        out, gates = gated_fusion(list(xs[:k]), *xs[k:], eps=1e-5, dropout_p=dropout_p, seed=7,
                                  return_gates=True, backend="torch")
        return out, gates

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_dropout_off_when_p_zero_or_not_training():
    args = make_inputs(3)
    plain = gated_fusion(*args, backend="torch")
    assert_close(gated_fusion(*args, dropout_p=0.0, training=True, backend="torch"), plain,
                               rtol=0, atol=0)
    assert_close(gated_fusion(*args, dropout_p=0.5, training=False, backend="torch"), plain,
                               rtol=0, atol=0)
    assert_close(plain.double(), naive_gated_fusion(*args)[0], rtol=1e-5, atol=1e-5)
    # and dropout really changes something when training
    assert not torch.allclose(gated_fusion(*args, dropout_p=0.5, backend="torch"), plain)


def check_dropout(backend, device, dropout_p=0.3, k=3, dtype=torch.float32, fwd_tol=1e-4, bwd_tol=1e-4):
    """Dropout check that does not need to reproduce the backend's RNG.

    1. With a zero gate weight and bias the gates are uniform (1/k) and do not depend on the branches, so
       d out / d branch_0 = (1/k) * keep * dr / (1 - p) and d out / d residual = dr: their ratio is
       exactly 0 (dropped) or 1 / (k (1 - p)) (kept). That recovers the mask the *backward* used and
       checks the scaling; the fraction dropped must be about p.
    2. The forward with the same seed must equal the naive math replayed with that mask (so forward
       and backward agree on the mask), and so must every gradient for a general gate weight.
    3. Same seed -> same output; another seed -> another mask.
    """
    seed = 1234
    branches, residual, w, b, lw, lb = make_inputs(k, dtype=dtype, device=device)
    zero_w, zero_b = torch.zeros_like(w), torch.zeros_like(b)
    leaves = [*branches, residual]
    for t in leaves:
        t.requires_grad_(True)
    out = gated_fusion(branches, residual, zero_w, zero_b, lw, lb, eps=1e-5, dropout_p=dropout_p, seed=seed,
                       backend=backend)
    grad_out = torch.randn_like(out)
    got = _grads(out, leaves, grad_out)
    d_branch, d_res = got[0].double(), got[k].double()
    usable = d_res.abs() > 1e-3
    ratio = (d_branch[usable] / d_res[usable]) * k * (1.0 - dropout_p)  # 0 (dropped) or 1 (kept)
    near0, near1 = ratio.abs() < 1e-2, (ratio - 1).abs() < 1e-2
    assert bool((near0 | near1).all()), "gradient ratio is neither 0 nor 1/(k(1-p)): wrong dropout scaling"
    keep = (d_branch * k * (1.0 - dropout_p) / d_res).sub(1).abs() < 0.5
    n = keep.numel()
    dropped = 1.0 - keep.double().mean().item()
    assert abs(dropped - dropout_p) < 5 * math.sqrt(dropout_p * (1 - dropout_p) / n) + 1e-3, dropped
    for i in range(1, k):  # every branch shares the one mask on o
        assert_close(got[i], got[0], rtol=1e-5, atol=1e-6)

    want_out, _ = naive_gated_fusion(branches, residual, zero_w, zero_b, lw, lb, eps=1e-5,
                                     keep_mask=keep, dropout_p=dropout_p)
    assert_close(out.double(), want_out, rtol=fwd_tol, atol=fwd_tol)

    # general gate weight, same seed and shape -> same mask: every gradient against the naive math
    params = [w, b, lw, lb]
    for t in params:
        t.requires_grad_(True)
    out, gates = gated_fusion(branches, residual, w, b, lw, lb, eps=1e-5, dropout_p=dropout_p, seed=seed,
                              return_gates=True, backend=backend)
    want_out, want_gates = naive_gated_fusion(branches, residual, w, b, lw, lb, eps=1e-5,
                                              keep_mask=keep, dropout_p=dropout_p)
    assert_close(out.double(), want_out, rtol=fwd_tol, atol=fwd_tol)
    assert_close(gates.double(), want_gates, rtol=fwd_tol, atol=fwd_tol)
    got = _grads(out, leaves + params, grad_out)
    want = _grads(want_out, leaves + params, grad_out.double())
    for g, wg in zip(got, want):
        assert_close(g.double(), wg.double(), rtol=bwd_tol, atol=bwd_tol)

    with torch.no_grad():
        again = gated_fusion(branches, residual, w, b, lw, lb, eps=1e-5, dropout_p=dropout_p, seed=seed,
                             backend=backend)
        other = gated_fusion(branches, residual, w, b, lw, lb, eps=1e-5, dropout_p=dropout_p, seed=seed + 1,
                             backend=backend)
    assert_close(again, out.detach(), rtol=0, atol=0)
    assert not torch.allclose(other, out.detach())


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_mask_fraction_scaling_and_gradients(dropout_p):
    check_dropout("torch", torch.device("cpu"), dropout_p=dropout_p)


def test_dropout_without_seed_uses_torch_rng():
    args = make_inputs(2)
    torch.manual_seed(3)
    first = gated_fusion(*args, dropout_p=0.5, backend="torch")
    torch.manual_seed(3)
    assert_close(gated_fusion(*args, dropout_p=0.5, backend="torch"), first, rtol=0, atol=0)


def _bad(mutate):
    branches, residual, w, b, lw, lb = make_inputs(2, batch=2, length=3, d=4)
    kw = dict(branches=branches, residual=residual, gate_weight=w, gate_bias=b, ln_weight=lw, ln_bias=lb)
    mutate(kw)
    return kw


BAD_INPUTS = {
    "one branch": (lambda kw: kw.update(branches=kw["branches"][:1]), ValueError, "2 or 3"),
    "four branches": (lambda kw: kw.update(branches=kw["branches"] * 2), ValueError, "2 or 3"),
    "branches a tensor": (lambda kw: kw.update(branches=torch.stack(kw["branches"])), TypeError, "branches"),
    "branch shape": (lambda kw: kw["branches"].__setitem__(1, torch.randn(2, 3, 5)), ValueError, r"branches\[1\]"),
    "branch dtype": (lambda kw: kw["branches"].__setitem__(0, kw["branches"][0].double()), TypeError,
                     r"branches\[0\]"),
    "branch int": (lambda kw: kw["branches"].__setitem__(0, torch.ones(2, 3, 4, dtype=torch.long)), TypeError,
                   r"branches\[0\]"),
    "branch device": (lambda kw: kw["branches"].__setitem__(0, torch.empty(2, 3, 4, device="meta")), ValueError,
                      r"branches\[0\]"),
    "residual 2-D": (lambda kw: kw.update(residual=torch.randn(3, 4)), ValueError, "residual"),
    "gate_weight shape": (lambda kw: kw.update(gate_weight=torch.randn(2, 4)), ValueError, "gate_weight"),
    "gate_bias shape": (lambda kw: kw.update(gate_bias=torch.randn(3)), ValueError, "gate_bias"),
    "ln_weight shape": (lambda kw: kw.update(ln_weight=torch.randn(5)), ValueError, "ln_weight"),
    "ln_bias not tensor": (lambda kw: kw.update(ln_bias=[0.0] * 4), TypeError, "ln_bias"),
    "dropout 1": (lambda kw: kw.update(dropout_p=1.0), ValueError, "dropout_p"),
    "dropout negative": (lambda kw: kw.update(dropout_p=-0.1), ValueError, "dropout_p"),
    "eps zero": (lambda kw: kw.update(eps=0.0), ValueError, "eps"),
    "seed float": (lambda kw: kw.update(seed=1.5), TypeError, "seed"),
    "backend": (lambda kw: kw.update(backend="cuda"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise(case):
    mutate, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        gated_fusion(**_bad(mutate))


def test_triton_backend_rejects_float64():
    kw = _bad(lambda kw: None)
    kw = {k: ([b.double() for b in v] if k == "branches" else v.double()) for k, v in kw.items()}
    with pytest.raises((TypeError, RuntimeError), match="float64|interpreter"):
        gated_fusion(**kw, backend="triton")
