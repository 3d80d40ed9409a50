"""Tests of gpu-check's tooling: the priority steps, the time budget, the carried mamba_ssm build, the
build script's generated sources and the unfused row's CPU limits. No GPU needed; no ``benchmark``
fixture, so ``--benchmark-only`` skips them and the test command runs them.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from . import build_mamba_scan, gpu_check, mamba_build
from .availability import budget_not_run_reason, unfused_m2rec_not_run_reason
from .priorities import HEADLINE_MODELS, selected_steps, step_of

ROOT = Path(__file__).resolve().parent.parent


def test_step_of_puts_the_issue_comparison_first():
    for name, backend in HEADLINE_MODELS:
        for L in (200, 2000):
            for batch in (64, 1):
                assert step_of("test_inference", dict(name=name, backend=backend, L=L, batch=batch)) == "headline"
    assert step_of("test_inference", dict(name="m2rec", backend="torch", L=200, batch=64)) == "inference"
    assert step_of("test_inference", dict(name="m2rec", backend="triton", L=1000, batch=64)) == "inference"
    assert step_of("test_train_step", dict(name="sasrec", backend="sdpa", L=200, batch=256)) == "training"
    assert step_of("test_op", dict(op="selective_scan", backend="triton", pass_="forward")) == "ops"
    assert step_of("test_streaming", {}) == "other"
    with pytest.raises(ValueError, match="M2REC_BENCH_STEPS"):
        selected_steps("headline,warmup")


def test_bench_steps_select_rows_by_parameters(tmp_path):
    """M2REC_BENCH_STEPS deselects rows at collection: the GPU grid's headline step is exactly the
    issue's rows (both files: 16 inference rows, 8 training rows: no batch-1 training on the grid)."""
    env = dict(os.environ, M2REC_BENCH_STEPS="headline", M2REC_BENCH_GRID="gpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("M2REC_BENCH_SMOKE", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "bench/test_bench_inference.py", "bench/test_bench_training.py",
                           "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert len([i for i in ids if "test_inference" in i]) == 16, ids
    assert len([i for i in ids if "test_train_step" in i]) == 8, ids
    assert all(("L200-" in i or "L2000-" in i) and ("-b64]" in i or "-b1]" in i) for i in ids), ids
    assert not any("m2rec-torch" in i for i in ids)


def test_budget_reason_follows_the_deadline(monkeypatch):
    monkeypatch.delenv("M2REC_BENCH_DEADLINE", raising=False)
    assert budget_not_run_reason() is None
    monkeypatch.setenv("M2REC_BENCH_DEADLINE", str(time.time() + 3600))
    assert budget_not_run_reason() is None
    monkeypatch.setenv("M2REC_BENCH_DEADLINE", "0")
    assert "time budget" in budget_not_run_reason()
    monkeypatch.setenv("M2REC_BENCH_DEADLINE", "soon")
    with pytest.raises(ValueError, match="M2REC_BENCH_DEADLINE"):
        budget_not_run_reason()


def test_unfused_row_limits_on_cpu(monkeypatch):
    monkeypatch.delenv("M2REC_BENCH_SMOKE", raising=False)
    cpu = torch.device("cpu")
    assert unfused_m2rec_not_run_reason(cpu, "inference", 200, 64) is None
    assert unfused_m2rec_not_run_reason(cpu, "inference", 2000, 1) is None
    assert "GiB" in unfused_m2rec_not_run_reason(cpu, "inference", 1000, 64)
    assert unfused_m2rec_not_run_reason(cpu, "training", 50, 32) is None
    assert "quadratic" in unfused_m2rec_not_run_reason(cpu, "training", 200, 32)
    if not torch.cuda.is_available():  # no carried build on a CPU machine: the CUDA row says why
        from m2rec.mamba_ssm_compat import import_mamba_ssm

        if import_mamba_ssm()[1] != "cuda":
            assert "selective_scan_cuda" in unfused_m2rec_not_run_reason(torch.device("cuda"), "inference", 200, 64)


def _fake_archive(path: Path, info: dict) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("BUILD-INFO.json", json.dumps(info).encode()), ("marker.txt", b"unpacked")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def test_carried_build_is_used_only_when_it_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    empty = tmp_path / "empty"
    empty.mkdir()
    status = mamba_build.activate(tmp_path / "unpack0", explicit=str(empty))
    assert not status["active"] and "build-mamba-scan" in status["reason"]

    other = _fake_archive(tmp_path / "mamba-scan-sm90-torch1.0.0.tar.gz", {"torch": "1.0.0+cu999", "arch": "sm_90"})
    status = mamba_build.activate(tmp_path / "unpack1", explicit=str(other))
    assert not status["active"] and "torch 1.0.0+cu999" in status["reason"]

    here = torch.__version__.split("+")[0]
    fits = _fake_archive(tmp_path / f"mamba-scan-sm90-torch{here}.tar.gz", {"torch": torch.__version__, "arch": "sm_90"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = mamba_build.activate(tmp_path / "unpack2", explicit=str(fits))
    assert status["active"], status
    assert (tmp_path / "unpack2" / "marker.txt").read_text() == "unpacked"
    assert sys.path[0] == str(tmp_path / "unpack2")
    assert os.environ["PYTHONPATH"].startswith(str(tmp_path / "unpack2"))
    assert mamba_build.mismatch({"torch": torch.__version__, "arch": "sm_80"}, torch.__version__, (9, 0))


def test_build_script_writes_only_the_needed_instantiations(tmp_path):
    cus = build_mamba_scan.write_sources(tmp_path)
    assert sorted(p.name for p in cus) == ["instance_bwd_bf16.cu", "instance_bwd_fp32.cu", "instance_fwd_bf16.cu",
                                            "instance_fwd_fp32.cu"]
    assert "selective_scan_bwd_cuda<at::BFloat16, float>" in (tmp_path / "instance_bwd_bf16.cu").read_text()
    stubs = (tmp_path / "stubs.cpp").read_text()
    assert stubs.count("TORCH_CHECK(false") == 8 and "c10::complex<float>" in stubs and "c10::Half" in stubs
    binding = (tmp_path / "binding.cpp").read_text()
    assert '#include "selective_scan.cpp"' in binding and "TORCH_LIBRARY(mamba_selective_scan" in binding
    assert "PYBIND11_MODULE" in (tmp_path / "shadow" / "torch" / "python.h").read_text()
    assert build_mamba_scan.archive_name("90", "2.11.0+cu130") == "mamba-scan-sm90-torch2.11.0.tar.gz"


def test_junit_counts_and_test_selection(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="boom"/></testcase>'
                   '<testcase classname="a" name="skip"><skipped message="needs a CUDA device"/></testcase>'
                   '</testsuite></testsuites>')
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failures"][0]["message"] == "boom"
    files = gpu_check.test_selection()
    assert files[0] == "tests/test_gpu_kernels.py" and "tests/test_scan_triton.py" in files
    assert all(Path(ROOT / f).exists() for f in files)
