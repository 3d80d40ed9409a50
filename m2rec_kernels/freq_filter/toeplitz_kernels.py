"""Triton kernels of the direct (time-domain) filter: Toeplitz tiles applied with ``tl.dot`` (DESIGN §4).

A filter with taps k along the sequence is, per channel c, a Toeplitz matrix T_c[t, s] = k[t − s, c].
The taps differ per channel, so the matrix is shared only across the batch: for one channel,
Y_c (L × batch) = T_c (L × L) · X_c (L × batch). One program owns a channel, a tile of BLOCK_T output
steps and a block of BLOCK_B batch rows (the dot's N dimension); it builds each BLOCK_T × BLOCK_S tile
of T_c by gathering taps (BLOCK_T + BLOCK_S − 1 distinct values, served by L1) and accumulates
T_tile · X_tile in fp32. The causal filter visits only the tiles on or below the diagonal that hold
lags < K: L²/2 multiply-adds per (row, channel) for K = L taps, against about 4·L·n_fft/2 for the dense
DFT pair (``kernels.py``) — the reason this kernel runs the causal filter at short L.

Lag conventions (``toeplitz_filter_kernel``), with t the output step and s the input step:
* causal (default):          y[t] = Σ_{0 <= t−s < K} k[t − s]·x[s];
* ``ANTI`` (transposed):     y[s] = Σ_{0 <= t−s < K} k[t − s]·x[t] — the causal filter's adjoint (dx);
* ``WRAP`` = n (general W):  y[t] = Σ_{s < L} k[(t − s) mod n]·x[s] — irfft(rfft(x)·W)[:L] for the taps
  k = irfft(W, n), exact for any W (both triangles of the Toeplitz matrix are visited).

The tap gradient is a correlation reduced over batch and time, dk[j] = Σ_b Σ_t a[b, t]·v[b, t − j]
(``toeplitz_corr_kernel``): a dot over the batch forms G[t, s] = Σ_b a[b, t]·v[b, s] tile by tile along a
band of tiles t-tile − s-tile = q, and a shear (``tl.gather`` along the rows) lines the tile's diagonals
up as columns, so the column sums are the lags. A band's square tile spans the lags (q−1)·P .. (q+1)·P,
so each program writes two partial rows (lags q·P + m and (q−1)·P + m); the host adds them — a
deterministic reduction, no atomics.

Everything is accumulated in fp32; inputs are read in their own dtype and outputs stored in theirs.
"""
import triton
import triton.language as tl


@triton.jit
def toeplitz_filter_kernel(
    x_ptr, k_ptr, y_ptr,
    B, L, K, N_WRAP,
    stride_xb, stride_xt, stride_xd,
    stride_kk, stride_kd,
    stride_yb, stride_yt, stride_yd,
    ANTI: tl.constexpr,        # the transposed (anti-causal) product: the causal filter's dx
    WRAP: tl.constexpr,        # lags taken mod N_WRAP over the whole L × L matrix (a general weight)
    PRECISION: tl.constexpr,   # tl.dot input_precision: "ieee" for parity, "tf32" when allowed
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
):
    c = tl.program_id(0)                     # channels fastest: neighbours share x's sectors in L2
    # the heaviest causal tiles (most s-tiles below the diagonal) start first
    n_t = tl.cdiv(L, BLOCK_T)
    tile = tl.program_id(1) if ANTI else n_t - 1 - tl.program_id(1)
    t0 = tile * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_t = offs_t < L
    mask_b = offs_b < B
    rs = tl.arange(0, BLOCK_S)
    x_base = x_ptr + c * stride_xd + offs_b[None, :] * stride_xb
    k_base = k_ptr + c * stride_kd

    if WRAP:
        s_lo = 0
        s_hi = L
    elif ANTI:
        s_lo = (t0 // BLOCK_S) * BLOCK_S
        s_hi = tl.minimum(L, t0 + BLOCK_T - 1 + K)
    else:
        s_lo = (tl.maximum(0, t0 - K + 1) // BLOCK_S) * BLOCK_S
        s_hi = tl.minimum(L, t0 + BLOCK_T)

    acc = tl.zeros((BLOCK_T, BLOCK_B), dtype=tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        offs_s = s0 + rs
        mask_s = offs_s < L
        if ANTI:
            lag = offs_s[None, :] - offs_t[:, None]
        else:
            lag = offs_t[:, None] - offs_s[None, :]
        if WRAP:
            lag = tl.where(lag < 0, lag + N_WRAP, lag)
            t_mask = mask_t[:, None] & mask_s[None, :]
        else:
            # rows t >= L are never stored and columns s >= L meet zeros in xs: only the lag range
            # needs a mask (it also keeps every address inside the taps)
            t_mask = (lag >= 0) & (lag < K)
        taps = tl.load(k_base + lag * stride_kk, mask=t_mask, other=0.0)
        xs = tl.load(x_base + offs_s[:, None] * stride_xt, mask=mask_s[:, None] & mask_b[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(taps, xs, input_precision=PRECISION)

    y_off = c * stride_yd + offs_t[:, None] * stride_yt + offs_b[None, :] * stride_yb
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_b[None, :])


@triton.jit
def toeplitz_corr_kernel(
    a_ptr, v_ptr, part_ptr,
    B, L, D, N_BANDS,
    stride_ab, stride_at, stride_ad,
    stride_vb, stride_vt, stride_vd,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Partial correlations of band q for one channel and one batch chunk:
    part[chunk, q, 0, m, c] = Σ_{b in chunk} Σ_t a[b, t]·v[b, t − (q·P + m)]   (the band's own lags),
    part[chunk, q, 1, m, c] = the same for the lag (q−1)·P + m                 (spilled to band q − 1)."""
    c = tl.program_id(0)
    q = tl.program_id(1)
    chunk = tl.program_id(2)
    offs_b = chunk * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    ri = tl.arange(0, BLOCK_P)
    a_base = a_ptr + c * stride_ad + offs_b[None, :] * stride_ab      # (P, BLOCK_B) tiles: rows t
    v_base = v_ptr + c * stride_vd + offs_b[:, None] * stride_vb      # (BLOCK_B, P) tiles: cols s
    # shear: column m of H holds the tile's diagonal i − u ≡ m (mod P), i.e. H[i, m] = G[i, (i − m) mod P]
    shear = (ri[:, None] - ri[None, :] + BLOCK_P) % BLOCK_P
    own = ri[:, None] >= ri[None, :]     # i >= m: lag q·P + m; else (q − 1)·P + m

    acc_own = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_spill = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for t0 in range(q * BLOCK_P, L, BLOCK_P):
        offs_t = t0 + ri
        offs_s = offs_t - q * BLOCK_P
        at = tl.load(a_base + offs_t[:, None] * stride_at, mask=(offs_t[:, None] < L) & mask_b[None, :],
                     other=0.0).to(tl.float32)
        vt = tl.load(v_base + offs_s[None, :] * stride_vt, mask=mask_b[:, None] & (offs_s[None, :] < L),
                     other=0.0).to(tl.float32)
        g = tl.dot(at, vt, input_precision=PRECISION)          # G[i, u] = Σ_b a[t0 + i]·v[s0 + u]
        h = tl.gather(g, shear, axis=1)
        acc_own += tl.sum(tl.where(own, h, 0.0), axis=0)
        acc_spill += tl.sum(tl.where(own, 0.0, h), axis=0)

    row = (chunk * N_BANDS + q) * 2
    tl.store(part_ptr + (row * BLOCK_P + ri) * D + c, acc_own)
    tl.store(part_ptr + ((row + 1) * BLOCK_P + ri) * D + c, acc_spill)
