"""MambaMixer against the real mamba_ssm.Mamba (imported on CPU through m2rec.mamba_ssm_compat).

Skipped, with the reason, when mamba_ssm cannot be imported (install it as DESIGN §8 says).
"""
import pytest
import torch

from _tolerance import assert_close
from m2rec.layers import MambaMixer
from m2rec.mamba_ssm_compat import import_mamba_ssm

mamba_ssm, how = import_mamba_ssm()
pytestmark = pytest.mark.skipif(mamba_ssm is None, reason=f"mamba_ssm not importable: {how}")

CFG = dict(d_model=24, d_state=5, d_conv=3, expand=2)


def _real_mamba():
    # use_fast_path=False: the fused path needs causal_conv1d's CUDA kernels
    return mamba_ssm.Mamba(**CFG, use_fast_path=False)


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _compare(real, mixer, h):
    """Forward outputs and every parameter gradient agree."""
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    y_real, y_mix = real(h1), mixer(h2)
    assert_close(y_mix, y_real, rtol=2e-5, atol=2e-5)
    g = torch.randn_like(y_real)
    y_real.backward(g)
    y_mix.backward(g)
    assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-4)
    real_params = dict(real.named_parameters())
    for name, p in mixer.named_parameters():
        assert_close(p.grad, real_params[name].grad, rtol=1e-4, atol=1e-4, msg=name)


def test_mixer_loads_mamba_state_dict_and_matches_forward_and_backward():
    real = _real_mamba()
    _perturb(real)  # no structured values (D = 1, ...) that could hide a wiring error
    mixer = MambaMixer(**CFG, backend="torch")
    mixer.load_state_dict(real.state_dict(), strict=True)
    _compare(real, mixer, torch.randn(3, 11, CFG["d_model"]))


def test_mamba_loads_mixer_state_dict():
    mixer = MambaMixer(**CFG, backend="torch")
    _perturb(mixer)
    real = _real_mamba()
    real.load_state_dict(mixer.state_dict(), strict=True)
    _compare(real, mixer, torch.randn(2, 9, CFG["d_model"]))


def test_same_parameters_and_initialisation():
    real_sd = _real_mamba().state_dict()
    mix_sd = MambaMixer(**CFG).state_dict()
    assert list(mix_sd) == list(real_sd)
    for name, t in real_sd.items():
        assert mix_sd[name].shape == t.shape and mix_sd[name].dtype == t.dtype, name
    # Same distributions, drawn in the same order: the same seed gives identical parameters.
    torch.manual_seed(123)
    real_sd = _real_mamba().state_dict()
    torch.manual_seed(123)
    mix_sd = MambaMixer(**CFG).state_dict()
    for name, t in real_sd.items():
        assert_close(mix_sd[name], t, rtol=0, atol=0, msg=name)
    # and other settings of dt_min/dt_max/dt_init_floor/dt_rank are honoured the same way
    kw = dict(dt_min=0.01, dt_max=0.5, dt_init_floor=0.02, dt_rank=3)
    torch.manual_seed(7)
    real_sd = mamba_ssm.Mamba(**CFG, **kw, use_fast_path=False).state_dict()
    torch.manual_seed(7)
    mix_sd = MambaMixer(**CFG, **kw).state_dict()
    for name, t in real_sd.items():
        assert_close(mix_sd[name], t, rtol=0, atol=0, msg=name)


def test_mamba4rec_gives_the_same_results_with_either_implementation():
    from m2rec.models import Mamba4Rec

    torch.manual_seed(3)
    mix = Mamba4Rec(30, d_model=16, d_state=4, max_len=12, dropout=0.0, impl="mixer", backend="torch").eval()
    real = Mamba4Rec(30, d_model=16, d_state=4, max_len=12, dropout=0.0, impl="mamba_ssm").eval()
    real.load_state_dict(mix.state_dict())
    assert mix.mamba_impl == "mixer" and real.mamba_impl == "mamba_ssm"
    seq = torch.randint(1, 31, (2, 12))
    seq[1, 7:] = 0
    lengths = torch.tensor([12, 7])
    assert_close(real.scores(seq, lengths), mix.scores(seq, lengths), rtol=1e-5, atol=1e-5)
    # the real Mamba trains the shared parameters
    real.train()
    real.loss(seq, lengths, torch.tensor([3, 4]), all_positions=False).backward()
    assert real.layers[0].mamba.in_proj.weight.grad is not None
