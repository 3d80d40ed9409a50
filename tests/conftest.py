"""Test configuration.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before anything
imports a kernel module, so that the Triton kernels run on CPU tensors (DESIGN §5). A GPU run sets
M2REC_GPU_TESTS=1 to keep the kernels compiled.
"""
import os
import time

if os.environ.get("M2REC_GPU_TESTS", "0") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from _interpreter_scan import install as _install_fast_scan  # noqa: E402

    _install_fast_scan()  # tl.associative_scan sliced along its axis (tests/_interpreter_scan.py)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def _cpu_scan_line() -> str:
    """Which selective scan backend="auto" runs on CPU tensors in this session: the compiled kernels
    (and their ISA variant) or, when they are not built, the PyTorch reference and why."""
    from m2rec_kernels.scan.cpu import cpu_scan_status

    return f"m2rec selective scan on CPU: {cpu_scan_status().describe()}"


def pytest_report_header(config):
    return _cpu_scan_line()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(_cpu_scan_line())  # also under -q, which hides the header


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    # gpu-check (bench/gpu_check.py) bounds its correctness step: past this time the remaining tests
    # are skipped (and say why) instead of the step being killed with no report.
    deadline = os.environ.get("M2REC_TEST_DEADLINE", "")
    if deadline and time.time() > float(deadline):
        pytest.skip("gpu-check: the correctness step's time budget was spent before this test")


@pytest.fixture(autouse=True, scope="session")
def _text_embedding_cache(tmp_path_factory):
    """Tests never write into the user's own cache folder (~/.cache/m2rec); subprocesses inherit it."""
    if not os.environ.get("M2REC_CACHE_DIR"):
        os.environ["M2REC_CACHE_DIR"] = str(tmp_path_factory.mktemp("m2rec-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """CUDA when available (GPU check), else CPU (kernels then run under the Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
