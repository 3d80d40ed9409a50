"""Triton selective scan and state update against the PyTorch reference, forward and backward.

On CPU the kernels run under the Triton interpreter (tests/conftest.py), which costs a few ms per
program per time step: shapes are the odd ones (batch 3, dim 48, L 37, N 7) with one or two channel
blocks. The checkpoint spacing at L = 37 is 8 steps, so the backward crosses four chunk edges and
ends on a partial chunk.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _scan_inputs import ODD, clone_inputs, make_scan_inputs
from _tolerance import assert_close, magnitude
from m2rec_kernels import selective_scan, selective_state_update
from m2rec_kernels.scan import function as scan_function

GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
FP32_TOL = dict(rtol=1e-4, atol=1e-4)  # tighter than mamba's scan tests (6e-4, 2e-3)


def _run(kw, backend, grad_out=None, grad_last=None, dtype=None):
    """Forward (out, last) and, when grads are given, the input grads, on fresh leaves."""
    inputs = clone_inputs(kw, dtype=dtype)
    out, last = selective_scan(**inputs, return_last_state=True, backend=backend)
    grads = {}
    if grad_out is not None or grad_last is not None:
        outs = [t for t, g in ((out, grad_out), (last, grad_last)) if g is not None]
        gs = [g.to(t.dtype) for t, g in ((out, grad_out), (last, grad_last)) if g is not None]
        torch.autograd.backward(outs, gs)
        # an input the loss does not reach (z, D when only the last state is used) has grad None
        # under autograd and zeros from the kernel: compare both as zeros
        grads = {
            n: torch.zeros_like(inputs[n]) if inputs[n].grad is None else inputs[n].grad
            for n in GRAD_NAMES
            if inputs[n] is not None
        }
    return out.detach(), last.detach(), grads


def _assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert_close(got[name], want[name], **tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize(
    "use_D,use_z,use_bias,softplus,use_lengths,grad_through",
    [
        (True, True, True, True, True, "both"),  # everything fused, gradient through the last state too
        (False, False, False, False, False, "out"),  # the bare recurrence
        (True, False, True, True, True, "out"),
        (False, True, False, False, True, "last"),  # only the last state is used (dout is None)
    ],
    ids=["all", "bare", "D-bias-softplus-lengths", "z-lengths-last-only"],
)
def test_fp32_matches_reference(device, use_D, use_z, use_bias, softplus, use_lengths, grad_through):
    kw = make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus,
                          use_lengths=use_lengths, device=device)
    g = torch.Generator().manual_seed(1)
    shape_out, shape_last = kw["u"].shape, (ODD["batch"], ODD["dim"], ODD["N"])
    grad_out = torch.randn(shape_out, generator=g).to(device) if grad_through in ("out", "both") else None
    grad_last = torch.randn(shape_last, generator=g).to(device) if grad_through in ("last", "both") else None
    out, last, grads = _run(kw, "triton", grad_out, grad_last)
    want_out, want_last, want_grads = _run(kw, "torch", grad_out, grad_last)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert_close(out, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    _assert_grads_close(grads, want_grads, **FP32_TOL)


def test_several_channel_blocks(monkeypatch, device):
    """Two channel blocks (32 + a masked 16): dB/dC are summed over blocks, dA/dD/d(delta_bias) over
    the batch, from per-program partial buffers."""
    if device.type == "cpu":
        monkeypatch.setattr(scan_function, "INTERPRETER_BLOCK_D", 32)
    kw = make_scan_inputs(**ODD, use_lengths=True, device=device)
    grad_out = torch.randn(kw["u"].shape, device=device)
    grad_last = torch.randn(ODD["batch"], ODD["dim"], ODD["N"], device=device)
    out, last, grads = _run(kw, "triton", grad_out, grad_last)
    want_out, want_last, want_grads = _run(kw, "torch", grad_out, grad_last)
    assert_close(out, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    _assert_grads_close(grads, want_grads, **FP32_TOL)


@pytest.mark.parametrize(
    "batch,dim,L,N",
    [(2, 5, 16, 1), (1, 3, 5, 3), (2, 70, 9, 16)],
    ids=["N1-two-full-chunks", "shorter-than-a-chunk", "dim-over-a-block"],
)
def test_edge_shapes(device, batch, dim, L, N):
    kw = make_scan_inputs(batch, dim, L, N, use_lengths=True, device=device)
    grad_out = torch.randn(batch, dim, L, device=device)
    grad_last = torch.randn(batch, dim, N, device=device)
    out, last, grads = _run(kw, "triton", grad_out, grad_last)
    want_out, want_last, want_grads = _run(kw, "torch", grad_out, grad_last)
    assert_close(out, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    _assert_grads_close(grads, want_grads, **FP32_TOL)


def test_gradient_for_a_subset_of_inputs(device):
    """Only u and delta require grad (A, B, C frozen); strided z and dout (model-like views)."""
    kw = make_scan_inputs(**ODD, device=device)
    kw["z"] = torch.randn(ODD["batch"], 2 * ODD["dim"], ODD["L"], device=device)[:, ODD["dim"]:]
    results = []
    for backend in ("triton", "torch"):
        u = kw["u"].clone().requires_grad_()
        delta = kw["delta"].clone().requires_grad_()
        out = selective_scan(**dict(kw, u=u, delta=delta), backend=backend)
        out.transpose(1, 2).contiguous().transpose(1, 2).sum().backward()
        results.append((out.detach(), u.grad, delta.grad))
    for got, want in zip(*results):
        assert_close(got, want, **FP32_TOL)


def test_forward_only_without_last_state(device):
    kw = make_scan_inputs(**ODD, use_lengths=True, device=device)
    with torch.no_grad():
        out = selective_scan(**kw, backend="triton")
        want = selective_scan(**kw, backend="torch")
    assert_close(out, want, **FP32_TOL)


def _assert_grads_close_to_fp64(kw, got, grad_out, grad_last):
    """fp32 gradients against an fp64 run, within 1e-5 of each gradient's largest value (+ FP32
    atol): the tolerance follows the magnitude of the values. For gradients whose terms cancel: with
    the gradient only through the last state, dΔ at some steps sums terms Σ_n |dh·(u·B + A·decay·h)|
    10³ times larger than the result, so two fp32 summation orders (the reference's and the
    kernel's) differ there by more than a uniform 1e-4, while both stay within ~1e-6 of the scale."""
    exact = clone_inputs(kw, requires_grad=False, dtype=torch.float64)
    exact["A"] = exact["A"].double()
    truth = _run(exact, "torch", None if grad_out is None else grad_out.double(),
                 None if grad_last is None else grad_last.double())[2]
    assert got.keys() == truth.keys()
    for name in truth:
        err, scale = _max_err(got[name], truth[name]), truth[name].abs().max().item()
        assert err <= 1e-5 * scale + FP32_TOL["atol"], f"grad of {name}: error {err:.3g} at scale {scale:.3g}"


def _max_err(got, truth):
    return (got.double() - truth.double()).abs().max().item()


def _low_precision_rule(dtype, device, atol):
    """mamba's rule: the kernel's error against fp64 is at most twice the error of the PyTorch
    reference run on the same low-precision inputs, plus atol — for the output, last state, grads."""
    kw = make_scan_inputs(**ODD, use_lengths=True, device=device)
    lp = clone_inputs(kw, requires_grad=False, dtype=dtype)  # the values everyone sees
    exact = clone_inputs(lp, requires_grad=False, dtype=torch.float64)
    exact["A"] = exact["A"].double()
    grad_out = torch.randn(kw["u"].shape, device=device).to(dtype)
    grad_last = torch.randn(ODD["batch"], ODD["dim"], ODD["N"], device=device)

    truth = _run(exact, "torch", grad_out.double(), grad_last.double())
    ref = _run(lp, "torch", grad_out, grad_last)
    tri = _run(lp, "triton", grad_out, grad_last)
    assert tri[0].dtype == dtype and tri[1].dtype == torch.float32
    for name, got, base, true in [("out", tri[0], ref[0], truth[0]), ("last", tri[1], ref[1], truth[1])] + [
        (f"grad {n}", tri[2][n], ref[2][n], truth[2][n]) for n in GRAD_NAMES
    ]:
        assert got.dtype == base.dtype, name
        err, ref_err = _max_err(got, true), _max_err(base, true)
        assert err <= 2 * ref_err + atol * magnitude(true), f"{name}: error {err:.3g} vs reference {ref_err:.3g}"


def test_fp16_within_twice_the_reference_error(device):
    _low_precision_rule(torch.float16, device, atol=1e-3)


@pytest.mark.gpu
def test_bf16_within_twice_the_reference_error(device):
    _low_precision_rule(torch.bfloat16, device, atol=1e-2)


@pytest.mark.gpu
def test_fp32_exact_even_with_tf32_enabled(device):
    """The scan has no tl.dot: enabling TF32 for torch matmuls must not change the kernel's fp32
    accuracy against an fp64 reference (the reference is run in fp64, where TF32 never applies)."""
    kw = make_scan_inputs(**ODD, use_lengths=True, device=device)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out, last, _ = _run(kw, "triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    exact = clone_inputs(kw, requires_grad=False, dtype=torch.float64)
    exact["A"] = exact["A"].double()
    want_out, want_last, _ = _run(exact, "torch")
    assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    assert_close(last.double(), want_last, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_backward_is_deterministic_when_asked(device):
    """Under torch.use_deterministic_algorithms the sequential backward runs: bitwise repeatable.
    (The time-parallel backward adds dB and dC with atomics: equal up to rounding.)"""
    kw = make_scan_inputs(4, 256, 64, 16, use_lengths=True, device=device)
    grad_out = torch.randn(kw["u"].shape, device=device)
    torch.use_deterministic_algorithms(True)
    try:
        first = _run(kw, "triton", grad_out)[2]
        second = _run(kw, "triton", grad_out)[2]
    finally:
        torch.use_deterministic_algorithms(False)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    third = _run(kw, "triton", grad_out)[2]
    for name in first:
        assert_close(third[name], first[name], **FP32_TOL)


def test_float64_is_refused_by_the_triton_backend(device):
    kw = make_scan_inputs(2, 4, 3, 2, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        selective_scan(**kw, backend="triton")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_opts", [True, False], ids=["D-z-bias-softplus", "bare"])
def test_state_update_kernel_matches_reference(device, state_dtype, use_opts):
    b, d, N = ODD["batch"], ODD["dim"], ODD["N"]
    kw = make_scan_inputs(b, d, 1, N, use_D=use_opts, use_z=use_opts, use_bias=use_opts, softplus=use_opts,
                          device=device)
    args = (kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])
    extra = dict(D=kw["D"], z=None if kw["z"] is None else kw["z"][..., 0], dt_bias=kw["delta_bias"],
                 dt_softplus=use_opts)
    state = torch.randn(b, d, N, device=device).to(state_dtype)
    want_state = state.clone()
    out = selective_state_update(state, *args, **extra, backend="triton")
    want = selective_state_update(want_state, *args, **extra, backend="torch")
    tol = FP32_TOL if state_dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    assert_close(out, want, **tol)
    assert_close(state, want_state, **tol)


def test_state_update_kernel_on_a_strided_state_updates_it_in_place(device):
    b, d, N = 2, 5, 3
    kw = make_scan_inputs(b, d, 1, N, device=device)
    args = (kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])
    storage = torch.randn(b, N, d, device=device)
    state = storage.transpose(1, 2)  # (b, d, N), not contiguous
    want_state = state.clone()
    out = selective_state_update(state, *args, D=kw["D"], dt_softplus=True, backend="triton")
    want = selective_state_update(want_state, *args, D=kw["D"], dt_softplus=True, backend="torch")
    assert_close(out, want, **FP32_TOL)
    assert_close(storage.transpose(1, 2), want_state, **FP32_TOL)


def test_state_update_kernel_steps_reproduce_the_triton_scan(device):
    """The two Triton kernels agree with each other: L one-step updates = one scan (out and state)."""
    b, d, L, N = 2, ODD["dim"], 5, ODD["N"]
    kw = make_scan_inputs(b, d, L, N, device=device)
    with torch.no_grad():
        out, last = selective_scan(**kw, return_last_state=True, backend="triton")
    state = torch.zeros(b, d, N, device=device)
    steps = [
        selective_state_update(state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t],
                               kw["C"][..., t], D=kw["D"], z=kw["z"][..., t], dt_bias=kw["delta_bias"],
                               dt_softplus=True, backend="triton")
        for t in range(L)
    ]
    assert_close(torch.stack(steps, dim=-1), out, **FP32_TOL)
    assert_close(state, last, **FP32_TOL)


def test_state_update_kernel_refuses_inputs_that_need_grad(device):
    kw = make_scan_inputs(2, 4, 1, 3, device=device)
    x = kw["u"][..., 0].clone().requires_grad_()
    with pytest.raises(ValueError, match="inference-only"):
        selective_state_update(torch.zeros(2, 4, 3, device=device), x, kw["delta"][..., 0], kw["A"],
                               kw["B"][..., 0], kw["C"][..., 0], backend="triton")


# Compiles (does not run) the kernels for an sm_90 GPU in a fresh interpreter without
# TRITON_INTERPRET: the interpreter executes the Python directly and cannot catch what only the
# compiler rejects (loop-carried type changes, layouts, unsupported ops). Uses the block sizes and
# warp counts the host picks for the model's N = 32; the sequential kernels with every form of B / C
# (the time-parallel ones are compiled by bench.kernel_stats, tests/test_kernel_stats.py).
_COMPILE_SM90 = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from m2rec_kernels.scan import kernels as K

    target = GPUTarget("cuda", 90, 32)

    def build(fn, ptr_types, scalars, consts, num_warps):
        sig = {n: "constexpr" if n in consts else ptr_types.get(n) or scalars[n] for n in fn.arg_names}
        triton.compile(ASTSource(fn, sig, consts), target=target, options=dict(num_warps=num_warps))

    for dt in ("fp32", "bf16"):
        io = {n: "*" + dt for n in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "D_ptr", "z_ptr", "bias_ptr",
                                    "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr",
                                    "x_ptr", "dt_ptr", "state_ptr")}
        io["lengths_ptr"] = io["idx_ptr"] = "*i64"
        f32 = {n: "*fp32" for n in ("A_ptr", "last_ptr", "ckpt_ptr", "dlast_ptr", "scratch_ptr", "dA_part_ptr",
                                    "dB_part_ptr", "dC_part_ptr", "dD_part_ptr", "dbias_part_ptr")}
        ptrs = dict(io, **f32)
        ints = dict.fromkeys(("batch", "dim", "L", "N", "n_chunks", "s_B_b", "s_B_g", "s_C_b", "s_C_g",
                              "B_group_size", "C_group_size"), "i32")
        flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
        # B / C per sequence (0), grouped (1), time-invariant (2): every form as B and as C (fp32)
        for B_FORM, C_FORM in ((0, 0), (1, 2), (2, 1)) if dt == "fp32" else ((0, 0),):
            forms = dict(B_FORM=B_FORM, C_FORM=C_FORM)
            build(K.selective_scan_fwd_kernel, ptrs, ints,
                  dict(flags, HAS_LENGTHS=True, STORE_LAST=True, STORE_CKPT=True, CHUNK=16, BLOCK_D=32, BLOCK_N=32,
                       **forms), 4)
            build(K.selective_scan_bwd_kernel, ptrs, ints,
                  dict(flags, HAS_LENGTHS=True, HAS_DLAST=True, CHUNK=16, BLOCK_D=8, BLOCK_N=32, **forms), 2)
        build(K.selective_state_update_kernel, ptrs, ints, dict(flags, HAS_INDICES=True, BLOCK_D=64, BLOCK_N=32), 4)
    print("compiled")
    """
)


def test_kernels_compile_for_sm90(tmp_path):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the triton build
        pytest.skip(f"triton has no CUDA backend to compile with: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, whatever an earlier run cached
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# --------------------------------------------------------------------------------------------------
# Kernel choice and the time-parallel kernels' own paths (tiles, alignment, final mode)
# --------------------------------------------------------------------------------------------------

def _picks(monkeypatch, parallel: bool):
    """Make the shape rule pick the time-parallel (or the sequential) kernel for the test shapes,
    and check that it did."""
    if parallel:
        monkeypatch.setattr(scan_function, "SEQUENTIAL_MAX_L", 0)
    else:
        monkeypatch.setattr(scan_function, "SEQUENTIAL_MAX_L", 10**9)
        monkeypatch.setattr(scan_function, "SEQUENTIAL_MIN_CHANNELS", 0)
    calls = {"parallel": 0, "sequential": 0}
    for name, kind in (("_parallel_forward", "parallel"), ("_sequential_forward", "sequential")):
        real = getattr(scan_function, name)

        def spy(*a, _real=real, _kind=kind, **k):
            calls[_kind] += 1
            return _real(*a, **k)
        monkeypatch.setattr(scan_function, name, spy)
    return calls


def test_shape_rule():
    rule = scan_function.use_time_parallel
    assert rule(64, 128, 200) and rule(1, 128, 2000) and rule(64, 128, 2000)
    assert not rule(64, 128, 32) and not rule(64, 128, 16)  # short and wide: sequential
    assert rule(1, 128, 16)  # short but narrow: the parallel kernel spreads the channels
    torch.use_deterministic_algorithms(True)
    try:
        assert not rule(64, 128, 200, needs_grad=True) and rule(64, 128, 200, needs_grad=False)
    finally:
        torch.use_deterministic_algorithms(False)


def test_gpu_tile_rule():
    """Tiles of up to 512 steps on one warp (16 steps per thread; L 200: one tile of 256, 8 per
    thread), the same for the forward and the backward, which restarts from the forward's tiles."""
    cfg, steps = scan_function.parallel_config_gpu, scan_function.thread_steps
    assert cfg(200) == (256, 1, 1) and steps(256, 1) == 8
    assert cfg(2000) == (512, 1, 1) and steps(512, 1) == 16
    assert cfg(512) == (512, 1, 1) and cfg(513) == (512, 1, 1) and cfg(5) == (16, 1, 1)
    assert steps(16, 1) == 4 and steps(2048, 4) == 16  # at least 4 (the atomics' vectors), at most 16
    anchor = scan_function._layout_anchor(torch.device("cpu"), 4096)
    assert anchor.dtype == torch.int8 and anchor.numel() >= 4096 and not anchor.any()


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_each_kernel_matches_reference(monkeypatch, device, parallel):
    calls = _picks(monkeypatch, parallel)
    kw = make_scan_inputs(**ODD, use_lengths=True, device=device)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(kw["u"].shape, generator=g).to(device)
    grad_last = torch.randn(ODD["batch"], ODD["dim"], ODD["N"], generator=g).to(device)
    out, last, grads = _run(kw, "triton", grad_out, grad_last)
    assert calls["parallel" if parallel else "sequential"] == 1 and calls["sequential" if parallel else "parallel"] == 0
    want_out, want_last, want_grads = _run(kw, "torch", grad_out, grad_last)
    assert_close(out, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    _assert_grads_close(grads, want_grads, **FP32_TOL)


@pytest.mark.parametrize(
    "use_D,use_z,use_bias,softplus,grad_through",
    [(True, True, True, True, "both"), (False, False, False, False, "out"), (True, False, True, False, "last")],
    ids=["all", "bare", "D-bias-no-softplus-last-only"],
)
def test_parallel_across_time_tiles(monkeypatch, device, use_D, use_z, use_bias, softplus, grad_through):
    """Tiles of 16 steps at L = 37 (three tiles, the last partial): the state carried forward
    between tiles, the checkpoints and the dh carried backward; lengths 37, 12 and 0."""
    calls = _picks(monkeypatch, parallel=True)
    if device.type == "cpu":
        monkeypatch.setattr(scan_function, "MAX_TILE", 16)
        monkeypatch.setattr(scan_function, "INTERPRETER_BLOCK_D", 32)  # two channel blocks, one masked
    kw = make_scan_inputs(**ODD, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus,
                          use_lengths=True, device=device)
    g = torch.Generator().manual_seed(4)
    grad_out = torch.randn(kw["u"].shape, generator=g).to(device) if grad_through in ("out", "both") else None
    grad_last = (torch.randn(ODD["batch"], ODD["dim"], ODD["N"], generator=g).to(device)
                 if grad_through in ("last", "both") else None)
    out, last, grads = _run(kw, "triton", grad_out, grad_last)
    assert calls["parallel"] == 1
    want_out, want_last, want_grads = _run(kw, "torch", grad_out, grad_last)
    assert_close(out, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    _assert_grads_close_to_fp64(kw, grads, grad_out, grad_last)
    for name, want in want_grads.items():
        assert grads[name].dtype == want.dtype, name


@pytest.mark.parametrize("flip_by_gather", [False, True], ids=["native-reverse", "gather-flip"])
@pytest.mark.parametrize("steps", [4, 8, 16])
def test_parallel_backward_thread_steps_and_reverse_forms(monkeypatch, device, steps, flip_by_gather):
    """The backward's reshapes written for THREAD_STEPS consecutive steps per thread (the one-step
    shift of the decay, the dB/dC atomics, the gathered flip of the reverse scan) at 4, 8 and 16,
    with both forms of the reverse scan, across tiles of 32 steps (L 37: two tiles, lengths 37, 12
    and 0), every option, gradients through the output and the last state."""
    calls = _picks(monkeypatch, parallel=True)
    monkeypatch.setattr(scan_function, "FLIP_BY_GATHER", flip_by_gather)
    if device.type == "cpu":
        monkeypatch.setattr(scan_function, "MAX_TILE", 32)
        monkeypatch.setattr(scan_function, "thread_steps", lambda tile, num_warps: steps)
    kw = make_scan_inputs(**ODD, use_lengths=True, device=device)
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(kw["u"].shape, generator=g).to(device)
    grad_last = torch.randn(ODD["batch"], ODD["dim"], ODD["N"], generator=g).to(device)
    out, last, grads = _run(kw, "triton", grad_out, grad_last)
    assert calls["parallel"] == 1
    want_out, want_last, want_grads = _run(kw, "torch", grad_out, grad_last)
    assert_close(out, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    _assert_grads_close_to_fp64(kw, grads, grad_out, grad_last)


def test_parallel_result_does_not_depend_on_the_layout_anchor(monkeypatch, device):
    """The layout anchor's load is masked off: a buffer of non-zeros (say, memory reused after a
    CUDA graph) changes nothing."""
    _picks(monkeypatch, parallel=True)
    monkeypatch.setattr(scan_function, "_layout_anchor",
                        lambda dev, tile: torch.full((max(tile, 2048),), 7, device=dev, dtype=torch.int8))
    kw = make_scan_inputs(**ODD, use_lengths=True, device=device)
    grad_out = torch.randn(kw["u"].shape, generator=torch.Generator().manual_seed(6)).to(device)
    out, last, grads = _run(kw, "triton", grad_out)
    want_out, want_last, want_grads = _run(kw, "torch", grad_out)
    assert_close(out, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    _assert_grads_close(grads, want_grads, **FP32_TOL)


def test_parallel_vectorised_rows_and_strided_inputs(monkeypatch, device):
    """L = 40 (rows 16-byte aligned: ALIGN 4 for fp32) with z and u as views of a wider tensor,
    as the model passes them, and a strided dout."""
    _picks(monkeypatch, parallel=True)
    b, d, L, N = 2, 12, 40, 5
    kw = make_scan_inputs(b, d, L, N, use_lengths=True, device=device)
    assert scan_function._alignment(L, torch.float32, d * L, L, 2 * d * L, N * L) == 4
    wide = torch.randn(b, 2 * d, L, device=device)
    kw["z"] = wide[:, d:]
    u_wide = torch.randn(b, 2 * d, L, device=device)
    u_wide[:, :d] = kw["u"]
    results = []
    for backend in ("triton", "torch"):
        u = u_wide.clone().requires_grad_()
        delta = kw["delta"].clone().requires_grad_()
        B = kw["B"].clone().requires_grad_()
        out = selective_scan(**dict(kw, u=u[:, :d], delta=delta, B=B), backend=backend)
        out.transpose(1, 2).contiguous().transpose(1, 2).sum().backward()
        results.append((out.detach(), u.grad, delta.grad, B.grad))
    for got, want in zip(*results):
        assert_close(got, want, **FP32_TOL)


def test_parallel_fp16_within_twice_the_reference_error(monkeypatch, device):
    _picks(monkeypatch, parallel=True)
    if device.type == "cpu":
        monkeypatch.setattr(scan_function, "MAX_TILE", 16)
    _low_precision_rule(torch.float16, device, atol=1e-3)


@pytest.mark.parametrize("tile", [16, 64], ids=["three-tiles", "one-tile"])
def test_final_mode_stores_only_the_last_step(monkeypatch, device, tile):
    """selective_scan_final without gradients: the output-free kernel mode against the reference."""
    from m2rec_kernels import selective_scan_final

    calls = _picks(monkeypatch, parallel=True)
    if device.type == "cpu":
        monkeypatch.setattr(scan_function, "MAX_TILE", tile)
    kw = make_scan_inputs(**ODD, use_lengths=True, device=device)
    kw["lengths"] = torch.tensor([ODD["L"], 12, 1], device=device)
    seen = {}
    real = scan_function._parallel_forward

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)
    monkeypatch.setattr(scan_function, "_parallel_forward", spy)
    with torch.no_grad():
        out_last, last = selective_scan_final(**kw, backend="triton")
        want_out, want_last = selective_scan_final(**kw, backend="torch")
    assert seen["store_out"] is False and seen["last_out"] is True
    assert_close(out_last, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    # with gradients the whole scan runs (differentiable) and the last steps are gathered
    inputs = clone_inputs(kw)
    out_last, last = selective_scan_final(**inputs, backend="triton")
    (out_last.sum() + last.sum()).backward()
    assert inputs["u"].grad is not None and calls["parallel"] >= 2


def test_deterministic_algorithms_run_the_sequential_backward(monkeypatch, device):
    calls = _picks(monkeypatch, parallel=True)
    kw = make_scan_inputs(2, 8, 20, 3, device=device)
    torch.use_deterministic_algorithms(True)
    try:
        out, last, grads = _run(kw, "triton", torch.ones(2, 8, 20, device=device))
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls == {"parallel": 0, "sequential": 1}
    want = _run(kw, "torch", torch.ones(2, 8, 20, device=device))
    _assert_grads_close(grads, want[2], **FP32_TOL)


# --------------------------------------------------------------------------------------------------
# B and C grouped (batch, G, N, L) and time-invariant (dim, N) (m2rec_kernels/scan/bc_forms.py)
# --------------------------------------------------------------------------------------------------

def test_shape_rule_with_bc_forms():
    """The sequential kernels' share at short L is for per-sequence B and C only; under deterministic
    algorithms every form runs sequential."""
    rule = scan_function.use_time_parallel
    seq, grouped, inv = torch.empty(64, 32, 16), torch.empty(64, 4, 32, 16), torch.empty(128, 32)
    assert not rule(64, 128, 16, bcs=(seq, seq))
    assert rule(64, 128, 16, bcs=(grouped, seq)) and rule(64, 128, 16, bcs=(seq, inv))
    torch.use_deterministic_algorithms(True)
    try:
        assert not rule(64, 128, 200, needs_grad=True, bcs=(grouped, inv))
    finally:
        torch.use_deterministic_algorithms(False)
    # the sequential blocks shrink to lie in one group of every grouped B / C
    fit = scan_function._fit_groups
    assert fit(32, 128, grouped, seq) == 32 and fit(32, 48, torch.empty(2, 3, 4, 5), inv) == 16
    assert fit(8, 48, torch.empty(2, 48, 4, 5), torch.empty(2, 2, 4, 5)) == 1 and fit(64, 12, inv, seq) == 64


# Small odd shapes for the form tests under the interpreter (lengths 21, 7 and 0).
BC_SHAPE = dict(batch=3, dim=12, L=21, N=5)


def _bc_case(B_form, C_form, device, use_lengths=True, **opts):
    kw = make_scan_inputs(**BC_SHAPE, use_lengths=use_lengths, device=device, B_form=B_form, C_form=C_form, **opts)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(kw["u"].shape, generator=g).to(device)
    grad_last = torch.randn(BC_SHAPE["batch"], BC_SHAPE["dim"], BC_SHAPE["N"], generator=g).to(device)
    return kw, grad_out, grad_last


def _assert_bc_grads(kw, grads, want_grads, grad_out=None, grad_last=None, fp64=False):
    """Gradients against the fp32 reference's (dB / dC in their inputs' forms), and with ``fp64``
    against a float64 run. The time-parallel backward forms decay·h_{t-1} as h_t − input (mamba's
    subtraction): its dA is ~1e-5 of the scale off fp64 where the input term dominates the state (a
    time-invariant B), so the fp64 check is for the sequential backward."""
    for name in ("B", "C"):
        assert grads[name].shape == kw[name].shape and grads[name].dtype == kw[name].dtype, name
    _assert_grads_close(grads, want_grads, **FP32_TOL)
    if fp64:
        _assert_grads_close_to_fp64(kw, grads, grad_out, grad_last)


@pytest.mark.parametrize("B_form,C_form", [(3, "inv"), ("inv", 2), (12, 1)], ids=["B3-Cinv", "Binv-C2", "B12-C1"])
def test_bc_forms_parallel_kernels(monkeypatch, device, B_form, C_form):
    """The time-parallel kernels with grouped and time-invariant B / C (G = 12: one channel per group;
    G = 1: the per-sequence form written as grouped),
    every option, lengths 21, 7 and 0, gradients through the output and the last state: tiles of 16
    steps (two, the last partial) and channel blocks of 8 that cut across groups (G = 3: 4 channels
    each), so every channel reads its own group's row; dB / dC in the inputs' forms."""
    calls = _picks(monkeypatch, parallel=True)
    if device.type == "cpu":
        monkeypatch.setattr(scan_function, "MAX_TILE", 16)
        monkeypatch.setattr(scan_function, "INTERPRETER_BLOCK_D", 8)
    kw, grad_out, grad_last = _bc_case(B_form, C_form, device)
    out, last, grads = _run(kw, "triton", grad_out, grad_last)
    assert calls == {"parallel": 1, "sequential": 0}
    want_out, want_last, want_grads = _run(kw, "torch", grad_out, grad_last)
    assert_close(out, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    _assert_bc_grads(kw, grads, want_grads, grad_out, grad_last)


@pytest.mark.parametrize(
    "use_D,use_z,use_bias,softplus,grad_through",
    [(False, False, False, False, "out"), (True, False, True, False, "last")],
    ids=["bare", "D-bias-no-softplus-last-only"],
)
def test_bc_forms_parallel_kernels_options(monkeypatch, device, use_D, use_z, use_bias, softplus, grad_through):
    """B grouped and C time-invariant with the other options, one tile, the gradient through one
    output only."""
    _picks(monkeypatch, parallel=True)
    kw, grad_out, grad_last = _bc_case(2, "inv", device, use_D=use_D, use_z=use_z, use_bias=use_bias,
                                       softplus=softplus)
    grad_out = grad_out if grad_through == "out" else None
    grad_last = grad_last if grad_through == "last" else None
    out, last, grads = _run(kw, "triton", grad_out, grad_last)
    want_out, want_last, want_grads = _run(kw, "torch", grad_out, grad_last)
    assert_close(out, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)
    _assert_bc_grads(kw, grads, want_grads, grad_out, grad_last)


def test_bc_forms_short_and_wide_run_time_parallel(monkeypatch, device):
    """Where the shape rule picks the sequential kernels for per-sequence B / C, a grouped or
    time-invariant one runs time-parallel."""
    calls = _picks(monkeypatch, parallel=False)
    kw = make_scan_inputs(2, 8, 5, 3, device=device)
    with torch.no_grad():
        selective_scan(**kw, backend="triton")
        assert calls == {"parallel": 0, "sequential": 1}
        for B_form, C_form in ((2, "seq"), ("seq", "inv")):
            kw = make_scan_inputs(2, 8, 5, 3, device=device, B_form=B_form, C_form=C_form)
            assert_close(selective_scan(**kw, backend="triton"), selective_scan(**kw, backend="torch"), **FP32_TOL)
    assert calls == {"parallel": 2, "sequential": 1}


@pytest.mark.parametrize("B_form,C_form", [(3, "inv"), ("inv", 6)], ids=["B3-Cinv", "Binv-C6"])
def test_bc_forms_sequential_kernels_under_deterministic_algorithms(monkeypatch, device, B_form, C_form):
    """Deterministic algorithms run the sequential kernels for every form: channel blocks shrunk to lie
    in one group (4 channels per group at G 3, 2 at G 6), time-invariant B / C as tiles whose
    gradients sum over time in registers. Bitwise repeatable, and equal to the reference (and within
    fp32 rounding of float64)."""
    calls = _picks(monkeypatch, parallel=True)
    kw = make_scan_inputs(2, 12, 9, 3, use_lengths=True, device=device, B_form=B_form, C_form=C_form)
    g = torch.Generator().manual_seed(8)
    grad_out = torch.randn(kw["u"].shape, generator=g).to(device)
    grad_last = torch.randn(2, 12, 3, generator=g).to(device)
    torch.use_deterministic_algorithms(True)
    try:
        first = _run(kw, "triton", grad_out, grad_last)
        second = _run(kw, "triton", grad_out, grad_last)
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls == {"parallel": 0, "sequential": 2}
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name
    want_out, want_last, want_grads = _run(kw, "torch", grad_out, grad_last)
    assert_close(first[0], want_out, **FP32_TOL)
    assert_close(first[1], want_last, **FP32_TOL)
    _assert_bc_grads(kw, first[2], want_grads, grad_out, grad_last, fp64=True)


@pytest.mark.parametrize("C_form", [3, "inv"], ids=["C3", "Cinv"])
def test_bc_forms_final_mode(monkeypatch, device, C_form):
    """selective_scan_final without gradients (the output-free kernel mode) reads C at each sequence's
    last step in its form."""
    _picks(monkeypatch, parallel=True)
    if device.type == "cpu":
        monkeypatch.setattr(scan_function, "MAX_TILE", 16)
    from m2rec_kernels import selective_scan_final

    kw = make_scan_inputs(**BC_SHAPE, use_lengths=True, device=device, B_form="inv", C_form=C_form)
    kw["lengths"] = torch.tensor([BC_SHAPE["L"], 12, 1], device=device)
    with torch.no_grad():
        out_last, last = selective_scan_final(**kw, backend="triton")
        want_out, want_last = selective_scan_final(**kw, backend="torch")
    assert_close(out_last, want_out, **FP32_TOL)
    assert_close(last, want_last, **FP32_TOL)


def test_bc_forms_parallel_fp16_within_twice_the_reference_error(monkeypatch, device):
    """fp16 with B grouped and C time-invariant: the kernel's error against fp64 within twice the
    reference's on the same fp16 inputs (mamba's rule), for the output, last state and gradients."""
    _picks(monkeypatch, parallel=True)
    kw = make_scan_inputs(**BC_SHAPE, use_lengths=True, device=device, B_form=2, C_form="inv")
    lp = clone_inputs(kw, requires_grad=False, dtype=torch.float16)
    exact = clone_inputs(lp, requires_grad=False, dtype=torch.float64)
    exact["A"] = exact["A"].double()
    grad_out = torch.randn(kw["u"].shape, device=device).to(torch.float16)
    grad_last = torch.randn(BC_SHAPE["batch"], BC_SHAPE["dim"], BC_SHAPE["N"], device=device)
    truth = _run(exact, "torch", grad_out.double(), grad_last.double())
    ref = _run(lp, "torch", grad_out, grad_last)
    tri = _run(lp, "triton", grad_out, grad_last)
    for name, got, base, true in [("out", tri[0], ref[0], truth[0]), ("last", tri[1], ref[1], truth[1])] + [
        (f"grad {n}", tri[2][n], ref[2][n], truth[2][n]) for n in GRAD_NAMES
    ]:
        assert got.dtype == base.dtype and got.shape == base.shape, name
        err, ref_err = _max_err(got, true), _max_err(base, true)
        assert err <= 2 * ref_err + 1e-3 * magnitude(true), f"{name}: error {err:.3g} vs reference {ref_err:.3g}"
