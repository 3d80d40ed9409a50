"""Full-ranking evaluation on the leave-one-out splits (DESIGN §7, RecBole's sequential defaults).

For each user the model reads the history (the last ``max_len`` items before the target: for "test"
that is train + validation items) and ranks every item; items the user has already seen are NOT masked,
padding (id 0) is never ranked. Metrics are in ``m2rec.metrics``.

Over several processes (``group``, ``m2rec.distributed``) each process ranks a contiguous block of the
evaluation batches and the blocks are gathered, so every process ends with all users' ranks. The
batches are those one process would form (``batch_size`` users each, in user order): each user is
scored in the very batch, padded to the very width, that single-process evaluation uses, and the
gathered ranks — integers — and so the metrics are exactly the single-process ones.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

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
             ks: Iterable[int] = (10, 20), group=None) -> Dict[str, float]:
    """Mean HR@K, NDCG@K, MRR@K over all users for ``split`` ("valid" or "test"); ``group`` shares the
    work among processes (module docstring)."""
    ranks = rank_targets(model, data, split, max_len, batch_size, device, group)
    out = metrics_from_ranks(ranks, ks)
    out["n_users"] = len(ranks)
    return out


def user_blocks(n_users: int, batch_size: int, n_parts: int) -> List[Tuple[int, int]]:
    """``[begin, end)`` users of each process: the batches of ``batch_size`` users split into ``n_parts``
    contiguous blocks of as equal a count as can be (a block may be empty when batches are few)."""
    n_batches = (n_users + batch_size - 1) // batch_size
    bounds = [n_batches * part // n_parts for part in range(n_parts + 1)]
    return [(min(lo * batch_size, n_users), min(hi * batch_size, n_users)) for lo, hi in zip(bounds, bounds[1:])]


@torch.no_grad()
def rank_targets(model: torch.nn.Module, data: SequenceData, split: str = "test",
                 max_len: Optional[int] = None, batch_size: int = 256,
                 device: Union[str, torch.device, None] = None, group=None) -> torch.Tensor:
    """Each user's 1-based rank of the held-out item among all items, for ``split``; with ``group``,
    computed in blocks by its processes and gathered (module docstring)."""
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
    blocks = user_blocks(len(targets), batch_size, group.world_size if group is not None else 1)
    first, end = blocks[group.rank if group is not None else 0]
    was_training = model.training
    model.eval()
    ranks = [torch.zeros(0, dtype=torch.long)]
    try:
        for begin in range(first, end, batch_size):
            stop = min(begin + batch_size, end)
            inputs, lengths = pad_histories(histories[begin:stop], max_len)
            if needs_full_width(model) and inputs.shape[1] < model.max_len:
                inputs = pad_right(inputs.tolist(), model.max_len)
            scores = model.scores(inputs.to(device), lengths.to(device))
            batch_targets = torch.tensor(targets[begin:stop], device=device)
            ranks.append(target_ranks(scores.float(), batch_targets).cpu())
    finally:
        model.train(was_training)
    mine = torch.cat(ranks)
    if group is None or not group.distributed:
        return mine
    return group.gather(mine, [hi - lo for lo, hi in blocks])
