"""Test configuration.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before anything
imports a kernel module, so that the Triton kernels run on CPU tensors (DESIGN §5). A GPU run sets
M2REC_GPU_TESTS=1 to keep the kernels compiled.
"""
import os

if os.environ.get("M2REC_GPU_TESTS", "0") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_report_header(config):
    """Which selective scan backend="auto" runs on CPU tensors in this session: the compiled kernels
    (and their ISA variant) or, when they are not built, the PyTorch reference and why."""
    from m2rec_kernels.scan.cpu import cpu_scan_status

    return f"m2rec selective scan on CPU: {cpu_scan_status().describe()}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """CUDA when available (GPU check), else CPU (kernels then run under the Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
