"""Time-parallel Triton kernels of the selective scan (DESIGN §4, §9): mamba's CUDA design.

One program owns one sequence, BLOCK_D channels (1 on a GPU) and walks time in tiles of TILE steps
(a sequence of L <= TILE is one tile). Per tile it loads u, Δ, z along time, then loops over the N
states: for state n it loads the B and C rows of the tile, forms the pairs (decay, input) =
(exp(Δ·A[n]), Δ·u·B[n]) and runs ``tl.associative_scan`` along time, which turns the recurrence
h_t = decay_t·h_{t-1} + input_t into a parallel prefix; the state entering the tile (carried from
the previous tile) is folded into the input of its first step, decay·h0 + input. y accumulates
h·C[n] over the states. This is the structure of mamba_ssm's ``selective_scan_fwd_kernel.cuh`` and
``selective_scan_bwd_kernel.cuh`` (state-spaces/mamba, csrc/selective_scan): a block scan over a
chunk of up to 2048 steps per (batch, channel), a loop over states, a running prefix per state.
Written here for Triton; no code is taken from it.

Steps t >= length (and the padding t >= L) have Δ = 0: decay 1, input 0, so they are the identity
and the state after the last column of the last tile is the state after each sequence's own last
step. The state at the end of every tile goes to ``states`` (batch, n_tiles, dim, N) fp32: it is
the carry into the next tile, the checkpoint the backward restarts each tile from, and (last tile)
the final state.

Backward (reverse time, per tile, last tile first; per state n):
  1. recompute the tile's forward scan from its checkpoint: h_t, and decay_t·h_{t-1} = h_t - input_t
     (a subtraction as mamba does; never a division by the decay);
  2. dh_t = g_t·C_t + decay_{t+1}·dh_{t+1} is a reverse scan over the pairs (decay_{t+1}, g_t·C_t),
     with dh entering from the next tile (or d(last_state)) folded into the last step's input;
     decay_{t+1} is the recomputed decay moved one step (``_next_step``: one warp shuffle), not a
     second exp2 of Δ loaded one step later;
  3. DESIGN §9's formulas: du, dΔ accumulate over n in registers; dA (per program and tile), dD and
     d(delta_bias) go to small per-program partial buffers that the host sums (deterministic); dB and
     dC (sums over channels) are added with fp32 atomics into (batch, N, L), as mamba's CUDA
     backward does — per-channel-block partials would be n_dblocks × batch × N × L × 4 bytes each
     (4 GB at batch 64, L 2000, 128 channel blocks). The order of those additions varies from run to
     run; ``torch.use_deterministic_algorithms(True)`` makes the host use the sequential backward,
     whose reductions are all deterministic.

Addressing: u, Δ, z, out, dout and the gradients take (batch, channel) strides with unit stride in
time; B and C take (batch, state) strides, in one of three forms (``bc_forms.py``; constexpr
``B_FORM`` / ``C_FORM``, ``_bc_rows`` / ``_bc_tile``): PER_SEQ (batch, N, L), one row for the whole
channel block; GROUPED (batch, G, N, L), each channel's row offset by a group stride times
``channel // (dim / G)``; INVARIANT (dim, N), each channel's own value for state n, the same at every
step (one (BLOCK_D,) load per state, broadcast along time). Their gradients: per-sequence and grouped
dB/dC are added atomically into (batch, G, N, L) (G = 1 per sequence), each channel into its group's
row; time-invariant dB/dC are sums over time and the batch, stored per program and tile in
(batch, n_tiles, dim, N) partial buffers like dA and summed on the host (deterministic).

``ALIGN`` (host-chosen: the largest power of two <= 16 bytes / element size dividing L and every
stride) tells the compiler that rows start on 16-byte boundaries and that the time mask is constant
over ALIGN steps, so the tile loads vectorise; without it (L = 37, say) they are scalar loads.

Steps per thread and the layout anchor. The compiler gives a tile loaded along time as many
consecutive steps per thread as one 16-byte load holds: 4 for fp32. ``tl.associative_scan`` then
runs one scan across the warp's lanes (five shuffle rounds, ~30 instructions) for every 4 steps a
thread holds, and the instructions per element are dominated by them. mamba's CUDA kernels give each
thread 16 consecutive steps (one cross-lane scan per 16). The kernels load one int8 tile per time
tile from ``anchor_ptr`` (a host buffer, ``function._layout_anchor``) and fold it into Δ: a 16-byte
load holds 16 int8 values, and the compiler (triton's coalescing pass, 3.6 to 3.9) gives every
load that shares a computation with it the same steps per thread, up to TILE / (32·warps), so u,
Δ, z, B, C and the scans get up to 16 consecutive steps per thread (``THREAD_STEPS``, the host's
``thread_steps``) at the cost of one predicated-off load per tile (its mask is false at run time,
so it reads nothing and the values are always 0). Stores and atomics are still written
as 4-step vectors; ``_atomic_add_rows`` views its operands so that no data moves between threads.
Compiled for sm_90 this took the forward at L 2000 from 0.69 to 0.41 warp instructions per element.
"""
import triton
import triton.language as tl

from .kernels import _softplus

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _linear_combine(a_first, b_first, a_then, b_then):
    # (a, b) stands for h -> a·h + b; apply "first", then "then"
    return a_first * a_then, a_then * b_first + b_then


@triton.jit
def _reverse_combine(a_later, b_later, a_earlier, b_earlier):
    # reverse scan of r_t = b_t + a_t·r_{t+1}: the right operand is the earlier segment
    return a_later * a_earlier, b_earlier + a_earlier * b_later


@triton.jit
def _aligned(x, ALIGN: tl.constexpr):
    # x is a multiple of ALIGN (the host checked): written so that the compiler can see it
    # (tl.multiple_of does not reach scalar arguments)
    if ALIGN > 1:
        x = (x // ALIGN) * ALIGN
    return x


@triton.jit
def _layout_anchor(anchor_ptr, offs_d, L, TILE: tl.constexpr):
    """The layout anchor (module docstring) as a (BLOCK_D, TILE) int8 tile of zeros. Its mask is
    false at run time (L >= 0), which the compiler cannot know: no memory is read, and the result
    does not depend on what the buffer holds."""
    offs = 0 * offs_d[:, None] + tl.arange(0, TILE)[None, :]
    return tl.load(anchor_ptr + offs, mask=offs * 0 + L < 0, other=0)


@triton.jit
def _tile_delta(delta_rows, offs_t, mask, bias, length, anchor,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(Δ, pre-softplus value) of a (BLOCK_D, TILE) tile in fp32; Δ = 0 at steps t >= length.
    ``anchor`` (zeros) only ties the layout anchor into the tile's computation."""
    x = tl.load(delta_rows[:, None] + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + bias[:, None]
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    dt = tl.where((offs_t[None, :] < length) & (anchor == 0), dt, 0.0)
    return dt, x


@triton.jit
def _atomic_add_rows(ptr, t0, values, mask_d, L,
                     BLOCK_D: tl.constexpr, TILE: tl.constexpr, THREAD_STEPS: tl.constexpr,
                     PER_ROW: tl.constexpr = False):
    """ptr[t0 + t] += values[d, t] for every channel d of the block (fp32 atomics; masked at L);
    with PER_ROW, ``ptr`` is one pointer per channel (BLOCK_D,) (grouped dB / dC).

    An atomic add is written in 16-byte vectors, one per thread and row, so the compiler lays its
    operands out as 4 steps per thread; the scan's tiles hold THREAD_STEPS consecutive steps per
    thread. Viewed as (BLOCK_D, THREAD_STEPS / 4, TILE / THREAD_STEPS, 4), with the 4-step vectors of
    one thread along the second axis, both layouts are the same and no exchange between threads is
    needed (the plain (BLOCK_D, TILE) form costs a shuffle and two selects per element)."""
    v = tl.permute(tl.reshape(values, (BLOCK_D, TILE // THREAD_STEPS, THREAD_STEPS // 4, 4)), (0, 2, 1, 3))
    j = tl.arange(0, THREAD_STEPS // 4)[None, :, None, None]
    thread = tl.arange(0, TILE // THREAD_STEPS)[None, None, :, None]
    k = tl.arange(0, 4)[None, None, None, :]
    offs = t0 + thread * THREAD_STEPS + j * 4 + k + 0 * mask_d.to(tl.int32)[:, None, None, None]
    if PER_ROW:
        tl.atomic_add(ptr[:, None, None, None] + offs, v, mask=mask_d[:, None, None, None] & (offs < L), sem="relaxed")
    else:
        tl.atomic_add(ptr + offs, v, mask=mask_d[:, None, None, None] & (offs < L), sem="relaxed")


@triton.jit
def _add_bc_grad(row, part_ptr, n, c, values, part_rows, mask_d, dim, N, L,
                 BLOCK_D: tl.constexpr, TILE: tl.constexpr, THREAD_STEPS: tl.constexpr, FORM: tl.constexpr):
    """State n's share of dB or dC from this tile's (BLOCK_D, TILE) terms: added atomically into the
    (batch, G, N, L) rows (``row``: state 0's, one or one per channel), or, time-invariant, summed over
    the tile into the (batch, n_tiles, dim, N) partial buffer ``part_ptr``."""
    if FORM == INVARIANT:
        tl.store(part_ptr + (part_rows + c * dim) * N + n, tl.sum(values, axis=1), mask=mask_d)
    else:
        _atomic_add_rows(row + n * L, c * TILE, values, mask_d, L, BLOCK_D, TILE, THREAD_STEPS, FORM == GROUPED)


@triton.jit
def _shift_rows(v, after, BLOCK_D: tl.constexpr, R: tl.constexpr, P: tl.constexpr):
    # v (BLOCK_D, R, P), step r·P + k -> the value one step later; ``after`` past the last step.
    # Halves by even / odd steps: the next of an even step is the odd one beside it, and the next
    # of an odd step is the next even one (recursively); one column is left, shifted by one row.
    if P == 1:
        col = tl.reshape(v, (BLOCK_D, R))
        rows = tl.arange(0, R)[None, :]
        col = tl.gather(col, tl.broadcast_to(tl.minimum(rows + 1, R - 1), (BLOCK_D, R)), 1)
        return tl.reshape(tl.where(rows == R - 1, after[:, None], col), (BLOCK_D, R, 1))
    else:
        even, odd = tl.split(tl.reshape(v, (BLOCK_D, R, P // 2, 2)))
        return tl.reshape(tl.join(odd, _shift_rows(even, after, BLOCK_D, R, P // 2)), (BLOCK_D, R, P))


@triton.jit
def _next_step(x, after, BLOCK_D: tl.constexpr, TILE: tl.constexpr, THREAD_STEPS: tl.constexpr):
    """y[:, t] = x[:, t + 1] of a (BLOCK_D, TILE) tile, y[:, TILE - 1] = after (BLOCK_D,).

    With THREAD_STEPS consecutive steps per thread, all but one of a thread's values are its own:
    written with reshape / split / join, which move no data between threads, and one gather of a
    column across rows (one warp shuffle per thread), where a second exp2 of a Δ tile loaded one step
    later costs two instructions per element (mamba's CUDA backward passes the neighbour's first
    value through shared memory for the same reason)."""
    R: tl.constexpr = TILE // THREAD_STEPS
    v = tl.reshape(x, (BLOCK_D, R, THREAD_STEPS))
    return tl.reshape(_shift_rows(v, after, BLOCK_D, R, THREAD_STEPS), (BLOCK_D, TILE))


@triton.jit
def _flip_rows(v, BLOCK_D: tl.constexpr, R: tl.constexpr, P: tl.constexpr):
    # v (BLOCK_D, R, P), step r·P + k -> step order reversed: even and odd steps swap halves, each
    # reversed (recursively); one column is left, its rows reversed.
    if P == 1:
        col = tl.reshape(v, (BLOCK_D, R))
        rows = tl.arange(0, R)[None, :]
        return tl.reshape(tl.gather(col, tl.broadcast_to(R - 1 - rows, (BLOCK_D, R)), 1), (BLOCK_D, R, 1))
    else:
        even, odd = tl.split(tl.reshape(v, (BLOCK_D, R, P // 2, 2)))
        return tl.reshape(tl.join(_flip_rows(odd, BLOCK_D, R, P // 2), _flip_rows(even, BLOCK_D, R, P // 2)),
                          (BLOCK_D, R, P))


@triton.jit
def _flip_steps(x, BLOCK_D: tl.constexpr, TILE: tl.constexpr, THREAD_STEPS: tl.constexpr):
    """x[:, ::-1] of a (BLOCK_D, TILE) tile: one warp shuffle per step a thread holds."""
    R: tl.constexpr = TILE // THREAD_STEPS
    return tl.reshape(_flip_rows(tl.reshape(x, (BLOCK_D, R, THREAD_STEPS)), BLOCK_D, R, THREAD_STEPS),
                      (BLOCK_D, TILE))


@triton.jit
def _channels(A_ptr, bias_ptr, D_ptr, lengths_ptr, pid_b, pid_d, dim, L,
              HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    length = L
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + pid_b).to(tl.int32)
    return offs_d, mask_d, bias, Dv, length


# The forms of B and C (bc_forms.py): per sequence (batch, N, L), grouped (batch, G, N, L), time-invariant (dim, N).
PER_SEQ = tl.constexpr(0)
GROUPED = tl.constexpr(1)
INVARIANT = tl.constexpr(2)


@triton.jit
def _bc_rows(ptr, pid_b, offs_d, s_b, s_g, group_size, FORM: tl.constexpr):
    """Where B or C starts for this program: one pointer for the whole channel block (PER_SEQ), or one
    per channel — its group's row (GROUPED, ``group_size`` = dim / G channels per group) or its own
    row of the (dim, N) matrix (INVARIANT, ``s_g`` the channel stride)."""
    if FORM == GROUPED:
        return ptr + pid_b * s_b + (offs_d // group_size) * s_g
    elif FORM == INVARIANT:
        return ptr + offs_d * s_g
    else:
        return ptr + pid_b * s_b


@triton.jit
def _bc_tile(rows, n, s_n, offs_t, offs_tt, mask_tt, mask_d, FORM: tl.constexpr):
    """State n of B or C for the tile, fp32: (BLOCK_D, TILE), or (BLOCK_D, 1) for INVARIANT (the same
    value at every step, broadcast by the products that use it)."""
    if FORM == GROUPED:
        v = tl.load(rows[:, None] + n * s_n + offs_t[None, :], mask=mask_tt & mask_d[:, None], other=0.0)
    elif FORM == INVARIANT:
        v = tl.load(rows + n * s_n, mask=mask_d, other=0.0)[:, None]
    else:  # the same row for every channel, loaded as a (BLOCK_D, TILE) tile: one layout for all
        v = tl.load(rows + n * s_n + offs_tt, mask=mask_tt, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _bc_last(rows, s_n, offs_n, mask_n, mask_d, t_last, FORM: tl.constexpr):
    """All N states of B or C at step t_last (each channel's own), fp32: (1 or BLOCK_D, BLOCK_N)."""
    if FORM == GROUPED:
        v = tl.load(rows[:, None] + offs_n[None, :] * s_n + t_last, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    elif FORM == INVARIANT:
        v = tl.load(rows[:, None] + offs_n[None, :] * s_n, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    else:
        v = tl.load(rows + offs_n * s_n + t_last, mask=mask_n, other=0.0)[None, :]
    return v.to(tl.float32)


@triton.jit
def selective_scan_parallel_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, lengths_ptr, anchor_ptr,
    out_ptr, states_ptr, out_last_ptr,
    dim, L, N, n_tiles,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_z_b, s_z_d, s_o_b, s_o_d, s_B_b, s_B_n, s_C_b, s_C_n,
    s_B_g, s_C_g, B_group_size, C_group_size,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, STORE_OUT: tl.constexpr, STORE_STATES: tl.constexpr,
    STORE_LAST_OUT: tl.constexpr, MULTI_TILE: tl.constexpr,
    ALIGN: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    B_FORM: tl.constexpr = 0, C_FORM: tl.constexpr = 0,
):
    """Grid (batch, cdiv(dim, BLOCK_D)). A: (dim, N) fp32 contiguous; states: (batch, n_tiles, dim,
    N) fp32, written when STORE_STATES (needed for several tiles, the backward, the last state);
    out_last: (batch, dim), the output at step length - 1 (STORE_LAST_OUT, which needs the states).
    B, C in the form B_FORM / C_FORM (module docstring): s_*_b, s_*_n the batch and state strides,
    s_*_g the group (GROUPED) or channel (INVARIANT) stride, *_group_size = dim / G (GROUPED)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    L = _aligned(L, ALIGN)
    offs_d, mask_d, bias, Dv, length = _channels(A_ptr, bias_ptr, D_ptr, lengths_ptr, pid_b, pid_d, dim, L,
                                                 HAS_BIAS, HAS_D, HAS_LENGTHS, BLOCK_D)
    u_rows = u_ptr + pid_b * s_u_b + offs_d * _aligned(s_u_d, ALIGN)
    dl_rows = delta_ptr + pid_b * s_dl_b + offs_d * _aligned(s_dl_d, ALIGN)
    z_rows = z_ptr + pid_b * s_z_b + offs_d * _aligned(s_z_d, ALIGN)
    o_rows = out_ptr + pid_b * s_o_b + offs_d * _aligned(s_o_d, ALIGN)
    if B_FORM != INVARIANT:  # rows along time: 16-byte aligned (a state stride has no time axis)
        s_B_n = _aligned(s_B_n, ALIGN)
        s_B_g = _aligned(s_B_g, ALIGN)
    if C_FORM != INVARIANT:
        s_C_n = _aligned(s_C_n, ALIGN)
        s_C_g = _aligned(s_C_g, ALIGN)
    B_row = _bc_rows(B_ptr, pid_b, offs_d, s_B_b, s_B_g, B_group_size, B_FORM)
    C_row = _bc_rows(C_ptr, pid_b, offs_d, s_C_b, s_C_g, C_group_size, C_FORM)
    state_rows = states_ptr + (pid_b * n_tiles * dim + offs_d) * N  # + tile·dim·N + n
    A_rows = A_ptr + offs_d * N
    is_first_col = tl.arange(0, TILE) == 0
    is_last_col = tl.arange(0, TILE) == TILE - 1

    for c in range(0, n_tiles):
        offs_t = c * TILE + tl.arange(0, TILE)
        mask_t = offs_t < L
        mask = mask_d[:, None] & mask_t[None, :]
        # B and C rows as (BLOCK_D, TILE) tiles (the same row for every channel): one layout for all
        offs_tt = offs_t[None, :] + 0 * offs_d[:, None]
        mask_tt = offs_tt < L
        anchor = _layout_anchor(anchor_ptr, offs_d, L, TILE)
        dt, _ = _tile_delta(dl_rows, offs_t, mask, bias, length, anchor, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_rows[:, None] + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        dt_u = dt * u
        y = tl.zeros((BLOCK_D, TILE), tl.float32)
        if MULTI_TILE:
            tl.debug_barrier()  # the previous tile's end states (the carry) are written
        for n in range(0, N):
            A_n = tl.load(A_rows + n, mask=mask_d, other=0.0) * LOG2E  # exp(Δ·A) = exp2(Δ·A·log2 e)
            B_n = _bc_tile(B_row, n, s_B_n, offs_t, offs_tt, mask_tt, mask_d, B_FORM)
            decay = tl.exp2(dt * A_n[:, None])
            inp = dt_u * B_n
            if MULTI_TILE:  # the state entering the tile, folded into its first step
                h0 = tl.load(state_rows + (c - 1) * dim * N + n, mask=mask_d & (offs_d * 0 + c > 0), other=0.0)
                inp = tl.where(is_first_col[None, :], inp + decay * h0[:, None], inp)
            _, h = tl.associative_scan((decay, inp), 1, _linear_combine)
            if STORE_STATES:
                tl.store(state_rows[:, None] + c * dim * N + n + 0 * offs_t[None, :], h,
                         mask=mask_d[:, None] & is_last_col[None, :])
            if STORE_OUT:
                C_n = _bc_tile(C_row, n, s_C_n, offs_t, offs_tt, mask_tt, mask_d, C_FORM)
                y += h * C_n
        if STORE_OUT:
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                zt = tl.load(z_rows[:, None] + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
                y = y * zt * tl.sigmoid(zt)
            tl.store(o_rows[:, None] + offs_t[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    if STORE_LAST_OUT:
        # y at each sequence's last step from the final state: Σ_n h·C + D·u, gated (length >= 1)
        tl.debug_barrier()
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        h = tl.load(state_rows[:, None] + (n_tiles - 1) * dim * N + offs_n[None, :],
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        t_last = length - 1
        C_last = _bc_last(C_row, s_C_n, offs_n, mask_n, mask_d, t_last, C_FORM)
        y = tl.sum(h * C_last, axis=1)
        u_last = tl.load(u_rows + t_last, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_D:
            y += Dv * u_last
        if HAS_Z:
            z_last = tl.load(z_rows + t_last, mask=mask_d, other=0.0).to(tl.float32)
            y = y * z_last * tl.sigmoid(z_last)
        tl.store(out_last_ptr + pid_b * dim + offs_d, y.to(out_last_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def selective_scan_parallel_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, lengths_ptr, anchor_ptr,
    dout_ptr, states_ptr, dstate_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
    batch, dim, L, N, n_tiles,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_z_b, s_z_d, s_do_b, s_do_d, s_B_b, s_B_n, s_C_b, s_C_n,
    s_B_g, s_C_g, B_group_size, C_group_size,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_DSTATE: tl.constexpr, MULTI_TILE: tl.constexpr,
    ALIGN: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, THREAD_STEPS: tl.constexpr,
    FLIP_BY_GATHER: tl.constexpr, B_FORM: tl.constexpr = 0, C_FORM: tl.constexpr = 0,
):
    """Grid (batch, cdiv(dim, BLOCK_D)). states: the forward's (batch, n_tiles, dim, N) fp32 (read
    when MULTI_TILE). dstate: (2, batch, dim, N) fp32, dh carried between tiles (HAS_DSTATE): tile c
    reads slot (c + 1) % 2 and writes slot c % 2; the host puts d(last_state) (or zeros) in slot
    n_tiles % 2. du, ddelta, dz: contiguous (batch, dim, L) in the input dtypes; dB, dC: (batch, G, N,
    L) fp32 (G = 1 per sequence), zeroed, added to atomically — or, for a time-invariant B / C,
    (batch, n_tiles, dim, N) fp32 partial sums; dA_part (batch, n_tiles, dim, N), dD_part and
    dbias_part (batch, n_tiles, dim) fp32 partial sums. B, C and their strides as in the forward."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    L = _aligned(L, ALIGN)
    offs_d, mask_d, bias, Dv, length = _channels(A_ptr, bias_ptr, D_ptr, lengths_ptr, pid_b, pid_d, dim, L,
                                                 HAS_BIAS, HAS_D, HAS_LENGTHS, BLOCK_D)
    u_rows = u_ptr + pid_b * s_u_b + offs_d * _aligned(s_u_d, ALIGN)
    dl_rows = delta_ptr + pid_b * s_dl_b + offs_d * _aligned(s_dl_d, ALIGN)
    z_rows = z_ptr + pid_b * s_z_b + offs_d * _aligned(s_z_d, ALIGN)
    do_rows = dout_ptr + pid_b * s_do_b + offs_d * _aligned(s_do_d, ALIGN)
    g_rows = (pid_b * dim + offs_d) * L  # du, ddelta, dz: contiguous (batch, dim, L)
    if B_FORM != INVARIANT:
        s_B_n = _aligned(s_B_n, ALIGN)
        s_B_g = _aligned(s_B_g, ALIGN)
    if C_FORM != INVARIANT:
        s_C_n = _aligned(s_C_n, ALIGN)
        s_C_g = _aligned(s_C_g, ALIGN)
    B_row = _bc_rows(B_ptr, pid_b, offs_d, s_B_b, s_B_g, B_group_size, B_FORM)
    C_row = _bc_rows(C_ptr, pid_b, offs_d, s_C_b, s_C_g, C_group_size, C_FORM)
    # dB, dC contiguous (batch, G, N, L): state 0's row, or each channel's group's (GROUPED)
    dB_row = dB_ptr + pid_b * N * L
    dC_row = dC_ptr + pid_b * N * L
    if B_FORM == GROUPED:
        dB_row = _bc_rows(dB_ptr, pid_b, offs_d, (dim // B_group_size) * N * L, N * L, B_group_size, GROUPED)
    if C_FORM == GROUPED:
        dC_row = _bc_rows(dC_ptr, pid_b, offs_d, (dim // C_group_size) * N * L, N * L, C_group_size, GROUPED)
    state_rows = states_ptr + (pid_b * n_tiles * dim + offs_d) * N
    dstate_rows = dstate_ptr + (pid_b * dim + offs_d) * N  # + slot·batch·dim·N + n
    part_rows = (pid_b * n_tiles * dim + offs_d)  # + tile·dim, then ·N + n for dA
    A_rows = A_ptr + offs_d * N
    is_first_col = tl.arange(0, TILE) == 0
    is_last_col = tl.arange(0, TILE) == TILE - 1

    for cc in range(0, n_tiles):
        c = n_tiles - 1 - cc
        offs_t = c * TILE + tl.arange(0, TILE)
        mask_t = offs_t < L
        mask = mask_d[:, None] & mask_t[None, :]
        offs_tt = offs_t[None, :] + 0 * offs_d[:, None]  # B, C, dB, dC rows as (BLOCK_D, TILE) tiles
        mask_tt = offs_tt < L
        anchor = _layout_anchor(anchor_ptr, offs_d, L, TILE)
        dt, _ = _tile_delta(dl_rows, offs_t, mask, bias, length, anchor, HAS_BIAS, SOFTPLUS)
        # Δ at the first step of the next tile, for the decay one step after this tile's last
        # (past the end, or past the sequence's length: Δ = 0, decay 1)
        t_after = (c + 1) * TILE
        dt_after = tl.load(dl_rows + t_after, mask=mask_d & (offs_d * 0 + t_after < L), other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_after += bias
        if SOFTPLUS:
            dt_after = _softplus(dt_after)
        dt_after = tl.where(t_after < length, dt_after, 0.0)
        u = tl.load(u_rows[:, None] + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(do_rows[:, None] + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:  # the gradient reaching y + D·u
            zt = tl.load(z_rows[:, None] + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
            g = g * zt * tl.sigmoid(zt)
        dt_u = dt * u
        # Only dt, dt_u, g and the three sums stay live through the loop over states;
        # u, dout, z and the pre-softplus Δ are loaded again after it (registers, not memory, bound
        # the tile).
        dh_B = tl.zeros((BLOCK_D, TILE), tl.float32)   # Σ_n dh·B
        dh_Eh_A = tl.zeros((BLOCK_D, TILE), tl.float32)  # Σ_n dh·decay·h_{t-1}·A
        y = tl.zeros((BLOCK_D, TILE), tl.float32)
        if MULTI_TILE:
            tl.debug_barrier()  # the later tile's dh carry is written
        for n in range(0, N):
            A_n = tl.load(A_rows + n, mask=mask_d, other=0.0)
            A2_n = A_n * LOG2E  # exp(Δ·A) = exp2(Δ·A·log2 e)
            B_n = _bc_tile(B_row, n, s_B_n, offs_t, offs_tt, mask_tt, mask_d, B_FORM)
            C_n = _bc_tile(C_row, n, s_C_n, offs_t, offs_tt, mask_tt, mask_d, C_FORM)
            # 1) the tile's states, recomputed from its checkpoint
            inp = dt_u * B_n
            decay = tl.exp2(dt * A2_n[:, None])
            inp_h0 = inp
            if MULTI_TILE:  # the state entering the tile (its checkpoint), folded into its first step
                h0 = tl.load(state_rows + (c - 1) * dim * N + n, mask=mask_d & (offs_d * 0 + c > 0), other=0.0)
                inp_h0 = tl.where(is_first_col[None, :], inp + decay * h0[:, None], inp)
            _, h = tl.associative_scan((decay, inp_h0), 1, _linear_combine)
            # what needs h is done before the reverse scan, so that fewer tiles are live through it
            if HAS_Z:
                y += h * C_n
            _add_bc_grad(dC_row, dC_ptr, n, c, g * h, part_rows, mask_d, dim, N, L, BLOCK_D, TILE, THREAD_STEPS,
                         C_FORM)
            Eh = h - inp  # decay_t·h_{t-1}, as mamba: a subtraction, never a division by the decay
            # 2) dh_t = g_t·C_t + decay_{t+1}·dh_{t+1}, reverse scan; dh from the later tile folded in
            gC = g * C_n
            decay_next = _next_step(decay, tl.exp2(dt_after * A2_n), BLOCK_D, TILE, THREAD_STEPS)
            if HAS_DSTATE:  # dh entering from the later tile (or d(last_state)), folded into the last step
                dh_in = tl.load(dstate_rows + ((c + 1) % 2) * batch * dim * N + n, mask=mask_d, other=0.0)
                gC = tl.where(is_last_col[None, :], gC + decay_next * dh_in[:, None], gC)
            if FLIP_BY_GATHER:  # the reverse scan as a forward scan over the flipped tile
                _, dh = tl.associative_scan((_flip_steps(decay_next, BLOCK_D, TILE, THREAD_STEPS),
                                             _flip_steps(gC, BLOCK_D, TILE, THREAD_STEPS)), 1, _linear_combine)
                dh = _flip_steps(dh, BLOCK_D, TILE, THREAD_STEPS)
            else:
                _, dh = tl.associative_scan((decay_next, gC), 1, _reverse_combine, reverse=True)
            if HAS_DSTATE:
                tl.store(dstate_rows[:, None] + (c % 2) * batch * dim * N + n + 0 * offs_t[None, :], dh,
                         mask=mask_d[:, None] & is_first_col[None, :])
            # 3) DESIGN §9
            dh_Eh = dh * Eh
            # B loaded again (an L1 hit) rather than kept live through the reverse scan
            dh_B += dh * _bc_tile(B_row, n, s_B_n, offs_t, offs_tt, mask_tt, mask_d, B_FORM)
            dh_Eh_A += dh_Eh * A_n[:, None]
            tl.store(dA_part_ptr + (part_rows + c * dim) * N + n, tl.sum(dh_Eh * dt, axis=1), mask=mask_d)
            _add_bc_grad(dB_row, dB_ptr, n, c, dh * dt_u, part_rows, mask_d, dim, N, L, BLOCK_D, TILE, THREAD_STEPS,
                         B_FORM)
        u = tl.load(u_rows[:, None] + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        du = dt * dh_B
        ddt = u * dh_B + dh_Eh_A
        ddt = tl.where(offs_t[None, :] < length, ddt, 0.0)
        if SOFTPLUS:
            _, x = _tile_delta(dl_rows, offs_t, mask, bias, length, anchor, HAS_BIAS, False)
            ddt = tl.where(x <= 20.0, ddt * tl.sigmoid(x), ddt)
        dout = tl.load(do_rows[:, None] + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        g = dout
        if HAS_Z:
            zt = tl.load(z_rows[:, None] + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zt)
            g = dout * zt * sig
            yD = y
            if HAS_D:
                yD += Dv[:, None] * u
            dz = dout * yD * sig * (1.0 + zt * (1.0 - sig))  # silu'(z) = σ(z)(1 + z(1 − σ(z)))
            tl.store(dz_ptr + g_rows[:, None] + offs_t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if HAS_D:
            du += Dv[:, None] * g
            tl.store(dD_part_ptr + part_rows + c * dim, tl.sum(g * u, axis=1), mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_part_ptr + part_rows + c * dim, tl.sum(ddt, axis=1), mask=mask_d)
        tl.store(du_ptr + g_rows[:, None] + offs_t[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + g_rows[:, None] + offs_t[None, :], ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
