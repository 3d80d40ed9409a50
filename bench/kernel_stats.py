"""Static report of the Triton kernels compiled for an H200 (sm_90): a GPU-free proxy (DESIGN §10).

    python -m bench.kernel_stats                      # all kernels -> reports/kernel-stats.{json,md}
    python -m bench.kernel_stats --only scan_fwd scan_bwd --stem kernel-stats-scan

Every case of ``bench/kernel_registry.py`` (each kernel at the configuration its host code picks for
the GPU benchmark shapes) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 32))`` — no GPU needed — and read back:

* registers, spills and shared memory, from the compiled metadata and ``cuobjdump
  --dump-resource-usage``. Triton's kernels spill to the stack frame: spill bytes = max(STACK,
  LOCAL), and the LDL/STL instructions are counted as a cross-check;
* the innermost loops of the SASS (``cuobjdump -sass``). Method: every branch whose target address
  is before its own address closes a loop [target, branch]; a loop that contains no other
  loop is innermost. Its instructions (NOPs excluded) are counted from the target to the branch.
  For the scans, "warp instructions per element" = (sum over the innermost loops of their
  instructions) × warps per program / the (d, n, t) elements one iteration handles (real d and N,
  padding counted as waste); all the kernel's loops run once per element. Static counts: a branch
  inside the loop body (reported) would make the dynamic count differ;
* programs per SM, as CUDA's occupancy calculator does it for sm_90 (65,536 registers per SM in
  4 quarters, allocated per warp in units of 256; 64 warps, 32 blocks and 228 KiB of shared memory
  per SM, 1 KiB reserved per block), and waves = programs / (programs per SM × 132 SMs).

The binaries ``cuobjdump`` / ``nvdisasm`` ship inside the triton wheel (``triton/backends/nvidia/bin``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import triton

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m bench.kernel_stats"

# sm_90 limits (H100/H200; CUDA occupancy calculator, compute capability 9.0)
SM90 = dict(regs_per_sm=65536, reg_quarters=4, reg_unit_per_warp=256, max_warps=64, max_blocks=32,
            smem_per_sm=228 * 1024, smem_reserved_per_block=1024, sms=132)


# ---------------------------------------------------------------------------------------- compile

def _specialize(value, param):
    """(type, attr) of one argument as JITFunction.run specialises it (pointer alignment, ints equal
    to 1 or multiples of 16)."""
    from triton.backends.compiler import BaseBackend
    try:
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # older Triton: the same rules, written out
        import torch
        if isinstance(value, torch.Tensor):
            ty = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                        torch.int64: "i64", torch.int32: "i32"}[value.dtype]
            return ty, "D" if value.data_ptr() % 16 == 0 else ""
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            if value == 1:
                return "constexpr", 1
            return ("i32" if -2**31 <= value < 2**31 else "i64"), "D" if value % 16 == 0 else ""
        return "fp32", None
    return native_specialize_impl(BaseBackend, value, param.is_const, not param.do_not_specialize,
                                  not param.do_not_specialize_on_alignment)


_COMPILED: Dict[str, object] = {}


def compile_case(case):
    """triton.compile the case for sm_90; returns the CompiledKernel (once per distinct kernel:
    cases that differ only in their grid share it)."""
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = case.fn
    missing = [n for n in fn.arg_names if n not in case.args]
    extra = [n for n in case.args if n not in fn.arg_names]
    if missing or extra:
        raise ValueError(f"{case.kernel} ({fn.__name__}): arguments missing {missing}, unknown {extra}")
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = case.args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, spec = _specialize(value, param)
        if ty == "constexpr":  # an int equal to 1
            signature[name], constexprs[name] = "constexpr", spec
            continue
        signature[name] = ty
        if spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    options = dict(num_warps=case.num_warps)
    if case.num_stages is not None:
        options["num_stages"] = case.num_stages
    if case.maxnreg is not None:
        options["maxnreg"] = case.maxnreg
    key = repr((fn.__module__, fn.__name__, sorted(signature.items()), sorted(constexprs.items()),
                sorted(attrs.items()), sorted(options.items())))
    if key not in _COMPILED:
        src = ASTSource(fn, signature, constexprs, attrs)
        _COMPILED[key] = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return _COMPILED[key]


# ------------------------------------------------------------------------------------------- read

def _nvidia_bin(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(cubin_path: str) -> Dict[str, int]:
    out = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin_path],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump --dump-resource-usage gave no resource line:\n{out}")
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups())))


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)


def parse_sass(text: str) -> List[tuple]:
    """[(address, opcode, operands, predicated)] of every instruction in ``cuobjdump -sass`` text."""
    instrs = []
    for addr, body in _SASS_LINE.findall(text):
        pred = body.startswith("@")
        if pred:
            body = body.split(None, 1)[1] if " " in body else ""
        parts = body.split(None, 1)
        if not parts:
            continue
        instrs.append((int(addr, 16), parts[0], parts[1] if len(parts) > 1 else "", pred))
    return instrs


def innermost_loops(instrs: List[tuple]) -> List[Dict[str, object]]:
    """Loops closed by backward branches that contain no other loop, with their instruction mix."""
    loops = set()
    for addr, op, operands, _ in instrs:
        if op.split(".")[0] == "BRA":
            m = re.search(r"0x([0-9a-f]+)", operands)
            if m and int(m.group(1), 16) < addr:  # (a branch to itself is the trap after EXIT)
                loops.add((int(m.group(1), 16), addr))
    inner = [lp for lp in loops
             if not any(o != lp and o[0] >= lp[0] and o[1] <= lp[1] for o in loops)]
    result = []
    for start, end in sorted(inner):
        body = [i for i in instrs if start <= i[0] <= end and i[1].split(".")[0] != "NOP"]
        kinds = {}
        for _, op, operands, _p in body:
            base = op.split(".")[0]
            kinds[base] = kinds.get(base, 0) + 1
        fwd_branches = sum(1 for a, op, operands, _ in body if op.split(".")[0] == "BRA"
                           and (m := re.search(r"0x([0-9a-f]+)", operands)) and int(m.group(1), 16) > a)
        result.append(dict(start=hex(start), end=hex(end), instructions=len(body),
                           mufu=kinds.get("MUFU", 0), bar=kinds.get("BAR", 0), shfl=kinds.get("SHFL", 0),
                           ldg=kinds.get("LDG", 0), stg=kinds.get("STG", 0),
                           lds=kinds.get("LDS", 0), sts=kinds.get("STS", 0),
                           spill_ops=kinds.get("LDL", 0) + kinds.get("STL", 0),
                           forward_branches=fwd_branches))
    return result


def occupancy(regs: int, smem: int, warps: int, spec=SM90) -> Dict[str, object]:
    """Programs (thread blocks) per SM and what limits them, by the CUDA occupancy calculator."""
    per_warp = -(-max(regs, 1) * 32 // spec["reg_unit_per_warp"]) * spec["reg_unit_per_warp"]
    quarter = spec["regs_per_sm"] // spec["reg_quarters"]
    warps_by_regs = (quarter // per_warp) * spec["reg_quarters"]
    limits = {
        "registers": warps_by_regs // warps,
        "warps": spec["max_warps"] // warps,
        "blocks": spec["max_blocks"],
        "shared memory": spec["smem_per_sm"] // (smem + spec["smem_reserved_per_block"]),
    }
    per_sm = min(limits.values())
    return dict(programs_per_sm=per_sm, limited_by=min(limits, key=limits.get), warps_per_sm=per_sm * warps)


def analyse(case, compiled, workdir: str) -> Dict[str, object]:
    cubin = os.path.join(workdir, f"{case.fn.__name__}.cubin")
    with open(cubin, "wb") as fh:
        fh.write(compiled.asm["cubin"])
    res = resource_usage(cubin)
    sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    instrs = parse_sass(sass)
    spill_ops = sum(1 for i in instrs if i[1].split(".")[0] in ("LDL", "STL"))
    smem = max(int(compiled.metadata.shared), res["static_shared"])
    occ = occupancy(res["regs"], smem, case.num_warps)
    waves = case.programs / (occ["programs_per_sm"] * SM90["sms"]) if occ["programs_per_sm"] else float("inf")
    loops = innermost_loops(instrs)
    per_element, loop_note = None, ""
    if case.loop_elements:
        if case.inner_loops is not None and len(loops) != case.inner_loops:
            loop_note = f"expected {case.inner_loops} innermost loop(s), found {len(loops)}: not reported"
        else:
            total = sum(lp["instructions"] for lp in loops)
            per_element = total * case.num_warps / case.loop_elements
    return dict(
        kernel=case.kernel, shape=case.shape, function=case.fn.__name__, config=case.config,
        num_warps=case.num_warps, num_stages=compiled.metadata.num_stages, maxnreg=case.maxnreg,
        registers=res["regs"], spill_bytes=max(res["local"], res["stack"]), stack_bytes=res["stack"],
        local_bytes=res["local"], spill_instructions=spill_ops,
        shared_bytes=smem, sass_instructions=len(instrs), innermost_loops=loops,
        loop_elements=case.loop_elements, warp_instructions_per_element=per_element, loop_note=loop_note,
        grid=list(case.grid), programs=case.programs, **occ, waves=round(waves, 3), note=case.note,
    )


# ------------------------------------------------------------------------------------------ write

def tool_versions() -> Dict[str, str]:
    def first_line(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()
            return out[-1] if out else "?"
        except OSError as exc:
            return f"unavailable ({exc})"
    from bench.machine import cpu_model
    return dict(triton=triton.__version__, ptxas=first_line([_nvidia_bin("ptxas"), "--version"]),
                cuobjdump=first_line([_nvidia_bin("cuobjdump"), "--version"]), python=platform.python_version(),
                host_cpu=cpu_model(), platform=platform.platform(),
                utc_time=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def _fmt(v, digits=2):
    return "—" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def to_markdown(report: Dict[str, object]) -> str:
    m = report["machine"]
    lines = [
        "# Static kernel report (sm_90, H200: 132 SMs)",
        "",
        f"Produced by `{report['command']}` on {m['host_cpu']} (no GPU): triton {m['triton']}, "
        f"{m['ptxas']}, {m['utc_time']}. Every kernel compiled for sm_90 at the configuration its host "
        "code picks for the GPU benchmark shapes (`bench/kernel_registry.py`); registers, spills (local "
        "memory / stack frame) and shared memory from `cuobjdump --dump-resource-usage` and the compiled metadata; "
        "instructions of the innermost SASS loops (closed by backward branches) per (d, n, t) element "
        "for the scans; programs per SM by the CUDA occupancy rules; waves = programs / (per SM × 132). "
        "Method in `bench/kernel_stats.py`.",
        "",
        "| kernel | shape | config | warps | stages | regs | spill B | smem B | inner-loop instr | "
        "warp instr / elem | programs/SM (limit) | programs | waves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | compile failed: {r['error']} |" + " |" * 10)
            continue
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        if r["maxnreg"]:
            cfg += f" maxnreg={r['maxnreg']}"
        loop = "+".join(str(lp["instructions"]) for lp in r["innermost_loops"]) or "—"
        per = _fmt(r["warp_instructions_per_element"]) if not r["loop_note"] else r["loop_note"]
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {cfg} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['shared_bytes']} | {loop} | {per} | "
            f"{r['programs_per_sm']} ({r['limited_by']}) | {r['programs']} | {_fmt(r['waves'])} |")
    lines += ["", "Innermost loops in detail (start–end address: instructions, MUFU, BAR, SHFL, LDG, STG, LDS, "
              "STS, forward branches):", ""]
    for r in report["cases"]:
        for lp in r.get("innermost_loops", []):
            lines.append(f"- {r['kernel']} {r['shape']}: {lp['start']}–{lp['end']}: {lp['instructions']} instr, "
                         f"MUFU {lp['mufu']}, BAR {lp['bar']}, SHFL {lp['shfl']}, LDG {lp['ldg']}, STG {lp['stg']}, "
                         f"LDS {lp['lds']}, STS {lp['sts']}, fwd branches {lp['forward_branches']}")
    return "\n".join(lines) + "\n"


def collect(only: Optional[List[str]] = None, log=print) -> Dict[str, object]:
    from bench.kernel_registry import REGISTRY
    names = list(REGISTRY) if not only else only
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown kernel(s) {unknown}; registered: {sorted(REGISTRY)}")
    cases = [c for n in names for c in REGISTRY[n]()]
    results, seen = [], {}
    with tempfile.TemporaryDirectory() as work:
        for i, case in enumerate(cases, 1):
            t0 = time.time()
            try:
                compiled = compile_case(case)
                row = analyse(case, compiled, work)
            except Exception as exc:  # reported in the table, and the command exits non-zero
                row = dict(kernel=case.kernel, shape=case.shape, error=f"{type(exc).__name__}: {exc}"[:300])
            results.append(row)
            log(f"[kernel_stats] {i}/{len(cases)} {case.kernel} {case.shape}: "
                + (row.get("error") or f"{row['registers']} regs, spill {row['spill_bytes']} B, "
                   f"{_fmt(row['warp_instructions_per_element'])} warp instr/elem") + f" ({time.time() - t0:.1f} s)")
    return dict(command=COMMAND + (" --only " + " ".join(only) if only else ""), machine=tool_versions(),
                target=dict(arch="sm_90", gpu="H200", **SM90), cases=results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", metavar="KERNEL", help="registered kernel names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "reports"), help="output directory (default reports/)")
    ap.add_argument("--stem", default="kernel-stats", help="file name stem (default kernel-stats)")
    args = ap.parse_args(argv)
    report = collect(args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{args.stem}.md").write_text(to_markdown(report))
    print(f"[kernel_stats] wrote {out / (args.stem + '.json')} and .md")
    return 1 if any("error" in r for r in report["cases"]) else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the interpreter replaces @triton.jit functions: compiling needs them as written
        os.execve(sys.executable, [sys.executable, "-m", "bench.kernel_stats", *sys.argv[1:]],
                  {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    sys.exit(main())
