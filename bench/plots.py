"""Plots of the benchmark results: ``python -m bench.plots [--in DIR]`` (default ``reports/``).

Reads every ``bench-<tag>-results.json`` in DIR (written by ``bench/run_suite.py``) and writes next to
it, per machine tag:

* ``bench-<tag>-latency.png``  — inference latency per batch vs sequence length, log-log, a panel per batch;
* ``bench-<tag>-memory.png``   — peak memory of one inference call vs sequence length;
* ``bench-<tag>-speedup.png``  — M2Rec's speedup over each baseline (baseline latency / M2Rec latency):
  M2Rec Triton where it ran (else each M2Rec backend) against M2Rec unfused (the paper's build on
  mamba_ssm), Mamba4Rec (mamba_ssm's CUDA scan where installed) and SASRec;
* ``bench-<tag>-ops.png``      — op-level speed relative to the torch reference, forward and fwd+bwd;
* ``bench-<tag>-training.png`` — training-step throughput (sequences per second), and beside it, where
  the scaling rows ran (CPU), M2Rec's throughput on 1 and 2 processes (DDP) with the speed-up;
* ``bench-<tag>-streaming.png`` — one streaming ``step`` beside a full ``scores()`` at the same L and batch.

Every number comes from the results file; rows that were not run are named in the legend or on the bar
with their reason, and the caption names the machine and the date of the run.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .machine import short_label  # noqa: E402
from .results import file_name, load_results  # noqa: E402

MODEL_NAMES = {"m2rec": "M2Rec", "mamba4rec": "Mamba4Rec", "sasrec": "SASRec", "m2rec_unfused": "M2Rec unfused"}
MODEL_COLORS = {"m2rec": "#1f77b4", "mamba4rec": "#ff7f0e", "sasrec": "#2ca02c", "m2rec_unfused": "#9467bd"}
BACKEND_COLORS = {"triton": "#1f77b4", "triton-dft": "#9467bd", "cpu": "#17becf", "torch": "#7f7f7f",
                  "torch.fft": "#2ca02c", "mamba_ssm": "#d62728",
                  "mamba_ssm_ref": "#ff7f0e"}
OPS = ("selective_scan", "selective_scan_final", "fft_filter", "causal_filter", "gated_fusion", "causal_conv1d")
#: M2Rec's line style per kernel backend (the models' colours are fixed)
M2REC_LINESTYLES = {"triton": "-", "cpu": "-."}
PASS_TITLES = {"op_forward": "forward", "op_forward_backward": "forward + backward"}


def series_label(name: str, backend: str) -> str:
    return f"{MODEL_NAMES.get(name, name)} ({backend})"


def _style(name: str, backend: str) -> Dict:
    linestyle = M2REC_LINESTYLES.get(backend, "--") if name == "m2rec" else "-"
    if backend == "compiled":  # torch.compile'd rows, beside the model's eager line
        linestyle = ":"
    return dict(color=MODEL_COLORS.get(name, "black"), linestyle=linestyle,
                marker={"m2rec": "o", "mamba4rec": "s", "sasrec": "^", "m2rec_unfused": "D"}.get(name, "x"))


def _caption(fig, data: Dict, source: Path, extra: str = "") -> None:
    lines = [f"Machine: {short_label(data['machine'])}."]
    second = f"Numbers from {source.name}."
    load = data.get("load_average_during_run")
    if load:
        cores = data["machine"].get("cpu_cores") or 1
        # the timings use 1 thread by default: a 1-min load above about one core means other work ran
        busy = " (other work shared the machine)" if max(load) > 1.0 else ""
        second += (f"  Load average (1 min) at start / end of the run: {load[0]:g} / {load[1]:g} on "
                   f"{cores} cores{busy}.")
    lines.append(second)
    if extra:
        lines.append(extra)
    fig.text(0.5, 0.005, "\n".join(lines), ha="center", va="bottom", fontsize=7.5, color="#333333")


def _not_run_handles(rows: List[Dict], kind: str) -> Tuple[List, List[str]]:
    """Legend entries naming the model rows of ``kind`` that were not run, with the reason."""
    seen = {}
    for r in rows:
        if r["kind"] == kind and r["status"] == "not run":
            seen.setdefault((r["name"], r["backend"]), r["reason"])
    handles, labels = [], []
    for (name, backend), reason in sorted(seen.items()):
        handles.append(Line2D([], [], color="#bbbbbb", linestyle=":", marker="x"))
        labels.append(f"{series_label(name, backend)}: not run\n" + textwrap.fill(reason, 44))
    return handles, labels


def _panels(n: int, width: float = 5.2, height: float = 4.4):
    fig, axes = plt.subplots(1, n, figsize=(max(width * n, 7.5), height), squeeze=False)
    return fig, list(axes[0])


def _by_batch(rows: List[Dict], kind: str) -> Dict[int, Dict[Tuple[str, str], List[Dict]]]:
    out: Dict[int, Dict[Tuple[str, str], List[Dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["kind"] == kind and r["status"] == "ok":
            out[r["batch"]][(r["name"], r["backend"])].append(r)
    for series in out.values():
        for pts in series.values():
            pts.sort(key=lambda r: r["L"])
    return out


def _line_figure(data: Dict, source: Path, value: str, ylabel: str, title: str, out: Path) -> Path:
    rows = data["rows"]
    groups = _by_batch(rows, "inference")
    batches = sorted(groups)
    fig, axes = _panels(max(len(batches), 1))
    for ax, batch in zip(axes, batches):
        for (name, backend), pts in sorted(groups[batch].items()):
            pts = [p for p in pts if p.get(value) not in (None, "")]
            if not pts:
                continue
            xs, ys = [p["L"] for p in pts], [float(p[value]) for p in pts]
            ax.plot(xs, ys, label=series_label(name, backend), **_style(name, backend))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["L"] for r in rows if r["kind"] == "inference"}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(f"batch = {batch}")
        ax.set_xlabel("sequence length L (items)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        _plain_log_labels(ax.yaxis)
    handles, labels = _merged_handles(axes)
    nr_h, nr_l = _not_run_handles(rows, "inference")
    fig.legend(handles + nr_h, labels + nr_l, fontsize=8, loc="center right", frameon=False)
    fig.suptitle(title)
    _caption(fig, data, source, "Inference: last-position scores over the whole catalogue "
             f"({_n_items(data)} items), width 64, torch.inference_mode; {_stat_note(value)}.")
    fig.tight_layout(rect=(0, 0.09, LEGEND_RIGHT, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


LEGEND_RIGHT = 0.72  # share of the figure width left to the panels; the legend takes the rest


def _n_items(data: Dict) -> str:
    n = data.get("n_items")
    return f"{int(n):,}" if n else "?"


def _stat_note(value: str) -> str:
    if value == "median_ms":
        return "median of the timed rounds (robust to other load on the machine)"
    return "peak above the pre-call baseline, one call (fresh process per point on CPU)"


def _plain_log_labels(axis) -> None:
    """Plain numbers (0.5, 2, 300) instead of 5x10^-1 on a log axis; minor ticks at 2 and 5 labelled
    only when the axis spans less than two decades."""
    lo, hi = axis.get_view_interval()
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    if lo > 0 and hi / lo < 300:
        axis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
        axis.set_minor_formatter(plain)
    else:
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _merged_handles(axes) -> Tuple[List, List[str]]:
    """Legend entries of all panels, each label once."""
    seen: Dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    return list(seen.values()), list(seen.keys())


def plot_latency(data: Dict, source: Path, out: Path) -> Path:
    return _line_figure(data, source, "median_ms", "latency per batch (ms, median)",
                        "Inference latency vs sequence length", out)


def plot_memory(data: Dict, source: Path, out: Path) -> Path:
    return _line_figure(data, source, "peak_mem_mb", "peak memory of one call (MB, above baseline)",
                        "Inference peak memory vs sequence length", out)


def plot_speedup(data: Dict, source: Path, out: Path) -> Path:
    groups = _by_batch(data["rows"], "inference")
    batches = sorted(groups)
    fig, axes = _panels(max(len(batches), 1))
    for ax, batch in zip(axes, batches):
        series = groups[batch]
        m2rec = _speedup_subjects(series)
        baselines = {k: v for k, v in series.items() if k[0] != "m2rec"}
        for (mname, mback), mpts in sorted(m2rec.items()):
            m_by_L = {p["L"]: float(p["median_ms"]) for p in mpts}
            for (bname, bback), bpts in sorted(baselines.items()):
                if (mback == "compiled") != (bback == "compiled"):
                    continue  # torch.compile'd M2Rec against torch.compile'd baselines only
                xs, ys = [], []
                for p in bpts:
                    if p["L"] in m_by_L:
                        xs.append(p["L"])
                        ys.append(float(p["median_ms"]) / m_by_L[p["L"]])
                if not xs:
                    continue
                style = dict(color=MODEL_COLORS.get(bname, "black"),
                             linestyle=M2REC_LINESTYLES.get(mback, "--"), marker="o")
                ax.plot(xs, ys, label=f"{series_label(mname, mback)} vs {series_label(bname, bback)}", **style)
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:.3g}x", (x, y), textcoords="offset points", xytext=(0, 5),
                                ha="center", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["L"] for r in data["rows"] if r["kind"] == "inference"}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        _plain_log_labels(ax.yaxis)
        ax.set_title(f"batch = {batch}")
        ax.set_xlabel("sequence length L (items)")
        ax.set_ylabel("speedup (baseline latency / M2Rec latency)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = _merged_handles(axes)
    nr_h, nr_l = _not_run_handles([r for r in data["rows"] if not _budget_skip(r)], "inference")
    fig.legend(handles + nr_h, labels + nr_l, fontsize=8, loc="center right", frameon=False)
    fig.suptitle("Speedup of M2Rec over each baseline at inference (> 1: M2Rec is faster)")
    _caption(fig, data, source, "Ratio of median latencies per batch at the same L and batch.")
    fig.tight_layout(rect=(0, 0.09, LEGEND_RIGHT, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _speedup_subjects(series: Dict[Tuple[str, str], List[Dict]]) -> Dict[Tuple[str, str], List[Dict]]:
    """The M2Rec series a speedup is computed for: the product's fastest eager path that ran — Triton
    (GPU), else the compiled CPU kernels, else every M2Rec backend that ran — and the torch.compile'd
    M2Rec (compared with the torch.compile'd baselines). The baselines, M2Rec unfused among them, are
    what it is measured against."""
    m2rec = {k: v for k, v in series.items() if k[0] == "m2rec"}
    compiled = {k: v for k, v in m2rec.items() if k[1] == "compiled"}
    for backend in ("triton", "cpu"):
        chosen = {k: v for k, v in m2rec.items() if k[1] == backend}
        if chosen:
            return {**chosen, **compiled}
    return m2rec


def _budget_skip(row: Dict) -> bool:
    return "time budget" in str(row.get("reason", ""))


def _ms(v: float) -> str:
    return f"{v:.0f} ms" if v >= 100 else f"{v:.3g} ms"


def plot_ops(data: Dict, source: Path, out: Path) -> Path:
    rows = [r for r in data["rows"] if r["kind"] in PASS_TITLES]
    order = ("triton", "triton-dft", "cpu", "torch", "torch.fft", "mamba_ssm", "mamba_ssm_ref")
    backends = [b for b in order if any(r["backend"] == b for r in rows)]
    ran = {b for b in backends if any(r["backend"] == b and r["status"] == "ok" for r in rows)}
    fig, axes = _panels(2, width=6.4, height=4.8)
    notes: Dict[str, str] = {}
    width = 0.8 / max(len(backends), 1)
    for ax, kind in zip(axes, PASS_TITLES):
        cell = {(_op_group(r, rows), r["backend"]): r for r in rows if r["kind"] == kind}
        ops = [g for op in OPS for g in sorted({k[0] for k in cell if k[0].split(" L")[0] == op},
                                                key=lambda g: (len(g), g))]
        speeds = [1.0]
        for i, op in enumerate(ops):
            present = [b for b in backends if (op, b) in cell]
            ref = cell.get((op, "torch"))
            for j, backend in enumerate(present):
                r = cell[(op, backend)]
                x = i + (j - (len(present) - 1) / 2) * width
                if r["status"] != "ok":
                    ax.bar(x, 1.0, width, color="white", edgecolor="#999999", hatch="//", linewidth=0.6)
                    ax.text(x, 1.0, "not run", rotation=90, ha="center", va="top", fontsize=7,
                            bbox=dict(facecolor="white", edgecolor="none", pad=0.5))
                    notes.setdefault(backend, r["reason"])
                    continue
                if ref is None or ref["status"] != "ok":
                    continue
                speed = float(ref["median_ms"]) / float(r["median_ms"])
                speeds.append(speed)
                ax.bar(x, speed, width, color=BACKEND_COLORS.get(backend, "black"))
                ax.text(x, speed, _ms(float(r["median_ms"])), rotation=90, ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(
            [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000]))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(range(len(ops)))
        ax.set_xticklabels(ops)
        ax.set_ylabel("speed vs the torch reference (x, log scale)")
        ax.set_title(PASS_TITLES[kind])
        ax.grid(True, axis="y", which="major", alpha=0.3)
        ax.set_ylim(min(min(speeds) / 2, 0.3), max(max(speeds), 3.0) * 4)
    handles = [plt.Rectangle((0, 0), 1, 1, color=BACKEND_COLORS.get(b, "black")) if b in ran else
               plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="#999999", hatch="//") for b in backends]
    labels = [b if b in ran else f"{b} (not run)" for b in backends]
    fig.legend(handles, labels, fontsize=8, loc="center right", frameon=False, title="backend")
    extra = "Shapes: " + _op_shapes(rows) + " Bars: median latency per call of the torch reference / of the backend."
    if notes:
        extra += "\nNot run: " + "; ".join(f"{b}: {why}" for b, why in notes.items())
    fig.suptitle("Op-level speed relative to the PyTorch reference (bars labelled with median latency per call)")
    _caption(fig, data, source, "\n".join(textwrap.fill(part, 190) for part in extra.split("\n")))
    fig.tight_layout(rect=(0, 0.2, 0.86, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _op_group(row: Dict, rows: List[Dict]) -> str:
    """The bar group of an op row: the op's name, with " L<n>" when the op was timed at several L."""
    lengths = {r["L"] for r in rows if r["name"] == row["name"]}
    return row["name"] if len(lengths) == 1 else f"{row['name']} L{row['L']}"


def _op_shapes(rows: List[Dict]) -> str:
    parts: Dict[str, Dict] = {}
    for r in rows:
        entry = parts.setdefault(r["name"], dict(batch=r["batch"], L=set()))
        entry["L"].add(r["L"])
    return "; ".join(f"{op} batch {parts[op]['batch']}, L {' and '.join(str(L) for L in sorted(parts[op]['L']))}"
                     for op in OPS if op in parts) + (" (d_inner 128, N 32 for the scan; d_inner 128, 4 taps for "
                                                      "causal_conv1d; d 64 otherwise).")


def plot_training(data: Dict, source: Path, out: Path) -> Path:
    rows = [r for r in data["rows"] if r["kind"] == "training"]
    scaling = [r for r in data["rows"] if r["kind"] == "training_processes"]
    configs = sorted({(r["L"], r["batch"]) for r in rows}, key=lambda c: (c[1], c[0]))
    series = sorted({(r["name"], r["backend"]) for r in rows})
    if scaling:  # [throughput panel | its legend | the scaling panel]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3, 1.25, 1.1]})
        axes[1].axis("off")
        _plot_process_scaling(axes[2], scaling)
    else:
        fig, axes = _panels(1, width=10.5, height=4.8)
    ax = axes[0]
    width = 0.8 / max(len(series), 1)
    cell = {(r["name"], r["backend"], r["L"], r["batch"]): r for r in rows}
    for j, (name, backend) in enumerate(series):
        for i, (L, batch) in enumerate(configs):
            r = cell.get((name, backend, L, batch))
            if r is None:
                continue
            x = i + (j - (len(series) - 1) / 2) * width
            if r["status"] != "ok":
                ax.bar(x, 0, width)
                ax.text(x, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            rate = batch / (float(r["median_ms"]) / 1e3)
            ax.bar(x, rate, width, color=_style(name, backend)["color"],
                   hatch={"--": "//", "-.": ".."}.get(_style(name, backend)["linestyle"]),
                   edgecolor="white", label=series_label(name, backend))
            ax.text(x, rate, f"{rate:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"L={L}, batch={b}" for L, b in configs])
    ax.set_ylabel("training throughput (sequences / s)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    nr_h, nr_l = _not_run_handles(data["rows"], "training")
    (axes[1] if scaling else fig).legend(list(uniq.values()) + nr_h, list(uniq.keys()) + nr_l, fontsize=8,
                                         loc="center left" if scaling else "center right", frameon=False)
    ax.set_title("Training step throughput (Adam, all-position cross-entropy over the catalogue)")
    ax.grid(True, axis="y", alpha=0.3)
    extra = "Throughput = batch / median step time (forward, backward and optimiser step)."
    if scaling:
        extra += (" Right: the global batch split among processes (DDP over gloo, each process with its own"
                  " threads); speed-up over 1 process.")
    _caption(fig, data, source, extra)
    fig.tight_layout(rect=(0, 0.1, 1 if scaling else 0.7, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _plot_process_scaling(ax, rows: List[Dict]) -> None:
    """M2Rec's training throughput on 1, 2, ... processes (one bar each), labelled with the speed-up."""
    rows = sorted(rows, key=lambda r: r["backend"])
    base = next((r for r in rows if r["status"] == "ok" and r["backend"].endswith(" 1 process")), None)
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            ax.bar(i, 0, 0.6)
            ax.text(i, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=7)
            continue
        rate = r["batch"] / (float(r["median_ms"]) / 1e3)
        ax.bar(i, rate, 0.6, color=MODEL_COLORS.get(r["name"], "black"), alpha=1.0 if i == 0 else 0.65)
        speedup = ""
        if base is not None and r is not base:
            speedup = f"\n{float(base['median_ms']) / float(r['median_ms']):.2f}x"
        ax.text(i, rate, f"{rate:.3g}{speedup}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["backend"].split(", ", 1)[-1] for r in rows], fontsize=8)
    first = rows[0]
    ax.set_title(f"{MODEL_NAMES.get(first['name'], first['name'])} (torch) on processes\nL={first['L']}, "
                 f"global batch={first['batch']}", fontsize=9)
    ax.set_ylabel("training throughput (sequences / s)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.2)


def plot_streaming(data: Dict, source: Path, out: Path) -> Path:
    rows = data["rows"]
    stream = sorted((r for r in rows if r["kind"] == "streaming"),
                    key=lambda r: (r["name"], r["backend"], r["batch"], r["L"]))
    full = {(r["name"], r["backend"], r["L"], r["batch"]): r for r in rows
            if r["kind"] == "inference" and r["status"] == "ok"}
    fig, axes = _panels(1, width=8.5, height=4.8)
    ax = axes[0]
    width, values, notes = 0.38, [1.0], {}
    for i, r in enumerate(stream):
        key = (r["name"], r["backend"], r["L"], r["batch"])
        if r["status"] != "ok":
            ax.bar(i, 1.0, 2 * width, color="white", edgecolor="#999999", hatch="//", linewidth=0.6)
            ax.text(i, 1.0, "not run", ha="center", va="bottom", fontsize=7)
            notes.setdefault(series_label(r["name"], r["backend"]), r["reason"])
            continue
        step_ms = float(r["median_ms"])
        bars = [(i + width / 2, step_ms, MODEL_COLORS.get(r["name"], "black"), "step")]
        scores = full.get(key)
        if scores is not None:
            bars.insert(0, (i - width / 2, float(scores["median_ms"]), "#bbbbbb", "scores()"))
            ax.text(i, float(scores["median_ms"]) * 2.2, f"step = 1/{float(scores['median_ms']) / step_ms:.3g}\nof scores()",
                    ha="center", va="bottom", fontsize=8)
        for x, v, color, label in bars:
            values.append(v)
            ax.bar(x, v, width, color=color, label=label)
            ax.text(x, v, _ms(v), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(stream)))
    ax.set_xticklabels([f"{series_label(r['name'], r['backend'])}\nL={r['L']}, batch={r['batch']}" for r in stream],
                       fontsize=8)
    ax.set_ylim(min(values) / 3, max(values) * 12)
    ax.set_ylabel("latency per batch (ms, median, log scale)")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(list(uniq.values()), list(uniq.keys()), fontsize=8, loc="center right", frameon=False)
    ax.set_title("Streaming: one new item per user (step) vs scoring the whole history (scores())")
    extra = (f"step: M2Rec.step after a prefill of L - 1 items per user, scores over the catalogue "
             f"({_n_items(data)} items) included; scores(): the inference row at the same L and batch.")
    if notes:
        extra += "\nNot run: " + "; ".join(f"{k}: {why}" for k, why in notes.items())
    _caption(fig, data, source, "\n".join(textwrap.fill(part, 150) for part in extra.split("\n")))
    fig.tight_layout(rect=(0, 0.14, 0.85, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_results(results_json: Path) -> List[Path]:
    """Draw every figure for one results file; returns the PNG paths."""
    results_json = Path(results_json)
    data = load_results(results_json)
    tag, out_dir = data.get("machine_tag", "cpu"), results_json.parent
    pngs = []
    for what, fn in (("latency", plot_latency), ("memory", plot_memory), ("speedup", plot_speedup),
                     ("ops", plot_ops), ("training", plot_training), ("streaming", plot_streaming)):
        pngs.append(fn(data, results_json, out_dir / file_name(tag, f"{what}.png")))
    return pngs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Draw the benchmark plots from bench-*-results.json files.")
    p.add_argument("--in", dest="in_dir", default=str(Path(__file__).resolve().parent.parent / "reports"),
                   help="directory holding bench-<tag>-results.json (default: reports/)")
    args = p.parse_args(argv)
    files = sorted(Path(args.in_dir).glob("bench-*-results.json"))
    if not files:
        print(f"no bench-*-results.json in {args.in_dir}; run python -m bench.run_suite first", file=sys.stderr)
        return 1
    for f in files:
        for png in plot_results(f):
            print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
