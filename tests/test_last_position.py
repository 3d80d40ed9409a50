"""Last-position inference: ``scores()`` runs each model's last layer at the last positions only, and
equals scoring the full forward at lengths - 1 — for every model, ablation, depth and backend."""
import pytest
import torch

from _tolerance import assert_close

import m2rec.layers.mamba_mixer as mamba_mixer_module
from m2rec.layers import FrequencyFilter, M2RecLayer
from m2rec.mamba_ssm_compat import import_mamba_ssm
from m2rec.models import M2Rec, Mamba4Rec, SASRec

N_ITEMS, MAX_LEN, D = 30, 12, 16
TEXT = torch.randn(N_ITEMS + 1, 10, generator=torch.Generator().manual_seed(1))


def m2rec(n_layers=1, text=True, **kw):
    return M2Rec(N_ITEMS, d_model=D, max_len=MAX_LEN, d_state=4, n_layers=n_layers,
                 text_embeddings=TEXT if text else None, **{"backend": "torch", **kw})


CONFIGS = {
    "m2rec": lambda n: m2rec(n),
    "m2rec-no-semantic": lambda n: m2rec(n, text=False),
    "m2rec-no-frequency": lambda n: m2rec(n, use_frequency=False),
    "m2rec-mamba-only": lambda n: m2rec(n, text=False, use_frequency=False),
    "m2rec-circular": lambda n: m2rec(n, filter="circular"),
    "mamba4rec": lambda n: Mamba4Rec(N_ITEMS, d_model=D, d_state=4, max_len=MAX_LEN, n_layers=n, impl="mixer",
                                     backend="torch"),
    "sasrec": lambda n: SASRec(N_ITEMS, d_model=D, max_len=MAX_LEN, n_layers=n),
}


def perturbed(model):
    """Move every parameter off its structured initialisation (zero biases, unit norms, D = 1...)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def batch(L, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (len(lengths), L), generator=g)
    lengths = torch.tensor(lengths)
    seq[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return seq, lengths


def full_forward_scores(model, seq, lengths):
    """The definition: the full forward (every position), scored at lengths - 1, in eval mode."""
    was = model.training
    model.eval()
    try:
        logits = model.item_logits(model.gather_last(model(seq, lengths), lengths))
    finally:
        model.train(was)
    logits[:, 0] = float("-inf")
    return logits


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_scores_equal_the_full_forward_at_the_last_position(name, n_layers):
    model = perturbed(CONFIGS[name](n_layers)).double()
    L = MAX_LEN if name == "m2rec-circular" else 9
    seq, lengths = batch(L, [L, 4, 1, 7, 2])
    with torch.no_grad():
        got = model.scores(seq, lengths)
        want = full_forward_scores(model, seq, lengths)
    assert got.dtype == torch.float64 and got.shape == (5, N_ITEMS + 1)
    assert_close(got, want, rtol=1e-9, atol=1e-9)
    # in float32 too, within fp32 rounding of values of this size (the filter is a dot product here,
    # a transform there)
    model.float()
    with torch.no_grad():
        got, want = model.scores(seq, lengths), full_forward_scores(model, seq, lengths)
    scale = want[:, 1:].abs().max()
    assert_close(got, want, rtol=1e-5, atol=1e-5 * float(scale))


def test_scores_run_in_eval_mode_and_restore_the_mode():
    model = perturbed(m2rec(2, dropout=0.5))
    model.train()
    model.layers[0].ffn.eval()  # a submodule in its own mode keeps it
    seq, lengths = batch(8, [8, 3])
    with torch.no_grad():
        a, b = model.scores(seq, lengths), model.scores(seq, lengths)
    assert_close(a, b, rtol=0, atol=0)  # no dropout
    assert model.training and model.layers[1].ffn.training and not model.layers[0].ffn.training
    with torch.no_grad():
        assert_close(a, full_forward_scores(model, seq, lengths), rtol=1e-5, atol=1e-5)


def test_scores_keep_gradients_when_asked():
    model = perturbed(m2rec(1))
    seq, lengths = batch(8, [8, 3])
    model.scores(seq, lengths)[:, 1:].sum().backward()
    assert model.layers[0].mamba.A_log.grad is not None and model.layers[0].filter.kernel.grad is not None


def test_layer_counts_one_full_and_one_final_scan(monkeypatch):
    calls = {"full": 0, "final": 0}
    for kind, attr in (("full", "selective_scan"), ("final", "selective_scan_final")):
        fn = getattr(mamba_mixer_module, attr)
        monkeypatch.setattr(mamba_mixer_module, attr,
                            lambda *a, _fn=fn, _k=kind, **k: (calls.__setitem__(_k, calls[_k] + 1), _fn(*a, **k))[1])
    lowrank = mamba_mixer_module.selective_scan_lowrank  # the time-major (CPU) path: final= says which
    monkeypatch.setattr(mamba_mixer_module, "selective_scan_lowrank",
                        lambda *a, **k: (calls.__setitem__(_kind := "final" if k["final"] else "full", calls[_kind] + 1),
                                         lowrank(*a, **k))[1])
    model = m2rec(2)
    last = model.layers[1]
    monkeypatch.setattr(last.filter, "forward", lambda *a: pytest.fail("the last causal filter ran in full"))
    monkeypatch.setattr(last, "forward", lambda *a: pytest.fail("the last layer ran in full"))
    seq, lengths = batch(9, [9, 2])
    with torch.inference_mode():
        model.scores(seq, lengths)
    assert calls == {"full": 1, "final": 1}


def test_triton_backend_under_the_interpreter(device):
    for n_layers, kw in ((1, {}), (2, dict(filter="circular")), (1, dict(use_frequency=False, text=False))):
        torch.manual_seed(n_layers)
        model = perturbed(m2rec(n_layers, **{**kw, "backend": "triton"})).to(device)
        L = MAX_LEN if kw.get("filter") == "circular" else 7
        seq, lengths = (t.to(device) for t in batch(L, [L, 3, 1]))
        model_torch = m2rec(n_layers, **{**kw, "backend": "torch"}).to(device)
        model_torch.load_state_dict(model.state_dict())
        with torch.no_grad():
            got, want = model.scores(seq, lengths), full_forward_scores(model, seq, lengths)
            tol = dict(rtol=1e-4, atol=1e-4 * float(want[:, 1:].abs().max()))
            assert_close(got, want, **tol)
            assert_close(got, model_torch.scores(seq, lengths), **tol)


@pytest.mark.skipif(import_mamba_ssm()[0] is None, reason="mamba_ssm not importable")
def test_mamba4rec_with_the_real_mamba_falls_back_to_its_full_forward():
    model = perturbed(Mamba4Rec(N_ITEMS, d_model=D, d_state=4, max_len=MAX_LEN, n_layers=2, impl="mamba_ssm"))
    assert model.mamba_impl == "mamba_ssm"
    seq, lengths = batch(9, [9, 4, 1])
    with torch.no_grad():
        assert_close(model.scores(seq, lengths), full_forward_scores(model, seq, lengths),
                                   rtol=1e-5, atol=1e-5)


def test_layer_forward_last_checks_its_inputs():
    layer = M2RecLayer(d_model=8, d_state=3, max_len=10, backend="torch")
    h = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match="semantic"):
        layer.forward_last(h, None, torch.tensor([6, 2]))
    with pytest.raises(ValueError, match="s"):
        layer.forward_last(h, torch.randn(2, 6, 8), torch.tensor([6, 2]))
    with pytest.raises(ValueError, match="lengths"):
        layer.forward_last(h, torch.randn(2, 8), torch.tensor([7, 2]))
    with pytest.raises(ValueError, match="lengths"):
        layer.forward_last(h, torch.randn(2, 8), torch.tensor([0, 2]))
