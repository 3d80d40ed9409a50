"""Importing the real ``mamba_ssm`` where its CUDA extension is missing (DESIGN §8), and a
``mamba_ssm.Mamba`` that shares a ``MambaMixer``'s parameters.

mamba-ssm installs on a CPU-only torch (built without CUDA extensions), but ``import mamba_ssm`` then
fails on ``import selective_scan_cuda``. For cross-checks we register an empty placeholder for that
module and, when there is no CUDA scan, point the module-level ``selective_scan_fn`` that
``mamba_ssm.Mamba`` calls at mamba_ssm's own PyTorch ``selective_scan_ref``. Nothing else in the
package depends on this module: it is used by tests (cross-checks) and by the benchmark's baseline.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Optional, Tuple

import torch

_cache: Optional[Tuple[Optional[types.ModuleType], str]] = None


def _has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def import_mamba_ssm() -> Tuple[Optional[types.ModuleType], str]:
    """Return ``(mamba_ssm, how)``; ``mamba_ssm`` is None when it cannot be imported, and ``how`` then
    says why. ``how`` is "cuda" when the real CUDA scan is present, "reference-scan" when the shim
    routes the scan to ``selective_scan_ref``."""
    global _cache
    if _cache is not None:
        return _cache
    try:
        importlib.import_module("einops")
    except Exception as exc:
        _cache = (None, f"einops is not installed ({exc})")
        return _cache
    has_cuda_scan = _has_module("selective_scan_cuda")
    if not has_cuda_scan:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")  # placeholder
    try:
        mamba_ssm = importlib.import_module("mamba_ssm")
        ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
    except Exception as exc:
        if not has_cuda_scan:
            sys.modules.pop("selective_scan_cuda", None)
        _cache = (None, f"mamba_ssm is not importable ({type(exc).__name__}: {exc})")
        return _cache
    if not has_cuda_scan:
        simple.selective_scan_fn = ssi.selective_scan_ref
        _cache = (mamba_ssm, "reference-scan")
    else:
        _cache = (mamba_ssm, "cuda")
    return _cache


def selective_scan_ref():
    """mamba_ssm's own PyTorch reference scan, or None when mamba_ssm is not importable."""
    mamba_ssm, _ = import_mamba_ssm()
    if mamba_ssm is None:
        return None
    return importlib.import_module("mamba_ssm.ops.selective_scan_interface").selective_scan_ref


def tie_mamba_ssm(mixer: torch.nn.Module, twin: Optional[torch.nn.Module] = None, **kwargs) -> torch.nn.Module:
    """A ``mamba_ssm.Mamba`` computing with ``mixer``'s (a ``MambaMixer``'s) own Parameter objects.

    ``twin`` is a previous result to re-tie (a model conversion such as ``.to()`` may have replaced the
    mixer's Parameters); ``kwargs`` go to ``mamba_ssm.Mamba`` (e.g. ``use_fast_path=False``). The twin
    is returned, never registered as a submodule: its parameters are the mixer's."""
    mamba_ssm, how = import_mamba_ssm()
    if mamba_ssm is None:
        raise RuntimeError(f"mamba_ssm is not importable: {how}")
    if twin is None:
        with torch.random.fork_rng(devices=[]):  # its own random init is discarded: keep the RNG stream
            twin = mamba_ssm.Mamba(mixer.d_model, d_state=mixer.d_state, d_conv=mixer.d_conv, expand=mixer.expand,
                                   dt_rank=mixer.dt_rank, **kwargs)
    for name, p in mixer.named_parameters():
        owner, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(owner) if owner else twin, attr, p)
    return twin
