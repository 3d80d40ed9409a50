"""gpu-check: the GPU run that fits a lease. ``python -m bench.gpu_check OUT [--budget-s S] [--stub]``
(``python3 tasks.py gpu-check OUT`` runs it with the machine's own Python; it installs nothing).

It runs in priority order and writes its results into OUT after every step, so a run cut short still
returns what it did. Each step is its own pytest run, bounded by a soft deadline (past it, rows and
tests are skipped and say why: ``M2REC_BENCH_DEADLINE`` / ``M2REC_TEST_DEADLINE``) and a hard one (the
process group is killed 30 s later):

0. ``setup``     — activate a carried mamba_ssm CUDA scan build (``bench/mamba_build.py``) if one fits
                   (``--build-mamba``: else build one first, into OUT, from the carried sdist);
1. ``tests``     — correctness of every kernel, compiled, forward and backward: ``tests/test_gpu_kernels.py``
                   (every op at an odd and a benchmark-sized shape, the whole layer, mamba's carried
                   scan) and the ``*_triton`` kernel tests with their bf16/TF32 ``gpu`` tests, plus the
                   backend-equivalence tests; in parallel workers when pytest-xdist is there (the
                   step is Triton-compilation bound) -> ``gpu-tests.xml``;
2. ``headline``  — M2Rec Triton, M2Rec unfused, Mamba4Rec (mamba_ssm), SASRec (SDPA) at L 200 and
                   2000, batch 64 and 1, inference and training step (``bench/priorities.py``);
3. ``ops``, ``inference``, ``training``, ``other`` — the rest of the GPU grid while time remains;
4. ``plots``     — the figures, packed into one ``bench-gpu-plots.tar`` (the device returns at most 8 files).

Files in OUT: ``gpu-check.log`` (everything printed), ``gpu-check-summary.json`` (steps with their
seconds and exit status, test counts, the mamba build's status, Triton compile time per kernel),
``gpu-tests.xml``, ``bench-gpu-results.{json,csv}`` (cumulative, rewritten after each bench step),
``bench-gpu-plots.tar`` (and with ``--build-mamba`` the build's archive, to carry next time). Triton's compilation cost is visible: every compilation is logged with its time
(``bench/triton_compile_log.py``), autotuning prints its choices (``TRITON_PRINT_AUTOTUNING=1``), and each
benchmark row warms up once before it is timed.

``--stub`` (or ``M2REC_GPU_CHECK_STUB=1``) runs the same orchestration on a machine without a GPU,
doing none of the GPU work, to measure its own overheads: the tests step only collects
(``--collect-only``), the bench steps run the GPU grid (``M2REC_BENCH_GRID=gpu``) with the deadline
already passed, so every row is recorded as not run; results and plots are written as usual.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional


ROOT = Path(__file__).resolve().parent.parent
TAG = "gpu"
DEFAULT_BUDGET_S = 360  # the worst case (a step killed at its hard deadline, then the plots) stays
                        # under 7 minutes with tasks.py's start-up
HARD_GRACE_S = 30       # a step's process group is killed this long after its soft deadline
FINAL_RESERVE_S = 25    # kept for the last results and the plots
MAMBA_BUILD_LIMIT_S = 240  # --build-mamba: an estimated 1.5 min on 16 cores (bench/build_mamba_scan.py)
TEST_SHARE = 0.35       # the tests step may use this share of the budget
HEADLINE_SHARE = 0.35   # and the headline rows this share (both end earlier when they finish)
TEST_FILES = ("tests/test_gpu_kernels.py", "tests/test_*_triton.py", "tests/test_backend_equivalence.py")


def stub_mode(flag: bool = False) -> bool:
    return flag or os.environ.get("M2REC_GPU_CHECK_STUB", "0") not in ("", "0")


def test_selection() -> List[str]:
    files: List[str] = []
    for pattern in TEST_FILES:
        for p in sorted(ROOT.glob(pattern)):
            rel = str(p.relative_to(ROOT))
            if rel not in files:
                files.append(rel)
    return files


def xdist_workers() -> int:
    """Parallel test workers: compilation runs on the host's cores while one GPU runs the tests."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class Check:
    """One gpu-check run: the clock, the log, the summary, and a bounded subprocess runner."""

    def __init__(self, out: Path, budget_s: float, stub: bool, build_mamba: bool = False):
        self.out, self.budget_s, self.stub, self.build_mamba = out, budget_s, stub, build_mamba
        self.t0 = time.time()
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.log_fh = open(out / "gpu-check.log", "a", buffering=1)
        self.compile_log = self.work / "triton-compile.jsonl"
        self.rows: List[Dict] = []
        self.child_cpu_s = 0.0  # CPU seconds of the steps' subprocesses (and the tools they waited for)
        self.failures: List[Dict] = []
        self.summary: Dict = {"command": "python -m bench.gpu_check " + " ".join(sys.argv[1:]),
                              "stub": stub, "budget_s": budget_s, "steps": [],
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0))}

    # ----- clock and output ----------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[gpu-check {self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.log_fh.write(line + "\n")

    def save_summary(self) -> None:
        from .triton_compile_log import read_lines, summarize

        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        lines = list(read_lines(self.compile_log))
        kernels = summarize(lines)
        self.summary["triton_compile"] = {
            "kernels": kernels, "compilations": sum(k["compiled"] for k in kernels.values()),
            "seconds": round(sum(k["seconds"] for k in kernels.values()), 1),
            "note": "compile seconds summed over processes (the tests step compiles in parallel workers)",
        }
        tmp = self.out / ".gpu-check-summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        tmp.replace(self.out / "gpu-check-summary.json")

    def run_bounded(self, cmd: List[str], env: Dict[str, str], hard_deadline: float) -> int:
        """Run ``cmd`` in its own process group, its output into the log; kill the group at
        ``hard_deadline`` (epoch seconds). Returns the exit status (-9 when killed)."""
        self.log("$ " + " ".join(cmd))
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        killed = threading.Event()

        def kill():
            killed.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(max(hard_deadline - time.time(), 1.0), kill)
        timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                self.log_fh.write(line)
            _, status, usage = os.wait4(proc.pid, 0)  # its CPU time: comparable across machines, unlike wall
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
            self.child_cpu_s += usage.ru_utime + usage.ru_stime
        finally:
            timer.cancel()
        if killed.is_set():
            self.log(f"killed at the step's hard deadline ({HARD_GRACE_S} s after its budget)")
            return -9
        return rc

    def base_env(self) -> Dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONUNBUFFERED="1", M2REC_TRITON_COMPILE_LOG=str(self.compile_log),
                   TRITON_PRINT_AUTOTUNING="1")
        env.pop("TRITON_INTERPRET", None)
        return env

    def step(self, name: str, fn) -> None:
        """Run one step, record its time and status, and save the summary (even when it failed)."""
        self.log(f"step {name}: start ({self.left():.0f} s of the budget left)")
        t0, cpu0 = time.time(), self.child_cpu_s + _own_cpu_s()
        record: Dict = {"name": name}
        try:
            record.update(fn() or {})
            record.setdefault("status", "ok")
        except Exception as exc:  # a broken step must not cost the steps after it
            record.update(status="error", error=f"{type(exc).__name__}: {exc}")
            self.log(f"step {name}: {record['error']}")
        record["seconds"] = round(time.time() - t0, 1)
        record["cpu_seconds"] = round(self.child_cpu_s + _own_cpu_s() - cpu0, 1)
        self.summary["steps"].append(record)
        self.save_summary()
        self.log(f"step {name}: {record['status']} in {record['seconds']} s")

    # ----- the steps -----------------------------------------------------------------------------
    def setup(self) -> Dict:
        from .mamba_build import DEFAULT_DIR, activate

        status = activate(self.work / "mamba-build")
        if not status["active"] and self.build_mamba and not self.stub:
            # build it here (nvcc and the image's torch are on the machine), into OUT so that it comes back
            # to be carried next time; from the sdist carried in .mamba-build/ (no network here)
            sdists = sorted(DEFAULT_DIR.glob("mamba_ssm-*.tar.gz"))
            cmd = [sys.executable, "-m", "bench.build_mamba_scan", "--out", str(self.out)]
            cmd += ["--mamba-src", str(sdists[-1])] if sdists else []
            self.log(f"building mamba_ssm's CUDA scan here (--build-mamba): {status['reason']}")
            rc = self.run_bounded(cmd, self.base_env(), time.time() + MAMBA_BUILD_LIMIT_S)
            status = activate(self.work / "mamba-build", explicit=str(self.out)) if rc == 0 else dict(
                status, reason=f"{status['reason']}; building it here failed (exit {rc}, see the log)")
            status["built_here"] = rc == 0
        self.summary["mamba_build"] = status
        if status["active"]:
            from m2rec.mamba_ssm_compat import import_mamba_ssm

            _, how = import_mamba_ssm()
            status["import"] = how
            self.log(f"mamba_ssm build active ({status['archive']}): mamba_ssm imports as '{how}'")
        else:
            self.log(f"mamba_ssm CUDA scan: not available: {status['reason']}")
        from .machine import machine_info

        self.summary["machine"] = machine_info()
        return {"mamba_build_active": status["active"]}

    def tests(self) -> Dict:
        files = test_selection()
        junit = self.out / "gpu-tests.xml"
        env = dict(self.base_env(), M2REC_GPU_TESTS="1")
        soft = self.t0 + self.budget_s * TEST_SHARE
        cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rfE", "-p", "no:cacheprovider",
               "-p", "bench.triton_compile_log", f"--junitxml={junit}"]
        if self.stub:
            cmd.append("--collect-only")
        else:
            env["M2REC_TEST_DEADLINE"] = str(soft)
            workers = xdist_workers()
            if workers:
                cmd += ["-n", str(workers)]
        rc = self.run_bounded(cmd, env, soft + HARD_GRACE_S)
        counts = junit_counts(junit)
        self.summary["tests"] = dict(counts, files=files, exit=rc)
        status = "ok" if rc == 0 else ("killed" if rc == -9 else "failed")
        return {"status": status, "exit": rc, **{k: counts[k] for k in ("passed", "failed", "errors", "skipped")}}

    def bench(self, steps: List[str], soft_deadline: float) -> Dict:
        from .run_suite import rows_from_not_run, rows_from_pytest_benchmark, run_pytest

        env = dict(self.base_env(), M2REC_BENCH_STEPS=",".join(steps))
        if self.stub:
            env["M2REC_BENCH_DEADLINE"] = "0"
        else:
            env["M2REC_BENCH_DEADLINE"] = str(soft_deadline)
        tag = "-".join(steps)
        work = self.work / f"bench-{tag}"
        work.mkdir(exist_ok=True)
        res = run_pytest(self.out, TAG, work, ["-p", "bench.triton_compile_log"], raw=work / "raw.json",
                         env_extra=env, runner=lambda cmd, e: self.run_bounded(cmd, e, soft_deadline + HARD_GRACE_S))
        rows = rows_from_pytest_benchmark(res["raw"]) + rows_from_not_run(res["not_run"])
        self.rows += rows
        self.failures += res["failures"]
        self.write_results()
        ran = sum(r["status"] == "ok" for r in rows)
        status = "ok" if res["rc"] in (0, 5) and not res["failures"] else ("killed" if res["rc"] == -9 else "failed")
        return {"status": status, "exit": res["rc"], "rows_ok": ran, "rows_not_run": len(rows) - ran,
                "failed_tests": len(res["failures"])}

    def write_results(self) -> None:
        from .grids import D_MODEL, current_grid
        from .results import write_results

        grid = current_grid()
        meta = {"machine": self.summary.get("machine", {}), "machine_tag": TAG, "grid": grid.mode,
                "n_items": grid.n_items, "d_model": D_MODEL,
                "command": self.summary["command"], "failed_tests": self.failures,
                "gpu_check_elapsed_s": round(self.elapsed(), 1), "stub": self.stub,
                "mamba_build": {k: v for k, v in self.summary.get("mamba_build", {}).items() if k != "build_info"}}
        write_results(self.out, TAG, self.rows, meta)

    def plots(self) -> Dict:
        from .plots import plot_results
        from .results import file_name

        results = self.out / file_name(TAG, "results.json")
        if not results.exists():
            return {"status": "skipped", "reason": "no results file"}
        pngs = plot_results(results)
        archive = self.out / file_name(TAG, "plots.tar")
        with tarfile.open(archive, "w") as tar:
            for png in pngs:
                tar.add(png, arcname=png.name)
        for png in pngs:
            png.unlink()
        return {"files": [p.name for p in pngs]}


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def junit_counts(junit: Path) -> Dict:
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    if not junit.exists():
        return counts
    for case in ET.parse(junit).getroot().iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            counts["failures"].append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            why = (case.find("skipped").get("message") or "")[:160]
            counts["skip_reasons"][why] = counts["skip_reasons"].get(why, 0) + 1
        else:
            counts["passed"] += 1
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="output directory (e.g. $OUT on the device machine)")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("M2REC_GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)),
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET_S})")
    p.add_argument("--stub", action="store_true", help="no GPU work: time the orchestration's own overheads")
    p.add_argument("--build-mamba", action="store_true",
                   help="without a fitting carried mamba_ssm build, build one here first (into OUT, to carry next "
                        "time); its minutes come out of the budget")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stub = stub_mode(args.stub)
    try:
        import torch
    except ImportError as exc:
        print(f"gpu-check: {sys.executable} cannot import torch ({exc}); run it with the Python that has torch, "
              "triton, pytest, pytest-benchmark and matplotlib (tasks.py: M2REC_PYTHON)", file=sys.stderr)
        return 2
    if stub:  # the GPU grid and file names, without a GPU (bench/grids.py)
        os.environ["M2REC_BENCH_GRID"] = "gpu"
    else:
        if not torch.cuda.is_available():
            print("gpu-check: this Python sees no CUDA device; run it on a GPU machine, or with --stub to time "
                  "its orchestration here", file=sys.stderr)
            return 2
    check = Check(out, args.budget_s, stub, args.build_mamba)
    check.log(f"gpu-check into {out}; budget {args.budget_s:.0f} s{' (stub: no GPU work)' if stub else ''}")
    check.step("setup", check.setup)
    check.step("tests", check.tests)
    headline_end = check.t0 + check.budget_s * (TEST_SHARE + HEADLINE_SHARE)
    check.step("headline", lambda: check.bench(["headline"], max(headline_end, time.time() + 30)))
    rest_end = check.t0 + check.budget_s - FINAL_RESERVE_S
    for group in (["ops"], ["inference"], ["training", "other"]):  # STEPS after the headline
        name = "+".join(group)
        if check.left() <= FINAL_RESERVE_S and not stub:
            check.summary["steps"].append({"name": name, "status": "skipped", "reason": "time budget spent"})
            continue
        check.step(name, lambda g=group: check.bench(g, rest_end))
    check.step("plots", check.plots)
    steps = check.summary["steps"]
    bad = [s["name"] for s in steps if s.get("status") in ("failed", "error", "killed")]
    check.summary["total_s"] = round(check.elapsed(), 1)
    check.save_summary()
    check.log(f"done in {check.elapsed():.0f} s; steps: " + ", ".join(f"{s['name']} {s.get('status')}" for s in steps))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
