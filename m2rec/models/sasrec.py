"""SASRec (Kang & McAuley 2018) as RecBole implements it, attention through PyTorch SDPA.

    h0 = dropout(LayerNorm(E[item] + P[position]))
    block: a = LayerNorm(h + dropout(W_o · MHA_causal(h)));  h = LayerNorm(a + dropout(W2 · GELU(W1 · a)))

Post-LN blocks with an inner 4·d GELU feed-forward (RecBole ``TransformerEncoder``; structure learned
from RUCAIBox/RecBole ``sasrec.py`` / ``layers.py``). Attention is ``F.scaled_dot_product_attention``
with ``is_causal=True``: with right-padded sequences every key a valid position t attends to
(positions <= t) is a real item, so no separate padding mask is needed for the valid positions.

Scoring (``scores``) runs the last block at each sequence's last position only: the last query
against the keys and values of every position up to it, then the FFN there — the same treatment M2Rec
and Mamba4Rec get, so the comparison stays fair. Streaming (``init_state`` / ``prefill`` / ``step``)
keeps each block's keys and values by position (a KV cache, (batch, heads, max_len, d/heads) each);
one new item costs O(max_len·d) per block. Positions are learned only up to max_len, and the full model
re-positions a longer history's last max_len items from 0, so a user's stream ends at max_len items:
``step`` raises for a user who already has max_len (rebuild the state with ``prefill`` of the last
max_len - 1 items to go on).
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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, L, d) -> (batch, heads, L, d/heads)."""
        batch, L, d = x.shape
        return x.view(batch, L, self.n_heads, d // self.n_heads).transpose(1, 2)

    def _finish(self, ctx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """ctx (batch, heads, L, d/heads) -> LayerNorm(h + dropout(W_o · ctx)), h (batch, L, d)."""
        ctx = ctx.transpose(1, 2).reshape(h.shape)
        return self.layer_norm(h + self.dropout(self.out(ctx)))

    def _attend_one(self, h_one: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: torch.Tensor):
        """One query per row, h_one (batch, d), against keys/values (batch, heads, W, d/heads) at
        positions <= last[b]. Returns (batch, d)."""
        visible = torch.arange(k.shape[2], device=k.device)[None, :] <= last[:, None]
        ctx = F.scaled_dot_product_attention(
            self._heads(self.query(h_one[:, None, :])), k, v, attn_mask=visible[:, None, None, :],
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return self._finish(ctx, h_one[:, None, :])[:, 0]

    def keys_values(self, h: torch.Tensor):
        return self._heads(self.key(h)), self._heads(self.value(h))

    def forward(self, h: torch.Tensor, kv=None) -> torch.Tensor:
        k, v = self.keys_values(h) if kv is None else kv
        ctx = F.scaled_dot_product_attention(
            self._heads(self.query(h)), k, v, dropout_p=self.dropout_p if self.training else 0.0, is_causal=True,
        )
        return self._finish(ctx, h)

    def forward_last(self, h: torch.Tensor, lengths: torch.Tensor, kv=None) -> torch.Tensor:
        """The output at each sequence's last position only, (batch, d): its query against the keys
        and values of positions < lengths[b] (``kv``: those of h, if already computed)."""
        k, v = self.keys_values(h) if kv is None else kv
        last = lengths - 1
        return self._attend_one(h[torch.arange(h.shape[0], device=h.device), last], k, v, last)

    def step(self, h: torch.Tensor, cache, positions: torch.Tensor) -> torch.Tensor:
        """One new position per row: h (batch, d) at ``positions`` (batch,); its key and value are
        written into ``cache`` {"k", "v"} (batch, heads, max_len, d/heads) in place."""
        rows = torch.arange(h.shape[0], device=h.device)
        k_new, v_new = self.keys_values(h[:, None, :])
        cache["k"][rows, :, positions] = k_new[:, :, 0]
        cache["v"][rows, :, positions] = v_new[:, :, 0]
        width = int(positions.max()) + 1  # no row sees beyond it
        return self._attend_one(h, cache["k"][:, :, :width], cache["v"][:, :, :width], positions)


class SASRec(SequentialRecommender):
    def __init__(self, n_items: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
                 max_len: int = 200, dropout: float = 0.2):
        super().__init__(n_items, d_model, max_len)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"SASRec: n_layers must be a positive int, got {n_layers!r}")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"SASRec: n_heads must be a positive int dividing d_model={d_model}, got {n_heads!r}")
        dropout = check_dropout("SASRec", dropout)
        self.causal, self.n_heads = True, n_heads
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.embedding_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.embedding_dropout = nn.Dropout(dropout)
        self.attention = nn.ModuleList(CausalSelfAttention(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ffn = nn.ModuleList(FeedForward(d_model, 4 * d_model, dropout=dropout) for _ in range(n_layers))
        init_recbole_weights(self)

    def _embed(self, items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding_dropout(self.embedding_norm(self.item_embedding(items) + self.position_embedding(positions)))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self._embed(item_seq, torch.arange(item_seq.shape[1], device=item_seq.device)[None])
        for attention, ffn in zip(self.attention, self.ffn):
            h = ffn(attention(h))
        return h

    def encode_last(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self._embed(item_seq, torch.arange(item_seq.shape[1], device=item_seq.device)[None])
        for attention, ffn in zip(self.attention[:-1], self.ffn[:-1]):
            h = ffn(attention(h))
        return self.ffn[-1](self.attention[-1].forward_last(h, lengths))

    # ----- streaming with a KV cache (see the module docstring) ----------------------------------
    def _kv_shape(self, batch_size: int):
        return (batch_size, self.n_heads, self.max_len, self.d_model // self.n_heads)

    def _init_stream_layers(self, batch_size, device, dtype):
        return [{"k": torch.zeros(self._kv_shape(batch_size), device=device, dtype=dtype),
                 "v": torch.zeros(self._kv_shape(batch_size), device=device, dtype=dtype)} for _ in self.attention]

    def _prefill_stream(self, item_seq, lengths):
        batch, L = item_seq.shape
        h = self._embed(item_seq, torch.arange(L, device=item_seq.device)[None])
        caches = []
        for i, (attention, ffn) in enumerate(zip(self.attention, self.ffn)):
            k, v = attention.keys_values(h)
            cache = {"k": k.new_zeros(self._kv_shape(batch)), "v": v.new_zeros(self._kv_shape(batch))}
            cache["k"][:, :, :L], cache["v"][:, :, :L] = k, v  # positions >= lengths are never visible
            caches.append(cache)
            last = i == len(self.attention) - 1
            h = ffn(attention.forward_last(h, lengths, (k, v)) if last else attention(h, (k, v)))
        return h, caches

    def _step_stream(self, layers, items, positions):
        if int(positions.max()) >= self.max_len:
            raise ValueError(
                f"SASRec.step: a user already has max_len = {self.max_len} items; its learned positions end there "
                f"(rebuild that user's state with prefill of its last {self.max_len - 1} items)")
        h = self._embed(items, positions)
        for attention, ffn, cache in zip(self.attention, self.ffn, layers):
            h = ffn(attention.step(h, cache, positions))
        return h
