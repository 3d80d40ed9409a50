"""Tensors derived from a module's parameters (A = -exp(A_log), a normalised catalogue table, ...),
computed once and reused until one of their source tensors changes — the streaming step's per-call
recomputation of them cost ~15% of a step (DESIGN §10, "Streaming").

A cached value is valid while every source is the same tensor object, with the same storage, dtype
and device, and the same version counter (``_version``: bumped by every in-place change — an
optimiser step, ``load_state_dict``'s copy, ``p.add_`` under ``no_grad``). A change made through
``p.data`` bypasses the version counter and is not seen; assign or copy into the parameter instead.

The cache lives beside the module (a weak-keyed table), not in it: it is never saved, copied with
``deepcopy`` or moved by ``.to()``. Values are built without autograd and outside inference mode, so
they serve ``no_grad`` and ``inference_mode`` callers alike.
"""
from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

T = TypeVar("T")

_CACHES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _signature(sources: Sequence[torch.Tensor]):
    # the sources themselves are kept in the entry, so an id is never reused while it is compared
    # (a list comprehension: a generator into tuple() cost 5.5 against 3.3 us for 11 sources)
    return [(id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources]


def derived(module: nn.Module, name: str, sources: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
    """``build()``, cached on ``module`` under ``name`` until a tensor in ``sources`` changes."""
    try:
        key = _signature(sources)
    except RuntimeError:  # an inference tensor has no version counter: nothing to key on
        with torch.inference_mode(False), torch.no_grad():
            return build()
    entries = _CACHES.get(module)
    if entries is None:
        entries = _CACHES[module] = {}
    hit = entries.get(name)
    if hit is not None and hit[0] == key:
        return hit[2]
    with torch.inference_mode(False), torch.no_grad():
        value = build()
    entries[name] = (key, tuple(sources), value)
    return value


TensorPaths = Tuple[Tuple[Tuple[str, ...], str], ...]


def tensor_paths(*paths: str) -> TensorPaths:
    """Dotted names of parameters or buffers below a module ("conv1d.weight"), split once for
    ``module_tensors``."""
    split = [p.split(".") for p in paths]
    return tuple((tuple(parts[:-1]), parts[-1]) for parts in split)


def module_tensors(module: nn.Module, paths: TensorPaths) -> List[Optional[torch.Tensor]]:
    """The parameters (or buffers) at ``paths`` (``tensor_paths``) below ``module``, as ``getattr``
    gives them, read from the modules' own tables: nn.Module's ``__getattr__`` is a Python fallback,
    ~0.6 us a level (11 us for a streaming step's 11 MambaMixer tensors, 1.7 us this way). Anything
    else (a buffer, a property, a parametrization) goes through ``getattr``."""
    out = []
    for mods, name in paths:
        m = module
        try:
            for sub in mods:
                m = m._modules[sub]
            params = m._parameters
            out.append(params[name] if name in params else _getattr_path(module, mods, name))
        except KeyError:  # a level that is not a registered submodule
            out.append(_getattr_path(module, mods, name))
    return out


def _getattr_path(module, mods: Tuple[str, ...], name: str):
    for sub in mods:
        module = getattr(module, sub)
    return getattr(module, name)


def forget_derived(module: nn.Module) -> None:
    """Drop every value cached for ``module`` (tests; never needed for correctness)."""
    _CACHES.pop(module, None)
