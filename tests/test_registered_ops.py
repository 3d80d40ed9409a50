"""The ops registered with torch.library (``m2rec_kernels/_library.py``): ``torch.library.opcheck`` on each op
and each backward op, per backend — schema, fake (meta) implementation against the real outputs (shapes,
strides, dtypes), the autograd registration and the AOT dispatch with dynamic shapes (what torch.compile
runs) — on CPU: the PyTorch references, the compiled CPU scan, and the Triton kernels under the
interpreter (tiny shapes: a program costs milliseconds there).

Each op's numbers against its reference are the other test files' business (the public functions call
these ops); here a wrong fake, a missing autograd formula or an output aliasing an input fails.
"""
import pytest
import torch
from torch.library import opcheck

from m2rec_kernels import _library, causal_conv1d, causal_filter, fft_filter, gated_fusion  # noqa: F401  (registers the ops)
from m2rec_kernels._backend import triton_interpreter_enabled
from m2rec_kernels.scan.cpu import cpu_scan_status

OPS = ("selective_scan", "selective_scan_backward", "selective_scan_final", "selective_scan_lowrank",
       "selective_state_update", "fft_filter", "fft_filter_backward", "causal_filter", "causal_filter_backward", "gated_fusion",
       "gated_fusion_backward", "causal_conv1d", "causal_conv1d_backward")


def _skip_unless_runs(backend):
    if backend in _library.TRITON_BACKENDS and not triton_interpreter_enabled():
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")
    if backend == "cpu" and not cpu_scan_status().available:
        pytest.skip(cpu_scan_status().describe())


def _check(op, args):
    result = opcheck(op, args, raise_exception=False)
    failures = {test: f"{outcome!r} {outcome.__cause__!r}" for test, outcome in result.items() if outcome != "SUCCESS"}
    assert not failures, failures


def test_every_op_is_registered_in_the_m2rec_namespace():
    for name in OPS:
        op = getattr(torch.ops.m2rec, name).default
        assert op._schema.name == f"m2rec::{name}"
    state_arg = torch.ops.m2rec.selective_state_update.default._schema.arguments[0]
    assert state_arg.name == "state" and state_arg.alias_info is not None and state_arg.alias_info.is_write
    for name in OPS:
        if name != "selective_state_update":
            assert not getattr(torch.ops.m2rec, name).default._schema.is_mutable, name


# ------------------------------------------------------------------------------------------ the scan
B_, D_, L_, N_ = 2, 5, 7, 3  # odd: no power of two, one sequence shorter than L


def _scan_inputs(requires_grad, full=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(requires_grad)

    A = (-(torch.rand(D_, N_, generator=g) + 0.5)).requires_grad_(requires_grad)
    tensors = [rnd(B_, D_, L_), rnd(B_, D_, L_, scale=0.5), A, rnd(B_, N_, L_), rnd(B_, N_, L_)]
    if full:
        tensors += [rnd(D_), rnd(B_, D_, L_), rnd(D_, scale=0.1), torch.tensor([L_, 4])]
    else:
        tensors += [None, None, None, None]
    return tensors


SCAN_BACKENDS = ["torch", "cpu", "triton", "triton_seq"]


@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias-lengths", "bare"])
@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_selective_scan_op(backend, full):
    _skip_unless_runs(backend)
    args = (*_scan_inputs(True, full), full, full, True, backend)  # softplus, last state, residual
    _check(torch.ops.m2rec.selective_scan.default, args)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_selective_scan_backward_op(backend):
    _skip_unless_runs(backend)
    inputs = _scan_inputs(False)
    _, _, residual = torch.ops.m2rec.selective_scan(*inputs, True, True, True, backend)
    g = torch.Generator().manual_seed(1)
    dout, dlast = torch.randn(B_, D_, L_, generator=g), torch.randn(B_, D_, N_, generator=g)
    _check(torch.ops.m2rec.selective_scan_backward.default, (*inputs, residual, dout, dlast, True, backend))
    _check(torch.ops.m2rec.selective_scan_backward.default, (*inputs, residual, dout, None, True, backend))


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_selective_scan_final_op(backend):
    _skip_unless_runs(backend)
    _check(torch.ops.m2rec.selective_scan_final.default, (*_scan_inputs(True), True, backend))


@pytest.mark.parametrize("forms", [("grouped", "grouped"), ("grouped", "time-invariant"),
                                   ("time-invariant", "grouped")], ids=lambda f: "-".join(f))
@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_selective_scan_ops_with_grouped_and_time_invariant_bc(backend, forms):
    """B and C in mamba_ssm's other forms (bc_forms.py: grouped (batch, G, N, L), time-invariant
    (dim, N)) through the forward, backward and final ops: the fakes give their gradients' shapes."""
    _skip_unless_runs(backend)
    if backend == "cpu" and "time-invariant" in forms:
        pytest.skip("the compiled CPU scan takes B/C per sequence or grouped (the public op runs the reference)")
    g = torch.Generator().manual_seed(2)
    inputs = _scan_inputs(True)
    shapes = {"grouped": (B_, 1, N_, L_), "time-invariant": (D_, N_)}  # D_ = 5 channels: one group
    inputs[3], inputs[4] = (torch.randn(shapes[f], generator=g).requires_grad_() for f in forms)
    _check(torch.ops.m2rec.selective_scan.default, (*inputs, True, True, True, backend))
    _check(torch.ops.m2rec.selective_scan_final.default, (*inputs, True, backend))
    plain = [t.detach() if t is not None else None for t in inputs]
    _, _, residual = torch.ops.m2rec.selective_scan(*plain, True, True, True, backend)
    dout, dlast = torch.randn(B_, D_, L_, generator=g), torch.randn(B_, D_, N_, generator=g)
    _check(torch.ops.m2rec.selective_scan_backward.default, (*plain, residual, dout, dlast, True, backend))


def test_selective_scan_final_op_gradients_match_the_scan():
    """The final op's own autograd formula (a rerun of the scan with its residual) against the
    gradients of the full scan gathered at the last steps."""
    inputs = _scan_inputs(True)
    lengths = inputs[8]
    out_last, last = torch.ops.m2rec.selective_scan_final(*inputs, True, "torch")
    (out_last.sum() + last.sum()).backward()
    got = [t.grad.clone() for t in inputs[:8]]
    for t in inputs[:8]:
        t.grad = None
    out, last2, _ = torch.ops.m2rec.selective_scan(*inputs, True, True, True, "torch")
    rows = torch.arange(B_)
    (out[rows, :, lengths - 1].sum() + last2.sum()).backward()
    for a, t in zip(got, inputs[:8]):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("indices", [None, [1, -1]], ids=["batch", "pool"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_selective_state_update_op(backend, indices):
    _skip_unless_runs(backend)
    g = torch.Generator().manual_seed(2)
    x, dt, z = (torch.randn(B_, D_, generator=g) for _ in range(3))
    A = -(torch.rand(D_, N_, generator=g) + 0.5)
    Bs, Cs = torch.randn(B_, N_, generator=g), torch.randn(B_, N_, generator=g)
    pool = 3 if indices else B_
    state = torch.randn(pool, D_, N_, generator=g)
    idx = None if indices is None else torch.tensor(indices)
    args = (state, x, dt, A, Bs, Cs, torch.randn(D_, generator=g), z, torch.randn(D_, generator=g), idx, True,
            backend)
    _check(torch.ops.m2rec.selective_state_update.default, args)


# --------------------------------------------------------------------------------------- the filters
@pytest.mark.parametrize("backend,weight_form", [("torch", "complex"), ("torch", "real-view"),
                                                 ("triton", "real-view")])
def test_fft_filter_ops(backend, weight_form):
    _skip_unless_runs(backend)
    g = torch.Generator().manual_seed(3)
    n_fft = 12
    x = torch.randn(2, 9, 3, generator=g, requires_grad=True)
    w = torch.randn(n_fft // 2 + 1, 3, 2, generator=g) * 0.3
    w = (torch.view_as_complex(w) if weight_form == "complex" else w).requires_grad_(True)
    _check(torch.ops.m2rec.fft_filter.default, (x, w, n_fft, backend))
    grad = torch.randn(2, 9, 3, generator=g)
    for need in ((True, True), (True, False), (False, True)):
        _check(torch.ops.m2rec.fft_filter_backward.default, (grad, x.detach(), w.detach(), n_fft, *need, backend))


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float16),
                                           ("triton", torch.float32)], ids=["torch-fp32", "torch-fp16", "triton-fp32"])
def test_causal_filter_ops(backend, dtype):
    _skip_unless_runs(backend)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 3, generator=g).to(dtype).requires_grad_(True)
    k = (torch.randn(6, 3, generator=g) * 0.3).requires_grad_(True)
    _check(torch.ops.m2rec.causal_filter.default, (x, k, backend))
    y, spec_x, spec_k = torch.ops.m2rec.causal_filter(x.detach(), k.detach(), backend)
    grad = torch.randn(2, 9, 3, generator=g).to(dtype)
    for need in ((True, True), (False, True)):
        _check(torch.ops.m2rec.causal_filter_backward.default,
               (grad, x.detach(), k.detach(), spec_x, spec_k, *need, backend))


# ------------------------------------------------------------------------------------ gated fusion
def _fusion_inputs(k, requires_grad):
    g = torch.Generator().manual_seed(5)
    d = 6
    t = [torch.randn(2, 5, d, generator=g) for _ in range(k + 1)]
    params = [torch.randn(k, k * d, generator=g) * 0.1, torch.randn(k, generator=g), 1 + 0.1 * torch.randn(d, generator=g),
              0.1 * torch.randn(d, generator=g)]
    for x in t + params:
        x.requires_grad_(requires_grad)
    return t[:k], t[k], params


@pytest.mark.parametrize("k,dropout", [(2, 0.0), (3, 0.3)], ids=["k2", "k3-dropout"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gated_fusion_ops(backend, k, dropout):
    _skip_unless_runs(backend)
    branches, residual, params = _fusion_inputs(k, True)
    seed = torch.tensor([123]) if dropout else None
    _check(torch.ops.m2rec.gated_fusion.default, (branches, residual, *params, 1e-5, dropout, seed, backend))
    detached = [b.detach() for b in branches], residual.detach(), [p.detach() for p in params]
    out, gates, mean, rstd = torch.ops.m2rec.gated_fusion(detached[0], detached[1], *detached[2], 1e-5, dropout,
                                                          seed, backend)
    dout = torch.randn_like(out)
    for dgates in (None, torch.randn_like(gates)):
        _check(torch.ops.m2rec.gated_fusion_backward.default,
               (dout, dgates, detached[0], detached[1], *detached[2], gates, mean, rstd, 1e-5, dropout, seed,
                backend))


def test_the_dropout_mask_is_a_function_of_the_seed():
    """The op is functional: the same seed gives the same output, another seed another mask."""
    branches, residual, params = _fusion_inputs(3, False)
    for backend in ("torch", "triton") if triton_interpreter_enabled() else ("torch",):
        a = torch.ops.m2rec.gated_fusion(branches, residual, *params, 1e-5, 0.5, torch.tensor([7]), backend)[0]
        b = torch.ops.m2rec.gated_fusion(branches, residual, *params, 1e-5, 0.5, torch.tensor([7]), backend)[0]
        c = torch.ops.m2rec.gated_fusion(branches, residual, *params, 1e-5, 0.5, torch.tensor([8]), backend)[0]
        assert torch.equal(a, b) and not torch.equal(a, c), backend


# ------------------------------------------------------------------------------------- causal conv1d
@pytest.mark.parametrize("time_major", [True, False], ids=["time-major", "rows"])
@pytest.mark.parametrize("bias,silu", [(True, True), (False, False)], ids=["bias-silu", "bare"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_causal_conv1d_ops(backend, bias, silu, time_major):
    """The conv op and its backward; the compiled kernel's outputs follow x's layout, and so must the fake's."""
    _skip_unless_runs(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 5, generator=g)  # (batch, L, dim) -> (batch, dim, L)
    x = x.transpose(1, 2) if time_major else x.transpose(1, 2).contiguous()
    w, b = torch.randn(5, 4, generator=g), (torch.randn(5, generator=g) if bias else None)
    args = [t.requires_grad_() if t is not None else None for t in (x, w, b)]
    _check(torch.ops.m2rec.causal_conv1d.default, (*args, silu, backend))
    dy = torch.randn(2, 5, 7, generator=g)
    _check(torch.ops.m2rec.causal_conv1d_backward.default, (dy, x.detach(), w.detach(),
                                                             None if b is None else b.detach(), silu, backend))


# ------------------------------------------------------------------------------- how tracers see them
def test_cpu_ops_stay_opaque_in_a_traced_graph():
    """Under AOT dispatch (what torch.compile runs) an op on CPU stays one node, whatever its backend:
    only CUDA Triton calls are decomposed into their kernel launches."""
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    inputs = _scan_inputs(True)

    def f(*ts):
        out, last, _ = torch.ops.m2rec.selective_scan(*ts, True, True, True, "torch")
        return out.sum() + last.sum()

    aot_function(f, fw_compiler=keep, bw_compiler=keep)(*inputs).backward()
    forward_ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    backward_ops = {str(n.target) for n in graphs[1].graph.nodes if n.op == "call_function"}
    assert "m2rec.selective_scan.default" in forward_ops
    assert "m2rec.selective_scan_backward.default" in backward_ops


def test_autograd_inside_kernel_records_only_inside():
    """The helper the PyTorch backward ops use: autograd on inside an op's kernel, and the dispatcher's
    state as it was afterwards."""
    before = torch._C._dispatch_tls_local_exclude_set()
    x = torch.randn(3)
    with torch._C._AutoDispatchBelowAutograd():
        inner = torch._C._dispatch_tls_local_exclude_set()
        (g,) = _library.reference_vjp(lambda a: (a * a).sum(), [x], [True], [torch.tensor(1.0)])
        assert torch._C._dispatch_tls_local_exclude_set() == inner
    assert torch._C._dispatch_tls_local_exclude_set() == before
    torch.testing.assert_close(g, 2 * x)
