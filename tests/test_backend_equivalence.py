"""M2RecLayer / M2Rec give the same outputs and gradients with the torch and the Triton backends.

The Triton kernels run under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are tiny: d 16, d_state 4, L <= 20, batch 2, dropout 0. Both filter modes, k = 2 and 3 branches.
The parameters do not depend on the backend, so the torch layer's state_dict is loaded into the Triton
one (and back) — that is part of what is tested.
"""
import pytest
import torch

from _tolerance import assert_close
from m2rec.layers import M2RecLayer
from m2rec.models import M2Rec

D, D_STATE, BATCH = 16, 4, 2
# fp32 everywhere; the Triton kernels accumulate in fp32 like the reference, in another order. Observed
# under the interpreter: outputs within 1e-6, gradients within 5e-6 — the bounds leave ~10x margin.
FWD_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=3e-5)


def _layer_pair(filter_mode, semantic, max_len):
    kw = dict(d_model=D, d_state=D_STATE, d_conv=4, expand=2, max_len=max_len, filter=filter_mode, dropout=0.0,
              semantic=semantic)
    ref = M2RecLayer(**kw, backend="torch")
    with torch.no_grad():  # away from structured initial values (D = 1, LayerNorm 1/0, zero gate bias)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # larger steps (softplus(dt) in ~[0.13, 0.97] instead of [1e-3, 0.1]) so the scan's decay and
        # its delta gradients matter: a small-dt scan is nearly the identity and would hide errors
        ref.mamba.dt_proj.bias.uniform_(-2.0, 0.5)
    tri = M2RecLayer(**kw, backend="triton")
    tri.load_state_dict(ref.state_dict(), strict=True)
    # and back: the Triton layer's state_dict loads into a torch layer unchanged
    back = M2RecLayer(**kw, backend="torch")
    back.load_state_dict(tri.state_dict(), strict=True)
    for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    return ref, tri


@pytest.mark.parametrize("semantic", [False, True], ids=["k2", "k3"])
@pytest.mark.parametrize("filter_mode,L,max_len", [("causal", 13, 20), ("circular", 12, 12)])
def test_m2rec_layer_outputs_and_every_gradient_agree(filter_mode, L, max_len, semantic):
    ref, tri = _layer_pair(filter_mode, semantic, max_len)
    h = torch.randn(BATCH, L, D)
    s = torch.randn(BATCH, L, D) if semantic else None
    inputs_ref = [h.clone().requires_grad_()] + ([s.clone().requires_grad_()] if semantic else [])
    inputs_tri = [h.clone().requires_grad_()] + ([s.clone().requires_grad_()] if semantic else [])

    out_ref, gates_ref = ref(*inputs_ref, return_gates=True)
    out_tri, gates_tri = tri(*inputs_tri, return_gates=True)
    assert_close(out_tri, out_ref, **FWD_TOL)
    assert_close(gates_tri, gates_ref, **FWD_TOL)

    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_tri.backward(grad)
    for name, a, b in zip(("h", "s"), inputs_ref, inputs_tri):
        assert_close(b.grad, a.grad, **GRAD_TOL, msg=lambda m, name=name: f"d{name}: {m}")
    tri_params = dict(tri.named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        assert p.grad is not None, f"torch backend: no gradient for {name}"
        q = tri_params[name].grad
        assert q is not None, f"triton backend: no gradient for {name}"
        assert_close(q, p.grad, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
        checked += 1
    assert checked == len(tri_params)


def test_m2rec_scores_agree_between_backends():
    kw = dict(d_model=D, n_layers=1, max_len=10, d_state=D_STATE, dropout=0.0,
              text_embeddings=torch.randn(21, 8))
    ref = M2Rec(20, **kw, backend="torch").eval()
    tri = M2Rec(20, **kw, backend="triton").eval()
    tri.load_state_dict(ref.state_dict(), strict=True)
    seq = torch.tensor([[3, 7, 1, 9, 12, 5, 0, 0, 0], [4, 4, 18, 2, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([6, 4])
    with torch.no_grad():
        assert_close(tri.scores(seq, lengths), ref.scores(seq, lengths), **FWD_TOL)
