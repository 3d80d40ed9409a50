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
        (dict(B=torch.randn(d, N + 1)), ValueError, "B"),  # time-invariant (dim, N) with the wrong N
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
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, "):
        selective_scan_final(**kw)


# --------------------------------------------------------------------------------------------------
# B and C grouped (batch, G, N, L) and time-invariant (dim, N) (m2rec_kernels/scan/bc_forms.py)
# --------------------------------------------------------------------------------------------------

# (B form, C form): "seq" (batch, N, L), G (batch, G, N, L), "inv" (dim, N); at ODD's dim 48, G = 48 is
# one channel per group and G = 1 the per-sequence form written as grouped.
BC_FORMS = [(2, "seq"), ("seq", 3), (3, "inv"), ("inv", 2), ("inv", "inv"), (48, 48), (1, "inv")]
BC_IDS = [f"B{b}-C{c}" for b, c in BC_FORMS]


# every option with lengths (full, partial and empty sequences); all or none of them without
BC_OPTIONS = [opts + (True,) for opts in OPTION_GRID] + [(True,) * 4 + (False,), (False,) * 5]


@pytest.mark.parametrize("B_form,C_form", BC_FORMS, ids=BC_IDS)
@pytest.mark.parametrize("use_D,use_z,use_bias,softplus,use_lengths", BC_OPTIONS)
def test_bc_forms_forward_and_gradients_match_the_naive_loop(B_form, C_form, use_D, use_z, use_bias, softplus,
                                                             use_lengths):
    """Every form of B and C, forward, last state and every gradient in float64 against autograd
    through the naive loop (which writes each channel's B/C row out); dB, dC come back in their
    inputs' forms (grouped: summed over the group's channels; time-invariant: over batch and time)."""
    kw = make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus,
                          use_lengths=use_lengths, dtype=torch.float64, B_form=B_form, C_form=C_form)
    ours, naive = clone_inputs(kw), clone_inputs(kw)
    out, last = selective_scan(**ours, return_last_state=True, backend="torch")
    want_out, want_last = naive_scan(**naive)
    assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    assert_close(last, want_last, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(2)
    g_out = torch.randn(want_out.shape, generator=g, dtype=torch.float64)
    g_last = torch.randn(want_last.shape, generator=g, dtype=torch.float64)
    torch.autograd.backward((out, last), (g_out, g_last))
    torch.autograd.backward((want_out, want_last), (g_out, g_last))
    for name in GRAD_NAMES:
        if kw[name] is not None:
            assert ours[name].grad.shape == kw[name].shape, name
            assert_close(ours[name].grad, naive[name].grad, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("B_form,C_form", [(3, "inv"), ("inv", 2)], ids=["B3-Cinv", "Binv-C2"])
@pytest.mark.parametrize("chunk", [1, 5, 37])
def test_bc_forms_chunking_does_not_change_the_result(B_form, C_form, chunk):
    kw = make_scan_inputs(**ODD, use_lengths=True, dtype=torch.float64, B_form=B_form, C_form=C_form)
    out, last = selective_scan_ref(**kw, return_last_state=True, chunk=chunk)
    want_out, want_last = naive_scan(**kw)
    assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    assert_close(last, want_last, rtol=1e-12, atol=1e-12)


def test_bc_forms_equal_their_per_channel_expansion():
    """A grouped B equals the per-sequence scan of each group's channels; a time-invariant C equals the
    scan of each channel alone with that channel's row repeated along time and batch."""
    kw = make_scan_inputs(**ODD, use_lengths=True, B_form=3, C_form="inv")
    out, last = selective_scan(**kw, return_last_state=True, backend="torch")
    per = ODD["dim"] // 3
    for d in (0, per - 1, per, ODD["dim"] - 1):
        one = dict(kw, u=kw["u"][:, d:d + 1], delta=kw["delta"][:, d:d + 1], A=kw["A"][d:d + 1],
                   B=kw["B"][:, d // per], C=kw["C"][d].expand(ODD["batch"], ODD["L"], ODD["N"]).transpose(1, 2),
                   D=kw["D"][d:d + 1], z=kw["z"][:, d:d + 1], delta_bias=kw["delta_bias"][d:d + 1])
        out_d, last_d = selective_scan(**one, return_last_state=True, backend="torch")
        assert_close(out[:, d:d + 1], out_d, rtol=1e-6, atol=1e-6)
        assert_close(last[:, d:d + 1], last_d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("B_form,C_form", [(2, "inv"), ("inv", 3)], ids=["B2-Cinv", "Binv-C3"])
def test_bc_forms_gradcheck_float64(B_form, C_form):
    kw = make_scan_inputs(2, 6, 6, 2, use_lengths=True, dtype=torch.float64, B_form=B_form, C_form=C_form)
    kw["lengths"] = torch.tensor([6, 4])
    kw["delta_bias"][:2] = torch.tensor([0.3, -0.2], dtype=torch.float64)  # keep softplus smooth
    kw = clone_inputs(kw)

    def f(*tensors):
        args = dict(kw, **dict(zip(GRAD_NAMES, tensors)))
        return selective_scan_ref(**args, return_last_state=True, chunk=4)

    assert torch.autograd.gradcheck(f, tuple(kw[n] for n in GRAD_NAMES), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("B_form,C_form", [(2, "inv"), ("inv", 3), (48, 1)], ids=["B2-Cinv", "Binv-C3", "B48-C1"])
def test_bc_forms_final_equals_the_full_scan_at_each_last_step(B_form, C_form):
    kw = make_scan_inputs(**ODD, use_lengths=True, B_form=B_form, C_form=C_form)
    kw["lengths"] = kw["lengths"].clamp(min=1)
    out, last = selective_scan(**kw, return_last_state=True, backend="torch")
    want = out[torch.arange(ODD["batch"]), :, kw["lengths"] - 1]
    got, got_last = selective_scan_final(**kw, backend="torch")
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_close(got_last, last, rtol=0, atol=0)


def test_bc_forms_low_precision_against_float64():
    """fp16 B (grouped) and C (time-invariant): the state is fp32, the gradients come back in fp16 and
    in their inputs' forms, within fp16 rounding of a float64 run on the same values."""
    kw = make_scan_inputs(**ODD, use_lengths=True, dtype=torch.float16, B_form=2, C_form="inv")
    lp = clone_inputs(kw)
    exact = clone_inputs(kw, dtype=torch.float64)
    exact["A"] = exact["A"].double().detach().requires_grad_()
    out, last = selective_scan(**lp, return_last_state=True, backend="torch")
    want_out, want_last = selective_scan(**exact, return_last_state=True, backend="torch")
    assert out.dtype == torch.float16 and last.dtype == torch.float32
    assert_close(out.double(), want_out, rtol=2e-3, atol=2e-3)
    assert_close(last.double(), want_last, rtol=1e-5, atol=1e-5)
    out.float().sum().backward()
    want_out.sum().backward()
    for name in ("B", "C"):
        assert lp[name].grad.dtype == torch.float16 and lp[name].grad.shape == kw[name].shape
        assert_close(lp[name].grad.double(), exact[name].grad, rtol=1e-2, atol=1e-2, msg=name)


def _bad_bc_cases():
    b, d, L, N = 2, 6, 5, 3
    good = dict(u=torch.randn(b, d, L), delta=torch.rand(b, d, L), A=-torch.rand(d, N),
                B=torch.randn(b, N, L), C=torch.randn(b, N, L))
    return good, [
        (dict(B=torch.randn(b, 4, N, L)), "B is grouped with G = 4 groups"),  # 4 does not divide 6
        (dict(C=torch.randn(b, 0, N, L)), "C is grouped with G = 0 groups"),
        (dict(B=torch.randn(b, 2, N + 1, L)), "B must have shape"),  # grouped, wrong N
        (dict(C=torch.randn(b, 3, N, L + 1)), "C must have shape"),  # grouped, wrong L
        (dict(B=torch.randn(b + 1, 2, N, L)), "B must have shape"),  # grouped, wrong batch
        (dict(C=torch.randn(d, N + 1)), "C must have shape"),  # time-invariant, wrong N
        (dict(B=torch.randn(d + 1, N)), "B must have shape"),  # time-invariant, wrong dim
        (dict(B=torch.randn(b, 1, 2, N, L)), "B must have shape.*5-D"),
        (dict(C=torch.randn(N)), "C must have shape.*1-D"),
        (dict(B=torch.randn(d, N, device="meta")), "B is on meta"),
        (dict(C=torch.randn(b, 2, N, L, device="meta")), "C is on meta"),
    ]


@pytest.mark.parametrize("op", ["selective_scan", "selective_scan_final"])
@pytest.mark.parametrize("case", range(len(_bad_bc_cases()[1])))
def test_bad_bc_forms_raise_naming_the_argument(op, case):
    good, cases = _bad_bc_cases()
    change, message = cases[case]
    fn = selective_scan if op == "selective_scan" else selective_scan_final
    with pytest.raises(ValueError, match=message):
        fn(**dict(good, **change))


@pytest.mark.parametrize("op", ["selective_scan", "selective_scan_final"])
def test_complex_A_is_refused_with_a_clear_error(op):
    good, _ = _bad_bc_cases()
    fn = selective_scan if op == "selective_scan" else selective_scan_final
    A = torch.complex(-torch.rand(6, 3), torch.randn(6, 3))
    with pytest.raises(TypeError, match="complex A .* is not supported"):
        fn(**dict(good, A=A))


@pytest.mark.parametrize("shape", [(0, 6, 5, 3), (2, 0, 5, 3), (2, 6, 0, 3)], ids=["batch0", "dim0", "L0"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_bc_forms_empty_shapes(shape, backend):
    """Empty batch, channels or time with grouped / time-invariant B, C: empty outputs, zero gradients in
    the inputs' forms (the compiled CPU scan with grouped ones: it does not take time-invariant B/C)."""
    from m2rec_kernels.scan.cpu import cpu_scan_unavailable

    if backend == "cpu" and cpu_scan_unavailable():
        pytest.skip(cpu_scan_unavailable())
    for B_form, C_form in ((2, 3),) if backend == "cpu" else ((2, "inv"), ("inv", 3)):
        kw = clone_inputs(make_scan_inputs(*shape, B_form=B_form, C_form=C_form))
        out, last = selective_scan(**kw, return_last_state=True, backend=backend)
        assert out.shape == kw["u"].shape and last.shape == (shape[0], shape[1], shape[3])
        (out.sum() + last.sum()).backward()
        for name in ("B", "C"):
            assert kw[name].grad.shape == kw[name].shape and not kw[name].grad.any(), name
