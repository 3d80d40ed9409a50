"""Full-ranking metrics for next-item prediction (DESIGN §7, RecBole's definitions for one target).

The rank of the target among all items is 1 + the number of *other* items scoring at least as high:
ties count against the target (a constant scorer gets the worst rank, never a lucky one). The padding
column must hold -inf, so it is never ranked above a real item. Then, per user, with rank r:
HR@K = [r <= K], NDCG@K = 1/log2(r + 1) if r <= K (one relevant item, so IDCG = 1), MRR@K = 1/r if
r <= K; each is averaged over users.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Sequence

import torch

METRIC_NAMES = ("hr", "ndcg", "mrr")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``targets[b]`` in ``scores[b]`` (batch, n_items + 1); column 0 is padding."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor (batch, n_items + 1), got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    if not isinstance(targets, torch.Tensor) or targets.shape != (scores.shape[0],):
        raise ValueError(f"targets must have shape ({scores.shape[0]},), got "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    if targets.dtype.is_floating_point:
        raise TypeError(f"targets must be integer item ids, got {targets.dtype}")
    n_columns = scores.shape[1]
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= n_columns):
        raise ValueError(f"targets must be item ids in [1, {n_columns - 1}] (0 is padding), got "
                         f"min {int(targets.min())}, max {int(targets.max())}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if scores.numel() and not bool(torch.isneginf(scores[:, 0]).all()):
        raise ValueError("scores[:, 0] (the padding column) must be -inf so padding is never ranked")
    target_scores = scores.gather(1, targets.long().view(-1, 1))
    if torch.isneginf(target_scores).any():
        raise ValueError("a target item has score -inf")
    # >= counts the target itself once, so this is 1 + (other items scoring at least as high).
    return (scores >= target_scores).sum(dim=1)


def per_user_metrics(ranks: torch.Tensor, ks: Iterable[int] = (10, 20)) -> Dict[str, torch.Tensor]:
    """Each user's HR@K, NDCG@K, MRR@K (float64 tensors of shape (n_users,)), keys like ``"ndcg@10"``."""
    ranks = torch.as_tensor(ranks).double()
    if ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}")
    if bool((ranks < 1).any()):
        raise ValueError("ranks are 1-based and must be >= 1")
    out: Dict[str, torch.Tensor] = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"K must be >= 1, got {k}")
        hit = ranks <= k
        out[f"hr@{k}"] = hit.double()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), 0.0)
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / ranks, 0.0)
    return out


def metrics_from_ranks(ranks: torch.Tensor, ks: Iterable[int] = (10, 20)) -> Dict[str, float]:
    """Mean HR@K, NDCG@K, MRR@K over users, keys like ``"ndcg@10"``."""
    return {name: values.mean().item() for name, values in per_user_metrics(ranks, ks).items()}


def standard_errors(ranks: torch.Tensor, ks: Iterable[int] = (10, 20)) -> Dict[str, float]:
    """Standard error of each mean metric over users (sample std / sqrt(n)): how far two models'
    numbers must differ before the gap is more than evaluation noise."""
    out = {}
    for name, values in per_user_metrics(ranks, ks).items():
        n = values.numel()
        out[name] = (values.std(unbiased=True) / n ** 0.5).item() if n > 1 else float("nan")
    return out


def random_baseline(n_items: int, ks: Sequence[int] = (10, 20)) -> Dict[str, float]:
    """Expected metrics of a uniformly random ranking of ``n_items`` items (rank uniform in 1..n)."""
    out = {}
    for k in ks:
        top = min(k, n_items)
        out[f"hr@{k}"] = top / n_items
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) for r in range(1, top + 1)) / n_items
        out[f"mrr@{k}"] = sum(1.0 / r for r in range(1, top + 1)) / n_items
    return out
