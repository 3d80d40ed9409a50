"""The catalogue product of inference, hidden (batch, d) · E^T -> (batch, n_items + 1), on an item table
packed once into oneDNN's blocked layout (and repacked only when the table changes), instead of
``torch.matmul``, which reads the row-major table afresh on every call.

Why: it ends both ``scores()`` and the streaming ``step()``, and it is most of a step. At batch 64,
d 64, 3,707 items on one Zen 4 thread, ``torch.mm(h, E.t())`` took 0.37 ms and the packed product
0.30 ms (minima over 300 interleaved repeats; 0.33 -> 0.16 ms on two threads, where mm hardly
scales); at batch 3 63 -> 35 us, at 200 1.12 -> 0.88 ms. The pair of ops is the one Inductor's CPU
weight-prepacking pass puts into a frozen graph (torch/_inductor/fx_passes/mkldnn_fusion.py,
``_register_weight_pack_pass`` / ``pack_linear_weight``: ``mkldnn._reorder_linear_weight`` then
``mkldnn._linear_pointwise``); MKL's packed ``_mkl_linear`` measured no gain here. The table is packed
without a batch-size hint: a hint of 64 measured the same at every batch size.

These are private torch ops: their presence and a small trial product against ``torch.matmul`` are
checked once (``packed_product_unavailable``). Everything else keeps ``torch.matmul``: a gradient
needed (``scores()`` under autograd stays differentiable), dtypes other than fp32, CUDA, no oneDNN or
oneDNN switched off (``torch.backends.mkldnn.flags(enabled=False)``), an op missing or different in
this torch, a traced call (torch.compile / torch.export), a single row (a matrix-vector product, where
matmul measured faster: 26 against 33 us), hidden not 2-D, and a table that is an inference tensor
(it has no version counter to key the cache on).

Memory: the packed table is a second copy of E (n_items · d · 4 bytes), kept beside the model
(``m2rec.layers.derived``) until the table changes or the model is freed. It is packed at the first
call that can use it: packing costs 0.16 ms at 3,707 × 64 (more than one product gains, 0.07 ms), which
a loop that changes the table before every call (an optimiser step, then scores for a log line) pays
each time; packing only at a second use would avoid that, but then the first call after a change
(matmul) and the next (packed) would differ in the last bits for the same input.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn

from m2rec_kernels._checks import tracing

from ..layers.derived import derived


@functools.lru_cache(maxsize=None)
def packed_product_unavailable() -> Optional[str]:
    """None when the packed product can run in this torch build, else why not (checked once)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(torch.ops.mkldnn, name):
            return f"torch {torch.__version__} has no torch.ops.mkldnn.{name}"
    try:  # the ops' schemas are private and may change: a trial product settles it
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode(False), torch.no_grad():
            hidden, table = torch.randn(5, 7, generator=g), torch.randn(11, 7, generator=g)
            got = _packed_product(hidden, torch.ops.mkldnn._reorder_linear_weight(table))
            want = torch.matmul(hidden, table.t())
    except Exception as e:  # noqa: BLE001 - any failure means: use matmul
        return f"torch.ops.mkldnn's packed linear failed a trial call ({type(e).__name__}: {e})"
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        return "torch.ops.mkldnn's packed linear gave a different product than torch.matmul in a trial call"
    return None


def _packed_product(hidden: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(hidden, packed, None, "none", [], "")


def _packable(hidden: torch.Tensor, table: torch.Tensor) -> bool:
    # tracing first: torch.compile cannot trace is_inference() (a graph break, an error with fullgraph)
    return (not tracing() and hidden.dim() == 2 and hidden.shape[0] > 1 and hidden.dtype == torch.float32
            and table.dtype == torch.float32 and hidden.is_cpu and table.is_cpu
            and hidden.shape[1] == table.shape[1]
            and not (torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad))
            and not table.is_inference() and torch._C._get_mkldnn_enabled()  # (what mkldnn.flags sets)
            and packed_product_unavailable() is None)


def catalogue_product(owner: nn.Module, hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(hidden, table.t())``; for fp32 CPU rows without a gradient, the same product on
    the table packed for oneDNN, cached on ``owner`` until the table changes (see the module
    docstring)."""
    if _packable(hidden, table):
        packed = derived(owner, "packed_catalogue", (table,),
                         lambda: torch.ops.mkldnn._reorder_linear_weight(table.detach()))
        return _packed_product(hidden, packed)
    return torch.matmul(hidden, table.t())
