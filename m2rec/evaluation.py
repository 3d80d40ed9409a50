"""Full-ranking evaluation on the leave-one-out splits (DESIGN §7, RecBole's sequential defaults).

For each user the model reads the history (the last ``max_len`` items before the target: for "test"
that is train + validation items) and ranks every item; items the user has already seen are NOT masked,
padding (id 0) is never ranked. Metrics are in ``m2rec.metrics``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import torch

from .data import SequenceData, pad_histories
from .data.batching import pad_right
from .metrics import metrics_from_ranks, target_ranks


def needs_full_width(model: torch.nn.Module) -> bool:
    """A circular frequency filter mixes all max_len positions, so its inputs must be padded to
    exactly max_len (the model checks this); every other model takes the batch's own width."""
    return getattr(model, "filter_mode", None) == "circular" and getattr(model, "use_frequency", False)


def evaluate(model: torch.nn.Module, data: SequenceData, split: str = "test", max_len: Optional[int] = None,
             batch_size: int = 256, device: Union[str, torch.device, None] = None,
             ks: Iterable[int] = (10, 20)) -> Dict[str, float]:
    """Mean HR@K, NDCG@K, MRR@K over all users for ``split`` ("valid" or "test")."""
    ranks = rank_targets(model, data, split, max_len, batch_size, device)
    out = metrics_from_ranks(ranks, ks)
    out["n_users"] = len(ranks)
    return out


@torch.no_grad()
def rank_targets(model: torch.nn.Module, data: SequenceData, split: str = "test",
                 max_len: Optional[int] = None, batch_size: int = 256,
                 device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Each user's 1-based rank of the held-out item among all items, for ``split``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_len = max_len or model.max_len
    if max_len > model.max_len:
        raise ValueError(f"max_len {max_len} exceeds the model's max_len {model.max_len}")
    if data.n_items != model.n_items:
        raise ValueError(f"the data set has {data.n_items} items but the model was built for "
                         f"{model.n_items}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    histories, targets = data.eval_pairs(split)
    was_training = model.training
    model.eval()
    ranks = []
    try:
        for begin in range(0, len(targets), batch_size):
            inputs, lengths = pad_histories(histories[begin:begin + batch_size], max_len)
            if needs_full_width(model) and inputs.shape[1] < model.max_len:
                inputs = pad_right(inputs.tolist(), model.max_len)
            scores = model.scores(inputs.to(device), lengths.to(device))
            batch_targets = torch.tensor(targets[begin:begin + batch_size], device=device)
            ranks.append(target_ranks(scores.float(), batch_targets).cpu())
    finally:
        model.train(was_training)
    return torch.cat(ranks)
