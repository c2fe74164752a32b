"""The embedding losses: ``cosine_embedding_loss``, ``triplet_margin_loss`` and
``triplet_margin_with_distance_loss`` (validation, autograd Functions, reduction) and their
``torch.nn`` modules.

Both kernels are row losses over ``(R, D)`` rows: broadcast operands are expanded (stride-0)
views, so autograd sums their gradients back to their shapes. With 'mean' / 'sum' and gradients
to compute, the forward writes them in the same pass and the backward only scales them; with
``create_graph=True`` the backward builds them from differentiable torch ops (double backward).

``triplet_margin_with_distance_loss`` with ``distance_function=None`` is the triplet kernel with
``pairwise_distance``'s defaults (p = 2, eps = 1e-6); a user's distance function runs through
torch autograd, with the clamp and reduction as torch ops around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn as _nn

from . import _dispatch
from ._checks import FLOAT_DTYPES, autocast_composite, autocast_fp32, plain, reduction_string
from ._row_autograd import broadcast_shape, delegate, finish, may_fuse, row_coef, scale_fused, torch_grads, upstream
from .reference.embedding import COSINE_EPS

__all__ = [
    "CosineEmbeddingLoss",
    "TripletMarginLoss",
    "TripletMarginWithDistanceLoss",
    "cosine_embedding_loss",
    "triplet_margin_loss",
    "triplet_margin_with_distance_loss",
]

_FAMILY = "embedding"
_EPSILON = COSINE_EPS  # torch's (fp32 1e-12), added to each squared norm in cosine_embedding_loss


def _autocast(*tensors):
    """torch's autocast policy for cosine_embedding / triplet_margin (on its fp32 list, CPU and CUDA;
    triplet_margin_with_distance is a composite of other ops, not on it)."""
    if all(isinstance(t, torch.Tensor) for t in tensors):
        return autocast_fp32(*tensors)
    return tensors


def _same_devices(*ts: torch.Tensor) -> bool:
    return all(t.device == ts[0].device for t in ts)


# ---- cosine_embedding_loss -------------------------------------------------------------------


def _cosine_rows(x1, x2, y, margin: float):
    """torch's formula (``aten/src/ATen/native/Loss.cpp``), per row."""
    prod = (x1 * x2).sum(1)
    mag1 = (x1 * x1).sum(1) + _EPSILON
    mag2 = (x2 * x2).sum(1) + _EPSILON
    cos = prod / (mag1 * mag2).sqrt()
    zeros = torch.zeros_like(cos)
    return torch.where(y == 1, 1 - cos, zeros) + torch.where(y == -1, (cos - margin).clamp_min(0), zeros)


class CosineEmbeddingFunction(torch.autograd.Function):
    """``cosine_embedding_loss`` of ``(R, D)`` rows ``x1``, ``x2`` and targets ``y`` ``(R,)``."""

    @staticmethod
    def forward(ctx, x1, x2, y, margin: float, reduction: str, out_dtype: torch.dtype, fusable: bool):
        eng = _dispatch.engine(_FAMILY, x1, x2, y, op="cosine_embedding_loss")
        coef = row_coef(reduction, x1, out_dtype)
        fuse = eng.FUSES_GRAD and reduction != "none" and fusable and any(ctx.needs_input_grad[:2])
        loss, g1, g2 = eng.cosine_fwd(x1, x2, y, margin, coef, fuse)
        ctx.save_for_backward(x1, x2, y, coef)
        ctx.eng, ctx.reduction, ctx.margin, ctx.fused = eng, reduction, margin, (g1, g2) if fuse else None
        return finish(loss, reduction, x1.shape[0], coef, out_dtype)

    @staticmethod
    def backward(ctx, gout):
        x1, x2, y, coef = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        gscale, fused = upstream(ctx, gout, coef)
        if torch.is_grad_enabled():
            g1, g2 = torch_grads(lambda a, b: _cosine_rows(a, b, y, ctx.margin), (x1, x2), needs, gscale)
        elif fused is not None:
            g1, g2 = fused
            scale_fused(ctx.eng, fused, gout)
        else:
            g1, g2 = ctx.eng.cosine_bwd(x1, x2, y, ctx.margin, gscale)
        return (g1 if needs[0] else None), (g2 if needs[1] else None), None, None, None, None, None


def _cosine_rows_of(input1, input2, target):
    """The broadcast row count, or None when the call is not one the kernels model."""
    ins = (input1, input2)
    if any(t.dtype not in FLOAT_DTYPES for t in ins) or target.is_complex() or not _same_devices(*ins, target):
        return None
    if target.dim() == 1:
        if input1.dim() != 2 or input2.dim() != 2:
            return None
    elif target.dim() != 0 or input1.dim() != 1 or input2.dim() != 1:
        return None
    if input1.shape[-1] != input2.shape[-1]:
        return None
    lead = [t.shape[0] if t.dim() == 2 else 1 for t in ins] + [target.numel() if target.dim() else 1]
    rows = broadcast_shape(*[(n,) for n in lead])
    return None if rows is None else rows[0]


def cosine_embedding_loss(
    input1: torch.Tensor,
    input2: torch.Tensor,
    target: torch.Tensor,
    margin: float = 0,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cosine embedding loss, as ``torch.nn.functional.cosine_embedding_loss``.

    Per row, with ``cos`` the cosine similarity of ``input1`` and ``input2`` (each squared norm
    plus torch's 1e-12): ``1 - cos`` where ``target == 1``, ``max(0, cos - margin)`` where
    ``target == -1``, 0 elsewhere.

    Args:
        input1: ``(N, D)`` or ``(D,)`` embeddings, floating dtype (rows broadcast against ``input2``).
        input2: ``(N, D)`` or ``(D,)`` embeddings.
        target: ``(N,)`` (``()`` for unbatched inputs), any real dtype; not differentiated.
        margin: the margin of the dissimilar term.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (``(N,)``, or 0-d) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in the inputs' promoted dtype.
    """
    if _dispatch.torch_serves("cosine_embedding_loss", input1):  # small CPU calls: torch's own function is faster
        return F.cosine_embedding_loss(input1, input2, target, margin, size_average, reduce, reduction)
    reduction = reduction_string(size_average, reduce, reduction)
    input1, input2, target = _autocast(input1, input2, target)
    R = _cosine_rows_of(input1, input2, target) if plain(numbers=(margin,)) else None
    if R is None:
        args = (input1, input2, target, margin, None, None, reduction)
        return delegate("cosine_embedding_loss", F.cosine_embedding_loss, args, input1)
    D = input1.shape[-1]
    x1, x2 = (t.reshape(t.shape[0] if t.dim() == 2 else 1, D).expand(R, D) for t in (input1, input2))
    y = target.reshape(-1).expand(R)
    out_dtype = torch.promote_types(input1.dtype, input2.dtype)
    out = CosineEmbeddingFunction.apply(x1, x2, y, float(margin), reduction, out_dtype, may_fuse())
    return out.reshape(() if target.dim() == 0 else (R,)) if reduction == "none" else out


# ---- triplet_margin_loss ---------------------------------------------------------------------


def _triplet_rows(a, p, n, margin: float, pnorm: float, eps: float, swap: bool):
    """torch's formula (``pairwise_distance`` and ``triplet_margin_loss``), per row."""
    d_pos = torch.linalg.vector_norm(a - p + eps, pnorm, dim=-1)
    d_neg = torch.linalg.vector_norm(a - n + eps, pnorm, dim=-1)
    if swap:
        d_neg = torch.minimum(d_neg, torch.linalg.vector_norm(p - n + eps, pnorm, dim=-1))
    return torch.clamp_min(margin + d_pos - d_neg, 0)


class TripletMarginFunction(torch.autograd.Function):
    """``triplet_margin_loss`` of ``(R, D)`` anchors, positives and negatives."""

    @staticmethod
    def forward(ctx, a, p, n, opts: tuple, reduction: str, out_dtype: torch.dtype, fusable: bool):
        eng = _dispatch.engine(_FAMILY, a, p, n, op="triplet_margin_loss")
        coef = row_coef(reduction, a, out_dtype)
        fuse = eng.FUSES_GRAD and reduction != "none" and fusable and any(ctx.needs_input_grad[:3])
        loss, *grads = eng.triplet_fwd(a, p, n, *opts, coef, fuse)
        ctx.save_for_backward(a, p, n, coef)
        ctx.eng, ctx.reduction, ctx.opts, ctx.fused = eng, reduction, opts, grads if fuse else None
        return finish(loss, reduction, a.shape[0], coef, out_dtype)

    @staticmethod
    def backward(ctx, gout):
        a, p, n, coef = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        gscale, fused = upstream(ctx, gout, coef)
        if torch.is_grad_enabled():
            grads = torch_grads(lambda *t: _triplet_rows(*t, *ctx.opts), (a, p, n), needs, gscale)
        elif fused is not None:
            grads = fused
            scale_fused(ctx.eng, [g for g, need in zip(fused, needs) if need], gout)
        else:
            grads = ctx.eng.triplet_bwd(a, p, n, *ctx.opts, gscale)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


def _triplet_shape(anchor, positive, negative, margin, p, swap: bool):
    """The common broadcast shape of the three operands, or None when the kernels do not model the call."""
    ins = (anchor, positive, negative)
    if any(t.dtype not in FLOAT_DTYPES for t in ins) or not _same_devices(*ins):
        return None
    if not anchor.dim() == positive.dim() == negative.dim() or margin <= 0:
        return None
    if not float(p) > 0:  # p <= 0 (and NaN) are torch's
        return None
    shape = broadcast_shape(*(t.shape for t in ins))
    pairs = [(anchor, positive), (anchor, negative)] + ([(positive, negative)] if swap else [])
    if shape is None or any(broadcast_shape(u.shape, v.shape) != shape for u, v in pairs):
        return None
    return torch.Size(shape)


def _triplet_run(op: str, anchor, positive, negative, margin, p, eps, swap, reduction, torch_call):
    """Validate, dispatch and run one triplet call (``torch_call()``: torch's own, for errors)."""
    shape = _triplet_shape(anchor, positive, negative, margin, p, swap)
    if shape is None:
        return torch_call()
    D = shape[-1] if len(shape) else 1
    rows = [t.expand(shape).reshape(math.prod(shape[:-1]), D) for t in (anchor, positive, negative)]
    out_dtype = torch.promote_types(torch.promote_types(anchor.dtype, positive.dtype), negative.dtype)
    opts = (float(margin), float(p), float(eps), bool(swap))
    out = TripletMarginFunction.apply(*rows, opts, reduction, out_dtype, may_fuse())
    return out.reshape(shape[:-1]) if reduction == "none" else out


def triplet_margin_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 1.0,
    p: float = 2,
    eps: float = 1e-6,
    swap: bool = False,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triplet margin loss, as ``torch.nn.functional.triplet_margin_loss``.

    Per row: ``max(margin + d(a, p) - d(a, n), 0)`` with ``d(x, y) = ||x - y + eps||_p`` over the
    last dimension (``pairwise_distance``); ``swap`` uses ``min(d(a, n), d(p, n))``.

    Args:
        anchor: ``(N, D)``, ``(D,)`` or any ``(*, D)``, floating dtype; the three operands have
            the same number of dimensions and broadcast together.
        positive: as ``anchor``.
        negative: as ``anchor``.
        margin: the margin (> 0).
        p: the norm's order (p <= 0 is computed by torch).
        eps: added to every difference before the norm.
        swap: the distance swap of Balntas et al.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (the broadcast shape without its last dimension) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in the operands' promoted dtype.
    """
    if _dispatch.torch_serves("triplet_margin_loss", anchor):  # small CPU calls: torch's own function is faster
        return F.triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, size_average, reduce, reduction)
    reduction = reduction_string(size_average, reduce, reduction)
    anchor, positive, negative = _autocast(anchor, positive, negative)
    args = (anchor, positive, negative, margin, p, eps, swap, None, None, reduction)
    if not plain(numbers=(margin, p, eps), bools=(swap,)):
        return delegate("triplet_margin_loss", F.triplet_margin_loss, args, anchor)
    return _triplet_run("triplet_margin_loss", anchor, positive, negative, margin, p, eps, swap, reduction,
                        lambda: delegate("triplet_margin_loss", F.triplet_margin_loss, args, anchor))  # fmt: skip


def triplet_margin_with_distance_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    distance_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    margin: float = 1.0,
    swap: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triplet margin loss with a distance function, as ``torch.nn.functional.triplet_margin_with_distance_loss``.

    Args:
        anchor: ``(N, D)`` or ``(D,)`` (any ``(*, D)``); the operands have the same number of dimensions.
        positive: as ``anchor``.
        negative: as ``anchor``.
        distance_function: ``(x, y) -> distances``; None is ``pairwise_distance`` (the triplet
            kernel, p = 2, eps = 1e-6). A given function runs through torch autograd.
        margin: the margin (> 0).
        swap: the distance swap of Balntas et al.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.

    Returns:
        The loss (the dtype ``distance_function`` returns; the operands' promoted dtype for None).
    """
    # small CPU calls: torch's own function is faster
    if _dispatch.torch_serves("triplet_margin_with_distance_loss", anchor):
        return F.triplet_margin_with_distance_loss(anchor, positive, negative, distance_function=distance_function,
                                                   margin=margin, swap=swap, reduction=reduction)  # fmt: skip
    a_dim, p_dim, n_dim = anchor.ndim, positive.ndim, negative.ndim
    kwargs = dict(distance_function=distance_function, margin=margin, swap=swap, reduction=reduction)
    valid = reduction in ("mean", "sum", "none") and not margin <= 0 and margin > 0 and a_dim == p_dim == n_dim
    if distance_function is not None or not valid:
        return F.triplet_margin_with_distance_loss(anchor, positive, negative, **kwargs)
    torch_call = lambda: delegate(
        "triplet_margin_with_distance_loss",
        lambda *t: F.triplet_margin_with_distance_loss(*t, **kwargs),
        (anchor, positive, negative),
        anchor,
    )
    if autocast_composite(anchor, positive, negative):
        return torch_call()
    return _triplet_run("triplet_margin_with_distance_loss", anchor, positive, negative, margin, 2.0, 1e-6, swap,
                        reduction, torch_call)  # fmt: skip


# ---- modules ---------------------------------------------------------------------------------


class CosineEmbeddingLoss(_nn.CosineEmbeddingLoss):
    """``torch.nn.CosineEmbeddingLoss`` computed by :func:`cosine_embedding_loss`.

    ``forward(input1 (N, D) or (D,), input2 (same), target (N,) or ()) -> (N,)`` for 'none', else 0-d.
    """

    def forward(self, input1: torch.Tensor, input2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cosine_embedding_loss(input1, input2, target, margin=self.margin, reduction=self.reduction)


class TripletMarginLoss(_nn.TripletMarginLoss):
    """``torch.nn.TripletMarginLoss`` computed by :func:`triplet_margin_loss`.

    ``forward(anchor (N, D) or (D,), positive, negative) -> (N,)`` for 'none', else 0-d.
    """

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return triplet_margin_loss(
            anchor, positive, negative, margin=self.margin, p=self.p, eps=self.eps, swap=self.swap,
            reduction=self.reduction,
        )  # fmt: skip


class TripletMarginWithDistanceLoss(_nn.TripletMarginWithDistanceLoss):
    """``torch.nn.TripletMarginWithDistanceLoss`` computed by :func:`triplet_margin_with_distance_loss`.

    ``forward(anchor (N, D) or (D,), positive, negative) -> (N,)`` for 'none', else 0-d.
    """

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return triplet_margin_with_distance_loss(
            anchor, positive, negative, distance_function=self.distance_function, margin=self.margin,
            swap=self.swap, reduction=self.reduction,
        )  # fmt: skip
