"""Build mamba_ssm's CUDA selective scan (``selective_scan_cuda``) for one GPU arch, small and fast, and
pack it into one file a GPU run can carry: ``python -m bench.build_mamba_scan --out DIR``.

Why: the lent GPU image has torch 2.11 (CUDA 13.0) and nvcc but no mamba_ssm, and no network; mamba-ssm
on PyPI is a source package whose full build (10 CUDA files, 4 archs, fp16/complex included) takes far
longer than a GPU lease. Only the pieces a benchmark needs are built here:

* one arch (``--arch 90``: H100/H200), inputs fp32 and bf16, real weights: four kernel instantiations
  (forward and backward for ``<float, float>`` and ``<BFloat16, float>``), compiled in parallel;
* the other instantiations mamba's host code dispatches to (fp16 inputs, complex weights) are stubs
  that raise a clear error, so the library links without them;
* no Python extension: the library registers mamba's own host functions ``selective_scan_fwd`` /
  ``selective_scan_bwd`` as torch ops (``torch.ops.mamba_selective_scan.fwd/bwd``) and a small
  generated ``selective_scan_cuda.py`` exposes them under the names mamba_ssm imports. The library
  then depends on libtorch's C++ ABI only (the exact torch version), not on the Python version, so it
  can be cross-built on a machine without a GPU against the torch wheel the GPU image has.

Nothing of mamba's code is in this repository: its sources come from the mamba-ssm sdist
(``--mamba-src``: the .tar.gz or an unpacked directory; without it ``pip download`` fetches it) and are
compiled as they are. mamba's ``selective_scan.cpp`` includes ``<torch/python.h>`` and ends in a
``PYBIND11_MODULE`` block; a shadow ``torch/python.h`` in the build's include path (written below)
includes the C++ API only and turns that block into an unused template, so no Python header is needed.

Output (``--out``): ``mamba-scan-sm<arch>-torch<ver>.tar.gz`` holding ``libmamba_selective_scan.so``,
``selective_scan_cuda.py``, mamba's Python package ``mamba_ssm/`` (pure Python, from the same sdist)
and ``BUILD-INFO.json`` (torch version, CUDA, arch, build seconds, per-file compile seconds). One file,
so it fits the GPU machine's 8-files-back limit; ``bench/mamba_build.py`` unpacks and activates it.

Cross-building (no GPU needed): build against the torch the GPU image has, e.g. ``pip install
torch==2.11.0`` into a scratch venv (its wheel brings the CUDA 13 headers, cuBLAS's included) and pass
``--torch-dir <venv>/lib/python3.X/site-packages/torch``; nvcc 13.x must be on PATH (``--cuda-home``).
``python3 tasks.py build-mamba-scan`` does all of this. Only the standard library is used here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

MAMBA_VERSION = "2.3.2.post1"
LIB_NAME = "libmamba_selective_scan.so"
OP_NAMESPACE = "mamba_selective_scan"
SCAN_DIR = "csrc/selective_scan"

#: (file stem, kernel header, C++ template arguments) of every instantiation that is built.
BUILT = (
    ("fwd_fp32", "selective_scan_fwd_kernel.cuh", "selective_scan_fwd_cuda<float, float>(SSMParamsBase &params, cudaStream_t stream)"),
    ("fwd_bf16", "selective_scan_fwd_kernel.cuh", "selective_scan_fwd_cuda<at::BFloat16, float>(SSMParamsBase &params, cudaStream_t stream)"),
    ("bwd_fp32", "selective_scan_bwd_kernel.cuh", "selective_scan_bwd_cuda<float, float>(SSMParamsBwd &params, cudaStream_t stream)"),
    ("bwd_bf16", "selective_scan_bwd_kernel.cuh", "selective_scan_bwd_cuda<at::BFloat16, float>(SSMParamsBwd &params, cudaStream_t stream)"),
)
#: instantiations mamba's dispatch refers to but this build leaves out: (function, input, weight, params)
STUBBED = [(fn, i, w, p) for fn, p in (("selective_scan_fwd_cuda", "SSMParamsBase"), ("selective_scan_bwd_cuda", "SSMParamsBwd"))
           for i, w in (("c10::Half", "float"), ("float", "c10::complex<float>"), ("c10::Half", "c10::complex<float>"),
                        ("c10::BFloat16", "c10::complex<float>"))]

# mamba's setup.py flags for nvcc (read to learn which it needs: half/bf16 operators on, fast math).
NVCC_FLAGS = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-Xcompiler", "-fPIC"]
CXX_FLAGS = ["-O3", "-std=c++17", "-fPIC"]
COMMON_DEFINES = ["-D_GLIBCXX_USE_CXX11_ABI=1", "-DTORCH_EXTENSION_NAME=selective_scan_cuda"]

SHADOW_PYTHON_H = """\
// Written by bench/build_mamba_scan.py: stands in for <torch/python.h> so that mamba's
// selective_scan.cpp compiles without Python headers. Its PYBIND11_MODULE block becomes a template that
// is never instantiated; the functions are registered as torch ops instead (binding.cpp).
#pragma once
#include <torch/all.h>
#include <ATen/cuda/CUDAContext.h>
#define PYBIND11_MODULE(name, var) template <typename M> [[maybe_unused]] static void unused_pybind_module(M &var)
"""

BINDING_CPP = f"""\
// Written by bench/build_mamba_scan.py: mamba's host code (compiled as it is) registered as torch ops.
#include "selective_scan.cpp"
#include <torch/library.h>

// mamba's backward takes its optional dz buffer by non-const reference, which a registered op cannot;
// this wrapper passes a copy of the optional (the same tensor, so writes into it still land).
static std::vector<at::Tensor> selective_scan_bwd_op(
        const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A, const at::Tensor &B,
        const at::Tensor &C, const c10::optional<at::Tensor> &D, const c10::optional<at::Tensor> &z,
        const c10::optional<at::Tensor> &delta_bias, const at::Tensor &dout, const c10::optional<at::Tensor> &x,
        const c10::optional<at::Tensor> &out, const c10::optional<at::Tensor> &dz, bool delta_softplus,
        bool recompute_out_z) {{
    c10::optional<at::Tensor> dz_buffer = dz;
    return selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz_buffer, delta_softplus,
                              recompute_out_z);
}}

TORCH_LIBRARY({OP_NAMESPACE}, m) {{
    m.def("fwd", &selective_scan_fwd);
    m.def("bwd", &selective_scan_bwd_op);
}}
"""

INSTANCE_CU = """\
// Written by bench/build_mamba_scan.py: one explicit instantiation of mamba's kernel template.
#include "{header}"
template void {signature};
"""

STUBS_CPP_HEAD = """\
// Written by bench/build_mamba_scan.py: instantiations this build leaves out (fp16 inputs, complex
// weights). mamba's dispatch refers to them; here they raise instead of being compiled.
#include <cuda_runtime_api.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include "selective_scan.h"

template <typename input_t, typename weight_t> void selective_scan_fwd_cuda(SSMParamsBase &params, cudaStream_t stream);
template <typename input_t, typename weight_t> void selective_scan_bwd_cuda(SSMParamsBwd &params, cudaStream_t stream);
"""

STUB_CPP = """
template <> void {fn}<{i}, {w}>({p} &, cudaStream_t) {{
    TORCH_CHECK(false, "this selective_scan_cuda build (bench/build_mamba_scan.py) has fp32 and bf16 inputs with "
                "real weights only; {fn}<{i}, {w}> was not built");
}}
"""

PY_MODULE = f'''\
"""mamba_ssm's ``selective_scan_cuda`` interface over the torch ops of {LIB_NAME}.

Written by bench/build_mamba_scan.py. mamba_ssm calls ``fwd(u, delta, A, B, C, D, z, delta_bias,
delta_softplus)`` and ``bwd(...)``; both go to mamba's own host functions, registered as torch ops.
"""
import os as _os

import torch as _torch

_torch.ops.load_library(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "{LIB_NAME}"))
BUILD_INFO_FILE = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "BUILD-INFO.json")


def fwd(*args):
    return _torch.ops.{OP_NAMESPACE}.fwd(*args)


def bwd(*args):
    return _torch.ops.{OP_NAMESPACE}.bwd(*args)
'''


def log(msg: str) -> None:
    print(f"[mamba-build] {msg}", flush=True)


def archive_name(arch: str, torch_version: str) -> str:
    return f"mamba-scan-sm{arch}-torch{torch_version.split('+')[0]}.tar.gz"


def find_torch(python: Optional[str], torch_dir: Optional[str]) -> Tuple[Path, str, Optional[str]]:
    """(torch package directory, torch version, torch's CUDA version) from --torch-dir or an interpreter."""
    if torch_dir:
        root = Path(torch_dir).resolve()
        version_py = root / "version.py"
        if not (root / "include" / "torch").is_dir() or not version_py.exists():
            raise SystemExit(f"--torch-dir {root}: not a torch package directory (no include/torch or version.py)")
        ns: Dict[str, object] = {}
        exec(compile(version_py.read_text(), str(version_py), "exec"), ns)  # plain assignments only
        return root, str(ns["__version__"]), ns.get("cuda")  # type: ignore[return-value]
    py = python or sys.executable
    out = subprocess.run([py, "-c", "import os, torch; print(os.path.dirname(torch.__file__)); "
                          "print(torch.__version__); print(torch.version.cuda)"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{py} cannot import torch ({out.stderr.strip().splitlines()[-1:]}); "
                         "pass --torch-dir or --python")
    root, version, cuda = out.stdout.split()
    return Path(root), version, None if cuda == "None" else cuda


def find_cuda_home(cuda_home: Optional[str]) -> Path:
    """The CUDA toolkit: the first of --cuda-home, CUDA_HOME, CUDA_PATH, the toolkit of the nvcc on PATH
    (also through a wrapper script: nvcc's dry run names its TOP) and /usr/local/cuda that has both
    bin/nvcc and include/cuda_runtime.h."""
    candidates = [cuda_home, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        dry = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True)  # no file needed
        for line in (dry.stdout + dry.stderr).splitlines():
            if "TOP=" in line:
                candidates.append(str(Path(line.split("TOP=", 1)[1].strip()).resolve()))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    raise SystemExit(f"no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) among {[c for c in candidates if c]}; "
                     "pass --cuda-home")


def nvcc_version(cuda_home: Path) -> str:
    out = subprocess.run([str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return token[1:]
    return "unknown"


def unpack_mamba(src: Optional[str], work: Path, pip_python: str, keep_in: Path) -> Path:
    """Directory of the unpacked mamba-ssm sdist (``csrc/`` and ``mamba_ssm/`` inside). Without ``src``,
    the sdist kept in ``keep_in`` by an earlier build is used, else ``pip_python``'s pip downloads it (pip
    prepares its metadata by running mamba's setup.py, which imports torch, packaging, setuptools and
    wheel) and a copy is kept in ``keep_in``, so that a GPU machine without network can build from it."""
    kept = sorted(keep_in.glob(f"mamba_ssm-{MAMBA_VERSION}.tar.gz"))
    if src is None and kept:
        src = str(kept[-1])
    if src is None:
        dl = work / "sdist"
        log(f"downloading the mamba-ssm=={MAMBA_VERSION} sdist with pip")
        env = dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE", MAMBA_FORCE_BUILD="TRUE")
        rc = subprocess.call([pip_python, "-m", "pip", "download", f"mamba-ssm=={MAMBA_VERSION}", "--no-deps",
                              "--no-binary", ":all:", "--no-build-isolation", "-q", "-d", str(dl)], env=env)
        found = sorted(dl.glob("mamba_ssm-*.tar.gz")) if dl.exists() else []
        if rc != 0 or not found:
            raise SystemExit("could not download the mamba-ssm sdist; pass --mamba-src (its .tar.gz or directory)")
        src = str(found[0])
        shutil.copy2(src, keep_in / found[0].name)
    path = Path(src).resolve()
    if path.is_dir():
        root = path
    else:
        with tarfile.open(path) as tar:
            tar.extractall(work / "src", filter="data")
        roots = [p for p in (work / "src").iterdir() if p.is_dir()]
        if len(roots) != 1:
            raise SystemExit(f"{path}: expected one top-level directory in the sdist")
        root = roots[0]
    if not (root / SCAN_DIR / "selective_scan.cpp").exists() or not (root / "mamba_ssm").is_dir():
        raise SystemExit(f"{root}: not a mamba-ssm source tree (no {SCAN_DIR}/selective_scan.cpp or mamba_ssm/)")
    return root


def write_sources(build: Path) -> List[Path]:
    """Our generated sources: shadow header, binding, instantiations, stubs. Returns the .cu files."""
    (build / "shadow" / "torch").mkdir(parents=True, exist_ok=True)
    (build / "shadow" / "torch" / "python.h").write_text(SHADOW_PYTHON_H)
    (build / "binding.cpp").write_text(BINDING_CPP)
    cus = []
    for stem, header, signature in BUILT:
        cu = build / f"instance_{stem}.cu"
        cu.write_text(INSTANCE_CU.format(header=header, signature=signature))
        cus.append(cu)
    (build / "stubs.cpp").write_text(STUBS_CPP_HEAD + "".join(STUB_CPP.format(fn=f, i=i, w=w, p=p) for f, i, w, p in STUBBED))
    return cus


def include_flags(torch_dir: Path, cuda_home: Path, scan_src: Path, build: Path) -> List[str]:
    incs = [build / "shadow", scan_src, torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include",
            cuda_home / "include", cuda_home / "include" / "cccl"]
    # pip-installed CUDA (torch's wheel dependencies) carries cuBLAS/cuSPARSE headers that
    # ATen/cuda/CUDAContext.h includes; a bare toolkit may lack them.
    incs += sorted(torch_dir.parent.glob("nvidia/cu*/include")) + sorted(torch_dir.parent.glob("nvidia/*/include"))
    return [f"-I{p}" for p in incs if p.is_dir()]


def run_job(cmd: Sequence[str], what: str) -> Tuple[str, Dict[str, float]]:
    """Run one compile; returns its wall seconds and CPU seconds (the compiler and the tools it waited
    for, from wait4: on a busy machine the CPU time is the figure that carries over to another)."""
    t0 = time.time()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        secs = time.time() - t0
        if proc.returncode != 0:
            out.seek(0)
            sys.stderr.write(out.read()[-12000:].decode(errors="replace"))
            raise SystemExit(f"compiling {what} failed (exit {proc.returncode}) after {secs:.0f} s: {' '.join(cmd)}")
    cpu = usage.ru_utime + usage.ru_stime
    log(f"  {what}: {secs:.0f} s wall, {cpu:.0f} s CPU")
    return what, {"wall_s": round(secs, 1), "cpu_s": round(cpu, 1)}


def build(args) -> Path:
    t_start = time.time()
    torch_dir, torch_version, torch_cuda = find_torch(args.python, args.torch_dir)
    cuda_home = find_cuda_home(args.cuda_home)
    nvcc_ver = nvcc_version(cuda_home)
    log(f"torch {torch_version} (CUDA {torch_cuda}) at {torch_dir}; nvcc {nvcc_ver} at {cuda_home}; sm_{args.arch}")
    if torch_cuda and nvcc_ver.split(".")[0] != str(torch_cuda).split(".")[0]:
        raise SystemExit(f"nvcc {nvcc_ver} and torch's CUDA {torch_cuda} differ in major version: "
                         "the library would need a second CUDA runtime; use a matching nvcc")
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mamba-build-") as tmp:
        work = Path(tmp)
        src_root = unpack_mamba(args.mamba_src, work, args.python or sys.executable, out_dir)
        scan_src = src_root / SCAN_DIR
        build_dir = work / "build"
        build_dir.mkdir()
        cus = write_sources(build_dir)
        incs = include_flags(torch_dir, cuda_home, scan_src, build_dir)
        nvcc = str(cuda_home / "bin" / "nvcc")
        gencode = [f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}"]
        cxx = args.cxx
        jobs = []
        for cu in cus:
            jobs.append(([nvcc, "-c", str(cu), "-o", str(cu.with_suffix(".o")), *NVCC_FLAGS, *gencode,
                          "--threads", "2", *COMMON_DEFINES, *incs], cu.stem))
        for cpp in (build_dir / "binding.cpp", build_dir / "stubs.cpp"):
            jobs.append(([cxx, "-c", str(cpp), "-o", str(cpp.with_suffix(".o")), *CXX_FLAGS, *COMMON_DEFINES, *incs],
                         cpp.stem))
        # slowest first (the backward kernels), so the parallel build ends as early as it can
        jobs.sort(key=lambda j: (not j[1].startswith("instance_bwd"), not j[1].startswith("instance_fwd")))
        workers = max(1, min(args.jobs, len(jobs)))
        log(f"compiling {len(jobs)} files, {workers} at a time")
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            timings = dict(pool.map(lambda j: run_job(*j), jobs))
        compile_s = time.time() - t0
        lib = build_dir / LIB_NAME
        objs = [str(p) for p in sorted(build_dir.glob("*.o"))]
        link = [cxx, "-shared", "-o", str(lib), *objs, f"-L{torch_dir / 'lib'}", "-lc10", "-lc10_cuda",
                "-ltorch_cpu", "-ltorch_cuda", "-ltorch", f"-L{cuda_home / 'lib64'}", f"-L{cuda_home / 'lib'}",
                "-lcudart", "-Wl,--no-undefined" if args.strict_link else "-Wl,--as-needed"]
        run_job(link, "link")
        if not args.keep_debug:
            subprocess.call(["strip", "--strip-debug", str(lib)])
        pkg = work / "pkg"
        pkg.mkdir()
        shutil.copy2(lib, pkg / LIB_NAME)
        (pkg / "selective_scan_cuda.py").write_text(PY_MODULE)
        shutil.copytree(src_root / "mamba_ssm", pkg / "mamba_ssm",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = {
            "mamba_ssm": MAMBA_VERSION, "torch": torch_version, "torch_cuda": torch_cuda, "nvcc": nvcc_ver,
            "arch": f"sm_{args.arch}", "built": [b[2].split("(")[0] for b in BUILT],
            "stubbed": [f"{f}<{i}, {w}>" for f, i, w, _ in STUBBED], "jobs": workers,
            "compile_seconds": round(compile_s, 1), "per_file": timings,
            "load_average_1m": round(os.getloadavg()[0], 2),
            "library_bytes": lib.stat().st_size, "host": os.uname().nodename, "cpu_count": os.cpu_count(),
            "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        info["total_seconds"] = round(time.time() - t_start, 1)
        (pkg / "BUILD-INFO.json").write_text(json.dumps(info, indent=1))
        archive = out_dir / archive_name(args.arch, torch_version)
        with tarfile.open(archive, "w:gz") as tar:
            for p in sorted(pkg.iterdir()):
                tar.add(p, arcname=p.name)
    log(f"wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB; library {info['library_bytes'] / 2**20:.1f} MiB) "
        f"in {time.time() - t_start:.0f} s (compile {compile_s:.0f} s with {workers} jobs)")
    return archive


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for the archive (e.g. $OUT on the GPU machine, "
                                                "or .mamba-build/ to carry)")
    p.add_argument("--mamba-src", help=f"mamba-ssm {MAMBA_VERSION} sdist (.tar.gz) or unpacked directory; "
                                       "default: the one kept in --out by an earlier build, else pip download it")
    p.add_argument("--torch-dir", help="torch package directory to build against (cross-build); default: "
                                       "the torch of --python")
    p.add_argument("--python", help="interpreter whose torch to build against, also used to download the sdist "
                                    "(default: this one)")
    p.add_argument("--cuda-home", help="CUDA toolkit directory (default: CUDA_HOME, else nvcc on PATH)")
    p.add_argument("--arch", default="90", help="compute capability without the dot (default 90: H100/H200)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compiles (default: all cores)")
    p.add_argument("--cxx", default=os.environ.get("CXX", "g++"), help="host C++ compiler (default g++)")
    p.add_argument("--strict-link", action="store_true", help="link with --no-undefined (every symbol resolved)")
    p.add_argument("--keep-debug", action="store_true", help="keep debug sections (larger library)")
    args = p.parse_args(argv)
    build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
