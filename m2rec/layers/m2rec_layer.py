"""One M2Rec layer (DESIGN §3): temporal (Mamba), frequency and semantic branches fused by a gate.

    m = MambaMixer(h);  f = FrequencyFilter(h);  s = semantic stream (given, same for every layer)
    h <- gated_fusion([m, f, s], residual=h)  = LayerNorm(h + dropout(sum_i alpha_i · branch_i)),
         alpha = softmax(concat(branches) @ gate_weight^T + gate_bias)
    h <- FeedForward(h)                        = LayerNorm(h + dropout(W2 · GELU(W1 · h)))

Branches can be left out (ablations): without the semantic stream or the frequency branch the gate
fuses the remaining ones (k = 2). If only the Mamba branch remains there is nothing to gate: the layer
then computes LayerNorm(h + dropout(m)) with its own LayerNorm parameters (no gate parameters exist).

``backend`` ("auto" | "torch" | "triton") goes to all three ops. The parameters do not depend on it, so
a state_dict moves between backends.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2rec_kernels import gated_fusion
from m2rec_kernels._checks import check_tensor

from .feed_forward import LAYER_NORM_EPS, FeedForward
from .frequency_filter import FrequencyFilter
from .mamba_mixer import MambaMixer


class M2RecLayer(nn.Module):
    def __init__(
        self,
        d_model: int = 64,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        max_len: int = 200,
        filter: str = "causal",
        dropout: float = 0.2,
        semantic: bool = True,
        frequency: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"M2RecLayer: dropout must lie in [0, 1), got {dropout!r}")
        self.d_model, self.dropout_p, self.backend = d_model, float(dropout), backend
        self.semantic, self.frequency = bool(semantic), bool(frequency)
        self.mamba = MambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.filter = FrequencyFilter(d_model, max_len, mode=filter, backend=backend) if frequency else None
        self.n_branches = 1 + self.frequency + self.semantic
        if self.n_branches >= 2:
            # Small random gate weights and zero bias: the gate starts close to uniform over branches.
            self.gate_weight = nn.Parameter(torch.randn(self.n_branches, self.n_branches * d_model) * 0.02)
            self.gate_bias = nn.Parameter(torch.zeros(self.n_branches))
        self.fusion_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout=dropout)

    @property
    def causal(self) -> bool:
        """Whether output t depends only on inputs <= t (false with the circular filter)."""
        return self.filter is None or self.filter.mode == "causal"

    def forward(self, h: torch.Tensor, s: Optional[torch.Tensor] = None, return_gates: bool = False):
        """h (batch, L, d_model); s (batch, L, d_model) the semantic stream, required iff the layer was
        built with ``semantic=True``. Returns h', or (h', alpha (batch, L, k)) with ``return_gates``."""
        check_tensor("M2RecLayer", "h", h, shape=(None, None, self.d_model))
        if self.semantic:
            if s is None:
                raise ValueError("M2RecLayer: s (the semantic stream) is required: the layer was built with semantic=True")
            check_tensor("M2RecLayer", "s", s, shape=tuple(h.shape), device=h.device)
        elif s is not None:
            raise ValueError("M2RecLayer: s was given but the layer was built with semantic=False")

        branches = [self.mamba(h)]
        if self.filter is not None:
            branches.append(self.filter(h))
        if self.semantic:
            branches.append(s.to(h.dtype))
        gates = None
        if len(branches) == 1:
            fused = self.fusion_norm(h + F.dropout(branches[0], self.dropout_p, self.training))
        else:
            result = gated_fusion(
                branches, h, self.gate_weight, self.gate_bias, self.fusion_norm.weight, self.fusion_norm.bias,
                eps=self.fusion_norm.eps, dropout_p=self.dropout_p, return_gates=return_gates,
                training=self.training, backend=self.backend,
            )
            fused, gates = result if return_gates else (result, None)
        out = self.ffn(fused)
        if return_gates:
            return out, gates
        return out
