"""SASRec (Kang & McAuley 2018) as RecBole implements it, attention through PyTorch SDPA.

    h0 = dropout(LayerNorm(E[item] + P[position]))
    block: a = LayerNorm(h + dropout(W_o · MHA_causal(h)));  h = LayerNorm(a + dropout(W2 · GELU(W1 · a)))

Post-LN blocks with an inner 4·d GELU feed-forward (RecBole ``TransformerEncoder``; structure learned
from RUCAIBox/RecBole ``sasrec.py`` / ``layers.py``). Attention is ``F.scaled_dot_product_attention``
with ``is_causal=True``: with right-padded sequences every key a valid position t attends to
(positions <= t) is a real item, so no separate padding mask is needed for the valid positions.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import LAYER_NORM_EPS, FeedForward
from .base import SequentialRecommender, check_dropout, init_recbole_weights


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with residual and post-LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout_p = n_heads, dropout
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, L, d = h.shape

        def heads(x):  # (batch, L, d) -> (batch, heads, L, d/heads)
            return x.view(batch, L, self.n_heads, d // self.n_heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(
            heads(self.query(h)), heads(self.key(h)), heads(self.value(h)),
            dropout_p=self.dropout_p if self.training else 0.0, is_causal=True,
        )
        ctx = ctx.transpose(1, 2).reshape(batch, L, d)
        return self.layer_norm(h + self.dropout(self.out(ctx)))


class SASRec(SequentialRecommender):
    def __init__(self, n_items: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
                 max_len: int = 200, dropout: float = 0.2):
        super().__init__(n_items, d_model, max_len)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"SASRec: n_layers must be a positive int, got {n_layers!r}")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"SASRec: n_heads must be a positive int dividing d_model={d_model}, got {n_heads!r}")
        dropout = check_dropout("SASRec", dropout)
        self.causal = True
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.embedding_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.embedding_dropout = nn.Dropout(dropout)
        self.attention = nn.ModuleList(CausalSelfAttention(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ffn = nn.ModuleList(FeedForward(d_model, 4 * d_model, dropout=dropout) for _ in range(n_layers))
        init_recbole_weights(self)

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        h = self.item_embedding(item_seq) + self.position_embedding(positions)[None]
        h = self.embedding_dropout(self.embedding_norm(h))
        for attention, ffn in zip(self.attention, self.ffn):
            h = ffn(attention(h))
        return h
