"""The scan with a low-rank delta (``m2rec_kernels.scan.selective_scan_lowrank``, op
``m2rec::selective_scan_lowrank``): delta = dt_weight @ dt_low, formed per step in registers by the
compiled CPU scan (csrc/scan_api.h ``delta_weight``), or formed first on the other backends and with
gradients. The truth is the PyTorch reference in float64 on delta formed explicitly from the same
inputs; fp32 tolerances scale with the compared values (tests/_tolerance.py).

Also: the op's registration (opcheck: schema, fake, autograd), its gradients against the formed-delta
scan's, errors that name the argument, and MambaMixer / M2Rec using it (last-position outputs equal to
the full forward's).
"""
import itertools

import pytest
import torch
from torch.library import opcheck

from _tolerance import assert_close
from m2rec_kernels.scan import selective_scan, selective_scan_final, selective_scan_lowrank
from m2rec_kernels.scan import cpu as scan_cpu
from m2rec_kernels.scan.ops import form_delta
from m2rec_kernels.scan.reference import selective_scan_final_ref, selective_scan_ref
from _cpu_library import ISAS, STATUS, needs_lib  # noqa: F401
from _cpu_library import isa_or_skip as _isa_or_skip

BATCH, DIM, L, N, R = 3, 48, 37, 7, 3  # the project's odd shapes, rank 3
OPTIONS = list(itertools.product([False, True], repeat=4))  # D, z, delta_bias, softplus


def _inputs(time_major=True, dtype=torch.float32, seed=0, dim=DIM, L_=L):
    """Inputs as MambaMixer lays them out on CPU (time-major: dt_low, B, C are (batch, ·, L) transposes
    of one (batch, L, R + 2N) x_proj output) or in rows (batch, ·, L) contiguous."""
    g = torch.Generator().manual_seed(seed)
    if time_major:
        u = torch.randn(BATCH, L_, dim, generator=g).transpose(1, 2)
        x_dbl = torch.randn(BATCH, L_, R + 2 * N, generator=g)
        dt_low, B, C = (t.transpose(1, 2) for t in torch.split(x_dbl, [R, N, N], dim=-1))
        z = torch.randn(BATCH, L_, dim, generator=g).transpose(1, 2)
    else:
        u = torch.randn(BATCH, dim, L_, generator=g)
        dt_low = torch.randn(BATCH, R, L_, generator=g)
        B, C = torch.randn(BATCH, N, L_, generator=g), torch.randn(BATCH, N, L_, generator=g)
        z = torch.randn(BATCH, dim, L_, generator=g)
    return dict(u=u.to(dtype), dt_low=dt_low.to(dtype), dt_weight=(torch.randn(dim, R, generator=g) * 0.5).to(dtype),
                A=-(torch.rand(dim, N, generator=g) + 0.5), B=B.to(dtype), C=C.to(dtype),
                D=torch.randn(dim, generator=g), z=z.to(dtype), delta_bias=torch.randn(dim, generator=g) * 0.5)


def _fused_args(kw, options):
    use_D, use_z, use_bias, softplus = options
    dt_low, w = kw["dt_low"], kw["dt_weight"]
    if not softplus:  # positive steps without softplus: |.| of both factors and of the bias
        dt_low, w = dt_low.abs(), w.abs()
    bias = kw["delta_bias"] if use_bias else None
    if bias is not None and not softplus:
        bias = bias.abs()
    return (kw["u"], dt_low, w, kw["A"], kw["B"], kw["C"], kw["D"] if use_D else None, kw["z"] if use_z else None,
            bias, softplus)


def _truth_for(kw, options, lengths, final):
    """The truth with the same factors _fused_args passes (|.| of both factors without softplus)."""
    kw = dict(kw)
    if not options[3]:
        kw["dt_low"], kw["dt_weight"] = kw["dt_low"].abs(), kw["dt_weight"].abs()
        kw["delta_bias"] = kw["delta_bias"].abs()
    use_D, use_z, use_bias, softplus = options
    d = {k: v.double() for k, v in kw.items()}
    delta = torch.einsum("dr,brl->bdl", d["dt_weight"], d["dt_low"])
    args = (d["u"], delta, d["A"], d["B"], d["C"], d["D"] if use_D else None, d["z"] if use_z else None,
            d["delta_bias"] if use_bias else None)
    if final:
        return selective_scan_final_ref(*args, softplus, lengths)
    return selective_scan_ref(*args, softplus, True, lengths)


def _close(got, want, name, atol=1e-5, rtol=1e-4):
    assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------ the compiled kernel

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("final", [False, True], ids=["all-steps", "final"])
@pytest.mark.parametrize("lengths", [None, torch.tensor([L, 20, 1])], ids=["full", "lengths"])
@pytest.mark.parametrize("time_major", [True, False], ids=["time-major", "rows"])
def test_kernel_matches_formed_delta_fp32(isa, final, lengths, time_major):
    """Every option (D, z, delta_bias, softplus) on every ISA variant, both layouts of dt_low."""
    isa = _isa_or_skip(isa)
    kw = _inputs(time_major)
    for options in OPTIONS:
        u, dt_low, w, A, B, C, D, z, bias, softplus = _fused_args(kw, options)
        mode = 2 if final else 0
        out, last, _ = torch.ops.m2rec_scan_cpu.forward(u, dt_low, A, B, C, D, z, bias, lengths, softplus, mode,
                                                        True, scan_cpu.ISA_CODES[isa], w)
        want_out, want_last = _truth_for(kw, options, lengths, final)
        _close(out, want_out, f"out {options}")
        _close(last, want_last, f"last state {options}")
        if time_major and not final:
            assert out.transpose(1, 2).is_contiguous()  # the output follows u's layout


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("final", [False, True], ids=["all-steps", "final"])
def test_kernel_matches_formed_delta_bf16(isa, final):
    """bf16 inputs, fp32 state: against float64 math on the same rounded inputs. The fused kernel forms
    delta in fp32 where the formed path would round it to bf16, so the bound is the bf16 one: 2u
    relative plus 1e-5 of the magnitude, with u = 2^-8 (as tests/test_scan_cpu.py's fp16/bf16 test)."""
    isa = _isa_or_skip(isa)
    kw = _inputs(True, dtype=torch.bfloat16)
    lengths = torch.tensor([L, 20, 1])
    options = (True, True, True, True)
    u, dt_low, w, A, B, C, D, z, bias, softplus = _fused_args(kw, options)
    out, last, _ = torch.ops.m2rec_scan_cpu.forward(u, dt_low, A, B, C, D, z, bias, lengths, softplus,
                                                    2 if final else 0, True, scan_cpu.ISA_CODES[isa], w)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    want_out, want_last = _truth_for(kw, options, lengths, final)
    two_u = 2 * 2.0 ** -8
    _close(out, want_out, "out", atol=two_u, rtol=two_u)
    _close(last, want_last, "last state", atol=1e-5, rtol=1e-4)


def test_kernel_rejects_a_mismatched_low_rank_input():
    _isa_or_skip(STATUS.isa if STATUS.available else "generic")
    kw = _inputs()
    u, dt_low, w, A, B, C = (kw[k] for k in ("u", "dt_low", "dt_weight", "A", "B", "C"))
    isa = scan_cpu.ISA_CODES[STATUS.isa]
    with pytest.raises(RuntimeError, match="delta_weight must be"):
        torch.ops.m2rec_scan_cpu.forward(u, dt_low, A, B, C, None, None, None, None, True, 0, False, isa, w[:-1])
    with pytest.raises(RuntimeError, match="delta must be dt_low"):
        torch.ops.m2rec_scan_cpu.forward(u, dt_low[:, :-1], A, B, C, None, None, None, None, True, 0, False, isa, w)


# ---------------------------------------------------------------------------- the public-side entry

@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("final", [False, True], ids=["all-steps", "final"])
def test_entry_matches_the_scan_on_formed_delta(backend, final):
    """selective_scan_lowrank == selective_scan(_final) on delta = dt_weight @ dt_low, per backend."""
    if backend == "cpu":
        _isa_or_skip(STATUS.isa if STATUS.available else "generic")
    kw = _inputs()
    lengths = torch.tensor([L, 20, 1])
    u, dt_low, w, A, B, C, D, z, bias = (kw[k] for k in ("u", "dt_low", "dt_weight", "A", "B", "C", "D", "z",
                                                          "delta_bias"))
    z_ = None if final else z
    with torch.no_grad():
        got = selective_scan_lowrank(u, dt_low, w, A, B, C, D, z_, bias, True, True, lengths, final, backend)
        delta = form_delta(dt_low, w)
        if final:
            want = selective_scan_final(u, delta, A, B, C, D, z_, bias, True, lengths, backend)
        else:
            want = selective_scan(u, delta, A, B, C, D, z_, bias, True, True, lengths, backend)
    for g, w_, name in zip(got, want, ("out", "last state")):
        _close(g, w_, name)


@pytest.mark.parametrize("final", [False, True], ids=["all-steps", "final"])
def test_entry_gradients_equal_the_formed_delta_path(final):
    """With gradients the entry forms delta and runs the differentiable scan: same gradients for
    dt_low and dt_weight (and the rest) as forming delta by hand."""
    kw = _inputs()
    lengths = torch.tensor([L, 20, 1])
    names = ("u", "dt_low", "dt_weight", "A", "B", "C", "D", "z", "delta_bias")

    def run(fused):
        leaves = {k: kw[k].detach().clone().requires_grad_(True) for k in names}
        a = [leaves[k] for k in names]
        z = None if final else a[7]
        if fused:
            res = selective_scan_lowrank(a[0], a[1], a[2], *a[3:7], z, a[8], True, True, lengths, final, "auto")
        else:
            delta = torch.einsum("dr,brl->bdl", a[2], a[1])
            fn = selective_scan_final if final else selective_scan
            extra = (True, lengths) if final else (True, True, lengths)
            res = fn(a[0], delta, *a[3:7], z, a[8], *extra, backend="auto")
        (res[0].square().sum() + res[1].sum()).backward()
        return {k: leaves[k].grad for k in names if leaves[k].grad is not None}

    got, want = run(True), run(False)
    assert got.keys() == want.keys()
    for k in want:
        _close(got[k], want[k], f"d{k}")


def _op_args(final, requires_grad=False):
    kw = _inputs(seed=1, dim=5, L_=7)
    t = [kw[k].detach().clone().requires_grad_(requires_grad) for k in
         ("u", "dt_low", "dt_weight", "A", "B", "C", "D", "z", "delta_bias")]
    return (*t, torch.tensor([7, 4, 1]), True, True, final)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("final", [False, True], ids=["all-steps", "final"])
def test_op_registration(backend, final):
    """opcheck: schema, fake against the real outputs, autograd registration, AOT dispatch."""
    if backend == "cpu":
        _isa_or_skip(STATUS.isa if STATUS.available else "generic")
    for requires_grad in (False, True):
        result = opcheck(torch.ops.m2rec.selective_scan_lowrank.default,
                         (*_op_args(final, requires_grad), backend), raise_exception=False)
        failures = {k: repr(v) for k, v in result.items() if v != "SUCCESS"}
        assert not failures, failures


@pytest.mark.parametrize("final", [False, True], ids=["all-steps", "final"])
def test_op_backward_matches_formed_delta(final):
    """The op's own autograd formula (not the serving path): gradients of dt_low and dt_weight."""
    args = _op_args(final, requires_grad=True)
    backend = "cpu" if STATUS.available else "torch"
    out, last = torch.ops.m2rec.selective_scan_lowrank(*args, backend)
    g = torch.Generator().manual_seed(3)
    go, gl = torch.randn(out.shape, generator=g), torch.randn(last.shape, generator=g)
    got = torch.autograd.grad((out, last), args[:9], (go, gl))
    leaves = [a.detach().double().requires_grad_(True) for a in args[:9]]
    delta = torch.einsum("dr,brl->bdl", leaves[2], leaves[1])
    ins = (leaves[0], delta, *leaves[3:])
    if final:
        w_out, w_last = selective_scan_final_ref(*ins, True, args[9])
    else:
        w_out, w_last = selective_scan_ref(*ins, True, True, args[9])
    want = torch.autograd.grad((w_out, w_last), leaves, (go.double(), gl.double()))
    for name, a, b in zip(("u", "dt_low", "dt_weight", "A", "B", "C", "D", "z", "delta_bias"), got, want):
        _close(a, b, f"d{name}")


def test_entry_errors_name_the_argument():
    kw = _inputs()
    u, dt_low, w, A, B, C = (kw[k] for k in ("u", "dt_low", "dt_weight", "A", "B", "C"))
    with pytest.raises(ValueError, match="dt_weight must have shape"):
        selective_scan_lowrank(u, dt_low, w[:-1], A, B, C)
    with pytest.raises(ValueError, match="dt_low"):
        selective_scan_lowrank(u, dt_low[:, :, :-1], w, A, B, C)
    with pytest.raises(ValueError, match="lengths"):
        with torch.no_grad():
            selective_scan_lowrank(u, dt_low, w, A, B, C, lengths=torch.tensor([L, 0, 3]), final=True)


# ------------------------------------------------------------------------------------------- models

def test_mixer_forward_last_and_prefill_match_the_full_forward():
    """MambaMixer on CPU (time-major: the fused scan without gradients) against its own forward with
    gradients on (which forms delta): the last positions and the states."""
    from m2rec.layers.mamba_mixer import MambaMixer

    torch.manual_seed(0)
    mixer = MambaMixer(d_model=24, d_state=7, dt_rank=3, expand=2)
    h = torch.randn(BATCH, L, 24)
    lengths = torch.tensor([L, 20, 1])
    full = mixer(h)  # parameters require grad: the formed-delta path
    with torch.no_grad():
        last = mixer.forward_last(h, lengths)
        out, conv_state, ssm_state = mixer.prefill(h, lengths)
        out_ref = mixer(h)
    rows = torch.arange(BATCH)
    _close(last, full.detach()[rows, lengths - 1], "forward_last")
    _close(out_ref, full.detach(), "forward without grad")
    with torch.enable_grad():
        out_g, conv_g, ssm_g = mixer.prefill(h, lengths)
    _close(ssm_state, ssm_g.detach(), "prefill ssm_state")
    _close(out[rows, lengths - 1], out_g.detach()[rows, lengths - 1], "prefill out")


def test_m2rec_scores_equal_the_full_forward_and_embedding_table_norm():
    """M2Rec.scores (last-position path, fused dt scan, embedding normalised per catalogue row) equals
    the full forward's scores at the last positions (tests/test_last_position.py pattern), with a
    catalogue smaller than batch x L so that the per-row embedding norm runs."""
    from m2rec.models import build_model

    torch.manual_seed(0)
    n_items = 20
    model = build_model("m2rec", n_items, d_model=24, n_layers=2, max_len=L, d_state=7)
    model.eval()
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, n_items + 1, (BATCH, L), generator=g)
    lengths = torch.tensor([L, 20, 1])
    seq[1, 20:] = 0
    seq[2, 1:] = 0
    with torch.no_grad():
        got = model.scores(seq, lengths)
        assert torch.equal(model._embed(seq), model.embedding_norm(model.item_embedding(seq)))
    hidden = model.encode(seq, lengths)  # with gradients: per-position norm, formed delta
    want = model._catalogue_scores(model.gather_last(hidden, lengths)).detach()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    _close(got[finite], want[finite], "scores")
