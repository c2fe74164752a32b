"""The margin losses: ``soft_margin_loss``, ``hinge_embedding_loss``, ``margin_ranking_loss``: validation, the
autograd Function, and their ``torch.nn`` modules.

Targets are usually +-1 (any real values are accepted, as torch does: hinge treats every value
other than 1 and -1 as both); integer targets are converted to the computation's dtype. Calls torch
would reject, or that the engines do not model, are handed to torch's own function. See
``_elementwise_loss`` for the fused forward / backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn as _nn

from . import _dispatch
from . import _elementwise_loss as _ea
from ._checks import FLOAT_DTYPES, autocast_fp32, reduction_string
from .options import MarginOptions

__all__ = [
    "HingeEmbeddingLoss", "MarginFunction", "MarginRankingLoss", "SoftMarginLoss",
    "hinge_embedding_loss", "margin_ranking_loss", "soft_margin_loss",
]  # fmt: skip


def _torch_loss(a, b, c, opts: MarginOptions) -> torch.Tensor:
    """The elementwise loss in torch's own differentiable functions (operands at one shape): double backward."""
    if opts.loss == "soft_margin":
        return F.soft_margin_loss(a, b.detach(), reduction="none")
    if opts.loss == "hinge":
        return F.hinge_embedding_loss(a, b, margin=opts.margin, reduction="none")
    return F.margin_ranking_loss(a, b, c, margin=opts.margin, reduction="none")


class MarginFunction(torch.autograd.Function):
    """Autograd wrapper of one margin call: ``(input, target, None)``, or ranking's ``(input1, input2, target)``.

    Returns the loss at the broadcast shape ('none') or 0-d, in ``out_dtype``.
    """

    @staticmethod
    def forward(ctx, a, b, c, eng, opts: MarginOptions, reduction: str, out_dtype):
        ctx.eng = eng
        return _ea.forward(ctx, eng.margin_fwd, eng.FUSES_GRAD, [a, b, c], opts, reduction, out_dtype, None)

    @staticmethod
    def backward(ctx, gout):
        grads = _ea.backward(ctx, gout, ctx.eng.margin_bwd, ctx.eng.scale_, _torch_loss)
        return (*grads, None, None, None, None)


def _run(op, opts, a, b, c, reduction, out_dtype) -> torch.Tensor:
    eng = _dispatch.engine("margin", a, b, c, op=op)
    return MarginFunction.apply(a, b, c, eng, opts, reduction, out_dtype)


def soft_margin_loss(
    input: torch.Tensor, target: torch.Tensor, size_average=None, reduce=None, reduction: str = "mean"
) -> torch.Tensor:
    """Two-class logistic loss, as ``torch.nn.functional.soft_margin_loss``: ``log(1 + exp(-target * input))``.

    Computed as ``softplus(-target * input)``, finite wherever the true value is (torch's fp32
    ``log1p(exp(z))`` overflows to inf past z ~ 88, with a NaN gradient).

    Args:
        input: scores, any shape, floating dtype.
        target: labels (+-1), broadcastable to ``input``'s shape; it gets no gradient (torch
            refuses one that requires grad, and so does this function, with torch's error).
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (``input``'s shape) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in ``input``'s dtype, differentiable w.r.t. ``input``.
    """
    torch_args = (input, target, size_average, reduce, reduction)
    red = _ea.silent_reduction(size_average, reduce, reduction)
    ok = red is not None and _ea.modelled(input, target)
    ok = ok and torch.broadcast_shapes(input.shape, target.shape) == input.shape
    if not ok or (target.requires_grad and torch.is_grad_enabled()):
        return _ea.delegate("soft_margin_loss", F.soft_margin_loss, *torch_args)
    red = reduction_string(size_average, reduce, reduction)
    input, target = autocast_fp32(input, target)
    opts = MarginOptions("soft_margin")
    return _run("soft_margin_loss", opts, input, _ea.as_float(target, input.dtype), None, red, input.dtype)


def hinge_embedding_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    margin: float = 1.0,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hinge embedding loss, as ``torch.nn.functional.hinge_embedding_loss``.

    Per element: ``input`` where ``target == 1``, ``max(0, margin - input)`` where ``target == -1``
    (and the sum of both for any other target value, as torch).

    Args:
        input: distances, any shape, floating dtype.
        target: labels (+-1), broadcastable with ``input``; it gets no gradient.
        margin: the margin.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in ``input``'s dtype, differentiable w.r.t. ``input``.
    """
    if _dispatch.torch_serves("hinge_embedding_loss", input):  # small CPU calls: torch's own function is faster
        return F.hinge_embedding_loss(input, target, margin, size_average, reduce, reduction)
    torch_args = (input, target, margin, size_average, reduce, reduction)
    red = _ea.silent_reduction(size_average, reduce, reduction)
    if red is None or not _ea.modelled(input, target) or not isinstance(margin, (int, float)):
        return _ea.delegate("hinge_embedding_loss", F.hinge_embedding_loss, *torch_args)
    red = reduction_string(size_average, reduce, reduction)
    input, target = autocast_fp32(input, target)
    opts = MarginOptions("hinge", float(margin))
    target = _ea.as_float(target.detach(), input.dtype)
    return _run("hinge_embedding_loss", opts, input, target, None, red, input.dtype)


def margin_ranking_loss(
    input1: torch.Tensor,
    input2: torch.Tensor,
    target: torch.Tensor,
    margin: float = 0,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Margin ranking loss, as ``torch.nn.functional.margin_ranking_loss``.

    Per element ``max(0, -target * (input1 - input2) + margin)``.

    Args:
        input1: scores, any shape, floating dtype.
        input2: scores with as many dimensions as ``input1``, broadcastable with it.
        target: labels (+-1) with as many dimensions, broadcastable.
        margin: the margin.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in the promoted dtype of the three, differentiable w.r.t. all three.
    """
    if _dispatch.torch_serves("margin_ranking_loss", input1):  # small CPU calls: torch's own function is faster
        return F.margin_ranking_loss(input1, input2, target, margin, size_average, reduce, reduction)
    torch_args = (input1, input2, target, margin, size_average, reduce, reduction)
    red = _ea.silent_reduction(size_average, reduce, reduction)
    ok = red is not None and _ea.modelled(input1, input2, target) and isinstance(margin, (int, float))
    ok = ok and input2.dtype in FLOAT_DTYPES and input1.dim() == input2.dim() == target.dim()
    if not ok:
        return _ea.delegate("margin_ranking_loss", F.margin_ranking_loss, *torch_args)
    red = reduction_string(size_average, reduce, reduction)
    input1, input2, target = autocast_fp32(input1, input2, target)
    out_dtype = torch.promote_types(torch.promote_types(input1.dtype, input2.dtype), target.dtype)
    opts = MarginOptions("ranking", float(margin))
    return _run("margin_ranking_loss", opts, input1, input2, _ea.as_float(target, out_dtype), red, out_dtype)


# ---- torch.nn modules ----------------------------------------------------------------------------


class SoftMarginLoss(_nn.SoftMarginLoss):
    """``torch.nn.SoftMarginLoss`` computed by :func:`soft_margin_loss`. Shapes: input ``(*)``, target ``(*)``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_margin_loss(input, target, reduction=self.reduction)


class HingeEmbeddingLoss(_nn.HingeEmbeddingLoss):
    """``torch.nn.HingeEmbeddingLoss`` by :func:`hinge_embedding_loss`. Shapes: input ``(*)``, target ``(*)``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return hinge_embedding_loss(input, target, margin=self.margin, reduction=self.reduction)


class MarginRankingLoss(_nn.MarginRankingLoss):
    """``torch.nn.MarginRankingLoss`` computed by :func:`margin_ranking_loss`.

    Shapes: input1 ``(N)`` or ``()``, input2 and target alike; output 0-d or ``(N)``.
    """

    def forward(self, input1: torch.Tensor, input2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return margin_ranking_loss(input1, input2, target, margin=self.margin, reduction=self.reduction)
