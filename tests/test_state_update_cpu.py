"""The compiled one-step selective scan (``selective_state_update`` with ``backend="cpu"``,
csrc/state_update_*.cpp) against the PyTorch reference run in float64 on the same inputs, for every ISA
variant this CPU runs: every option (D, z, dt_bias, softplus), fp32 / bf16 / fp16 inputs and states,
strided states and inputs (in place), the pool form (``state_batch_indices``, negative = padding), a run
of steps that must reproduce the full scan, and the public function's dispatch ("auto" picks it).

fp32 tolerances scale with the largest value (tests/_tolerance.py): one step is a sum of N products
plus D·x, within a few fp32 roundings of float64 (1e-5 allowed; a wrong term is O(1) and fails).
bf16 / fp16 inputs: the truth is the reference in float64 on the same (rounded) inputs, and the
output's own rounding to bf16 / fp16 bounds the error (2^-8 / 2^-11 relative).
"""
import itertools

import pytest
import torch

from _scan_inputs import ODD, make_scan_inputs
from _tolerance import assert_close
from m2rec_kernels import selective_scan, selective_state_update
from m2rec_kernels.scan import cpu as scan_cpu
from m2rec_kernels.scan.reference import selective_state_update_ref
from _cpu_library import ISAS, STATUS, needs_lib  # noqa: F401
from _cpu_library import isa_or_skip as _isa_or_skip

OPTIONS = list(itertools.product([False, True], repeat=4))  # D, z, dt_bias, softplus
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
OUT_TOL = {torch.float32: FP32_TOL, torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
           torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _step_inputs(batch, dim, N, opts=(True, True, True, True), dtype=torch.float32, seed=0):
    use_D, use_z, use_bias, softplus = opts
    kw = make_scan_inputs(batch, dim, 1, N, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus,
                          dtype=dtype, generator_seed=seed)
    args = (kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])
    extra = dict(D=kw["D"], z=None if kw["z"] is None else kw["z"][..., 0], dt_bias=kw["delta_bias"],
                 dt_softplus=softplus)
    return args, extra


def _truth(state, args, extra, indices=None):
    """(out, new state) of the float64 reference on a copy of ``state``."""
    s64 = state.double().clone()
    out = selective_state_update_ref(s64, *(t.double() for t in args),
                                     **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
                                     state_batch_indices=indices)
    return out, s64


def _run(state, args, extra, isa, indices=None):
    """The compiled op, through the registered op with an explicit variant."""
    from m2rec_kernels.scan.cpu import ISA_CODES

    return torch.ops.m2rec_scan_cpu.state_update(state, *args, extra["D"], extra["z"], extra["dt_bias"], indices,
                                                 extra["dt_softplus"], ISA_CODES[isa])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(n for n, on in zip(("D", "z", "bias", "sp"), o) if on)
                         or "bare")
def test_odd_shapes_every_option_against_float64(isa, opts):
    _isa_or_skip(isa)
    batch, dim, N = ODD["batch"], ODD["dim"], ODD["N"]
    args, extra = _step_inputs(batch, dim, N, opts)
    state = torch.randn(batch, dim, N, generator=torch.Generator().manual_seed(3))
    want_out, want_state = _truth(state, args, extra)
    out = _run(state, args, extra, isa)
    assert out.dtype == torch.float32 and out.shape == (batch, dim)
    assert_close(out.double(), want_out, **FP32_TOL)
    assert_close(state.double(), want_state, **FP32_TOL)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("N", [1, 4, 8, 16, 17, 32, 40])
def test_state_sizes_around_the_vector_width(isa, N):
    _isa_or_skip(isa)
    args, extra = _step_inputs(5, 19, N, seed=N)
    state = torch.randn(5, 19, N, generator=torch.Generator().manual_seed(N))
    want_out, want_state = _truth(state, args, extra)
    out = _run(state, args, extra, isa)
    assert_close(out.double(), want_out, **FP32_TOL)
    assert_close(state.double(), want_state, **FP32_TOL)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("in_dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_low_precision_inputs_and_states(isa, in_dtype, state_dtype):
    """The output is formed from the fp32 new state; a low-precision state is written back rounded from
    it (so it equals the fp32 state rounded, exactly)."""
    _isa_or_skip(isa)
    batch, dim, N = ODD["batch"], ODD["dim"], ODD["N"]
    args, extra = _step_inputs(batch, dim, N)
    args = tuple(t.to(in_dtype) if i != 2 else t for i, t in enumerate(args))  # A stays fp32
    extra = {k: v.to(in_dtype) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    state = torch.randn(batch, dim, N, generator=torch.Generator().manual_seed(4)).to(state_dtype)
    want_out, want_state = _truth(state, args, extra)
    wide = state.float().clone()
    out_wide = _run(wide, args, extra, isa)
    out = _run(state, args, extra, isa)
    assert out.dtype == in_dtype and state.dtype == state_dtype
    assert torch.equal(state, wide.to(state_dtype)), "a low-precision state is the fp32 update rounded once"
    assert torch.equal(out, out_wide)
    assert_close(out.double(), want_out, **OUT_TOL[in_dtype])
    assert_close(wide.double(), want_state, **FP32_TOL)


@pytest.mark.parametrize("isa", ISAS)
def test_strided_states_and_inputs_are_updated_in_place(isa):
    """A state with padded row / channel strides (a slice of a bigger buffer), one transposed (N not the
    unit-stride axis: worked on in a copy, written back), and x / z / B / C as slices of wider rows (what
    in_proj and x_proj's outputs give)."""
    _isa_or_skip(isa)
    batch, dim, N = ODD["batch"], ODD["dim"], ODD["N"]
    g = torch.Generator().manual_seed(5)
    args, extra = _step_inputs(batch, dim, N)
    x, dt, A, B, C = args
    xz = torch.randn(batch, 2 * dim, generator=g)
    xz[:, :dim], xz[:, dim:] = x, extra["z"]
    dbc = torch.randn(batch, 3 + 2 * N, generator=g)
    dbc[:, 3:3 + N], dbc[:, 3 + N:] = B, C
    sliced_args = (xz[:, :dim], dt, A, dbc[:, 3:3 + N], dbc[:, 3 + N:])
    sliced_extra = dict(extra, z=xz[:, dim:])
    for layout in ("padded", "transposed"):
        if layout == "padded":
            buf = torch.randn(batch + 1, dim + 2, N + 3, generator=g)
            state = buf[1:, 1:dim + 1, 2:N + 2]
        else:
            buf = torch.randn(batch, N, dim, generator=g)
            state = buf.transpose(1, 2)
        before = buf.clone()
        want_out, want_state = _truth(state, args, extra)
        out = _run(state, sliced_args, sliced_extra, isa)
        assert_close(out.double(), want_out, **FP32_TOL, msg=lambda m: f"{layout}: {m}")
        assert_close(state.double(), want_state, **FP32_TOL, msg=lambda m: f"{layout}: {m}")
        if layout == "padded":  # only the view's elements changed
            mask = torch.ones_like(buf, dtype=torch.bool)
            mask[1:, 1:dim + 1, 2:N + 2] = False
            assert torch.equal(buf[mask], before[mask])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("indices", [[4, 0, 5, 2], [3, -1, 1, -1], [-1, -1, -1, -1]],
                         ids=["permuted", "padding", "all-padding"])
def test_pool_form(isa, state_dtype, indices):
    _isa_or_skip(isa)
    batch, pool_size, dim, N = 4, 6, ODD["dim"], ODD["N"]
    args, extra = _step_inputs(batch, dim, N)
    idx = torch.tensor(indices, dtype=torch.int32)
    pool = torch.randn(pool_size, dim, N, generator=torch.Generator().manual_seed(6)).to(state_dtype)
    start = pool.clone()
    want_out, want_pool = _truth(pool, args, extra, idx.long())
    out = _run(pool, args, extra, isa, idx)
    assert_close(out.double(), want_out, **FP32_TOL)
    tol = FP32_TOL if state_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close(pool.double(), want_pool, **tol)
    untouched = [r for r in range(pool_size) if r not in indices]
    assert torch.equal(pool[untouched], start[untouched]), "rows no request names must stay as they were"
    padding = [b for b, r in enumerate(indices) if r < 0]
    assert torch.equal(out[padding], torch.zeros_like(out[padding])), "padding rows output 0"


@pytest.mark.parametrize("isa", ISAS)
def test_steps_reproduce_the_scan(isa):
    """L steps from a zero state give the scan's outputs at every step and its last state."""
    _isa_or_skip(isa)
    kw = make_scan_inputs(**ODD)
    want, last = selective_scan(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
                                return_last_state=True, backend="torch")
    batch, dim, L = kw["u"].shape
    state = torch.zeros(batch, dim, ODD["N"])
    steps = []
    for t in range(L):
        args = (kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t], kw["C"][..., t])
        extra = dict(D=kw["D"], z=kw["z"][..., t], dt_bias=kw["delta_bias"], dt_softplus=kw["delta_softplus"])
        steps.append(_run(state, args, extra, isa))
    assert_close(torch.stack(steps, -1).double(), want, **FP32_TOL)
    assert_close(state.double(), last, **FP32_TOL)


def test_auto_picks_the_compiled_step_on_cpu(monkeypatch):
    """"auto" and "cpu" run the compiled op (counted), "torch" the reference; fp64 stays on the reference
    and an explicit "cpu" refuses it."""
    if not STATUS.available:
        pytest.skip(STATUS.describe())
    args, extra = _step_inputs(2, 5, 3)
    calls = []
    real = torch.ops.m2rec_scan_cpu.state_update

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    monkeypatch.setattr(torch.ops.m2rec_scan_cpu, "state_update", Spy())
    for backend, expect in (("auto", 1), ("cpu", 1), ("torch", 0)):
        calls.clear()
        state = torch.zeros(2, 5, 3)
        selective_state_update(state, *args, **extra, backend=backend)
        assert len(calls) == expect, backend
    calls.clear()
    args64 = tuple(t.double() for t in args)
    extra64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    selective_state_update(torch.zeros(2, 5, 3, dtype=torch.float64), *args64, **extra64)
    assert not calls
    with pytest.raises(TypeError, match="backend='cpu' supports"):
        selective_state_update(torch.zeros(2, 5, 3, dtype=torch.float64), *args64, **extra64, backend="cpu")
