"""``selective_state_update(..., state_batch_indices=...)``: one pool of per-user states serves a batch of
requests (mamba_ssm's continuous batching, ``ops/triton/selective_state_update.py``).

Semantics (mamba_ssm's): ``state`` is a pool (pool_size, dim, N); row b of x, dt, B, C, z updates pool row
indices[b] in place and its output is that updated row's; a negative index is padding — output 0, pool
untouched. mamba_ssm does not check the indices (an index past the pool reads and writes outside it; a
repeated one races); here both are refused with an error that names them.

The truth is a loop over the requests that gathers each one's pool row, runs the plain one-step update
on it in float64, and writes it back.
"""
import pytest
import torch

from _scan_inputs import ODD, make_scan_inputs
from _tolerance import assert_close
from m2rec_kernels import selective_state_update
from m2rec_kernels._backend import triton_interpreter_enabled

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _requests(batch, dim, N, device, opts=True, dtype=torch.float32):
    kw = make_scan_inputs(batch, dim, 1, N, use_D=opts, use_z=opts, use_bias=opts, softplus=opts, device=device,
                          dtype=dtype)
    args = (kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])
    extra = dict(D=kw["D"], z=None if kw["z"] is None else kw["z"][..., 0], dt_bias=kw["delta_bias"],
                 dt_softplus=opts)
    return args, extra


def _loop(pool, indices, args, extra):
    """float64 truth: request by request, the plain update on the gathered pool row."""
    pool = pool.double().clone()
    x, dt, A, B, C = (t.double() for t in args)
    opt = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
    outs = []
    for b, row in enumerate(indices.tolist()):
        if row < 0:
            outs.append(torch.zeros_like(x[b]))
            continue
        one = {k: (v[b:b + 1] if k == "z" and v is not None else v) for k, v in opt.items()}
        state = pool[row:row + 1].clone()
        outs.append(selective_state_update(state, x[b:b + 1], dt[b:b + 1], A, B[b:b + 1], C[b:b + 1], **one,
                                           backend="torch")[0])
        pool[row] = state[0]
    return torch.stack(outs), pool


def _backends(device):
    names = ["torch"]
    if device.type == "cuda" or triton_interpreter_enabled():
        names.append("triton")
    return names


@pytest.mark.parametrize("opts", [True, False], ids=["D-z-bias-softplus", "bare"])
@pytest.mark.parametrize("pattern", ["permuted", "padding", "all-padding", "identity"])
def test_pool_rows_follow_the_indices(device, opts, pattern):
    batch, pool_size, dim, N = ODD["batch"] + 1, 6, ODD["dim"], ODD["N"]   # 4 requests, 6 states, d 48, N 7
    indices = {"permuted": [4, 0, 5, 2], "padding": [3, -1, 1, -1], "all-padding": [-1, -1, -1, -1],
               "identity": [0, 1, 2, 3]}[pattern]
    indices = torch.tensor(indices, device=device)
    args, extra = _requests(batch, dim, N, device, opts)
    start = torch.randn(pool_size, dim, N, device=device)
    want_out, want_pool = _loop(start, indices, args, extra)
    for backend in _backends(device):
        pool = start.clone()
        out = selective_state_update(pool, *args, **extra, state_batch_indices=indices, backend=backend)
        assert out.shape == (batch, dim) and out.dtype == args[0].dtype
        assert_close(out.double(), want_out, **FP32_TOL)
        assert_close(pool.double(), want_pool, **FP32_TOL)
        untouched = [r for r in range(pool_size) if r not in indices.tolist()]
        assert torch.equal(pool[untouched], start[untouched]), "rows no request names must stay as they were"


def test_int32_indices_and_a_strided_pool(device):
    batch, pool_size, dim, N = 3, 5, 6, 4
    args, extra = _requests(batch, dim, N, device)
    indices = torch.tensor([2, -1, 0], device=device, dtype=torch.int32)
    storage = torch.randn(pool_size, N, dim, device=device)
    want_out, want_pool = _loop(storage.transpose(1, 2), indices, args, extra)
    for backend in _backends(device):
        store = storage.clone()
        out = selective_state_update(store.transpose(1, 2), *args, **extra, state_batch_indices=indices,
                                     backend=backend)
        assert_close(out.double(), want_out, **FP32_TOL)
        assert_close(store.transpose(1, 2).double(), want_pool, **FP32_TOL)


def test_indices_serve_a_batch_smaller_than_the_pool_step_after_step(device):
    """The serving loop: users arrive in different requests and orders; each user's pool row carries
    its history, equal to stepping that user alone."""
    pool_size, dim, N = 4, 8, 3
    g = torch.Generator().manual_seed(1)
    A = -(torch.rand(dim, N, generator=g) + 0.5).to(device)
    pool = torch.zeros(pool_size, dim, N, device=device)
    alone = torch.zeros(pool_size, dim, N, device=device)
    for users in ([0, 2], [3, 0, 1], [2], [1, 3]):
        idx = torch.tensor(users, device=device)
        x, dt, B, C = (torch.randn(len(users), *s, generator=g).to(device) for s in ((dim,), (dim,), (N,), (N,)))
        out = selective_state_update(pool, x, dt, A, B, C, dt_softplus=True, state_batch_indices=idx)
        for b, u in enumerate(users):
            one = alone[u:u + 1]
            want = selective_state_update(one, x[b:b + 1], dt[b:b + 1], A, B[b:b + 1], C[b:b + 1], dt_softplus=True)
            alone[u] = one[0]
            assert_close(out[b], want[0], **FP32_TOL)
    assert_close(pool, alone, **FP32_TOL)


def test_gradients_with_indices_on_the_reference(device):
    batch, pool_size, dim, N = 3, 4, 5, 2
    args, extra = _requests(batch, dim, N, device, dtype=torch.float64)
    leaves = [t.detach().clone().requires_grad_() for t in args]
    idx = torch.tensor([1, -1, 3], device=device)
    pool = torch.randn(pool_size, dim, N, device=device, dtype=torch.float64)
    out = selective_state_update(pool.clone(), *leaves, **extra, state_batch_indices=idx)
    out.sum().backward()
    assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1])), "padding rows get no gradient"

    def f(x, dt, B, C):
        return selective_state_update(pool.clone(), x, dt, leaves[2].detach(), B, C, **extra, state_batch_indices=idx)

    assert torch.autograd.gradcheck(f, [t.detach().clone().requires_grad_() for t in (args[0], args[1], args[3],
                                                                                        args[4])])


BAD = {
    "past the pool": (dict(indices=[0, 5, 1]), ValueError, r"state_batch_indices must hold state rows in \[0, "
                                                             r"pool_size=5\) \(negative = padding\), got 5"),
    "repeated": (dict(indices=[2, 0, 2]), ValueError, "must not name a state row twice.*row 2"),
    "float": (dict(indices=[0.0, 1.0, 2.0]), TypeError, "state_batch_indices must be an integer tensor"),
    "wrong length": (dict(indices=[0, 1]), ValueError, r"state_batch_indices must have shape \(batch,\) = \(3,\)"),
    "not a tensor": (dict(indices="0,1,2"), TypeError, "state_batch_indices must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_indices_are_refused(device, case):
    change, exc, match = BAD[case]
    args, extra = _requests(3, 4, 2, device)
    raw = change["indices"]
    indices = raw if isinstance(raw, str) else torch.tensor(raw, device=device)
    for backend in _backends(device):
        pool = torch.randn(5, 4, 2, device=device)
        before = pool.clone()
        with pytest.raises(exc, match=match):
            selective_state_update(pool, *args, **extra, state_batch_indices=indices, backend=backend)
        assert torch.equal(pool, before), "a refused call must leave the pool as it was"


def test_without_indices_the_batch_must_match_the_state(device):
    args, extra = _requests(3, 4, 2, device)
    with pytest.raises(ValueError, match=r"x must have shape \(3, 4\)|x must have shape"):
        selective_state_update(torch.zeros(5, 4, 2, device=device), *args, **extra)


def test_bad_indices_raise_inside_an_exported_program(device):
    """Traced (torch.export here; torch.compile takes the same path) the index checks cannot read the
    data: they become assertions in the graph, which raise on the bad call."""
    args, extra = _requests(3, 4, 2, device)

    class Step(torch.nn.Module):
        def forward(self, pool, idx, x, dt, A, B, C, D, z, dt_bias):
            return selective_state_update(pool, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                          state_batch_indices=idx, backend="torch")

    good = torch.tensor([0, -1, 4], device=device)
    inputs = (torch.randn(5, 4, 2, device=device), good, *args, extra["D"], extra["z"], extra["dt_bias"])
    program = torch.export.export(Step(), inputs).module()
    pool = inputs[0].clone()
    want = selective_state_update(pool, *args, **extra, state_batch_indices=good, backend="torch")
    assert_close(program(inputs[0].clone(), *inputs[1:]), want, **FP32_TOL)
    for bad, match in (([0, 5, 1], "pool_size=5"), ([1, 0, 1], "twice")):
        with pytest.raises(RuntimeError, match=match):
            program(inputs[0].clone(), torch.tensor(bad, device=device), *inputs[2:])


@pytest.mark.gpu
def test_matches_mamba_ssm_triton_kernel_with_indices():
    """On CUDA with mamba_ssm importable: the same pool, outputs and padding behaviour as its kernel."""
    mamba = pytest.importorskip("mamba_ssm.ops.triton.selective_state_update")
    dev = torch.device("cuda")
    args, extra = _requests(4, 64, 16, dev)
    idx = torch.tensor([3, -1, 0, 5], device=dev, dtype=torch.int32)
    start = torch.randn(6, 64, 16, device=dev)
    ours, theirs = start.clone(), start.clone()
    out = selective_state_update(ours, *args, **extra, state_batch_indices=idx, backend="triton")
    want = mamba.selective_state_update(theirs, *args, **extra, state_batch_indices=idx)
    assert_close(out, want, **FP32_TOL)
    assert_close(ours, theirs, **FP32_TOL)
