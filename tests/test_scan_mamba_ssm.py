"""Our selective scan against mamba_ssm's own ``selective_scan_ref`` (outputs, last state, gradients).

mamba_ssm is imported through the CPU shim (``m2rec.mamba_ssm_compat``, DESIGN §8); without it these
tests skip and say why.
"""
import pytest
import torch

from _scan_inputs import ODD, clone_inputs, make_scan_inputs, scan_args
from _tolerance import assert_close
from m2rec.mamba_ssm_compat import import_mamba_ssm, selective_scan_ref
from m2rec_kernels import selective_scan

_mamba, _why = import_mamba_ssm()
pytestmark = pytest.mark.skipif(_mamba is None, reason=f"mamba_ssm unavailable: {_why}")

GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


# mamba's reference takes ~2.5 s per backward at these shapes on CPU: gradients on two option sets.
@pytest.mark.parametrize(
    "use_D,use_z,use_bias,softplus,check_grads",
    [(True, True, True, True, True), (False, False, False, False, True), (True, False, True, False, False),
     (False, True, False, True, False)],
)
def test_matches_mamba_reference(use_D, use_z, use_bias, softplus, check_grads):
    _compare_with_mamba(make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus),
                        check_grads)


def _compare_with_mamba(kw, check_grads):
    """Our reference scan against mamba's on the same inputs: outputs, last state and (with
    ``check_grads``) every gradient, each in its input's shape."""
    mamba_ref = selective_scan_ref()
    ours_in, theirs_in = clone_inputs(kw), clone_inputs(kw)
    out, last = selective_scan(**ours_in, return_last_state=True, backend="torch")
    want_out, want_last = mamba_ref(*scan_args(theirs_in), return_last_state=True)
    assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert_close(last, want_last, rtol=1e-5, atol=1e-5)
    if not check_grads:
        return
    g_out, g_last = torch.randn_like(out), torch.randn_like(last)
    torch.autograd.backward((out, last), (g_out, g_last))
    torch.autograd.backward((want_out, want_last), (g_out, g_last))
    for name in GRAD_NAMES:
        if ours_in[name] is not None:
            assert ours_in[name].grad.shape == theirs_in[name].grad.shape, name
            assert_close(ours_in[name].grad, theirs_in[name].grad, rtol=1e-4, atol=1e-4, msg=name)


def test_lengths_match_mamba_on_truncated_sequences():
    """With lengths, each sequence's outputs up to its length and its last state are mamba's on that
    sequence alone (mamba has no lengths argument)."""
    mamba_ref = selective_scan_ref()
    kw = make_scan_inputs(**ODD, use_lengths=True)
    kw["lengths"] = torch.tensor([ODD["L"], 11, 1])
    out, last = selective_scan(**kw, return_last_state=True, backend="torch")
    for b, n in enumerate(kw["lengths"].tolist()):
        alone = {k: (v[b : b + 1, ..., :n] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
        want_out, want_last = mamba_ref(*scan_args(alone), return_last_state=True)
        assert_close(out[b : b + 1, :, :n], want_out, rtol=1e-5, atol=1e-5)
        assert_close(last[b : b + 1], want_last, rtol=1e-5, atol=1e-5)


def test_state_update_matches_mamba_reference():
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    from m2rec_kernels import selective_state_update

    b, d, N = 3, 48, 7
    kw = make_scan_inputs(b, d, 1, N)
    args = (kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])
    extra = dict(D=kw["D"], z=kw["z"][..., 0], dt_bias=kw["delta_bias"], dt_softplus=True)
    state_ours = torch.randn(b, d, N)
    state_theirs = state_ours.clone()
    out = selective_state_update(state_ours, *args, **extra, backend="torch")
    want = selective_state_update_ref(state_theirs, *args, **extra)
    assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert_close(state_ours, state_theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("B_form,C_form,check_grads", [(2, "inv", True), ("inv", 3, True), (48, "seq", False),
                                                       ("inv", "inv", False)],
                         ids=["B2-Cinv", "Binv-C3", "B48-Cseq", "Binv-Cinv"])
def test_bc_forms_match_mamba_reference(B_form, C_form, check_grads):
    """Grouped (batch, G, N, L) and time-invariant (dim, N) B / C, as mamba's reference takes them
    (it repeats a group's row over its dim / G channels): outputs, last state and gradients, dB / dC in
    the inputs' forms."""
    _compare_with_mamba(make_scan_inputs(**ODD, B_form=B_form, C_form=C_form), check_grads)
