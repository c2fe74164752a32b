"""Input checks that give torch's exceptions, and the row view every row-wise op works on.

Structural checks (shapes, dtypes, devices, option ranges) are plain Python on tensor metadata.
When one fails, the call is handed to torch's own function on the same arguments, so the user
gets exactly torch's exception type and message (and nothing is launched); if torch accepts a
call our kernels do not model, ``auto`` mode returns torch's result and ``triton`` mode raises.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch.nn import _reduction

from . import _dispatch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def warn(message: str, stacklevel: int) -> None:
    """``warnings.warn`` from the frame ``stacklevel`` above the caller; nothing while dynamo traces.

    Dynamo cannot trace ``warnings.warn`` (``fullgraph=True`` would fail where torch's own losses
    compile: dynamo runs those as single in-graph ops, warning at trace time). So a compiled call
    gives its values without torch's deprecation or broadcast warning; the eager call gives it.
    """
    if not torch.compiler.is_compiling():
        warnings.warn(message, stacklevel=stacklevel + 1)


def legacy_reduction(size_average, reduce, emit_warning: bool = True) -> str:
    """torch's ``_Reduction.legacy_get_string``: the reduction the legacy arguments ask for, and its warning.

    Our own copy of its rule: dynamo traces this one (torch's returns a string from a torch function).
    """
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "mean" if size_average and reduce else "sum" if reduce else "none"
    if emit_warning:
        warn(f"size_average and reduce args will be deprecated, please use reduction='{reduction}' instead.", 2)
    return reduction


def plain(numbers=(), bools=()) -> bool:
    """True when each option is what torch's schema takes as it is: a Python number (``bool`` among
    them) for a float / Scalar, a Python ``bool`` for a bool. Anything else (a string, None, a numpy
    scalar, a tensor) goes to torch's function: its ``TypeError``, or its result where it accepts one.
    """
    return all(type(v) in (int, float, bool) for v in numbers) and all(type(v) is bool for v in bools)


def reduction_string(size_average, reduce, reduction: str) -> str:
    """torch's mapping of the legacy ``size_average`` / ``reduce`` (with its warning) and its check."""
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    _reduction.get_enum(reduction)  # ValueError: "<x> is not a valid value for reduction"
    return reduction


class TorchAccepted(Exception):
    """torch accepted a call our checks rejected; ``result`` is torch's answer."""

    def __init__(self, result):
        super().__init__("torch accepted the call")
        self.result = result


def raise_like_torch(torch_fn: Callable, *args, **kwargs):
    """Run torch's function so it raises its own error; if it does not, raise ``TorchAccepted``."""
    result = torch_fn(*args, **kwargs)
    raise TorchAccepted(result)


def compiling() -> bool:
    """True while dynamo traces or a CUDA graph is being captured (no data-dependent checks then)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def assert_target_range_traced(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """While dynamo traces a CPU call, put the target-range check into the graph (``_assert_async``).

    The compiled graph then raises ``RuntimeError: Target is out of bounds.`` when it runs, as torch's
    compiled loss does, where the eager check cannot run (no host read while tracing). Keyed on dynamo
    itself, not on ``_dispatch.tracing``: the interpreter tier patches that one to reach the kernels'
    device asserts. CUDA tensors rely on the kernels' device assert instead.
    """
    if target.numel() and target.device.type == "cpu" and _dispatch.compiling():
        t = target.long()
        torch._assert_async(~((t != ignore_index) & ((t < 0) | (t >= n_classes))).any(), "Target is out of bounds.")


def check_target_range(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise torch's ``IndexError: Target 5 is out of bounds.`` for the first bad index target.

    Needs a host sync, so it runs only where :func:`eager_checks` allows it: always for CPU
    tensors, for CUDA tensors only with ``TRITON_LOSSES_CHECK_TARGETS=1`` (by default a bad target
    trips the kernels' device assert instead). CPU tensors under ``torch.compile`` (no host read while
    tracing): a ``RuntimeError`` when the compiled graph runs, as torch's compiled loss raises one.
    """
    assert_target_range_traced(target, n_classes, ignore_index)
    if target.numel() == 0 or not eager_checks(target.device):
        return
    t = target.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, but ``t`` itself when it already has that dtype.

    Autograd Functions build their outputs with this: under ``torch.compile``, torch 2.11's dynamo
    gives an output made by a no-op ``.to()`` of another traced value a zero upstream gradient
    (seen on the CPU with torch 2.11.0; torch 2.13 is not affected).
    """
    return t if t.dtype == dtype else t.to(dtype)


def as_3d(x: torch.Tensor, dim: int) -> torch.Tensor:
    """View ``x`` as ``(A, C, B)`` with ``C = x.shape[dim]``; copies only if no such view exists."""
    shape = x.shape
    A = 1
    for s in shape[:dim]:
        A *= s
    B = 1
    for s in shape[dim + 1 :]:
        B *= s
    C = shape[dim] if x.dim() else 1
    if dim == x.dim() - 1 or x.dim() == 0:
        if x.dim() <= 1:
            return x.reshape(1, C, 1)
        try:
            return x.view(A, C).unsqueeze(-1)
        except RuntimeError:
            return x.reshape(A, C, 1)
    try:
        return x.view(A, C, B)
    except RuntimeError:
        return x.reshape(A, C, B)


def ce_views(input: torch.Tensor, target: torch.Tensor, prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(A, C, B)`` logits and ``(A, B)`` index (``(A, C, B)`` probability) targets of a
    cross-entropy call, classes at dim 1 (dim 0 unbatched).

    A 2-D input whose rows are neighbours in memory and whose classes are strided (a transposed
    ``(C, N)`` buffer: strides ``(1, N)``) is viewed as ``(1, C, N)``, the K-dimensional layout: the
    kernels then tile across rows, so each load reads neighbouring rows of one class (coalesced)
    instead of one row's classes ``N`` elements apart. The rows and their order are the same, and so
    is the gradient's layout (the input's).
    """
    cdim = 1 if input.dim() >= 2 else 0
    x = as_3d(input, cdim)
    t = as_3d(target, cdim) if prob else None
    A, C, B = x.shape
    if B == 1 and A > 1 and C > 1 and x.stride(0) == 1 and x.stride(1) != 1:
        x = x.permute(2, 1, 0)
        t = t.permute(2, 1, 0) if prob else None
    return x, (t if prob else target.reshape(x.shape[0], x.shape[2]))


# ---- shared by the elementwise losses (bce, kl_div) --------------------------------------------

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def eager_checks(device: torch.device) -> bool:
    """Whether value checks that read data back to the host (torch's CPU errors) run for ``device``.

    CPU tensors: always (torch's CPU kernels raise), except while tracing (``torch.compile`` /
    graph capture), where nothing data-dependent may run on the host. CUDA tensors: only when
    ``TRITON_LOSSES_CHECK_TARGETS=1`` (the opt-in); by default the kernels assert on the device,
    as torch's CUDA kernels do.
    """
    if _dispatch.tracing():
        return False
    if torch.device(device).type == "cpu":
        return True
    return os.environ.get("TRITON_LOSSES_CHECK_TARGETS", "0") == "1"


def all_tensors(*args) -> bool:
    """Every argument is a tensor or None (anything else is left to torch, which raises its own error)."""
    return all(a is None or isinstance(a, torch.Tensor) for a in args)


def autocast_fp32(*tensors: torch.Tensor | None) -> tuple:
    """torch's autocast 'fp32' policy: inside an autocast region of the tensors' device, fp16 / bf16 -> fp32.

    BCE-with-logits and KL are on torch's fp32 list on every device; BCE is on it for the CPU (on
    CUDA torch refuses it instead: see :func:`autocast_refuses_bce`). fp64 and other tensors are
    left as they are; outside an autocast region nothing changes.
    """
    first = next(t for t in tensors if t is not None)
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    return tuple(t.float() if t is not None and t.dtype in _LOW_PRECISION else t for t in tensors)


def autocast_composite(*tensors: torch.Tensor | None) -> bool:
    """True where torch's function is a composite that autocast meets op by op with 16-bit operands.

    Its value then carries each op's 16-bit rounding (gaussian_nll, multilabel_soft_margin,
    triplet_margin_with_distance): those calls are torch's own, for the same values.
    """
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts or not torch.is_autocast_enabled(ts[0].device.type):
        return False
    return any(t.dtype in _LOW_PRECISION for t in ts)


def autocast_linear(input, weight, bias) -> tuple:
    """``(input, weight, bias, in_region)`` as ``linear`` meets them in an autocast region of ``input``'s
    device: floating operands (fp64 aside) in the region's dtype; unchanged outside one. A loss of the
    16-bit logits then follows ``cross_entropy``'s policy (fp32: ``in_region``)."""
    if not isinstance(input, torch.Tensor) or not torch.is_autocast_enabled(input.device.type):
        return input, weight, bias, False
    low = torch.get_autocast_dtype(input.device.type)

    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype not in (torch.float64, low):
            return v.to(low)
        return v

    return cast(input), cast(weight), cast(bias), True


def autocast_refuses_bce(input: torch.Tensor) -> bool:
    """torch bans ``binary_cross_entropy`` under CUDA autocast (its "unsafe to autocast" error)."""
    return input.is_cuda and torch.is_autocast_enabled("cuda")


def same_float_dtype(tensors, dtypes=FLOAT_DTYPES) -> bool:
    """All tensors share one dtype among ``dtypes``."""
    first = tensors[0].dtype
    return first in dtypes and all(t.dtype == first for t in tensors)


def broadcasts_to(t: torch.Tensor, shape: torch.Size) -> bool:
    """``t`` broadcasts to ``shape`` without enlarging it (what an in-place ``mul_`` accepts)."""
    try:
        return torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        return False
