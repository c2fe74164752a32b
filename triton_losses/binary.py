"""``binary_cross_entropy`` and ``binary_cross_entropy_with_logits``: validation, autograd, reduction.

Autograd: :class:`BinaryCrossEntropyFunction` takes ``(input, target, weight, pos_weight)`` and
returns the gradients torch gives: w.r.t. ``input`` and w.r.t. ``target`` (both computed by one
backward launch that reads the operands once and writes only the gradients asked for through
``ctx.needs_input_grad``). ``weight`` and ``pos_weight`` are not differentiable in torch either: a
call where one requires grad is handed to torch, which raises its own error. The backward is
``once_differentiable`` (no double backward).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _dispatch
from ._checks import FLOAT_DTYPES, TorchAccepted, compiling, raise_like_torch, reduction_string
from ._pointwise import (
    autocast_fp32,
    broadcasts_to,
    expand_or_none,
    finish_reduction,
    implementation,
    same_float_dtype,
    upstream,
)

__all__ = ["BinaryCrossEntropyFunction", "binary_cross_entropy", "binary_cross_entropy_with_logits"]


class BinaryCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of one BCE (``logits=False``) or BCE-with-logits (``logits=True``) call.

    The forward returns the loss in the input's dtype: 0-d for 'mean' / 'sum', the input's shape
    for 'none'. ``weight`` / ``pos_weight`` are saved unexpanded and broadcast as stride-0 views.
    """

    @staticmethod
    def forward(ctx, x, y, weight, pos_weight, logits: bool, backend: str, reduction: str):
        impl = implementation(backend, "binary")
        shape = x.shape
        w, pw = expand_or_none(weight, shape), expand_or_none(pos_weight, shape)
        if reduction == "none":
            out = impl.bce_fwd(x, y, w, pw, logits, False)
        else:
            out = finish_reduction(impl.bce_fwd(x, y, w, pw, logits, True), reduction, x.numel(), x.dtype)
        ctx.save_for_backward(x, y, weight, pos_weight)
        ctx.logits, ctx.backend, ctx.reduction = logits, backend, reduction
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, y, weight, pos_weight = ctx.saved_tensors
        impl = implementation(ctx.backend, "binary")
        shape = x.shape
        g = upstream(gout, ctx.reduction, x.numel(), shape)
        w, pw = expand_or_none(weight, shape), expand_or_none(pos_weight, shape)
        dx, dy = impl.bce_bwd(x, y, w, pw, ctx.logits, g, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dy, None, None, None, None, None


def _unsupported(input, target, weight, pos_weight) -> bool:
    """True when the call is not one the kernels model (torch then raises or answers)."""
    tensors = [t for t in (input, target, weight, pos_weight) if t is not None]
    if not same_float_dtype(tensors, FLOAT_DTYPES) or any(t.device != input.device for t in tensors):
        return True
    if target.shape != input.shape:
        return True
    for extra in (weight, pos_weight):
        if extra is not None:
            if extra.requires_grad and torch.is_grad_enabled():
                return True
            if not broadcasts_to(extra, input.shape):
                return True
    return False


def _check_probabilities(input: torch.Tensor, target: torch.Tensor) -> None:
    """torch's CPU range checks, in its order: the first bad element decides which message.

    Needs a host sync, so it runs in eager mode only (skipped under ``torch.compile`` and CUDA
    graph capture); on CUDA ``TRITON_LOSSES_CHECK_TARGETS=0`` switches it off, as for the
    cross-entropy target check.
    """
    if input.numel() == 0 or compiling():
        return
    if input.is_cuda and os.environ.get("TRITON_LOSSES_CHECK_TARGETS", "1") == "0":
        return
    in_range = [(lo >= 0) & (hi <= 1) for lo, hi in (torch.aminmax(input), torch.aminmax(target))]  # NaN: False
    if bool(in_range[0] & in_range[1]):  # the one sync of a valid call
        return
    bad_x = ~((input >= 0) & (input <= 1)).reshape(-1)
    bad = bad_x | ~((target >= 0) & (target <= 1)).reshape(-1)
    first = int(bad.int().argmax())
    which = "input" if bool(bad_x[first]) else "target"
    raise RuntimeError(f"all elements of {which} should be between 0 and 1")


def _run(op: str, torch_fn, torch_args: tuple, x, y, weight, pos_weight, logits: bool, reduction: str, refused=False):
    """Validate, dispatch and run one call; ``refused``: torch is known to reject it (it raises)."""
    if refused or _unsupported(x, y, weight, pos_weight):
        try:
            raise_like_torch(torch_fn, *torch_args)
        except TorchAccepted as accepted:
            _dispatch.backend(x, op=op, unsupported="this combination of arguments")
            return accepted.result
    if not logits:
        _check_probabilities(x, y)
    backend = _dispatch.backend(x, y, weight, pos_weight, op=op)
    return BinaryCrossEntropyFunction.apply(x, y, weight, pos_weight, logits, backend, reduction)


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy on logits, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Per element, with ``lw = (pos_weight - 1) * target + 1`` (1 without ``pos_weight``)::

        loss = weight * ((1 - target) * input - lw * logsigmoid(input))

    where ``logsigmoid(x) = min(x, 0) - log1p(exp(-|x|))``: finite for any finite logit (100 for
    logits of +-100 against the opposite label, finite at -120 with ``pos_weight``). As in torch,
    ``+inf`` with target 1 and ``-inf`` give NaN.

    Args:
        input: logits, any shape, floating dtype.
        target: probabilities (any real values are accepted), ``input``'s shape and dtype.
        weight: rescales each element; broadcastable to ``input``'s shape, or None.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (``input``'s shape) | ``'mean'`` (sum / numel) | ``'sum'``.
        pos_weight: weight of positive targets, broadcastable to ``input``'s shape (typically
            ``(C,)`` for the last dimension), or None.

    Returns:
        The loss in ``input``'s dtype (fp32 inside an autocast region), differentiable w.r.t.
        ``input`` and ``target``.
    """
    reduction = reduction_string(size_average, reduce, reduction)
    input, target, weight, pos_weight = autocast_fp32(input, target, weight, pos_weight)
    torch_args = (input, target, weight, None, None, reduction, pos_weight)
    return _run(
        "binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits, torch_args,
        input, target, weight, pos_weight, True, reduction,
    )  # fmt: skip


def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary cross-entropy on probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    Per element: ``loss = weight * ((target - 1) * max(log(1 - input), -100) - target * max(log(input), -100))``
    (the log clamp makes ``input`` 0 or 1 give 100, not inf). The input gradient divides by
    ``max((1 - input) * input, 1e-12)`` (1e-12 rounded to fp32, as torch), so it is about +-1e12 at 0 and 1.

    An input (or target) outside ``[0, 1]`` or NaN raises torch's CPU error ``all elements of
    input should be between 0 and 1`` before any kernel runs; that check syncs with the device,
    so it runs in eager mode only. Inside a CUDA autocast region torch refuses this loss, and so
    does this function (with torch's error).

    Args:
        input: probabilities in ``[0, 1]``, any shape, floating dtype.
        target: probabilities in ``[0, 1]``, ``input``'s shape and dtype.
        weight: rescales each element; broadcastable to ``input``'s shape, or None.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (``input``'s shape) | ``'mean'`` (sum / numel) | ``'sum'``.

    Returns:
        The loss in ``input``'s dtype, differentiable w.r.t. ``input`` and ``target``.
    """
    reduction = reduction_string(size_average, reduce, reduction)
    refused = input.is_cuda and torch.is_autocast_enabled("cuda")  # torch: "... unsafe to autocast"
    if not refused:
        input, target, weight = autocast_fp32(input, target, weight)
    torch_args = (input, target, weight, None, None, reduction)
    return _run(
        "binary_cross_entropy", F.binary_cross_entropy, torch_args,
        input, target, weight, None, False, reduction, refused,
    )  # fmt: skip
