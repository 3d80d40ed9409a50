"""The static kernel report (bench/kernel_stats.py): its SASS loop finder on known text, and the
compiled kernels at the host's configurations — no spills, and the time-parallel scan's inner
loop within its instruction budget. Compiling needs triton's CUDA backend (no GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/                   NOP ;
        /*0030*/                   FFMA R4, R2, R3, R4 ;
        /*0040*/               @P0 BRA 0x60 ;
        /*0050*/                   FMUL R4, R4, R4 ;
        /*0060*/              @!P1 BRA 0x10 ;
        /*0070*/                   MUFU.EX2 R5, R4 ;
        /*0080*/                   SHFL.UP PT, R6, R5, 0x1, RZ ;
        /*0090*/               @P2 BRA 0x70 ;
        /*00a0*/                   FADD R7, R6, R5 ;
        /*00b0*/                   BRA 0x0 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0 ;
"""


def test_innermost_loops_are_found_by_their_backward_branches():
    sys.path.insert(0, str(ROOT))
    from bench.kernel_stats import innermost_loops, occupancy, parse_sass

    loops = innermost_loops(parse_sass(SASS))
    # 0x10-0x60 and 0x70-0x90 are innermost (0x0-0xb0 contains them; 0xd0 is the trap self-loop)
    assert [(lp["start"], lp["end"]) for lp in loops] == [("0x10", "0x60"), ("0x70", "0x90")]
    assert loops[0]["instructions"] == 5 and loops[0]["forward_branches"] == 1  # the NOP is not counted
    assert loops[1]["instructions"] == 3 and loops[1]["mufu"] == 1 and loops[1]["shfl"] == 1
    # occupancy on sm_90: 168 registers x 2 warps -> 6 programs per SM (registers); 32 x 1 warp -> 32 (blocks)
    assert occupancy(168, 1024, 2) == dict(programs_per_sm=6, limited_by="registers", warps_per_sm=12)
    assert occupancy(32, 1024, 1)["programs_per_sm"] == 32
    assert occupancy(64, 120 * 1024, 1)["limited_by"] == "shared memory"


# Every registered kernel at the host's configurations (tests/test_filter_sm90.py compiles the filter
# kernels at every tile choice too, and in low precision).
CHECKED = ["scan_fwd", "scan_bwd", "scan_bc_forms", "selective_state_update", "gated_fusion", "toeplitz_filter",
           "toeplitz_corr", "dft_filter"]


def test_registered_kernels_compile_for_sm90_without_spills(tmp_path):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the triton build
        pytest.skip(f"triton has no CUDA backend to compile with: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_stats", "--only", *CHECKED, "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "kernel-stats.json").read_text())
    cases = report["cases"]
    assert {c["kernel"] for c in cases} >= {"scan_fwd", "scan_bwd", "selective_state_update", "gated_fusion_fwd",
                                            "gated_fusion_bwd", "toeplitz_filter", "toeplitz_corr", "dft_filter_fwd"}
    for c in cases:
        assert c["spill_bytes"] == 0 and c["spill_instructions"] == 0, f"{c['kernel']} {c['shape']} spills"
    parallel_fwd = [c for c in cases if c["kernel"] == "scan_fwd" and "parallel" in c["shape"]]
    assert parallel_fwd
    for c in parallel_fwd:  # the goal for the scan's inner loop
        assert c["warp_instructions_per_element"] is not None and c["warp_instructions_per_element"] <= 0.9, c["shape"]
    # the time-parallel backward: not back to its first form (1.85-2.05 warp instructions per
    # element; one 8-warp program per SM at L 2000)
    parallel_bwd = [c for c in cases if c["kernel"] == "scan_bwd" and "parallel" in c["shape"]]
    assert parallel_bwd
    for c in parallel_bwd:
        assert c["warp_instructions_per_element"] is not None and c["warp_instructions_per_element"] <= 1.7, c["shape"]
        assert c["programs_per_sm"] * c["num_warps"] >= 8, c["shape"]
