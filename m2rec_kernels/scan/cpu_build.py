"""Build the compiled CPU kernels (the selective scan and the causal depthwise conv1d in front of it):
``python -m m2rec_kernels.scan.cpu_build [--force]``.

Set-up (``python3 tasks.py setup`` / ``test`` / ``bench``) runs it; it returns at once when the library
is up to date, so a first call never compiles. The result goes to ``m2rec_kernels/scan/_cpu_lib/``
(gitignored; ``M2REC_CPU_SCAN_LIB`` points elsewhere):

* ``m2rec_scan_cpu.so`` — the ops ``torch.ops.m2rec_scan_cpu.*`` (``csrc/scan_ops.cpp``; ``state_update``, the
  one-step scan for streaming, in ``csrc/state_update_ops.cpp``; ``ring_filter_step``, the causal filter's
  streaming step, in ``csrc/ring_filter_ops.cpp``; ``mamba_step``, MambaMixer's whole streaming step in one
  call, in ``csrc/mamba_step_ops.cpp``; ``fusion_ffn_step``, the M2Rec layer's gate, LayerNorm and
  FFN at one position, in ``csrc/fusion_step_ops.cpp``; ``softmax_xent_rows``, the training loss's
  per-chunk softmax cross-entropy and its gradient, in ``csrc/softmax_xent_ops.cpp``) and
  ``torch.ops.m2rec_conv_cpu.*`` (``csrc/conv_ops.cpp``, used by ``m2rec_kernels.conv``) linked with one
  object per ISA variant of the kernels (``csrc/scan_isa.cpp``, ``csrc/conv_isa.cpp`` compiled with that ISA's flags, the way
  ATen builds its CPU kernels once per CPU_CAPABILITY): ``avx512`` and ``avx2`` on x86-64, and
  ``generic`` (the baseline ISA: SSE2 on x86-64) everywhere. The variant is chosen at run time
  (``cpu.py``), so one build runs on any x86-64 CPU, Intel or AMD.
* ``manifest.json`` — what was built from what: a hash of the sources, the torch and Python versions,
  the variants, the build time, or the error of a failed build. The loader uses the library only
  when the manifest matches the sources and the torch it runs with.
* ``build.log`` — the compiler output.

The kernel objects include no torch header and compile with plain ``c++`` (``CXX``) in parallel; the
binding is compiled and linked by torch's own extension builder (``torch.utils.cpp_extension.load``:
include paths, ABI and C++ standard of the installed torch). A failed build (no compiler, say) is
recorded, not raised: the scan then runs on the PyTorch reference with one warning.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
LIB_NAME = "m2rec_scan_cpu"
SOURCES = ("scan_api.h", "simd.h", "scan_isa.cpp", "scan_ops.cpp", "cpu_isa.h", "conv_api.h", "conv_isa.cpp",
           "conv_ops.cpp", "state_update_api.h", "state_update_isa.cpp", "state_update_ops.cpp", "ring_filter_api.h",
           "ring_filter_isa.cpp", "ring_filter_ops.cpp", "mamba_step_api.h", "mamba_step_isa.cpp", "mamba_step_ops.cpp",
           "fusion_step_ops.cpp", "softmax_xent_api.h", "softmax_xent_isa.cpp", "softmax_xent_ops.cpp")
#: per-ISA kernel files (no torch header, compiled with plain c++) and the torch-facing ops files
KERNEL_SOURCES = ("scan_isa.cpp", "conv_isa.cpp", "state_update_isa.cpp", "ring_filter_isa.cpp", "mamba_step_isa.cpp",
                  "softmax_xent_isa.cpp")
OPS_SOURCES = ("scan_ops.cpp", "conv_ops.cpp", "state_update_ops.cpp", "ring_filter_ops.cpp", "mamba_step_ops.cpp",
               "fusion_step_ops.cpp", "softmax_xent_ops.cpp")

# Flags per ISA variant of scan_isa.cpp. AVX-512 needs F/DQ/BW/VL and FMA, the set torch's own AVX512
# capability requires (so ATEN_CPU_CAPABILITY=avx512 never picks it on a CPU without them).
X86_VARIANTS: Dict[str, List[str]] = {
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "generic": [],
}
KERNEL_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off",
                "-Wall", "-Wextra", "-Wno-maybe-uninitialized"]


def lib_dir() -> Path:
    return Path(os.environ.get("M2REC_CPU_SCAN_LIB") or HERE / "_cpu_lib")


def lib_path() -> Path:
    return lib_dir() / f"{LIB_NAME}.so"


def variants() -> Dict[str, List[str]]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return X86_VARIANTS
    return {"generic": []}


def torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - torch installed without metadata
        import torch

        return torch.__version__


def build_key() -> Dict[str, str]:
    """What the library depends on; a change means a rebuild (the sources, this file, torch, Python)."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(Path(__file__).read_bytes())
    return {"sources": h.hexdigest(), "torch": torch_version(), "python": platform.python_version(),
            "machine": platform.machine()}


def read_manifest() -> Optional[dict]:
    try:
        return json.loads((lib_dir() / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def up_to_date() -> bool:
    """A manifest for the current key exists (a failed build counts: it is not retried until the key
    changes or --force)."""
    m = read_manifest()
    return m is not None and m.get("key") == build_key()


def _compile_kernel(cxx: str, source: str, variant: str, flags: List[str], out_dir: Path) -> Path:
    obj = out_dir / f"{Path(source).stem}_{variant}.o"
    cmd = [cxx, *KERNEL_FLAGS, f"-DM2REC_ISA_{variant.upper()}", *flags, "-c", str(CSRC / source),
           "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"compiling the {variant} kernels of {source} failed:\n$ {' '.join(cmd)}\n{res.stderr[-4000:]}")
    return obj


def build(verbose: bool = False) -> dict:
    """Compile and link into a temporary folder, then move the library and a manifest into lib_dir()."""
    out = lib_dir()
    out.mkdir(parents=True, exist_ok=True)
    key = build_key()
    cxx = os.environ.get("CXX", "c++")
    built = variants()
    t0 = time.time()
    log_lines = []
    manifest = {"key": key, "variants": list(built), "compiler": cxx, "library": f"{LIB_NAME}.so"}
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix="build-") as tmp:
            tmp_dir = Path(tmp)
            jobs = [(src, variant, flags) for src in KERNEL_SOURCES for variant, flags in built.items()]
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                objs = list(pool.map(lambda job: _compile_kernel(cxx, *job, tmp_dir), jobs))
            t_kernels = time.time() - t0
            from torch.utils import cpp_extension

            defines = [f"-DM2REC_HAVE_{v.upper()}" for v in built if v != "generic"]
            cpp_extension.load(
                name=LIB_NAME, sources=[str(CSRC / src) for src in OPS_SOURCES], extra_cflags=["-O3", *defines],
                extra_ldflags=[str(o) for o in objs], build_directory=str(tmp_dir), is_python_module=False,
                verbose=verbose,
            )
            os.replace(tmp_dir / f"{LIB_NAME}.so", out / f"{LIB_NAME}.so")
        manifest.update(status="ok", build_seconds=round(time.time() - t0, 1),
                        kernel_seconds=round(t_kernels, 1))
    except Exception as exc:  # recorded, and the reference is used: see the module docstring
        manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}"[-3000:],
                        build_seconds=round(time.time() - t0, 1))
        log_lines.append(manifest["error"])
    manifest["built_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "build.log").write_text("\n".join(log_lines) + "\n")
    tmp_manifest = out / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, out / "manifest.json")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--force", action="store_true", help="rebuild even when up to date (or after a failed build)")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = p.parse_args(argv)
    if not args.force and up_to_date():
        return 0
    print(f"[cpu_build] building the compiled CPU selective scan into {lib_dir()} ...", flush=True)
    m = build(verbose=args.verbose)
    if m["status"] == "ok":
        print(f"[cpu_build] built {', '.join(m['variants'])} in {m['build_seconds']} s "
              f"(kernels {m['kernel_seconds']} s)", flush=True)
        return 0
    print(f"[cpu_build] build FAILED after {m['build_seconds']} s; the selective scan will use the PyTorch "
          f"reference on CPU. {m['error'][:2000]}", file=sys.stderr, flush=True)
    return 0  # not fatal: set-up goes on, the loader warns once


if __name__ == "__main__":
    sys.exit(main())
