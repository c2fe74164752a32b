"""The regression losses: ``l1_loss``, ``mse_loss``, ``smooth_l1_loss``, ``huber_loss``, ``poisson_nll_loss``,
``gaussian_nll_loss``: validation, the autograd Function, and their ``torch.nn`` modules.

Calls torch would reject, or that the engines do not model (integer inputs, complex tensors, mixed
devices), are handed to torch's own function (its exception, or its result in ``auto`` mode). A
weight that requires grad is applied with torch ops to our elementwise loss, as torch does, so it
gets torch's gradient. See ``_elementwise_loss`` for the fused forward / backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn as _nn

from . import _dispatch
from . import _elementwise_loss as _ea
from ._checks import FLOAT_DTYPES, autocast_composite, autocast_fp32, eager_checks, plain, reduction_string
from ._precision import acc_dtype
from .options import RegressionOptions

__all__ = [
    "GaussianNLLLoss", "HuberLoss", "L1Loss", "MSELoss", "PoissonNLLLoss", "RegressionFunction", "SmoothL1Loss",
    "gaussian_nll_loss", "huber_loss", "l1_loss", "mse_loss", "poisson_nll_loss", "smooth_l1_loss",
]  # fmt: skip


def _torch_loss(x, y, v, opts: RegressionOptions) -> torch.Tensor:
    """The elementwise loss in torch's own differentiable functions (operands at one shape): double backward."""
    name, p = opts.loss, opts.p
    if name == "poisson":
        return F.poisson_nll_loss(x, y, opts.log_input, opts.full, eps=p, reduction="none")
    if name == "gaussian":
        return F.gaussian_nll_loss(x, y, opts.var if v is None else v, full=opts.full, eps=p, reduction="none")
    if name == "l1":
        loss = F.l1_loss(x, y, reduction="none")
    elif name == "mse":
        loss = F.mse_loss(x, y, reduction="none")
    elif name == "smooth_l1":
        loss = F.smooth_l1_loss(x, y, reduction="none", beta=p)
    else:
        loss = F.huber_loss(x, y, reduction="none", delta=p)
    return loss if v is None else loss * v


class RegressionFunction(torch.autograd.Function):
    """Autograd wrapper of one regression call on ``(input, target, weight or var)`` (the third may be None).

    Returns the loss at the broadcast shape ('none') or 0-d, in ``out_dtype``; differentiable w.r.t.
    the input, the target and gaussian's var. ``denom``: the 'mean' divisor ``(1,)`` (summed weights), or None.
    """

    @staticmethod
    def forward(ctx, x, y, v, eng, opts: RegressionOptions, reduction: str, out_dtype, denom):
        ctx.eng = eng
        return _ea.forward(ctx, eng.regression_fwd, eng.FUSES_GRAD, [x, y, v], opts, reduction, out_dtype, denom)

    @staticmethod
    def backward(ctx, gout):
        grads = _ea.backward(ctx, gout, ctx.eng.regression_bwd, ctx.eng.scale_, _torch_loss)
        return (*grads, None, None, None, None, None)


def _run(op, opts, input, target, v, reduction, out_dtype, denom=None) -> torch.Tensor:
    eng = _dispatch.engine("regression", input, target, v, op=op)
    return RegressionFunction.apply(input, target, v, eng, opts, reduction, out_dtype, denom)


def _difference(op, torch_fn, torch_kwargs, input, target, weight, legacy, opts: RegressionOptions, param_ok=True):
    """l1 / mse / smooth_l1 / huber: checks, torch's warnings, the weight's normalisation, the call."""
    reduction = _ea.silent_reduction(*legacy, torch_kwargs["reduction"])
    ok = reduction is not None and param_ok and _ea.modelled(input, target, *([weight] if weight is not None else []))
    if ok and weight is not None:  # torch's weighted l1 / mse is a composite autocast treats op by op: its own
        ok = weight.dtype in FLOAT_DTYPES and weight.shape == input.shape
        ok = ok and (op == "huber_loss" or not torch.is_autocast_enabled(input.device.type))
    if ok and target.dtype == torch.bool and opts.loss == "l1":  # torch subtracts the bool target: its error
        ok = False
    if not ok:
        return _ea.delegate(op, torch_fn, input, target, **torch_kwargs)
    _ea.size_warning(input, target, stacklevel=3)
    reduction = reduction_string(*legacy, torch_kwargs["reduction"])  # torch's legacy-argument warning
    input, target, weight = autocast_fp32(input, target, weight)
    base = input.dtype if op == "huber_loss" else torch.promote_types(input.dtype, target.dtype)
    target = _ea.as_float(target, base)
    if weight is None:
        return _run(op, opts, input, target, None, reduction, base)
    shaped = len(torch.broadcast_shapes(input.shape, target.shape)) > 0
    out_dtype = _ea.promote((base, shaped), (weight.dtype, weight.dim() > 0))
    by_weights = reduction == "mean" and op != "huber_loss"  # l1 / mse: sum(w * loss) / sum(w); huber: mean
    if by_weights:  # torch divides two 0-d sums: plain promotion with the weight's dtype
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    if weight.requires_grad and torch.is_grad_enabled():  # torch's composite, so the weight gets its gradient
        loss = _run(op, opts, input, target, None, "none", base) * weight
        if reduction == "none":
            return loss
        return loss.sum() / weight.sum() if by_weights else loss.sum() if reduction == "sum" else loss.mean()
    denom = weight.sum(dtype=acc_dtype(out_dtype)).reshape(1) if by_weights else None
    return _run(op, opts, input, target, weight, reduction, out_dtype, denom)


def l1_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean absolute error, as ``torch.nn.functional.l1_loss``: ``|input - target|`` per element.

    Args:
        input: predictions, any shape, floating dtype.
        target: broadcastable to ``input`` (a different size warns, as torch does).
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.
        weight: per-element weights of ``input``'s shape, or None; 'mean' is then
            ``sum(weight * loss) / sum(weight)``.

    Returns:
        The loss in the promoted dtype of input and target (and weight), differentiable w.r.t.
        input, target and weight.
    """
    if _dispatch.torch_serves("l1_loss", input):  # small CPU calls: torch's own function is faster
        return F.l1_loss(input, target, size_average, reduce, reduction, weight=weight)
    kwargs = dict(size_average=size_average, reduce=reduce, reduction=reduction, weight=weight)
    return _difference("l1_loss", F.l1_loss, kwargs, input, target, weight, (size_average, reduce),
                       RegressionOptions("l1"))  # fmt: skip


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error, as ``torch.nn.functional.mse_loss``: ``(input - target)**2`` per element.

    Args:
        input: predictions, any shape, floating dtype.
        target: broadcastable to ``input`` (a different size warns, as torch does).
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.
        weight: per-element weights of ``input``'s shape, or None; 'mean' is then
            ``sum(weight * loss) / sum(weight)``.

    Returns:
        The loss in the promoted dtype of input and target (and weight), differentiable w.r.t.
        input, target and weight.
    """
    if _dispatch.torch_serves("mse_loss", input):  # small CPU calls: torch's own function is faster
        return F.mse_loss(input, target, size_average, reduce, reduction, weight=weight)
    kwargs = dict(size_average=size_average, reduce=reduce, reduction=reduction, weight=weight)
    return _difference("mse_loss", F.mse_loss, kwargs, input, target, weight, (size_average, reduce),
                       RegressionOptions("mse"))  # fmt: skip


def smooth_l1_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    beta: float = 1.0,
) -> torch.Tensor:
    """Smooth L1 loss, as ``torch.nn.functional.smooth_l1_loss``.

    Per element, with ``d = input - target``: ``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - beta / 2``.

    Args:
        input: predictions, any shape, floating dtype.
        target: broadcastable to ``input`` (a different size warns, as torch does).
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.
        beta: the threshold, ``>= 0`` (0 is the L1 loss).

    Returns:
        The loss in the promoted dtype of input and target, differentiable w.r.t. both.
    """
    if _dispatch.torch_serves("smooth_l1_loss", input):  # small CPU calls: torch's own function is faster
        return F.smooth_l1_loss(input, target, size_average, reduce, reduction, beta=beta)
    kwargs = dict(size_average=size_average, reduce=reduce, reduction=reduction, beta=beta)
    ok = isinstance(beta, (int, float)) and beta >= 0
    opts = RegressionOptions("smooth_l1", float(beta)) if ok and beta != 0 else RegressionOptions("l1")
    return _difference("smooth_l1_loss", F.smooth_l1_loss, kwargs, input, target, None, (size_average, reduce),
                       opts, ok)  # fmt: skip


def huber_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Huber loss, as ``torch.nn.functional.huber_loss``.

    Per element, with ``d = input - target``: ``0.5 * d**2`` where ``|d| < delta``, else ``delta * (|d| - delta / 2)``.

    Args:
        input: predictions, any shape, floating dtype.
        target: broadcastable to ``input`` (a different size warns, as torch does).
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.
        delta: the threshold, ``> 0``.
        weight: per-element weights of ``input``'s shape, or None ('mean' stays the mean over elements).

    Returns:
        The loss in the input's dtype (promoted with the weight's), differentiable w.r.t. input,
        target and weight.
    """
    if _dispatch.torch_serves("huber_loss", input):  # small CPU calls: torch's own function is faster
        return F.huber_loss(input, target, reduction, delta, weight=weight)
    kwargs = dict(reduction=reduction, delta=delta, weight=weight)
    ok = isinstance(delta, (int, float)) and delta > 0
    return _difference("huber_loss", F.huber_loss, kwargs, input, target, weight, (None, None),
                       RegressionOptions("huber", float(delta) if ok else 1.0), ok)  # fmt: skip


def poisson_nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    log_input: bool = True,
    full: bool = False,
    size_average=None,
    eps: float = 1e-8,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Poisson negative log-likelihood, as ``torch.nn.functional.poisson_nll_loss``.

    Per element ``exp(input) - target * input`` (``log_input``) or ``input - target * log(input + eps)``,
    plus with ``full`` the Stirling term ``target * log(target) - target + 0.5 * log(2 pi target)``
    where ``target > 1``.

    Args:
        input: log-rates (``log_input``) or rates, any shape, floating dtype.
        target: counts, broadcastable with ``input``.
        log_input: whether ``input`` holds log-rates.
        full: add the Stirling term.
        size_average: deprecated, mapped as torch maps it.
        eps: added to the rate inside the log when not ``log_input``.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in torch's result dtype of input and target, differentiable w.r.t. both.
    """
    if _dispatch.torch_serves("poisson_nll_loss", input):  # small CPU calls: torch's own function is faster
        return F.poisson_nll_loss(input, target, log_input, full, size_average, eps, reduce, reduction)
    torch_args = (input, target, log_input, full, size_average, eps, reduce, reduction)
    red = _ea.silent_reduction(size_average, reduce, reduction)
    bool_stirling = full and isinstance(target, torch.Tensor) and target.dtype == torch.bool  # torch: its error
    options = plain(numbers=(eps,), bools=(log_input, full))
    if red is None or not _ea.modelled(input, target) or not options or bool_stirling:
        return _ea.delegate("poisson_nll_loss", F.poisson_nll_loss, *torch_args)
    red = reduction_string(size_average, reduce, reduction)
    input, target = autocast_fp32(input, target)
    out_dtype = _ea.promote((input.dtype, input.dim() > 0), (target.dtype, target.dim() > 0))
    opts = RegressionOptions("poisson", float(eps), 0.0, bool(full), bool(log_input))
    return _run("poisson_nll_loss", opts, input, _ea.as_float(target, out_dtype), None, red, out_dtype)


def _gaussian_var(input: torch.Tensor, var: torch.Tensor) -> torch.Tensor | None:
    """torch's reading of ``var``'s shape: itself, unsqueezed at -1 (one dim short), or None (wrong size)."""
    if var.size() == input.size():
        return var
    if input.size()[:-1] == var.size():
        return var.unsqueeze(-1)
    if input.dim() == var.dim() and sum(v for i, v in zip(input.size(), var.size()) if i != v) == 1:
        return var
    return None


def gaussian_nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    var: torch.Tensor | float,
    full: bool = False,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    """Gaussian negative log-likelihood, as ``torch.nn.functional.gaussian_nll_loss``.

    Per element ``0.5 * (log(v) + (input - target)**2 / v)`` with ``v = max(var, eps)``, plus
    ``0.5 * log(2 pi)`` with ``full``. As in torch the clamp is invisible to autograd (``var``'s
    gradient is taken at ``v``), a negative ``var`` raises ``ValueError`` (on CUDA a device assert,
    unless ``TRITON_LOSSES_CHECK_TARGETS=1``), and ``var`` may be one dimension short of
    ``input`` or have size 1 in one dimension.

    Args:
        input: means, any shape, floating dtype.
        target: samples, broadcastable with ``input``.
        var: variances: a tensor of ``input``'s shape (or as above), or one non-negative number.
        full: add the constant term.
        eps: the clamp's floor.
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in the result dtype of input, target and var, differentiable w.r.t. all three.
    """
    if _dispatch.torch_serves("gaussian_nll_loss", input):  # small CPU calls: torch's own function is faster
        return F.gaussian_nll_loss(input, target, var, full, eps, reduction)
    torch_args = (input, target, var, full, eps, reduction)
    number = isinstance(var, float)
    v = None if number else _gaussian_var(input, var) if isinstance(var, torch.Tensor) else None
    ok = reduction in _ea.REDUCTIONS and isinstance(eps, (int, float)) and (number or v is not None)
    ok = ok and _ea.modelled(input, target, *([] if number else [v])) and (not number or var >= 0)
    ok = ok and not autocast_composite(input, target, v)
    if ok and v is not None:
        ok = v.dtype in FLOAT_DTYPES and not (eager_checks(v.device) and bool((v < 0).any()))
    if not ok:
        return _ea.delegate("gaussian_nll_loss", F.gaussian_nll_loss, *torch_args)
    specs = [(input.dtype, input.dim() > 0), (target.dtype, target.dim() > 0)]
    out_dtype = _ea.promote(*specs, (input.dtype if number else v.dtype, input.dim() > 0 if number else v.dim() > 0))
    opts = RegressionOptions("gaussian", float(eps), float(var) if number else 0.0, bool(full))
    return _run("gaussian_nll_loss", opts, input, _ea.as_float(target, out_dtype), v, reduction, out_dtype)


# ---- torch.nn modules ----------------------------------------------------------------------------


class L1Loss(_nn.L1Loss):
    """``torch.nn.L1Loss`` by :func:`l1_loss`. Shapes: input ``(*)``, target broadcastable, output 0-d or ``(*)``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return l1_loss(input, target, reduction=self.reduction)


class MSELoss(_nn.MSELoss):
    """``torch.nn.MSELoss`` by :func:`mse_loss`. Shapes: input ``(*)``, target broadcastable, output 0-d or ``(*)``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_loss(input, target, reduction=self.reduction)


class SmoothL1Loss(_nn.SmoothL1Loss):
    """``torch.nn.SmoothL1Loss`` computed by :func:`smooth_l1_loss`. Shapes: input ``(*)``, target ``(*)``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class HuberLoss(_nn.HuberLoss):
    """``torch.nn.HuberLoss`` computed by :func:`huber_loss`. Shapes: input ``(*)``, target ``(*)``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class PoissonNLLLoss(_nn.PoissonNLLLoss):
    """``torch.nn.PoissonNLLLoss`` computed by :func:`poisson_nll_loss`. Shapes: input ``(*)``, target ``(*)``."""

    def forward(self, log_input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return poisson_nll_loss(
            log_input, target, log_input=self.log_input, full=self.full, eps=self.eps, reduction=self.reduction
        )


class GaussianNLLLoss(_nn.GaussianNLLLoss):
    """``torch.nn.GaussianNLLLoss`` computed by :func:`gaussian_nll_loss`.

    Shapes: input ``(N, *)`` or ``(*)``, target like input (or broadcastable), var like input, one
    dimension short, or with one dimension of size 1 (or a number); output 0-d or input's shape.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor, var: torch.Tensor | float) -> torch.Tensor:
        return gaussian_nll_loss(input, target, var, full=self.full, eps=self.eps, reduction=self.reduction)
