"""M2Rec (Zhang et al., arXiv 2505.04445): Mamba + FFT-domain filter + frozen text semantics, gated.

    h0 = LayerNorm(dropout(E[item]));  s = LayerNorm(W_s · T[item])   (T frozen, (n_items+1, d_text))
    h  = M2RecLayer(h, s) repeated n_layers times;  scores = h[length-1] · E^T   (tied)

Ablations: ``use_frequency=False`` drops the frequency branch, ``use_semantic=False`` (the default
without text embeddings) the semantic one; see ``M2RecLayer`` for what the gate does then.

Scoring (``scores``) runs the last layer at each sequence's last position only
(``M2RecLayer.forward_last``), and the semantic stream there only when there is one layer.

Streaming (``init_state`` / ``prefill`` / ``step``, see ``base``): per layer the Mamba branch's conv
window and SSM state (O(1) per new item in the history length) and the causal filter's last max_len
inputs (O(max_len·d) per new item: a dot product). The circular filter cannot stream. **Past max_len
items** a user's stream goes on without forgetting: the Mamba branches carry their state over the
whole stream (a state has no way to drop an old item) and the filter reads the last max_len inputs
(its kernel has max_len taps). The scores are then those of this model's equations over the whole
stream with the filter's taps beyond max_len zero — no longer ``scores()`` of the last max_len items,
which restarts from an empty state. To serve exactly what ``scores()`` gives, rebuild a user's state
with ``prefill`` of the last max_len items when ``state.seen`` passes max_len.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import FILTER_MODES, LAYER_NORM_EPS, M2RecLayer
from ..layers.derived import derived, module_tensors, tensor_paths
from .base import SequentialRecommender, check_dropout, init_recbole_weights, normed_item_embedding

#: what ``M2Rec._step_table`` is computed from, without and with the semantic stream
_STEP_TABLE_SOURCES = tensor_paths("item_embedding.weight", "embedding_norm.weight", "embedding_norm.bias")
_STEP_TABLE_SEMANTIC_SOURCES = _STEP_TABLE_SOURCES + tensor_paths(
    "text_embeddings", "semantic_proj.weight", "semantic_proj.bias", "semantic_norm.weight", "semantic_norm.bias")


class M2Rec(SequentialRecommender):
    def __init__(
        self,
        n_items: int,
        d_model: int = 64,
        n_layers: int = 1,
        max_len: int = 200,
        text_embeddings: Optional[torch.Tensor] = None,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        filter: str = "causal",
        dropout: float = 0.2,
        use_frequency: bool = True,
        use_semantic: Optional[bool] = None,
        backend: str = "auto",
    ):
        super().__init__(n_items, d_model, max_len)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"M2Rec: n_layers must be a positive int, got {n_layers!r}")
        if filter not in FILTER_MODES:
            raise ValueError(f"M2Rec: filter must be one of {FILTER_MODES}, got {filter!r}")
        dropout = check_dropout("M2Rec", dropout)
        if use_semantic is None:
            use_semantic = text_embeddings is not None
        if use_semantic and text_embeddings is None:
            raise ValueError("M2Rec: use_semantic=True needs text_embeddings, a (n_items + 1, d_text) tensor")
        self.use_semantic, self.use_frequency = bool(use_semantic), bool(use_frequency)
        self.filter_mode, self.backend = filter, backend
        self.causal = not (self.use_frequency and filter == "circular")

        self.embedding_dropout = nn.Dropout(dropout)
        self.embedding_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        if self.use_semantic:
            if not isinstance(text_embeddings, torch.Tensor):
                raise TypeError(f"M2Rec: text_embeddings must be a torch.Tensor, got {type(text_embeddings).__name__}")
            if not text_embeddings.dtype.is_floating_point:
                raise TypeError(f"M2Rec: text_embeddings must be floating point, got {text_embeddings.dtype}")
            if text_embeddings.dim() != 2 or text_embeddings.shape[0] != n_items + 1:
                raise ValueError(
                    f"M2Rec: text_embeddings must have shape (n_items + 1 = {n_items + 1}, d_text) with row 0 "
                    f"for padding, got {tuple(text_embeddings.shape)}"
                )
            # Frozen: a buffer moves with the model and is saved in the state_dict, but gets no gradient.
            self.register_buffer("text_embeddings", text_embeddings.detach().clone().float())
            self.semantic_proj = nn.Linear(text_embeddings.shape[1], d_model)
            self.semantic_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(
            M2RecLayer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, max_len=max_len, filter=filter,
                       dropout=dropout, semantic=self.use_semantic, frequency=self.use_frequency, backend=backend)
            for _ in range(n_layers)
        )
        init_recbole_weights(self)

    def semantic_stream(self, item_seq: torch.Tensor) -> torch.Tensor:
        """s = LayerNorm(W_s · T[item]) (ids of any shape, then d), shared by every layer. With more
        ids than table rows (training batches) the table is projected first and its rows gathered:
        the same products, fewer of them (forward and W_s's gradient 2x faster at batch 32, L 200,
        3,707 items on one CPU thread)."""
        if item_seq.numel() > self.text_embeddings.shape[0]:
            return self.semantic_norm(F.embedding(item_seq, self.semantic_proj(self.text_embeddings)))
        return self.semantic_norm(self.semantic_proj(self.text_embeddings[item_seq]))

    def _check_width(self, item_seq: torch.Tensor) -> None:
        if self.filter_mode == "circular" and self.use_frequency and item_seq.shape[1] != self.max_len:
            raise ValueError(
                f"M2Rec: with filter='circular' item_seq must have exactly max_len = {self.max_len} positions "
                f"(right-pad every batch to max_len), got L = {item_seq.shape[1]}"
            )

    def _embed(self, items: torch.Tensor) -> torch.Tensor:
        return normed_item_embedding(items, self.item_embedding, self.embedding_dropout, self.embedding_norm)

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self._check_width(item_seq)
        h = self._embed(item_seq)
        s = self.semantic_stream(item_seq) if self.use_semantic else None
        for layer in self.layers:
            h = layer(h, s)
        return h

    def _semantic_inputs(self, item_seq, lengths):
        """(s for the layers below the last, s at the last positions): the full stream only when a
        layer below the last needs it."""
        if not self.use_semantic:
            return None, None
        last_items = item_seq[torch.arange(item_seq.shape[0], device=item_seq.device), lengths - 1]
        s = self.semantic_stream(item_seq) if len(self.layers) > 1 else None
        return s, self.semantic_stream(last_items)

    def encode_last(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self._check_width(item_seq)
        h = self._embed(item_seq)
        s, s_last = self._semantic_inputs(item_seq, lengths)
        for layer in self.layers[:-1]:
            h = layer(h, s)
        return self.layers[-1].forward_last(h, s_last, lengths)

    # ----- streaming (see the module docstring) ---------------------------------------------------
    def _stream_unsupported(self):
        if self.use_frequency and self.filter_mode == "circular":
            return ("the circular filter's outputs depend on every position of the max_len window, later ones "
                    "included; use filter='causal'")
        return None

    def _init_stream_layers(self, batch_size, device, dtype):
        return [layer.init_state(batch_size, device=device, dtype=dtype) for layer in self.layers]

    def _prefill_stream(self, item_seq, lengths):
        h = self._embed(item_seq)
        s, s_last = self._semantic_inputs(item_seq, lengths)
        states = []
        for layer in self.layers[:-1]:
            h, state = layer.prefill(h, s, lengths)
            states.append(state)
        out, state = self.layers[-1].prefill(h, None, lengths, s_last=s_last, last_only=True)
        return out, states + [state]

    def _step_table(self) -> torch.Tensor:
        """The step's inputs for every catalogue row, (n_items + 1, d) h0 = LayerNorm(E), or
        (n_items + 1, 2d) [h0 | s] with s = LayerNorm(W_s · T + b) the semantic stream: a step then
        gathers its users' rows (eval mode: no dropout) instead of normalising and projecting them.
        Cached until a parameter it comes from changes (``derived``)."""
        sources = module_tensors(self, _STEP_TABLE_SEMANTIC_SOURCES if self.use_semantic else _STEP_TABLE_SOURCES)

        def build():
            h0 = self.embedding_norm(self.item_embedding.weight)
            if not self.use_semantic:
                return h0
            return torch.cat([h0, self.semantic_norm(self.semantic_proj(self.text_embeddings)).to(h0.dtype)], dim=1)
        return derived(self, "step_table", [t for t in sources if t is not None], build)

    def _step_stream(self, layers, items, positions):
        rows = self._step_table().index_select(0, items)
        d = self.d_model
        h, s = (rows[:, :d], rows[:, d:]) if self.use_semantic else (rows, None)
        for layer, state in zip(self.layers, layers):
            h = layer.step_unchecked(h, s, state, positions)
        return h
