"""MambaMixer has mamba_ssm.Mamba's full interface: constructor, ``inference_params`` caching, ``step``,
``allocate_inference_cache``; checked inside mamba_ssm's own model code (``create_block``,
``MixerModel``, ``Block(mixer_cls=...)``, ``MambaLMHeadModel.generate``) against the real ``Mamba``.

The real ``Mamba`` runs its reference path here: ``selective_scan_ref`` (the compat shim), no
causal_conv1d, and ``selective_state_update = None`` (its step's PyTorch branch; its Triton kernel is
not what is under test). mamba_ssm's model code runs on CPU with ``rms_norm=False`` and
``fused_add_norm=False``: ``RMSNorm`` and the fused add+norm call the Triton ``layer_norm_fn`` of
``mamba_ssm/ops/triton/layer_norm.py``, which cannot run on CPU tensors outside the interpreter.
``decode`` builds ``torch.cuda.Event`` objects (for its optional timing) even on CPU, which a CPU-only
torch refuses; the generation test swaps in a no-op Event.
"""
import inspect
from functools import partial

import pytest
import torch
import torch.nn as nn

from _tolerance import assert_close

import m2rec
from m2rec.layers import MambaMixer
from m2rec.mamba_ssm_compat import import_mamba_ssm

mamba_ssm, how = import_mamba_ssm()
needs_mamba_ssm = pytest.mark.skipif(mamba_ssm is None, reason=f"mamba_ssm not importable: {how}")

if mamba_ssm is not None:
    import mamba_ssm.models.mixer_seq_simple as mixer_seq_simple
    import mamba_ssm.modules.mamba_simple as mamba_simple
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.modules.block import Block
    from mamba_ssm.utils.generation import InferenceParams


@pytest.fixture
def reference_path(monkeypatch):
    """The real Mamba's PyTorch step (its Triton selective_state_update is not under test)."""
    if mamba_ssm is not None:
        monkeypatch.setattr(mamba_simple, "selective_state_update", None)


def _perturb(module, scale=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


@needs_mamba_ssm
def test_exported_and_same_constructor_signature():
    assert m2rec.MambaMixer is MambaMixer
    real = inspect.signature(mamba_ssm.Mamba.__init__).parameters
    ours = inspect.signature(MambaMixer.__init__).parameters
    assert list(ours) == list(real) + ["backend"]  # same names in the same positional order
    for name, p in real.items():
        assert ours[name].default == p.default, name


OPTIONS = [
    {},
    dict(dt_init="constant", dt_scale=0.5),
    dict(dt_min=0.01, dt_max=0.5, dt_init_floor=0.02, dt_rank=3),
    dict(conv_bias=False, bias=True, use_fast_path=False, layer_idx=4),
    dict(expand=1.5, d_conv=2, dt_scale=2.0),
    dict(dtype=torch.float64),
    dict(dtype=torch.bfloat16, bias=True),
    dict(device="cpu", dtype=torch.float32, layer_idx=0),
]


@needs_mamba_ssm
@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
                                                  for o in OPTIONS])
def test_same_seed_gives_bit_identical_parameters(options):
    kw = dict(d_model=24, d_state=5, **options)
    torch.manual_seed(11)
    real = mamba_ssm.Mamba(**kw)
    torch.manual_seed(11)
    mixer = MambaMixer(**kw)
    real_sd, mix_sd = real.state_dict(), mixer.state_dict()
    assert list(mix_sd) == list(real_sd)
    for name, t in real_sd.items():
        assert mix_sd[name].dtype == t.dtype and mix_sd[name].shape == t.shape, name
        assert torch.equal(mix_sd[name], t), name
    assert getattr(mixer.dt_proj.bias, "_no_reinit", False) and mixer.layer_idx == real.layer_idx


@needs_mamba_ssm
def test_random_stream_is_left_where_mamba_leaves_it():
    torch.manual_seed(5)
    mamba_ssm.Mamba(d_model=16, d_state=3, bias=True)
    after_real = torch.rand(4)
    torch.manual_seed(5)
    MambaMixer(d_model=16, d_state=3, bias=True)
    assert torch.equal(torch.rand(4), after_real)


@pytest.mark.parametrize("kw,match", [
    (dict(dt_init="uniform"), "dt_init"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
    (dict(dt_scale=-1.0), "dt_scale"),
    (dict(conv_bias=1), "conv_bias"),
    (dict(bias="no"), "bias"),
    (dict(use_fast_path=None), "use_fast_path"),
    (dict(layer_idx="0"), "layer_idx"),
    (dict(dtype=torch.int32), "dtype"),
    (dict(dt_rank=0), "dt_rank"),
    (dict(expand=0), "expand"),
])
def test_unsupported_or_bad_options_are_refused(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MambaMixer(16, **kw)


def _models(n_layer=2, d_model=16, vocab=40, ssm_cfg=None, monkeypatch=None, backend="torch"):
    """The same MixerModel twice from one seed: built by mamba_ssm's own create_block, once with the real
    Mamba and once with MambaMixer in its place (patched where create_block looks the class up)."""
    kw = dict(d_model=d_model, n_layer=n_layer, d_intermediate=0, vocab_size=vocab,
              ssm_cfg=dict(d_state=5, d_conv=3, **(ssm_cfg or {})), rms_norm=False, fused_add_norm=False)
    torch.manual_seed(3)
    real = mixer_seq_simple.MixerModel(**kw)
    with monkeypatch.context() as patch:
        patch.setattr(mixer_seq_simple, "Mamba", partial(MambaMixer, backend=backend))
        torch.manual_seed(3)
        ours = mixer_seq_simple.MixerModel(**kw)
    return real, ours


@needs_mamba_ssm
@pytest.mark.parametrize("ssm_cfg", [None, dict(bias=True, conv_bias=False, dt_init="constant")])
def test_inside_mixer_model_same_parameters_outputs_and_gradients(monkeypatch, ssm_cfg):
    real, ours = _models(ssm_cfg=ssm_cfg, monkeypatch=monkeypatch)
    assert all(isinstance(b.mixer, MambaMixer) for b in ours.layers)
    assert [b.mixer.layer_idx for b in ours.layers] == [0, 1]
    for (name, a), (_, b) in zip(real.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name  # _init_weights (rescaled out_proj) saw the same modules
    _perturb(real)
    ours.load_state_dict(real.state_dict())
    ids = torch.randint(0, 40, (3, 13))
    y_real, y_ours = real(ids), ours(ids)
    assert_close(y_ours, y_real, rtol=2e-5, atol=2e-5)
    g = torch.randn_like(y_real)
    y_real.backward(g)
    y_ours.backward(g)
    ours_params = dict(ours.named_parameters())
    for name, p in real.named_parameters():
        assert_close(ours_params[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@needs_mamba_ssm
def test_block_with_mixer_cls_partial():
    torch.manual_seed(1)
    mixer_cls = partial(MambaMixer, d_state=4, layer_idx=0, backend="torch")
    block = Block(12, mixer_cls, nn.Identity, norm_cls=partial(nn.LayerNorm, eps=1e-5))
    real = Block(12, partial(mamba_ssm.Mamba, d_state=4, layer_idx=0), nn.Identity,
                 norm_cls=partial(nn.LayerNorm, eps=1e-5))
    _perturb(block)
    real.load_state_dict(block.state_dict())
    h, r = torch.randn(2, 9, 12), torch.randn(2, 9, 12)
    for a, b in zip(block(h, r), real(h, r)):
        assert_close(a, b, rtol=2e-5, atol=2e-5)


def _decode(model, ids, prompt):
    """Prompt through the whole-sequence path, then one token per call through the cache (what
    mamba_ssm's ``decode`` does); returns the outputs of every position (batch, L, d)."""
    params = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=ids.shape[0])
    outs = [model(ids[:, :prompt], inference_params=params)]
    params.seqlen_offset += prompt
    for t in range(prompt, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    return torch.cat(outs, 1), params


@needs_mamba_ssm
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_by_step_through_inference_params(monkeypatch, reference_path, backend):
    real, ours = _models(monkeypatch=monkeypatch, backend=backend)
    _perturb(real)
    ours.load_state_dict(real.state_dict())
    ids = torch.randint(0, 40, (3, 8))
    # prompts shorter than, and longer than, the conv window (d_conv 3); one under the interpreter
    prompts = (1, 5) if backend == "torch" else (2,)
    with torch.no_grad():
        full = ours(ids)
        for prompt in prompts:
            got, params = _decode(ours, ids, prompt)
            want, real_params = _decode(real, ids, prompt)
            assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert_close(got, full, rtol=1e-4, atol=1e-5)
            for i in (0, 1):  # the cached states themselves agree with mamba_ssm's
                for a, b in zip(params.key_value_memory_dict[i], real_params.key_value_memory_dict[i]):
                    assert_close(a, b, rtol=1e-4, atol=1e-5)


class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass


@needs_mamba_ssm
def test_generate_with_mamba_lm_head_model(monkeypatch, reference_path):
    monkeypatch.setattr(torch.cuda, "Event", _NoOpEvent)
    cfg = dict(d_model=16, n_layer=2, vocab_size=32, ssm_cfg=dict(d_state=4), rms_norm=False,
               residual_in_fp32=False, fused_add_norm=False, pad_vocab_size_multiple=1)
    torch.manual_seed(0)
    real = mixer_seq_simple.MambaLMHeadModel(MambaConfig(**cfg))
    _perturb(real, 0.3)
    ours = mixer_seq_simple.MambaLMHeadModel(MambaConfig(**cfg))
    for block in ours.backbone.layers:
        block.mixer = MambaMixer(16, d_state=4, layer_idx=block.layer_idx, backend="torch")
    ours.load_state_dict(real.state_dict())
    ids = torch.randint(0, 32, (2, 5))
    a = real.generate(ids, max_length=12, top_k=1, output_scores=True, return_dict_in_generate=True)
    b = ours.generate(ids, max_length=12, top_k=1, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        assert_close(sb, sa, rtol=1e-4, atol=1e-5)


@needs_mamba_ssm
def test_allocate_inference_cache_and_step_match_mamba(reference_path):
    torch.manual_seed(2)
    mixer = MambaMixer(12, d_state=4, d_conv=3, bias=True, backend="torch")
    _perturb(mixer)
    real = mamba_ssm.Mamba(12, d_state=4, d_conv=3, bias=True)
    real.load_state_dict(mixer.state_dict())
    for dtype in (None, torch.float64):
        got, want = mixer.allocate_inference_cache(3, 20, dtype=dtype), real.allocate_inference_cache(3, 20, dtype=dtype)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype and not a.any()
    conv, ssm = mixer.allocate_inference_cache(3, 20)
    conv_r, ssm_r = real.allocate_inference_cache(3, 20)
    with torch.no_grad():
        for _ in range(6):
            h = torch.randn(3, 1, 12)
            out, conv2, ssm2 = mixer.step(h, conv, ssm)
            assert conv2 is conv and ssm2 is ssm  # in place, returned as mamba_ssm does
            out_r, _, _ = real.step(h, conv_r, ssm_r)
            assert_close(out, out_r, rtol=1e-5, atol=1e-6)
            assert_close(conv, conv_r)
            assert_close(ssm, ssm_r, rtol=1e-5, atol=1e-6)


class _Params:
    """What MambaMixer reads of mamba_ssm's InferenceParams (duck-typed: mamba_ssm is not needed)."""

    def __init__(self):
        self.seqlen_offset, self.key_value_memory_dict = 0, {}


def test_interface_errors_name_the_problem():
    mixer = MambaMixer(8, d_state=3, backend="torch")
    with pytest.raises(ValueError, match="layer_idx"):
        mixer(torch.randn(1, 4, 8), inference_params=_Params())
    conv, ssm = mixer.allocate_inference_cache(2, 4)
    with pytest.raises(ValueError, match="one token"):
        mixer.step(torch.randn(2, 2, 8), conv, ssm)
    with pytest.raises(ValueError, match="ssm_state"):
        mixer.step(torch.randn(2, 1, 8), conv, ssm[:1])
    with pytest.raises(ValueError, match="conv_state"):
        mixer.step(torch.randn(2, 1, 8), conv[..., :2], ssm)
    with pytest.raises(ValueError, match="hidden_states"):
        mixer(torch.randn(2, 4, 7))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_last_and_prefill_states_per_sequence(backend, device):
    torch.manual_seed(4)
    mixer = MambaMixer(10, d_state=3, d_conv=3, backend=backend, device=device)
    _perturb(mixer)
    h = torch.randn(3, 7, 10, device=device)
    lengths = torch.tensor([7, 2, 5], device=device)
    with torch.no_grad():
        full = mixer(h)
        rows = torch.arange(3, device=device)
        assert_close(mixer.forward_last(h, lengths), full[rows, lengths - 1], rtol=1e-5, atol=1e-6)
        assert_close(mixer.forward_last(h), full[:, -1], rtol=1e-5, atol=1e-6)
        out, conv, ssm = mixer.prefill(h, lengths)
        valid = torch.arange(7, device=device)[None, :] < lengths[:, None]
        assert_close(out[valid], full[valid])  # positions >= length are padding
        # continuing each sequence with step equals running it whole
        nxt = torch.randn(3, 1, 10, device=device)
        stepped = mixer.step(nxt, conv, ssm)[0][:, 0]
        for b in range(3):
            n = int(lengths[b])
            whole = mixer(torch.cat([h[b:b + 1, :n], nxt[b:b + 1]], 1))[0, -1]
            assert_close(stepped[b], whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        mixer.forward_last(h, torch.tensor([7, 0, 5], device=device))
    with pytest.raises(ValueError, match="lengths"):
        mixer.forward_last(h, torch.tensor([8, 1, 5], device=device))


def _mixer_results(mixer, h, lengths):
    """forward output and every gradient, forward_last, and prefill (full and last-only) states."""
    h = h.detach().clone().requires_grad_(True)
    mixer.zero_grad()
    out = mixer(h)
    out.backward(torch.cos(out.detach() * 3))
    grads = [h.grad] + [p.grad for p in mixer.parameters()]
    with torch.no_grad():
        last = mixer.forward_last(h, lengths)
        prefill = mixer.prefill(h, lengths)
        prefill_last = mixer.prefill(h, lengths, last_only=True)
    return [out.detach(), *grads, last, *prefill, *prefill_last]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_time_major_and_channels_first_layouts_agree(monkeypatch, backend):
    """On CPU the mixer keeps its activations time-major; on CUDA channels-first (mamba's layout, the
    one the Triton kernels read). Both give the same outputs, gradients and states: the CUDA layout
    is forced here on CPU tensors."""
    from m2rec_kernels.conv.cpu import cpu_conv_unavailable

    if backend == "cpu" and cpu_conv_unavailable() is not None:
        pytest.skip(cpu_conv_unavailable())
    torch.manual_seed(5)
    mixer = MambaMixer(12, d_state=5, d_conv=4, bias=True, backend=backend)
    _perturb(mixer)
    h, lengths = torch.randn(3, 9, 12), torch.tensor([9, 4, 1])
    time_major = _mixer_results(mixer, h, lengths)
    monkeypatch.setattr(MambaMixer, "_time_major", staticmethod(lambda hidden_states: False))
    channels_first = _mixer_results(mixer, h, lengths)
    for i, (a, b) in enumerate(zip(time_major, channels_first)):
        assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"result {i}: {m}")


def test_last_position_in_batch_slices(monkeypatch):
    """On CPU the last-position path runs the batch in slices of LAST_CHUNK_POSITIONS positions: the
    same results (outputs, states) as in one piece, for slices of 1 and 2 rows and a ragged tail."""
    import m2rec.layers.mamba_mixer as mamba_mixer

    torch.manual_seed(6)
    mixer = MambaMixer(10, d_state=3, d_conv=3)
    _perturb(mixer)
    h, lengths = torch.randn(5, 7, 10), torch.tensor([7, 2, 5, 1, 6])
    with torch.no_grad():
        monkeypatch.setattr(mamba_mixer, "LAST_CHUNK_POSITIONS", 10 ** 9)
        whole = [mixer.forward_last(h, lengths), *mixer.prefill(h, lengths, last_only=True)]
        for rows in (1, 2):
            monkeypatch.setattr(mamba_mixer, "LAST_CHUNK_POSITIONS", rows * 7)
            sliced = [mixer.forward_last(h, lengths), *mixer.prefill(h, lengths, last_only=True)]
            for a, b in zip(sliced, whole):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
