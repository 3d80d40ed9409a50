"""Triton compilation cost, made visible: a pytest plugin (``-p bench.triton_compile_log``) that appends
one JSON line per compilation to the file named by ``M2REC_TRITON_COMPILE_LOG``.

It uses Triton's compilation listener (``triton.knobs.compilation.listener``, Triton >= 3.4; the GPU
image has 3.6): kernel name, microseconds spent in each lowering stage, and whether the cache served
it. ``summarize`` turns the lines into per-kernel counts and seconds for gpu-check's summary. Where the
listener does not exist, nothing is recorded and the summary says so. Autotuning's benchmark runs are not
compilations; gpu-check sets ``TRITON_PRINT_AUTOTUNING=1`` so their time is in its log.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable


def _listener(path: str):
    def record(*, src, metadata, metadata_group, times, cache_hit):
        fn = getattr(src, "fn", None)
        name = getattr(fn, "__name__", None) or metadata.get("name", "?")
        line = {"kernel": name, "cache_hit": bool(cache_hit), "us": int(times.total),
                "stages_us": dict(times.lowering_stages), "num_warps": metadata.get("num_warps"),
                "num_stages": metadata.get("num_stages"), "pid": os.getpid()}
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

    return record


def pytest_configure(config):
    path = os.environ.get("M2REC_TRITON_COMPILE_LOG", "")
    if not path:
        return
    try:
        from triton import knobs
    except Exception:  # no triton, or one without knobs
        return
    compilation = getattr(knobs, "compilation", None)
    if compilation is not None and hasattr(compilation, "listener"):
        compilation.listener = _listener(path)


def read_lines(path: Path) -> Iterable[Dict]:
    if not Path(path).exists():
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summarize(lines: Iterable[Dict]) -> Dict[str, Dict[str, float]]:
    """Per kernel: compilations, cache hits, total and largest seconds spent compiling (misses only)."""
    out: Dict[str, Dict[str, float]] = defaultdict(lambda: {"compiled": 0, "cache_hits": 0, "seconds": 0.0,
                                                           "max_seconds": 0.0})
    for line in lines:
        k = out[line["kernel"]]
        if line.get("cache_hit"):
            k["cache_hits"] += 1
            continue
        secs = line["us"] / 1e6
        k["compiled"] += 1
        k["seconds"] = round(k["seconds"] + secs, 3)
        k["max_seconds"] = round(max(k["max_seconds"], secs), 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["seconds"]))
