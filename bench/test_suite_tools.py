"""Tests of the suite's own tooling (memory probes, tidy results, plots, run_suite end to end).

They use no ``benchmark`` fixture, so ``--benchmark-only`` skips them; the test command runs them.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .availability import cpu_scan_not_run_reason, triton_not_run_reason
from .memory_probe import probe_in_subprocess
from .plots import plot_results
from .results import attach_memory, load_results, rows_from_not_run, rows_from_pytest_benchmark, write_results

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_peak_sees_a_known_allocation():
    # cpu_peak_mb is meant for a fresh process (module doc): inside pytest's process, memory freed by
    # earlier tests can be reused without raising the high-water mark, so measure in a new interpreter.
    code = (
        "import json, torch\n"
        "from bench.memory_probe import cpu_peak_mb\n"
        "def allocate():\n"
        "    t = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB of touched pages: resident\n"
        "    return float(t[::4096].sum())\n"
        "print(json.dumps(cpu_peak_mb(allocate)))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    mb, method = json.loads(done.stdout.strip().splitlines()[-1])
    if "not resettable" in method:
        pytest.skip("this kernel refuses /proc/self/clear_refs: the in-process peak cannot be isolated")
    assert 63.0 <= mb < 64.0 + 32.0, (mb, method)


def test_probe_in_fresh_process_bounds_the_score_matrix():
    # The scores (batch, n_items + 1) in fp32 must be alive at the peak of the call: a lower bound that
    # does not come from the probe itself.
    batch, n_items = 16, 200_000
    row = probe_in_subprocess("sasrec", "sdpa", 8, batch, n_items, timeout=120)
    assert "error" not in row, row
    floor = batch * (n_items + 1) * 4 / 2 ** 20
    assert row["peak_mem_mb"] >= floor, (row, floor)
    assert row["peak_mem_mb"] < 20 * floor + 200, row


def _raw(mean_s, batch, **info):
    stats = dict(mean=mean_s, median=mean_s * 0.9, stddev=mean_s / 10, min=mean_s / 2, rounds=7)
    return {"extra_info": dict(info, batch=batch), "stats": stats}


def _example_rows():
    raw = {"benchmarks": [
        _raw(0.5, 64, kind="inference", name="m2rec", backend="torch", L=200, device="cpu", impl="x"),
        _raw(0.2, 64, kind="inference", name="m2rec", backend="cpu", L=200, device="cpu", impl="x"),
        _raw(0.3, 64, kind="inference", name="mamba4rec", backend="mixer-cpu", L=200, device="cpu", impl="x"),
        _raw(0.1, 64, kind="op_forward", name="selective_scan", backend="torch", L=200, device="cpu"),
        _raw(0.015, 64, kind="op_forward", name="selective_scan", backend="cpu", L=200, device="cpu"),
        _raw(0.011, 64, kind="op_forward", name="selective_scan_final", backend="cpu", L=200, device="cpu"),
        _raw(0.08, 64, kind="op_forward", name="selective_scan_final", backend="torch", L=200, device="cpu"),
        _raw(0.4, 64, kind="op_forward_backward", name="selective_scan", backend="torch", L=200, device="cpu"),
        _raw(0.07, 64, kind="op_forward_backward", name="selective_scan", backend="cpu", L=200, device="cpu"),
        _raw(0.09, 64, kind="training", name="m2rec", backend="cpu", L=50, device="cpu"),
        _raw(2.0, 64, kind="inference", name="sasrec", backend="sdpa", L=200, device="cpu"),
        _raw(0.25, 64, kind="inference", name="m2rec", backend="torch", L=50, device="cpu"),
        _raw(1.0, 64, kind="inference", name="sasrec", backend="sdpa", L=50, device="cpu"),
        _raw(0.004, 64, kind="op_forward", name="fft_filter", backend="torch", L=200, device="cpu"),
        _raw(0.002, 64, kind="op_forward", name="fft_filter", backend="torch.fft", L=200, device="cpu"),
        _raw(0.1, 64, kind="training", name="sasrec", backend="sdpa", L=50, device="cpu"),
        _raw(0.01, 64, kind="streaming", name="m2rec", backend="torch", L=200, device="cpu"),
        _raw(0.5, 64, kind="training_processes", name="m2rec", backend="torch, 1 process", L=200, device="cpu"),
        _raw(0.3, 64, kind="training_processes", name="m2rec", backend="torch, 2 processes", L=200, device="cpu"),
        {"extra_info": {}, "stats": {}},  # someone else's benchmark: ignored
    ]}
    not_run = [dict(kind="inference", name="m2rec", backend="triton", L=200, batch=64, reason="no CUDA"),
               dict(kind="streaming", name="m2rec", backend="triton", L=200, batch=64, reason="no CUDA"),
               dict(kind="op_forward", name="fft_filter", backend="triton", L=200, batch=64, reason="no CUDA")]
    return rows_from_pytest_benchmark(raw) + rows_from_not_run(not_run)


def test_tidy_rows_derive_per_sequence_and_throughput():
    rows = _example_rows()
    assert len(rows) == 22
    r = next(r for r in rows if r["kind"] == "inference" and r["name"] == "m2rec" and r["backend"] == "torch"
             and r["L"] == 200 and r["status"] == "ok")
    assert r["mean_ms"] == pytest.approx(500.0)
    assert r["per_seq_ms"] == pytest.approx(500.0 / 64)
    assert r["seq_per_s"] == pytest.approx(64 / 0.5)
    assert r["median_ms"] == pytest.approx(450.0) and r["stddev_ms"] == pytest.approx(50.0)
    nr = [r for r in rows if r["status"] == "not run"]
    assert {r["reason"] for r in nr} == {"no CUDA"}


def test_memory_probes_attach_to_their_rows_only():
    rows = attach_memory(_example_rows(), [
        dict(model="sasrec", backend="sdpa", L=200, batch=64, peak_mem_mb=12.5, method="m"),
        dict(model="sasrec", backend="sdpa", L=50, batch=64, error="probe exited 1: boom"),
        dict(model="m2rec", backend="torch", L=999, batch=64, peak_mem_mb=1.0, method="m"),  # no such row
    ])
    got = {(r["name"], r["L"]): (r.get("peak_mem_mb"), r.get("mem_method")) for r in rows
           if r["kind"] == "inference" and r["status"] == "ok"}
    assert got[("sasrec", 200)] == (12.5, "m")
    assert got[("sasrec", 50)][0] is None and "boom" in got[("sasrec", 50)][1]
    assert got[("m2rec", 200)][0] is None


def test_results_round_trip_and_plots(tmp_path):
    rows = _example_rows()
    meta = {"machine": {"cpu_model": "Test CPU", "cpu_cores": 2, "gpu": None, "torch": "t", "triton": "x",
                        "utc_time": "2030-01-01T00:00:00Z"}, "machine_tag": "cpu"}
    paths = write_results(tmp_path, "cpu", rows, meta)
    with open(paths["csv"]) as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == len(rows)
    csv_m2rec = next(r for r in csv_rows if r["name"] == "m2rec" and r["backend"] == "torch" and r["L"] == "200"
                     and r["status"] == "ok")
    assert float(csv_m2rec["per_seq_ms"]) == pytest.approx(500.0 / 64, rel=1e-5)
    data = load_results(paths["json"])
    assert data["machine"]["cpu_model"] == "Test CPU" and len(data["rows"]) == len(rows)
    pngs = plot_results(paths["json"])
    assert [p.name for p in pngs] == [f"bench-cpu-{w}.png" for w in ("latency", "memory", "speedup", "ops", "training",
                                                                      "streaming")]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_load_results_rejects_other_json(tmp_path):
    bad = tmp_path / "bench-cpu-results.json"
    bad.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="bench-cpu-results.json"):
        load_results(bad)


def test_triton_rows_are_never_timed_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("M2REC_BENCH_SMOKE", raising=False)
    assert "never timed" in triton_not_run_reason(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in triton_not_run_reason(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU layout of a smoke run")
def test_run_suite_smoke_end_to_end(tmp_path):
    env = dict(os.environ, M2REC_BENCH_SMOKE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "bench.run_suite", "--out", str(tmp_path), "--",
                           "-k", "sasrec or (fft_filter and not backward) or stream or m2rec-cpu",
                           "bench/test_bench_inference.py", "bench/test_bench_ops.py", "bench/test_bench_streaming.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = load_results(tmp_path / "bench-cpu-results.json")
    ok = {(r["kind"], r["name"], r["backend"]) for r in data["rows"] if r["status"] == "ok"}
    assert ("inference", "sasrec", "sdpa") in ok and ("op_forward", "fft_filter", "torch") in ok
    assert ("streaming", "m2rec", "torch") in ok
    # compiled Triton is unavailable here and the interpreter is never timed: recorded, not run
    triton = [r for r in data["rows"] if r["backend"] == "triton"]
    assert triton and all(r["status"] == "not run" and r["reason"] for r in triton)
    sasrec = next(r for r in data["rows"] if r["kind"] == "inference" and r["name"] == "sasrec"
                  and r["backend"] == "sdpa")  # (the compiled rows are not run in smoke: no probe)
    assert sasrec["peak_mem_mb"] is not None and sasrec["peak_mem_mb"] >= 0
    # the compiled-CPU M2Rec row: timed and probed when the library is built, else recorded as not run
    m2rec_cpu = next(r for r in data["rows"] if r["kind"] == "inference" and r["name"] == "m2rec"
                     and r["backend"] == "cpu")
    if cpu_scan_not_run_reason(torch.device("cpu")) is None:
        assert m2rec_cpu["status"] == "ok" and m2rec_cpu["peak_mem_mb"] is not None
    else:
        assert m2rec_cpu["status"] == "not run" and "compiled CPU scan" in m2rec_cpu["reason"]
    for what in ("raw.json", "results.csv", "latency.png", "memory.png", "speedup.png", "ops.png", "training.png",
                 "streaming.png"):
        assert (tmp_path / f"bench-cpu-{what}").exists(), what


def test_cpu_threads_setting(monkeypatch):
    from .grids import cpu_threads

    monkeypatch.delenv("M2REC_BENCH_THREADS", raising=False)
    assert cpu_threads() == 1
    monkeypatch.setenv("M2REC_BENCH_THREADS", "2")
    assert cpu_threads() == 2
    for bad in ("0", "two"):
        monkeypatch.setenv("M2REC_BENCH_THREADS", bad)
        with pytest.raises(ValueError, match="M2REC_BENCH_THREADS"):
            cpu_threads()


def test_summary_tables_compute_ratios_from_the_rows():
    """The README's tables (bench/summary.py) take every figure and ratio from the result rows."""
    from .summary import summary

    def row(kind, name, backend, L, batch, ms, status="ok"):
        return dict(kind=kind, name=name, backend=backend, L=L, batch=batch, status=status, median_ms=ms)

    rows = [row("inference", "m2rec", "cpu", 200, 64, 20.0), row("inference", "sasrec", "sdpa", 200, 64, 50.0),
            row("inference", "m2rec", "torch", 200, 64, None, status="not run"),
            row("streaming", "m2rec", "cpu", 200, 64, 0.8),
            row("op_forward", "selective_scan", "cpu", 200, 64, 10.0),
            row("op_forward", "selective_scan", "torch", 200, 64, 110.0),
            row("training_processes", "m2rec", "torch, 1 process", 200, 64, 1800.0),
            row("training_processes", "m2rec", "torch, 2 processes", 200, 64, 900.0)]
    machine = dict(cpu_model="Test CPU", cpu_cores=2, timing_threads=1, torch="x", triton="y", utc_time="t")
    text = summary(dict(rows=rows, machine=machine, load_average_during_run=[1.0, 1.0], suite_seconds=60.0))
    assert "| 64 | 200 | 20.0 ms | 50.0 ms | 0.40 |" in text  # the not-run torch column is left out
    assert "| m2rec (cpu) | 64 | 200 | 0.80 ms | 20.0 ms | 1/25.0 |" in text
    assert "| selective_scan | forward | 64 | 200 | 10.0 ms | 110.0 ms | 11.0× |" in text
    assert "| m2rec (torch, 2 processes) | 64 | 200 | 900.0 ms | 2.00 |" in text
    assert "Test CPU" in text and "Training step" not in text  # no training rows: no table


def test_summary_replaces_only_the_readme_block():
    from .summary import README_END, README_START, replace_readme_block

    text = f"intro\n{README_START}\nold table\n{README_END}\noutro\n"
    assert replace_readme_block(text, "new table") == f"intro\n{README_START}\nnew table\n{README_END}\noutro\n"
    with pytest.raises(ValueError, match="no <!-- bench-summary:start -->"):
        replace_readme_block("no markers", "x")


def test_fast_calls_repeat_within_a_round_and_slow_ones_do_not():
    from .grids import CPU
    from .timing import MIN_ROUND_S, plan_rounds

    rounds, iterations = plan_rounds(0.001, CPU)  # a 1 ms call: 20 calls per round, 50 rounds
    assert iterations * 0.001 >= MIN_ROUND_S and rounds == CPU.max_rounds
    assert plan_rounds(0.5, CPU) == (CPU.min_rounds, 1)  # slow: one call per round, the minimum rounds
    assert plan_rounds(0.05, CPU) == (20, 1)  # 1 s of 50 ms calls
    # the training rows' own, longer target: 4 s of 0.3 s steps
    assert plan_rounds(0.3, CPU, CPU.training_target_s) == (14, 1)
