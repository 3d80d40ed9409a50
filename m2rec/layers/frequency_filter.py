"""The frequency branch: a learnable filter applied in the FFT domain along the sequence axis.

Two modes (DESIGN §2.2), computed by ``m2rec_kernels.causal_filter`` and ``fft_filter``:

* ``"causal"`` (default): a real time-domain kernel k (max_len, d) — one tap sequence per channel —
  and y_t = sum_{s<=t} k_{t-s}·x_s (``causal_filter``: the FFT filter with weight rfft(k), without its
  wrap-around). For a length-L input only k[:L] matters. Output t depends on inputs <= t only, so right
  padding does not change the valid positions and all-position training is allowed.
* ``"circular"``: FMLP-Rec's filter (Woeee/FMLP-Rec ``modules.py::FilterLayer``): a learnable complex
  weight (max_len//2+1, d) with n_fft = L = max_len. It is a circular convolution — every position
  sees every other — so it is NOT invariant to right padding (the padding positions wrap around into
  the valid ones) and may only be trained on last-position targets. It needs L == max_len.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from m2rec_kernels import causal_filter, fft_filter
from m2rec_kernels._checks import check_tensor

FILTER_MODES = ("causal", "circular")


class FrequencyFilter(nn.Module):
    """FFT-domain filter over (batch, L, d_model) sequences; see the module docstring for the modes."""

    def __init__(self, d_model: int, max_len: int, mode: str = "causal", backend: str = "auto"):
        super().__init__()
        for name, v in (("d_model", d_model), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FrequencyFilter: {name} must be a positive int, got {v!r}")
        if mode not in FILTER_MODES:
            raise ValueError(f"FrequencyFilter: mode must be one of {FILTER_MODES}, got {mode!r}")
        self.d_model, self.max_len, self.mode, self.backend = d_model, max_len, mode, backend
        if mode == "causal":
            # std 0.02 per tap, the scale RecBole uses for every learned weight: a unit-variance input
            # gives an output std of about 0.02·sqrt(t+1) at position t (<= 0.28 at t = 200), so at
            # initialisation the branch is a small, smooth average and the residual path dominates —
            # the same regime as FMLP-Rec's randn·0.02 spectral weight, without its circular leak.
            self.kernel = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        else:
            # FMLP-Rec's initialisation: real view (max_len//2+1, d, 2) of the complex weight.
            self.complex_weight = nn.Parameter(torch.randn(max_len // 2 + 1, d_model, 2) * 0.02)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}, mode={self.mode!r}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model)."""
        check_tensor("FrequencyFilter", "x", x, shape=(None, None, self.d_model))
        L = x.shape[1]
        if self.mode == "causal":
            if not 1 <= L <= self.max_len:
                raise ValueError(
                    f"FrequencyFilter: sequence length (x.shape[1]) must lie in [1, max_len={self.max_len}], got {L}"
                )
            return causal_filter(x, self.kernel[:L], backend=self.backend)
        if L != self.max_len:
            raise ValueError(
                f"FrequencyFilter: the circular filter needs sequences of exactly max_len={self.max_len} "
                f"positions (pad every batch to max_len), got x.shape[1] = {L}"
            )
        return fft_filter(x, self.complex_weight, L, backend=self.backend)
