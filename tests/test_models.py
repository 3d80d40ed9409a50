"""The three recommenders through their shared interface (torch backend, tiny sizes)."""
import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_close
from m2rec.models import MODELS, M2Rec, Mamba4Rec, SASRec, build_model

N_ITEMS, MAX_LEN, D = 30, 16, 16
TEXT = torch.randn(N_ITEMS + 1, 12)

CONFIGS = {
    "m2rec": lambda **kw: M2Rec(N_ITEMS, d_model=D, max_len=MAX_LEN, d_state=4, backend="torch", **kw),
    "m2rec-text": lambda **kw: M2Rec(N_ITEMS, d_model=D, max_len=MAX_LEN, d_state=4, text_embeddings=TEXT,
                                     backend="torch", **kw),
    "m2rec-2layers": lambda **kw: M2Rec(N_ITEMS, d_model=D, max_len=MAX_LEN, d_state=4, text_embeddings=TEXT,
                                        n_layers=2, backend="torch", **kw),
    "m2rec-no-frequency": lambda **kw: M2Rec(N_ITEMS, d_model=D, max_len=MAX_LEN, d_state=4, text_embeddings=TEXT,
                                             use_frequency=False, backend="torch", **kw),
    "m2rec-mamba-only": lambda **kw: M2Rec(N_ITEMS, d_model=D, max_len=MAX_LEN, d_state=4, use_frequency=False,
                                           backend="torch", **kw),
    "sasrec": lambda **kw: SASRec(N_ITEMS, d_model=D, max_len=MAX_LEN, **kw),
    "mamba4rec": lambda **kw: Mamba4Rec(N_ITEMS, d_model=D, d_state=4, max_len=MAX_LEN, impl="mixer",
                                        backend="torch", **kw),
    "mamba4rec-2layers": lambda **kw: Mamba4Rec(N_ITEMS, d_model=D, d_state=4, max_len=MAX_LEN, n_layers=2,
                                                impl="mixer", backend="torch", **kw),
}
CAUSAL = list(CONFIGS)


def right_padded(lengths, L, generator=None):
    seq = torch.randint(1, N_ITEMS + 1, (len(lengths), L), generator=generator)
    lengths = torch.tensor(lengths)
    seq[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return seq, lengths


@pytest.mark.parametrize("name", CAUSAL)
def test_right_padding_does_not_change_last_position_scores(name):
    model = CONFIGS[name](dropout=0.3).eval()
    seq, lengths = right_padded([11, 4, 1, 7], 11)
    with torch.no_grad():
        batch_scores = model.scores(seq, lengths)
        for b in range(4):
            n = int(lengths[b])
            alone = model.scores(seq[b:b + 1, :n], lengths[b:b + 1])
            assert_close(batch_scores[b:b + 1], alone, rtol=1e-5, atol=1e-5)


def _synthetic_batch(n=16, L=10):
    """Each sequence walks the catalogue with a per-sequence step (1 or 2): the next item is predictable
    from the last two items."""
    g = torch.Generator().manual_seed(5)
    start = torch.randint(0, N_ITEMS, (n, 1), generator=g)
    step = torch.randint(1, 3, (n, 1), generator=g)
    walk = (start + step * torch.arange(L + 1)[None, :]) % N_ITEMS + 1
    lengths = torch.randint(3, L + 1, (n,), generator=g)
    valid = torch.arange(L)[None, :] < lengths[:, None]
    seq = torch.where(valid, walk[:, :L], 0)
    targets_all = torch.where(valid, walk[:, 1:], 0)
    targets_last = walk[torch.arange(n), lengths]
    return seq, lengths, targets_all, targets_last


@pytest.mark.parametrize("name,all_positions", [(n, True) for n in ("m2rec-text", "sasrec", "mamba4rec")]
                         + [("m2rec-circular", False), ("m2rec", False)])
def test_a_few_adam_steps_reduce_the_loss(name, all_positions):
    if name == "m2rec-circular":
        model = M2Rec(N_ITEMS, d_model=D, max_len=10, d_state=4, filter="circular", dropout=0.0, backend="torch")
    else:
        model = CONFIGS[name](dropout=0.0)
    seq, lengths, t_all, t_last = _synthetic_batch()
    targets = t_all if all_positions else t_last
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model.loss(seq, lengths, targets, all_positions=all_positions)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", ["m2rec-text", "sasrec", "mamba4rec"])
def test_loss_is_full_catalogue_cross_entropy(name):
    model = CONFIGS[name](dropout=0.0).eval()
    seq, lengths, t_all, t_last = _synthetic_batch(n=5, L=8)
    with torch.no_grad():
        hidden = model(seq, lengths)
        E = model.item_embedding.weight
        # last position: against scores() (another path), padding column excluded
        scores = model.scores(seq, lengths)
        assert_close(model.loss(seq, lengths, t_last, all_positions=False),
                                   F.cross_entropy(scores[:, 1:], t_last - 1), rtol=1e-5, atol=1e-6)
        # all positions: mean over valid targets of -log softmax over items 1..n
        nll = []
        for b in range(5):
            for t in range(int(lengths[b])):
                logits = hidden[b, t] @ E[1:].T
                nll.append(-(logits[t_all[b, t] - 1] - torch.logsumexp(logits, 0)))
        assert_close(model.loss(seq, lengths, t_all, all_positions=True), torch.stack(nll).mean(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["m2rec", "sasrec", "mamba4rec"])
def test_padding_is_never_ranked(name):
    model = CONFIGS[name](dropout=0.0).eval()
    with torch.no_grad():
        model.item_embedding.weight[0] = 100.0 * model.item_embedding.weight[1:].mean(0) + 50.0
    seq, lengths = right_padded([5, 9, 2], 9)
    with torch.no_grad():
        scores = model.scores(seq, lengths)
    assert scores.shape == (3, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    assert (scores.topk(N_ITEMS, dim=1).indices != 0).all()


@pytest.mark.parametrize("name", ["m2rec", "sasrec", "mamba4rec"])
def test_bad_inputs_raise_naming_the_argument(name):
    model = CONFIGS[name]()
    seq, lengths = right_padded([6, 3], 6)
    bad = seq.clone()
    bad[0, 0] = N_ITEMS + 1
    cases = [
        (bad, lengths, ValueError, "item_seq"),
        (seq.clone().fill_(-1), lengths, ValueError, "item_seq"),
        (seq.float(), lengths, TypeError, "item_seq"),
        (seq[0], lengths, ValueError, "item_seq"),
        (seq.tolist(), lengths, TypeError, "item_seq"),
        (torch.zeros(2, MAX_LEN + 1, dtype=torch.long), lengths, ValueError, "max_len"),
        (seq, torch.tensor([6, 0]), ValueError, "lengths"),
        (seq, torch.tensor([7, 3]), ValueError, "lengths"),
        (seq, torch.tensor([6.0, 3.0]), TypeError, "lengths"),
        (seq, torch.tensor([6, 3, 1]), ValueError, "lengths"),
        (seq.flip(1), lengths, ValueError, "right-padded"),  # left padding
    ]
    for s, n, exc, word in cases:
        with pytest.raises(exc, match=word):
            model.scores(s, n)
    t_all = torch.where(seq > 0, 1, 0)
    with pytest.raises(ValueError, match="targets"):
        model.loss(seq, lengths, t_all[:, :5])
    with pytest.raises(ValueError, match="targets"):
        model.loss(seq, lengths, torch.ones_like(seq))  # non-zero targets on padding positions
    with pytest.raises(ValueError, match="targets"):
        model.loss(seq, lengths, torch.tensor([1, N_ITEMS + 1]), all_positions=False)
    with pytest.raises(ValueError, match="targets"):
        model.loss(seq, lengths, torch.tensor([1, 0]), all_positions=False)
    with pytest.raises(TypeError, match="targets"):
        model.loss(seq, lengths, torch.tensor([1.0, 2.0]), all_positions=False)


def test_circular_filter_refuses_all_position_training_and_other_lengths():
    model = M2Rec(N_ITEMS, d_model=D, max_len=8, d_state=4, filter="circular", backend="torch")
    assert model.causal is False and CONFIGS["m2rec"]().causal is True
    seq, lengths = right_padded([8, 5], 8)
    with pytest.raises(ValueError, match="leak"):
        model.loss(seq, lengths, torch.where(seq > 0, 1, 0), all_positions=True)
    model.loss(seq, lengths, torch.tensor([1, 2]), all_positions=False).backward()
    with pytest.raises(ValueError, match="max_len"):
        model.scores(seq[:, :6], torch.tensor([6, 5]))
    # without the frequency branch nothing is circular any more
    assert M2Rec(N_ITEMS, max_len=8, filter="circular", use_frequency=False).causal is True


def test_semantic_stream_uses_frozen_text_embeddings():
    model = CONFIGS["m2rec-text"](dropout=0.0).eval()
    assert "text_embeddings" in model.state_dict()
    assert all(p is not model.text_embeddings for p in model.parameters())
    assert model.layers[0].n_branches == 3
    seq, lengths = right_padded([6, 4], 6)
    with torch.no_grad():
        before = model.scores(seq, lengths)
        model.text_embeddings[seq[0, 5]] += 1.0  # the last item: with one layer s acts per position
        after = model.scores(seq, lengths)
    assert not torch.allclose(before[0], after[0])
    model.train()
    model.loss(seq, lengths, torch.tensor([1, 2]), all_positions=False).backward()
    assert model.semantic_proj.weight.grad is not None
    with pytest.raises(ValueError, match="text_embeddings"):
        M2Rec(N_ITEMS, text_embeddings=torch.randn(N_ITEMS, 12))
    with pytest.raises(ValueError, match="text_embeddings"):
        M2Rec(N_ITEMS, use_semantic=True)


def test_semantic_stream_projects_the_table_or_the_gathered_rows_alike():
    """With more ids than table rows the table is projected first, then gathered: the same stream
    and the same gradients as gathering first (what a few ids take)."""
    model = CONFIGS["m2rec-text"](dropout=0.0)
    seq = torch.randint(0, N_ITEMS + 1, (4, 9))  # 36 ids > 31 table rows
    g = torch.randn(4, 9, D)
    results = []
    for rows in (slice(0, 4), slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)):  # whole batch, then by row
        model.zero_grad()
        s = model.semantic_stream(seq[rows])
        (s * g[rows]).sum().backward()
        results.append((s.detach(), model.semantic_proj.weight.grad.clone()))
    whole, per_row = results[0], results[1:]
    assert_close(whole[0], torch.cat([r[0] for r in per_row]), rtol=1e-5, atol=1e-6)
    assert_close(whole[1], sum(r[1] for r in per_row), rtol=1e-5, atol=1e-5)


def test_ablations_construct_and_run():
    for name, branches in (("m2rec", 2), ("m2rec-text", 3), ("m2rec-no-frequency", 2), ("m2rec-mamba-only", 1)):
        model = CONFIGS[name]()
        assert model.layers[0].n_branches == branches
        seq, lengths = right_padded([7, 2], 7)
        loss = model.loss(seq, lengths, torch.where(seq > 0, seq % N_ITEMS + 1, 0))
        loss.backward()
        assert torch.isfinite(loss)
        assert model.layers[0].mamba.in_proj.weight.grad.abs().sum() > 0
    assert M2Rec(N_ITEMS, text_embeddings=TEXT, use_semantic=False).layers[0].n_branches == 2


def test_registry_and_mamba4rec_implementation_choice():
    assert set(MODELS) == {"m2rec", "sasrec", "mamba4rec"}
    model = build_model("sasrec", 12, d_model=8, n_heads=2, max_len=5)
    assert isinstance(model, SASRec) and model.n_items == 12
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gru4rec", 12)
    # on CPU tensors "auto" never picks mamba_ssm's CUDA scan
    assert build_model("mamba4rec", 12, d_model=8, d_state=4).mamba_impl == "mixer"
    with pytest.raises(ValueError, match="impl"):
        Mamba4Rec(12, impl="cuda")


def test_recbole_style_initialisation():
    model = CONFIGS["m2rec-text"]().requires_grad_(False)
    w = model.item_embedding.weight
    assert torch.all(w[0] == 0) and abs(float(w[1:].std()) - 0.02) < 0.004
    layer = model.layers[0]
    assert abs(float(layer.ffn.w_1.weight.std()) - 0.02) < 0.004 and torch.all(layer.ffn.w_1.bias == 0)
    # Mamba's dt bias keeps its step-size initialisation (softplus(bias) in [1e-3, 1e-1])
    dt = F.softplus(layer.mamba.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    # Mamba4Rec reproduces its original, which re-initialises every Linear bias, dt's included
    assert torch.all(CONFIGS["mamba4rec"]().layers[0].mamba.dt_proj.bias == 0)


@pytest.mark.parametrize("name", ["m2rec", "mamba4rec"])
def test_serving_embedding_normalises_the_catalogue_once(name):
    """Without dropout and gradients and with more positions than catalogue rows, h0 = LayerNorm(E)[items]
    (models/base.py ``normed_item_embedding``): the same bits as LayerNorm(E[items]), from one norm of the
    table; with gradients the per-position form runs."""
    from m2rec.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 9, d_model=16, n_layers=1, max_len=12).eval()
    items = torch.randint(0, 10, (3, 12))  # 36 positions > 10 rows
    seen = []
    hook = model.embedding_norm.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        got = model._embed(items)
        want = model.embedding_norm(model.item_embedding(items))
    assert torch.equal(got, want)
    assert seen[0] == (10, 16)  # the table, not the (3, 12) positions
    seen.clear()
    model._embed(items)  # gradients on: per position
    hook.remove()
    assert seen == [(3, 12, 16)]
