"""torch.compile and torch.export of the models, on CPU.

* ``torch.compile(M2Rec(...), fullgraph=True)`` (Inductor) runs forward and backward without a graph
  break — every op is a registered ``m2rec::*`` node — and agrees with eager, outputs and every parameter
  gradient. It is the file's one Inductor compilation (~50 s on a busy 2-core machine from a cold cache,
  ~10 s warm), shared by the tests through a module fixture.
* The input checks survive compilation: traced, they are assertions in the graph
  (``m2rec_kernels/_checks.py::require``), so a bad batch still raises, with the eager message.
* ``torch.export.export`` of the inference path (a module whose forward is ``scores``) gives the same
  scores as eager, holds the registered ops as nodes, and keeps the checks.
"""
import time

import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_close
from m2rec.models import M2Rec
from m2rec_kernels import gated_fusion

N_ITEMS = 50


def _model(dropout=0.0):
    torch.manual_seed(0)
    return M2Rec(n_items=N_ITEMS, d_model=16, max_len=12, d_state=4, dropout=dropout,
                 text_embeddings=torch.randn(N_ITEMS + 1, 8))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (3, 10), generator=g)
    lengths = torch.tensor([10, 6, 3])
    items[1, 6:] = 0
    items[2, 3:] = 0
    targets = torch.randint(1, N_ITEMS + 1, (3, 10), generator=g)
    targets[items == 0] = 0
    return items, lengths, targets


def _loss(hidden, model, targets):
    logits = model.item_logits(hidden)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, N_ITEMS), targets.reshape(-1) - 1, ignore_index=-1)


def _inductor_options() -> dict:
    """Scalar C++ where Inductor found no vector ISA (``ATEN_CPU_CAPABILITY=default``): torch 2.13's
    Inductor still emits vectorised reductions (``at::vec``) there, which then fail to compile."""
    from torch._inductor import cpu_vec_isa

    return {} if cpu_vec_isa.pick_vec_isa() else {"cpp.simdlen": 1}


@pytest.fixture(scope="module")
def compiled_model():
    with torch._inductor.config.patch(_inductor_options()):
        model = _model()
        compiled = torch.compile(model, fullgraph=True)
        items, lengths, targets = _batch()
        t0 = time.perf_counter()
        hidden = compiled(items, lengths)
        _loss(hidden, model, targets).backward()
        print(f"\ntorch.compile of M2Rec (forward + backward, Inductor): {time.perf_counter() - t0:.1f} s")
        model.zero_grad()
        yield model, compiled


def test_compiled_m2rec_forward_and_backward_agree_with_eager(compiled_model):
    model, compiled = compiled_model
    eager = _model()
    for seed in (0, 1):  # the second batch runs the compiled code without compiling again
        items, lengths, targets = _batch(seed)
        model.zero_grad()
        eager.zero_grad()
        got = compiled(items, lengths)
        want = eager(items, lengths)
        assert_close(got, want, rtol=1e-5, atol=1e-5)
        _loss(got, model, targets).backward()
        _loss(want, eager, targets).backward()
        grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
        assert len(grads) > 20
        for name, p in model.named_parameters():
            if name in grads:
                assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)


BAD_INPUTS = {
    "id past the catalogue": (lambda items, lengths: (items.index_fill(1, torch.tensor([0]), N_ITEMS + 1), lengths),
                              "item_seq holds ids"),
    "negative id": (lambda items, lengths: (items.index_fill(1, torch.tensor([0]), -3), lengths), "item_seq holds ids"),
    "length past L": (lambda items, lengths: (items, torch.tensor([11, 6, 3])), r"lengths must lie in \[1, L=10\]"),
    "left padded": (lambda items, lengths: (items.flip(1), lengths), "must be right-padded"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_still_raise_under_compile(compiled_model, case):
    model, compiled = compiled_model
    make, match = BAD_INPUTS[case]
    items, lengths, _ = _batch()
    bad_items, bad_lengths = make(items, lengths)
    with pytest.raises(ValueError, match=match):  # eager: the message with the values found
        model(bad_items, bad_lengths)
    with pytest.raises(RuntimeError, match=match):  # compiled: the same check, an assertion in the graph
        compiled(bad_items, bad_lengths)


class Scorer(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, item_seq, lengths):
        return self.model.scores(item_seq, lengths)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_scores_trace_whole_for_serving(mode):
    """``scores`` as served (no autograd, a batch of several users: the shape at which eager takes
    the packed catalogue product) traces as one graph, and the graph gives eager's scores. Dynamo
    alone (backend "eager"): a graph break is what this looks for, and it needs no Inductor build."""
    model = _model().eval()
    items, lengths, _ = _batch()
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    compiled = torch.compile(Scorer(model), fullgraph=True, backend="eager")
    with context():
        assert_close(compiled(items, lengths), model.scores(items, lengths), rtol=1e-5, atol=1e-6)


def test_exported_scores_equal_eager_and_keep_the_checks():
    model = _model(dropout=0.2).eval()
    items, lengths, _ = _batch()
    with torch.no_grad():  # the inference program: the scan's final form, no residuals
        program = torch.export.export(Scorer(model), (items, lengths))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    # on CPU the scan's final form is the low-rank one (delta formed inside the compiled scan)
    assert {"m2rec.selective_scan_lowrank.default", "m2rec.gated_fusion.default"} <= targets, targets
    finals = [n.args[12] for n in program.graph.nodes if str(n.target) == "m2rec.selective_scan_lowrank.default"]
    assert finals and all(finals), finals
    served = program.module()
    for seed in (0, 3):
        items, lengths, _ = _batch(seed)
        with torch.no_grad():
            want = model.scores(items, lengths)
            got = served(items, lengths)
        assert torch.equal(got[:, 0], want[:, 0])  # the padding column: -inf
        assert_close(got[:, 1:], want[:, 1:], rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="item_seq holds ids"):
        served(items.index_fill(1, torch.tensor([0]), N_ITEMS + 1), lengths)


def test_gated_fusion_dropout_traces_its_seed():
    """With dropout the seed is drawn as a tensor inside the graph (no .item(), no graph break); the
    mask then follows torch's RNG as in eager."""
    g = torch.Generator().manual_seed(0)
    branches = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(3)]
    residual = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    params = [torch.randn(3, 24, generator=g) * 0.1, torch.zeros(3), torch.ones(8), torch.zeros(8)]

    def fused(*bs):
        return gated_fusion(list(bs), residual, *params, dropout_p=0.5, training=True)

    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    first = compiled(*branches)
    first.sum().backward()
    torch.manual_seed(5)
    again = compiled(*branches)
    assert torch.equal(first, again)
    plain = gated_fusion(branches, residual, *params, dropout_p=0.5, training=False)
    assert not torch.allclose(first, plain)
    assert branches[0].grad is not None and residual.grad is not None
