"""pytest configuration for the benchmark suite (``pytest bench/ --benchmark-only``).

* Nothing here sets ``TRITON_INTERPRET``: a timing run must use compiled Triton (CUDA) or none at all.
  The test command sets it itself (together with ``M2REC_BENCH_SMOKE=1`` and ``--benchmark-disable``).
* CPU timings use ``M2REC_BENCH_THREADS`` math threads (default 1, see ``grids.cpu_threads``).
* Rows that cannot run on this machine (Triton without CUDA, mamba_ssm's CUDA scan when it is missing,
  mamba_ssm's reference backward on CPU) are recorded with the ``not_run`` fixture and then skipped;
  when ``M2REC_BENCH_NOT_RUN_FILE`` names a file, they are written there as JSON at the end of the
  session, and ``bench/run_suite.py`` merges them into the results as rows with status "not run".
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from .grids import bench_device, cpu_threads, current_grid, smoke_mode
from .priorities import selected_steps, step_of

_NOT_RUN_KEY = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[_NOT_RUN_KEY] = []
    if not torch.cuda.is_available() and not smoke_mode():
        # timing runs only (the smoke run shares its process with tests/): see grids.cpu_threads
        torch.set_num_threads(cpu_threads())


def pytest_collection_modifyitems(config, items):
    # gpu-check runs the bench one priority step at a time (bench/priorities.py)
    raw = os.environ.get("M2REC_BENCH_STEPS", "")
    if not raw:
        return
    keep = selected_steps(raw)
    chosen, dropped = [], []
    for item in items:
        params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
        (chosen if step_of(item.originalname, params) in keep else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = chosen


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("M2REC_BENCH_NOT_RUN_FILE")
    rows = session.config.stash.get(_NOT_RUN_KEY, [])
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1)


@pytest.fixture
def not_run(request):
    """``not_run(reason, **fields)``: record a row that was not run on this machine, then skip
    (``skip=False``: record it and go on, for a row that another one stands in for)."""

    def record(reason: str, skip: bool = True, **fields):
        row = dict(fields, status="not run", reason=reason, test=request.node.nodeid)
        request.config.stash[_NOT_RUN_KEY].append(row)
        if skip:
            pytest.skip(f"not run: {reason}")

    return record


@pytest.fixture(scope="session")
def grid():
    return current_grid()


@pytest.fixture(scope="session")
def bench_dev():
    return bench_device()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
