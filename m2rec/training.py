"""Training: Adam, full-catalogue cross-entropy, early stopping on validation NDCG@10 (DESIGN §7).

Causal models are trained on all positions by default (every item of a training sequence is a target,
predicted from the items before it); ``last_position`` switches to RecBole's one-target-per-prefix
examples, which non-causal models (circular frequency filter) always use. After each epoch the model is
evaluated on the validation split; the best epoch's weights are checkpointed, and training stops after
``patience`` epochs without improvement or after ``epochs`` epochs (:class:`EarlyStopping` decides).

Everything the run writes goes through :class:`m2rec.run_folder.RunFolder` (atomic files; an earlier
run in the folder is refused unless ``overwrite``). A run that diverges (non-finite loss or weights)
raises :class:`TrainingDiverged`, and Ctrl-C raises :class:`TrainingInterrupted`; both say where the
best checkpoint so far is, and the folder then holds that checkpoint, the log of the finished epochs
and a summary whose ``stopped`` field says how the run ended.

Under torchrun every process runs :func:`train` (``m2rec.distributed``): the model is wrapped in
DistributedDataParallel, each process trains on its part of every global batch of ``batch_size`` ×
processes examples (``iterate_batch_shards``), and the loss is scaled so that the averaged gradient is
that of the global batch's mean loss — the single-process semantics, so N processes with batch b
compute what one process with batch N·b computes. Validation is shared among the processes and
gathered exactly; rank 0 alone logs and writes the run folder, and its early-stopping decision is
broadcast so all stop together. When a process fails, the others stop with :class:`TrainingStoppedByPeer`
naming it.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from m2rec_kernels._backend import check_backend_runs

from .checkpoint import data_source
from .data import build_training_examples, iterate_batch_shards, load_dataset
from .distributed import DEFAULT_TIMEOUT_S, PeerFailed, ProcessGroup, join, threads_per_process
from .evaluation import evaluate, needs_full_width
from .models import MODELS, build_model
from .run_folder import RunFolder, check_output_dir

SELECTION_METRIC = "ndcg@10"


def _option(field_name: str) -> str:
    """The command-line spelling of a TrainConfig field (``batch_size`` -> ``--batch-size``)."""
    return "--" + field_name.replace("_", "-")


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
    overwrite: bool = False  # replace an earlier run in out_dir (else a non-empty out_dir is refused)
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds a collective waits under torchrun (m2rec.distributed)

    def check(self, output_dir: bool = True) -> None:
        """Every option, and the output folder unless ``output_dir`` is False (``train`` leaves it to
        ``RunFolder.prepare`` on rank 0), before any data are loaded (one-line ValueErrors)."""
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.model != "m2rec":
            for flag, value, default in (("--no-text", self.use_text, True),
                                         ("--no-frequency", self.use_frequency, True),
                                         ("--filter", self.filter, "causal"),
                                         ("--text-embeddings", self.text_embeddings, None)):
                if value != default:
                    raise ValueError(f"{flag} applies to --model m2rec only, not {self.model}")
        for name in ("max_len", "epochs", "batch_size", "patience", "eval_batch_size", "d_model", "k_core"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_option(name)} must be a positive integer, got {value!r}")
        for name in ("threads", "n_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{_option(name)} must be a positive integer (or unset for the default), "
                                 f"got {value!r}")
        if self.text_embeddings and not self.use_text:
            raise ValueError("--text-embeddings and --no-text contradict each other")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (isinstance(self.dist_timeout, (int, float)) and math.isfinite(self.dist_timeout)
                and self.dist_timeout > 0):
            raise ValueError(f"--dist-timeout must be a finite number of seconds > 0, got {self.dist_timeout}")
        self._check_model_options()
        if output_dir:
            check_output_dir(self.out_dir, self.overwrite)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        check_backend_runs(self.backend, self.device, "--backend")  # before any data is loaded

    def _check_model_options(self) -> None:
        """d_model, n_layers, dropout (and e.g. SASRec's heads dividing d_model) are checked by the
        model's own constructor: build it once on the meta device (no memory, no data needed)."""
        kwargs = model_kwargs_for(self, None)
        kwargs.pop("backend", None)  # checked separately, with the device
        try:
            with torch.device("meta"):
                build_model(self.model, 1, **kwargs)
        except ValueError as e:
            shown = {k: "default" if v is None else v for k, v in (("n_layers", self.n_layers),
                                                                    ("dropout", self.dropout))}
            raise ValueError(f"--model {self.model} with --d-model {self.d_model}, --n-layers "
                             f"{shown['n_layers']}, --dropout {shown['dropout']}: {e}") from None


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_valid: Dict[str, float]
    epochs_run: int
    train_seconds: float
    history: List[Dict[str, Any]] = field(default_factory=list)


class _EndedEarly:
    """Mixed into the exceptions that end a run early: ``str()`` is the one line to show the user;
    ``checkpoint`` (None when no epoch finished) and ``best_epoch`` say what the run kept."""

    def __init__(self, message: str, checkpoint: Optional[Path], best_epoch: int):
        super().__init__(message)
        self.checkpoint, self.best_epoch = checkpoint, best_epoch


class TrainingDiverged(_EndedEarly, FloatingPointError):
    """The loss or the weights became non-finite."""


class TrainingInterrupted(_EndedEarly, KeyboardInterrupt):
    """Ctrl-C during training; still a KeyboardInterrupt (not an Exception) for callers."""


class TrainingStoppedByPeer(_EndedEarly, PeerFailed):
    """Another process of a torchrun run failed, so this one stopped too."""


class EarlyStopping:
    """The one place that decides early stopping: the best epoch so far by the selection metric
    (higher is better), and whether ``patience`` epochs in a row failed to beat it."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best, self.best_epoch, self.bad_epochs = -math.inf, 0, 0

    def update(self, epoch: int, value: float) -> bool:
        """Record ``epoch``'s validation value; True when it is the new best."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_text_table(path: str, n_items: int) -> torch.Tensor:
    """A table saved with ``torch.save`` (e.g. by ``m2rec embed-items``), checked against the data."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--text-embeddings {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message would suggest weights_only=False: never offered
        raise ValueError(f"--text-embeddings {path}: not a tensor saved with torch.save ({type(e).__name__})") from None
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


def train_step(loss_of: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, group: ProcessGroup,
               inputs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, real: bool,
               all_positions: bool) -> Tuple[float, float]:
    """One optimiser step on this process's part of a global batch (``iterate_batch_shards``; ``real``
    False: a stand-in that weighs nothing), with ``loss_of`` from ``group.parallel_loss``. Returns the
    global batch's loss sum and target count (one process: this batch's); when their ratio is not
    finite nothing is updated, and the caller ends the run (every process sees the same numbers)."""
    loss = loss_of(inputs, lengths, targets, all_positions=all_positions)
    n_targets = int((targets != 0).sum()) if real else 0
    batch_sum, batch_count = group.sum([loss.item() * n_targets if real else 0.0, n_targets])
    if not math.isfinite(batch_sum / batch_count):
        return batch_sum, batch_count
    if group.distributed:
        # The loss is this part's mean over its targets, and DDP averages the processes' gradients.
        # Weighted by the part's share of the global batch's targets (times the number of processes),
        # that average is the gradient of the global batch's mean: one process's semantics.
        loss = loss * (n_targets * group.world_size / batch_count)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return batch_sum, batch_count


def _quiet(message: str) -> None:
    pass


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train one model (module docstring); under torchrun every process calls this, and only rank 0
    logs (``log``) and writes ``cfg.out_dir``."""
    # Options fail alike on every process, before they meet. The folder is rank 0's alone, and checked
    # once they have met (RunFolder.prepare, before any data are loaded): a process that failed before
    # meeting would leave the others waiting for it inside the rendezvous.
    cfg.check(output_dir=False)
    with join(cfg.device, cfg.dist_timeout) as group:
        return _train(cfg, log if group.is_main else _quiet, group)


def _text_table(cfg: TrainConfig, data, device: torch.device, log: Callable[[str], None]):
    """M2Rec's frozen text table and what to record about it: ``(None, None)`` without text."""
    if cfg.model == "m2rec" and cfg.text_embeddings:
        table = load_text_table(cfg.text_embeddings, data.n_items)
        log(f"text embeddings {tuple(table.shape)} from {cfg.text_embeddings}")
        return table, {"file": cfg.text_embeddings, "dim": int(table.shape[1])}
    if cfg.model == "m2rec" and cfg.use_text:
        from .text_embeddings import item_text_table
        table, path, hit = item_text_table(data.name, data.item_texts, cfg.text_model_dir,
                                           cfg.cache_dir, device=device, progress=cfg.progress)
        log(f"text embeddings {tuple(table.shape)} {'from cache' if hit else 'computed'}: {path}")
        return table, {"cache_file": str(path), "cache_hit": hit, "dim": int(table.shape[1])}
    return None, None


def _train(cfg: TrainConfig, log: Callable[[str], None], group: ProcessGroup) -> TrainResult:
    from tqdm.auto import tqdm

    threads = threads_per_process(cfg.threads)
    if threads:
        torch.set_num_threads(threads)
    set_seed(cfg.seed)
    device = group.device
    run = RunFolder(cfg.out_dir, writes=group.is_main)
    run.prepare(cfg.overwrite)

    data = load_dataset(cfg.data, k_core=cfg.k_core)
    s = data.summary()
    log(f"data {s['name']}: {s['n_users']} users, {s['n_items']} items, {s['n_interactions']} "
        f"interactions ({cfg.k_core}-core, leave-one-out)")
    if group.distributed:
        log(f"{group.world_size} processes ({'nccl' if device.type == 'cuda' else 'gloo'}): "
            f"{cfg.batch_size} sequences per process and step ({cfg.batch_size * group.world_size} in all), "
            f"torch threads per process: {torch.get_num_threads()}")

    # Rank 0 alone reads or encodes the texts; the others build the model around a placeholder of the
    # same shape, and rank 0's table reaches them with the model's buffers.
    text_table, text_info = _text_table(cfg, data, device, log) if group.is_main else (None, None)
    if cfg.model == "m2rec" and (cfg.use_text or cfg.text_embeddings):
        (text_dim,) = group.broadcast([0 if text_table is None else text_table.shape[1]])
        if text_table is None:
            text_table = torch.zeros(data.n_items + 1, text_dim)

    kwargs = model_kwargs_for(cfg, None if text_table is None else int(text_table.shape[1]))
    build_kwargs = {k: v for k, v in kwargs.items() if k != "d_text"}
    if text_table is not None:
        build_kwargs["text_embeddings"] = text_table
    set_seed(cfg.seed)  # the same initial weights whatever ran before
    model = build_model(cfg.model, data.n_items, **build_kwargs).to(device)
    group.broadcast_buffers(model)
    loss_of = group.parallel_loss(model)  # model.loss, or through DDP (which broadcasts the weights)
    if group.rank:
        torch.manual_seed(cfg.seed + group.rank)  # other dropout masks on each process
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    all_positions = not cfg.last_position and model.causal
    examples = build_training_examples(data.train_sequences(), cfg.max_len, all_positions)
    log(f"model {cfg.model} ({n_params} trainable parameters) on {device}, "
        f"{'all-position' if all_positions else 'last-position'} training: {len(examples)} sequences, "
        f"{examples.n_targets} targets per epoch")

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The same generator on every process: each epoch's order is the next permutation it draws, a
    # function of (seed, epoch) alone, and every process takes its part of each global batch of it.
    generator = torch.Generator().manual_seed(cfg.seed)
    full_width = needs_full_width(model)
    source = data_source(cfg.data, cfg.k_core)
    history: List[Dict[str, Any]] = []
    stopper = EarlyStopping(cfg.patience)
    stopped = "failed"  # how the run ended, for the summary; set on every normal way out
    started = time.perf_counter()

    def ended_early(kind, message: str):
        return kind(f"{message}; {run.kept()}", run.checkpoint if run.checkpoint_epoch else None,
                    run.checkpoint_epoch)

    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            total, count = 0.0, 0.0
            global_batch = cfg.batch_size * group.world_size
            n_batches = (len(examples) + global_batch - 1) // global_batch
            batches = iterate_batch_shards(examples, cfg.batch_size, group.rank, group.world_size, shuffle=True,
                                           generator=generator, full_width=full_width)
            for inputs, lengths, targets, real in tqdm(batches, total=n_batches, desc=f"epoch {epoch}", leave=False,
                                                       disable=None if cfg.progress and group.is_main else True):
                batch_sum, batch_count = train_step(loss_of, optimizer, group, inputs.to(device), lengths.to(device),
                                                    targets.to(device), real, all_positions)
                batch_loss = batch_sum / batch_count
                if not math.isfinite(batch_loss):
                    raise ended_early(TrainingDiverged, f"epoch {epoch}: the training loss is {batch_loss}, "
                                                        f"so training diverged (a smaller --lr may help)")
                total += batch_sum
                count += batch_count
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise ended_early(TrainingDiverged, f"epoch {epoch}: the weights are no longer finite, so "
                                                    f"training diverged (a smaller --lr may help)")
            train_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            valid = evaluate(model, data, "valid", cfg.max_len, cfg.eval_batch_size, device, group=group)
            record = {"epoch": epoch, "loss": total / count, "epoch_seconds": train_seconds,
                      "valid_seconds": time.perf_counter() - t1,
                      "valid": {k: v for k, v in valid.items() if k != "n_users"}}
            history.append(record)
            run.write_log(history)
            improved = stopper.update(epoch, valid[SELECTION_METRIC])
            if improved:
                run.save_checkpoint(epoch, model, cfg.model, kwargs, data, source, {
                    "train_config": asdict(cfg), "epoch": epoch, "valid": record["valid"],
                    "text_embeddings": text_info})
            log(f"epoch {epoch:3d}  loss {record['loss']:.4f}  time {train_seconds:6.1f}s  valid "
                f"HR@10 {valid['hr@10']:.4f}  NDCG@10 {valid['ndcg@10']:.4f}  MRR@10 {valid['mrr@10']:.4f}"
                + ("  *" if improved else ""))
            # Every process holds the same gathered metrics, but the decision is rank 0's, sent to all.
            (stop,) = group.broadcast([stopper.should_stop])
            if stop:
                log(f"early stop: no better validation {SELECTION_METRIC} for {cfg.patience} epochs")
                stopped = "early_stop"
                break
        else:
            stopped = "max_epochs"
    except TrainingDiverged:
        stopped = "diverged"
        raise
    except (KeyboardInterrupt, RuntimeError) as error:
        peer = group.peer_failure(error)  # a broken collective or torchrun's SIGTERM after a peer failed
        if peer is not None:
            raise ended_early(TrainingStoppedByPeer, str(peer)) from None
        if isinstance(error, RuntimeError) and not group.peer_interrupted(error):
            raise  # this process's own failure
        stopped = "interrupted"
        raise ended_early(TrainingInterrupted, f"interrupted during epoch {len(history) + 1}") from None
    finally:
        # What is on disk, not what was decided: Ctrl-C may land between the two.
        elapsed = time.perf_counter() - started
        best_epoch = run.checkpoint_epoch
        best_valid = history[best_epoch - 1]["valid"] if best_epoch else None
        run.write_summary({
            "stopped": stopped, "checkpoint": str(run.checkpoint) if best_epoch else None,
            "best_epoch": best_epoch, "best_valid": best_valid, "epochs_run": len(history),
            "train_seconds": elapsed, "config": asdict(cfg), "n_parameters": n_params,
            "all_positions": all_positions, "text_embeddings": text_info, "data": s,
            "data_source": source, "processes": group.world_size})
        if stopped in ("max_epochs", "early_stop", "diverged"):
            # Every process got here at the same step. Wait for rank 0's files before leaving: once one
            # process exits with an error, torchrun stops the others.
            try:
                group.barrier()
            except RuntimeError:
                pass  # a process gone at the very end: what was written stands
    log(f"best epoch {best_epoch}: valid NDCG@10 {stopper.best:.4f}; {len(history)} epochs in "
        f"{elapsed:.1f}s; checkpoint {run.checkpoint}")
    return TrainResult(run.checkpoint, best_epoch, best_valid, len(history), elapsed, history)
