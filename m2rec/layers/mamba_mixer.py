"""The temporal branch: a Mamba (selective state space) mixer with ``mamba_ssm.Mamba``'s interface.

Same constructor, parameter names, shapes and initialisation as ``mamba_ssm.Mamba`` 2.3.2
(state-spaces/mamba, ``mamba_ssm/modules/mamba_simple.py``, read to learn its conventions): the
parameters are created and drawn in the same order, so the same seed gives bit-identical parameters
and a state_dict moves between the two in either direction. The math is Mamba's "slow path" (no fused
``mamba_inner_fn``), with every op from ``m2rec_kernels``:

    x, z = split(in_proj(h));  x = causal_conv1d(x, conv1d.weight, conv1d.bias, activation="silu")
    dt, B, C = split(x_proj(x));  dt = dt_proj.weight @ dt   (bias applied inside the scan)
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z, delta_bias = dt_proj.bias, softplus)
    out = out_proj(y)

On CPU the activations stay time-major, (batch, L, ·) in memory from in_proj to out_proj: the conv and
the scan (compiled kernels vectorised along channels) read the (batch, ·, L) transposes in place, so
nothing is transposed or copied. On CUDA they are channels-first, mamba_ssm's slow-path layout, which
the Triton kernels read along time.

Interface (as mamba_ssm's): ``forward(hidden_states, inference_params=None)`` — with
``inference_params`` the first call (``seqlen_offset == 0``) fills this layer's conv and SSM state in
``inference_params.key_value_memory_dict[layer_idx]`` and later calls (``seqlen_offset > 0``) take one
token each through ``step``; ``allocate_inference_cache`` and ``step`` as in mamba_ssm, the step
through ``m2rec_kernels.selective_state_update``. Beyond mamba_ssm: ``forward_last`` (the output at
each sequence's last position only, for scoring) and ``prefill`` (outputs plus per-sequence states
after right-padded sequences of different lengths), used by the recommenders' last-position inference
and streaming.

``backend`` ("auto" | "torch" | "triton", and any backend the ops add) selects the scan's
implementation. ``use_fast_path`` is accepted and recorded: in mamba_ssm it picks the fused CUDA
kernel for the same math; here the kernels are picked by ``backend``, so it changes nothing.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2rec_kernels import causal_conv1d, selective_scan, selective_scan_final, selective_state_update
from m2rec_kernels._checks import check_lengths, check_tensor
from m2rec_kernels.scan import selective_scan_lowrank
from m2rec_kernels.scan.cpu import _isa_code, cpu_scan_unavailable

from .derived import derived, module_tensors, tensor_paths

DT_INITS = ("random", "constant")
#: positions (rows x L) per batch slice of the last-position path on CPU (``MambaMixer._run_last``): at
#: d_inner 128 each (slice, L, d_inner) intermediate is 2 MB. Measured on one Zen 4 thread (batch 64,
#: d_model 64, N 32; thread time, min of 5): forward_last 15-20% faster at L 200 and 1000, ~40% at
#: L 2000 than in one piece; slices of 1,600 to 6,400 positions within ~5% of each other at L 200 and 1000.
LAST_CHUNK_POSITIONS = 4096
#: the fused step op's transposed weights have their columns padded to a multiple of this (whole vectors
#: of its matrix kernel: 16 lanes for AVX-512, 8 for AVX2, fewer for the generic variant)
FUSED_STEP_COLUMNS = 16
_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def padded_transpose(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight (out, in) as the fused step ops' matrix kernel reads it: fp32 (in, out_pad),
    transposed, the columns zero-padded to a multiple of ``FUSED_STEP_COLUMNS``."""
    return F.pad(weight.float().t(), (0, -weight.shape[0] % FUSED_STEP_COLUMNS)).contiguous()


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MambaMixer: {name} must be a positive int, got {value!r}")
    return value


def _check_number(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and not value > 0) or value < 0:
        want = "a positive number" if positive else "a number >= 0"
        raise ValueError(f"MambaMixer: {name} must be {want}, got {value!r}")
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"MambaMixer: {name} must be a bool, got {type(value).__name__}")
    return value


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """A, D and the dt bias enter the scan in fp32 (as in mamba_ssm), or fp64 for a double model."""
    return t if t.dtype == torch.float64 else t.float()


class MambaMixer(nn.Module):
    """Mamba-1 mixer over (batch, L, d_model) sequences; causal along L. A drop-in for
    ``mamba_ssm.Mamba`` (same arguments and defaults) plus ``backend``."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand=2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        backend: str = "auto",
    ):
        super().__init__()
        self.d_model = _check_positive_int("d_model", d_model)
        self.d_state = _check_positive_int("d_state", d_state)
        self.d_conv = _check_positive_int("d_conv", d_conv)
        if isinstance(expand, bool) or not isinstance(expand, (int, float)) or not int(expand * d_model) >= 1:
            raise ValueError(f"MambaMixer: expand must be a number with int(expand * d_model) >= 1, got {expand!r}")
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else _check_positive_int("dt_rank", dt_rank)
        dt_min, dt_max = _check_number("dt_min", dt_min, True), _check_number("dt_max", dt_max, True)
        if dt_min > dt_max:
            raise ValueError(f"MambaMixer: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init not in DT_INITS:
            raise ValueError(f"MambaMixer: dt_init must be one of {DT_INITS} (as mamba_ssm), got {dt_init!r}")
        dt_scale = _check_number("dt_scale", dt_scale)
        dt_init_floor = _check_number("dt_init_floor", dt_init_floor)
        conv_bias, bias = _check_bool("conv_bias", conv_bias), _check_bool("bias", bias)
        self.use_fast_path = _check_bool("use_fast_path", use_fast_path)
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int)):
            raise TypeError(f"MambaMixer: layer_idx must be an int or None, got {type(layer_idx).__name__}")
        if dtype is not None and dtype not in _PARAM_DTYPES:
            raise TypeError(f"MambaMixer: dtype must be a floating dtype {_PARAM_DTYPES} or None, got {dtype!r}")
        self.layer_idx = layer_idx
        self.backend = backend
        factory = {"device": device, "dtype": dtype}

        # Creation order = mamba_ssm's, so the default initialisers draw the same random numbers.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj: weight uniform in ±dt_scale·dt_rank^-1/2 (variance-preserving) or constant; bias =
        # softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored, so the initial step sizes
        # span two decades.
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # Model-level re-initialisers (e.g. RecBole style) leave this bias alone, as mamba_ssm's do.
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation A = -(1..N) for every channel, stored as log; D skip = 1. Both fp32
        # whatever ``dtype`` is, as in mamba_ssm.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
                f"dt_rank={self.dt_rank}, layer_idx={self.layer_idx}, backend={self.backend!r}")

    # ----- shared pieces ------------------------------------------------------------------------
    def _check_hidden(self, hidden_states: torch.Tensor) -> None:
        check_tensor("MambaMixer", "hidden_states", hidden_states, shape=(None, None, self.d_model))

    def _check_lengths(self, lengths, hidden_states) -> Optional[torch.Tensor]:
        if lengths is None:
            return None
        batch, L, _ = hidden_states.shape
        check_lengths("MambaMixer", lengths, batch, L, hidden_states.device, lo=1)  # each sequence needs an item
        return lengths.long()

    def _scan_params(self):
        """A, D and the dt bias as the scan takes them."""
        return (-torch.exp(_at_least_fp32(self.A_log)), _at_least_fp32(self.D),
                _at_least_fp32(self.dt_proj.bias))

    @staticmethod
    def _time_major(hidden_states: torch.Tensor) -> bool:
        """The memory layout of the activations between in_proj and out_proj. Time-major on CPU:
        (batch, L, ·) from in_proj to out_proj, the conv and the scan reading the (batch, ·, L)
        transposes in place (the compiled kernels are vectorised along channels), no transposing
        copies. Channels-first on CUDA, mamba_ssm's slow-path layout: the Triton kernels read along
        time. The math is the same either way; every tensor below is handled as a (batch, ·, L) view."""
        return hidden_states.device.type != "cuda"

    def _project(self, inputs: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 time_major: bool) -> torch.Tensor:
        """weight @ inputs per position: inputs (batch, L, k) -> (batch, rows, L) view, laid out
        time-major (a (batch * L, k) x (k, rows) product) or channels-first."""
        if time_major:
            return F.linear(inputs, weight, bias).transpose(1, 2)
        out = torch.matmul(weight, inputs.transpose(1, 2))
        return out if bias is None else out + bias[:, None].to(out.dtype)

    def _conv_ssm_inputs(self, x_in: torch.Tensor, time_major: bool, last: Optional[torch.Tensor] = None):
        """Causal conv + SiLU of x_in (batch, d_inner, L), then the scan's x, dt (the low-rank delta
        before dt_proj, (batch, dt_rank, L)), B, C (batch, ·, L) views. With ``last`` (batch,) C is needed at those positions only (the final-form scan reads
        nothing else): it is projected there and broadcast along L."""
        x = causal_conv1d(x_in, self.conv1d.weight[:, 0, :], self.conv1d.bias, activation="silu",
                          backend=self.backend)
        x_rows = x.transpose(1, 2)  # (batch, L, d_inner): contiguous when time-major
        R, N = self.dt_rank, self.d_state
        w = self.x_proj.weight
        if last is None:
            x_dbl = F.linear(x_rows, w)  # (batch, L, dt_rank + 2N)
            dt, B, C = torch.split(x_dbl, [R, N, N], dim=-1)
            C = C.transpose(1, 2)
        else:
            dt, B = torch.split(F.linear(x_rows, w[:R + N]), [R, N], dim=-1)
            x_last = x_rows[torch.arange(x.shape[0], device=x.device), last]
            C = F.linear(x_last, w[R + N:])[:, :, None].expand(-1, -1, x.shape[2])
        return x, dt.transpose(1, 2), B.transpose(1, 2), C

    def _ssm(self, x, dt, A, B, C, D, z, dt_bias, lengths, want_last: bool, final: bool, time_major: bool):
        """The scan with delta = dt_proj.weight @ dt (the dt bias and softplus applied in the scan): as
        ``selective_scan`` or, with ``final``, ``selective_scan_final``. Time-major (CPU) through
        ``selective_scan_lowrank``, where the compiled scan forms delta in registers when no gradient
        is needed (measured at L 2000, DESIGN §4.1); channels-first (CUDA) delta is formed here."""
        if time_major:
            return selective_scan_lowrank(x, dt, self.dt_proj.weight, A, B, C, D=D, z=z, delta_bias=dt_bias,
                                          delta_softplus=True, return_last_state=want_last, lengths=lengths,
                                          final=final, backend=self.backend)
        delta = self._project(dt.transpose(1, 2), self.dt_proj.weight, None, time_major)
        if final:
            return selective_scan_final(x, delta, A, B, C, D=D, z=z, delta_bias=dt_bias, delta_softplus=True,
                                        lengths=lengths, backend=self.backend)
        return selective_scan(x, delta, A, B, C, D=D, z=z, delta_bias=dt_bias, delta_softplus=True,
                              return_last_state=want_last, lengths=lengths, backend=self.backend)

    def _conv_window(self, x_in: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """The conv state after each sequence: x_in at its last d_conv steps (zeros before the start),
        (batch, d_inner, d_conv) — mamba_ssm's ``F.pad(x, (d_conv - L, 0))`` per sequence."""
        batch, _, L = x_in.shape
        if lengths is None:
            return F.pad(x_in, (self.d_conv - L, 0))
        idx = lengths[:, None] - self.d_conv + torch.arange(self.d_conv, device=x_in.device)[None, :]
        window = x_in.gather(2, idx.clamp(min=0)[:, None, :].expand(batch, self.d_inner, self.d_conv))
        return window * (idx >= 0)[:, None, :].to(window.dtype)

    def _in_proj(self, hidden_states: torch.Tensor, rows: slice, time_major: bool) -> torch.Tensor:
        """Rows of in_proj at every position: (batch, L, d) -> (batch, rows, L) view."""
        bias = self.in_proj.bias
        return self._project(hidden_states, self.in_proj.weight[rows], None if bias is None else bias[rows],
                             time_major)

    def _run(self, hidden_states, lengths=None, last_only=False, want_states=False):
        """(out, conv_state, ssm_state): out (batch, L, d_model), or (batch, d_model) at each
        sequence's last position with ``last_only``; the states (None unless ``want_states`` or
        ``last_only``, which gets the final SSM state for free) after each sequence's last step."""
        if last_only:
            return self._run_last(hidden_states, lengths, want_states)
        di = self.d_inner
        time_major = self._time_major(hidden_states)
        A, D, dt_bias = self._scan_params()
        xz = self._in_proj(hidden_states, slice(0, 2 * di), time_major)
        # Split along the channels' memory axis: the split's backward (one cat, not two zero-filled
        # slice gradients) then writes in_proj's output gradient in in_proj's own layout.
        if time_major:
            x_in, z = (t.transpose(1, 2) for t in xz.transpose(1, 2).split(di, dim=-1))
        else:
            x_in, z = xz.split(di, dim=1)
        conv_state = self._conv_window(x_in, lengths) if want_states else None
        x, dt, B, C = self._conv_ssm_inputs(x_in, time_major)
        result = self._ssm(x, dt, A, B, C, D, z, dt_bias, lengths if want_states else None, want_states,
                           False, time_major)
        y, ssm_state = result if want_states else (result, None)
        return self.out_proj(y.transpose(1, 2)), conv_state, ssm_state

    def _run_last(self, hidden_states, lengths, want_states):
        """``_run`` with ``last_only``. On CPU the batch goes through in slices of about
        ``LAST_CHUNK_POSITIONS`` positions, so that the (slice, L, d_inner) intermediates (conv input
        and output, x_proj, delta) stay in cache between the ops instead of streaming through memory
        (each op here does a few operations per element); on CUDA in one piece."""
        batch, L, _ = hidden_states.shape
        step = max(1, LAST_CHUNK_POSITIONS // L)
        if not self._time_major(hidden_states) or batch <= step:
            return self._run_last_slice(hidden_states, lengths, want_states)
        parts = [self._run_last_slice(hidden_states[i:i + step], None if lengths is None else lengths[i:i + step],
                                      want_states) for i in range(0, batch, step)]
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))

    def _run_last_slice(self, hidden_states, lengths, want_states):
        di = self.d_inner
        time_major = self._time_major(hidden_states)
        A, D, dt_bias = self._scan_params()
        # The gate z and C are needed at the last position only: half of in_proj and a third of x_proj
        # run there alone.
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        last = (lengths if lengths is not None else torch.full_like(rows, hidden_states.shape[1])) - 1
        x_in = self._in_proj(hidden_states, slice(0, di), time_major)
        conv_state = self._conv_window(x_in, lengths) if want_states else None
        x, dt, B, C = self._conv_ssm_inputs(x_in, time_major, last)
        bias = self.in_proj.bias
        z = F.linear(hidden_states[rows, last], self.in_proj.weight[di:], None if bias is None else bias[di:])
        y, ssm_state = self._ssm(x, dt, A, B, C, D, None, dt_bias, lengths, True, True, time_major)
        return self.out_proj(y * F.silu(z)), conv_state, ssm_state

    # ----- mamba_ssm's interface ----------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        """hidden_states (batch, L, d_model) -> (batch, L, d_model). With ``inference_params``
        (mamba_ssm's ``InferenceParams``): at ``seqlen_offset == 0`` the whole sequence runs and this
        layer's cached conv and SSM states are set to those after it; at ``seqlen_offset > 0``
        hidden_states must hold one token, which ``step`` takes, updating the cached states in place."""
        self._check_hidden(hidden_states)
        if inference_params is None:
            return self._run(hidden_states)[0]
        conv_state, ssm_state = self._get_states_from_cache(inference_params, hidden_states.shape[0])
        if inference_params.seqlen_offset > 0:
            return self.step(hidden_states, conv_state, ssm_state)[0]
        out, conv_new, ssm_new = self._run(hidden_states, want_states=True)
        conv_state.copy_(conv_new)
        ssm_state.copy_(ssm_new)
        return out

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One token: hidden_states (batch, 1, d_model); conv_state (batch, d_inner, d_conv) and
        ssm_state (batch, d_inner, d_state) are updated IN PLACE. Returns (out (batch, 1, d_model),
        conv_state, ssm_state), as mamba_ssm's ``Mamba.step``."""
        op = "MambaMixer.step"
        check_tensor(op, "hidden_states", hidden_states, shape=(None, None, self.d_model))
        batch, n_tokens, _ = hidden_states.shape
        if n_tokens != 1:
            raise ValueError(f"{op}: hidden_states must hold exactly one token (batch, 1, d_model), got "
                             f"{tuple(hidden_states.shape)}")
        dev = hidden_states.device
        check_tensor(op, "conv_state", conv_state, shape=(batch, self.d_inner, self.d_conv), device=dev)
        check_tensor(op, "ssm_state", ssm_state, shape=(batch, self.d_inner, self.d_state), device=dev)
        return self.step_unchecked(hidden_states[:, 0], conv_state, ssm_state).unsqueeze(1), conv_state, ssm_state

    def _step_params(self):
        """(A, the conv taps (d_conv, d_inner) contiguous) for ``step``, cached until the parameters
        change (``derived``): -exp(A_log) and the taps' transpose are not recomputed every step."""
        def build():
            return self._scan_params()[0], self.conv1d.weight[:, 0, :].t().contiguous()
        return derived(self, "step", (self.A_log, self.conv1d.weight), build)

    #: the tensors the fused step op's inputs come from: the 8 that ``_fused_step_params`` derives
    #: its inputs from, then the 3 biases the op takes as they are (None where a layer has none)
    _FUSED_TENSORS = tensor_paths("A_log", "conv1d.weight", "D", "dt_proj.bias", "in_proj.weight", "x_proj.weight",
                                  "dt_proj.weight", "out_proj.weight", "in_proj.bias", "conv1d.bias", "out_proj.bias")

    def _fused_step_params(self, tensors=None):
        """The fused step op's parameters, fp32 and contiguous, cached until they change (``derived``):
        A, the conv taps (d_inner, d_conv), D, the dt bias, and in_proj's, x_proj's, dt_proj's and
        out_proj's weights transposed (in, out) with the out columns zero-padded to a multiple of 16 (whole
        vectors for every ISA variant of the op's matrix kernel). None when a weight or bias is not fp32
        (the op takes fp32 only; the step then runs op by op). ``tensors``: ``_FUSED_TENSORS`` as
        ``module_tensors`` gives them (looked up here when not given)."""
        def build():
            linears = (self.in_proj, self.x_proj, self.dt_proj, self.out_proj, self.conv1d)
            if any(t is not None and t.dtype != torch.float32 for m in linears for t in (m.weight, m.bias)):
                return None
            return (self._scan_params()[0].contiguous(), self.conv1d.weight[:, 0, :].contiguous(),
                    self.D.float().contiguous(), self.dt_proj.bias.contiguous(),
                    padded_transpose(self.in_proj.weight), padded_transpose(self.x_proj.weight),
                    padded_transpose(self.dt_proj.weight), padded_transpose(self.out_proj.weight))
        if tensors is None:
            tensors = module_tensors(self, self._FUSED_TENSORS)
        # (the biases are sources too: build's fp32 decision covers them)
        return derived(self, "fused_step", [t for t in tensors if t is not None], build)

    def _fused_step(self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> bool:
        """Whether ``step_unchecked`` may run as one compiled op (``m2rec_scan_cpu.mamba_step``) as far as
        this call's tensors go: CPU, fp32, states with unit stride along their last axis, no gradient,
        the compiled library loaded (the weights' dtypes are checked once, by ``_fused_step_params``)."""
        return (self.backend in ("auto", "cpu") and hidden.is_cpu and not torch.is_grad_enabled()
                and hidden.dtype == torch.float32 and conv_state.dtype == torch.float32
                and ssm_state.dtype == torch.float32 and conv_state.stride(-1) == 1 and ssm_state.stride(-1) == 1
                and hidden.stride(-1) == 1 and cpu_scan_unavailable() is None)

    def _compiled_update(self, ssm_state: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether ``step_unchecked`` may call the compiled CPU state update directly (what
        ``selective_state_update`` would choose, without its per-call checks and dispatch)."""
        return (self.backend in ("auto", "cpu") and not torch.is_grad_enabled() and ssm_state.device.type == "cpu"
                and ssm_state.dtype == torch.float32 and x.dtype == torch.float32
                and self.dt_proj.weight.dtype == torch.float32 and cpu_scan_unavailable() is None)

    def step_unchecked(self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """``step`` on checked arguments, hidden (batch, d_model) -> (batch, d_model): the streaming
        path, whose states were checked when they were made."""
        fused = None
        if self._fused_step(hidden, conv_state, ssm_state):
            tensors = module_tensors(self, self._FUSED_TENSORS)
            fused = self._fused_step_params(tensors)
        if fused is not None:
            A, taps, D, dt_bias, in_t, x_t, dt_t, out_t = fused
            in_bias, conv_bias, out_bias = tensors[8:]
            return torch.ops.m2rec_scan_cpu.mamba_step(
                hidden, conv_state, ssm_state, in_t, in_bias, taps, conv_bias, x_t, dt_t, A, D, dt_bias, out_t,
                out_bias, self.d_model, _isa_code(None))
        dtype = hidden.dtype
        x, z = F.linear(hidden, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)  # (batch, d_inner)
        A, taps = self._step_params()
        # Conv step: shift the window left, append x, dot with the taps — as d_conv multiply-adds on
        # (batch, d_inner): a sum over a last axis of 4 is a slow reduction in torch (~4x the time of
        # these at batch 64, d_inner 128, one CPU thread)
        if conv_state.is_contiguous():
            # one shift of the whole buffer by one element: each window moves left, its first element
            # lands in the previous window's last slot, which x then overwrites (1.5x faster than roll)
            flat = conv_state.view(-1)
            flat[:-1] = flat[1:].clone()
        else:
            conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        bias = self.conv1d.bias
        x = conv_state[:, :, 0] * taps[0] if bias is None else torch.addcmul(bias, conv_state[:, :, 0], taps[0])
        for k in range(1, self.d_conv):
            x.addcmul_(conv_state[:, :, k], taps[k])
        x = F.silu(x).to(dtype)
        dt, B, C = torch.split(F.linear(x, self.x_proj.weight), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # bias applied inside the update
        D, dt_bias = _at_least_fp32(self.D), _at_least_fp32(self.dt_proj.bias)
        if self._compiled_update(ssm_state, x):
            y = torch.ops.m2rec_scan_cpu.state_update(ssm_state, x, dt, A, B, C, D, z, dt_bias, None, True,
                                                      _isa_code(None))
        else:
            y = selective_state_update(ssm_state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                       backend=self.backend)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zero (conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, d_state)) in the
        weights' dtypes, or ``dtype`` (mamba_ssm's semantics; ``max_seqlen`` is not needed)."""
        _check_positive_int("batch_size", batch_size)
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                 dtype=self.conv1d.weight.dtype if dtype is None else dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=self.dt_proj.weight.dtype if dtype is None else dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size: int, initialize_states: bool = False):
        """This layer's (conv_state, ssm_state) in ``inference_params.key_value_memory_dict``, created
        (zeros) on first use — mamba_ssm's semantics."""
        if self.layer_idx is None:
            raise ValueError("MambaMixer: inference_params needs the layer's index to find its cache; "
                             "construct it with layer_idx=... (mamba_ssm's builders pass it)")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=self.conv1d.weight.device,
                                     dtype=self.conv1d.weight.dtype)
            ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=self.dt_proj.weight.device,
                                    dtype=self.dt_proj.weight.dtype)
            cache[self.layer_idx] = (conv_state, ssm_state)
        else:
            conv_state, ssm_state = cache[self.layer_idx]
            if initialize_states:
                conv_state.zero_()
                ssm_state.zero_()
        return conv_state, ssm_state

    # ----- beyond mamba_ssm: last position and per-sequence states -------------------------------
    def zero_states(self, batch_size: int, dtype=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Zero (conv_state, ssm_state) in the form ``prefill`` returns them: the conv window in
        ``dtype`` (the weights' by default), the SSM state in fp32 (fp64 for a double model) whatever
        the activations' dtype, as the scan keeps it."""
        conv_state, _ = self.allocate_inference_cache(batch_size, 1, dtype=dtype)
        wide = torch.float64 if conv_state.dtype == torch.float64 else torch.float32
        return conv_state, conv_state.new_zeros(batch_size, self.d_inner, self.d_state, dtype=wide)

    def forward_last(self, hidden_states: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The output at each sequence's last position only, (batch, d_model): equal to
        ``forward(hidden_states)[b, lengths[b] - 1]`` (position L - 1 without ``lengths``). The scan
        runs to the final state and forms no per-step output (``selective_scan_final``)."""
        self._check_hidden(hidden_states)
        lengths = self._check_lengths(lengths, hidden_states)
        return self._run(hidden_states, lengths, last_only=True)[0]

    def prefill(self, hidden_states: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                last_only: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run right-padded sequences and return (out, conv_state, ssm_state), the states after each
        sequence's own last step (``lengths``; all L steps without it), ready for ``step``. out is
        (batch, L, d_model) (at positions >= lengths[b], padding, the state is held: ignore them), or
        (batch, d_model) at the last positions with ``last_only``. conv_state
        is in hidden_states' dtype, ssm_state in fp32 (fp64 for a double model)."""
        self._check_hidden(hidden_states)
        lengths = self._check_lengths(lengths, hidden_states)
        return self._run(hidden_states, lengths, last_only=last_only, want_states=True)
