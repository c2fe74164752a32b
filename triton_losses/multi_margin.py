"""The multi-class margin losses: ``multilabel_soft_margin_loss``, ``multilabel_margin_loss`` and
``multi_margin_loss`` (validation, autograd Functions, reduction) and their ``torch.nn`` modules.

Each loss is a row loss over ``(R, C)`` rows (class dimension last). The engines return per-row
losses; with 'mean' / 'sum' and a gradient to compute, the forward also writes the gradient of the
reduced loss in the same pass, and the backward only scales it by the upstream gradient (a
device-side no-op when that is 1). With ``create_graph=True`` the backward builds the gradient
from differentiable torch ops, so double backward works (torch itself has none for the two
margin losses).

Calls these modules do not model (other dtypes, odd broadcasting, a weight that requires grad)
are handed to torch: it raises its own error, or its answer is returned (``auto`` mode; the
``triton`` backend raises ``NotImplementedError`` instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn as _nn

from . import _dispatch
from ._checks import FLOAT_DTYPES, autocast_composite, autocast_fp32, legacy_reduction, plain, reduction_string
from ._row_autograd import broadcast_shape, delegate, finish, may_fuse, row_coef, scale_fused, torch_grads, upstream

__all__ = [
    "MultiLabelMarginLoss",
    "MultiLabelSoftMarginLoss",
    "MultiMarginLoss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
]

_FAMILY = "multi_margin"
_REDUCTIONS = ("none", "mean", "sum")


# ---- multilabel_soft_margin_loss ---------------------------------------------------------------


def _mlsm_rows(x, t, w):
    """torch's formula, per row (differentiable torch ops)."""
    loss = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
    if w is not None:
        loss = loss * w
    return loss.sum(1) / x.shape[1]


class MultilabelSoftMarginFunction(torch.autograd.Function):
    """``multilabel_soft_margin_loss`` of ``(R, C)`` logits ``x`` and targets ``t`` (weights ``w`` or None).

    ``w`` is an expanded ``(R, C)`` view and is not differentiated (a weight that requires grad
    is handed to torch). Returns 0-d for 'mean' / 'sum', ``(R,)`` for 'none', in ``out_dtype``.
    """

    @staticmethod
    def forward(ctx, x, t, w, reduction: str, out_dtype: torch.dtype, fusable: bool):
        eng = _dispatch.engine(_FAMILY, x, t, w, op="multilabel_soft_margin_loss")
        coef = row_coef(reduction, x, out_dtype)
        fuse = eng.FUSES_GRAD and reduction != "none" and fusable
        fuse_x, fuse_t = fuse and ctx.needs_input_grad[0], fuse and ctx.needs_input_grad[1]
        loss, gx, gt = eng.mlsm_fwd(x, t, w, coef, fuse_x, fuse_t)
        ctx.save_for_backward(x, t, w, coef)
        ctx.eng, ctx.reduction, ctx.fused = eng, reduction, (gx, gt) if fuse_x or fuse_t else None
        return finish(loss, reduction, x.shape[0], coef, out_dtype)

    @staticmethod
    def backward(ctx, gout):
        x, t, w, coef = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        gscale, fused = upstream(ctx, gout, coef)
        if torch.is_grad_enabled():
            gx, gt = torch_grads(lambda a, b: _mlsm_rows(a, b, w), (x, t), needs, gscale)
        elif fused is not None and all(f is not None or not n for f, n in zip(fused, needs)):
            gx, gt = fused
            scale_fused(ctx.eng, fused, gout)
        else:
            gx, gt = ctx.eng.mlsm_bwd(x, t, w, gscale, needs[0], needs[1])
        return (gx if needs[0] else None), (gt if needs[1] else None), None, None, None, None


def _mlsm_unsupported(input, target, weight, reduction: str) -> bool:
    if reduction not in _REDUCTIONS or input.dim() == 0 or input.dtype not in FLOAT_DTYPES:
        return True
    if target.dtype == torch.bool or target.is_complex() or target.device != input.device:
        return True
    if autocast_composite(input, target, weight):
        return True
    if broadcast_shape(input.shape, target.shape) != input.shape:
        return True
    if weight is not None and broadcast_shape(input.shape, weight.shape) != input.shape:
        return True
    if weight is not None:
        if weight.device != input.device or weight.dtype not in FLOAT_DTYPES:
            return True
        if weight.requires_grad and torch.is_grad_enabled():
            return True  # torch's composite differentiates the weight too
    return False


def _autocast(*tensors):
    """torch's autocast policy for multi_margin / multilabel_margin: on its fp32 list (CPU and CUDA)."""
    return autocast_fp32(*tensors) if isinstance(tensors[0], torch.Tensor) else tensors


def _rows(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` broadcast to ``shape`` and viewed as ``(R, C)`` rows (a stride-0 view where possible)."""
    return t.expand(shape).reshape(math.prod(shape[:-1]), shape[-1])


def multilabel_soft_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multilabel one-versus-all logistic loss, as ``torch.nn.functional.multilabel_soft_margin_loss``.

    Per row: ``-(1/C) * sum_c w_c * (t_c * logsigmoid(x_c) + (1 - t_c) * logsigmoid(-x_c))``.

    Args:
        input: logits ``(*, C)`` (at least 1-D), floating dtype.
        target: targets broadcastable to ``input``'s shape (floating or integer).
        weight: weights broadcastable to ``input``'s shape (typically ``(C,)``), or None.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (shape ``input.shape[:-1]``) | ``'mean'`` (over rows) | ``'sum'``.

    Returns:
        The loss in the dtype torch promotes ``input``, ``target`` and ``weight`` to.
    """
    if _dispatch.torch_serves("multilabel_soft_margin_loss", input):  # small CPU calls: torch's own function is faster
        return F.multilabel_soft_margin_loss(input, target, weight, size_average, reduce, reduction)
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    if _mlsm_unsupported(input, target, weight, reduction):
        args = (input, target, weight, None, None, reduction)
        return delegate("multilabel_soft_margin_loss", F.multilabel_soft_margin_loss, args, input)
    out_dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    shape = input.shape
    x = _rows(input, shape)
    w = None if weight is None else _rows(weight, shape)
    out = MultilabelSoftMarginFunction.apply(x, _rows(target, shape), w, reduction, out_dtype, may_fuse())
    return out.reshape(shape[:-1]) if reduction == "none" else out


# ---- multi_margin_loss -----------------------------------------------------------------------


def _mm_rows(x, y, w, p: int, margin: float):
    """torch's formula (its decomposition), per row."""
    u = x.gather(1, y[:, None])
    z = margin - u + x
    z = torch.where(z > 0, z, 0)  # torch's kernels count z > 0 only: a tie (z == 0) has zero gradient
    z = z if p == 1 else z * z
    if w is not None:
        z = z * w[y][:, None]
    cols = torch.arange(x.shape[1], device=x.device)
    return torch.where(cols != y[:, None], z, 0).mean(1)


class MultiMarginFunction(torch.autograd.Function):
    """``multi_margin_loss`` of ``(R, C)`` scores ``x`` and class indices ``y`` ``(R,)``."""

    @staticmethod
    def forward(ctx, x, y, w, p: int, margin: float, reduction: str, fusable: bool):
        eng = _dispatch.engine(_FAMILY, x, y, w, op="multi_margin_loss")
        coef = row_coef(reduction, x, x.dtype)
        fuse = eng.FUSES_GRAD and reduction != "none" and fusable and ctx.needs_input_grad[0]
        loss, gx = eng.multi_margin_fwd(x, y, w, p, margin, coef, fuse)
        ctx.save_for_backward(x, y, w, coef)
        ctx.eng, ctx.reduction, ctx.fused, ctx.opts = eng, reduction, gx, (p, margin)
        return finish(loss, reduction, x.shape[0], coef, x.dtype)

    @staticmethod
    def backward(ctx, gout):
        x, y, w, coef = ctx.saved_tensors
        gscale, fused = upstream(ctx, gout, coef)
        if torch.is_grad_enabled():
            (gx,) = torch_grads(lambda a: _mm_rows(a, y, w, *ctx.opts), (x,), (True,), gscale)
        elif fused is not None:
            gx = fused
            scale_fused(ctx.eng, (gx,), gout)
        else:
            gx = ctx.eng.multi_margin_bwd(x, y, w, *ctx.opts, gscale)
        return gx, None, None, None, None, None, None


def _mm_unsupported(input, target, p, weight, reduction: str) -> bool:
    if reduction not in _REDUCTIONS or p not in (1, 2) or isinstance(p, bool):
        return True
    if input.dtype not in FLOAT_DTYPES or input.dim() > 2 or (input.dim() >= 1 and input.shape[-1] == 0):
        return True
    if target.dtype != torch.int64 or target.device != input.device:
        return True
    if input.dim() == 2:
        if target.dim() != 1 or target.shape[0] != input.shape[0]:
            return True
    elif target.dim() > 1 or target.numel() != 1:
        return True
    if weight is not None:
        C = input.shape[-1] if input.dim() else 1
        if weight.dim() != 1 or weight.numel() != C or weight.dtype != input.dtype:
            return True
        if weight.device != input.device or (weight.requires_grad and torch.is_grad_enabled()):
            return True
    return False


def _bad_targets_on_cpu(target: torch.Tensor, lo: int, hi: int) -> bool:
    """Whether CPU targets fail torch's CPU range check ``lo <= t < hi`` (eager only: one pass, one host read)."""
    if target.device.type != "cpu" or target.numel() == 0 or _dispatch.tracing():
        return False
    tmin, tmax = torch.aminmax(target)
    return bool((tmin < lo) | (tmax >= hi))


def multi_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    p: int = 1,
    margin: float = 1.0,
    weight: torch.Tensor | None = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-class hinge loss, as ``torch.nn.functional.multi_margin_loss``.

    Per row with target ``y``: ``sum_{j != y} w_y * max(0, margin - x_y + x_j)**p / C``.

    Args:
        input: scores ``(N, C)``, ``(C,)`` or a 0-d score, floating dtype.
        target: class indices ``(N,)`` (``()`` or ``(1,)`` for unbatched input), int64.
        p: 1 or 2.
        margin: the margin.
        weight: class weights ``(C,)`` in ``input``'s dtype, or None (not differentiable, as in torch).
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (``(N,)``, the target's shape for unbatched input) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in ``input``'s dtype; 'mean' over 0 rows is NaN (torch's CPU kernel returns an
        uninitialised value there). CPU targets outside ``[0, C)`` raise torch's error; CUDA
        ones are a device-side assert (the kernels clamp them, never reading out of bounds).
    """
    if _dispatch.torch_serves("multi_margin_loss", input):  # small CPU calls: torch's own function is faster
        return F.multi_margin_loss(input, target, p, margin, weight, size_average, reduce, reduction)
    reduction = reduction_string(size_average, reduce, reduction)
    input, weight = _autocast(input, weight)
    args = (input, target, p, margin, weight, None, None, reduction)
    if not plain(numbers=(p, margin)) or _mm_unsupported(input, target, p, weight, reduction):
        return delegate("multi_margin_loss", F.multi_margin_loss, args, input)
    C = input.shape[-1] if input.dim() else 1
    y = target.reshape(-1)
    if _bad_targets_on_cpu(y, 0, C):
        return delegate("multi_margin_loss", F.multi_margin_loss, args, input)
    x = input.reshape(-1, C)
    out = MultiMarginFunction.apply(x, y, weight, int(p), float(margin), reduction, may_fuse())
    if reduction == "none":
        out = out.reshape(target.shape if input.dim() < 2 else (x.shape[0],))
    return out


# ---- multilabel_margin_loss ------------------------------------------------------------------


def _mlm_rows(x, y):
    """torch's formula (its decomposition), per row."""
    C = x.shape[1]
    cols = torch.arange(C, device=x.device)
    end = torch.where(y < 0, cols, C).amin(1, keepdim=True)
    listed = cols < end
    u = x.gather(1, torch.where(listed, y, 0))
    is_t = (cols[None, :, None] == torch.where(listed, y, -1)[:, None, :]).any(2)
    z = 1.0 - u[:, :, None] + x[:, None, :]
    z = torch.where(z > 0, z, 0)  # as torch's kernels: z > 0 counts, a tie has zero gradient
    z = torch.where(listed[:, :, None] & ~is_t[:, None, :], z, 0)
    return z.sum((1, 2)) / C


class MultilabelMarginFunction(torch.autograd.Function):
    """``multilabel_margin_loss`` of ``(R, C)`` scores ``x`` and target lists ``y`` ``(R, C)``."""

    @staticmethod
    def forward(ctx, x, y, reduction: str, fusable: bool):
        eng = _dispatch.engine(_FAMILY, x, y, op="multilabel_margin_loss")
        coef = row_coef(reduction, x, x.dtype)
        fuse = eng.FUSES_GRAD and reduction != "none" and fusable and ctx.needs_input_grad[0]
        loss, gx = eng.multilabel_margin_fwd(x, y, coef, fuse)
        ctx.save_for_backward(x, y, coef)
        ctx.eng, ctx.reduction, ctx.fused = eng, reduction, gx
        return finish(loss, reduction, x.shape[0], coef, x.dtype)

    @staticmethod
    def backward(ctx, gout):
        x, y, coef = ctx.saved_tensors
        gscale, fused = upstream(ctx, gout, coef)
        if torch.is_grad_enabled():
            (gx,) = torch_grads(lambda a: _mlm_rows(a, y), (x,), (True,), gscale)
        elif fused is not None:
            gx = fused
            scale_fused(ctx.eng, (gx,), gout)
        else:
            gx = ctx.eng.multilabel_margin_bwd(x, y, gscale)
        return gx, None, None, None


def _mlm_unsupported(input, target, reduction: str) -> bool:
    if reduction not in _REDUCTIONS or input.dtype not in FLOAT_DTYPES or input.dim() > 2:
        return True
    if input.dim() >= 1 and input.shape[-1] == 0:
        return True
    return target.dtype != torch.int64 or target.shape != input.shape or target.device != input.device


def multilabel_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-class multi-label hinge loss, as ``torch.nn.functional.multilabel_margin_loss``.

    Each row of ``target`` lists the row's classes, ended by the first negative entry (-1). Per
    row: ``sum_{k listed} sum_{d not listed} max(0, 1 - x[y_k] + x[d]) / C``.

    Args:
        input: scores ``(N, C)``, ``(C,)`` or 0-d, floating dtype.
        target: int64 target lists of ``input``'s shape, entries in ``[-1, C)``.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (``(N,)``; 0-d for unbatched input) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in ``input``'s dtype. 'mean' over 0 rows is NaN (torch's CPU kernel returns an
        uninitialised value there). CPU targets outside ``[-1, C)`` raise torch's error; on CUDA
        the kernels assert on the device and never read out of bounds.
    """
    if _dispatch.torch_serves("multilabel_margin_loss", input):  # small CPU calls: torch's own function is faster
        return F.multilabel_margin_loss(input, target, size_average, reduce, reduction)
    reduction = reduction_string(size_average, reduce, reduction)
    (input,) = _autocast(input)
    args = (input, target, None, None, reduction)
    if _mlm_unsupported(input, target, reduction):
        return delegate("multilabel_margin_loss", F.multilabel_margin_loss, args, input)
    C = input.shape[-1] if input.dim() else 1
    if _bad_targets_on_cpu(target, -1, C):
        return delegate("multilabel_margin_loss", F.multilabel_margin_loss, args, input)
    x = input.reshape(-1, C)
    out = MultilabelMarginFunction.apply(x, target.reshape(-1, C), reduction, may_fuse())
    if reduction == "none":
        out = out.reshape(() if input.dim() < 2 else (x.shape[0],))
    return out


# ---- modules ---------------------------------------------------------------------------------


class MultiLabelSoftMarginLoss(_nn.MultiLabelSoftMarginLoss):
    """``torch.nn.MultiLabelSoftMarginLoss`` computed by :func:`multilabel_soft_margin_loss`.

    ``forward(input (N, C), target (N, C)) -> (N,)`` for 'none', else 0-d; ``weight`` is a buffer.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multilabel_soft_margin_loss(input, target, weight=self.weight, reduction=self.reduction)


class MultiLabelMarginLoss(_nn.MultiLabelMarginLoss):
    """``torch.nn.MultiLabelMarginLoss`` computed by :func:`multilabel_margin_loss`.

    ``forward(input (N, C) or (C,), target int64 of input's shape) -> (N,)`` for 'none', else 0-d.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multilabel_margin_loss(input, target, reduction=self.reduction)


class MultiMarginLoss(_nn.MultiMarginLoss):
    """``torch.nn.MultiMarginLoss`` computed by :func:`multi_margin_loss`.

    ``forward(input (N, C) or (C,), target (N,) or ()) -> (N,)`` for 'none', else 0-d; ``weight``
    is a buffer.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multi_margin_loss(
            input, target, p=self.p, margin=self.margin, weight=self.weight, reduction=self.reduction
        )
