"""Triton kernels of the selective scan (DESIGN §4, §9).

Sequential Mamba-1 scan: one program owns (one sequence) × (BLOCK_D channels) × (all N states,
padded to BLOCK_N) and keeps the state in fp32 registers while it walks time — the layout of
fla-org/flash-linear-attention ``fla/ops/hgrn/fused_recurrent.py`` and sustcsonglin/mamba-triton,
with the extras of mamba_ssm's CUDA scan (delta_bias + softplus, D skip, silu(z) gate) fused in,
plus per-sequence ``lengths`` (steps t >= length are the identity: Δ is set to 0).

State tiles are (BLOCK_D, BLOCK_N) but every state-sized buffer (A, checkpoints, scratch, dA) is
laid out (N, dim), contiguous along channels: Triton then maps threads to channels, one thread
holding a channel's N states, so the sums over N stay inside a thread (compiled for sm_90: no
spills at BLOCK_D = 32·num_warps, N <= 32; the (dim, N) layout made it split N across lanes and
spill in the backward).

Backward without storing every state: the forward writes the state at the start of every CHUNK
steps (fp32 checkpoints, (batch, dim, n_chunks, N)). The backward walks the chunks last to first:
it recomputes the chunk's states from its checkpoint into a per-program fp32 scratch
(batch, dim, CHUNK, N) — recomputed forwards, never h_{t-1} = (h_t - ΔuB)/exp(ΔA), which is unstable
as exp(ΔA) -> 0 — then walks the chunk in reverse with the §9 formulas. Reductions over channels
(dB, dC) and over the batch (dA, dD, d(delta_bias)) go to per-program partial buffers that the
host sums: deterministic, no atomics.

B and C in the forms of ``bc_forms.py`` (constexpr B_FORM / C_FORM): grouped ones are read at the group
of the program's channel block — the host picks blocks that lie in one group, and sums the dB / dC
partials of a group's blocks; time-invariant ones are (BLOCK_D, BLOCK_N) tiles laid out like A,
whose gradients accumulate over time in registers, also like A's.
"""
import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with threshold 20. log(1 + exp(x)) rather than libdevice's log1p
    # (not portable across Triton versions); min() keeps exp finite where the branch is unused.
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _step_delta(delta_ptr, bias, row, t, mask_d, valid,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(Δ after bias/softplus and the lengths mask, the pre-softplus value) at step t, fp32."""
    x = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + bias
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    dt = tl.where(valid, dt, 0.0)
    return dt, x


@triton.jit
def _channel_block(A_ptr, bias_ptr, D_ptr, lengths_ptr, pid_b, pid_d, dim, L, N,
                   HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """What the forward and backward programs both load first: this block's channel offsets and
    masks, A (given transposed, (N, dim)) as a (BLOCK_D, BLOCK_N) fp32 tile, delta_bias, D and the
    sequence's length. Padded lanes load A = 0 (and B = C = 0 later): their state stays 0."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    tile = offs_n[None, :] * dim + offs_d[:, None]  # (BLOCK_D, BLOCK_N) in an (N, dim) matrix
    A = tl.load(A_ptr + tile, mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    length = L
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + pid_b).to(tl.int32)
    return offs_d, offs_n, mask_d, mask_n, mask_dn, tile, A, bias, Dv, length


# The forms of B and C (bc_forms.py), as in parallel_kernels.py.
PER_SEQ = tl.constexpr(0)
GROUPED = tl.constexpr(1)
INVARIANT = tl.constexpr(2)


@triton.jit
def _bc_base(ptr, pid_b, pid_d, N, L, s_b, s_g, group_size, FORM: tl.constexpr, BLOCK_D: tl.constexpr):
    """B's or C's pointer such that ``base + (pid_b·N + n)·L + t`` (the contiguous (batch, N, L) offset,
    shared by B and C) is state n at step t: the pointer itself, or for a contiguous grouped
    (batch, G, N, L) one moved to the group of this program's channel block (the host makes every
    block lie in one group) — a scalar, so the offsets stay one shared vector (two spilled, sm_90)."""
    if FORM == GROUPED:
        return ptr + pid_b * s_b + ((pid_d * BLOCK_D) // group_size) * s_g - pid_b * N * L
    else:
        return ptr


@triton.jit
def _bc_step(ptr, bc, t, mask_n, tile, mask_dn, FORM: tl.constexpr):
    """B or C at step t, fp32, broadcastable to the (BLOCK_D, BLOCK_N) state: a (1, BLOCK_N) row for
    every channel, or the time-invariant (BLOCK_D, BLOCK_N) tile, given transposed (N, dim) like A.
    The tile is loaded again at every step (a cache hit) rather than kept in registers: kept, the
    sequential backward spilled (sm_90)."""
    if FORM == INVARIANT:
        return tl.load(ptr + tile, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)[None, :]


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, lengths_ptr,
    out_ptr, last_ptr, ckpt_ptr,
    dim, L, N, n_chunks,
    s_B_b, s_B_g, s_C_b, s_C_g, B_group_size, C_group_size,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, STORE_LAST: tl.constexpr, STORE_CKPT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    B_FORM: tl.constexpr = 0, C_FORM: tl.constexpr = 0,
):
    """Grid (batch, cdiv(dim, BLOCK_D)). u, delta, z, out: (batch, dim, L); B, C: (batch, N, L), or
    in the form B_FORM / C_FORM: grouped (batch, G, N, L) with batch / group strides s_*_b, s_*_g and
    *_group_size = dim / G a multiple of BLOCK_D, or time-invariant, given TRANSPOSED (N, dim);
    A: given TRANSPOSED, (N, dim); last: (batch, dim, N) fp32; ckpt: (batch, n_chunks, N, dim) fp32
    (state before step c·CHUNK). All contiguous."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d, offs_n, mask_d, mask_n, mask_dn, tile, A, bias, Dv, length = _channel_block(
        A_ptr, bias_ptr, D_ptr, lengths_ptr, pid_b, pid_d, dim, L, N,
        HAS_BIAS, HAS_D, HAS_LENGTHS, BLOCK_D, BLOCK_N)

    row = (pid_b * dim + offs_d) * L  # (BLOCK_D,) start of each channel's sequence
    bc = (pid_b * N + offs_n) * L  # (BLOCK_N,)
    B_base = _bc_base(B_ptr, pid_b, pid_d, N, L, s_B_b, s_B_g, B_group_size, B_FORM, BLOCK_D)
    C_base = _bc_base(C_ptr, pid_b, pid_d, N, L, s_C_b, s_C_g, C_group_size, C_FORM, BLOCK_D)
    ckpt_seq = ckpt_ptr + pid_b * n_chunks * N * dim

    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for c in range(0, n_chunks):
        if STORE_CKPT:
            tl.store(ckpt_seq + c * N * dim + tile, h, mask=mask_dn)
        t0 = c * CHUNK
        for t in range(t0, tl.minimum(t0 + CHUNK, L)):
            dt, _ = _step_delta(delta_ptr, bias, row, t, mask_d, t < length, HAS_BIAS, SOFTPLUS)
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            B_t = _bc_step(B_base, bc, t, mask_n, tile, mask_dn, B_FORM)
            C_t = _bc_step(C_base, bc, t, mask_n, tile, mask_dn, C_FORM)
            h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * B_t
            y = tl.sum(h * C_t, axis=1)
            if HAS_D:
                y += Dv * u_t
            if HAS_Z:
                z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y = y * z_t * tl.sigmoid(z_t)
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    if STORE_LAST:
        tl.store(last_ptr + (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, lengths_ptr,
    dout_ptr, dlast_ptr, ckpt_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr,
    dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr,
    batch, dim, L, N, n_chunks,
    s_B_b, s_B_g, s_C_b, s_C_g, B_group_size, C_group_size,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_DLAST: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    B_FORM: tl.constexpr = 0, C_FORM: tl.constexpr = 0,
):
    """Grid (batch, n_dblocks). Layouts as the forward (A, time-invariant B/C as (N, dim), ckpt
    (batch, n_chunks, N, dim)); dlast: (batch, dim, N). Writes du, ddelta, dz (input dtypes) and fp32
    partial sums: dA_part, dD_part, dbias_part per sequence ((batch, N, dim), (batch, dim), (batch,
    dim)) and dB_part, dC_part per channel block ((n_dblocks, batch, N, L); the blocks of one group
    are consecutive) — or per sequence (batch, N, dim) for a time-invariant B / C. scratch: (batch,
    CHUNK, N, dim)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d, offs_n, mask_d, mask_n, mask_dn, tile, A, bias, Dv, length = _channel_block(
        A_ptr, bias_ptr, D_ptr, lengths_ptr, pid_b, pid_d, dim, L, N,
        HAS_BIAS, HAS_D, HAS_LENGTHS, BLOCK_D, BLOCK_N)

    row = (pid_b * dim + offs_d) * L
    bc = (pid_b * N + offs_n) * L
    B_base = _bc_base(B_ptr, pid_b, pid_d, N, L, s_B_b, s_B_g, B_group_size, B_FORM, BLOCK_D)
    C_base = _bc_base(C_ptr, pid_b, pid_d, N, L, s_C_b, s_C_g, C_group_size, C_FORM, BLOCK_D)
    ckpt_seq = ckpt_ptr + pid_b * n_chunks * N * dim
    scratch_seq = scratch_ptr + pid_b * CHUNK * N * dim
    part_bc = ((pid_d * batch + pid_b) * N + offs_n) * L  # (BLOCK_N,) into (n_dblocks, batch, N, L)

    dh = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # dLoss/dh_t, carried backwards in time
    if HAS_DLAST:
        dlast_off = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]  # (batch, dim, N) layout
        dh = tl.load(dlast_ptr + dlast_off, mask=mask_dn, other=0.0).to(tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dB_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # time-invariant B / C: Σ_t per channel
    dC_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)

    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, L)
        # 1) recompute the chunk forward from its checkpoint; keep the state BEFORE each step
        h = tl.load(ckpt_seq + c * N * dim + tile, mask=mask_dn, other=0.0)
        for t in range(t0, t1):
            tl.store(scratch_seq + (t - t0) * N * dim + tile, h, mask=mask_dn)
            dt, _ = _step_delta(delta_ptr, bias, row, t, mask_d, t < length, HAS_BIAS, SOFTPLUS)
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            B_t = _bc_step(B_base, bc, t, mask_n, tile, mask_dn, B_FORM)
            h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * B_t
        tl.debug_barrier()  # scratch written by all threads before it is read
        # 2) walk the chunk in reverse (DESIGN §9)
        for i in range(0, t1 - t0):
            t = t1 - 1 - i
            valid = t < length
            h_prev = tl.load(scratch_seq + (t - t0) * N * dim + tile, mask=mask_dn, other=0.0)
            dt, x = _step_delta(delta_ptr, bias, row, t, mask_d, valid, HAS_BIAS, SOFTPLUS)
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            B_t = _bc_step(B_base, bc, t, mask_n, tile, mask_dn, B_FORM)
            C_t = _bc_step(C_base, bc, t, mask_n, tile, mask_dn, C_FORM)
            dout = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            decay = tl.exp(dt[:, None] * A)
            h_t = decay * h_prev + (dt * u_t)[:, None] * B_t
            g = dout  # gradient reaching y + D·u
            if HAS_Z:
                y = tl.sum(h_t * C_t, axis=1)
                if HAS_D:
                    y += Dv * u_t
                z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z_t)
                g = dout * z_t * sig
                dz = dout * y * sig * (1.0 + z_t * (1.0 - sig))  # silu'(z) = σ(z)(1 + z(1 − σ(z)))
                tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
            if C_FORM == INVARIANT:
                dC_acc += h_t * g[:, None]
            else:
                dC_t = tl.sum(h_t * g[:, None], axis=0)
                tl.store(dC_part_ptr + part_bc + t, dC_t, mask=mask_n)
            dh += g[:, None] * C_t
            dh_B = tl.sum(dh * B_t, axis=1)
            du = dt * dh_B
            if HAS_D:
                du += Dv * g
                dD_acc += g * u_t
            if B_FORM == INVARIANT:
                dB_acc += dh * (dt * u_t)[:, None]
            else:
                dB_t = tl.sum(dh * (dt * u_t)[:, None], axis=0)
                tl.store(dB_part_ptr + part_bc + t, dB_t, mask=mask_n)
            dh_Eh = dh * decay * h_prev
            ddt = u_t * dh_B + tl.sum(dh_Eh * A, axis=1)
            dA_acc += dh_Eh * dt[:, None]
            dh = dh * decay
            ddt = tl.where(valid, ddt, 0.0)
            if SOFTPLUS:
                ddt = tl.where(x <= 20.0, ddt * tl.sigmoid(x), ddt)
            dbias_acc += ddt
            tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_ptr + row + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
        tl.debug_barrier()  # scratch read by all threads before the next chunk overwrites it

    tl.store(dA_part_ptr + pid_b * N * dim + tile, dA_acc, mask=mask_dn)
    if B_FORM == INVARIANT:
        tl.store(dB_part_ptr + pid_b * N * dim + tile, dB_acc, mask=mask_dn)
    if C_FORM == INVARIANT:
        tl.store(dC_part_ptr + pid_b * N * dim + tile, dC_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_part_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)


@triton.jit
def selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, idx_ptr, out_ptr,
    dim, N,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_INDICES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One step, state (batch, dim, N) updated in place (mamba_ssm ops/triton/selective_state_update.py
    semantics); grid (batch, cdiv(dim, BLOCK_D)). The output uses the fp32 new state, before it is
    rounded to the state's storage dtype. With HAS_INDICES the state is a pool (pool, dim, N) and row b
    updates pool row idx[b]; a negative index (padding) stores an output of 0 and leaves the pool."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    row = pid_b
    if HAS_INDICES:
        row = tl.load(idx_ptr + pid_b).to(tl.int64)
        if row < 0:
            tl.store(out_ptr + pid_b * dim + offs_d, tl.zeros((BLOCK_D,), tl.float32).to(out_ptr.dtype.element_ty),
                     mask=mask_d)
            return
    state_ptrs = state_ptr + (row * dim + offs_d[:, None]) * N + offs_n[None, :]
    s = tl.load(state_ptrs, mask=mask_dn, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    B = tl.load(B_ptr + pid_b * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + pid_b * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    s = tl.exp(dt[:, None] * A) * s + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(s * C[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + pid_b * dim + offs_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)
