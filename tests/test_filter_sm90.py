"""The filter kernels compile for an sm_90 GPU at the host's configurations without spilling registers.

No GPU needed: the kernels are compiled (not run) through ``tests/_sm90.py``. The interpreter executes
the Python directly and cannot catch what only the compiler rejects; spills are the static sign of a
slow configuration (DESIGN §10). Checked:
* the direct Toeplitz kernel at every tile choice ``tiles_for`` can make (causal forward), and at the
  bench shape's tiles for every flag combination (dx, the general-weight wrap, fp16/bf16 inputs);
* its tap-gradient correlation kernel at every tile choice (and bf16 inputs at the bench tiles);
* the dense-DFT kernel at its GPU autotune configs (num_stages 1), forward and backward flags.
"""
from _sm90 import compile_sm90

BODY = """
from m2rec_kernels.freq_filter import toeplitz_kernels as TK, kernels as DK
from m2rec_kernels.freq_filter.function import GPU_CONFIGS
from m2rec_kernels.freq_filter.toeplitz_function import HOST_TILES, tiles_for

def i32(*names):
    return dict.fromkeys(names, "i32")

FILTER_INTS = i32("B", "L", "K", "N_WRAP", "stride_xb", "stride_xt", "stride_xd", "stride_kk", "stride_kd",
                  "stride_yb", "stride_yt", "stride_yd")
# as launched on contiguous x (B, L, d) and channel-major taps (d, K): unit strides along d and lags
FILTER_SPEC = dict(ones=("stride_xd", "stride_kk", "stride_yd"),
                   div16=("x_ptr", "k_ptr", "y_ptr", "stride_xb", "stride_xt", "stride_yb", "stride_yt"))

def build_filter(dt, tiles, anti=False, wrap=False):
    types = dict(FILTER_INTS, x_ptr="*" + dt, k_ptr="*fp32", y_ptr="*" + dt)
    consts = dict(ANTI=anti, WRAP=wrap, PRECISION="ieee", BLOCK_T=tiles.block_t, BLOCK_S=tiles.block_t,
                  BLOCK_B=tiles.block_b)
    build(TK.toeplitz_filter_kernel, types, consts, tiles.num_warps, 1, **FILTER_SPEC,
          label=f"toeplitz_filter {dt} anti={anti} wrap={wrap} {tuple(tiles)}")

for tiles in HOST_TILES:
    build_filter("fp32", tiles)
bench = tiles_for(64, 200)
for anti, wrap in ((True, False), (False, True), (True, True)):
    build_filter("fp32", bench, anti, wrap)
build_filter("bf16", bench)
build_filter("fp16", bench, anti=True)

CORR_INTS = i32("B", "L", "D", "N_BANDS", "stride_ab", "stride_at", "stride_ad", "stride_vb", "stride_vt", "stride_vd")

def build_corr(dt, tiles):
    build(TK.toeplitz_corr_kernel, dict(CORR_INTS, a_ptr="*" + dt, v_ptr="*" + dt, part_ptr="*fp32"),
          dict(PRECISION="ieee", BLOCK_P=tiles.block_t, BLOCK_B=tiles.block_b), tiles.num_warps, 1,
          ones=("stride_ad", "stride_vd"),
          div16=("a_ptr", "v_ptr", "part_ptr", "stride_ab", "stride_at", "stride_vb", "stride_vt", "D"),
          label=f"toeplitz_corr {dt} {tuple(tiles)}")

for tiles in HOST_TILES:
    build_corr("fp32", tiles)
build_corr("bf16", bench)

DFT_TYPES = dict(i32("L", "D", "F", "N_FFT", "stride_xb", "stride_xt", "stride_xd", "stride_wf", "stride_wd",
                     "stride_wc", "stride_yb", "stride_yt", "stride_yd"),
                 **{n: "*fp32" for n in ("x_ptr", "w_ptr", "y_ptr", "spec_ptr", "saved_ptr", "dw_ptr", "cr_ptr",
                                         "ci_ptr", "ar_ptr", "ai_ptr")})
for cfg in GPU_CONFIGS:
    for backward in (False, True):
        build(DK.dft_filter_kernel, DFT_TYPES,
              dict(cfg.kwargs, CONJ_W=backward, WITH_DW=backward, WRITE_Y=True, PRECISION="ieee"),
              cfg.num_warps, cfg.num_stages, ones=("stride_xd", "stride_yd", "stride_wc"),
              label=f"dft_filter backward={backward} {cfg.kwargs}")
"""


def test_filter_kernels_compile_for_sm90_without_spills(tmp_path):
    records = compile_sm90(BODY, tmp_path)
    assert len(records) == 6 + 3 + 2 + 6 + 1 + 4
    spilled = [r for r in records if r["spill_bytes"] > 0]
    assert not spilled, spilled
    assert all(r["regs"] <= 255 for r in records)
