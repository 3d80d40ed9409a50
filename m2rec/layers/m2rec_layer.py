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

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2rec_kernels import gated_fusion
from m2rec_kernels._checks import check_tensor
from m2rec_kernels.scan.cpu import _isa_code, cpu_scan_unavailable

from .feed_forward import LAYER_NORM_EPS, FeedForward
from .frequency_filter import FrequencyFilter
from .derived import derived, module_tensors, tensor_paths
from .mamba_mixer import MambaMixer, padded_transpose


def _compiled_fusion_step() -> bool:
    """Whether the compiled library (with ``fusion_ffn_step``) is loaded; checked per call, cheaply."""
    return cpu_scan_unavailable() is None


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

    def _check_semantic(self, s, shape, device) -> None:
        if self.semantic:
            if s is None:
                raise ValueError("M2RecLayer: s (the semantic stream) is required: the layer was built with semantic=True")
            check_tensor("M2RecLayer", "s", s, shape=shape, device=device)
        elif s is not None:
            raise ValueError("M2RecLayer: s was given but the layer was built with semantic=False")

    def _fuse(self, branches, h: torch.Tensor, return_gates: bool = False):
        """Gate (or, with one branch, add) the branches onto the residual h, then the FFN; any shape
        (batch, L, d) — (batch, 1, d) at a single position. Returns (out, gates or None)."""
        if len(branches) == 1:
            return self.ffn(self.fusion_norm(h + F.dropout(branches[0], self.dropout_p, self.training))), None
        result = gated_fusion(
            branches, h, self.gate_weight, self.gate_bias, self.fusion_norm.weight, self.fusion_norm.bias,
            eps=self.fusion_norm.eps, dropout_p=self.dropout_p, return_gates=return_gates,
            training=self.training, backend=self.backend,
        )
        fused, gates = result if return_gates else (result, None)
        return self.ffn(fused), gates

    def forward(self, h: torch.Tensor, s: Optional[torch.Tensor] = None, return_gates: bool = False):
        """h (batch, L, d_model); s (batch, L, d_model) the semantic stream, required iff the layer was
        built with ``semantic=True``. Returns h', or (h', alpha (batch, L, k)) with ``return_gates``."""
        check_tensor("M2RecLayer", "h", h, shape=(None, None, self.d_model))
        self._check_semantic(s, tuple(h.shape), h.device)
        out, gates = self._fuse_all(h, self.mamba(h), s, return_gates)
        return (out, gates) if return_gates else out

    def _fuse_all(self, h, m, s, return_gates: bool = False):
        """The rest of the layer at every position, given the Mamba branch's output m."""
        branches = [m]
        if self.filter is not None:
            branches.append(self.filter(h))
        if self.semantic:
            branches.append(s.to(h.dtype))
        return self._fuse(branches, h, return_gates)

    # ----- one position: scoring and streaming --------------------------------------------------
    def forward_last(self, h: torch.Tensor, s_last: Optional[torch.Tensor] = None,
                     lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's output at each sequence's last position only, (batch, d_model): equal to
        ``forward(h, s)[b, lengths[b] - 1]`` (L - 1 without ``lengths``), where s_last (batch, d_model)
        is the semantic stream at those positions. The scan runs to the final state without per-step
        outputs, the causal filter is one dot product per sequence, and the gate and the FFN run at
        one position."""
        check_tensor("M2RecLayer", "h", h, shape=(None, None, self.d_model))
        return self._fuse_last(h, self.mamba.forward_last(h, lengths), s_last, lengths)

    def _fuse_last(self, h, m_last, s_last, lengths) -> torch.Tensor:
        """The rest of the layer at the last positions, given the Mamba branch's output there."""
        batch, L, _ = h.shape
        self._check_semantic(s_last, (batch, self.d_model), h.device)
        last = (lengths.long() if lengths is not None else torch.full((batch,), L, device=h.device)) - 1
        branches = [m_last]
        if self.filter is not None:
            branches.append(self.filter.forward_last(h, lengths))
        if self.semantic:
            branches.append(s_last.to(h.dtype))
        h_last = h[torch.arange(batch, device=h.device), last]
        return self._fuse([b[:, None, :] for b in branches], h_last[:, None, :])[0][:, 0]

    def init_state(self, batch_size: int, device=None, dtype=None) -> Dict[str, torch.Tensor]:
        """The streaming state before any input: {"conv", "ssm"} of the Mamba branch (zeros; the SSM
        state in fp32, fp64 for a double layer) and {"filter"} the filter's input history."""
        if self.filter is not None:
            self.filter._check_streamable()
        conv, ssm = self.mamba.zero_states(batch_size, dtype=dtype)
        state = {"conv": conv.to(device), "ssm": ssm.to(device)}
        if self.filter is not None:
            state["filter"] = self.filter.init_history(batch_size, device=device, dtype=conv.dtype)
        return state

    def prefill(self, h: torch.Tensor, s: Optional[torch.Tensor], lengths: torch.Tensor,
                s_last: Optional[torch.Tensor] = None, last_only: bool = False):
        """(out, state) after right-padded sequences h (batch, L, d_model): out as ``forward`` (or as
        ``forward_last`` with ``last_only``, which takes s_last instead of s), state as
        ``init_state`` describes, after each sequence's own last item."""
        check_tensor("M2RecLayer", "h", h, shape=(None, None, self.d_model))
        if not last_only:
            self._check_semantic(s, tuple(h.shape), h.device)
        if self.filter is not None:
            self.filter._check_streamable()
        m, conv, ssm = self.mamba.prefill(h, lengths, last_only=last_only)
        state = {"conv": conv, "ssm": ssm}
        if self.filter is not None:
            state["filter"] = self.filter.history(h, lengths)
        out = self._fuse_last(h, m, s_last, lengths) if last_only else self._fuse_all(h, m, s)[0]
        return out, state

    def step(self, h: torch.Tensor, s: Optional[torch.Tensor], state: Dict[str, torch.Tensor],
             positions: torch.Tensor) -> torch.Tensor:
        """One new position: h (batch, d_model) the layer's input there, s (batch, d_model) the semantic
        stream there, ``positions`` (batch,) its 0-based index in each sequence; ``state`` (see
        ``init_state``) is updated in place. Returns the layer's output (batch, d_model)."""
        check_tensor("M2RecLayer.step", "h", h, shape=(None, self.d_model))
        self._check_semantic(s, tuple(h.shape), h.device)
        if self.filter is not None:
            self.filter._check_streamable()
        return self.step_unchecked(h, s, state, positions)

    #: the parameters ``fusion_ffn_step`` takes, in its order (``module_tensors`` reads them)
    _FUSION_TENSORS = tensor_paths("gate_weight", "gate_bias", "fusion_norm.weight", "fusion_norm.bias",
                                   "ffn.w_1.weight", "ffn.w_1.bias", "ffn.w_2.weight", "ffn.w_2.bias",
                                   "ffn.layer_norm.weight", "ffn.layer_norm.bias")
    _FFN_WEIGHTS = tensor_paths("ffn.w_1.weight", "ffn.w_2.weight")

    def _ffn_padded_t(self, w1=None, w2=None):
        """The FFN weights (``ffn.w_1.weight``, ``ffn.w_2.weight`` unless given) transposed, columns
        zero-padded as the fused step's matrix kernel reads them (fp32 only; ``None`` pair for other
        dtypes), cached until they change (``derived``)."""
        if w1 is None:
            w1, w2 = module_tensors(self, self._FFN_WEIGHTS)
        if w1.dtype != torch.float32 or w2.dtype != torch.float32:
            return None, None
        return derived(self, "ffn_padded_t", (w1, w2), lambda: (padded_transpose(w1), padded_transpose(w2)))

    def step_unchecked(self, h: torch.Tensor, s: Optional[torch.Tensor], state: Dict[str, torch.Tensor],
                       positions: torch.Tensor) -> torch.Tensor:
        """``step`` on checked arguments: the streaming path (the state was checked when it was made,
        the items by the model's ``step``), in eval mode. The branches, the gate and the FFN run as
        plain torch calls on (batch, d) rows, without the per-call checks and dispatch of the public
        ops (they cost more than the arithmetic at one position)."""
        branches = [self.mamba.step_unchecked(h, state["conv"], state["ssm"])]
        if self.filter is not None:
            branches.append(self.filter.step_unchecked(h, state["filter"], positions))
        if self.semantic:
            branches.append(s if s.dtype == h.dtype else s.to(h.dtype))
        if len(branches) == 1 or h.dtype not in (torch.float32, torch.float64) or not h.is_cpu:
            return self._fuse([b[:, None, :] for b in branches], h[:, None, :])[0][:, 0]
        if _compiled_fusion_step():  # the same math as below in one compiled call (csrc/fusion_step_ops.cpp)
            gw, gb, nw, nb, w1, b1, w2, b2, lw, lb = module_tensors(self, self._FUSION_TENSORS)
            w1_t, w2_t = self._ffn_padded_t(w1, w2) if h.dtype == torch.float32 else (None, None)
            ffn = self._modules["ffn"]  # (the two eps: plain attributes of the LayerNorms)
            return torch.ops.m2rec_scan_cpu.fusion_ffn_step(
                branches, h, gw, gb, nw, nb, self._modules["fusion_norm"].eps, w1, b1, w2, b2, lw, lb,
                ffn._modules["layer_norm"].eps, w1_t, w2_t, _isa_code(None))
        norm, ffn = self.fusion_norm, self.ffn
        # gated_fusion's reference at one position (DESIGN §2.3): alpha = softmax(cat · W^T + b),
        # LayerNorm(h + sum_i alpha_i · branch_i); then the FFN (eval: no dropout) inline
        stacked = torch.stack(branches, dim=1)  # (batch, k, d)
        alpha = torch.softmax(F.linear(stacked.view(stacked.shape[0], -1), self.gate_weight, self.gate_bias), dim=-1)
        mixed = torch.mul(stacked, alpha[:, :, None]).sum(1)
        fused = F.layer_norm(mixed.add_(h), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        inner = F.linear(F.gelu(F.linear(fused, ffn.w_1.weight, ffn.w_1.bias)), ffn.w_2.weight, ffn.w_2.bias)
        norm = ffn.layer_norm
        return F.layer_norm(inner.add_(fused), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
