"""The "M2Rec, unfused" benchmark baseline (bench/unfused_m2rec.py) computes M2Rec's function.

It is built from mamba_ssm's Mamba (here on CPU through m2rec.mamba_ssm_compat's reference-scan shim),
torch.fft and separate torch ops; with M2Rec's parameters loaded it must give M2Rec's outputs, scores,
loss and every parameter gradient. mamba_ssm's reference scan works in fp32, so the comparison is in
fp32 with tolerances scaled to the values' magnitude.
"""
import pytest
import torch

from m2rec.mamba_ssm_compat import import_mamba_ssm
from m2rec.models import M2Rec

if import_mamba_ssm()[0] is None:  # pragma: no cover - depends on the install
    pytest.skip(f"mamba_ssm is not importable: {import_mamba_ssm()[1]}", allow_module_level=True)

from bench.unfused_m2rec import UnfusedM2Rec, mamba_scan_label, torch_fft_filter  # noqa: E402

N_ITEMS = 30


def _pair(filter_mode="causal", semantic=True, frequency=True, n_layers=1, max_len=16):
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(N_ITEMS + 1, 12), dim=1) if semantic else None
    kwargs = dict(d_model=16, n_layers=n_layers, max_len=max_len, d_state=5, text_embeddings=text, filter=filter_mode,
                  use_frequency=frequency, dropout=0.0)
    ours = M2Rec(N_ITEMS, backend="torch", **kwargs)
    with torch.no_grad():  # move the filter and gate away from their near-zero initialisation
        for layer in ours.layers:
            if layer.filter is not None:
                for p in layer.filter.parameters():
                    p.normal_(0.0, 0.3)
            if layer.n_branches >= 2:
                layer.gate_weight.normal_(0.0, 0.5)
    unfused = UnfusedM2Rec(N_ITEMS, **kwargs)
    unfused.load_state_dict(ours.state_dict())
    return ours, unfused


def _batch(L, lengths):
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, N_ITEMS + 1, (len(lengths), L), generator=g)
    lengths = torch.tensor(lengths)
    seq[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    targets = torch.randint(1, N_ITEMS + 1, (len(lengths), L), generator=g)
    targets[seq == 0] = 0
    return seq, lengths, targets


def _close(a, b, rel=2e-5):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-3)
    assert (a - b).abs().max().item() <= rel * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("filter_mode,semantic,frequency,n_layers,L", [
    ("causal", True, True, 1, 13),      # three branches, the benchmark's configuration
    ("causal", False, True, 2, 11),     # two branches, stacked layers
    ("circular", True, True, 1, 16),    # FMLP-Rec's filter (L == max_len)
    ("causal", False, False, 1, 9),     # the Mamba branch alone: no gate
])
def test_unfused_matches_m2rec_outputs_loss_and_every_gradient(filter_mode, semantic, frequency, n_layers, L):
    ours, unfused = _pair(filter_mode, semantic, frequency, n_layers)
    seq, lengths, targets = _batch(L, [L, max(L - 4, 1), 3])
    ours.eval(), unfused.eval()
    _close(unfused(seq, lengths), ours(seq, lengths))
    s_ours, s_unf = ours.scores(seq, lengths), unfused.scores(seq, lengths)
    _close(s_unf[:, 1:], s_ours[:, 1:])
    assert torch.isneginf(s_unf[:, 0]).all()
    all_positions = filter_mode == "causal"
    if not all_positions:
        targets = targets[torch.arange(len(lengths)), lengths - 1].clamp(min=1)
    loss_ours = ours.loss(seq, lengths, targets, all_positions=all_positions)
    loss_unf = unfused.loss(seq, lengths, targets, all_positions=all_positions)
    _close(loss_unf, loss_ours)
    loss_ours.backward()
    loss_unf.backward()
    grads_ours = dict(ours.named_parameters())
    for name, p in unfused.named_parameters():
        ref = grads_ours[name].grad
        assert p.grad is not None and ref is not None, name
        _close(p.grad, ref, rel=1e-4)


def test_unfused_runs_mamba_ssm_mamba_and_its_scan(monkeypatch):
    """The temporal branch is mamba_ssm.Mamba on its slow path, and its scan is the one mamba_ssm calls."""
    import importlib

    simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
    calls = []
    real_scan = simple.selective_scan_fn
    monkeypatch.setattr(simple, "selective_scan_fn", lambda *a, **k: calls.append(1) or real_scan(*a, **k))
    _, unfused = _pair()
    seq, lengths, _ = _batch(7, [7, 2])
    unfused.eval()
    unfused(seq, lengths)
    assert calls == [1]
    twin = unfused._twins[0]
    assert type(twin).__module__ == "mamba_ssm.modules.mamba_simple" and twin.use_fast_path is False
    assert twin.in_proj.weight is unfused.layers[0].mamba.in_proj.weight  # parameters shared, not copied


def test_unfused_filter_is_the_causal_convolution():
    """torch_fft_filter in causal mode is y_t = sum_{s<=t} k_{t-s} x_s (checked against a direct loop)."""
    ours, _ = _pair()
    filt = ours.layers[0].filter
    x = torch.randn(2, 9, 16, dtype=torch.float64).float()
    y = torch_fft_filter(filt, x)
    k = filt.kernel.detach()
    direct = torch.stack([sum(k[t - s] * x[:, s] for s in range(t + 1)) for t in range(9)], dim=1)
    _close(y, direct, rel=1e-5)


def test_scan_label_on_cpu_is_mamba_ssm_reference():
    label, how = mamba_scan_label(torch.device("cpu"))
    assert label == "mamba_ssm_ref" and "selective_scan_ref" in how


def test_unfused_refuses_a_circular_batch_shorter_than_max_len():
    _, unfused = _pair("circular")
    seq, lengths, _ = _batch(10, [10, 4])
    with pytest.raises(ValueError, match="max_len"):
        unfused(seq, lengths)
