"""Triton kernels for gated fusion (DESIGN §2.3, §4, §9).

Forward, one pass over a tile of BLOCK_M rows x the whole (power-of-two padded, masked) row of d:
k gate logits (row dot products with the gate weight's column blocks), softmax over the k branches,
weighted sum, dropout, + residual, LayerNorm. It saves alpha (rows, k), mean and rstd (rows,) in fp32
for the backward; the dropout mask is never stored: both passes draw it from ``tl.rand(seed, index)``
with the element's flat index, so the backward regenerates exactly the forward's mask.

Backward, one pass per tile: recompute o and the normalised row from the saved statistics, LayerNorm
backward, dropout backward, gate backward (softmax Jacobian), and per-program partial sums for the
parameter gradients that the host reduces in a fixed order (deterministic, no atomics).

The structure (one row in registers, fp32 statistics saved for a recompute-style backward, weight
gradients as per-program partials summed on the host) follows the fused LayerNorm of mamba_ssm
``ops/triton/layernorm_gated.py`` and the Triton LayerNorm tutorial; the gate and dropout are ours.
k (2 or 3) is a compile-time constant, so each k gets its own specialised kernel.
"""
import triton
import triton.language as tl


@triton.jit
def _row_dot(x, w_ptr, cols, cmask):
    """Per-row dot product of the tile x (BLOCK_M, BLOCK_D) with the vector at w_ptr (d,)."""
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return tl.sum(x * w[None, :], axis=1)


@triton.jit
def _gate_logit(x0, x1, x2, W, BG, j, D, cols, cmask, K: tl.constexpr):
    """logit_j = gate_bias[j] + <concat(x0, x1, x2), gate_weight[j]> per row."""
    w_row = W + j * K * D
    logit = _row_dot(x0, w_row, cols, cmask) + _row_dot(x1, w_row + D, cols, cmask)
    if K == 3:
        logit += _row_dot(x2, w_row + 2 * D, cols, cmask)
    return logit + tl.load(BG + j).to(tl.float32)


@triton.jit
def _load_tile(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gated_fusion_fwd_kernel(
    X0, X1, X2, RES,          # branches and residual, (M, D) contiguous; X2 unused when K == 2
    W, BG, LW, LB,            # gate weight (K, K*D), gate bias (K,), LayerNorm weight/bias (D,)
    OUT, ALPHA, MEAN, RSTD,   # out (M, D) in the input dtype; alpha (M, K), mean, rstd (M,) fp32
    M, D, eps, dropout_p, dropout_scale, SEED,  # SEED: int64 (1,), read only with dropout
    K: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]  # flat element index: also the dropout RNG offset

    x0 = _load_tile(X0, offs, mask)
    x1 = _load_tile(X1, offs, mask)
    if K == 3:
        x2 = _load_tile(X2, offs, mask)
    else:
        x2 = x0  # placeholder, never read

    # softmax over the k gate logits, with the max subtracted for stability
    l0 = _gate_logit(x0, x1, x2, W, BG, 0, D, cols, cmask, K)
    l1 = _gate_logit(x0, x1, x2, W, BG, 1, D, cols, cmask, K)
    top = tl.maximum(l0, l1)
    if K == 3:
        l2 = _gate_logit(x0, x1, x2, W, BG, 2, D, cols, cmask, K)
        top = tl.maximum(top, l2)
    e0 = tl.exp(l0 - top)
    e1 = tl.exp(l1 - top)
    total = e0 + e1
    if K == 3:
        e2 = tl.exp(l2 - top)
        total += e2
    a0 = e0 / total
    a1 = e1 / total
    o = a0[:, None] * x0 + a1[:, None] * x1
    if K == 3:
        a2 = e2 / total
        o += a2[:, None] * x2
        tl.store(ALPHA + rows * K + 2, a2, mask=rmask)
    tl.store(ALPHA + rows * K, a0, mask=rmask)
    tl.store(ALPHA + rows * K + 1, a1, mask=rmask)

    if HAS_DROPOUT:
        seed = tl.load(SEED).to(tl.int32)  # from memory, so that a traced graph can draw it
        keep = tl.rand(seed, offs) >= dropout_p
        o = tl.where(keep, o * dropout_scale, 0.0)

    r = _load_tile(RES, offs, mask) + o  # zero in the padded columns: every input loads 0 there
    mean = tl.sum(r, axis=1) / D
    centred = tl.where(mask, r - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)

    lw = tl.load(LW + cols, mask=cmask, other=0.0).to(tl.float32)
    lb = tl.load(LB + cols, mask=cmask, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * lw[None, :] + lb[None, :]
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate(ptr, cols, cmask, value):
    """Add a (BLOCK_D,) vector into this program's own partial-sum row (no other program writes it)."""
    tl.store(ptr + cols, tl.load(ptr + cols, mask=cmask, other=0.0) + value, mask=cmask)


@triton.jit
def _gate_backward(xi, ai, dlogit0, dlogit1, dlogit2, do, W, DW_PART, i, D, cols, cmask, K: tl.constexpr):
    """d branch_i = alpha_i * do + sum_j dlogit_j * W[j, block i]; accumulates dW[j, block i]."""
    dx = ai[:, None] * do
    w0 = tl.load(W + i * D + cols, mask=cmask, other=0.0).to(tl.float32)
    w1 = tl.load(W + K * D + i * D + cols, mask=cmask, other=0.0).to(tl.float32)
    dx += dlogit0[:, None] * w0[None, :] + dlogit1[:, None] * w1[None, :]
    _accumulate(DW_PART + i * D, cols, cmask, tl.sum(dlogit0[:, None] * xi, axis=0))
    _accumulate(DW_PART + K * D + i * D, cols, cmask, tl.sum(dlogit1[:, None] * xi, axis=0))
    if K == 3:
        w2 = tl.load(W + 2 * K * D + i * D + cols, mask=cmask, other=0.0).to(tl.float32)
        dx += dlogit2[:, None] * w2[None, :]
        _accumulate(DW_PART + 2 * K * D + i * D, cols, cmask, tl.sum(dlogit2[:, None] * xi, axis=0))
    return dx


@triton.jit
def _gated_fusion_bwd_kernel(
    X0, X1, X2, RES, W, LW,            # forward inputs
    ALPHA, MEAN, RSTD,                 # saved by the forward (fp32)
    DOUT, DGATES,                      # incoming gradients; DGATES (M, K) fp32 only if HAS_DGATES
    DX0, DX1, DX2, DRES,               # input gradients, (M, D) in the input dtype
    DW_PART, DBG_PART, DLW_PART, DLB_PART,  # per-program fp32 partials: (P, K*K*D), (P, K), (P, D), (P, D)
    M, D, tiles_per_program, dropout_p, dropout_scale, SEED,
    K: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DGATES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    lw = tl.load(LW + cols, mask=cmask, other=0.0).to(tl.float32)
    DW_PART += pid * K * K * D
    DBG_PART += pid * K
    DLW_PART += pid * D
    DLB_PART += pid * D
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED).to(tl.int32)
    for t in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]

        # recompute o and the normalised row (rows past M load zeros and contribute nothing)
        x0 = _load_tile(X0, offs, mask)
        x1 = _load_tile(X1, offs, mask)
        a0 = tl.load(ALPHA + rows * K, mask=rmask, other=0.0)
        a1 = tl.load(ALPHA + rows * K + 1, mask=rmask, other=0.0)
        o = a0[:, None] * x0 + a1[:, None] * x1
        if K == 3:
            x2 = _load_tile(X2, offs, mask)
            a2 = tl.load(ALPHA + rows * K + 2, mask=rmask, other=0.0)
            o += a2[:, None] * x2
        else:
            x2 = x0  # placeholders, never read
            a2 = a0
        if HAS_DROPOUT:
            keep = tl.rand(seed, offs) >= dropout_p  # the forward's mask, regenerated
            o_dropped = tl.where(keep, o * dropout_scale, 0.0)
        else:
            o_dropped = o
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        r = _load_tile(RES, offs, mask) + o_dropped
        xhat = tl.where(mask, (r - mean[:, None]) * rstd[:, None], 0.0)

        # LayerNorm backward: dr = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * ln_weight
        dy = _load_tile(DOUT, offs, mask)
        _accumulate(DLW_PART, cols, cmask, tl.sum(dy * xhat, axis=0))
        _accumulate(DLB_PART, cols, cmask, tl.sum(dy, axis=0))
        g = dy * lw[None, :]
        g_mean = tl.sum(g, axis=1) / D
        gx_mean = tl.sum(g * xhat, axis=1) / D
        dr = tl.where(mask, (g - g_mean[:, None] - xhat * gx_mean[:, None]) * rstd[:, None], 0.0)
        tl.store(DRES + offs, dr.to(DRES.dtype.element_ty), mask=mask)

        if HAS_DROPOUT:
            do = tl.where(keep, dr * dropout_scale, 0.0)
        else:
            do = dr

        # gates: d alpha_i = <do, x_i> (+ the gates' own gradient); softmax backward
        da0 = tl.sum(do * x0, axis=1)
        da1 = tl.sum(do * x1, axis=1)
        if HAS_DGATES:
            da0 += tl.load(DGATES + rows * K, mask=rmask, other=0.0)
            da1 += tl.load(DGATES + rows * K + 1, mask=rmask, other=0.0)
        weighted = a0 * da0 + a1 * da1
        if K == 3:
            da2 = tl.sum(do * x2, axis=1)
            if HAS_DGATES:
                da2 += tl.load(DGATES + rows * K + 2, mask=rmask, other=0.0)
            weighted += a2 * da2
            dlogit2 = a2 * (da2 - weighted)
            tl.store(DBG_PART + 2, tl.load(DBG_PART + 2) + tl.sum(dlogit2, axis=0))
        else:
            dlogit2 = a0  # placeholder, never read
        dlogit0 = a0 * (da0 - weighted)
        dlogit1 = a1 * (da1 - weighted)
        tl.store(DBG_PART, tl.load(DBG_PART) + tl.sum(dlogit0, axis=0))
        tl.store(DBG_PART + 1, tl.load(DBG_PART + 1) + tl.sum(dlogit1, axis=0))

        dx0 = _gate_backward(x0, a0, dlogit0, dlogit1, dlogit2, do, W, DW_PART, 0, D, cols, cmask, K)
        tl.store(DX0 + offs, dx0.to(DX0.dtype.element_ty), mask=mask)
        dx1 = _gate_backward(x1, a1, dlogit0, dlogit1, dlogit2, do, W, DW_PART, 1, D, cols, cmask, K)
        tl.store(DX1 + offs, dx1.to(DX1.dtype.element_ty), mask=mask)
        if K == 3:
            dx2 = _gate_backward(x2, a2, dlogit0, dlogit1, dlogit2, do, W, DW_PART, 2, D, cols, cmask, K)
            tl.store(DX2 + offs, dx2.to(DX2.dtype.element_ty), mask=mask)
