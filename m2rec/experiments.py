"""``m2rec quality-report``: train and evaluate the three models and the M2Rec ablations on one data set
with one budget and seed, by running the documented CLI commands, and write the report (JSON + a
markdown table + the full log) from what those commands printed. Nothing in the report is typed by hand.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

# (run name, arguments of `m2rec train` beyond the shared budget)
RUNS: List[Tuple[str, List[str]]] = [
    ("m2rec", ["--model", "m2rec"]),
    ("mamba4rec", ["--model", "mamba4rec"]),
    ("sasrec", ["--model", "sasrec"]),
    ("m2rec-no-semantic", ["--model", "m2rec", "--no-text"]),
    ("m2rec-no-frequency", ["--model", "m2rec", "--no-frequency"]),
]
METRICS = ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20")


def uses_text(train_args: List[str]) -> bool:
    """Whether a run's model reads the item-text table (M2Rec with its semantic branch)."""
    model = train_args[train_args.index("--model") + 1]
    return model == "m2rec" and "--no-text" not in train_args


def data_slug(data: str) -> str:
    """The data set's name for file names: ``ml-100k`` -> ``ml100k``, ``/data/ml-1m/`` -> ``ml1m``."""
    name = Path(str(data).rstrip("/\\")).name or "data"
    return re.sub(r"[^A-Za-z0-9]+", "", name) or "data"


def machine_info() -> Dict[str, object]:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: Dict[str, object] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        # other work on the machine slows every run: the 1/5/15-minute load averages when it started
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def _run(argv: List[str], log) -> Tuple[str, float]:
    """Run ``python -m m2rec <argv>``, streaming its output into the log; returns (stdout, seconds)."""
    cmd = [sys.executable, "-m", "m2rec"] + argv
    shown = "m2rec " + shlex.join(argv)
    log.write(f"\n$ {shown}\n")
    log.flush()
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        log.write(line)
        log.flush()
        print("    " + line, end="", flush=True)
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"'{shown}' failed with exit code {rc}; see the log")
    return "".join(lines), seconds


def markdown_table(report: Dict) -> str:
    head = "| run | HR@10 | NDCG@10 | MRR@10 | HR@20 | NDCG@20 | MRR@20 | best epoch / run | train time |"
    rows = [head, "|" + "---|" * 9]
    for r in report["runs"]:
        m = r["test"]
        rows.append(f"| {r['name']} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS)
                    + f" | {r['best_epoch']} / {r['epochs_run']} | {r['train_wall_seconds'] / 60:.1f} min |")
    se = {k: max(r["test_standard_errors"][k] for r in report["runs"]) for k in ("hr@10", "ndcg@10")}
    n_users = report.get("dataset", {}).get("n_users", "the")
    rows.append(f"\nStandard errors over the {n_users} test users (largest of the runs): HR@10 "
                f"{se['hr@10']:.4f}, NDCG@10 {se['ndcg@10']:.4f}; smaller gaps are within evaluation noise.")
    return "\n".join(rows)


def quality_report(args) -> int:
    from .atomic_io import write_text_atomic
    from .cli import check_output_file
    from .run_folder import SUMMARY, check_output_dir
    slug = data_slug(args.data)
    out_json = Path(args.output or f"reports/quality-{slug}.json")
    runs_dir = Path(args.runs_dir or f"runs/quality-{slug}")
    budget = ["--data", args.data, "--max-len", str(args.max_len), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size), "--patience", str(args.patience),
              "--seed", str(args.seed), "--device", args.device, "--no-progress"]
    if args.threads:
        budget += ["--threads", str(args.threads)]
    if args.overwrite:
        budget += ["--overwrite"]
    selected = [r for r in RUNS if not args.only or r[0] in args.only]
    unknown = set(args.only or ()) - {r[0] for r in RUNS}
    if unknown:
        raise ValueError(f"--only: unknown run(s) {sorted(unknown)}; known: {[r[0] for r in RUNS]}")
    # Every refusal before the first run, not after an hour of training.
    check_output_file(str(out_json), "--output")
    for name, _ in selected:
        check_output_dir(runs_dir / name, args.overwrite, option="--runs-dir")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    report: Dict[str, object] = {
        "data": args.data, "machine": machine_info(),
        "budget": {"max_len": args.max_len, "max_epochs": args.epochs, "batch_size": args.batch_size,
                   "early_stopping_patience": args.patience, "seed": args.seed, "lr": 1e-3,
                   "threads": args.threads, "device": args.device,
                   "selection": "best validation NDCG@10 epoch"},
        "protocol": "5-core, chronological leave-one-out, full ranking over all items, seen items not "
                    "masked, ties ranked against the target",
        "runs": [],
    }
    log_path = out_json.with_suffix(".log")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"# m2rec quality report, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        log.write(f"# machine: {json.dumps(report['machine'])}\n")
        if any(uses_text(extra) for _, extra in selected):  # only models with a semantic branch need it
            # --recompute: the report times the encoding itself, not a cache hit
            embed_argv = ["embed-items", "--data", args.data, "--recompute"]
            if args.threads:
                embed_argv += ["--threads", str(args.threads)]
            text, seconds = _run(embed_argv, log)
            lines = text.splitlines()
            result = json.loads("\n".join(lines[lines.index("{"):]))  # the JSON the command printed last
            report["embed_items"] = {"command": "m2rec " + shlex.join(embed_argv),
                                     "wall_seconds": round(seconds, 1), "result": result}
        for name, extra in selected:
            out = runs_dir / name
            train_argv = ["train"] + extra + budget + ["--out", str(out)]
            _, train_seconds = _run(train_argv, log)
            summary = json.loads((out / SUMMARY).read_text())
            report.setdefault("dataset", summary["data"])
            eval_argv = ["evaluate", str(out / "checkpoint.pt"), "--output", str(out / "test.json")]
            if args.threads:
                eval_argv += ["--threads", str(args.threads)]
            _, eval_seconds = _run(eval_argv, log)
            test = json.loads((out / "test.json").read_text())
            report["runs"].append({
                "name": name,
                "commands": ["m2rec " + shlex.join(train_argv), "m2rec " + shlex.join(eval_argv)],
                "test": {k: test["metrics"][k] for k in METRICS},
                "test_standard_errors": {k: test["standard_errors"][k] for k in METRICS},
                "best_valid": summary["best_valid"], "best_epoch": summary["best_epoch"],
                "epochs_run": summary["epochs_run"], "n_parameters": summary["n_parameters"],
                "train_wall_seconds": round(train_seconds, 1), "eval_wall_seconds": round(eval_seconds, 1),
                "mean_epoch_seconds": round(sum(h["epoch_seconds"] for h in
                                                _read_history(out)) / summary["epochs_run"], 2),
            })
            report["total_wall_seconds"] = round(time.perf_counter() - started, 1)
            if hasattr(os, "getloadavg"):
                report["load_average_at_end"] = list(os.getloadavg())
            write_text_atomic(out_json, json.dumps(report, indent=2) + "\n")  # partial results survive a crash
    table = markdown_table(report)
    write_text_atomic(out_json.with_suffix(".md"),
        f"Test metrics on {args.data} (full ranking, leave-one-out), max_len {args.max_len}, "
        f"at most {args.epochs} epochs, patience {args.patience}, batch {args.batch_size}, seed {args.seed}; "
        f"{report['machine']['cpu']} ({report['machine']['cpu_count']} cores), torch "
        f"{report['machine']['torch']}; total {report['total_wall_seconds'] / 60:.1f} min.\n\n{table}\n")
    print(table)
    return 0


def _read_history(out: Path) -> List[Dict]:
    from .run_folder import LOG
    return [json.loads(line) for line in (out / LOG).read_text().splitlines() if line]


def add_quality_report_parser(sub) -> None:
    from .cli import positive_int
    p = sub.add_parser("quality-report", help="train + evaluate all models and ablations, write the report")
    p.add_argument("--data", default="ml-100k")
    p.add_argument("--output", default=None,
                   help="report JSON; the .md table and the .log go next to it (default "
                        "reports/quality-<data>.json, e.g. reports/quality-ml100k.json)")
    p.add_argument("--runs-dir", default=None,
                   help="where the run folders go (default runs/quality-<data>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier runs in the run folders (passed on to 'm2rec train')")
    p.add_argument("--max-len", type=positive_int, default=50)
    p.add_argument("--epochs", type=positive_int, default=25)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--patience", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads of each command (default 1)")
    p.add_argument("--only", nargs="*", default=None, help="run only these (names: "
                   + ", ".join(r[0] for r in RUNS) + ")")
    p.set_defaults(func=quality_report)
