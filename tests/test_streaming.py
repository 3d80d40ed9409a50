"""Streaming updates: ``init_state`` / ``prefill`` / ``step`` give, one item at a time, the scores that
``scores()`` gives on the whole history — for M2Rec (and its ablations), Mamba4Rec and SASRec (KV cache)."""
import pytest
import torch

from _tolerance import assert_close

from m2rec.mamba_ssm_compat import import_mamba_ssm
from m2rec.models import M2Rec, Mamba4Rec, SASRec
from m2rec.models.streaming import StreamState

N_ITEMS, MAX_LEN, D = 30, 12, 16
TEXT = torch.randn(N_ITEMS + 1, 10, generator=torch.Generator().manual_seed(1))


def m2rec(n_layers=1, text=True, max_len=MAX_LEN, **kw):
    return M2Rec(N_ITEMS, d_model=D, max_len=max_len, d_state=4, n_layers=n_layers,
                 text_embeddings=TEXT if text else None, **{"backend": "torch", **kw})


def mamba4rec(n_layers=1, max_len=MAX_LEN, **kw):
    return Mamba4Rec(N_ITEMS, d_model=D, d_state=4, max_len=max_len, n_layers=n_layers,
                     **{"impl": "mixer", "backend": "torch", **kw})


CONFIGS = {
    "m2rec": lambda: m2rec(1),
    "m2rec-2layers": lambda: m2rec(2),
    "m2rec-no-semantic": lambda: m2rec(1, text=False),
    "m2rec-no-frequency-2layers": lambda: m2rec(2, use_frequency=False),
    "m2rec-mamba-only": lambda: m2rec(1, text=False, use_frequency=False),
    "mamba4rec": lambda: mamba4rec(1),
    "mamba4rec-2layers": lambda: mamba4rec(2),
    "sasrec": lambda: SASRec(N_ITEMS, d_model=D, max_len=MAX_LEN, n_layers=1),
    "sasrec-2layers": lambda: SASRec(N_ITEMS, d_model=D, max_len=MAX_LEN, n_layers=2),
}


def perturbed(model, scale=0.2):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def histories(lengths, L=None, seed=0):
    L = L or max(lengths)
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (len(lengths), L), generator=g)
    lengths = torch.tensor(lengths)
    seq[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return seq, lengths


def prefix_scores(model, seq, n):
    """scores() of each user's first n[b] items (rows with n[b] == 0: NaN, nothing to score)."""
    rows = n > 0
    out = torch.full((seq.shape[0], model.n_items + 1), float("nan"), dtype=model.item_embedding.weight.dtype)
    if rows.any():
        width = int(n.max())
        sub = seq[rows, :width].clone()
        sub[torch.arange(width)[None, :] >= n[rows, None]] = 0
        out[rows] = model.scores(sub, n[rows])
    return out


def assert_scores_close(got, want, tol):
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    scale = float(want[ok][want[ok].isfinite()].abs().max()) if ok.any() else 1.0
    assert_close(got[ok], want[ok], rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_item_by_item_equals_scores_at_every_prefix(name):
    """A batch of users with different lengths (odd ones, one of a single item): at step t each user
    takes its t-th item, or 0 (no update) once its sequence has ended."""
    model = perturbed(CONFIGS[name]()).double().train()  # step is eval-mode whatever the model's mode
    seq, lengths = histories([7, 3, 1, 5])
    state = model.init_state(4)
    with torch.no_grad():
        for t in range(seq.shape[1]):
            before = [{k: v.clone() for k, v in layer.items()} for layer in state.layers]
            scores, state2 = model.step(state, seq[:, t])
            assert state2 is state
            n = torch.clamp(lengths, max=t + 1)
            assert torch.equal(state.seen, n)
            assert_scores_close(scores, prefix_scores(model, seq, n), 1e-9)
            for b in range(4):  # a user without an item keeps its state bit for bit
                if t >= lengths[b]:
                    for layer, old in zip(state.layers, before):
                        for k in layer:
                            assert torch.equal(layer[k][b], old[k][b]), (b, k)
    assert model.training


@pytest.mark.parametrize("name", ["m2rec-2layers", "mamba4rec", "sasrec-2layers"])
def test_prefill_then_step_in_float32(name):
    model = perturbed(CONFIGS[name](), 0.1).eval()
    seq, lengths = histories([9, 4, 1], L=11, seed=3)
    with torch.no_grad():
        scores, state = model.prefill(seq[:, :9], torch.clamp(lengths, max=9))
        assert_scores_close(scores, model.scores(seq[:, :9], torch.clamp(lengths, max=9)), 0)
        nxt = torch.tensor([5, 0, 7])
        scores, state = model.step(state, nxt)
        ext = seq.clone()
        ext[0, 9], ext[2, 1] = 5, 7
        want = prefix_scores(model, ext, torch.tensor([10, 4, 2]))
    assert_scores_close(scores, want, 2e-5)


def test_users_that_join_later_have_nan_scores_until_their_first_item():
    model = perturbed(m2rec(1)).double()
    seq, _ = histories([4, 4])
    state = model.init_state(2)
    with torch.no_grad():
        scores, _ = model.step(state, torch.tensor([seq[0, 0], 0]))
        assert scores[1].isnan().all() and not scores[0, 1:].isnan().any() and scores[0, 0] == float("-inf")
        scores, _ = model.step(state, torch.tensor([0, seq[1, 0]]))
        assert_scores_close(scores, prefix_scores(model, seq, torch.tensor([1, 1])), 1e-9)
        scores, _ = model.step(state, torch.zeros(2, dtype=torch.long))  # nobody: same scores again
        assert_scores_close(scores, prefix_scores(model, seq, torch.tensor([1, 1])), 1e-9)


def _zero_padded_kernel(small, big):
    sd = small.state_dict()
    for name, t in big.state_dict().items():
        if name.endswith("filter.kernel"):
            padded = torch.zeros_like(t)
            padded[: sd[name].shape[0]] = sd[name]
            sd[name] = padded
    big.load_state_dict(sd)
    return big


@pytest.mark.parametrize("make", [lambda L: m2rec(2, max_len=L), lambda L: mamba4rec(1, max_len=L)],
                         ids=["m2rec", "mamba4rec"])
def test_past_max_len_the_stream_goes_on_without_forgetting(make):
    """Past max_len items a stream equals this model's equations over the whole stream, with the
    filter's taps beyond max_len zero: a model with a longer max_len and a zero-padded kernel."""
    torch.manual_seed(0)
    small = perturbed(make(5)).double()
    big = _zero_padded_kernel(small, make(11).double())
    seq, lengths = histories([11, 8])
    state = small.init_state(2)
    with torch.no_grad():
        for t in range(11):
            scores, _ = small.step(state, seq[:, t])
            want = prefix_scores(big, seq, torch.clamp(lengths, max=t + 1))
            assert_scores_close(scores, want, 1e-9)
        # ... which is not scores() of the last max_len items: that restarts from an empty state
        assert not torch.allclose(scores[0], small.scores(seq[:1, 6:11], torch.tensor([5]))[0])
    assert torch.equal(state.seen, torch.tensor([11, 8]))


def test_sasrec_stream_ends_at_max_len():
    model = SASRec(N_ITEMS, d_model=D, max_len=4, n_layers=1).eval()
    seq, lengths = histories([4, 2])
    with torch.no_grad():
        _, state = model.prefill(seq, lengths)
        before = [{k: v.clone() for k, v in layer.items()} for layer in state.layers]
        with pytest.raises(ValueError, match="max_len"):
            model.step(state, torch.tensor([3, 3]))
        for layer, old in zip(state.layers, before):  # refused before anything changed
            for k in layer:
                assert torch.equal(layer[k], old[k])
        model.step(state, torch.tensor([0, 3]))  # the other user still has room
        assert torch.equal(state.seen, torch.tensor([4, 3]))


def test_triton_backend_streams_under_the_interpreter(device):
    model = perturbed(m2rec(1, backend="triton"), 0.1).to(device)
    seq, lengths = (t.to(device) for t in histories([5, 2, 4], seed=2))
    with torch.no_grad():
        scores, state = model.prefill(seq[:, :2], torch.clamp(lengths, max=2))
        for t in range(2, 5):
            scores, _ = model.step(state, seq[:, t])
        assert_scores_close(scores, model.scores(seq, lengths), 1e-4)


@pytest.mark.skipif(import_mamba_ssm()[0] is None, reason="mamba_ssm not importable")
def test_mamba4rec_with_the_real_mamba_streams_through_the_mixer():
    model = perturbed(mamba4rec(2, impl="mamba_ssm"), 0.1)
    assert model.mamba_impl == "mamba_ssm"
    seq, lengths = histories([5, 3], seed=4)
    state = model.init_state(2)
    with torch.no_grad():
        for t in range(5):
            scores, _ = model.step(state, seq[:, t])
        assert_scores_close(scores, model.scores(seq, lengths), 1e-5)


def test_the_circular_filter_refuses_to_stream():
    model = m2rec(1, filter="circular")
    with pytest.raises(ValueError, match="circular"):
        model.init_state(2)
    seq, lengths = histories([MAX_LEN, 3], L=MAX_LEN)
    with pytest.raises(ValueError, match="circular"):
        model.prefill(seq, lengths)
    assert m2rec(1, filter="circular", use_frequency=False).init_state(1).batch_size == 1  # no filter: fine


def test_bad_states_and_items_are_refused():
    model, other = m2rec(1), m2rec(1)
    state = model.init_state(3)
    ok = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="another model"):
        other.step(state, ok)
    with pytest.raises(TypeError, match="StreamState"):
        model.step({"layers": []}, ok)
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(3,\)"):
        model.step(state, torch.tensor([1, 2]))  # a state made for another batch size
    with pytest.raises(ValueError, match=r"ids in \[1, 31\]"):
        model.step(state, torch.tensor([1, 2, 31]))
    with pytest.raises(ValueError, match=r"ids in \[-1, 3\]"):
        model.step(state, torch.tensor([-1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        model.step(state, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="batch_size"):
        model.init_state(0)
    model.double()
    with pytest.raises(ValueError, match="float32 on cpu but the model is now torch.float64"):
        model.step(state, ok)
    if torch.cuda.is_available():
        model.float().cuda()
        with pytest.raises(ValueError, match="on cpu"):
            model.step(state, ok.cuda())


def test_state_layout():
    model = m2rec(2)
    state = model.init_state(3)
    assert isinstance(state, StreamState) and state.batch_size == 3 and state.dtype == torch.float32
    d_inner = 2 * D
    for layer in state.layers:
        assert layer["conv"].shape == (3, d_inner, 4) and layer["conv"].dtype == torch.float32
        assert layer["ssm"].shape == (3, d_inner, 4) and layer["ssm"].dtype == torch.float32
        assert layer["filter"].shape == (3, MAX_LEN, D)
    kv = SASRec(N_ITEMS, d_model=D, max_len=MAX_LEN, n_layers=2, n_heads=2).init_state(3).layers
    assert [tuple(layer["k"].shape) for layer in kv] == [(3, 2, MAX_LEN, D // 2)] * 2


def test_states_made_in_inference_mode_step_outside_it():
    model = perturbed(m2rec(1)).eval()
    seq, lengths = histories([6, 3], seed=5)
    with torch.inference_mode():
        _, state = model.prefill(seq[:, :2], torch.clamp(lengths, max=2))
    scores, _ = model.step(state, seq[:, 2])  # no "inplace update to inference tensor" error
    with torch.no_grad():
        assert_scores_close(scores, prefix_scores(model, seq, torch.tensor([3, 3])), 2e-5)
    fresh = model.init_state(2)
    scores, _ = model.step(fresh, seq[:, 0])
    scores[:, 1] = float("-inf")  # an ordinary tensor: callers may mask seen items in place


def test_readme_serving_snippet_runs_as_printed():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Serving a live user"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {}
    exec(compile(code, "README.md: Serving a live user", "exec"), env)
    assert env["top10"].shape == (2, 10) and env["newcomers"].batch_size == 8
    assert bool(env["state"].seen.eq(torch.tensor([4, 4])).all())


@pytest.mark.parametrize("change", ["optimiser", "load_state_dict", "replace_parameter"])
@pytest.mark.parametrize("name", ["m2rec", "mamba4rec"])
def test_step_caches_follow_weight_changes(name, change):
    """The step's cached tensors (normalised catalogue and semantic table, A, conv taps) are rebuilt
    after the weights change: the next step equals a fresh model with the new weights, in fp64."""
    from m2rec.layers.derived import forget_derived

    model = perturbed(CONFIGS[name]()).double()
    seq, lengths = histories([6, 6, 6], seed=7)
    with torch.no_grad():
        _, state = model.prefill(seq[:, :3], torch.full((3,), 3))
        model.step(state, seq[:, 3])  # fills the caches
        if change == "optimiser":
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            with torch.enable_grad():
                model.loss(seq, lengths, seq[torch.arange(3), lengths - 1], all_positions=False).backward()
            opt.step()
        elif change == "load_state_dict":
            model.load_state_dict(perturbed(CONFIGS[name]()).double().state_dict())
        else:
            model.item_embedding.weight = torch.nn.Parameter(torch.randn_like(model.item_embedding.weight))
        _, state = model.prefill(seq[:, :4], torch.full((3,), 4))
        got, _ = model.step(state, seq[:, 4])
        forget_derived(model)
        for m in model.modules():
            forget_derived(m)
        _, fresh = model.prefill(seq[:, :4], torch.full((3,), 4))
        want, _ = model.step(fresh, seq[:, 4])
    assert torch.equal(got.isnan(), want.isnan())
    assert_scores_close(got, want, 0)
    assert_scores_close(got, prefix_scores(model, seq, torch.full((3,), 5)), 1e-9)


def test_derived_cache_rebuilds_on_in_place_change_and_not_otherwise():
    from m2rec.layers.derived import derived

    module = torch.nn.Linear(3, 2)
    calls = []

    def build():
        calls.append(1)
        return module.weight.sum().item()

    first = derived(module, "s", [module.weight], build)
    assert derived(module, "s", [module.weight], build) == first and len(calls) == 1
    with torch.no_grad():
        module.weight.add_(1.0)
    assert derived(module, "s", [module.weight], build) == pytest.approx(first + 6) and len(calls) == 2
    module.double()
    derived(module, "s", [module.weight], build)
    assert len(calls) == 3


def test_module_tensors_reads_what_getattr_reads():
    """Parameters, a None bias, a buffer, a parametrized weight (a property) and a path through a plain
    attribute: the same objects as getattr."""
    from torch.nn.utils import parametrize

    from m2rec.layers.derived import module_tensors, tensor_paths

    class Scale(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    root = torch.nn.Module()
    root.lin = torch.nn.Linear(3, 2, bias=False)
    root.seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    root.register_buffer("table", torch.randn(4, 2))
    parametrize.register_parametrization(root.seq[0], "weight", Scale())
    root.__dict__["plain"] = torch.nn.Linear(1, 1)  # an attribute, not a registered submodule
    names = ("lin.weight", "lin.bias", "table", "seq.1.bias", "seq.0.bias", "plain.weight")
    got = module_tensors(root, tensor_paths(*names))
    for name, t in zip(names, got):
        obj = root
        for part in name.split("."):
            obj = getattr(obj, part)
        assert t is obj, name
    weight, = module_tensors(root, tensor_paths("seq.0.weight"))  # the parametrization's value
    torch.testing.assert_close(weight, 2 * root.seq[0].parametrizations.weight.original)


def test_float32_step_follows_replaced_parameters():
    """The compiled step's cached inputs (fused Mamba weights, FFN transposes, step table) and the
    parameters it takes as they are: replacing any of them (a new Parameter object) is seen."""
    from m2rec.layers.derived import forget_derived

    model = perturbed(m2rec(1, backend="auto"), 0.1).eval()
    seq, lengths = histories([6, 6, 6], seed=3)
    layer = model.layers[0]
    with torch.inference_mode():
        _, state = model.prefill(seq[:, :3], torch.full((3,), 3))
        model.step(state, seq[:, 3])  # fills the caches
    g = torch.Generator().manual_seed(5)
    for owner, name in ((layer.mamba.in_proj, "weight"), (layer.mamba.conv1d, "bias"), (layer.ffn.w_1, "weight"),
                        (layer.ffn.w_2, "bias"), (layer, "gate_bias"), (model.embedding_norm, "weight")):
        old = getattr(owner, name)
        setattr(owner, name, torch.nn.Parameter(old.detach() + 0.3 * torch.randn(old.shape, generator=g)))
    with torch.inference_mode():
        _, state = model.prefill(seq[:, :4], torch.full((3,), 4))
        got, _ = model.step(state, seq[:, 4])
        for m in model.modules():
            forget_derived(m)
        _, fresh = model.prefill(seq[:, :4], torch.full((3,), 4))
        want, _ = model.step(fresh, seq[:, 4])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert_scores_close(got, prefix_scores(model, seq, torch.full((3,), 5)), 2e-5)


@pytest.mark.parametrize("make", [lambda: m2rec(2, backend="auto"), lambda: mamba4rec(1, backend="auto")],
                         ids=["m2rec", "mamba4rec"])
def test_float32_auto_backend_step_equals_scores(make):
    """The unchecked step path with the compiled CPU state update and ring (where built; else the
    references): item by item, in float32, equal to scores() at every prefix."""
    model = perturbed(make(), 0.1).eval()
    seq, lengths = histories([7, 3, 5], seed=9)
    state = model.init_state(3)
    with torch.inference_mode():
        for t in range(seq.shape[1]):
            scores, _ = model.step(state, seq[:, t])
            assert_scores_close(scores, prefix_scores(model, seq, torch.clamp(lengths, max=t + 1)), 2e-5)
