"""Position-wise feed-forward block with residual and post-LayerNorm (RecBole / SASRec style).

    out = LayerNorm(h + dropout(W2 · [dropout](GELU(W1 · h))))

The inner dropout after the activation is off by default (RecBole's ``FeedForward``, M2Rec); Mamba4Rec
(chengkai-liu/Mamba4Rec ``mamba4rec.py``) applies it, so it is an option.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-12  # RecBole's value, used by SASRec, Mamba4Rec and M2Rec alike


class FeedForward(nn.Module):
    def __init__(self, d_model: int, inner_size: int, dropout: float = 0.2, activation_dropout: bool = False):
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = activation_dropout
        self.layer_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        inner = F.gelu(self.w_1(h))
        if self.activation_dropout:
            inner = self.dropout(inner)
        return self.layer_norm(h + self.dropout(self.w_2(inner)))
