#!/usr/bin/env python3
"""One entry point for a fresh machine that has nothing but Python 3.

    python3 tasks.py test        # set up .venv, run the test suite (kernels under the Triton interpreter)
    python3 tasks.py bench       # set up .venv, run the benchmark suite, then draw the plots in reports/
    python3 tasks.py gpu-check DIR   # on a CUDA machine with torch/triton/pytest already installed:
                                     # GPU tests + benchmark suite, results into DIR, installs nothing

Set-up creates (or reuses) ``.venv`` next to this file and installs the package with its extras. It is
redone only when this file or pyproject.toml changes. Environment knobs:

* ``M2REC_PYTHON=/path/to/python`` — use that interpreter as it is (no venv, nothing installed), e.g. a
  GPU machine whose torch you want to keep.
* ``M2REC_KEEP_TORCH=1`` — keep the torch (and triton) that the calling Python already has, e.g. a CUDA
  build: .venv then sees that Python's site-packages and no torch is installed into it.
* ``M2REC_TORCH_SPEC`` — the torch requirement installed first (default ``torch==2.13.0``, which is a
  CPU wheel on the CI machines; installing torch first stops other packages from pulling a CUDA build).
* ``M2REC_SKIP_MAMBA=1`` — do not install mamba-ssm (the cross-check tests then skip and say why).

Set-up also builds the compiled CPU selective scan (``m2rec_kernels/scan/cpu_build.py``, C++ through
torch's extension builder) whenever its sources or torch changed; a failed build is reported, not fatal
(the scan then runs the PyTorch reference on CPU, with one warning).

Only the standard library is used here, so it runs before anything is installed.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".m2rec-setup-stamp"


def log(msg: str) -> None:
    print(f"[tasks] {msg}", flush=True)


def run(cmd, env=None, check=True) -> int:
    log("$ " + " ".join(str(c) for c in cmd))
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, env=env)
    if check and rc != 0:
        sys.exit(rc)
    return rc


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup_fingerprint() -> str:
    h = hashlib.sha256()
    for name in ("tasks.py", "pyproject.toml"):
        h.update((ROOT / name).read_bytes())
    h.update(os.environ.get("M2REC_TORCH_SPEC", "").encode())
    h.update(os.environ.get("M2REC_SKIP_MAMBA", "").encode())
    h.update(os.environ.get("M2REC_KEEP_TORCH", "").encode())
    return h.hexdigest()


def build_cpu_kernels(py: str) -> None:
    """Build the compiled CPU scan into m2rec_kernels/scan/_cpu_lib when it is missing or stale (returns
    at once otherwise), so that no call ever compiles. Not fatal when it fails."""
    rc = subprocess.call([py, "-m", "m2rec_kernels.scan.cpu_build"], cwd=ROOT)
    if rc != 0:
        log(f"the compiled CPU scan could not be built (exit {rc}); the PyTorch reference scan will be used")


def ensure_env() -> str:
    """Return the Python interpreter to run with, setting up .venv when needed."""
    if os.environ.get("M2REC_PYTHON"):
        build_cpu_kernels(os.environ["M2REC_PYTHON"])
        return os.environ["M2REC_PYTHON"]
    py = venv_python()
    fingerprint = setup_fingerprint()
    if py.exists() and STAMP.exists() and STAMP.read_text() == fingerprint:
        build_cpu_kernels(str(py))
        return str(py)
    t0 = time.time()
    keep_torch = os.environ.get("M2REC_KEEP_TORCH", "0") not in ("", "0")
    if not py.exists():
        log(f"creating virtual environment {VENV}")
        run([sys.executable, "-m", "venv", *(["--system-site-packages"] if keep_torch else []), VENV])
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if keep_torch:
        run([py, "-c", "import torch; print('[tasks] keeping torch', torch.__version__)"])
    else:
        # torch first, pinned: with no torch present, later packages would pull a multi-GB CUDA build.
        run(pip + [os.environ.get("M2REC_TORCH_SPEC", "torch==2.13.0")])
    run(pip + ["setuptools", "wheel", "packaging", "ninja"])
    run(pip + ["-e", ".[test,mamba,data]"])
    # recbole only for the ml-100k atomic files it bundles; its own dependencies are not needed.
    run(pip + ["--no-deps", "recbole==1.2.1"])
    if os.environ.get("M2REC_SKIP_MAMBA", "0") in ("", "0"):
        # mamba-ssm without its CUDA extensions (DESIGN §8); used only for cross-checks.
        env = dict(os.environ, MAMBA_FORCE_BUILD="TRUE", MAMBA_SKIP_CUDA_BUILD="TRUE",
                   CAUSAL_CONV1D_SKIP_CUDA_BUILD="TRUE")
        rc = run(pip + ["--no-build-isolation", "--no-deps", "mamba-ssm==2.3.2.post1"], env=env, check=False)
        if rc != 0:
            log("mamba-ssm could not be installed; the mamba_ssm cross-check tests will skip")
    STAMP.write_text(fingerprint)
    build_cpu_kernels(str(py))
    log(f"environment ready in {time.time() - t0:.0f}s")
    return str(py)


def cmd_test(args) -> int:
    py = ensure_env()
    env = dict(os.environ, TRITON_INTERPRET="1", M2REC_BENCH_SMOKE="1")
    t0 = time.time()
    # tests/ checks correctness; bench/ runs once on tiny shapes with timing disabled so it cannot rot.
    rc = run([py, "-m", "pytest", "tests", "bench", "--benchmark-disable", "-q", *args], env=env, check=False)
    log(f"test command finished in {time.time() - t0:.0f}s (exit {rc})")
    return rc


def cmd_bench(args) -> int:
    py = ensure_env()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    rc = run([py, "-m", "bench.run_suite", *args], env=env, check=False)
    log(f"benchmark suite and plots finished in {time.time() - t0:.0f}s (exit {rc})")
    return rc


def cmd_gpu_check(args) -> int:
    if not args:
        print("usage: python3 tasks.py gpu-check OUTPUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = os.environ.get("M2REC_PYTHON", sys.executable)
    probe = subprocess.run([py, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        why = f"cannot import torch ({probe.stderr.strip().splitlines()[-1]})" if probe.returncode else "sees no CUDA device"
        print(f"gpu-check: {py} {why}; run it on a CUDA machine (M2REC_PYTHON picks the interpreter), "
              "or use 'python3 tasks.py test' here", file=sys.stderr)
        return 2
    env = dict(os.environ, M2REC_GPU_TESTS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    rc_tests = run([py, "-m", "pytest", "tests", "-q", f"--junitxml={out / 'gpu-tests.xml'}"], env=env, check=False)
    rc_bench = run([py, "-m", "bench.run_suite", "--out", out], env=env, check=False)
    log(f"gpu-check: tests exit {rc_tests}, bench exit {rc_bench}; results in {out}")
    return rc_tests or rc_bench


COMMANDS = {"test": cmd_test, "bench": cmd_bench, "gpu-check": cmd_gpu_check, "setup": lambda a: (ensure_env(), 0)[1]}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
