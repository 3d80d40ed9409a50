"""What the compiled CPU kernels' tests share: the library's load status and the ISA variants each
kernel is checked in (every variant the build holds and this CPU runs; the others skip, saying why)."""
import pytest

from m2rec_kernels.scan import cpu as scan_cpu

STATUS = scan_cpu.cpu_scan_status()
needs_lib = pytest.mark.skipif(not STATUS.available, reason=STATUS.describe())
ISAS = ["avx512", "avx2", "generic"]


def isa_or_skip(isa: str, op_unavailable=None) -> str:
    """``isa`` when the library is loaded and that variant runs here; else the test skips. With
    ``op_unavailable`` (an op's status function: None or why not), also when that op cannot run."""
    if not STATUS.available:
        pytest.skip(STATUS.describe())
    why = op_unavailable() if op_unavailable is not None else None
    if why is not None:
        pytest.skip(f"the compiled op is not available: {why}")
    if not scan_cpu.isa_available(isa):
        pytest.skip(f"the {isa} variant is not built or this CPU lacks its instructions")
    return isa
