"""The registered ops on CUDA (``gpu``-marked: skipped without a GPU; gpu-check runs them with the other
``*_triton`` tests). On CUDA a Triton call is a ``triton_op`` that ``torch.compile`` decomposes into its
kernel launches (``wrap_triton``); these tests are the only ones that exercise that path — on CPU the ops
stay opaque (tests/test_registered_ops.py, tests/test_compile_export.py).

* ``opcheck`` of every Triton op and backward op on CUDA tensors (schema, fake against real outputs,
  autograd registration, AOT dispatch with dynamic shapes — the decomposition included);
* ``torch.compile(M2Rec(backend="triton"), fullgraph=True)`` forward and backward against eager, once with
  the kernels decomposed into the graph and once with the ops kept opaque (``M2REC_TRITON_DECOMPOSE=0``);
* ``torch.export`` of ``scores`` on CUDA.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import m2rec_kernels  # noqa: F401  (registers the ops)
from _tolerance import assert_close

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


def _check(op, args):
    result = opcheck(op, args, raise_exception=False)
    failures = {test: f"{outcome!r} {outcome.__cause__!r}" for test, outcome in result.items() if outcome != "SUCCESS"}
    assert not failures, failures


def _scan_inputs(requires_grad):
    g = torch.Generator().manual_seed(0)
    b, d, L, N = 3, 48, 37, 7

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEV).requires_grad_(requires_grad)

    A = (-(torch.rand(d, N, generator=g) + 0.5)).to(DEV).requires_grad_(requires_grad)
    return [rnd(b, d, L), rnd(b, d, L, scale=0.5), A, rnd(b, N, L), rnd(b, N, L), rnd(d), rnd(b, d, L),
            rnd(d, scale=0.1), torch.tensor([L, 20, 1], device=DEV)]


@pytest.mark.parametrize("backend", ["triton", "triton_seq"])
def test_scan_ops_on_cuda(backend):
    inputs = _scan_inputs(True)
    _check(torch.ops.m2rec.selective_scan.default, (*inputs, True, True, True, backend))
    _check(torch.ops.m2rec.selective_scan_final.default, (*inputs, True, backend))
    detached = [t.detach() for t in inputs]
    _, _, residual = torch.ops.m2rec.selective_scan(*detached, True, True, True, backend)
    dout = torch.randn_like(detached[0])
    dlast = torch.randn(3, 48, 7, device=DEV)
    _check(torch.ops.m2rec.selective_scan_backward.default, (*detached, residual, dout, dlast, True, backend))


def test_state_update_op_on_cuda():
    g = torch.Generator().manual_seed(1)
    x, dt, z = (torch.randn(4, 48, generator=g).to(DEV) for _ in range(3))
    A = (-(torch.rand(48, 7, generator=g) + 0.5)).to(DEV)
    B, C = torch.randn(4, 7, generator=g).to(DEV), torch.randn(4, 7, generator=g).to(DEV)
    state = torch.randn(6, 48, 7, generator=g).to(DEV)
    for idx in (None, torch.tensor([5, -1, 0, 2], device=DEV)):
        pool = state[:4].clone() if idx is None else state.clone()
        _check(torch.ops.m2rec.selective_state_update.default,
               (pool, x, dt, A, B, C, torch.randn(48, device=DEV), z, torch.randn(48, device=DEV), idx, True, "triton"))


def test_filter_and_fusion_ops_on_cuda():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 37, 48, generator=g).to(DEV).requires_grad_(True)
    k = (torch.randn(37, 48, generator=g) * 0.1).to(DEV).requires_grad_(True)
    w = (torch.randn(37 // 2 + 1, 48, 2, generator=g) * 0.1).to(DEV).requires_grad_(True)
    _check(torch.ops.m2rec.causal_filter.default, (x, k, "triton"))
    _check(torch.ops.m2rec.fft_filter.default, (x, w, 37, "triton"))
    branches = [torch.randn(3, 37, 48, generator=g).to(DEV).requires_grad_(True) for _ in range(3)]
    params = [(torch.randn(3, 144, generator=g) * 0.05).to(DEV), torch.zeros(3, device=DEV),
              torch.ones(48, device=DEV), torch.zeros(48, device=DEV)]
    params = [p.requires_grad_(True) for p in params]
    for p, seed in ((0.0, None), (0.3, torch.tensor([9], device=DEV))):
        _check(torch.ops.m2rec.gated_fusion.default, (branches, x, *params, 1e-12, p, seed, "triton"))


def _model():
    from m2rec.models import M2Rec

    torch.manual_seed(0)
    return M2Rec(n_items=300, d_model=32, max_len=40, d_state=8, dropout=0.0, backend="triton",
                 text_embeddings=torch.randn(301, 16)).to(DEV)


def _batch():
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, 301, (4, 40), generator=g)
    lengths = torch.tensor([40, 33, 7, 1])
    items[torch.arange(40)[None, :] >= lengths[:, None]] = 0
    return items.to(DEV), lengths.to(DEV)


@pytest.mark.parametrize("decompose", ["1", "0"], ids=["kernels-in-graph", "opaque-ops"])
def test_compiled_m2rec_on_cuda_agrees_with_eager(monkeypatch, decompose):
    monkeypatch.setenv("M2REC_TRITON_DECOMPOSE", decompose)
    torch._dynamo.reset()
    model, eager = _model(), _model()
    items, lengths = _batch()
    got = torch.compile(model, fullgraph=True)(items, lengths)
    want = eager(items, lengths)
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    target = torch.randn_like(want)
    F.mse_loss(got, target).backward()
    F.mse_loss(want, target).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_exported_scores_on_cuda():
    model = _model().eval()
    items, lengths = _batch()

    class Scorer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, s, n):
            return self.m.scores(s, n)

    with torch.no_grad():
        program = torch.export.export(Scorer(model), (items, lengths))
        got = program.module()(items, lengths)
        want = model.scores(items, lengths)
    assert_close(got[:, 1:], want[:, 1:], rtol=1e-5, atol=1e-5)
