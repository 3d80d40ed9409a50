#!/usr/bin/env python3
"""One entry point for a fresh machine that has nothing but Python 3.

    python3 tasks.py test        # set up .venv, run the test suite (kernels under the Triton interpreter)
    python3 tasks.py bench       # set up .venv, run the benchmark suite, then draw the plots in reports/
    python3 tasks.py gpu-check DIR   # on a CUDA machine with torch/triton/pytest already installed:
                                     # GPU tests + benchmark rows in priority order, results into DIR
                                     # after every step, < 7 min, installs nothing (bench/gpu_check.py)
    python3 tasks.py build-mamba-scan [DIR]  # cross-build mamba_ssm's CUDA scan for the GPU image into
                                     # DIR (default .mamba-build/), for gpu-check to carry

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


def recbole_supported() -> bool:
    """The recbole extra pins NumPy < 2 (RecBole 1.2.1 needs it), which has wheels up to Python 3.12."""
    return sys.version_info < (3, 13)


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
    extras = "test,mamba,data" + (",recbole" if recbole_supported() else "")
    if not recbole_supported():
        log("Python >= 3.13: the recbole extra (NumPy < 2) has no wheels here; its tests will skip")
    run(pip + ["-e", f".[{extras}]"])
    # recbole: the ml-100k atomic files it bundles, and m2rec.integrations.recbole. Its own requirements
    # are not installed (ray, plotly, thop, ...); the recbole extra holds what its Trainer path imports.
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
    if not os.environ.get("M2REC_PYTHON") and recbole_supported():
        env["M2REC_REQUIRE_RECBOLE"] = "1"  # set-up installed the extra: its test must run, not skip
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
    """bench/gpu_check.py with this machine's Python (M2REC_PYTHON to choose): installs nothing."""
    if not args:
        print("usage: python3 tasks.py gpu-check OUTPUT_DIR [--budget-s S] [--stub]", file=sys.stderr)
        return 2
    py = os.environ.get("M2REC_PYTHON", sys.executable)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    rc = run([py, "-m", "bench.gpu_check", *args], env=env, check=False)
    log(f"gpu-check finished in {time.time() - t0:.0f}s (exit {rc})")
    return rc


def cmd_build_mamba_scan(args) -> int:
    """Cross-build mamba_ssm's CUDA scan for the GPU image (torch 2.11, CUDA 13, sm_90) on this machine:
    a scratch venv with that torch (its wheel brings the CUDA headers) in .mamba-torch/, then
    bench/build_mamba_scan.py (extra arguments go to it). nvcc 13 must be on PATH. The archive lands in
    .mamba-build/ (or the directory given first), where gpu-check finds it."""
    out = Path(args[0]).resolve() if args and not args[0].startswith("-") else ROOT / ".mamba-build"
    rest = args[1:] if args and not args[0].startswith("-") else args
    torch_spec = os.environ.get("M2REC_MAMBA_TORCH_SPEC", "torch==2.11.0")  # the GPU image's torch
    venv = ROOT / ".mamba-torch"  # kept apart from .mamba-build/, which is carried whole
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    probe_code = ["-c", "import packaging, setuptools, wheel, torch; print(torch.__version__)"]
    if not py.exists():
        run([sys.executable, "-m", "venv", venv])
    probe = subprocess.run([py, *probe_code], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.startswith(torch_spec.split("==")[-1]):
        log(f"installing {torch_spec} into {venv} (the headers and libraries to build against; several GB)")
        # packaging/setuptools/wheel: pip runs mamba's setup.py (which imports them and torch) to download it
        run([py, "-m", "pip", "install", "--disable-pip-version-check", "-q", torch_spec, "packaging", "setuptools", "wheel"])
    return run([sys.executable, "-m", "bench.build_mamba_scan", "--out", out, "--python", py, *rest], check=False)


COMMANDS = {"test": cmd_test, "bench": cmd_bench, "gpu-check": cmd_gpu_check, "build-mamba-scan": cmd_build_mamba_scan,
            "setup": lambda a: (ensure_env(), 0)[1]}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
