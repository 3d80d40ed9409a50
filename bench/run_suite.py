"""Run the whole benchmark suite and draw its plots: ``python -m bench.run_suite [--out DIR]``.

1. ``pytest bench/ --benchmark-only --benchmark-json=DIR/bench-<tag>-raw.json`` in a subprocess, with
   ``TRITON_INTERPRET`` removed from its environment (the interpreter is never timed);
2. on a CPU machine, the memory probes (``bench/memory_probe.py``): one fresh process per inference
   configuration (two at a time: memory is per process, and timing is over by then);
3. the tidy ``bench-<tag>-results.csv`` / ``.json`` (machine metadata, wall time, failed tests inside);
4. the plots (``bench/plots.py``) into the same directory.

``<tag>`` is ``cpu`` or ``gpu`` (``bench/grids.py``), so a GPU run and a CPU run can share ``DIR``.
Default ``DIR``: ``reports/``. Exit status: non-zero when a benchmark test failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .grids import D_MODEL, cpu_threads, current_grid, machine_tag
from .machine import machine_info
from .memory_probe import probe_in_subprocess
from .results import (attach_memory, file_name, rows_from_not_run, rows_from_pytest_benchmark,
                      write_results)
from .workloads import MODEL_CASES

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def run_pytest(out: Path, tag: str, work: Path, extra: List[str], targets: Sequence[str] = ("bench/",),
               raw: Optional[Path] = None, env_extra: Optional[Dict[str, str]] = None,
               runner: Optional[Callable[[List[str], Dict[str, str]], int]] = None) -> Dict:
    """Run the bench pytest on ``targets`` (files or node ids); pytest-benchmark's JSON goes to ``raw``
    (default ``out/bench-<tag>-raw.json``). ``runner(cmd, env) -> exit status`` replaces the plain
    subprocess call (gpu-check logs and bounds it)."""
    raw = raw or out / file_name(tag, "raw.json")
    not_run_file, junit = work / "not-run.json", work / "junit.xml"
    env = dict(os.environ, M2REC_BENCH_NOT_RUN_FILE=str(not_run_file), **(env_extra or {}))
    if tag == "cpu":  # the math libraries follow the same thread count as torch (grids.cpu_threads)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cpu_threads())
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", *targets, "--benchmark-only", f"--benchmark-json={raw}",
           f"--junitxml={junit}", "-q", "-p", "no:cacheprovider", *extra]
    t0 = time.time()
    if runner is not None:
        rc = runner(cmd, env)
    else:
        log("$ " + " ".join(cmd))
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
    log(f"pytest finished in {time.time() - t0:.0f} s (exit {rc})")
    raw_data = json.loads(raw.read_text()) if raw.exists() else {"benchmarks": []}
    not_run = json.loads(not_run_file.read_text()) if not_run_file.exists() else []
    return {"rc": rc, "raw": raw_data, "not_run": not_run, "failures": failed_tests(junit),
            "seconds": time.time() - t0}


def failed_tests(junit: Path) -> List[Dict[str, str]]:
    if not junit.exists():
        return []
    failures = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                             "message": (bad.get("message") or "")[:300]})
    return failures


def run_memory_probes(rows: List[Dict], workers: int = 2) -> List[Dict]:
    """One fresh process per CPU inference configuration that ran (its backend label is on the row)."""
    by_label = {}
    for r in rows:
        if r["kind"] == "inference" and r["status"] == "ok":
            by_label[(r["name"], r["backend"], r["L"], r["batch"])] = r
    cases = [(name, backend) for name, backend in MODEL_CASES if backend != "triton"]

    def case_backend(name, label):  # the row's label is the case's backend, or its only case's (auto -> mixer-cpu)
        if (name, label) in cases:
            return label
        own = [b for n, b in cases if n == name]
        return own[0] if len(own) == 1 else None

    jobs = sorted({(name, case_backend(name, label), L, b) for (name, label, L, b) in by_label
                   if case_backend(name, label) is not None}, key=lambda j: (j[2] * j[3], j[0], j[1]))
    n_items = current_grid().n_items
    log(f"memory probes: {len(jobs)} fresh processes, {workers} at a time")
    t0 = time.time()
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for res in pool.map(lambda j: probe_in_subprocess(j[0], j[1], j[2], j[3], n_items), jobs):
            what = f"{res['model']} L={res['L']} batch={res['batch']}"
            log(f"  probe {what}: " + (res["error"] if "error" in res else f"{res['peak_mem_mb']:.1f} MB"))
            results.append(res)
    log(f"memory probes finished in {time.time() - t0:.0f} s")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "reports"), help="output directory (default: reports/)")
    p.add_argument("--no-plots", action="store_true", help="write the result files only")
    p.add_argument("--no-probes", action="store_true", help="skip the CPU memory probes")
    p.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --), e.g. -k inference")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tag, grid = machine_tag(), current_grid()
    t_start = time.time()
    info = machine_info()
    log(f"machine: {info['gpu'] or info['cpu_model']} ({info['cpu_cores']} cores); grid '{grid.mode}'; "
        f"results into {out} as {file_name(tag, '*')}")
    with tempfile.TemporaryDirectory() as work:
        bench = run_pytest(out, tag, Path(work), args.pytest_args)
    rows = rows_from_pytest_benchmark(bench["raw"]) + rows_from_not_run(bench["not_run"])
    probes = []
    if tag == "cpu" and not args.no_probes:
        probes = run_memory_probes(rows)
        rows = attach_memory(rows, probes)
    meta = {
        "machine": dict(info, timing_threads=cpu_threads() if tag == "cpu" else None),
        "machine_tag": tag, "grid": grid.mode, "n_items": grid.n_items, "d_model": D_MODEL,
        "command": "python -m bench.run_suite " + " ".join(argv if argv is not None else sys.argv[1:]),
        "pytest_exit": bench["rc"], "failed_tests": bench["failures"], "pytest_seconds": round(bench["seconds"], 1),
        "memory_probes": probes,
    }
    if hasattr(os, "getloadavg"):  # other work on the machine slows every row: say how busy it was
        meta["load_average_during_run"] = [info["load_average_1m_5m_15m"][0], round(os.getloadavg()[0], 2)]
    meta["suite_seconds"] = round(time.time() - t_start, 1)  # before plots; updated below
    paths = write_results(out, tag, rows, meta)
    log(f"wrote {paths['csv']} and {paths['json']} ({len(rows)} rows, "
        f"{sum(r['status'] == 'not run' for r in rows)} not run)")
    for f in bench["failures"]:
        log(f"FAILED {f['test']}: {f['message']}")
    if not args.no_plots:
        from .plots import plot_results

        for png in plot_results(paths["json"]):
            log(f"plot {png}")
    total = time.time() - t_start
    meta["suite_seconds"] = round(total, 1)
    write_results(out, tag, rows, meta)
    log(f"suite finished in {total:.0f} s")
    return 1 if bench["rc"] not in (0, 5) or bench["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
