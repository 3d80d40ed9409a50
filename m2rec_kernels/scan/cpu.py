"""Host side of the compiled CPU selective scan (``backend="cpu"``): loading the library built by set-up
(``cpu_build.py``), choosing its ISA variant, and the autograd Function.

The library is never compiled here. When it is missing, stale (built from other sources or for another
torch), failed to build, or cannot be loaded, ``cpu_scan_unavailable()`` gives the reason, and one
``RuntimeWarning`` says that the PyTorch reference runs instead; ``backend="auto"`` then uses the
reference and an explicit ``backend="cpu"`` raises.

Variant (``avx512``, ``avx2``, ``generic``): the best one that is built, that this CPU runs, and that
torch's CPU capability allows (``torch.backends.cpu.get_cpu_capability()``, which honours
``ATEN_CPU_CAPABILITY``, e.g. ``ATEN_CPU_CAPABILITY=default`` selects ``generic``).
Environment knobs: ``M2REC_CPU_SCAN=0`` turns the compiled scan off (no warning),
``M2REC_CPU_SCAN_ISA=avx512|avx2|generic`` forces a variant, ``M2REC_CPU_SCAN_LIB=DIR`` loads the
library from DIR instead of ``m2rec_kernels/scan/_cpu_lib``.

Numerics: state and sums in fp32 for fp32/fp16/bf16 inputs (converted to fp32 on the way in), outputs
in the inputs' dtypes. The kernels run with flush-to-zero: values below 2^-126 (1.2e-38) become 0.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

ISA_CODES = {"generic": 0, "avx2": 1, "avx512": 2}
# kernel modes (csrc/scan_api.h ForwardMode)
_MODE_OUT, _MODE_OUT_CKPT, _MODE_FINAL = 0, 1, 2
#: dtypes the compiled kernels take (state and sums in fp32); fp64 stays on the reference.
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class CpuScanStatus:
    isa: Optional[str]      # the variant in use, None when the compiled scan does not run
    reason: str             # why not (empty when it runs)
    library: str            # path of the library

    @property
    def available(self) -> bool:
        return self.isa is not None

    def describe(self) -> str:
        if self.available:
            return f"compiled CPU scan: {self.isa} variant ({self.library})"
        return f"compiled CPU scan not in use ({self.reason}); the selective scan runs the PyTorch reference on CPU"


_status: Optional[CpuScanStatus] = None


def _variant_for_capability(built) -> list:
    """The variants to try, best first, within torch's CPU capability."""
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    allowed = {"AVX512": ["avx512", "avx2", "generic"], "AVX2": ["avx2", "generic"]}.get(cap, ["generic"])
    return [v for v in allowed if v in built]


def _load() -> CpuScanStatus:
    from . import cpu_build  # not at import time: `python -m ...cpu_build` runs it as __main__

    path = cpu_build.lib_path()
    if os.environ.get("M2REC_CPU_SCAN", "1") in ("0", ""):
        return CpuScanStatus(None, "turned off by M2REC_CPU_SCAN=0", str(path))
    manifest = cpu_build.read_manifest()
    if manifest is None:
        return CpuScanStatus(None, f"not built: no {cpu_build.lib_dir() / 'manifest.json'} "
                                   "(run `python3 tasks.py setup` or `python -m m2rec_kernels.scan.cpu_build`)",
                             str(path))
    if manifest.get("status") != "ok":
        return CpuScanStatus(None, f"its build failed ({manifest.get('error', '?')[:300].strip()}; see "
                                   f"{cpu_build.lib_dir() / 'build.log'})", str(path))
    if manifest.get("key") != cpu_build.build_key():
        return CpuScanStatus(None, "the built library is stale (other sources or another torch); rerun "
                                   "`python3 tasks.py setup` or `python -m m2rec_kernels.scan.cpu_build`",
                             str(path))
    if not hasattr(torch.ops, "m2rec_scan_cpu") or not hasattr(torch.ops.m2rec_scan_cpu, "forward"):
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:
            return CpuScanStatus(None, f"cannot load {path}: {exc}", str(path))
    forced = os.environ.get("M2REC_CPU_SCAN_ISA", "").strip().lower()
    if forced:
        if forced not in ISA_CODES:
            return CpuScanStatus(None, f"M2REC_CPU_SCAN_ISA={forced!r} is not one of {sorted(ISA_CODES)}",
                                 str(path))
        candidates = [forced]
    else:
        candidates = _variant_for_capability(manifest.get("variants", []))
    for isa in candidates:
        if isa in manifest.get("variants", []) and torch.ops.m2rec_scan_cpu.isa_width(ISA_CODES[isa]) > 0:
            return CpuScanStatus(isa, "", str(path))
    return CpuScanStatus(None, f"no built variant runs on this CPU (tried {candidates})", str(path))


def cpu_scan_status() -> CpuScanStatus:
    """Load the library once (never compiles); the first failure warns once."""
    global _status
    if _status is None:
        from torch.utils._python_dispatch import _disable_current_modes

        # a first call while torch.export traces: loading is not part of the traced program
        with torch._C.DisableTorchFunction(), _disable_current_modes():
            _status = _load()
        if not _status.available and not _status.reason.startswith("turned off"):
            warnings.warn(f"m2rec_kernels: {_status.describe()}", RuntimeWarning, stacklevel=3)
    return _status


@torch.compiler.assume_constant_result  # loaded once per process: torch.compile takes the answer as given
def cpu_scan_unavailable() -> Optional[str]:
    """None when ``backend="cpu"`` can run the compiled scan here, else the reason."""
    st = cpu_scan_status()
    return None if st.available else st.reason


def library_op_unavailable(namespace: str, op: str, what: str) -> Optional[str]:
    """None when the loaded library holds ``torch.ops.<namespace>.<op>``, else why not (the library's
    own reason, or that it predates ``what``: a library built before a kernel was added)."""
    status = cpu_scan_status()
    if not status.available:
        return status.reason
    if not hasattr(getattr(torch.ops, namespace), op):
        return f"{status.library} has no {what} (rebuild: python -m m2rec_kernels.scan.cpu_build --force)"
    return None


def reset_cpu_scan_status() -> None:
    """Forget the load result (tests that simulate a missing build)."""
    global _status
    _status = None


def isa_available(isa: str) -> bool:
    """Whether variant ``isa`` is in the loaded library and runs on this CPU (tests run every one)."""
    if not cpu_scan_status().available:
        return False
    return torch.ops.m2rec_scan_cpu.isa_width(ISA_CODES[isa]) > 0


def _isa_code(isa: Optional[str]) -> int:
    return ISA_CODES[isa or cpu_scan_status().isa]


class SelectiveScanCpuFn(torch.autograd.Function):
    """Forward keeps the state at every chunk start (checkpoints) when a gradient is needed; backward
    recomputes each chunk from them (``csrc/scan_isa.cpp``)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, lengths, isa):
        needs_grad = any(ctx.needs_input_grad[:8])
        out, last, ckpt = torch.ops.m2rec_scan_cpu.forward(
            u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus,
            _MODE_OUT_CKPT if needs_grad else _MODE_OUT, return_last_state, isa)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, lengths, ckpt)
            ctx.delta_softplus, ctx.isa = delta_softplus, isa
        ctx.set_materialize_grads(False)
        return (out, last) if return_last_state else out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, lengths, ckpt = ctx.saved_tensors
        grads = torch.ops.m2rec_scan_cpu.backward(
            u, delta, A, B, C, D, z, delta_bias, lengths, ctx.delta_softplus, ckpt, dout, dlast, ctx.isa)
        present = (u, delta, A, B, C, D, z, delta_bias)
        du, ddelta, dA, dB, dC, dD, dz, dbias = (g if t is not None else None for g, t in zip(grads, present))
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None, None


def selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, lengths,
                       isa: Optional[str] = None):
    """The compiled scan (inputs already validated by the public op). ``isa`` overrides the variant."""
    return SelectiveScanCpuFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    lengths, _isa_code(isa))


def selective_scan_final_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths,
                             isa: Optional[str] = None):
    """(out at each sequence's last step (batch, dim), last state) without forming the other steps'
    outputs; with gradients it goes through the full scan."""
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        from .reference import last_positions

        out, last = selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, lengths, isa)
        idx = last_positions(lengths, u.shape[0], u.shape[2], u.device)
        return out[torch.arange(u.shape[0], device=u.device), :, idx], last
    out_last, last, _ = torch.ops.m2rec_scan_cpu.forward(
        u, delta, A, B, C, D, z, delta_bias, lengths, delta_softplus, _MODE_FINAL, True, _isa_code(isa))
    return out_last, last
