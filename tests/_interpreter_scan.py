"""A faster ``tl.associative_scan`` for the Triton interpreter, installed by ``conftest.py``.

The interpreter (triton/runtime/interpreter.py, ``ScanOps.generic_scan``) runs a scan with a
user-defined combine function one element at a time in Python: ~1e5 calls for one tile of the
time-parallel selective scan, ~20 s per test call. This version has the same semantics —
sequential along the scan axis, the combine function applied to (accumulated, next) in order —
but calls it once per position along the axis on whole numpy slices of the other dimensions.
Only the interpreter's speed changes; compiled kernels are unaffected. If the interpreter's
internals differ from what this expects (another Triton version), nothing is replaced.
"""
from __future__ import annotations

import numpy as np


def _slice_scan(self, input):
    axis = self.axis
    datas = [arg.handle.data for arg in input]
    outs = [np.empty_like(d) for d in datas]
    n = datas[0].shape[axis]
    if n == 0:
        return [self.to_tensor(o, input[i].dtype) for i, o in enumerate(outs)]

    def put(out, i, value):
        idx = [slice(None)] * out.ndim
        idx[axis] = i
        out[tuple(idx)] = value

    acc = [np.take(d, 0, axis=axis) for d in datas]
    for o, a in zip(outs, acc):
        put(o, 0, a)
    for i in range(1, n):
        prev = tuple(self.to_tensor(np.ascontiguousarray(a), input[k].dtype) for k, a in enumerate(acc))
        cur = tuple(self.to_tensor(np.ascontiguousarray(np.take(d, i, axis=axis)), input[k].dtype)
                    for k, d in enumerate(datas))
        ret = self.combine_fn.fn(*prev, *cur)
        ret = ret if isinstance(ret, tuple) else (ret,)
        acc = [r.handle.data if hasattr(r, "handle") else np.full(prev[k].handle.data.shape, r)
               for k, r in enumerate(ret)]
        for o, a in zip(outs, acc):
            put(o, i, a)
    return [self.to_tensor(o, input[i].dtype) for i, o in enumerate(outs)]


def install() -> bool:
    """Replace the interpreter's per-element generic scan; returns whether it did."""
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - depends on the triton build
        return False
    scan_ops = getattr(interpreter, "ScanOps", None)
    if scan_ops is None or not hasattr(scan_ops, "generic_scan") or not hasattr(scan_ops, "to_tensor"):
        return False
    scan_ops.generic_scan = _slice_scan
    return True
