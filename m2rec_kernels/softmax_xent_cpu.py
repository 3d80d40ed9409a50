"""Host side of the compiled row-wise softmax cross-entropy on CPU (``torch.ops.m2rec_scan_cpu.softmax_xent_rows``,
``scan/csrc/softmax_xent_ops.cpp`` and ``softmax_xent_isa.cpp``): the per-chunk work of the training loss
(``m2rec/models/catalogue_loss.py``).

For fp32 logits (rows, classes) with unit stride along classes and targets (rows,) in [0, classes), one
pass per row gives the loss ``logsumexp(row) - row[target]`` (float64) and, when asked, overwrites the
row with ``softmax(row) - onehot(target)``, the loss's gradient w.r.t. the row; ATen's form of the same
(log_softmax, gather, exp_, scatter_add_) takes five passes. The kernel lives in the compiled scan's
library (built by set-up) and uses its ISA variant and knobs (``m2rec_kernels.scan.cpu``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .scan.cpu import _isa_code, library_op_unavailable


@torch.compiler.assume_constant_result  # loaded once per process: torch.compile takes the answer as given
def cpu_xent_unavailable() -> Optional[str]:
    """None when the compiled softmax cross-entropy can run here, else the reason."""
    return library_op_unavailable("m2rec_scan_cpu", "softmax_xent_rows", "softmax cross-entropy kernel")


def softmax_xent_rows_(logits: torch.Tensor, targets: torch.Tensor, grad: bool,
                       isa: Optional[str] = None) -> torch.Tensor:
    """Per-row losses (rows,) in float64; with ``grad``, ``logits`` becomes softmax - onehot in place.
    The kernel checks the arguments (fp32 CPU logits with unit stride along classes, integer targets in
    range). ``isa`` overrides the variant (tests)."""
    return torch.ops.m2rec_scan_cpu.softmax_xent_rows(logits, targets, grad, _isa_code(isa))
