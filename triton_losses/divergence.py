"""``kl_div`` (torch's), and the distillation extras ``jsd`` and ``kl_div_with_logits``.

Autograd:

* :class:`KLDivFunction` gives the gradients torch's composite ``kl_div`` gives, w.r.t. both
  ``input`` and ``target`` (one backward launch writes whichever ``ctx.needs_input_grad`` asks
  for). A broadcast operand's gradient is computed at the broadcast shape and summed back to
  the operand's shape, as autograd does for torch.
* :class:`JSDFunction` and :class:`KLDivWithLogitsFunction` give gradients w.r.t. both of their
  inputs (student and teacher). For 'sum' / 'mean' / 'batchmean' the Triton forward writes the
  gradient of the reduced loss in the same launch (fused: the rows are still in cache) and the
  backward only rescales it by the upstream gradient (a device-side no-op when it is 1); for
  'none', and on the torch path, the backward recomputes it.

All backwards are ``once_differentiable`` (no double backward).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.nn import _reduction

from . import _dispatch, _rowloss
from ._checks import FLOAT_DTYPES, TorchAccepted, compiling, raise_like_torch
from ._pointwise import acc_dtype, autocast_fp32, finish_reduction, implementation, same_float_dtype, upstream

__all__ = [
    "JSDFunction",
    "KLDivFunction",
    "KLDivWithLogitsFunction",
    "jsd",
    "kl_div",
    "kl_div_with_logits",
]

_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


class KLDivFunction(torch.autograd.Function):
    """Autograd wrapper of one elementwise ``kl_div`` call ('none' / 'mean' / 'sum')."""

    @staticmethod
    def forward(ctx, x, y, log_target: bool, backend: str, reduction: str):
        impl = implementation(backend, "divergence")
        shape = torch.broadcast_shapes(x.shape, y.shape)
        xe, ye = x.expand(shape), y.expand(shape)
        if reduction == "none":
            out = impl.kl_fwd(xe, ye, log_target, False)
        else:
            out = finish_reduction(impl.kl_fwd(xe, ye, log_target, True), reduction, shape.numel(), x.dtype)
        ctx.save_for_backward(x, y)
        ctx.log_target, ctx.backend, ctx.reduction = log_target, backend, reduction
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, y = ctx.saved_tensors
        impl = implementation(ctx.backend, "divergence")
        shape = torch.broadcast_shapes(x.shape, y.shape)
        g = upstream(gout, ctx.reduction, shape.numel(), shape)
        dx, dy = impl.kl_bwd(x.expand(shape), y.expand(shape), ctx.log_target, g, *ctx.needs_input_grad[:2])
        if dx is not None and dx.shape != x.shape:
            dx = dx.sum_to_size(x.shape)
        if dy is not None and dy.shape != y.shape:
            dy = dy.sum_to_size(y.shape)
        return dx, dy, None, None, None


def _kl_reduction(size_average, reduce, reduction: str) -> tuple[str, bool]:
    """torch's ``kl_div`` reduction handling: ``(elementwise reduction, divide by input.size(0))``."""
    batch = reduction == "batchmean"
    if size_average is not None or reduce is not None:
        return _reduction.legacy_get_string(size_average, reduce), batch
    if reduction == "mean":
        warnings.warn(_MEAN_WARNING, stacklevel=3)
    if batch:
        return "sum", True
    _reduction.get_enum(reduction)  # ValueError: "<x> is not a valid value for reduction"
    return reduction, False


def _kl_unsupported(input: torch.Tensor, target: torch.Tensor) -> bool:
    if not same_float_dtype([input, target], FLOAT_DTYPES) or target.device != input.device:
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
        log_target: ``target`` holds log-probabilities.

    Returns:
        The loss in the inputs' dtype (fp32 inside an autocast region), differentiable w.r.t.
        ``input`` and ``target``.
    """
    reduction, batch = _kl_reduction(size_average, reduce, reduction)
    input, target = autocast_fp32(input, target)
    if _kl_unsupported(input, target):
        try:
            raise_like_torch(torch.kl_div, input, target, _reduction.get_enum(reduction), log_target=log_target)
        except TorchAccepted as accepted:
            _dispatch.backend(input, op="kl_div", unsupported="this combination of arguments")
            out = accepted.result
    else:
        backend = _dispatch.backend(input, target, op="kl_div")
        out = KLDivFunction.apply(input, target, bool(log_target), backend, reduction)
    if batch and input.dim() != 0:
        out = out / input.size(0)
    return out


def _row_forward(ctx, impl, fwd, keeps_stats: bool, a, b, labels, option: float, ignore_index, backend, reduction):
    """Shared forward of the row losses: ``fwd`` is the implementation's ``*_fwd`` function."""
    A, B, V = a.shape
    acc = acc_dtype(a.dtype)
    denom = _rowloss.denominator(labels, ignore_index, A * B, V, reduction, acc, a.device)
    coef = 1.0 / denom
    needs = ctx.needs_input_grad[:2]
    fused = impl.FUSES_GRAD and (needs[0] or needs[1]) and reduction != "none" and not compiling()
    saved, ga, gb = fwd(a, b, labels, option, ignore_index, coef, fused and needs[0], fused and needs[1])
    ctx.save_for_backward(a, b, labels, coef, saved if keeps_stats else None)
    ctx.fused = (ga, gb) if fused else None
    ctx.option, ctx.ignore_index, ctx.backend, ctx.reduction = option, ignore_index, backend, reduction
    return _rowloss.finish(saved[0] if keeps_stats else saved, reduction, denom, a.dtype)


def _row_backward(ctx, impl, bwd, keeps_stats: bool, gout):
    """Shared backward: rescale the fused gradients once, else recompute them with ``bwd``."""
    a, b, labels, coef, saved = ctx.saved_tensors
    if ctx.fused is not None:
        grads, ctx.fused = ctx.fused, None
        for g in grads:
            if g is not None:
                impl.scale_(g, gout.reshape(1))
        return grads[0], grads[1], None, None, None, None, None
    scale = _rowloss.row_scale(gout, ctx.reduction, coef, acc_dtype(a.dtype))
    stats = (saved,) if keeps_stats else ()
    ga, gb = bwd(a, b, labels, ctx.option, ctx.ignore_index, *stats, scale, *ctx.needs_input_grad[:2])
    return ga, gb, None, None, None, None, None


class JSDFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`jsd` on ``(A, B, V)`` views; returns per-row or reduced loss."""

    @staticmethod
    def forward(ctx, x, y, labels, beta: float, ignore_index: int, backend: str, reduction: str):
        impl = implementation(backend, "divergence")
        return _row_forward(ctx, impl, impl.jsd_fwd, False, x, y, labels, beta, ignore_index, backend, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        impl = implementation(ctx.backend, "divergence")
        return _row_backward(ctx, impl, impl.jsd_bwd, False, gout)


class KLDivWithLogitsFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`kl_div_with_logits` on ``(A, B, V)`` views."""

    @staticmethod
    def forward(ctx, s, t, labels, inv_temp: float, ignore_index: int, backend: str, reduction: str):
        impl = implementation(backend, "kl_logits")
        return _row_forward(ctx, impl, impl.kd_fwd, True, s, t, labels, inv_temp, ignore_index, backend, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        impl = implementation(ctx.backend, "kl_logits")
        return _row_backward(ctx, impl, impl.kd_bwd, True, gout)


def _row_loss(fn, op: str, a, b, labels, option: float, ignore_index: int, reduction: str, names):
    _rowloss.check_reduction(reduction)
    _rowloss.validate(op, a, b, labels, names)
    backend = _dispatch.backend(a, b, labels, op=op)
    a3, b3, lab = _rowloss.row_views(a, b, labels)
    out = fn.apply(a3, b3, lab, option, int(ignore_index), backend, reduction)
    return out.reshape(a.shape[:-1]) if reduction == "none" else out


def jsd(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 0.5,
    ignore_index: int = -100,
    labels: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence between rows of log-probabilities (distillation).

    With ``Q = exp(input)`` (the student), ``P = exp(target)`` (the teacher) and, per row over
    the vocabulary ``v``::

        M    = beta * P + (1 - beta) * Q
        loss = beta * KL(P || M) + (1 - beta) * KL(Q || M)
             = sum_v beta * P_v * (log P_v - log M_v) + (1 - beta) * Q_v * (log Q_v - log M_v)

    for ``0 < beta < 1`` (``beta = 0.5`` is the symmetric JSD, at most ``log 2``). At the ends
    the mixture form vanishes, so the two KLs are used instead, as in common distillation code:
    ``beta = 0`` gives the forward ``KL(P || Q) = sum_v P_v (log P_v - log Q_v)`` and ``beta = 1``
    the reverse ``KL(Q || P)``. A term weighted by a probability that is exactly 0 is 0. Rows
    whose ``labels`` equal ``ignore_index`` contribute 0 (loss and gradients).

    Args:
        input: student log-probabilities ``(*, V)``, floating dtype.
        target: teacher log-probabilities, ``input``'s shape and dtype.
        beta: the mixture weight in ``[0, 1]``.
        ignore_index: label value of masked rows.
        labels: ``(*)`` integer labels, or None (no row is masked).
        reduction: ``'batchmean'`` (sum / unmasked rows) | ``'sum'`` | ``'mean'`` (sum /
            (unmasked rows * V)) | ``'none'`` (``(*)``, masked rows 0).

    Returns:
        The loss in ``input``'s dtype, differentiable w.r.t. ``input`` and ``target``.
    """
    if not (isinstance(beta, (int, float)) and 0.0 <= float(beta) <= 1.0):
        raise ValueError(f"jsd: beta must be a number in [0, 1], got {beta!r}")
    return _row_loss(JSDFunction, "jsd", input, target, labels, float(beta), ignore_index, reduction,
                     ("input", "target"))  # fmt: skip


def kl_div_with_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    labels: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Distillation KL divergence straight from logits: ``KL(softmax(teacher / T) || softmax(student / T))``.

    Per row over the vocabulary, with ``p = softmax(teacher_logits / T)`` and
    ``q = softmax(student_logits / T)``: ``loss = sum_v p_v * (log p_v - log q_v)``; this equals
    ``F.kl_div(log_softmax(student / T), log_softmax(teacher / T), log_target=True)`` summed over
    the row. On the Triton path both log-softmaxes are computed inside one online pass of the
    kernel: no ``(N, V)`` log-probability tensor is written. The ``T**2`` factor of Hinton et al.
    is not applied; multiply the loss by it if you want it. Rows whose ``labels`` equal
    ``ignore_index`` contribute 0 (loss and gradients).

    Args:
        student_logits: ``(*, V)``, floating dtype.
        teacher_logits: ``student_logits``' shape and dtype (its gradient is computed too if it
            requires one).
        temperature: ``T > 0``.
        ignore_index: label value of masked rows.
        labels: ``(*)`` integer labels, or None (no row is masked).
        reduction: ``'batchmean'`` (sum / unmasked rows) | ``'sum'`` | ``'mean'`` (sum /
            (unmasked rows * V)) | ``'none'`` (``(*)``, masked rows 0).

    Returns:
        The loss in the logits' dtype. Gradient w.r.t. the student: ``(q - p) / T`` per row.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kl_div_with_logits: temperature must be a finite number > 0, got {temperature!r}")
    return _row_loss(KLDivWithLogitsFunction, "kl_div_with_logits", student_logits, teacher_logits, labels,
                     1.0 / float(temperature), ignore_index, reduction,
                     ("student_logits", "teacher_logits"))  # fmt: skip
