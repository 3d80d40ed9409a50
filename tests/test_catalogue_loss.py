"""The chunked, fused full-catalogue cross-entropy (``m2rec/models/catalogue_loss.py``) against its
reference ``F.cross_entropy(hidden @ table.T, ...)``: loss and both gradients, in fp64 (tight) and fp32
(tolerance by magnitude), with ignored rows, with more rows than one chunk and a last chunk that is not
full, and with one side frozen; each fp32/bf16 case both with the chunks' softmax in the compiled kernel
(m2rec_kernels/softmax_xent_cpu.py) and in ATen's ops (the kernel reported unavailable)."""
import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_close
from m2rec.models import catalogue_loss
from m2rec.models.catalogue_loss import catalogue_cross_entropy, rows_per_chunk


def _inputs(rows, classes, d, dtype, ignore_share=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, d, generator=g, dtype=torch.float64).to(dtype)
    table = (0.5 * torch.randn(classes, d, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, classes, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignore_share] = -1
    return hidden, table, targets


def _loss_and_grads(fn, hidden, table, targets, upstream=1.0):
    h = hidden.clone().requires_grad_()
    w = table.clone().requires_grad_()
    loss = fn(h, w, targets)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def _reference(h, w, t):
    return F.cross_entropy(h @ w.t(), t, ignore_index=-1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows, so that the odd shapes below span several chunks and end in a partial one."""
    monkeypatch.setattr(catalogue_loss, "_CHUNK_BYTES", 1)


@pytest.fixture(params=["compiled", "aten"])
def softmax_path(request, monkeypatch):
    """Which form computes the chunks' softmax: "compiled" (skips without the kernel) or "aten" (the
    kernel reported unavailable). Returns (path, calls): calls counts the kernel's calls."""
    calls = []
    if request.param == "compiled":
        why = catalogue_loss.cpu_xent_unavailable()
        if why is not None:
            pytest.skip(f"compiled softmax cross-entropy not available: {why}")
        kernel = catalogue_loss.softmax_xent_rows_

        def counted(*args):
            calls.append(args[0].shape)
            return kernel(*args)

        monkeypatch.setattr(catalogue_loss, "softmax_xent_rows_", counted)
    else:
        monkeypatch.setattr(catalogue_loss, "cpu_xent_unavailable", lambda: "turned off by the test")
    return request.param, calls


def _assert_path(softmax_path, dtype):
    """The kernel ran exactly when it should: on the compiled path, for fp32 work (not fp64)."""
    path, calls = softmax_path
    assert bool(calls) == (path == "compiled" and dtype != torch.float64), (path, dtype, len(calls))


@pytest.mark.parametrize("rows,classes,d,ignore_share", [(37, 53, 48, 0.0), (37, 53, 48, 0.3), (101, 7, 5, 0.5),
                                                         (3, 1000, 8, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_cross_entropy(small_chunks, softmax_path, rows, classes, d, ignore_share, dtype):
    hidden, table, targets = _inputs(rows, classes, d, dtype, ignore_share)
    got = _loss_and_grads(catalogue_cross_entropy, hidden, table, targets, upstream=0.7)
    want = _loss_and_grads(_reference, hidden, table, targets, upstream=0.7)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w, **tol)
    with torch.no_grad():  # the loss alone (no gradient asked of the kernel)
        assert_close(catalogue_cross_entropy(hidden, table, targets), want[0], **tol)
    _assert_path(softmax_path, dtype)


def test_one_side_frozen_and_no_grad(small_chunks):
    hidden, table, targets = _inputs(37, 53, 48, torch.float64, 0.2)
    want = _loss_and_grads(_reference, hidden, table, targets)
    h = hidden.clone().requires_grad_()
    loss = catalogue_cross_entropy(h, table, targets)
    loss.backward()
    assert_close(h.grad, want[1], rtol=1e-10, atol=1e-12)
    w = table.clone().requires_grad_()
    catalogue_cross_entropy(hidden, w, targets).backward()
    assert_close(w.grad, want[2], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert_close(catalogue_cross_entropy(hidden.requires_grad_(), w, targets), want[0], rtol=1e-10, atol=1e-12)


def test_bf16_inputs_keep_their_dtype(small_chunks, softmax_path):
    hidden, table, targets = _inputs(37, 53, 16, torch.float64, 0.2)
    got = _loss_and_grads(catalogue_cross_entropy, hidden.bfloat16(), table.bfloat16(), targets)
    want = _loss_and_grads(_reference, hidden, table, targets)  # the fp64 truth
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert_close(g.double(), w, rtol=2e-2, atol=1e-2)
    _assert_path(softmax_path, torch.bfloat16)


def test_every_row_ignored_is_nan_as_cross_entropy():
    hidden, table, targets = _inputs(5, 9, 4, torch.float64)
    targets[:] = -1
    assert torch.isnan(catalogue_cross_entropy(hidden, table, targets))
    assert torch.isnan(_reference(hidden, table, targets))


def test_chunk_rows():
    assert rows_per_chunk(3706, 4) == 64          # ~1 MB of fp32 logits
    assert rows_per_chunk(10 ** 6, 4) == 16       # a huge catalogue: never below 16 rows
    assert rows_per_chunk(10, 4) == 512           # a tiny one: at most 512
    assert all(rows_per_chunk(c, 8) % 16 == 0 for c in (7, 53, 3706, 99991))


def test_traced_loss_takes_the_plain_form_in_one_graph():
    """Under torch.compile the chunked form (which reads the number of kept rows) would break the
    graph: the traced call takes ``F.cross_entropy``, one graph (Dynamo only, no Inductor build), and
    gives the same loss and gradients."""
    hidden, table, targets = _inputs(37, 53, 48, torch.float64, 0.3)
    compiled = torch.compile(catalogue_cross_entropy, fullgraph=True, backend="eager")
    got = _loss_and_grads(compiled, hidden, table, targets)
    want = _loss_and_grads(_reference, hidden, table, targets)
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-10, atol=1e-12)
