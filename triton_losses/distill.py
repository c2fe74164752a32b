"""Distillation losses (extras without a torch counterpart): ``jsd`` and ``kl_div_with_logits``.

Both take two ``(*, V)`` tensors whose last dimension is the vocabulary, optional ``labels`` of
shape ``(*)`` that mask rows equal to ``ignore_index``, and one of four reductions (see
``_reduce``): ``'none'`` (per row, masked rows 0), ``'sum'``, ``'batchmean'`` (sum / unmasked
rows, NaN if there are none, like torch's mean of an empty set) and ``'mean'`` (sum / (unmasked
rows * V)). Denominators are computed on the device: no host sync.

Autograd: :class:`JSDFunction` and :class:`KLDivWithLogitsFunction` give gradients w.r.t. both of
their inputs (student and teacher). For 'sum' / 'mean' / 'batchmean' an engine that ``FUSES_GRAD``
writes the gradient of the reduced loss in the forward launch (the rows are still in cache) and
the backward only rescales it by the upstream gradient (a device-side no-op when it is 1); for
'none', while tracing, and for a second backward, the backward recomputes it. Under
``create_graph=True`` the backward builds the gradients from differentiable torch ops, so both
losses are twice differentiable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn as _nn

from . import _dispatch
from ._checks import FLOAT_DTYPES
from ._precision import acc_dtype
from ._reduce import cast, check_row_reduction, finish_rows, row_denominator, row_scale

__all__ = [
    "JSDFunction",
    "JSDLoss",
    "KLDivWithLogitsFunction",
    "KLDivWithLogitsLoss",
    "jsd",
    "kl_div_with_logits",
]


def _validate(op: str, a, b, labels, names: tuple[str, str]) -> None:
    """Raise ``ValueError`` / ``TypeError`` (messages prefixed with ``op``) for calls this loss does not define."""
    na, nb = names
    for name, t in ((na, a), (nb, b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if a.dim() == 0 or a.shape[-1] == 0:
        raise ValueError(f"{op}: {na} must have a non-empty last (vocabulary) dimension, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{op}: {na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in FLOAT_DTYPES or b.dtype != a.dtype:
        raise TypeError(f"{op}: {na} and {nb} must share one floating dtype, got {a.dtype} and {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"{op}: {na} and {nb} must be on the same device, got {a.device} and {b.device}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise TypeError(f"{op}: labels must be an integer tensor")
        if labels.dtype == torch.bool:
            raise TypeError(f"{op}: labels must be an integer tensor, got torch.bool")
        if labels.shape != a.shape[:-1]:
            raise ValueError(
                f"{op}: labels must have shape {tuple(a.shape[:-1])} (the {na} shape without its last "
                f"dimension), got {tuple(labels.shape)}"
            )
        if labels.device != a.device:
            raise ValueError(f"{op}: labels must be on {a.device}, got {labels.device}")


def _rows_uniform(t: torch.Tensor) -> bool:
    """Whether ``t``'s leading dimensions flatten into one row dimension without a copy."""
    lead = [(n, st) for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n != 1]
    return all(lead[i][1] == lead[i + 1][1] * lead[i + 1][0] for i in range(len(lead) - 1))


def _row_views(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None):
    """``(A, B, V)`` views of ``a`` and ``b`` (row ``a * B + b``) and ``(A, B)`` int64 labels.

    All rows as one ``(1, R, V)`` view when the row stride is uniform; otherwise the last two
    leading dimensions are kept apart (e.g. a shifted ``logits[:, :-1]`` slice needs no copy).
    Only a layout neither form describes is copied. Labels keep their strides (stride 0 included).
    """
    V = a.shape[-1]
    R = a.shape[:-1].numel()
    if _rows_uniform(a) and _rows_uniform(b):
        A, B = 1, R
    else:
        B = a.shape[-2]
        A = R // B if B else 0
    a3, b3 = a.reshape(A, B, V), b.reshape(A, B, V)
    lab = None if labels is None else labels.long().reshape(A, B)
    return a3, b3, lab


# ---- differentiable gradients (create_graph=True) -------------------------------------------


def _zero_where(cond: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, torch.zeros_like(v), v)


def _scaled(d: torch.Tensor, scale: torch.Tensor, keep, like: torch.Tensor) -> torch.Tensor:
    """``d * scale`` per row (``scale`` ``(A, B)``), 0 on the rows ``keep`` drops, in ``like``'s dtype."""
    d = d * scale[..., None]
    return cast(d if keep is None else _zero_where(~keep[..., None], d), like.dtype)


def _graph_scale(gout, reduction: str, coef, A: int, B: int, keep, acc) -> torch.Tensor:
    """The ``(A, B)`` per-row gradient scale, differentiable in ``gout`` (a select on dropped rows)."""
    s = row_scale(gout, reduction, coef, acc).reshape(-1)
    s = (s.expand(A * B) if s.numel() == 1 else s).reshape(A, B)
    return s if keep is None else _zero_where(~keep, s)


def _jsd_graph_grads(x, y, keep, beta: float, scale, need):
    """``(gx, gy)`` of :func:`jsd` from differentiable torch ops, the kernels' formulas (see kernels.distill)."""
    acc = scale.dtype
    xa, ya = x.to(acc), y.to(acc)
    q, p = torch.exp(xa), torch.exp(ya)
    if beta == 0.0:
        loss = _zero_where(p == 0, p * (ya - xa))
        dx, dy = -p, _zero_where(p == 0, loss + p)
    elif beta == 1.0:
        loss = _zero_where(q == 0, q * (xa - ya))
        dx, dy = _zero_where(q == 0, loss + q), -q
    else:
        log_m = torch.logaddexp(ya + math.log(beta), xa + math.log1p(-beta))
        dx = _zero_where(q == 0, (1.0 - beta) * q * (xa - log_m))
        dy = _zero_where(p == 0, beta * p * (ya - log_m))
    return (_scaled(dx, scale, keep, x) if need[0] else None), (_scaled(dy, scale, keep, y) if need[1] else None)


def _kd_graph_grads(s, t, keep, inv_temp: float, scale, need):
    """``(ds, dt)`` of :func:`kl_div_with_logits` from differentiable torch ops."""
    acc = scale.dtype
    log_q = F.log_softmax(s.to(acc) * inv_temp, -1)
    log_p = F.log_softmax(t.to(acc) * inv_temp, -1)
    p = torch.exp(log_p)
    loss = _zero_where(p == 0, p * (log_p - log_q)).sum(-1, keepdim=True)
    ds = (torch.exp(log_q) - p) * inv_temp
    dt = _zero_where(p == 0, p * (log_p - log_q - loss)) * inv_temp
    return (_scaled(ds, scale, keep, s) if need[0] else None), (_scaled(dt, scale, keep, t) if need[1] else None)


# ---- autograd --------------------------------------------------------------------------------


def _row_forward(ctx, fwd: str, keeps_stats: bool, a, b, labels, option: float, ignore_index, reduction, op):
    """Shared forward of the row losses: ``fwd`` names the engine's ``*_fwd`` launcher."""
    eng = _dispatch.engine("distill", a, b, labels, op=op)
    A, B, V = a.shape
    acc = acc_dtype(a.dtype)
    denom = row_denominator(labels, ignore_index, A * B, V, reduction, acc, a.device)
    coef = 1.0 / denom
    needs = ctx.needs_input_grad[:2]
    fused = eng.FUSES_GRAD and (needs[0] or needs[1]) and reduction != "none"
    saved, ga, gb = getattr(eng, fwd)(a, b, labels, option, ignore_index, coef, fused and needs[0], fused and needs[1])
    ctx.save_for_backward(a, b, labels, coef, saved if keeps_stats else None)
    ctx.fused = (ga, gb) if fused else None
    ctx.option, ctx.ignore_index, ctx.reduction, ctx.op = option, ignore_index, reduction, op
    return finish_rows(saved[0] if keeps_stats else saved, reduction, denom, a.dtype)


def _row_backward(ctx, bwd: str, graph_grads, keeps_stats: bool, gout):
    """Shared backward: differentiable ops under ``create_graph``; else rescale the fused gradients
    once, or recompute them with the engine's ``bwd`` launcher."""
    a, b, labels, coef, saved = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:2])
    acc = acc_dtype(a.dtype)
    if torch.is_grad_enabled():  # create_graph=True
        keep = None if labels is None else labels != ctx.ignore_index
        scale = _graph_scale(gout, ctx.reduction, coef, a.shape[0], a.shape[1], keep, acc)
        ga, gb = graph_grads(a, b, keep, ctx.option, scale, needs)
        return ga, gb, None, None, None, None, None
    eng = _dispatch.engine("distill", a, b, labels, op=ctx.op)
    if ctx.fused is not None:
        grads, ctx.fused = ctx.fused, None
        for g in grads:
            if g is not None:
                eng.scale_(g, gout.reshape(1))
        return grads[0], grads[1], None, None, None, None, None
    scale = row_scale(gout, ctx.reduction, coef, acc)
    stats = (saved,) if keeps_stats else ()
    ga, gb = getattr(eng, bwd)(a, b, labels, ctx.option, ctx.ignore_index, *stats, scale, *needs)
    return ga, gb, None, None, None, None, None


class JSDFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`jsd` on ``(A, B, V)`` views; returns per-row or reduced loss."""

    @staticmethod
    def forward(ctx, x, y, labels, beta: float, ignore_index: int, reduction: str, op: str):
        return _row_forward(ctx, "jsd_fwd", False, x, y, labels, beta, ignore_index, reduction, op)

    @staticmethod
    def backward(ctx, gout):
        return _row_backward(ctx, "jsd_bwd", _jsd_graph_grads, False, gout)


class KLDivWithLogitsFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`kl_div_with_logits` on ``(A, B, V)`` views."""

    @staticmethod
    def forward(ctx, s, t, labels, inv_temp: float, ignore_index: int, reduction: str, op: str):
        return _row_forward(ctx, "kd_fwd", True, s, t, labels, inv_temp, ignore_index, reduction, op)

    @staticmethod
    def backward(ctx, gout):
        return _row_backward(ctx, "kd_bwd", _kd_graph_grads, True, gout)


def _row_loss(fn, op: str, a, b, labels, option: float, ignore_index: int, reduction: str, names):
    check_row_reduction(reduction)
    _validate(op, a, b, labels, names)
    a3, b3, lab = _row_views(a, b, labels)
    out = fn.apply(a3, b3, lab, option, int(ignore_index), reduction, op)
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
        The loss in ``input``'s dtype, differentiable (twice) w.r.t. ``input`` and ``target``.
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


class JSDLoss(_nn.Module):
    """Generalised Jensen-Shannon divergence between rows of log-probabilities: :func:`jsd`.

    ``forward(input, target, labels=None)``: student and teacher log-probabilities ``(*, V)``,
    optional ``(*)`` labels masking rows equal to ``ignore_index``; returns the loss (``(*)`` for
    ``reduction='none'``, else 0-d).
    """

    def __init__(self, beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean") -> None:
        super().__init__()
        self.beta, self.ignore_index, self.reduction = beta, ignore_index, reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return jsd(
            input, target, beta=self.beta, ignore_index=self.ignore_index, labels=labels, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class KLDivWithLogitsLoss(_nn.Module):
    """Distillation KL from logits: :func:`kl_div_with_logits`.

    ``KL(softmax(teacher / T) || softmax(student / T))`` per row, masked and reduced.
    ``forward(student_logits, teacher_logits, labels=None)``: logits ``(*, V)``, optional ``(*)``
    labels masking rows equal to ``ignore_index``; returns ``(*)`` for 'none', else 0-d.
    """

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.ignore_index, self.reduction = temperature, ignore_index, reduction

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return kl_div_with_logits(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            labels=labels,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
