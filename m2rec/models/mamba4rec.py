"""Mamba4Rec (Liu et al. 2024), structured as chengkai-liu/Mamba4Rec ``mamba4rec.py``:

    h0 = LayerNorm(dropout(E[item]))
    layer: m = Mamba(h);  h' = LayerNorm(dropout(m))        (n_layers == 1: no residual, as the original)
                          h' = LayerNorm(dropout(m) + h)    (n_layers > 1)
           h = LayerNorm(h' + dropout(W2 · dropout(GELU(W1 · h'))))

The Mamba block is either the real ``mamba_ssm.Mamba`` (the peer a user would run on CUDA) or this
package's ``MambaMixer``; both share one set of parameters with identical names, so the state_dict and
the results do not depend on which one runs. ``impl``:

* ``"mixer"``: always ``MambaMixer`` (scan backend from ``backend``);
* ``"mamba_ssm"``: always the real ``mamba_ssm.Mamba`` (on CPU through the reference-scan shim of
  ``m2rec.mamba_ssm_compat``; raises if mamba_ssm is not importable);
* ``"auto"``: the real one for CUDA tensors when its CUDA scan is installed, ``MambaMixer`` otherwise.

``mamba_impl`` tells which one runs for the model's current device. Scoring runs the last layer at
the last positions only (with the real ``mamba_ssm.Mamba`` its Mamba block still runs in full: it has
no last-position path). Streaming (``init_state`` / ``prefill`` / ``step``) always runs ``MambaMixer``
on the shared parameters; past max_len items the stream goes on without forgetting, as in M2Rec.

Initialisation follows the original: RecBole's N(0, 0.02) re-initialisation is applied to every Linear,
including those inside Mamba, and — unlike mamba_ssm's own initialiser — it zeroes dt_proj's bias too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import LAYER_NORM_EPS, FeedForward, MambaMixer
from ..mamba_ssm_compat import import_mamba_ssm, tie_mamba_ssm
from .base import SequentialRecommender, check_dropout, init_recbole_weights, normed_item_embedding

MAMBA_IMPLS = ("auto", "mamba_ssm", "mixer")


class Mamba4RecLayer(nn.Module):
    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float,
                 residual: bool, impl: str, backend: str):
        super().__init__()
        self.residual, self.impl = residual, impl
        self.mamba = MambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout=dropout, activation_dropout=True)
        self._real = None  # mamba_ssm.Mamba sharing self.mamba's parameters; built on first use

    def uses_mamba_ssm(self, device: torch.device) -> bool:
        if self.impl == "mixer":
            return False
        if self.impl == "mamba_ssm":
            return True
        return device.type == "cuda" and import_mamba_ssm()[1] == "cuda"

    def _real_mamba(self) -> nn.Module:
        mamba_ssm, how = import_mamba_ssm()
        if mamba_ssm is None:
            raise RuntimeError(f"Mamba4Rec: impl='mamba_ssm' but mamba_ssm is not importable: {how}")
        # (Re-)tie on every use, so a conversion that replaced the Parameter objects cannot untie them.
        # Not a submodule: its parameters are self.mamba's.
        object.__setattr__(self, "_real", tie_mamba_ssm(self.mamba, self._real))
        return self._real

    def _mamba(self, h: torch.Tensor) -> torch.Tensor:
        if self.uses_mamba_ssm(h.device):
            if h.device.type != "cuda" and import_mamba_ssm()[1] == "cuda":
                raise RuntimeError("Mamba4Rec: mamba_ssm's CUDA scan cannot run on CPU tensors; use impl='mixer'")
            return self._real_mamba()(h)
        return self.mamba(h)

    def _finish(self, m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """dropout, (residual,) LayerNorm, FFN — at any shape."""
        m = self.dropout(m)
        return self.ffn(self.layer_norm(m + h if self.residual else m))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._finish(self._mamba(h), h)

    def forward_last(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The output at each sequence's last position only, (batch, d). MambaMixer runs its scan to
        the final state without per-step outputs; the real mamba_ssm.Mamba has no such path, so with it
        the Mamba block runs in full and its last positions are gathered (the rest runs at one position)."""
        rows = torch.arange(h.shape[0], device=h.device)
        if self.uses_mamba_ssm(h.device):
            m = self._mamba(h)[rows, lengths - 1]
        else:
            m = self.mamba.forward_last(h, lengths)
        return self._finish(m, h[rows, lengths - 1])

    # Streaming runs MambaMixer (on the shared parameters) whatever ``impl`` is: same math.
    def init_state(self, batch_size: int, device=None, dtype=None):
        conv, ssm = self.mamba.zero_states(batch_size, dtype=dtype)
        return {"conv": conv.to(device), "ssm": ssm.to(device)}

    def prefill(self, h: torch.Tensor, lengths: torch.Tensor, last_only: bool = False):
        m, conv, ssm = self.mamba.prefill(h, lengths, last_only=last_only)
        if last_only:
            h = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        return self._finish(m, h), {"conv": conv, "ssm": ssm}

    def step(self, h: torch.Tensor, state) -> torch.Tensor:
        """One new position: h (batch, d); the state's conv and SSM tensors are updated in place."""
        m = self.mamba.step(h[:, None, :], state["conv"], state["ssm"])[0][:, 0]
        return self._finish(m, h)


class Mamba4Rec(SequentialRecommender):
    def __init__(self, n_items: int, d_model: int = 64, n_layers: int = 1, d_state: int = 32, d_conv: int = 4,
                 expand: int = 2, max_len: int = 200, dropout: float = 0.2, impl: str = "auto",
                 backend: str = "auto"):
        super().__init__(n_items, d_model, max_len)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"Mamba4Rec: n_layers must be a positive int, got {n_layers!r}")
        if impl not in MAMBA_IMPLS:
            raise ValueError(f"Mamba4Rec: impl must be one of {MAMBA_IMPLS}, got {impl!r}")
        if impl == "mamba_ssm" and import_mamba_ssm()[0] is None:
            raise RuntimeError(f"Mamba4Rec: impl='mamba_ssm' but mamba_ssm is not importable: {import_mamba_ssm()[1]}")
        dropout = check_dropout("Mamba4Rec", dropout)
        self.impl, self.causal = impl, True
        self.embedding_dropout = nn.Dropout(dropout)
        self.embedding_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(
            Mamba4RecLayer(d_model, d_state, d_conv, expand, dropout, residual=n_layers > 1, impl=impl,
                           backend=backend)
            for _ in range(n_layers)
        )
        init_recbole_weights(self, respect_no_reinit=False)

    @property
    def mamba_impl(self) -> str:
        """"mamba_ssm" or "mixer": the Mamba implementation used for the model's current device."""
        return "mamba_ssm" if self.layers[0].uses_mamba_ssm(self.item_embedding.weight.device) else "mixer"

    def _embed(self, items: torch.Tensor) -> torch.Tensor:
        return normed_item_embedding(items, self.item_embedding, self.embedding_dropout, self.embedding_norm)

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self._embed(item_seq)
        for layer in self.layers:
            h = layer(h)
        return h

    def encode_last(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self._embed(item_seq)
        for layer in self.layers[:-1]:
            h = layer(h)
        return self.layers[-1].forward_last(h, lengths)

    # ----- streaming: per layer the Mamba block's conv window and SSM state; past max_len items the
    # stream goes on without forgetting (see M2Rec's module docstring) -----------------------------
    def _init_stream_layers(self, batch_size, device, dtype):
        return [layer.init_state(batch_size, device=device, dtype=dtype) for layer in self.layers]

    def _prefill_stream(self, item_seq, lengths):
        h, states = self._embed(item_seq), []
        for layer in self.layers[:-1]:
            h, state = layer.prefill(h, lengths)
            states.append(state)
        out, state = self.layers[-1].prefill(h, lengths, last_only=True)
        return out, states + [state]

    def _step_stream(self, layers, items, positions):
        h = self._embed(items)
        for layer, state in zip(self.layers, layers):
            h = layer.step(h, state)
        return h
