"""The README's benchmark tables, printed from a results file (never typed by hand).

    python -m bench.summary reports/bench-cpu-results.json                    # print them
    python -m bench.summary reports/bench-cpu-results.json --readme README.md  # or put them in the README

Every figure is a median latency from that one run of the suite, and every ratio is between two rows of
it (same machine, same load, same thread count): M2Rec against SASRec for inference and training, a
streaming step against a full ``scores()`` call at the same shape, the compiled CPU ops against their
PyTorch references, and a training step on 1 against 2 processes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .results import load_results

# (row name, backend label, column title) of the model tables, in column order
MODEL_COLUMNS = (
    ("m2rec", "cpu", "M2Rec (compiled CPU kernels)"),
    ("m2rec", "compiled", "M2Rec (torch.compile)"),
    ("m2rec", "torch", "M2Rec (PyTorch reference)"),
    ("m2rec_unfused", "mamba_ssm_ref", "M2Rec unfused (paper's build)"),
    ("mamba4rec", "mixer-cpu", "Mamba4Rec (compiled CPU scan)"),
    ("sasrec", "sdpa", "SASRec (SDPA)"),
    ("sasrec", "compiled", "SASRec (torch.compile)"),
)
SUBJECT, PEER = ("m2rec", "cpu"), ("sasrec", "sdpa")


def _index(rows: Sequence[Dict]) -> Dict[Tuple, Dict]:
    return {(r["kind"], r["name"], r["backend"], int(r["L"]), int(r["batch"])): r for r in rows}


def _ms(row: Optional[Dict]) -> Optional[float]:
    if row is None or row.get("status") != "ok" or row.get("median_ms") is None:
        return None
    return float(row["median_ms"])


def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "—"
    return f"{v:.2f} ms" if v < 10 else (f"{v:.1f} ms" if v < 1000 else f"{v:.0f} ms")


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def model_table(rows: Sequence[Dict], kind: str) -> List[str]:
    """Median latency per model and shape, and M2Rec (compiled CPU kernels) / SASRec (SDPA)."""
    idx = _index(rows)
    shapes = sorted({(int(r["batch"]), int(r["L"])) for r in rows if r["kind"] == kind})
    columns = [c for c in MODEL_COLUMNS if any(_ms(idx.get((kind, c[0], c[1], L, b))) for b, L in shapes)]
    if not shapes or not columns:
        return []
    head = ["batch", "L"] + [c[2] for c in columns] + ["M2Rec / SASRec"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, L in shapes:
        cells = [_fmt_ms(_ms(idx.get((kind, n, be, L, b)))) for n, be, _ in columns]
        ratio = _ratio(_ms(idx.get((kind, *SUBJECT, L, b))), _ms(idx.get((kind, *PEER, L, b))))
        lines.append("| " + " | ".join([str(b), str(L)] + cells + [ratio]) + " |")
    return lines


def streaming_table(rows: Sequence[Dict]) -> List[str]:
    """A streaming step (one new item per user) against a full scores() call at the same shape."""
    idx = _index(rows)
    lines = []
    for r in sorted((r for r in rows if r["kind"] == "streaming" and _ms(r) is not None),
                    key=lambda r: (r["name"], r["backend"], r["L"], r["batch"])):
        L, b = int(r["L"]), int(r["batch"])
        full = _ms(idx.get(("inference", r["name"], r["backend"], L, b)))
        share = "—" if full is None else f"1/{full / _ms(r):.1f}"
        lines.append(f"| {r['name']} ({r['backend']}) | {b} | {L} | {_fmt_ms(_ms(r))} | {_fmt_ms(full)} | {share} |")
    if not lines:
        return []
    return ["| model | batch | history L | step | scores() | step / scores() |", "|---|---|---|---|---|---|"] + lines


def op_table(rows: Sequence[Dict], backend: str = "cpu", reference: str = "torch") -> List[str]:
    """Each op's compiled CPU kernel against its PyTorch reference, forward and forward + backward."""
    idx = _index(rows)
    lines = []
    for r in sorted((r for r in rows if r["kind"].startswith("op_") and r["backend"] == backend and _ms(r)),
                    key=lambda r: (r["name"], r["L"], r["kind"])):
        ref = _ms(idx.get((r["kind"], r["name"], reference, int(r["L"]), int(r["batch"]))))
        what = "forward" if r["kind"] == "op_forward" else "forward + backward"
        speedup = "—" if ref is None else f"{ref / _ms(r):.1f}×"
        lines.append(f"| {r['name']} | {what} | {r['batch']} | {r['L']} | {_fmt_ms(_ms(r))} | {_fmt_ms(ref)} | "
                     f"{speedup} |")
    if not lines:
        return []
    return [f"| op | pass | batch | L | {backend} | {reference} | speed-up |", "|---|---|---|---|---|---|---|"] + lines


def process_table(rows: Sequence[Dict]) -> List[str]:
    """A training step at one global batch on 1 and on 2 processes (DDP over gloo)."""
    runs = [r for r in rows if r["kind"] == "training_processes" and _ms(r) is not None]
    if not runs:
        return []
    runs.sort(key=lambda r: r["backend"])
    one = next((r for r in runs if "1 process" in r["backend"]), None)
    lines = ["| run | global batch | L | step | speed-up vs 1 process |", "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['name']} ({r['backend']}) | {r['batch']} | {r['L']} | {_fmt_ms(_ms(r))} | "
                     f"{_ratio(_ms(one), _ms(r))} |")
    return lines


def machine_line(data: Dict) -> str:
    m = data["machine"]
    load = data.get("load_average_during_run")
    parts = [f"{m.get('cpu_model')} ({m.get('cpu_cores')} cores, {m.get('timing_threads', '?')} timing thread(s))",
             f"torch {m.get('torch')}", f"triton {m.get('triton')}", m.get("utc_time", "")]
    if m.get("gpu"):
        parts.insert(1, f"GPU {m['gpu']}")
    text = ", ".join(p for p in parts if p)
    if load is not None:
        text += f"; load average during the run {load}"
    if data.get("suite_seconds") is not None:
        text += f"; whole suite {data['suite_seconds']:.0f} s"
    return text


def summary(data: Dict) -> str:
    rows = data["rows"]
    out = [f"Machine: {machine_line(data)}.", ""]
    for title, lines in (("Inference (last-position scores over the catalogue), median per batch",
                          model_table(rows, "inference")),
                         ("Training step, median", model_table(rows, "training")),
                         ("Streaming", streaming_table(rows)),
                         ("Compiled CPU ops against the PyTorch references", op_table(rows)),
                         ("Training on 1 and 2 processes", process_table(rows))):
        if lines:
            out += [f"**{title}**", ""] + lines + [""]
    return "\n".join(out)


README_START, README_END = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with what lies between the README's two markers replaced by ``block``."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {README_START} ... {README_END} block")
    return text[:start + len(README_START)] + "\n" + block.rstrip("\n") + "\n" + text[end:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Print the README's benchmark tables from a results file.")
    p.add_argument("results", type=Path, nargs="?", default=Path("reports/bench-cpu-results.json"))
    p.add_argument("--readme", type=Path, help="write the tables between the bench-summary markers of this file")
    a = p.parse_args(argv)
    text = summary(load_results(a.results))
    if a.readme is None:
        print(text)
    else:
        a.readme.write_text(replace_readme_block(a.readme.read_text(), f"(from `{a.results}`)\n\n" + text))
        print(f"wrote the tables into {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
