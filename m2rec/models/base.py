"""The interface every recommender here shares, and the checks and scoring it implies.

Conventions (RecBole's): item ids 1..n_items, 0 is padding; sequences are right-padded (item_seq[b, t]
is an item for t < lengths[b] and 0 after); ``lengths`` gives each sequence's length.

* ``forward(item_seq, lengths) -> hidden (batch, L, d)``
* ``scores(item_seq, lengths) -> (batch, n_items + 1)``: hidden state at each sequence's last position
  (lengths - 1) against the tied item-embedding table; column 0 (padding) is -inf, so it is never ranked.
* ``loss(item_seq, lengths, targets, all_positions)``: full-catalogue cross-entropy (padding excluded).
  ``all_positions=True``: targets (batch, L), the next item at every position, 0 = ignore; positions
  t >= lengths[b] must be 0. ``False``: targets (batch,), the item following each sequence.
* ``causal``: whether hidden state t depends only on items <= t. All-position training is valid only
  then; otherwise the model would see the item it has to predict.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _positive_int(model: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{model}: {name} must be a positive int, got {value!r}")
    return value


def check_dropout(model: str, dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{model}: dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


def init_recbole_weights(module: nn.Module, respect_no_reinit: bool = True) -> None:
    """RecBole's initialisation: Linear/Embedding weights N(0, 0.02), Linear biases 0, LayerNorm 1/0.

    With ``respect_no_reinit`` a bias marked ``_no_reinit`` (Mamba's dt bias, which encodes the
    initial step sizes) is kept, as mamba_ssm's own initialiser does.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        if isinstance(m, nn.Linear) and m.bias is not None:
            if not (respect_no_reinit and getattr(m.bias, "_no_reinit", False)):
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SequentialRecommender(nn.Module):
    """Base class: subclasses set ``item_embedding`` (padding_idx 0) and implement ``encode``."""

    #: whether all-position training is valid (hidden state t sees only items <= t)
    causal: bool = True

    def __init__(self, n_items: int, d_model: int, max_len: int):
        super().__init__()
        name = type(self).__name__
        self.n_items = _positive_int(name, "n_items", n_items)
        self.d_model = _positive_int(name, "d_model", d_model)
        self.max_len = _positive_int(name, "max_len", max_len)
        self.item_embedding = nn.Embedding(n_items + 1, d_model, padding_idx=0)

    # ----- checks -------------------------------------------------------------------------------
    def check_inputs(self, item_seq, lengths) -> None:
        """Raise TypeError/ValueError naming the argument unless item_seq (batch, L) holds right-padded
        ids in [0, n_items] with 1 <= L <= max_len and lengths (batch,) in [1, L]."""
        name = type(self).__name__
        if not isinstance(item_seq, torch.Tensor):
            raise TypeError(f"{name}: item_seq must be a torch.Tensor, got {type(item_seq).__name__}")
        if item_seq.dtype not in _INT_DTYPES:
            raise TypeError(f"{name}: item_seq must be an integer tensor of item ids, got dtype {item_seq.dtype}")
        if item_seq.dim() != 2:
            raise ValueError(f"{name}: item_seq must be 2-D (batch, L), got shape {tuple(item_seq.shape)}")
        batch, L = item_seq.shape
        if batch < 1 or L < 1:
            raise ValueError(f"{name}: item_seq must be non-empty, got shape {tuple(item_seq.shape)}")
        if L > self.max_len:
            raise ValueError(f"{name}: item_seq has L = {L} positions, more than max_len = {self.max_len}")
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"{name}: lengths must be a torch.Tensor, got {type(lengths).__name__}")
        if lengths.dtype not in _INT_DTYPES:
            raise TypeError(f"{name}: lengths must be an integer tensor, got dtype {lengths.dtype}")
        if lengths.shape != (batch,):
            raise ValueError(f"{name}: lengths must have shape (batch,) = ({batch},), got {tuple(lengths.shape)}")
        if lengths.device != item_seq.device:
            raise ValueError(f"{name}: lengths is on {lengths.device} but item_seq is on {item_seq.device}")
        # The value checks need the data: gather them into one tensor so a GPU batch costs one sync.
        lengths = lengths.long()
        padded_wrong = (item_seq != 0) != self.valid_mask(lengths.clamp(0, L), L)
        stats = torch.stack([item_seq.min().long(), item_seq.max().long(), lengths.min(), lengths.max(),
                             padded_wrong.any().long()])
        lo, hi, len_lo, len_hi, not_right_padded = stats.tolist()
        if lo < 0 or hi > self.n_items:
            raise ValueError(
                f"{name}: item_seq holds ids in [{lo}, {hi}], expected ids in [0, n_items={self.n_items}] (0 = padding)"
            )
        if len_lo < 1 or len_hi > L:
            raise ValueError(f"{name}: lengths must lie in [1, L={L}], got min {len_lo}, max {len_hi}")
        if not_right_padded:
            raise ValueError(
                f"{name}: item_seq must be right-padded: ids >= 1 at positions t < lengths[b] and 0 after "
                "(a left-padded batch or a padding id inside a sequence was given)"
            )

    @staticmethod
    def valid_mask(lengths: torch.Tensor, L: int) -> torch.Tensor:
        """(batch, L) bool: position t < lengths[b]."""
        return torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]

    # ----- the interface ------------------------------------------------------------------------
    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Model body on checked, int64 inputs: (batch, L) -> (batch, L, d)."""
        raise NotImplementedError

    def forward(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.check_inputs(item_seq, lengths)
        return self.encode(item_seq.long(), lengths.long())

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied scoring: hidden (..., d) -> (..., n_items + 1) against every item embedding."""
        return torch.matmul(hidden, self.item_embedding.weight.t())

    @staticmethod
    def gather_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden (batch, L, d) at positions lengths - 1 -> (batch, d)."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.long() - 1]

    def scores(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(batch, n_items + 1) scores of every item after each sequence; column 0 (padding) is -inf."""
        logits = self.item_logits(self.gather_last(self(item_seq, lengths), lengths))
        logits[:, 0] = float("-inf")
        return logits

    def loss(self, item_seq: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
             all_positions: bool = True) -> torch.Tensor:
        """Mean full-catalogue cross-entropy over the targets (padding never a class)."""
        name = type(self).__name__
        if not isinstance(all_positions, bool):
            raise TypeError(f"{name}: all_positions must be a bool, got {type(all_positions).__name__}")
        if all_positions and not self.causal:
            raise ValueError(
                f"{name}: all_positions=True needs a causal model, but this one is not (e.g. the circular "
                "frequency filter mixes every position with every other): hidden state t would see the item "
                "at t + 1 that it has to predict, leaking future items into training. Use "
                "all_positions=False (last-position targets) or filter='causal'."
            )
        self.check_inputs(item_seq, lengths)
        batch, L = item_seq.shape
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"{name}: targets must be a torch.Tensor, got {type(targets).__name__}")
        if targets.dtype not in _INT_DTYPES:
            raise TypeError(f"{name}: targets must be an integer tensor of item ids, got dtype {targets.dtype}")
        if targets.device != item_seq.device:
            raise ValueError(f"{name}: targets is on {targets.device} but item_seq is on {item_seq.device}")
        want = (batch, L) if all_positions else (batch,)
        if tuple(targets.shape) != want:
            raise ValueError(
                f"{name}: with all_positions={all_positions} targets must have shape {want}, got {tuple(targets.shape)}"
            )
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi > self.n_items:
            raise ValueError(f"{name}: targets holds ids in [{lo}, {hi}], expected ids in [0, n_items={self.n_items}]")
        targets = targets.long()
        hidden = self.encode(item_seq.long(), lengths.long())
        if all_positions:
            if bool((targets[~self.valid_mask(lengths, L)] != 0).any()):
                raise ValueError(f"{name}: targets must be 0 (ignore) at padding positions t >= lengths[b]")
            if not bool((targets != 0).any()):
                raise ValueError(f"{name}: targets has no non-zero entry: nothing to train on")
            logits = self.item_logits(hidden)[..., 1:]  # drop the padding class
            return F.cross_entropy(logits.reshape(-1, self.n_items), targets.reshape(-1) - 1, ignore_index=-1)
        if lo < 1:
            raise ValueError(f"{name}: last-position targets must be item ids in [1, n_items], got a 0 (padding)")
        logits = self.item_logits(self.gather_last(hidden, lengths))[:, 1:]
        return F.cross_entropy(logits, targets - 1)
