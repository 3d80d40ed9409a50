"""Every Triton kernel of the package at the configurations its host code picks for the GPU
benchmark shapes — what ``python -m bench.kernel_stats`` compiles for sm_90 and reports on.

One entry per kernel: a function decorated with ``@register("name")`` that returns the
``KernelCase``s to compile (one per benchmark shape, and per autotune configuration where the host
autotunes). An entry asks the host code for its launch choices (block sizes, warps, grid) through
the same functions the launch wrappers use, called with the H200's SM count instead of a device,
so the report follows the host heuristics when they change. A new kernel joins with one entry.

Arguments are given as the runtime would see them: tensors (only dtype and 16-byte alignment
matter: tiny CPU tensors stand in), Python ints (the runtime specialises 1 and multiples of 16),
floats and the constexpr values; ``kernel_stats`` turns them into the compiler's signature the way
``JITFunction.run`` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .grids import GPU

#: The GPU the report is for: an H200 (sm_90, 132 SMs). Host heuristics get this SM count.
H200_SMS = 132

#: Scan shapes (batch, L, d_inner, d_state): the GPU grid's scan op (batch 64, L 200) and the
#: model-level grid's batch 1 and L 2000 at the same widths (bench/grids.py).
SCAN_SHAPES = tuple((b, L, GPU.scan[2], GPU.scan[3]) for b in (GPU.scan[0], 1) for L in (GPU.scan[1], 2000))
#: Filter and fusion shape (batch, L, d): the GPU grid's sequence ops.
SEQ_SHAPES = (GPU.seq_op,)


@dataclass
class KernelCase:
    """One kernel at one launch configuration."""
    kernel: str                   # registry name of the kernel, e.g. "scan_fwd"
    shape: str                    # the benchmark shape it serves, e.g. "B64 L200 d128 N32"
    fn: object                    # the @triton.jit function
    args: Dict[str, object]       # every parameter: tensor / int / float / constexpr value
    grid: Tuple[int, ...]
    num_warps: int
    num_stages: Optional[int] = None
    maxnreg: Optional[int] = None
    #: (d, n, t) elements one iteration of the innermost loop(s) works on (scan kernels); the
    #: instructions of all innermost loops are summed and divided by it (see kernel_stats).
    loop_elements: Optional[int] = None
    #: how many innermost loops the kernel is written with (a different count in the SASS means
    #: the compiler split or peeled one, and the per-element figure is then not reported)
    inner_loops: Optional[int] = None
    #: the part of the grid doing useful work, when the host launches a fixed number of programs
    note: str = ""
    config: Dict[str, object] = field(default_factory=dict)  # what the host chose, for the table

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


REGISTRY: Dict[str, Callable[[], List[KernelCase]]] = {}


def register(name: str):
    def deco(fn: Callable[[], List[KernelCase]]):
        if name in REGISTRY:
            raise ValueError(f"kernel {name!r} is registered twice")
        REGISTRY[name] = fn
        return fn
    return deco


def tensor(dtype=torch.float32) -> torch.Tensor:
    """A stand-in argument: the compiler sees its dtype and that its address is 16-byte aligned."""
    return torch.empty(4, dtype=dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scan_shape_label(batch: int, L: int, dim: int, N: int) -> str:
    return f"B{batch} L{L} d{dim} N{N}"


# --------------------------------------------------------------------------------------------------
# selective scan (m2rec_kernels/scan): the model's call — fp32, D, z, delta_bias, softplus, no lengths
# --------------------------------------------------------------------------------------------------

_SCAN_FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_LENGTHS=False)


def _scan_io(dt=torch.float32) -> Dict[str, object]:
    t, f32 = tensor(dt), tensor()
    io = {n: t for n in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "D_ptr", "z_ptr", "bias_ptr", "out_ptr",
                         "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")}
    io.update({n: f32 for n in ("A_ptr", "last_ptr", "ckpt_ptr", "dlast_ptr", "scratch_ptr", "dA_part_ptr",
                                "dB_part_ptr", "dC_part_ptr", "dD_part_ptr", "dbias_part_ptr")})
    io["lengths_ptr"] = tensor(torch.int64)
    io["anchor_ptr"] = tensor(torch.int8)  # the time-parallel kernels' layout anchor
    return io


def _only(fn, values: Dict[str, object]) -> Dict[str, object]:
    return {n: values[n] for n in fn.arg_names}


def _parallel_io(batch: int, dim: int, L: int, N: int) -> Dict[str, object]:
    """Strides as the model passes its tensors: u, Δ, B, C, out contiguous; z the second half of
    the (batch, 2·dim, L) in_proj output."""
    return dict(s_u_b=dim * L, s_u_d=L, s_dl_b=dim * L, s_dl_d=L, s_z_b=2 * dim * L, s_z_d=L,
                s_o_b=dim * L, s_o_d=L, s_do_b=dim * L, s_do_d=L, s_B_b=N * L, s_B_n=L, s_C_b=N * L, s_C_n=L,
                **_PER_SEQUENCE_BC)


#: B and C per sequence, (batch, N, L) (the model's form): the unused group arguments as the host passes them
_PER_SEQUENCE_BC = dict(s_B_g=0, s_C_g=0, B_group_size=1, C_group_size=1, B_FORM=0, C_FORM=0)
_SEQUENTIAL_BC = dict(s_B_b=0, s_C_b=0, **_PER_SEQUENCE_BC)


def _scan_label(batch, L, dim, N, kind, mode=""):
    return f"{scan_shape_label(batch, L, dim, N)} {kind}" + (f" {mode}" if mode else "")


@register("scan_fwd")
def _scan_fwd() -> List[KernelCase]:
    """The forward the host runs at each shape (use_time_parallel), in its uses: inference and
    training (per-step output, and the tile states when there are several tiles) and the output-free
    last-step mode of selective_scan_final; plus the sequential forward at L 32."""
    from m2rec_kernels.scan import function as F
    from m2rec_kernels.scan.kernels import selective_scan_fwd_kernel as SK
    from m2rec_kernels.scan.parallel_kernels import selective_scan_parallel_fwd_kernel as PK
    cases = []
    for batch, L, dim, N in SCAN_SHAPES + ((GPU.scan[0], 32, GPU.scan[2], GPU.scan[3]),):
        if F.use_time_parallel(batch, dim, L):
            tile, block_d, warps = F.parallel_config_gpu(L)
            n_tiles = _cdiv(L, tile)
            align = F._alignment(L, torch.float32, dim * L, L, 2 * dim * L, N * L)
            # several tiles carry the state through the states buffer in every mode (_parallel_forward),
            # so training (states for the backward) runs the inference kernel
            for mode, out, states, last in (("inference", True, n_tiles > 1, False), ("final", False, True, True)):
                cfg = dict(TILE=tile, BLOCK_D=block_d, ALIGN=align)
                args = dict(_scan_io(), **_parallel_io(batch, dim, L, N), out_last_ptr=tensor(), states_ptr=tensor(),
                            dim=dim, L=L, N=N, n_tiles=n_tiles, **_SCAN_FLAGS, STORE_OUT=out, STORE_STATES=states,
                            STORE_LAST_OUT=last, MULTI_TILE=n_tiles > 1, BLOCK_N=F._block_n(N), **cfg)
                cases.append(KernelCase("scan_fwd", _scan_label(batch, L, dim, N, "parallel", mode), PK, _only(PK, args),
                                        (batch, _cdiv(dim, block_d)), num_warps=warps,
                                        loop_elements=block_d * min(tile, L), inner_loops=1, config=cfg))
        else:
            block_d, warps = F.fwd_config_gpu(batch, dim, N, H200_SMS)
            block_n, chunk = F._block_n(N), F._chunk(L)
            cfg = dict(CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
            args = dict(_scan_io(), dim=dim, L=L, N=N, n_chunks=_cdiv(L, chunk), **_SCAN_FLAGS,
                        STORE_LAST=False, STORE_CKPT=True, **_SEQUENTIAL_BC, **cfg)
            cases.append(KernelCase("scan_fwd", _scan_label(batch, L, dim, N, "sequential", "training"), SK,
                                    _only(SK, args), (batch, _cdiv(dim, block_d)), num_warps=warps,
                                    loop_elements=min(block_d, dim) * N, inner_loops=1, config=cfg))
    return cases


@register("scan_bwd")
def _scan_bwd() -> List[KernelCase]:
    """The backward the host runs at each shape, and the sequential backward (short L, and every L
    under torch.use_deterministic_algorithms) at all of them."""
    from m2rec_kernels.scan import function as F
    from m2rec_kernels.scan.kernels import selective_scan_bwd_kernel as SK
    from m2rec_kernels.scan.parallel_kernels import selective_scan_parallel_bwd_kernel as PK
    cases = []
    for batch, L, dim, N in SCAN_SHAPES:
        tile, block_d, warps = F.parallel_config_gpu(L)
        n_tiles = _cdiv(L, tile)
        align = F._alignment(L, torch.float32, dim * L, L, 2 * dim * L, N * L)
        cfg = dict(TILE=tile, BLOCK_D=block_d, ALIGN=align, THREAD_STEPS=F.thread_steps(tile, warps),
                   FLIP_BY_GATHER=F.FLIP_BY_GATHER)
        args = dict(_scan_io(), **_parallel_io(batch, dim, L, N), states_ptr=tensor(), dstate_ptr=tensor(),
                    dB_ptr=tensor(), dC_ptr=tensor(), batch=batch, dim=dim, L=L, N=N, n_tiles=n_tiles, **_SCAN_FLAGS,
                    HAS_DSTATE=n_tiles > 1, MULTI_TILE=n_tiles > 1, **cfg)
        cases.append(KernelCase("scan_bwd", _scan_label(batch, L, dim, N, "parallel"), PK, _only(PK, args),
                                (batch, _cdiv(dim, block_d)), num_warps=warps,
                                loop_elements=block_d * min(tile, L), inner_loops=1, config=cfg))
    for batch, L, dim, N in SCAN_SHAPES + ((GPU.scan[0], 32, GPU.scan[2], GPU.scan[3]),):
        block_d, warps = F.bwd_config_gpu(N)
        block_n, chunk = F._block_n(N), F._chunk(L)
        cfg = dict(CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
        args = dict(_scan_io(), batch=batch, dim=dim, L=L, N=N, n_chunks=_cdiv(L, chunk), **_SCAN_FLAGS,
                    HAS_DLAST=False, **_SEQUENTIAL_BC, **cfg)
        # two innermost loops per chunk, each once per step: the recomputation and the reverse walk
        cases.append(KernelCase("scan_bwd", _scan_label(batch, L, dim, N, "sequential"), SK, _only(SK, args),
                                (batch, _cdiv(dim, block_d)), num_warps=warps, maxnreg=F.SEQUENTIAL_BWD_MAXNREG,
                                loop_elements=min(block_d, dim) * N, inner_loops=2, config=cfg))
    return cases


#: The other forms of B and C (m2rec_kernels/scan/bc_forms.py) in the time-parallel kernels, which run
#: them at every L (function.use_time_parallel), each form once as B and once as C: grouped with G = 4
#: and time-invariant (dim, N). The sequential kernels take them only under deterministic algorithms
#: (compiled at L 32 their backward spills 8 bytes there; not listed).
_BC_FORM_PAIRS = (("grouped G4", "time-invariant"), ("time-invariant", "grouped G4"))


def _bc_form_args(form: str, which: str, dim: int, L: int, N: int) -> Dict[str, object]:
    """The B or C arguments the host passes for ``form``, contiguous (function._parallel_bc)."""
    if form == "time-invariant":  # (dim, N)
        return {f"s_{which}_b": 0, f"s_{which}_g": N, f"s_{which}_n": 1, f"{which}_group_size": 1,
                f"{which}_FORM": 2}
    G = int(form.split("G")[-1])  # (batch, G, N, L)
    return {f"s_{which}_b": G * N * L, f"s_{which}_g": N * L, f"s_{which}_n": L, f"{which}_group_size": dim // G,
            f"{which}_FORM": 1}


@register("scan_bc_forms")
def _scan_bc_forms() -> List[KernelCase]:
    """The time-parallel forward (training: per-step output and tile states) and backward with grouped
    and time-invariant B / C (``_BC_FORM_PAIRS``) at batch 64, L 2000, configured as for the
    per-sequence form."""
    from m2rec_kernels.scan import function as F
    from m2rec_kernels.scan.parallel_kernels import selective_scan_parallel_bwd_kernel as PBK
    from m2rec_kernels.scan.parallel_kernels import selective_scan_parallel_fwd_kernel as PFK
    cases = []
    batch, dim, N = GPU.scan[0], GPU.scan[2], GPU.scan[3]
    L = 2000
    for B_form, C_form in _BC_FORM_PAIRS:
        forms = f"B {B_form}, C {C_form}"
        tile, block_d, warps = F.parallel_config_gpu(L)
        n_tiles = _cdiv(L, tile)
        align = F._alignment(L, torch.float32, dim * L, L, 2 * dim * L, N * L)
        bc = dict(_bc_form_args(B_form, "B", dim, L, N), **_bc_form_args(C_form, "C", dim, L, N))
        cfg = dict(TILE=tile, BLOCK_D=block_d, ALIGN=align)
        args = dict(_scan_io(), **dict(_parallel_io(batch, dim, L, N), **bc), out_last_ptr=tensor(),
                    states_ptr=tensor(), dim=dim, L=L, N=N, n_tiles=n_tiles, **_SCAN_FLAGS, STORE_OUT=True,
                    STORE_STATES=True, STORE_LAST_OUT=False, MULTI_TILE=True, BLOCK_N=F._block_n(N), **cfg)
        cases.append(KernelCase("scan_fwd", _scan_label(batch, L, dim, N, "parallel", forms), PFK, _only(PFK, args),
                                (batch, _cdiv(dim, block_d)), num_warps=warps, loop_elements=block_d * tile,
                                inner_loops=1, config=cfg))
        cfg = dict(cfg, THREAD_STEPS=F.thread_steps(tile, warps), FLIP_BY_GATHER=F.FLIP_BY_GATHER)
        args = dict(_scan_io(), **dict(_parallel_io(batch, dim, L, N), **bc), states_ptr=tensor(),
                    dstate_ptr=tensor(), dB_ptr=tensor(), dC_ptr=tensor(), batch=batch, dim=dim, L=L, N=N,
                    n_tiles=n_tiles, **_SCAN_FLAGS, HAS_DSTATE=True, MULTI_TILE=True, **cfg)
        cases.append(KernelCase("scan_bwd", _scan_label(batch, L, dim, N, "parallel", forms), PBK, _only(PBK, args),
                                (batch, _cdiv(dim, block_d)), num_warps=warps, loop_elements=block_d * tile,
                                inner_loops=1, config=cfg))
    return cases


@register("selective_state_update")
def _state_update() -> List[KernelCase]:
    from m2rec_kernels.scan import function as F
    from m2rec_kernels.scan.kernels import selective_state_update_kernel
    cases = []
    for batch in sorted({s[0] for s in SCAN_SHAPES}, reverse=True):
        dim, N = SCAN_SHAPES[0][2], SCAN_SHAPES[0][3]
        block_n = F._block_n(N)
        block_d = max(16, min(64, 4096 // block_n))  # as selective_state_update_triton
        t = tensor()
        args = dict(state_ptr=t, x_ptr=t, dt_ptr=t, A_ptr=t, B_ptr=t, C_ptr=t, D_ptr=t, z_ptr=t, bias_ptr=t,
                    idx_ptr=tensor(torch.int64), out_ptr=t, dim=dim, N=N, HAS_D=True, HAS_Z=True, HAS_BIAS=True,
                    SOFTPLUS=True, HAS_INDICES=True, BLOCK_D=block_d, BLOCK_N=block_n)
        cases.append(KernelCase("selective_state_update", f"B{batch} d{dim} N{N} (one step)",
                                selective_state_update_kernel, args, (batch, _cdiv(dim, block_d)), num_warps=4,
                                config=dict(BLOCK_D=block_d, BLOCK_N=block_n)))
    return cases


# --------------------------------------------------------------------------------------------------
# FFT filter, dense DFT (m2rec_kernels/freq_filter/kernels.py): no longer routed by fft_filter (the direct
# kernel below does fewer multiply-adds, freq_filter/paths.py) but kept and timed ("triton-dft" op row)
# until a GPU run settles it. Causal-mode shapes, every GPU_CONFIGS entry, fp32 "ieee".
# --------------------------------------------------------------------------------------------------

@register("dft_filter")
def _dft_filter() -> List[KernelCase]:
    from m2rec_kernels.freq_filter import causal_n_fft
    from m2rec_kernels.freq_filter import function as F
    from m2rec_kernels.freq_filter.kernels import dft_filter_kernel
    cases = []
    for batch, L, d in SEQ_SHAPES:
        n_fft = causal_n_fft(L, L)
        n_freq = n_fft // 2 + 1
        for pass_, flags in (("fwd", dict(CONJ_W=False, WITH_DW=False, WRITE_Y=True)),
                             ("bwd", dict(CONJ_W=True, WITH_DW=True, WRITE_Y=True))):
            for cfg in F.GPU_CONFIGS:
                t = tensor()
                args = dict(x_ptr=t, w_ptr=t, y_ptr=t, spec_ptr=t, saved_ptr=t, dw_ptr=t,
                            cr_ptr=t, ci_ptr=t, ar_ptr=t, ai_ptr=t, L=L, D=d, F=n_freq, N_FFT=n_fft,
                            # x (B, L, d) and y contiguous; the weight's real view (F, d, 2)
                            stride_xb=L * d, stride_xt=d, stride_xd=1, stride_wf=2 * d, stride_wd=2, stride_wc=1,
                            stride_yb=L * d, stride_yt=d, stride_yd=1, PRECISION="ieee", **flags, **cfg.kwargs)
                cases.append(KernelCase(
                    f"dft_filter_{pass_}", f"B{batch} L{L} d{d} n_fft{n_fft}", dft_filter_kernel, args,
                    (batch, _cdiv(d, cfg.kwargs["BLOCK_D"])), num_warps=cfg.num_warps,
                    num_stages=getattr(cfg, "num_stages", None),
                    note="one of the autotuned configurations", config=dict(cfg.kwargs)))
    return cases


# --------------------------------------------------------------------------------------------------
# direct (Toeplitz) filter (m2rec_kernels/freq_filter/toeplitz_*): what causal_filter (the model's causal
# mode, K = L taps) and fft_filter (taps irfft(W), lags mod n_fft) run for L <= paths.DIRECT_MAX_L.
# Fixed tiles per batch size (toeplitz_function.tiles_for), num_stages 1, fp32 "ieee".
# --------------------------------------------------------------------------------------------------

def _toeplitz_args(batch: int, L: int, d: int, K: int, wrap: int, anti: bool, tiles) -> Dict[str, object]:
    t = tensor()
    # x, y contiguous (B, L, d); the taps channel-major (d, K) as the launcher passes them
    return dict(x_ptr=t, k_ptr=t, y_ptr=t, B=batch, L=L, K=K, N_WRAP=wrap,
                stride_xb=L * d, stride_xt=d, stride_xd=1, stride_kk=1, stride_kd=K,
                stride_yb=L * d, stride_yt=d, stride_yd=1, ANTI=anti, WRAP=wrap > 0, PRECISION="ieee",
                BLOCK_T=tiles.block_t, BLOCK_S=tiles.block_t, BLOCK_B=tiles.block_b)


def _direct_filter_shapes():
    """The sequence-op bench shapes at batch 64 and 1 that the direct kernel runs (L <= DIRECT_MAX_L)."""
    from m2rec_kernels.freq_filter import paths
    return [(b, L, d) for b, L, d in SEQ_SHAPES + tuple((1, L, d) for _, L, d in SEQ_SHAPES)
            if L <= paths.DIRECT_MAX_L]


@register("toeplitz_filter")
def _toeplitz_filter() -> List[KernelCase]:
    """causal_filter forward and dx (ANTI) at K = L; fft_filter's forward (WRAP = n_fft, the causal
    mode's n_fft); batch 64 and 1. Per element = per multiply-add of a BLOCK_T x BLOCK_S x BLOCK_B tile."""
    from m2rec_kernels.freq_filter import causal_n_fft
    from m2rec_kernels.freq_filter.toeplitz_function import tiles_for
    from m2rec_kernels.freq_filter.toeplitz_kernels import toeplitz_filter_kernel as TK
    cases = []
    for batch, L, d in _direct_filter_shapes():
        tiles = tiles_for(batch, L)
        grid = (d, _cdiv(L, tiles.block_t), _cdiv(batch, tiles.block_b))
        n_fft = causal_n_fft(L, L)
        for mode, wrap, anti in (("causal_filter fwd", 0, False), ("causal_filter dx", 0, True),
                                 ("fft_filter fwd", n_fft, False)):
            cases.append(KernelCase(
                "toeplitz_filter", f"B{batch} L{L} d{d} {mode}", TK,
                _toeplitz_args(batch, L, d, n_fft if wrap else L, wrap, anti, tiles), grid,
                num_warps=tiles.num_warps, num_stages=1,
                loop_elements=tiles.block_t * tiles.block_t * tiles.block_b, inner_loops=1,
                config=dict(BLOCK_T=tiles.block_t, BLOCK_S=tiles.block_t, BLOCK_B=tiles.block_b)))
    return cases


@register("toeplitz_corr")
def _toeplitz_corr() -> List[KernelCase]:
    """The tap gradient dk[j] = sum_b sum_t dy[b, t] x[b, t - j] (causal_filter backward, K = L)."""
    from m2rec_kernels.freq_filter.toeplitz_function import tiles_for
    from m2rec_kernels.freq_filter.toeplitz_kernels import toeplitz_corr_kernel as CK
    cases = []
    for batch, L, d in _direct_filter_shapes():
        tiles = tiles_for(batch, L)
        P = tiles.block_t
        bands = _cdiv(L, P)   # K = L: every lag band (toeplitz_corr)
        t = tensor()
        args = dict(a_ptr=t, v_ptr=t, part_ptr=t, B=batch, L=L, D=d, N_BANDS=bands,
                    stride_ab=L * d, stride_at=d, stride_ad=1, stride_vb=L * d, stride_vt=d, stride_vd=1,
                    PRECISION="ieee", BLOCK_P=P, BLOCK_B=tiles.block_b)
        cases.append(KernelCase(
            "toeplitz_corr", f"B{batch} L{L} d{d} causal_filter dk", CK, args,
            (d, bands, _cdiv(batch, tiles.block_b)), num_warps=tiles.num_warps, num_stages=1,
            loop_elements=P * P * tiles.block_b, inner_loops=1,
            config=dict(BLOCK_P=P, BLOCK_B=tiles.block_b)))
    return cases


# --------------------------------------------------------------------------------------------------
# gated fusion (m2rec_kernels/fusion): 3 branches, training (dropout on) forward and backward
# --------------------------------------------------------------------------------------------------

@register("gated_fusion")
def _gated_fusion() -> List[KernelCase]:
    from m2rec_kernels.fusion import function as F
    from m2rec_kernels.fusion.kernels import _gated_fusion_bwd_kernel, _gated_fusion_fwd_kernel
    cases = []
    for batch, L, d in SEQ_SHAPES:
        m = batch * L
        block_m, block_d, warps = F._block_sizes(d)
        label = f"B{batch} L{L} d{d} k3"
        t = tensor()
        cfg = dict(BLOCK_M=block_m, BLOCK_D=block_d)
        fwd = dict(x0_ptr=t, x1_ptr=t, x2_ptr=t, res_ptr=t, w_ptr=t, bg_ptr=t, lnw_ptr=t, lnb_ptr=t,
                   out_ptr=t, alpha_ptr=t, mean_ptr=t, rstd_ptr=t, M=m, D=d, eps=1e-12, p=0.2, scale=1.25,
                   seed_ptr=tensor(torch.int64), K=3, HAS_DROPOUT=True, **cfg)
        cases.append(KernelCase("gated_fusion_fwd", label, _gated_fusion_fwd_kernel,
                                _rename(_gated_fusion_fwd_kernel, fwd), (_cdiv(m, block_m),), num_warps=warps,
                                config=cfg))
        n_tiles = _cdiv(m, block_m)
        programs = F.bwd_programs_gpu(n_tiles, H200_SMS)
        per = _cdiv(n_tiles, programs)
        programs = _cdiv(n_tiles, per)
        bwd = dict(x0_ptr=t, x1_ptr=t, x2_ptr=t, res_ptr=t, w_ptr=t, lnw_ptr=t, alpha_ptr=t, mean_ptr=t,
                   rstd_ptr=t, dout_ptr=t, dgates_ptr=t, dx0_ptr=t, dx1_ptr=t, dx2_ptr=t, dres_ptr=t,
                   dw_part_ptr=t, dbg_part_ptr=t, dlw_part_ptr=t, dlb_part_ptr=t, M=m, D=d,
                   tiles_per_program=per, p=0.2, scale=1.25, seed_ptr=tensor(torch.int64), K=3, HAS_DROPOUT=True,
                   HAS_DGATES=False, **cfg)
        cases.append(KernelCase("gated_fusion_bwd", label, _gated_fusion_bwd_kernel,
                                _rename(_gated_fusion_bwd_kernel, bwd), (programs,), num_warps=warps,
                                config=dict(cfg, tiles_per_program=per)))
    return cases


def _rename(fn, values: Dict[str, object]) -> Dict[str, object]:
    """Map ``values`` given in the launch wrapper's order onto the kernel's own parameter names
    (the fusion kernels name their parameters differently from the wrapper's variables)."""
    names = list(fn.arg_names)
    if len(names) != len(values):
        raise ValueError(f"{fn.__name__}: {len(names)} parameters, {len(values)} values given")
    return dict(zip(names, values.values()))
