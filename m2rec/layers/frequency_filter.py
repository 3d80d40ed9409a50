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

One position at a time (causal mode): output t is a dot product over the history,
y_t = sum_{j<=t} k_j·x_{t-j}, O(L·d) per position instead of a transform of the whole sequence.
``forward_last`` computes it at each sequence's last position (scoring). For streaming, a history
holds the last max_len inputs (batch, max_len, d_model) as a ring: the input at position i (0-based)
sits in slot i mod max_len, zeros where there was none yet; ``step`` writes one input in place and
returns the new output, reading the history once (a shifting window would copy it every step). Past
max_len inputs the oldest is overwritten: the kernel has max_len taps, so y is the causal convolution
of the whole stream with the kernel (taps beyond max_len are zero). The circular mode has neither:
each of its outputs depends on the whole window, future positions included.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from m2rec_kernels import causal_filter, fft_filter
from m2rec_kernels._checks import check_lengths, check_tensor, tracing
from m2rec_kernels.freq_filter.ring_step import causal_filter_last, ring_filter_step, weighted_sum

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

    # ----- one position at a time ---------------------------------------------------------------
    def _last_taps(self, lengths: torch.Tensor, L: int) -> torch.Tensor:
        """The taps that weigh x[b, t] in the output at each sequence's last position lengths[b] - 1:
        kernel[lengths[b] - 1 - t] for t < lengths[b], zero after — (batch, L, d), or (1, L, d) when
        every sequence has L items. Moving the taps (a gather of kernel rows) instead of
        right-aligning x (an elementwise gather of x, then a mask) measured 2.3x faster at (64, 200, 64)
        with mixed lengths, 9x with all of length L (one CPU thread)."""
        k = self.kernel[:L]
        if not tracing() and bool((lengths == L).all()):  # (a traced graph takes the general gather)
            return k.flip(0)[None]
        idx = lengths[:, None] - 1 - torch.arange(L, device=lengths.device)[None, :]  # (batch, L)
        padded = torch.cat([k, k.new_zeros(1, k.shape[1])])  # row L: the zero tap after the end
        return padded[torch.where(idx >= 0, idx, L)]

    @staticmethod
    def _weighted_sum(window: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        """sum_w taps[.., w, :] · window[:, w, :] -> (batch, d), in fp32 at least. A vector dot along
        the window, not einsum: einsum lowers this to a bmm over channels with a transposed copy, 5x
        slower at (64, 200, 64) on one CPU thread."""
        return weighted_sum(window, taps)

    def _check_lengths(self, x: torch.Tensor, lengths) -> torch.Tensor:
        batch, L, _ = x.shape
        if lengths is None:
            return torch.full((batch,), L, dtype=torch.long, device=x.device)
        check_lengths("FrequencyFilter", lengths, batch, L, x.device, lo=1)
        return lengths.long()

    def forward_last(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        """The output at each sequence's last position, (batch, d_model): equal to
        ``forward(x)[b, lengths[b] - 1]`` (L - 1 without ``lengths``). Causal mode: one dot product
        over the history per sequence, O(L·d). Circular mode: the whole transform, then the gather."""
        check_tensor("FrequencyFilter", "x", x, shape=(None, None, self.d_model))
        lengths = self._check_lengths(x, lengths)
        if self.mode != "causal":
            y = self(x)
            return y[torch.arange(x.shape[0], device=x.device), lengths - 1]
        if not 1 <= x.shape[1] <= self.max_len:
            raise ValueError(f"FrequencyFilter: sequence length (x.shape[1]) must lie in [1, max_len={self.max_len}], "
                             f"got {x.shape[1]}")
        compiled = causal_filter_last(x, self.kernel, lengths, backend=self.backend)
        if compiled is not None:
            return compiled
        return self._weighted_sum(x, self._last_taps(lengths, x.shape[1]))

    def _check_streamable(self) -> None:
        if self.mode != "causal":
            raise ValueError("FrequencyFilter: the circular filter cannot stream: each of its outputs depends on "
                             "every position of the max_len window, later ones included; use filter='causal'")

    def init_history(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """An empty history (no inputs yet): zeros (batch_size, max_len, d_model)."""
        self._check_streamable()
        return torch.zeros(batch_size, self.max_len, self.d_model, device=device,
                           dtype=self.kernel.dtype if dtype is None else dtype)

    def history(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        """The history after right-padded sequences x (batch, L, d_model): each sequence's last
        max_len inputs up to lengths - 1, in ring order, as ``step`` keeps it."""
        self._check_streamable()
        check_tensor("FrequencyFilter", "x", x, shape=(None, None, self.d_model))
        lengths = self._check_lengths(x, lengths)
        batch, L, d = x.shape
        slots = torch.arange(self.max_len, device=x.device)[None, :]
        # slot s holds the latest position i < length with i = s (mod max_len), if any
        pos = lengths[:, None] - 1 - torch.remainder(lengths[:, None] - 1 - slots, self.max_len)
        ring = x.gather(1, pos.clamp(min=0)[:, :, None].expand(batch, self.max_len, d))
        return ring * (pos >= 0)[:, :, None].to(ring.dtype)

    def step(self, x: torch.Tensor, history: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Write one input x (batch, d_model) at ``positions`` (batch,) — each sequence's 0-based
        position, the number of inputs before it — into ``history`` (batch, max_len, d_model) IN PLACE,
        and return the output there, (batch, d_model)."""
        self._check_streamable()
        check_tensor("FrequencyFilter.step", "x", x, shape=(None, self.d_model))
        batch = x.shape[0]
        check_tensor("FrequencyFilter.step", "history", history, shape=(batch, self.max_len, self.d_model),
                     device=x.device)
        return self.step_unchecked(x, history, positions)

    def step_unchecked(self, x: torch.Tensor, history: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``step`` on checked arguments (the streaming path, whose history was checked when it was made)."""
        return ring_filter_step(history, x, self.kernel, positions, backend=self.backend)
