"""Training: Adam, full-catalogue cross-entropy, early stopping on validation NDCG@10 (DESIGN §7).

Causal models are trained on all positions by default (every item of a training sequence is a target,
predicted from the items before it); ``last_position`` switches to RecBole's one-target-per-prefix
examples, which non-causal models (circular frequency filter) always use. After each epoch the model is
evaluated on the validation split; the best epoch's weights are checkpointed, and training stops after
``patience`` epochs without improvement or after ``epochs`` epochs.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from m2rec_kernels._backend import check_backend_runs

from .checkpoint import save_checkpoint
from .data import build_training_examples, iterate_batches, load_dataset
from .evaluation import evaluate, needs_full_width
from .models import MODELS, build_model

SELECTION_METRIC = "ndcg@10"


@dataclass
class TrainConfig:
    model: str = "m2rec"
    data: str = "ml-100k"
    out_dir: str = "runs/m2rec-ml-100k"
    k_core: int = 5
    max_len: int = 50
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    last_position: bool = False
    seed: int = 2025
    device: str = "cpu"
    backend: str = "auto"
    threads: Optional[int] = None
    eval_batch_size: int = 256
    # model shape (None = the model's own default)
    d_model: int = 64
    n_layers: Optional[int] = None
    dropout: Optional[float] = None
    # M2Rec only
    use_text: bool = True
    use_frequency: bool = True
    filter: str = "causal"
    text_embeddings: Optional[str] = None  # a saved (n_items + 1, d) table instead of the cache
    text_model_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    progress: bool = True

    def check(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.model != "m2rec":
            for flag, value, default in (("--no-text", self.use_text, True),
                                         ("--no-frequency", self.use_frequency, True),
                                         ("--filter", self.filter, "causal"),
                                         ("--text-embeddings", self.text_embeddings, None)):
                if value != default:
                    raise ValueError(f"{flag} applies to --model m2rec only, not {self.model}")
        for name in ("max_len", "epochs", "batch_size", "patience", "eval_batch_size", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.text_embeddings and not self.use_text:
            raise ValueError("--text-embeddings and --no-text contradict each other")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        check_backend_runs(self.backend, self.device, "--backend")  # before any data is loaded


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_valid: Dict[str, float]
    epochs_run: int
    train_seconds: float
    history: List[Dict[str, Any]] = field(default_factory=list)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_text_table(path: str, n_items: int) -> torch.Tensor:
    """A table saved with ``torch.save`` (e.g. by ``m2rec embed-items``), checked against the data."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--text-embeddings {path}: no such file")
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--text-embeddings {path}: not a saved tensor ({type(e).__name__}: {e})") from None
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or not table.dtype.is_floating_point:
        raise ValueError(f"--text-embeddings {path}: expected a 2-D float tensor (n_items + 1, d)")
    if table.shape[0] != n_items + 1:
        raise ValueError(f"--text-embeddings {path}: has {table.shape[0]} rows, the data set needs "
                         f"n_items + 1 = {n_items + 1} (row 0 = padding)")
    return table.float()


def model_kwargs_for(cfg: TrainConfig, text_dim: Optional[int]) -> Dict[str, Any]:
    """Plain constructor arguments (saved in the checkpoint); ``d_text`` stands for the text table."""
    kwargs: Dict[str, Any] = {"d_model": cfg.d_model, "max_len": cfg.max_len}
    if cfg.n_layers is not None:
        kwargs["n_layers"] = cfg.n_layers
    if cfg.dropout is not None:
        kwargs["dropout"] = cfg.dropout
    if cfg.model in ("m2rec", "mamba4rec"):
        kwargs["backend"] = cfg.backend
    if cfg.model == "m2rec":
        kwargs.update(use_frequency=cfg.use_frequency, filter=cfg.filter, use_semantic=text_dim is not None)
        if text_dim is not None:
            kwargs["d_text"] = text_dim
    return kwargs


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    from tqdm.auto import tqdm

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = torch.device(cfg.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_dataset(cfg.data, k_core=cfg.k_core)
    s = data.summary()
    log(f"data {s['name']}: {s['n_users']} users, {s['n_items']} items, {s['n_interactions']} "
        f"interactions ({cfg.k_core}-core, leave-one-out)")

    text_table, text_info = None, None
    if cfg.model == "m2rec" and cfg.text_embeddings:
        text_table = load_text_table(cfg.text_embeddings, data.n_items)
        text_info = {"file": cfg.text_embeddings, "dim": int(text_table.shape[1])}
        log(f"text embeddings {tuple(text_table.shape)} from {cfg.text_embeddings}")
    elif cfg.model == "m2rec" and cfg.use_text:
        from .text_embeddings import item_text_table
        text_table, path, hit = item_text_table(data.name, data.item_texts, cfg.text_model_dir,
                                                cfg.cache_dir, device=device, progress=cfg.progress)
        text_info = {"cache_file": str(path), "cache_hit": hit, "dim": int(text_table.shape[1])}
        log(f"text embeddings {tuple(text_table.shape)} {'from cache' if hit else 'computed'}: {path}")

    kwargs = model_kwargs_for(cfg, None if text_table is None else int(text_table.shape[1]))
    build_kwargs = {k: v for k, v in kwargs.items() if k != "d_text"}
    if text_table is not None:
        build_kwargs["text_embeddings"] = text_table
    set_seed(cfg.seed)  # the same initial weights whatever ran before
    model = build_model(cfg.model, data.n_items, **build_kwargs).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    all_positions = not cfg.last_position and model.causal
    examples = build_training_examples(data.train_sequences(), cfg.max_len, all_positions)
    log(f"model {cfg.model} ({n_params} trainable parameters) on {device}, "
        f"{'all-position' if all_positions else 'last-position'} training: {len(examples)} sequences, "
        f"{examples.n_targets} targets per epoch")

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    full_width = needs_full_width(model)
    checkpoint = out_dir / "checkpoint.pt"
    data_spec = {"spec": cfg.data, "k_core": cfg.k_core}
    history: List[Dict[str, Any]] = []
    best, best_epoch, bad_epochs = -1.0, 0, 0
    started = time.perf_counter()
    log_file = open(out_dir / "train_log.jsonl", "w")
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            total, count = 0.0, 0
            n_batches = (len(examples) + cfg.batch_size - 1) // cfg.batch_size
            batches = iterate_batches(examples, cfg.batch_size, shuffle=True, generator=generator,
                                      full_width=full_width)
            for inputs, lengths, targets in tqdm(batches, total=n_batches, desc=f"epoch {epoch}",
                                                 leave=False, disable=None if cfg.progress else True):
                inputs, lengths, targets = inputs.to(device), lengths.to(device), targets.to(device)
                loss = model.loss(inputs, lengths, targets, all_positions=all_positions)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"epoch {epoch}: the training loss is {loss.item()}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n_targets = int((targets != 0).sum())
                total += loss.item() * n_targets
                count += n_targets
            train_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            valid = evaluate(model, data, "valid", cfg.max_len, cfg.eval_batch_size, device)
            record = {"epoch": epoch, "loss": total / count, "epoch_seconds": train_seconds,
                      "valid_seconds": time.perf_counter() - t1,
                      "valid": {k: v for k, v in valid.items() if k != "n_users"}}
            history.append(record)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            improved = valid[SELECTION_METRIC] > best
            log(f"epoch {epoch:3d}  loss {record['loss']:.4f}  time {train_seconds:6.1f}s  valid "
                f"HR@10 {valid['hr@10']:.4f}  NDCG@10 {valid['ndcg@10']:.4f}  MRR@10 {valid['mrr@10']:.4f}"
                + ("  *" if improved else ""))
            if improved:
                best, best_epoch, bad_epochs = valid[SELECTION_METRIC], epoch, 0
                save_checkpoint(checkpoint, model, cfg.model, kwargs, data, data_spec, {
                    "train_config": asdict(cfg), "epoch": epoch, "valid": record["valid"],
                    "text_embeddings": text_info})
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience:
                    log(f"early stop: no better validation {SELECTION_METRIC} for {cfg.patience} epochs")
                    break
    finally:
        log_file.close()
    elapsed = time.perf_counter() - started
    result = TrainResult(checkpoint, best_epoch, history[best_epoch - 1]["valid"], len(history), elapsed,
                         history)
    summary = {"checkpoint": str(checkpoint), "best_epoch": best_epoch, "best_valid": result.best_valid,
               "epochs_run": len(history), "train_seconds": elapsed, "config": asdict(cfg),
               "n_parameters": n_params, "all_positions": all_positions, "text_embeddings": text_info,
               "data": s}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"best epoch {best_epoch}: valid NDCG@10 {best:.4f}; {len(history)} epochs in {elapsed:.1f}s; "
        f"checkpoint {checkpoint}")
    return result
