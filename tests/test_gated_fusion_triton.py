"""gated_fusion Triton kernels against the PyTorch reference, forward and backward (DESIGN §5).

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes stay tiny but odd (batch 3, L 37, d 48: 7 tiles of 16 rows, masked columns). The reference
itself is checked against a per-row naive implementation in test_gated_fusion_reference.py.
"""
import os
import sys

import pytest
import torch

from _tolerance import assert_close, magnitude
from m2rec_kernels.fusion import function as fusion_function
from m2rec_kernels.fusion import gated_fusion

sys.path.insert(0, os.path.dirname(__file__))  # shared helpers, also under --import-mode=importlib
from test_gated_fusion_reference import _one_intra_op_thread, BATCH, DIM, LENGTH, check_dropout, make_inputs, naive_gated_fusion

_ = _one_intra_op_thread  # the autouse fixture applies to this module too

NAMES = ("residual", "gate_weight", "gate_bias", "ln_weight", "ln_bias")


def _leaves(args):
    branches, *rest = args
    return [*branches, *rest]


def _run(args, backend, grad_out, grad_gates, **kw):
    """Forward with gates, backward through out and gates; returns out, gates, grads (all leaves)."""
    leaves = _leaves(args)
    for t in leaves:
        t.grad = None
        t.requires_grad_(True)
    out, gates = gated_fusion(*args, eps=1e-5, return_gates=True, backend=backend, **kw)
    grads = torch.autograd.grad((out, gates), leaves, (grad_out, grad_gates))
    return out.detach(), gates.detach(), grads


def _names(k):
    return [f"branches[{i}]" for i in range(k)] + list(NAMES)


@pytest.mark.parametrize("k", [2, 3])
def test_fp32_matches_reference(k, device):
    args = make_inputs(k, device=device)
    grad_out = torch.randn(BATCH, LENGTH, DIM, device=device)
    grad_gates = torch.randn(BATCH, LENGTH, k, device=device)
    out, gates, grads = _run(args, "triton", grad_out, grad_gates)
    ref_out, ref_gates, ref_grads = _run(args, "torch", grad_out, grad_gates)
    assert out.dtype == torch.float32 and gates.shape == (BATCH, LENGTH, k)
    assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    assert_close(gates, ref_gates, rtol=1e-4, atol=1e-5)
    for name, g, r in zip(_names(k), grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert_close(g, r, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 9, 16)])
def test_edge_shapes(shape, device):
    """One row with a 5-wide (masked) row; a power-of-two d with no masked columns."""
    batch, length, d = shape
    args = make_inputs(3, batch=batch, length=length, d=d, device=device)
    grad_out = torch.randn(batch, length, d, device=device)
    grad_gates = torch.zeros(batch, length, 3, device=device)
    out, gates, grads = _run(args, "triton", grad_out, grad_gates)
    ref_out, ref_gates, ref_grads = _run(args, "torch", grad_out, grad_gates)
    assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for name, g, r in zip(_names(3), grads, ref_grads):
        assert_close(g, r, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_backward_with_several_tiles_per_program(monkeypatch, device):
    """On a GPU each backward program loops over several row tiles (partial buffers stay small);
    force that path here: 7 tiles over 2 programs, the last tile of the second program past the end."""
    monkeypatch.setattr(fusion_function, "_programs_for", lambda n_tiles, device: 2)
    args = make_inputs(2, device=device)
    grad_out = torch.randn(BATCH, LENGTH, DIM, device=device)
    grad_gates = torch.randn(BATCH, LENGTH, 2, device=device)
    _, _, grads = _run(args, "triton", grad_out, grad_gates)
    _, _, ref_grads = _run(args, "torch", grad_out, grad_gates)
    for name, g, r in zip(_names(2), grads, ref_grads):
        assert_close(g, r, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def _low_precision_check(k, dtype, device, atol_out, atol_grad):
    """mamba's rule: kernel error <= 2 x (the torch reference's error in the same dtype) + atol,
    both measured against float64 math on the same low-precision inputs."""
    args = make_inputs(k, dtype=dtype, device=device)
    grad_out = torch.randn(BATCH, LENGTH, DIM, device=device).to(dtype)
    grad_gates = torch.randn(BATCH, LENGTH, k, device=device).to(dtype)
    out, gates, grads = _run(args, "triton", grad_out, grad_gates)
    ref_out, ref_gates, ref_grads = _run(args, "torch", grad_out, grad_gates)
    args64 = [[b.double() for b in args[0]], *(t.double() for t in args[1:])]
    true_out, true_gates, true_grads = _run(args64, "torch", grad_out.double(), grad_gates.double())
    assert out.dtype == dtype and gates.dtype == dtype

    def err(a, b):
        return (a.double() - b).abs().max().item()

    pairs = [("out", out, ref_out, true_out, atol_out), ("gates", gates, ref_gates, true_gates, atol_out)]
    pairs += [(f"d{n}", g, r, t, atol_grad) for n, g, r, t in zip(_names(k), grads, ref_grads, true_grads)]
    for name, got, ref, true, atol in pairs:
        assert got.dtype == ref.dtype, name
        assert err(got, true) <= 2 * err(ref, true) + atol * magnitude(true), (name, err(got, true), err(ref, true))


@pytest.mark.parametrize("k", [2, 3])
def test_fp16_error_within_twice_reference_error(k, device):
    _low_precision_check(k, torch.float16, device, atol_out=1e-3, atol_grad=1e-3)


def test_fp32_parameters_with_fp16_activations(device):
    args = make_inputs(3, dtype=torch.float16, param_dtype=torch.float32, device=device)
    grad_out = torch.randn(BATCH, LENGTH, DIM, device=device).half()
    grad_gates = torch.zeros(BATCH, LENGTH, 3, device=device).half()
    out, _, grads = _run(args, "triton", grad_out, grad_gates)
    ref_out, _, ref_grads = _run(args, "torch", grad_out, grad_gates)
    assert out.dtype == torch.float16
    assert_close(out, ref_out, rtol=2e-3, atol=2e-3)
    for name, g, r in zip(_names(3), grads, ref_grads):
        assert g.dtype == r.dtype, name  # fp16 for activations, fp32 for parameters
        assert_close(g.float(), r.float(), rtol=2e-3, atol=2e-3, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_mask_fraction_scaling_and_gradients(dropout_p, device):
    """Mask recovered from the backward's gradients: fraction ~ p, kept values scaled by 1/(1-p),
    forward equal to the naive math replayed with that mask, every gradient too (see check_dropout)."""
    check_dropout("triton", device, dropout_p=dropout_p, k=3)


def test_no_dropout_when_not_training(device):
    args = make_inputs(2, device=device)
    with torch.no_grad():
        plain = gated_fusion(*args, backend="triton")
        off = gated_fusion(*args, dropout_p=0.5, training=False, backend="triton")
        on = gated_fusion(*args, dropout_p=0.5, training=True, seed=5, backend="triton")
    assert_close(off, plain, rtol=0, atol=0)
    assert_close(plain.double(), naive_gated_fusion(*args)[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(on, plain)


def test_seed_none_follows_torch_rng(device):
    args = make_inputs(2, device=device)
    with torch.no_grad():
        torch.manual_seed(11)
        first = gated_fusion(*args, dropout_p=0.3, backend="triton")
        torch.manual_seed(11)
        again = gated_fusion(*args, dropout_p=0.3, backend="triton")
    assert_close(again, first, rtol=0, atol=0)


def test_noncontiguous_inputs(device):
    base = torch.randn(BATCH, DIM, LENGTH, device=device)
    args = make_inputs(2, device=device)
    args = ([base.transpose(1, 2), args[0][1]], *args[1:])  # a strided view as the first branch
    assert not args[0][0].is_contiguous()
    with torch.no_grad():
        out = gated_fusion(*args, backend="triton")
        ref = gated_fusion(*args, backend="torch")
    assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_parameter_gradients_are_deterministic(device):
    args = make_inputs(3, device=device)
    grad_out = torch.randn(BATCH, LENGTH, DIM, device=device)
    grad_gates = torch.zeros(BATCH, LENGTH, 3, device=device)
    _, _, first = _run(args, "triton", grad_out, grad_gates)
    _, _, second = _run(args, "triton", grad_out, grad_gates)
    for name, a, b in zip(_names(3), first, second):
        assert torch.equal(a, b), name


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="interpreter"):
        gated_fusion(*make_inputs(2, batch=1, length=2, d=4), backend="triton")


# ----- GPU only (compiled kernels): bf16, TF32, realistic shapes --------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("k", [2, 3])
def test_bf16_error_within_twice_reference_error(k):
    _low_precision_check(k, torch.bfloat16, torch.device("cuda"), atol_out=1e-2, atol_grad=1e-2)


@pytest.mark.gpu
def test_fp32_exact_while_tf32_enabled():
    """The kernel has no tl.dot (gate logits are row reductions), so it stays fp32-exact even when
    TF32 is allowed for torch matmuls; compare with float64 truth at fp32 tolerance."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        args = make_inputs(3, device=torch.device("cuda"))
        with torch.no_grad():
            out = gated_fusion(*args, backend="triton")
        args64 = [[b.double() for b in args[0]], *(t.double() for t in args[1:])]
        true = gated_fusion(*args64, backend="torch")
        assert_close(out.double(), true, rtol=1e-5, atol=1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.parametrize("k", [2, 3])
def test_model_sized_shapes_match_reference(k):
    """batch 64, L 200, d 64: many tiles per backward program on a GPU."""
    device = torch.device("cuda")
    args = make_inputs(k, batch=64, length=200, d=64, device=device)
    grad_out = torch.randn(64, 200, 64, device=device)
    grad_gates = torch.randn(64, 200, k, device=device)
    out, gates, grads = _run(args, "triton", grad_out, grad_gates)
    ref_out, ref_gates, ref_grads = _run(args, "torch", grad_out, grad_gates)
    assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    assert_close(gates, ref_gates, rtol=1e-4, atol=1e-5)
    for name, g, r in zip(_names(k), grads, ref_grads):
        assert_close(g, r, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"d{n}: {m}")


# ----- compiled code path without a GPU ------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from m2rec_kernels.fusion.kernels import _gated_fusion_bwd_kernel, _gated_fusion_fwd_kernel

def signature(fn, pointers, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in ("eps", "dropout_p", "dropout_scale") else "i32"
    return sig

for dt, k, flag in (("fp16", 3, True), ("bf16", 2, False)):
    act = {n: "*" + dt for n in ("X0", "X1", "X2", "RES", "OUT", "DOUT", "DX0", "DX1", "DX2", "DRES")}
    f32 = {n: "*fp32" for n in ("W", "BG", "LW", "LB", "ALPHA", "MEAN", "RSTD", "DGATES",
                                "DW_PART", "DBG_PART", "DLW_PART", "DLB_PART")}
    f32["SEED"] = "*i64"
    for fn, consts in ((_gated_fusion_fwd_kernel, dict(K=k, HAS_DROPOUT=flag, BLOCK_M=16, BLOCK_D=64)),
                       (_gated_fusion_bwd_kernel, dict(K=k, HAS_DROPOUT=flag, HAS_DGATES=flag,
                                                      BLOCK_M=16, BLOCK_D=64))):
        src = ASTSource(fn, signature(fn, {**act, **f32}, consts), consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        assert "ptx" in compiled.asm, sorted(compiled.asm)
print("compiled")
"""


def test_kernels_compile_for_sm90_without_gpu(tmp_path):
    """The interpreter runs the kernels' Python directly, so it cannot catch code-generation errors;
    compile both kernels for an sm_90 target in a process without TRITON_INTERPRET (no GPU needed)."""
    import subprocess

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
