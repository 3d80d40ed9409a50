"""The interface every recommender here shares, and the checks and scoring it implies.

Conventions (RecBole's): item ids 1..n_items, 0 is padding; sequences are right-padded (item_seq[b, t]
is an item for t < lengths[b] and 0 after); ``lengths`` gives each sequence's length.

* ``forward(item_seq, lengths) -> hidden (batch, L, d)``
* ``scores(item_seq, lengths) -> (batch, n_items + 1)``: hidden state at each sequence's last position
  (lengths - 1) against the tied item-embedding table; column 0 (padding) is -inf, so it is never ranked.
  It is inference: it runs in eval mode (dropout off) whatever mode the model is in, and through
  ``encode_last`` it computes only what the last positions need — each model's last layer runs at
  those positions only (M2Rec and Mamba4Rec: the scan to its final state without per-step outputs,
  then filter, gate and FFN at one position; SASRec: the last query against all keys, then the FFN).
* streaming (``init_state``, ``prefill``, ``step``): one new item per user at a time, from a state that
  the model carries (``streaming.StreamState``), with the scores after it; equal to ``scores`` on the
  whole history while it is at most max_len items long. Past max_len see each model.
* ``loss(item_seq, lengths, targets, all_positions)``: full-catalogue cross-entropy (padding excluded).
  ``all_positions=True``: targets (batch, L), the next item at every position, 0 = ignore; positions
  t >= lengths[b] must be 0. ``False``: targets (batch,), the item following each sequence.
* ``causal``: whether hidden state t depends only on items <= t. All-position training is valid only
  then; otherwise the model would see the item it has to predict.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2rec_kernels._checks import check_range, require, tracing

from .catalogue_loss import catalogue_cross_entropy
from .packed_scoring import catalogue_product
from .streaming import StreamState, check_items, eval_mode, select_rows, stream_token, write_rows

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _positive_int(model: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{model}: {name} must be a positive int, got {value!r}")
    return value


def check_dropout(model: str, dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{model}: dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


def normed_item_embedding(items: torch.Tensor, embedding: nn.Embedding, dropout: nn.Dropout,
                          norm: nn.LayerNorm) -> torch.Tensor:
    """h0 = LayerNorm(dropout(E[items])) for ids of any shape (M2Rec's and Mamba4Rec's input). Without
    dropout and gradients (serving) and with more positions than catalogue rows, LayerNorm(E)[items]:
    the norm is per row, so the same values, normalised once per item instead of once per position
    (measured at batch 64, L 2000, one thread: 2.5 ms against 24-34 ms, ~10% of M2Rec's ``scores``)."""
    table = embedding.weight
    if (items.numel() > table.shape[0] and not (dropout.training and dropout.p > 0)
            and not (torch.is_grad_enabled() and (table.requires_grad or norm.weight.requires_grad))):
        return F.embedding(items, norm(table))
    return norm(dropout(embedding(items)))


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
        ids_range = f"expected ids in [0, n_items={self.n_items}] (0 = padding)"
        lengths_range = f"{name}: lengths must lie in [1, L={L}]"
        not_padded = (f"{name}: item_seq must be right-padded: ids >= 1 at positions t < lengths[b] and 0 after "
                      "(a left-padded batch or a padding id inside a sequence was given)")
        lo, hi = item_seq.min().long(), item_seq.max().long()
        if tracing():  # torch.compile / torch.export: the same checks, as assertions in the graph
            require((lo >= 0) & (hi <= self.n_items), f"{name}: item_seq holds ids out of range, {ids_range}")
            require((lengths.min() >= 1) & (lengths.max() <= L), lengths_range)
            require(~padded_wrong.any(), not_padded)
            return
        stats = torch.stack([lo, hi, lengths.min(), lengths.max(), padded_wrong.any().long()])
        lo, hi, len_lo, len_hi, not_right_padded = stats.tolist()
        if lo < 0 or hi > self.n_items:
            raise ValueError(f"{name}: item_seq holds ids in [{lo}, {hi}], {ids_range}")
        if len_lo < 1 or len_hi > L:
            raise ValueError(f"{lengths_range}, got min {len_lo}, max {len_hi}")
        if not_right_padded:
            raise ValueError(not_padded)

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
        """Tied scoring: hidden (..., d) -> (..., n_items + 1) against every item embedding. Rows of fp32
        on a CPU without a gradient (inference) use the table pre-packed for oneDNN (``packed_scoring``)."""
        return catalogue_product(self, hidden, self.item_embedding.weight)

    def class_table(self) -> torch.Tensor:
        """The loss's classes, items 1..n_items: the item table without its padding row. The row is
        left out of the product rather than sliced off its result: that slice's copy and its
        zero-filled gradient cost ~15% of a training step (batch 32, L 200, one CPU thread)."""
        return self.item_embedding.weight[1:]

    @staticmethod
    def gather_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden (batch, L, d) at positions lengths - 1 -> (batch, d)."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.long() - 1]

    def encode_last(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The hidden state at each sequence's last position only, (batch, d), on checked int64 inputs;
        equal to ``encode(...)[b, lengths[b] - 1]``. Models override it to skip the work that other
        positions would need; this default runs ``encode`` and gathers."""
        return self.gather_last(self.encode(item_seq, lengths), lengths)

    def _catalogue_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.item_logits(hidden)
        logits.select(1, 0).fill_(float("-inf"))  # (indexing assignment: 1.2 us more a call)
        return logits

    def scores(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(batch, n_items + 1) scores of every item after each sequence; column 0 (padding) is -inf.

        Inference: computed in eval mode (dropout off) whatever mode the model is in (each submodule's
        mode is restored afterwards), from the last positions only (``encode_last``). Gradients flow if
        autograd is on; serve under ``torch.inference_mode()``, which is also faster (the scan then
        forms no per-step output)."""
        self.check_inputs(item_seq, lengths)
        with eval_mode(self):
            hidden = self.encode_last(item_seq.long(), lengths.long())
        return self._catalogue_scores(hidden)

    # ----- streaming ----------------------------------------------------------------------------
    def _stream_unsupported(self) -> Optional[str]:
        """Why this model cannot stream, or None."""
        return None

    def _init_stream_layers(self, batch_size: int, device, dtype) -> List[dict]:
        raise NotImplementedError(f"{type(self).__name__} does not implement streaming updates")

    def _prefill_stream(self, item_seq, lengths) -> Tuple[torch.Tensor, List[dict]]:
        raise NotImplementedError(f"{type(self).__name__} does not implement streaming updates")

    def _step_stream(self, layers: List[dict], items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement streaming updates")

    def _check_streamable(self) -> None:
        reason = self._stream_unsupported()
        if reason is not None:
            raise ValueError(f"{type(self).__name__}: streaming updates are not possible: {reason}")

    def _new_state(self, layers, seen, hidden) -> StreamState:
        return StreamState(stream_token(self), type(self).__name__, layers, seen, hidden)

    def init_state(self, batch_size: int) -> StreamState:
        """An empty streaming state for ``batch_size`` users (no history yet), on the model's device
        and in its dtype. Feed items with ``step``; or build the state from histories with ``prefill``."""
        self._check_streamable()
        _positive_int(type(self).__name__, "batch_size", batch_size)
        weight = self.item_embedding.weight
        layers = self._init_stream_layers(batch_size, weight.device, weight.dtype)
        return self._new_state(layers, torch.zeros(batch_size, dtype=torch.long, device=weight.device),
                               torch.zeros(batch_size, self.d_model, dtype=weight.dtype, device=weight.device))

    @torch.no_grad()
    def prefill(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, StreamState]:
        """(scores, state) after right-padded histories, in one pass over them: the scores equal
        ``scores(item_seq, lengths)`` and the state equals feeding each history item by item to
        ``step``. Inference only (no gradients, eval mode)."""
        self._check_streamable()
        self.check_inputs(item_seq, lengths)
        lengths = lengths.long()
        with eval_mode(self):
            hidden, layers = self._prefill_stream(item_seq.long(), lengths)
        return self._catalogue_scores(hidden), self._new_state(layers, lengths.clone(), hidden)

    def _check_state(self, state) -> None:
        name = type(self).__name__
        if not isinstance(state, StreamState):
            raise TypeError(f"{name}.step: state must be a StreamState from init_state or prefill, got "
                            f"{type(state).__name__}")
        if state.owner != stream_token(self):
            raise ValueError(f"{name}.step: the state was made by another model (a {state.model_name}); make it "
                             "with this model's init_state or prefill")
        weight = self.item_embedding.weight
        if state.device != weight.device or state.dtype != weight.dtype:
            raise ValueError(f"{name}.step: the state is {state.dtype} on {state.device} but the model is now "
                             f"{weight.dtype} on {weight.device} (converted or moved since): make a new state")

    def step(self, state: StreamState, items: torch.Tensor) -> Tuple[torch.Tensor, StreamState]:
        """Take one new item per user and return (scores (batch, n_items + 1), state).

        ``items`` (batch,): the new item of each user, or 0 for a user without one (its state is left
        as it is and its scores are those after its current history). A user with no history at all
        gets a row of NaN (there is nothing to score from). The state is updated in place and
        returned. Inference only: no gradients, eval mode (dropout off). A state made under
        ``torch.inference_mode()`` holds inference tensors, which only that mode may update: the step
        then runs in it (and its scores are inference tensors too); otherwise under ``torch.no_grad()``."""
        self._check_state(state)
        in_inference = any(t.is_inference() for t in (state.hidden, state.seen, *(
            t for layer in state.layers for t in layer.values())))
        if torch.is_inference_mode_enabled() if in_inference else not torch.is_grad_enabled():
            return self._step(state, items)  # (already in that mode: entering it again costs ~1.5 us)
        with torch.inference_mode() if in_inference else torch.no_grad():
            return self._step(state, items)

    def _step(self, state: StreamState, items: torch.Tensor) -> Tuple[torch.Tensor, StreamState]:
        items, n_active, n_idle_empty = check_items(type(self).__name__, items, state, self.n_items)
        if n_active:
            with eval_mode(self):
                if n_active == state.batch_size:
                    state.hidden = self._step_stream(state.layers, items, state.seen)
                    state.seen += 1
                else:
                    rows = items.nonzero()[:, 0]
                    layers = select_rows(state.layers, rows)
                    hidden = self._step_stream(layers, items[rows], state.seen[rows])
                    write_rows(state.layers, rows, layers)
                    state.hidden.index_copy_(0, rows, hidden)
                    state.seen[rows] += 1
        scores = self._catalogue_scores(state.hidden)
        if n_idle_empty:  # (a boolean-mask fill would scan the whole score matrix every step)
            scores.index_fill_(0, (state.seen == 0).nonzero()[:, 0], float("nan"))
        return scores, state

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
        if all_positions:
            check_range(name, "targets", targets, lo=0, hi=self.n_items,
                        what=f"targets must hold ids in [0, n_items={self.n_items}] (0 = ignore)")
            padding_targets = ((targets != 0) & ~self.valid_mask(lengths.long(), L)).any()
            message = f"{name}: targets must be 0 (ignore) at padding positions t >= lengths[b]"
            require(~padding_targets, message) if tracing() else _raise_if(bool(padding_targets), message)
            message = f"{name}: targets has no non-zero entry: nothing to train on"
            anything = (targets != 0).any()
            require(anything, message) if tracing() else _raise_if(not bool(anything), message)
        else:
            check_range(name, "targets", targets, lo=1, hi=self.n_items,
                        what=f"last-position targets must be item ids in [1, n_items={self.n_items}] (no 0: padding)")
        targets = targets.long()
        hidden = self.encode(item_seq.long(), lengths.long())
        if all_positions:
            return catalogue_cross_entropy(hidden.reshape(-1, self.d_model), self.class_table(),
                                           targets.reshape(-1) - 1, ignore_index=-1)
        return catalogue_cross_entropy(self.gather_last(hidden, lengths), self.class_table(), targets - 1)


def _raise_if(condition: bool, message: str) -> None:
    if condition:
        raise ValueError(message)
