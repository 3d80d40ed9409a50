"""Peak memory of one inference call, measured honestly.

* CUDA (in-process, outside the timed region): ``reset_peak_memory_stats`` then one call; the result is
  ``max_memory_allocated`` minus what was allocated before the call (weights and inputs excluded).
* CPU: a fresh process per configuration, ``python -m bench.memory_probe --model m2rec --backend torch
  --L 200 --batch 64 --n-items 3706``. It imports torch, builds the model and the inputs, runs one tiny
  warm-up call (lazy start-up of the math libraries), resets the kernel's resident-set high-water mark to
  the current RSS (``/proc/self/clear_refs`` "5", Linux >= 4.0), runs the call once at the configuration
  and prints, as one JSON line, the peak RSS (``VmHWM`` of ``/proc/self/status``) minus the RSS just
  before the call: the memory the call itself needed, weights and inputs excluded, as on the GPU. Where the reset is
  refused, the baseline is the high-water mark before the call and the JSON says so (``method``), since
  the call's peak is then only visible where it exceeds earlier peaks.

A fresh process matters: the high-water mark only goes down by that reset, and freed memory kept by the allocator would hide
the next configuration's peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

_MB = 2.0 ** 20
ROOT = Path(__file__).resolve().parent.parent


def cuda_peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """MB allocated at the peak of one call of ``fn`` on ``device`` beyond what was allocated before."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / _MB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_high_water_mark_bytes() -> int:
    """VmHWM of this process. Not ``ru_maxrss``: that also keeps the peak of the pre-exec image, i.e. the
    RSS of the parent this process was forked from, which would swamp small peaks."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM line in /proc/self/status")


def _reset_rss_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_peak_mb(fn: Callable[[], object]) -> Tuple[float, str]:
    """(MB of RSS the call of ``fn`` added at its peak, method). Meant for a fresh process: see module doc."""
    reset = _reset_rss_high_water_mark()
    baseline = _current_rss_bytes() if reset else _rss_high_water_mark_bytes()
    fn()
    peak = _rss_high_water_mark_bytes()
    method = ("fresh process, RSS high-water mark reset before the call" if reset else
              "fresh process, high-water mark not resettable: growth above the earlier peak only")
    return max(peak - baseline, 0) / _MB, method


def probe(model: str, backend: str, L: int, batch: int, n_items: int) -> Dict[str, object]:
    """Run in the fresh process: build, warm up on a tiny batch, measure one full call."""
    from .workloads import build_bench_model, inference_call, random_batch

    torch.manual_seed(0)
    device = torch.device("cpu")
    net, notes = build_bench_model(model, backend, n_items, L, device)
    tiny_seq, tiny_len, _ = random_batch(n_items, min(L, 4), 1, device)
    inference_call(net, tiny_seq, tiny_len)()
    seq, lengths, _ = random_batch(n_items, L, batch, device)
    mb, method = cpu_peak_mb(inference_call(net, seq, lengths))
    return dict(model=model, backend=backend, L=L, batch=batch, n_items=n_items,
                peak_mem_mb=round(mb, 3), method=method, **notes)


def probe_in_subprocess(model: str, backend: str, L: int, batch: int, n_items: int,
                        timeout: float = 300.0) -> Dict[str, object]:
    """Run :func:`probe` in a fresh interpreter; on failure return a row whose ``error`` says why."""
    cmd = [sys.executable, "-m", "bench.memory_probe", "--model", model, "--backend", backend,
           "--L", str(L), "--batch", str(batch), "--n-items", str(n_items)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # one math thread per probe: probes run two at a time (the peak hardly depends on the thread count)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(model=model, backend=backend, L=L, batch=batch, error=f"timed out after {timeout:.0f} s")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return dict(model=model, backend=backend, L=L, batch=batch,
                    error=f"probe exited {done.returncode}: {tail[0]}")
    return json.loads(lines[-1])


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="Peak RSS of one inference call, in this fresh process.")
    p.add_argument("--model", required=True, choices=["m2rec", "mamba4rec", "sasrec", "m2rec_unfused"])
    p.add_argument("--backend", default="torch")
    p.add_argument("--L", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--n-items", type=int, default=3706)
    a = p.parse_args(argv)
    print(json.dumps(probe(a.model, a.backend, a.L, a.batch, a.n_items)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
