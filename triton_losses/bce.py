"""``binary_cross_entropy`` and ``binary_cross_entropy_with_logits``: checks, autograd, reduction, modules.

Autograd: :class:`BCEFunction` takes ``(input, target, weight, pos_weight)`` and returns the
gradients torch gives: w.r.t. ``input`` and w.r.t. ``target`` (both computed by one backward
launch that reads the operands once and writes only the gradients ``ctx.needs_input_grad`` asks
for). ``weight`` and ``pos_weight`` are not differentiable in torch either: a call where one
requires grad is handed to torch, which raises its own error. Under ``create_graph=True`` the
backward builds the same gradients from differentiable torch ops, so second derivatives work as
they do in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn as _nn

from . import _dispatch
from ._checks import (
    TorchAccepted,
    all_tensors,
    autocast_fp32,
    autocast_refuses_bce,
    broadcasts_to,
    eager_checks,
    raise_like_torch,
    reduction_string,
    same_float_dtype,
)
from ._precision import acc_dtype
from ._reduce import cast, elementwise_upstream

__all__ = ["BCEFunction", "BCELoss", "BCEWithLogitsLoss", "binary_cross_entropy", "binary_cross_entropy_with_logits"]

_EPSILON = 9.999999960041972e-13  # torch's BCE backward `EPSILON = 1e-12`, a float
# ... as torch's kernels round it to the data dtype: fp16 gives 0, so an input of exactly 0 or 1 gets
# an infinite or NaN gradient there, as in torch (CPU, torch 2.13); bf16 gives 1.0018652574217413e-12.
_GRAD_EPS = {
    dtype: float(torch.tensor(_EPSILON, dtype=torch.float32).to(dtype))
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
}


def grad_eps(dtype: torch.dtype) -> float:
    """The floor of the probability gradient's denominator ``max((1 - x) * x, eps)`` for ``dtype`` data."""
    return _GRAD_EPS.get(dtype, _EPSILON)


def _expanded(t: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    return None if t is None else t.expand(shape)


def _finish(partials: torch.Tensor, reduction: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The reduced loss from partial sums already divided by the reduction's denominator."""
    total = partials.sum()
    if reduction == "mean" and numel == 0:
        total = total / 0  # the mean of no elements: NaN, as in torch
    return cast(total, dtype)


def _graph_grads(x, y, w, pw, logits: bool, g, need: tuple[bool, bool]):
    """``(dx, dy)`` from differentiable torch ops (double backward), in fp32 (fp64) as the kernels compute."""
    acc = acc_dtype(x.dtype)
    xa, ya = x.to(acc), y.to(acc)
    gw = g.to(acc) if w is None else g.to(acc) * w.to(acc)
    if logits and pw is None:
        dx, dy = torch.sigmoid(xa) - ya, -xa
    elif logits:
        pwa = pw.to(acc)
        dx = ((pwa - 1.0) * ya + 1.0) * torch.sigmoid(xa) - pwa * ya
        dy = F.logsigmoid(-xa) - pwa * F.logsigmoid(xa)
    else:
        dx = (xa - ya) / torch.clamp_min((1.0 - xa) * xa, grad_eps(x.dtype))
        dy = -torch.logit(xa)
    return (cast(dx * gw, x.dtype) if need[0] else None), (cast(dy * gw, y.dtype) if need[1] else None)


class BCEFunction(torch.autograd.Function):
    """Autograd wrapper of one BCE (``logits=False``) or BCE-with-logits (``logits=True``) call.

    The forward returns the loss in the input's dtype: 0-d for 'mean' / 'sum', the input's shape
    for 'none'. ``weight`` / ``pos_weight`` are saved unexpanded and broadcast as stride-0 views.
    """

    @staticmethod
    def forward(ctx, x, y, weight, pos_weight, logits: bool, reduction: str, op: str):
        eng = _dispatch.engine("bce", x, y, weight, pos_weight, op=op)
        shape, n = x.shape, x.numel()
        w, pw = _expanded(weight, shape), _expanded(pos_weight, shape)
        if reduction == "none":
            out = eng.bce_fwd(x, y, w, pw, logits, False, 1)
        else:
            partials = eng.bce_fwd(x, y, w, pw, logits, True, max(n, 1) if reduction == "mean" else 1)
            out = _finish(partials, reduction, n, x.dtype)
        ctx.save_for_backward(x, y, weight, pos_weight)
        ctx.logits, ctx.reduction, ctx.op = logits, reduction, op
        return out

    @staticmethod
    def backward(ctx, gout):
        x, y, weight, pos_weight = ctx.saved_tensors
        shape = x.shape
        g = elementwise_upstream(gout, ctx.reduction, x.numel(), shape)
        w, pw = _expanded(weight, shape), _expanded(pos_weight, shape)
        need = tuple(ctx.needs_input_grad[:2])
        if torch.is_grad_enabled():  # create_graph=True
            dx, dy = _graph_grads(x, y, w, pw, ctx.logits, g, need)
        else:
            eng = _dispatch.engine("bce", x, y, op=ctx.op)
            dx, dy = eng.bce_bwd(x, y, w, pw, ctx.logits, g, grad_eps(x.dtype), *need)
        return dx, dy, None, None, None, None, None


def _unsupported(input, target, weight, pos_weight) -> bool:
    """True when the call is not one the kernels model (torch then raises or answers)."""
    tensors = [t for t in (input, target, weight, pos_weight) if t is not None]
    if not same_float_dtype(tensors) or any(t.device != input.device for t in tensors):
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

    Reads two flags back to the host: on CPU tensors always (as torch's CPU kernel raises), on CUDA
    only with ``TRITON_LOSSES_CHECK_TARGETS=1`` (the kernel asserts on the device otherwise).
    """
    if input.numel() == 0 or not eager_checks(input.device):
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
    return BCEFunction.apply(x, y, weight, pos_weight, logits, reduction, op)


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
        The loss in ``input``'s dtype (fp32 inside an autocast region, as torch's autocast policy
        for this op), differentiable (twice) w.r.t. ``input`` and ``target``.
    """
    reduction = reduction_string(size_average, reduce, reduction)
    args = (input, target, weight, pos_weight)
    if all_tensors(*args):
        input, target, weight, pos_weight = autocast_fp32(*args)
    torch_args = (input, target, weight, None, None, reduction, pos_weight)
    return _run(
        "binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits, torch_args,
        input, target, weight, pos_weight, True, reduction, refused=not all_tensors(*args),
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
    ``max((1 - input) * input, eps)``, with torch's ``eps = 1e-12`` rounded as torch rounds it (to
    fp32, then to the data dtype: 0 in fp16, so fp16 inputs of exactly 0 or 1 get torch's inf / NaN
    gradients), so it is about +-1e12 at 0 and 1 in the other dtypes.

    Input or target values outside ``[0, 1]`` (or NaN): on CPU tensors torch's error ``all elements
    of input should be between 0 and 1`` before any kernel runs (a read back to the host, in eager
    mode); on CUDA the kernel asserts on the device, as torch's CUDA kernel does, and
    ``TRITON_LOSSES_CHECK_TARGETS=1`` turns on the eager error there too. Inside a CUDA autocast
    region torch refuses this loss, and so does this function (with torch's error); under CPU
    autocast it computes in fp32, as torch does.

    Args:
        input: probabilities in ``[0, 1]``, any shape, floating dtype.
        target: probabilities in ``[0, 1]``, ``input``'s shape and dtype.
        weight: rescales each element; broadcastable to ``input``'s shape, or None.
        size_average: deprecated, mapped as torch maps it.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (``input``'s shape) | ``'mean'`` (sum / numel) | ``'sum'``.

    Returns:
        The loss in ``input``'s dtype, differentiable (twice) w.r.t. ``input`` and ``target``.
    """
    reduction = reduction_string(size_average, reduce, reduction)
    args = (input, target, weight)
    refused = not all_tensors(*args) or autocast_refuses_bce(input)  # torch: its TypeError / "unsafe to autocast"
    if not refused:
        input, target, weight = autocast_fp32(*args)
    torch_args = (input, target, weight, None, None, reduction)
    return _run(
        "binary_cross_entropy", F.binary_cross_entropy, torch_args,
        input, target, weight, None, False, reduction, refused,
    )  # fmt: skip


class BCELoss(_nn.BCELoss):
    """``torch.nn.BCELoss`` computed by :func:`binary_cross_entropy` (``weight`` is a buffer, as in torch).

    ``forward(input, target)``: probabilities of any shape and a target of that shape; returns the
    loss (``input``'s shape for ``reduction='none'``, else 0-d).
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` computed by :func:`binary_cross_entropy_with_logits`.

    ``weight`` and ``pos_weight`` are buffers, as in torch. ``forward(input, target)``: logits of any
    shape and a target of that shape; returns the loss (``input``'s shape for 'none', else 0-d).
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )
