"""The PyTorch selective scan (the spec) against an independent naive loop, gradcheck, the one-step
update, and input validation."""
import itertools

import pytest
import torch

from _scan_inputs import ODD, clone_inputs, make_scan_inputs, naive_scan
from _tolerance import assert_close
from m2rec_kernels import selective_scan, selective_scan_final, selective_state_update
from m2rec_kernels.scan.reference import selective_scan_ref

OPTION_GRID = list(itertools.product([False, True], repeat=4))  # D, z, delta_bias, softplus


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", OPTION_GRID)
def test_matches_naive_loop(device, use_D, use_z, use_bias, softplus, use_lengths):
    kw = make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus,
                          use_lengths=use_lengths, device=device)
    out, last = selective_scan(**kw, return_last_state=True, backend="torch")
    want_out, want_last = naive_scan(**kw)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert last.shape == (ODD["batch"], ODD["dim"], ODD["N"])
    assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    assert_close(last.double(), want_last, rtol=1e-5, atol=1e-5)
    # without return_last_state: the same output alone
    assert_close(selective_scan(**kw, backend="torch"), out, rtol=0, atol=0)


@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", OPTION_GRID)
def test_scan_inputs_keep_the_state_bounded(use_D, use_z, use_bias, softplus):
    """The shared inputs are realistic: every step decays (exp(Δ·A) < 1) and the state stays small, so
    fp32 tolerances measure the scan, not how one CPU rounds numbers of size 1e9."""
    kw = make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus,
                          dtype=torch.float64)
    step = kw["delta"] + (0 if kw["delta_bias"] is None else kw["delta_bias"][:, None])
    if softplus:
        step = torch.nn.functional.softplus(step)
    assert step.min() > 0
    out, last = naive_scan(**kw)
    assert out.abs().max() < 1e3 and last.abs().max() < 1e3  # Δ = 21 rows reach ~250; a growing state 1e9


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 64])
def test_chunking_does_not_change_the_result(chunk):
    kw = make_scan_inputs(**ODD, use_lengths=True, dtype=torch.float64)
    out, last = selective_scan_ref(**kw, return_last_state=True, chunk=chunk)
    want_out, want_last = naive_scan(**kw)
    assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    assert_close(last, want_last, rtol=1e-12, atol=1e-12)


def test_low_precision_output_dtype_and_fp32_state():
    kw = make_scan_inputs(**ODD, dtype=torch.float16)
    out, last = selective_scan(**kw, return_last_state=True, backend="torch")
    assert out.dtype == torch.float16 and last.dtype == torch.float32
    want_out, want_last = naive_scan(**kw)
    # fp16 only at the inputs and the output rounding: the state itself is exact to fp32
    assert_close(last.double(), want_last, rtol=1e-5, atol=1e-5)
    assert_close(out.double(), want_out, rtol=2e-3, atol=2e-3)


def test_lengths_give_each_sequence_its_own_last_state():
    kw = make_scan_inputs(**ODD, use_lengths=True)
    out, last = selective_scan(**kw, return_last_state=True)
    for b, n in enumerate(kw["lengths"].tolist()):
        if n == 0:
            assert torch.count_nonzero(last[b]) == 0
            continue
        alone = {k: (v[b : b + 1, ..., :n] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
        alone["lengths"] = None
        out_b, last_b = selective_scan(**alone, return_last_state=True)
        assert_close(out[b : b + 1, :, :n], out_b, rtol=1e-5, atol=1e-5)
        assert_close(last[b : b + 1], last_b, rtol=1e-5, atol=1e-5)


GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


@pytest.mark.parametrize(
    "use_D,use_z,use_bias,softplus,use_lengths",
    [(True, True, True, True, True), (False, False, False, False, False), (True, False, True, False, True)],
)
@pytest.mark.parametrize("chunk", [5, 16])
def test_backward_matches_autograd_through_the_naive_loop(device, use_D, use_z, use_bias, softplus, use_lengths, chunk):
    """The reference's hand-written backward against autograd through the naive loop, float64, with
    gradients flowing into both the output and the last state."""
    kw = make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus,
                          use_lengths=use_lengths, dtype=torch.float64, device=device)
    ours, naive = clone_inputs(kw), clone_inputs(kw)
    out, last = selective_scan_ref(**ours, return_last_state=True, chunk=chunk)
    want_out, want_last = naive_scan(**naive)
    g_out, g_last = torch.randn_like(want_out), torch.randn_like(want_last)
    torch.autograd.backward((out, last), (g_out, g_last))
    torch.autograd.backward((want_out, want_last), (g_out, g_last))
    for name in GRAD_NAMES:
        if kw[name] is not None:
            assert_close(ours[name].grad, naive[name].grad, rtol=1e-10, atol=1e-10, msg=name)


def test_gradient_dtypes_follow_the_inputs():
    kw = clone_inputs(make_scan_inputs(2, 4, 5, 3, dtype=torch.float16))
    out, last = selective_scan(**kw, return_last_state=True, backend="torch")
    (out.float().sum() + last.sum()).backward()
    for name in GRAD_NAMES:
        assert kw[name].grad.dtype == kw[name].dtype, name


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
def test_gradcheck_float64(use_lengths):
    kw = make_scan_inputs(2, 3, 6, 2, use_lengths=use_lengths, dtype=torch.float64)
    if use_lengths:
        kw["lengths"] = torch.tensor([6, 4])
    kw["delta_bias"][:2] = torch.tensor([0.3, -0.2], dtype=torch.float64)  # keep softplus smooth
    kw = clone_inputs(kw)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]

    def f(*tensors):
        args = dict(kw, **dict(zip(names, tensors)))
        out, last = selective_scan_ref(**args, return_last_state=True, chunk=4)  # crosses a chunk edge
        return out, last

    assert torch.autograd.gradcheck(f, tuple(kw[n] for n in names), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", [(True, True, True, True), (False, False, False, False)])
def test_state_update_step_by_step_reproduces_scan(device, use_D, use_z, use_bias, softplus):
    kw = make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus, device=device)
    out, last = selective_scan(**kw, return_last_state=True, backend="torch")
    batch, dim, L = kw["u"].shape
    state = torch.zeros(batch, dim, ODD["N"], device=device)
    steps = []
    for t in range(L):
        steps.append(
            selective_state_update(
                state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t], kw["C"][..., t],
                D=kw["D"], z=None if kw["z"] is None else kw["z"][..., t], dt_bias=kw["delta_bias"],
                dt_softplus=softplus, backend="torch",
            )
        )
    assert_close(torch.stack(steps, dim=-1), out, rtol=1e-5, atol=1e-5)
    assert_close(state, last, rtol=1e-5, atol=1e-5)


def test_state_update_low_precision_state_is_written_back_rounded():
    kw = make_scan_inputs(2, 5, 1, 3)
    state16 = torch.randn(2, 5, 3).half()
    state32 = state16.float()
    args = (kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])
    out32 = selective_state_update(state32, *args, dt_softplus=True)
    out16 = selective_state_update(state16, *args, dt_softplus=True)
    assert state16.dtype == torch.float16
    assert_close(state16, state32.half(), rtol=0, atol=0)
    assert_close(out16, out32, rtol=1e-3, atol=1e-3)


def _bad_scan_cases():
    b, d, L, N = 2, 4, 5, 3
    good = dict(u=torch.randn(b, d, L), delta=torch.rand(b, d, L), A=-torch.rand(d, N),
                B=torch.randn(b, N, L), C=torch.randn(b, N, L))
    return good, [
        (dict(u=torch.randn(b, d)), ValueError, "u"),
        (dict(u=[1.0]), TypeError, "u"),
        (dict(u=torch.ones(b, d, L, dtype=torch.int64)), TypeError, "u"),
        (dict(delta=torch.rand(b, d, L + 1)), ValueError, "delta"),
        (dict(A=-torch.rand(d + 1, N)), ValueError, "A"),
        (dict(A=-torch.rand(d, N).half()), TypeError, "A"),
        (dict(A=torch.randn(d, N, dtype=torch.complex64)), TypeError, "A"),
        (dict(B=torch.randn(b, N + 1, L)), ValueError, "B"),
        (dict(B=torch.randn(d, N)), ValueError, "B"),  # mamba's time-invariant B is not supported
        (dict(C=torch.randn(b, N, L - 1)), ValueError, "C"),
        (dict(D=torch.randn(d + 1)), ValueError, "D"),
        (dict(z=torch.randn(b, d, L - 1)), ValueError, "z"),
        (dict(delta_bias=torch.randn(1, d)), ValueError, "delta_bias"),
        (dict(lengths=torch.tensor([L + 1, 0])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([-1, 0])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths"),
        (dict(lengths=torch.tensor([1, 2, 3])), ValueError, "lengths"),
        (dict(delta_softplus="yes"), TypeError, "delta_softplus"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_scan_cases()[1])))
def test_bad_scan_inputs_raise_naming_the_argument(case):
    good, cases = _bad_scan_cases()
    change, exc, name = cases[case]
    with pytest.raises(exc, match=name):
        selective_scan(**dict(good, **change))


def test_bad_state_update_inputs_raise_naming_the_argument():
    b, d, N = 2, 4, 3
    good = dict(state=torch.zeros(b, d, N), x=torch.randn(b, d), dt=torch.rand(b, d), A=-torch.rand(d, N),
                B=torch.randn(b, N), C=torch.randn(b, N))
    for change, exc, name in [
        (dict(state=torch.zeros(b, d)), ValueError, "state"),
        (dict(x=torch.randn(b, d + 1)), ValueError, "x"),
        (dict(dt=torch.randn(b + 1, d)), ValueError, "dt"),
        (dict(A=-torch.rand(d, N + 1)), ValueError, "A"),
        (dict(B=torch.randn(b, N, 1)), ValueError, "B"),
        (dict(C=torch.randn(b, N + 1)), ValueError, "C"),
        (dict(D=torch.randn(d, 1)), ValueError, "D"),
        (dict(z=torch.randn(b, d, 1)), ValueError, "z"),
        (dict(dt_bias=torch.randn(d + 1)), ValueError, "dt_bias"),
        (dict(state=torch.zeros(b, d, N, requires_grad=True)), ValueError, "state"),
    ]:
        with pytest.raises(exc, match=name):
            selective_state_update(**dict(good, **change))


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("use_D,use_z", [(True, True), (False, False)])
def test_final_equals_the_full_scan_at_each_last_step(use_D, use_z, use_lengths):
    """selective_scan_final: the output at lengths - 1 (L - 1 without lengths) and the last state of
    the full scan, without forming the other steps' outputs; with gradients it is differentiable."""
    kw = make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_lengths=use_lengths)
    if use_lengths:
        kw["lengths"] = kw["lengths"].clamp(min=1)
    out, last = selective_scan(**kw, return_last_state=True, backend="torch")
    idx = kw["lengths"] - 1 if use_lengths else torch.full((ODD["batch"],), ODD["L"] - 1)
    want = out[torch.arange(ODD["batch"]), :, idx]
    got, got_last = selective_scan_final(**kw, backend="torch")
    assert got.shape == (ODD["batch"], ODD["dim"]) and got.dtype == kw["u"].dtype
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_close(got_last, last, rtol=0, atol=0)
    # the differentiable path gives the same values and gradients that flow
    ours = clone_inputs(kw)
    got_g, _ = selective_scan_final(**ours, backend="torch")
    assert_close(got_g, want, rtol=1e-5, atol=1e-5)
    got_g.sum().backward()
    assert ours["u"].grad is not None and torch.count_nonzero(ours["u"].grad) > 0


def test_final_rejects_empty_sequences():
    kw = make_scan_inputs(**ODD, use_lengths=True)  # one sequence has length 0
    with pytest.raises(ValueError, match="lengths >= 1"):
        selective_scan_final(**kw)
