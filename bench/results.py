"""Tidy results: one row per (kind, name, backend, L, batch) from pytest-benchmark's JSON, the not-run
records and the memory probes; written as CSV and JSON (with the machine metadata) and read back by
the plots.

Row fields (CSV columns, in order) — ``kind`` is "inference", "training", "training_processes" (the
training step on 1 and 2 processes; ``backend`` says how many), "streaming", "op_forward" or
"op_forward_backward"; ``name`` the model or op; latencies in milliseconds per call (per batch);
``per_seq_ms`` = mean / batch; ``seq_per_s`` = batch / mean; ``peak_mem_mb`` the call's peak memory
above its baseline (see ``bench/memory_probe.py``); ``status`` "ok", "not run" or "probe failed".
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Iterable, List

COLUMNS = ("kind", "name", "backend", "L", "batch", "device", "status", "mean_ms", "median_ms", "stddev_ms",
           "min_ms", "rounds", "per_seq_ms", "seq_per_s", "peak_mem_mb", "mem_method", "impl", "reason",
           "compile_s")


def file_name(tag: str, what: str) -> str:
    """``bench-<tag>-<what>``: every output carries the machine tag (``cpu``/``gpu``)."""
    return f"bench-{tag}-{what}"


def rows_from_pytest_benchmark(raw: Dict) -> List[Dict]:
    rows = []
    for b in raw.get("benchmarks", []):
        info, stats = b.get("extra_info", {}), b["stats"]
        if "kind" not in info:
            continue  # not one of ours
        batch = int(info["batch"])
        mean = float(stats["mean"])
        rows.append({
            "kind": info["kind"], "name": info["name"], "backend": info["backend"], "L": int(info["L"]),
            "batch": batch, "device": info.get("device", ""), "status": "ok",
            "mean_ms": mean * 1e3, "median_ms": float(stats["median"]) * 1e3,
            "stddev_ms": float(stats["stddev"]) * 1e3, "min_ms": float(stats["min"]) * 1e3,
            "rounds": int(stats["rounds"]), "per_seq_ms": mean * 1e3 / batch, "seq_per_s": batch / mean,
            "peak_mem_mb": info.get("peak_mem_mb"), "mem_method": info.get("mem_method", ""),
            "impl": info.get("impl", ""), "reason": "",
            "compile_s": info.get("compile_s"),  # torch.compile rows: the warm-up call that compiled
        })
    return rows


def rows_from_not_run(records: Iterable[Dict]) -> List[Dict]:
    return [{"kind": r["kind"], "name": r["name"], "backend": r["backend"], "L": int(r["L"]),
             "batch": int(r["batch"]), "device": r.get("device", ""), "status": "not run",
             "reason": r["reason"], "impl": ""} for r in records]


def attach_memory(rows: List[Dict], probes: Iterable[Dict]) -> List[Dict]:
    """Put each CPU memory probe's peak on its inference row (matched on name, backend label, L, batch)."""
    by_key = {(r["kind"], r["name"], r["backend"], r["L"], r["batch"]): r for r in rows}
    for p in probes:
        label = p.get("backend_label", p["backend"])
        row = by_key.get(("inference", p["model"], label, int(p["L"]), int(p["batch"])))
        if row is None:
            continue
        if "error" in p:
            row["mem_method"] = f"probe failed: {p['error']}"
        else:
            row["peak_mem_mb"] = p["peak_mem_mb"]
            row["mem_method"] = p["method"]
    return rows


def sort_rows(rows: List[Dict]) -> List[Dict]:
    return sorted(rows, key=lambda r: (r["kind"], r["name"], r["backend"], r["batch"], r["L"]))


def write_results(out_dir: Path, tag: str, rows: List[Dict], meta: Dict) -> Dict[str, Path]:
    rows = sort_rows(rows)
    csv_path, json_path = out_dir / file_name(tag, "results.csv"), out_dir / file_name(tag, "results.json")
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    with open(json_path, "w") as fh:
        json.dump(dict(meta, rows=[{k: r.get(k) for k in COLUMNS} for r in rows]), fh, indent=1)
    return {"csv": csv_path, "json": json_path}


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def load_results(path: Path) -> Dict:
    """A ``bench-<tag>-results.json`` as written by :func:`write_results` (meta + rows)."""
    with open(path) as fh:
        data = json.load(fh)
    if "rows" not in data or "machine" not in data:
        raise ValueError(f"{path}: not a benchmark results file (expected keys 'machine' and 'rows')")
    return data
