"""``kl_div``: torch's Kullback-Leibler divergence: checks, autograd, reduction, and ``nn.KLDivLoss``.

Autograd: :class:`KLDivFunction` gives the gradients torch's composite ``kl_div`` gives, w.r.t.
both ``input`` and ``target`` (one backward launch writes whichever ``ctx.needs_input_grad`` asks
for). A broadcast operand's gradient is computed at the broadcast shape and summed back to the
operand's shape, as autograd does for torch. Under ``create_graph=True`` the backward builds the
same gradients from differentiable torch ops (second derivatives, as torch supports them).
"""

from __future__ import annotations

import torch
from torch import nn as _nn
from torch.nn import _reduction

from . import _dispatch
from ._checks import (
    TorchAccepted,
    all_tensors,
    autocast_fp32,
    legacy_reduction,
    raise_like_torch,
    same_float_dtype,
    warn,
)
from ._precision import acc_dtype
from ._reduce import cast, elementwise_upstream

__all__ = ["KLDivFunction", "KLDivLoss", "kl_div"]

_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def _graph_grads(x, y, log_target: bool, g, need: tuple[bool, bool]):
    """``(dx, dy)`` at the broadcast shape from differentiable torch ops (double backward), in fp32 (fp64)."""
    acc = acc_dtype(x.dtype)
    xa, ya, ga = x.to(acc), y.to(acc), g.to(acc)
    if log_target:
        ge = ga * torch.exp(ya)
        dx, dy = -ge, ge * (ya - xa) + ge
    else:  # d xlogy(y, y) / dy = log y (0 at y = 0) + y / y, as torch's autograd of its composite
        dx = -(ga * ya)
        dy = ga * (torch.where(ya == 0, torch.zeros_like(ya), torch.log(ya)) + ya / ya) - ga * xa
    return (cast(dx, x.dtype) if need[0] else None), (cast(dy, y.dtype) if need[1] else None)


class KLDivFunction(torch.autograd.Function):
    """Autograd wrapper of one elementwise ``kl_div`` call; ``denom`` divides the reduced loss."""

    @staticmethod
    def forward(ctx, x, y, log_target: bool, reduction: str, denom: int):
        eng = _dispatch.engine("kl_div", x, y, op="kl_div")
        shape = torch.broadcast_shapes(x.shape, y.shape)
        xe, ye = x.expand(shape), y.expand(shape)
        if reduction == "none":
            out = eng.kl_fwd(xe, ye, log_target, False, 1)
        else:
            total = eng.kl_fwd(xe, ye, log_target, True, max(denom, 1)).sum()
            out = cast(total / 0 if denom == 0 else total, x.dtype)  # 0 / 0: NaN, as torch's mean of nothing
        ctx.save_for_backward(x, y)
        ctx.log_target, ctx.reduction, ctx.denom = log_target, reduction, denom
        return out

    @staticmethod
    def backward(ctx, gout):
        x, y = ctx.saved_tensors
        shape = torch.broadcast_shapes(x.shape, y.shape)
        mode = "none" if ctx.reduction == "none" else ("sum" if ctx.denom == 1 else "mean")
        g = elementwise_upstream(gout, mode, ctx.denom, shape)  # 'mean' divides by denom
        need = tuple(ctx.needs_input_grad[:2])
        if torch.is_grad_enabled():  # create_graph=True
            dx, dy = _graph_grads(x.expand(shape), y.expand(shape), ctx.log_target, g, need)
        else:
            eng = _dispatch.engine("kl_div", x, y, op="kl_div")
            dx, dy = eng.kl_bwd(x.expand(shape), y.expand(shape), ctx.log_target, g, *need)
        if dx is not None and dx.shape != x.shape:
            dx = dx.sum_to_size(x.shape)
        if dy is not None and dy.shape != y.shape:
            dy = dy.sum_to_size(y.shape)
        return dx, dy, None, None, None


def _kl_reduction(size_average, reduce, reduction: str) -> tuple[str, bool]:
    """torch's ``kl_div`` reduction handling: ``(elementwise reduction, divide by input.size(0))``."""
    batch = reduction == "batchmean"
    if size_average is not None or reduce is not None:
        return legacy_reduction(size_average, reduce), batch
    if reduction == "mean":
        warn(_MEAN_WARNING, 3)
    if batch:
        return "sum", True
    _reduction.get_enum(reduction)  # ValueError: "<x> is not a valid value for reduction"
    return reduction, False


def _kl_unsupported(input, target, log_target) -> bool:
    """True when torch must answer (or raise): non-tensors, a non-bool ``log_target``, mixed dtypes or devices."""
    if not all_tensors(input, target) or not isinstance(log_target, bool):
        return True
    if not same_float_dtype([input, target]) or target.device != input.device:
        return True
    try:
        torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        return True
    return False


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    log_target: bool = False,
) -> torch.Tensor:
    """Kullback-Leibler divergence, as ``torch.nn.functional.kl_div``.

    Per element (``input`` holds log-probabilities; ``xlogy(0, 0) = 0``)::

        log_target=False:  loss = target * log(target) - target * input
        log_target=True:   loss = exp(target) * (target - input)

    A negative target gives NaN, as in torch; the gradient w.r.t. a zero target is NaN.

    Args:
        input: log-probabilities, any shape, floating dtype.
        target: probabilities (log-probabilities with ``log_target``), broadcastable with ``input``.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (the broadcast shape) | ``'batchmean'`` (sum / ``input.size(0)``;
            no division for 0-d input) | ``'sum'`` | ``'mean'`` (sum / numel, with torch's
            UserWarning that it is not the KL's batch mean).
        log_target: ``target`` holds log-probabilities (a bool, as torch requires).

    Returns:
        The loss in the inputs' dtype (fp32 inside an autocast region, torch's autocast policy for
        this op), differentiable (twice) w.r.t. ``input`` and ``target``.
    """
    reduction, batch = _kl_reduction(size_average, reduce, reduction)
    if all_tensors(input, target):
        input, target = autocast_fp32(input, target)
    if _kl_unsupported(input, target, log_target):
        try:
            raise_like_torch(torch.kl_div, input, target, _reduction.get_enum(reduction), log_target=log_target)
        except TorchAccepted as accepted:
            _dispatch.backend(input, op="kl_div", unsupported="this combination of arguments")
            out = accepted.result
        return out / input.size(0) if batch and input.dim() != 0 else out
    by_batch = batch and input.dim() != 0
    if reduction == "none":
        out = KLDivFunction.apply(input, target, log_target, "none", 1)
        return out / input.size(0) if by_batch else out
    numel = torch.broadcast_shapes(input.shape, target.shape).numel()
    denom = (numel if reduction == "mean" else 1) * (input.size(0) if by_batch else 1)
    return KLDivFunction.apply(input, target, log_target, reduction, denom)


class KLDivLoss(_nn.KLDivLoss):
    """``torch.nn.KLDivLoss`` computed by :func:`kl_div` (same 'mean' warning as torch).

    ``forward(input, target)``: log-probabilities and a broadcastable target; returns the loss
    (the broadcast shape for ``reduction='none'``, else 0-d).
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)
