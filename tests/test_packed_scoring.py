"""The catalogue product on an item table pre-packed for oneDNN (``m2rec.models.packed_scoring``): the same
product as ``torch.matmul`` within fp32 rounding, repacked when the table changes, ``torch.matmul`` where it
cannot or should not run, and ``scores()`` under autograd still differentiable."""
import warnings

import pytest
import torch

import m2rec.models.packed_scoring as packed_scoring
from m2rec.models import M2Rec, SASRec

REASON = packed_scoring.packed_product_unavailable()
needs_packed = pytest.mark.skipif(REASON is not None, reason=f"packed product unavailable: {REASON}")


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the packed products run (the tests say which path they took)."""
    calls = []
    real = packed_scoring._packed_product

    def spy(hidden, packed):
        calls.append(tuple(hidden.shape))
        return real(hidden, packed)

    monkeypatch.setattr(packed_scoring, "_packed_product", spy)
    return calls


def assert_fp32_product(got, hidden, table):
    """|got - h·E^T| <= 2 K u |h|·|E|^T elementwise against the fp64 product: the bound of any fp32 summation
    order of K terms (u = 2^-24), so it holds on every CPU and ISA."""
    h64, e64 = hidden.double(), table.double()
    want = h64 @ e64.t()
    bound = 2 * hidden.shape[1] * 2.0 ** -24 * (h64.abs() @ e64.abs().t()) + 1e-30
    err = (got.double() - want).abs()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert bool((err <= bound).all()), f"max error / bound {float((err / bound).max()):.2f}"


def model(n_items=52, d=48, **kw):
    torch.manual_seed(0)
    return M2Rec(n_items, d_model=d, max_len=9, d_state=5, dropout=0.0, **kw).eval()


def histories(n_items, batch, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, n_items + 1, (batch, L), generator=g)
    lengths = torch.randint(1, L + 1, (batch,), generator=g)
    seq[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return seq, lengths


@needs_packed
@pytest.mark.parametrize("batch", [2, 3, 64, 200])
@pytest.mark.parametrize("rows,d", [(53, 48), (3707, 64)])
def test_packed_product_equals_matmul(packed_calls, batch, rows, d):
    g = torch.Generator().manual_seed(batch)
    owner = torch.nn.Module()
    table, hidden = torch.randn(rows, d, generator=g), torch.randn(batch, d, generator=g) * 3
    got = packed_scoring.catalogue_product(owner, hidden, table)
    assert packed_calls == [(batch, d)]
    assert_fp32_product(got, hidden, table)
    assert_fp32_product(torch.matmul(hidden, table.t()), hidden, table)  # the bound is one matmul meets too


@needs_packed
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_scores_and_step_on_the_packed_table(packed_calls, batch):
    m = model()
    seq, lengths = histories(m.n_items, batch)
    with torch.no_grad():
        got = m.scores(seq, lengths)
        hidden = m.encode_last(seq, lengths)
    assert packed_calls == ([] if batch == 1 else [(batch, m.d_model)])  # one row: matmul (faster there)
    assert torch.isneginf(got[:, 0]).all()
    assert_fp32_product(got[:, 1:], hidden, m.item_embedding.weight[1:].detach())
    with torch.inference_mode():
        _, state = m.prefill(seq, lengths)
        step_scores, _ = m.step(state, seq[:, 0])
    assert torch.isneginf(step_scores[:, 0]).all()
    assert_fp32_product(step_scores[:, 1:], state.hidden, m.item_embedding.weight[1:].detach())


@needs_packed
def test_repacked_after_an_in_place_change_and_load_state_dict(packed_calls):
    m = model()
    seq, lengths = histories(m.n_items, 5)
    table = m.item_embedding.weight
    with torch.no_grad():
        first = m.scores(seq, lengths)
        table.mul_(-2.0)  # what an optimiser step does: in place, version counter bumped
        hidden = m.encode_last(seq, lengths)
        after_change = m.scores(seq, lengths)
    assert_fp32_product(after_change[:, 1:], hidden, table[1:].detach())
    assert not torch.allclose(after_change[:, 1:], first[:, 1:])
    other = model()
    with torch.no_grad():
        other.item_embedding.weight.normal_()
        m.load_state_dict(other.state_dict())
        hidden = m.encode_last(seq, lengths)
        loaded = m.scores(seq, lengths)
    assert_fp32_product(loaded[:, 1:], hidden, other.item_embedding.weight[1:].detach())
    assert len(packed_calls) == 3


def test_matmul_when_the_packed_product_is_unavailable(monkeypatch, packed_calls):
    monkeypatch.setattr(packed_scoring, "packed_product_unavailable", lambda: "simulated: no oneDNN")
    m = model()
    seq, lengths = histories(m.n_items, 4)
    with torch.no_grad():
        got = m.scores(seq, lengths)
        want = torch.matmul(m.encode_last(seq, lengths), m.item_embedding.weight.t())
    assert packed_calls == []
    want[:, 0] = float("-inf")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_matmul_where_the_packed_product_does_not_apply(packed_calls):
    """fp64, oneDNN switched off, an inference-tensor table, 3-D hidden: matmul, with its exact result."""
    owner = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    table, hidden = torch.randn(37, 16, generator=g), torch.randn(4, 16, generator=g)
    got = packed_scoring.catalogue_product(owner, hidden.double(), table.double())
    torch.testing.assert_close(got, hidden.double() @ table.double().t(), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (flags() also sets oneDNN's TF32 switch, and warns that it has no GPU)
        with torch.backends.mkldnn.flags(enabled=False):
            got = packed_scoring.catalogue_product(owner, hidden, table)
    torch.testing.assert_close(got, torch.matmul(hidden, table.t()), rtol=0, atol=0)
    with torch.inference_mode():
        frozen = table.clone()
        got = packed_scoring.catalogue_product(owner, hidden, frozen)
    torch.testing.assert_close(got, torch.matmul(hidden, table.t()), rtol=0, atol=0)
    got = packed_scoring.catalogue_product(owner, hidden[None], table)
    torch.testing.assert_close(got, torch.matmul(hidden[None], table.t()), rtol=0, atol=0)
    assert packed_calls == []


@pytest.mark.parametrize("make", [model, lambda: SASRec(52, d_model=16, max_len=9, n_layers=1, dropout=0.0)])
def test_scores_under_autograd_keep_their_gradients(packed_calls, make):
    m = make()
    seq, lengths = histories(m.n_items, 6)
    weights = torch.randn(6, m.n_items, generator=torch.Generator().manual_seed(3))
    params = [p for p in m.parameters() if p.requires_grad]

    def grads(scores):
        assert scores.requires_grad
        return torch.autograd.grad((scores[:, 1:] * weights).sum(), params, allow_unused=True)

    got = grads(m.scores(seq, lengths))
    assert packed_calls == []
    want = grads(torch.matmul(m.encode_last(seq, lengths), m.item_embedding.weight.t()))  # the plain product
    for p, a, b in zip(params, got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert got[0] is not None and bool(got[0][1:].abs().sum() > 0)  # the item table's gradient
