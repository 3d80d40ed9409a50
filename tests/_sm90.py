"""Compile Triton kernels for an sm_90 GPU on a machine without one and read their resources (DESIGN §10).

The kernels are compiled (not run) in a fresh interpreter without TRITON_INTERPRET, through
``triton.compiler`` and a ``GPUTarget`` — the scan's compile test in test_scan_triton.py does the same
inline; new compile tests use this helper. A test writes a script body that calls ``build(...)`` for each
kernel and configuration; ``compile_sm90(body, tmp_path)`` runs it and returns one record per build:
registers, stack bytes (a Triton kernel has no stack of its own: any stack is spilled registers) and
shared memory, read from the cubin with the ``cuobjdump`` that ships in the triton wheel.

``build`` mirrors the launcher's specialisation: integer arguments named in ``ones`` are the constant 1
(Triton specialises unit strides), those in ``div16`` carry the divisible-by-16 hint it gives pointers
and sizes that are multiples of 16.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent(
    """
    import json, os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    TARGET = GPUTarget("cuda", 90, 32)
    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    RECORDS = []

    def resources(cubin):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                                 check=True).stdout
        return dict(regs=int(re.search(r"REG:(\\d+)", out).group(1)),
                    spill_bytes=int(re.search(r"STACK:(\\d+)", out).group(1)))

    def build(fn, types, consts, num_warps, num_stages=3, ones=(), div16=(), label=""):
        consts = dict(consts, **{n: 1 for n in ones})
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET,
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        RECORDS.append(dict(label=label or fn.__name__, num_warps=num_warps, num_stages=num_stages,
                            shared=k.metadata.shared, **resources(k.asm["cubin"])))
    """
)


def compile_sm90(body: str, tmp_path) -> list:
    """Run ``body`` (which calls ``build``) after the prelude in a fresh interpreter; one record per build."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the triton build
        pytest.skip(f"triton has no CUDA backend to compile with: {exc}")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("the triton wheel ships no cuobjdump to read resource usage with")  # pragma: no cover
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, whatever an earlier run cached
    script = PRELUDE + textwrap.dedent(body) + "\nprint('RECORDS=' + json.dumps(RECORDS))\n"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORDS=")]
    assert line, proc.stdout[-2000:]
    return json.loads(line[-1][len("RECORDS="):])
