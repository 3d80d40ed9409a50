"""Registering the ops with ``torch.library`` under the ``m2rec`` namespace, so that ``torch.compile``
(``fullgraph=True``) and ``torch.export`` see each op as one node with a fake (meta) implementation and
an autograd formula, instead of breaking the graph at every kernel launch.

Every op is a ``torch.library.triton_op`` taking a ``backend`` string chosen in Python before the call
("torch", "cpu", "triton", ...; see each op's module). Its one implementation serves every device and
backend; what differs is how a tracer sees it:

* on CUDA with a Triton backend, ``torch.compile`` decomposes the op into its kernel launches (through
  ``wrap_triton``, see ``traceable_kernel``) so that Inductor sees the kernels themselves;
* everywhere else (the PyTorch references, the compiled CPU scan, the Triton interpreter) the op stays
  opaque, as a ``custom_op`` would: a compiled graph calls it as it is. ``M2REC_TRITON_DECOMPOSE=0``
  keeps the CUDA Triton ops opaque too.

``torch.export`` never decomposes: an exported program holds ``m2rec::*`` nodes.

The fake implementation is the op's own shape rule (``register``'s ``fake``), except for Triton
backends, whose host code runs on the fake tensors with every launch skipped (``traceable_kernel``),
so the output shapes of the host code are the fake's by construction.

Backward formulas are ops too (``*_backward``), so a compiled backward graph holds them as nodes.
Ops that mutate an input (``selective_state_update``) cannot have an autograd formula
(``torch.library`` refuses one for non-functional ops): their public functions run the
differentiable reference when a gradient is needed.

Sources that shaped this: the torch.library custom-ops tutorial ("Python custom operators",
pytorch.org/tutorials/advanced/python_custom_ops) and ``torch/_library/triton.py`` (how a triton_op
decomposes under ``FunctionalTensorMode``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Sequence

import torch

NAMESPACE = "m2rec"
TRITON_BACKENDS = ("triton", "triton_seq")


def _decompose_on_cuda() -> bool:
    return os.environ.get("M2REC_TRITON_DECOMPOSE", "1") not in ("", "0")


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


class traceable_kernel:
    """A Triton kernel launched as ``kernel[grid](*args)`` that tracing understands: with real tensors it
    launches the kernel (through ``wrap_triton``, which is the kernel itself outside tracing); inside a
    fake implementation (fake tensors) it launches nothing — the host code around it only needs the
    output shapes; under ``torch.compile`` on CUDA ``wrap_triton`` records the launch in the graph."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getattr__(self, name):  # the kernel's own attributes (fn, src, ...) stay reachable
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if any(_is_fake(a) for a in args):
                return None
            kernel = self.kernel
            if not _interpreted(kernel):
                from torch.library import wrap_triton

                kernel = wrap_triton(kernel)
            return kernel[grid](*args, **kwargs)

        return launch


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - depends on the triton version
        return False
    return isinstance(kernel, InterpretedFunction)


def register(name: str, impl: Callable, fake: Callable, mutates_args: Sequence[str] = (),
             backend_arg: str = "backend"):
    """Register ``impl`` (type-annotated: the schema is inferred from it) as ``m2rec::<name>``.

    ``fake(*args)`` gives the outputs' metadata for non-Triton backends; for Triton backends the fake
    runs ``impl`` itself on the fake tensors (launches skipped). Returns the op (``CustomOpDef``)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    qualname = f"{NAMESPACE}::{name}"
    op = torch.library.triton_op(qualname, impl, mutates_args=tuple(mutates_args))
    names = [a.name for a in op._opoverload._schema.arguments]
    where = names.index(backend_arg)

    def is_triton(args) -> bool:
        return args[where] in TRITON_BACKENDS

    def fake_impl(*args):
        return impl(*args) if is_triton(args) else fake(*args)

    op.register_fake(fake_impl)

    triton_decomposition = getattr(op, "_torch_dispatch_fns", {}).get(FunctionalTensorMode)

    def functional_rule(mode, func, types, args, kwargs):
        on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        if triton_decomposition is not None and on_cuda and is_triton(args) and _decompose_on_cuda():
            return triton_decomposition(mode, func, types, args, kwargs)
        return mode.__torch_dispatch__(func, types, args, kwargs)  # opaque: the op stays one node

    op.register_torch_dispatch(FunctionalTensorMode, functional_rule)
    # CPU tensors go straight to ``impl``: a kernel at the CPU dispatch key, as a C++ op's would be,
    # without the wrappers of the default kernel (the output-aliasing check, which opcheck does in the
    # tests, dynamo's disable guard — a compiled graph calls an op, it never traces its kernel — and the
    # Triton wrapping switch, which CPU tensors never need): ~8 µs less per eager call.
    torch.library.impl(qualname, "cpu", impl)
    _CPU_KERNELS[getattr(getattr(torch.ops, NAMESPACE), name).default] = impl
    return op


#: each op's CPU kernel, for ``call``'s direct path
_CPU_KERNELS: dict = {}


_is_compiling = torch.compiler.is_compiling


def call(op, *args, mutates: Optional[torch.Tensor] = None):
    """Call a registered op from a public function (``mutates``: the tensor a mutating op updates).

    Through the dispatcher whenever anything could see the call: torch.compile or torch.export tracing
    it, autograd recording it, a dispatch or function mode, functorch transforms, tensor subclasses
    (fake tensors among them). Otherwise — plain eager calls on plain CPU tensors without gradients,
    the serving case — the op's CPU kernel runs directly: the same function the dispatcher would run,
    without its ~7-20 µs of Python-kernel dispatch per call (measured at batch 1: 15-30% of an op). On
    CUDA the op is always dispatched (its default kernel switches Triton's tracing wrapper off)."""
    if _is_compiling() or (torch.is_grad_enabled() and _any_requires_grad(args)):
        return op(*args)
    kernel = _CPU_KERNELS.get(op)
    if kernel is not None and _plain_cpu_call(args):
        out = kernel(*args)
    elif mutates is None:
        with torch._C._AutoDispatchBelowAutograd():  # skips the op's autograd kernel (~9 µs)
            return op(*args)
    else:
        # skips the layer that bumps the version counter (~40 µs: it fills the schema's defaults first)
        with torch._C._AutoDispatchBelowADInplaceOrView():
            out = op(*args)
    if mutates is not None:
        torch.autograd.graph.increment_version(mutates)
    return out


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_cpu_call(args) -> bool:
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return False
    first = None
    for a in args:
        kind = type(a)
        if kind in _PLAIN_TENSOR_TYPES:
            if first is None:
                first = a
        elif kind is list:
            if any(type(t) not in _PLAIN_TENSOR_TYPES for t in a):
                return False
        elif isinstance(a, torch.Tensor):  # a subclass: fake, functional, ...
            return False
    return first is not None and first.device.type == "cpu"


def _any_requires_grad(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and _any_requires_grad(a):
            return True
    return False


def needs_grad(*tensors) -> bool:
    """Whether autograd will record a call on these tensors (lists allowed)."""
    return torch.is_grad_enabled() and _any_requires_grad(tensors)


def empty_like_none(t: torch.Tensor) -> torch.Tensor:
    """The placeholder an op returns for an absent output: an empty tensor (ops cannot return None)."""
    return t.new_empty(0)


def or_none(t: Optional[torch.Tensor], present) -> Optional[torch.Tensor]:
    """An op's placeholder output back to None where the corresponding input was absent."""
    return None if present is None else t


# Keys an op's kernel may find excluded: autograd (always, below the Autograd key), and — when a graph
# compiled by AOTAutograd calls the op — also the lazy conjugate / negative / zero-tensor views, which
# then silently read as plain tensors (x.conj() would be x). Autograd's complex formulas rely on them.
_AUTOGRAD_KEYS = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView",
                  "Conjugate", "Negative", "ZeroTensor")


@contextlib.contextmanager
def autograd_inside_kernel():
    """Autograd recording inside an op's implementation, where the dispatcher has switched it off (and,
    inside a compiled graph, the lazy conjugate views autograd's complex formulas use, see above).

    The PyTorch backends' backward ops recompute the reference under autograd (the references are the
    differentiable spec; some are autograd.Functions of their own, which ``torch.func.vjp`` cannot
    transform). Outside a kernel this is just ``torch.enable_grad()``."""
    with contextlib.ExitStack() as stack:
        for key in _AUTOGRAD_KEYS:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(getattr(torch._C.DispatchKey, key), False))
        stack.enter_context(torch.enable_grad())
        yield


def reference_vjp(fn: Callable, inputs: Sequence[Optional[torch.Tensor]], wanted: Sequence[bool],
                  grads: Sequence[Optional[torch.Tensor]]):
    """Gradients of ``fn(*inputs)`` (a tensor or a tuple of them) w.r.t. the inputs marked in ``wanted``,
    for the output gradients ``grads`` (None: no gradient reaches that output). Returns one entry per
    input: its gradient (zeros if it does not reach it), or None where not wanted or absent."""
    with autograd_inside_kernel():
        leaves = [t.detach().requires_grad_(w) if t is not None and w else
                  (None if t is None else t.detach()) for t, w in zip(inputs, wanted)]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        diff = [t for t in leaves if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], diff, [g for _, g in pairs], allow_unused=True)
                     if pairs and diff else [None] * len(diff))
    result = []
    for t in leaves:
        if t is not None and t.requires_grad:
            g = next(found)
            result.append(torch.zeros_like(t) if g is None else g)
        else:
            result.append(None)
    return result
