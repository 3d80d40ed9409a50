"""M2Rec (Zhang et al., arXiv 2505.04445): Mamba + FFT-domain filter + frozen text semantics, gated.

    h0 = LayerNorm(dropout(E[item]));  s = LayerNorm(W_s · T[item])   (T frozen, (n_items+1, d_text))
    h  = M2RecLayer(h, s) repeated n_layers times;  scores = h[length-1] · E^T   (tied)

Ablations: ``use_frequency=False`` drops the frequency branch, ``use_semantic=False`` (the default
without text embeddings) the semantic one; see ``M2RecLayer`` for what the gate does then.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..layers import FILTER_MODES, LAYER_NORM_EPS, M2RecLayer
from .base import SequentialRecommender, check_dropout, init_recbole_weights


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
        """s = LayerNorm(W_s · T[item]) (batch, L, d), shared by every layer."""
        return self.semantic_norm(self.semantic_proj(self.text_embeddings[item_seq]))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.filter_mode == "circular" and self.use_frequency and item_seq.shape[1] != self.max_len:
            raise ValueError(
                f"M2Rec: with filter='circular' item_seq must have exactly max_len = {self.max_len} positions "
                f"(right-pad every batch to max_len), got L = {item_seq.shape[1]}"
            )
        h = self.embedding_norm(self.embedding_dropout(self.item_embedding(item_seq)))
        s = self.semantic_stream(item_seq) if self.use_semantic else None
        for layer in self.layers:
            h = layer(h, s)
        return h
