"""The compiled row-wise softmax cross-entropy (m2rec_kernels/softmax_xent_cpu.py + scan/csrc/softmax_xent_*),
the per-chunk work of the training loss, against torch in float64, for every ISA variant this CPU runs:
the loss ``logsumexp(row) - row[target]`` and, in gradient mode, the row overwritten in place by
``softmax(row) - onehot(target)``; odd shapes, logits of magnitude 1e4 (the max must be subtracted),
strided rows, NaN, thread counts and bad arguments.

Tolerances: the kernel's only roundings are fp32 exps (~1e-7 relative) and a sum of at most C positive
terms in kAcc * W lanes (relative error under 1.5e-5 in the worst case at C = 3706 with the generic
W = 4, in practice ~1e-6), so the loss (a log of that sum) is held to 2e-5 and the softmax entries
(<= 1) to 2e-5 of their size plus 1e-7; a wrong term (O(1), or O(1e4) without the max) still fails.
"""
import pytest
import torch

from _cpu_library import ISAS, isa_or_skip
from m2rec_kernels import softmax_xent_cpu
from m2rec_kernels.scan import cpu as scan_cpu
from m2rec_kernels.softmax_xent_cpu import softmax_xent_rows_

SHAPES = [(37, 53), (1, 1), (3, 1000), (5, 3706), (4, 16), (2, 17)]  # and exact multiples of every W


def _isa_or_skip(isa):
    return isa_or_skip(isa, softmax_xent_cpu.cpu_xent_unavailable)


def _logits(rows, classes, g, offset=0.0, scale=3.0):
    """fp32 logits N(0, scale^2), plus ``offset`` times a random sign per row."""
    x = scale * torch.randn(rows, classes, generator=g, dtype=torch.float64)
    sign = torch.randint(0, 2, (rows, 1), generator=g) * 2 - 1
    return (x + offset * sign).float()


def _reference(x, targets):
    """(losses, softmax - onehot) in float64 from the same fp32 logits."""
    log_p = torch.log_softmax(x.double(), dim=1)
    rows = torch.arange(x.shape[0])
    grad = log_p.exp()
    grad[rows, targets] -= 1.0
    return -log_p[rows, targets], grad


def _check(x, targets, isa):
    want_loss, want_grad = _reference(x, targets)
    kept = x.clone()
    loss = softmax_xent_rows_(kept, targets, False, isa)
    assert loss.dtype == torch.float64 and loss.shape == (x.shape[0],)
    assert torch.equal(kept, x), "loss-only mode must leave the logits alone"
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=2e-5)
    grad = x.clone()
    loss_g = softmax_xent_rows_(grad, targets, True, isa)
    assert torch.equal(loss_g, loss), "the loss must not depend on the mode"
    torch.testing.assert_close(grad.double(), want_grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows,classes", SHAPES)
def test_matches_float64(isa, rows, classes):
    _isa_or_skip(isa)
    g = torch.Generator().manual_seed(rows * 7919 + classes)
    x = _logits(rows, classes, g)
    targets = torch.randint(0, classes, (rows,), generator=g)
    _check(x, targets, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows,classes", [(37, 53), (3, 1000)])
def test_large_logits_subtract_the_max(isa, rows, classes):
    """Rows around +1e4 and -1e4: exp without the max would overflow (or flush every term to 0)."""
    _isa_or_skip(isa)
    g = torch.Generator().manual_seed(classes)
    x = _logits(rows, classes, g, offset=1e4)
    targets = torch.randint(0, classes, (rows,), generator=g)
    _check(x, targets, isa)
    spread = _logits(rows, classes, g, scale=1e4)  # terms far below the max: exp exactly 0, never NaN
    _check(spread, targets, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_rows_with_a_row_stride(isa):
    """A column slice of a wider block: only its columns are read and written."""
    _isa_or_skip(isa)
    g = torch.Generator().manual_seed(1)
    wide = _logits(9, 70, g)
    targets = torch.randint(0, 53, (9,), generator=g)
    want_loss, want_grad = _reference(wide[:, :53], targets)
    got = wide.clone()
    loss = softmax_xent_rows_(got[:, :53], targets, True, isa)
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got[:, :53].double(), want_grad, rtol=2e-5, atol=1e-7)
    assert torch.equal(got[:, 53:], wide[:, 53:])


@pytest.mark.parametrize("isa", ISAS)
def test_nan_in_a_row_makes_its_loss_nan(isa):
    _isa_or_skip(isa)
    g = torch.Generator().manual_seed(2)
    x = _logits(3, 40, g)
    x[1, 17] = float("nan")
    targets = torch.tensor([0, 5, 39])
    loss = softmax_xent_rows_(x.clone(), targets, False, isa)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_same_bits_for_any_thread_count():
    _isa_or_skip(scan_cpu.cpu_scan_status().isa or "generic")
    g = torch.Generator().manual_seed(3)
    x = _logits(300, 257, g)
    targets = torch.randint(0, 257, (300,), generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grad = x.clone()
            results.append((softmax_xent_rows_(grad, targets, True), grad))
    finally:
        torch.set_num_threads(before)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_bad_arguments_are_named():
    _isa_or_skip(scan_cpu.cpu_scan_status().isa or "generic")
    x = torch.zeros(4, 10)
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 10 is out of range \[0, 10\)"):
        softmax_xent_rows_(x, torch.tensor([0, 1, 10, 3]), True)
    with pytest.raises(RuntimeError, match=r"targets\[0\] = -1 is out of range"):
        softmax_xent_rows_(x, torch.tensor([-1, 1, 2, 3]), False)
    with pytest.raises(RuntimeError, match="targets must be an integer CPU tensor of shape"):
        softmax_xent_rows_(x, torch.tensor([0, 1, 2]), False)
    with pytest.raises(RuntimeError, match="logits must be a float32 CPU tensor"):
        softmax_xent_rows_(x.double(), torch.tensor([0, 1, 2, 3]), False)
    with pytest.raises(RuntimeError, match="unit stride along classes"):
        softmax_xent_rows_(torch.zeros(10, 4).t(), torch.tensor([0, 1, 2, 3]), False)
