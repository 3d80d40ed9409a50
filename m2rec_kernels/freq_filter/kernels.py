"""Triton kernel of the FFT-domain filter: the real DFT and its inverse as dense matrices (DESIGN §4, §9).

Triton has no FFT. For the short sequences of sequential recommendation a dense DFT applied with
``tl.dot`` is cheap and fuses with the spectral multiply — the idea of FlashFFTConv
(HazyResearch/flash-fft-conv: FFT convolution as matrix multiplies on the matmul units); this kernel
is a plain one-level version of it, written for this project.

One program owns one batch row and a block of BLOCK_D channels, and runs two phases:

1. spectrum: X[f, c] = sum_t (Cr + i·Ci)[f, t] · x[t, c] for all F = n_fft//2 + 1 frequencies,
   looping over frequency blocks (outer) and time blocks (inner, the dot's K dimension); X goes to a
   fp32 scratch buffer ``spec`` (B, 2, F, D), which the autograd Function keeps for the backward pass.
   With WITH_DW the same phase also writes this batch row's weight gradient
   c_f·conj(saved)·X (the backward pass runs the kernel on dy, so X is then dY's spectrum G).
2. filtered output: y[t, c] = sum_f Ar[t, f]·Yr[f, c] + Ai[t, f]·Yi[f, c] with Y = X·W (or X·conj(W)
   with CONJ_W), looping over time blocks (outer) and frequency blocks (inner); Y is formed on the
   fly from the scratch spectrum and the weight.

The matrices (built once on the host, ``dft.py``) already carry the ortho scaling and the c_f
weighting of the inverse; the imaginary rows/columns at DC and Nyquist are exactly zero.
Everything is accumulated in fp32; inputs are read in their own dtype and outputs stored in theirs.
"""
import triton
import triton.language as tl


@triton.jit
def dft_filter_kernel(
    x_ptr, w_ptr, y_ptr, spec_ptr, saved_ptr, dw_ptr,
    cr_ptr, ci_ptr, ar_ptr, ai_ptr,
    L, D, F, N_FFT,
    stride_xb, stride_xt, stride_xd,
    stride_wf, stride_wd, stride_wc,
    stride_yb, stride_yt, stride_yd,
    CONJ_W: tl.constexpr,       # multiply by conj(W): the backward pass for dx
    WITH_DW: tl.constexpr,      # write c_f·conj(saved)·X per batch row into dw (B, F, D, 2)
    WRITE_Y: tl.constexpr,      # phase 2 can be skipped when only dW is wanted
    PRECISION: tl.constexpr,    # tl.dot input_precision: "ieee" for parity, "tf32" when allowed
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rt = tl.arange(0, BLOCK_T)
    rf = tl.arange(0, BLOCK_F)
    x_row = x_ptr + pid_b * stride_xb
    spec_re = spec_ptr + pid_b * 2 * F * D
    spec_im = spec_re + F * D

    # ---- phase 1: spectrum X = C·x for every frequency block -------------------------------------
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + rf
        mask_f = offs_f < F
        xr = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
        xi = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, L, BLOCK_T):
            offs_t = t0 + rt
            mask_t = offs_t < L
            xb = tl.load(x_row + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            c_off = offs_f[:, None] * L + offs_t[None, :]
            c_mask = mask_f[:, None] & mask_t[None, :]
            crb = tl.load(cr_ptr + c_off, mask=c_mask, other=0.0)
            cib = tl.load(ci_ptr + c_off, mask=c_mask, other=0.0)
            xr += tl.dot(crb, xb, input_precision=PRECISION)
            xi += tl.dot(cib, xb, input_precision=PRECISION)
        s_off = offs_f[:, None] * D + offs_d[None, :]
        s_mask = mask_f[:, None] & mask_d[None, :]
        tl.store(spec_re + s_off, xr, mask=s_mask)
        tl.store(spec_im + s_off, xi, mask=s_mask)
        if WITH_DW:
            # dW[f, c] = c_f · conj(X_fwd[f, c]) · G[f, c]; summed over the batch on the host
            saved_re = saved_ptr + pid_b * 2 * F * D
            sr = tl.load(saved_re + s_off, mask=s_mask, other=0.0)
            si = tl.load(saved_re + F * D + s_off, mask=s_mask, other=0.0)
            c_f = tl.where((offs_f == 0) | (2 * offs_f == N_FFT), 1.0, 2.0)
            dw_off = (pid_b * F + offs_f[:, None]) * (2 * D) + offs_d[None, :] * 2
            tl.store(dw_ptr + dw_off, c_f[:, None] * (sr * xr + si * xi), mask=s_mask)
            tl.store(dw_ptr + dw_off + 1, c_f[:, None] * (sr * xi - si * xr), mask=s_mask)

    if WRITE_Y:
        # the scratch spectrum written above is read back by other threads of this program
        tl.debug_barrier()
        # ---- phase 2: y = A·(X ⊙ W) for every time block -----------------------------------------
        y_row = y_ptr + pid_b * stride_yb
        for t0 in range(0, L, BLOCK_T):
            offs_t = t0 + rt
            mask_t = offs_t < L
            acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for f0 in range(0, F, BLOCK_F):
                offs_f = f0 + rf
                mask_f = offs_f < F
                s_off = offs_f[:, None] * D + offs_d[None, :]
                s_mask = mask_f[:, None] & mask_d[None, :]
                xr = tl.load(spec_re + s_off, mask=s_mask, other=0.0)
                xi = tl.load(spec_im + s_off, mask=s_mask, other=0.0)
                w_off = offs_f[:, None] * stride_wf + offs_d[None, :] * stride_wd
                wr = tl.load(w_ptr + w_off, mask=s_mask, other=0.0).to(tl.float32)
                wi = tl.load(w_ptr + w_off + stride_wc, mask=s_mask, other=0.0).to(tl.float32)
                if CONJ_W:
                    wi = -wi
                yr = xr * wr - xi * wi
                yi = xr * wi + xi * wr
                a_off = offs_t[:, None] * F + offs_f[None, :]
                a_mask = mask_t[:, None] & mask_f[None, :]
                arb = tl.load(ar_ptr + a_off, mask=a_mask, other=0.0)
                aib = tl.load(ai_ptr + a_off, mask=a_mask, other=0.0)
                acc += tl.dot(arb, yr, input_precision=PRECISION)
                acc += tl.dot(aib, yi, input_precision=PRECISION)
            tl.store(y_row + offs_t[:, None] * stride_yt + offs_d[None, :] * stride_yd,
                     acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])
