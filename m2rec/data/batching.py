"""Training examples and mini-batches from item sequences (right-padded with 0, lengths alongside).

Two ways to turn a training sequence s (items before the validation target) into examples:

* all positions (causal models, the default): the model reads s[:-1] and is trained to predict the
  next item at every position. Sequences longer than ``max_len + 1`` are cut into consecutive windows
  from the end, so every item of s (but the first) is a target exactly once, each with up to
  ``max_len`` items of history in its window.
* last position (RecBole's sequential augmentation): one example per prefix, the last ``max_len``
  items before s[t] predicting s[t], for every t >= 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .preprocess import PAD_ID


@dataclass
class TrainingExamples:
    inputs: torch.Tensor  # (n, max_len) long, right-padded with 0
    lengths: torch.Tensor  # (n,) long, >= 1
    targets: torch.Tensor  # (n, max_len) long with 0 = ignore (all positions), or (n,) (last position)
    all_positions: bool

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_targets(self) -> int:
        return int((self.targets != PAD_ID).sum())


def _check_max_len(max_len: int) -> None:
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")


def pad_right(sequences: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    out = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            out[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out


def pad_histories(histories: Sequence[Sequence[int]], max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The last ``max_len`` items of each history, right-padded: ``(inputs (n, width), lengths (n,))``
    with width = the longest kept history. Empty histories are an error (nothing to condition on)."""
    _check_max_len(max_len)
    kept = [list(h)[-max_len:] for h in histories]
    for row, h in enumerate(kept):
        if not h:
            raise ValueError(f"history {row} is empty; every example needs at least one item")
    lengths = torch.tensor([len(h) for h in kept], dtype=torch.long)
    width = int(lengths.max()) if kept else 1
    return pad_right(kept, width), lengths


def build_training_examples(sequences: Sequence[Sequence[int]], max_len: int,
                            all_positions: bool = True) -> TrainingExamples:
    _check_max_len(max_len)
    inputs: List[List[int]] = []
    targets: List = []
    for seq in sequences:
        seq = list(seq)
        if all_positions:
            end = len(seq)
            while end >= 2:  # window predicting seq[start + 1 : end] from seq[start : end - 1]
                start = max(0, end - 1 - max_len)
                inputs.append(seq[start:end - 1])
                targets.append(seq[start + 1:end])
                end = start + 1
        else:
            for t in range(1, len(seq)):
                inputs.append(seq[max(0, t - max_len):t])
                targets.append(seq[t])
    if not inputs:
        raise ValueError("no training examples: every training sequence has fewer than 2 items")
    lengths = torch.tensor([len(x) for x in inputs], dtype=torch.long)
    padded_targets = pad_right(targets, max_len) if all_positions else torch.tensor(targets)
    return TrainingExamples(pad_right(inputs, max_len), lengths, padded_targets, all_positions)


def _batch(examples: TrainingExamples, idx: torch.Tensor, full_width: bool
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = examples.lengths[idx]
    width = examples.inputs.shape[1] if full_width else int(lengths.max())
    targets = examples.targets[idx]
    if examples.all_positions:
        targets = targets[:, :width]
    return examples.inputs[idx, :width], lengths, targets


def iterate_batches(examples: TrainingExamples, batch_size: int, shuffle: bool = True,
                    generator: Optional[torch.Generator] = None, full_width: bool = False
                    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, lengths, targets)`` batches, trimmed to the longest sequence in the batch
    (or kept at max_len with ``full_width``, for models that need a fixed width)."""
    for inputs, lengths, targets, _ in iterate_batch_shards(examples, batch_size, 0, 1, shuffle, generator,
                                                            full_width):
        yield inputs, lengths, targets


def iterate_batch_shards(examples: TrainingExamples, batch_size: int, rank: int = 0, world_size: int = 1,
                         shuffle: bool = True, generator: Optional[torch.Generator] = None,
                         full_width: bool = False
                         ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
    """Process ``rank``'s part of each global batch: ``(inputs, lengths, targets, real)``.

    The epoch's order is one permutation drawn from ``generator`` — the same on every process when each
    seeds its generator alike, and the very order one process with batches of ``batch_size *
    world_size`` would use. Each global batch of that size is split into ``world_size`` contiguous
    parts as equal as can be (the last, partial batch too: sizes differ by at most one, nothing is
    dropped or repeated). A process whose part of the last batch is empty still gets one example —
    that global batch's first — with ``real`` False: it must run a step (DDP's gradient all-reduce
    needs every process) but weigh it zero. With ``world_size`` 1 these are exactly
    :func:`iterate_batches`'s batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    n = len(examples)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    step = batch_size * world_size
    for begin in range(0, n, step):
        global_batch = order[begin:begin + step]
        idx = torch.tensor_split(global_batch, world_size)[rank]
        real = idx.numel() > 0
        yield (*_batch(examples, idx if real else global_batch[:1], full_width), real)
