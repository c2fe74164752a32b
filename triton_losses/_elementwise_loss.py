"""What the elementwise loss families (regression, margin) share in the public layer: argument checks
and delegation to torch, torch's result dtype and size warning, and the fused autograd.

A family's ``torch.autograd.Function`` calls :func:`forward` and :func:`backward` with its engine's
launchers (``<family>_fwd`` / ``<family>_bwd``, see ``kernels.regression``). Up to three operands
broadcast to one shape; the engines work on stride-0 views of it and return gradients at that
shape, summed here to each operand's own shape.

* 'none': the forward writes the loss; the backward launches the gradient pass on the upstream gradient.
* 'mean' / 'sum' with gradients needed: the forward writes the gradients of the reduced loss in the
  same pass (fused); the first backward only rescales them by the upstream gradient (a device-side
  no-op when it is 1). Later backwards (``retain_graph=True``) run the gradient pass.
* Double backward (``create_graph=True``): the gradient is rebuilt from torch's own differentiable
  functions (the family's ``torch_loss``), so it is exact wherever torch's is.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import torch

from . import _dispatch
from ._checks import FLOAT_DTYPES, TorchAccepted, legacy_reduction, raise_like_torch, warn
from ._precision import acc_dtype
from ._reduce import cast

REDUCTIONS = ("none", "mean", "sum")


def delegate(op: str, torch_fn, *args, **kwargs) -> torch.Tensor:
    """torch's own answer to a call we do not model: its exception, or its result (``auto`` mode only)."""
    try:
        raise_like_torch(torch_fn, *args, **kwargs)
    except TorchAccepted as accepted:
        first = next(a for a in args if isinstance(a, torch.Tensor))
        _dispatch.backend(first, op=op, unsupported="this combination of arguments")
        return accepted.result


def silent_reduction(size_average, reduce, reduction) -> str | None:
    """The reduction the legacy arguments map to (no warning yet), or None when torch would reject it."""
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce, emit_warning=False)
    return reduction if reduction in REDUCTIONS else None


def modelled(input, *others) -> bool:
    """Float input; the other operands real tensors on its device; all shapes broadcast together."""
    if not all(isinstance(t, torch.Tensor) for t in (input, *others)) or input.dtype not in FLOAT_DTYPES:
        return False
    if any(t.is_complex() or t.device != input.device for t in others):
        return False
    try:
        torch.broadcast_shapes(*(t.shape for t in (input, *others)))
    except RuntimeError:
        return False
    return True


def as_float(target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An integer / bool target converted to the computation's dtype (what torch's promotion does)."""
    return target if target.dtype.is_floating_point else target.to(dtype)


def _category(dtype: torch.dtype) -> int:
    return 2 if dtype.is_floating_point else 0 if dtype == torch.bool else 1


def promote(*specs: tuple[torch.dtype, bool]) -> torch.dtype:
    """torch's result dtype of an elementwise op on tensors given as ``(dtype, has dimensions)``.

    Zero-dimensional tensors take part only when their category (bool < integer < float) is above
    that of the dimensioned ones, as in ``torch.result_type``.
    """
    dimmed = [d for d, has_dims in specs if has_dims]
    zero = [d for d, has_dims in specs if not has_dims]
    if not dimmed:
        return reduce(torch.promote_types, zero)
    out = reduce(torch.promote_types, dimmed)
    if zero:
        z = reduce(torch.promote_types, zero)
        if _category(z) > _category(out):
            out = z
    return out


def size_warning(input: torch.Tensor, target: torch.Tensor, stacklevel: int) -> None:
    """torch's ``UserWarning`` for a target whose size differs from the input's (it broadcasts)."""
    if target.size() != input.size():
        warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel + 1,
        )


def _at(t: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """``t`` viewed at the broadcast ``shape`` (itself when it has it: torch's CPU kernels run a same-shape
    ``expand`` view of a contiguous tensor about 8x slower, measured on mse_loss at 2**18 elements)."""
    return t if t is None or t.shape == shape else t.expand(shape)


def _to_shape(grad: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """A gradient at the broadcast shape summed to an operand's ``shape`` (itself when equal)."""
    if grad is None or grad.shape == shape:
        return grad
    return grad.sum_to_size(shape) if len(shape) else grad.sum()


def forward(ctx, fwd: Callable, fuses: bool, operands: list, opts, reduction: str, out_dtype, denom):
    """The forward of an elementwise loss Function over ``operands`` (three tensors or None).

    Args:
        ctx: the Function's context.
        fwd: the engine's ``<family>_fwd`` launcher.
        fuses: the engine's ``FUSES_GRAD``.
        operands: the operands in their own shapes.
        opts: the family's options tuple.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        out_dtype: the loss's dtype.
        denom: ``(1,)`` divisor of a 'mean' (``sum(weight)``), or None for the element count.

    Returns:
        The loss: at the broadcast shape ('none') or 0-d.
    """
    shape = torch.broadcast_shapes(*(t.shape for t in operands if t is not None))
    views = [_at(t, shape) for t in operands]
    needs = tuple(bool(ctx.needs_input_grad[i]) and operands[i] is not None for i in range(3))
    ctx.shape, ctx.opts, ctx.reduction, ctx.fused = shape, opts, reduction, None
    ctx.save_for_backward(*operands, denom)
    if reduction == "none":
        return fwd(*views, opts, False, out_dtype)[0]
    n = shape.numel()
    mean = reduction == "mean"
    scale = 1.0 / n if mean and denom is None and n else 1.0
    fuse = fuses and any(needs)
    g = 1.0 / denom if mean and denom is not None and fuse else None
    parts, *grads = fwd(*views, opts, True, out_dtype, scale, g, needs if fuse else (False,) * 3)
    total = parts.sum()
    if mean:
        total = total / (n if denom is None else denom[0])
    if fuse:
        ctx.fused = [_to_shape(d, t.shape) if t is not None else None for d, t in zip(grads, operands)]
    return cast(total, out_dtype)


def backward(ctx, gout: torch.Tensor, bwd: Callable, scale_: Callable, torch_loss: Callable) -> list:
    """The gradients of an elementwise loss Function w.r.t. its three operands (None where not needed).

    Args:
        ctx: the Function's context (as :func:`forward` left it).
        gout: the upstream gradient of the loss.
        bwd: the engine's ``<family>_bwd`` launcher.
        scale_: the engine's in-place rescale of a fused gradient.
        torch_loss: ``(a, b, c, opts) -> loss at the broadcast shape`` in differentiable torch ops
            (torch's own functions), for double backward.
    """
    *operands, denom = ctx.saved_tensors
    needs = tuple(bool(ctx.needs_input_grad[i]) and operands[i] is not None for i in range(3))
    fused, ctx.fused = ctx.fused, None
    if torch.is_grad_enabled():
        return _double_backward(ctx, gout, operands, denom, needs, torch_loss)
    if fused is not None:
        for d in fused:
            if d is not None:
                scale_(d, gout.reshape(1))
        return fused
    shape = ctx.shape
    if ctx.reduction == "none":
        g = gout.expand(shape)
    else:
        g = gout.to(acc_dtype(gout.dtype))
        if ctx.reduction == "mean":
            g = g / (shape.numel() if denom is None else denom[0])
        g = g.reshape(()).expand(shape)
    views = [_at(t, shape) for t in operands]
    grads = bwd(*views, ctx.opts, g, needs)
    return [_to_shape(d, t.shape) if t is not None else None for d, t in zip(grads, operands)]


def _double_backward(ctx, gout, operands, denom, needs, torch_loss) -> list:
    """First-order gradients built from torch's differentiable functions (``create_graph=True``)."""
    shape = ctx.shape
    views = [_at(t, shape) for t in operands]
    loss = torch_loss(*views, ctx.opts)
    if ctx.reduction == "sum":
        loss = loss.sum()
    elif ctx.reduction == "mean":
        loss = loss.mean() if denom is None else loss.sum() / denom[0]
    wanted = [t for t, need in zip(operands, needs) if need]
    got = iter(torch.autograd.grad(loss, wanted, gout, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip(operands, needs):
        d = next(got) if need else None
        out.append(torch.zeros_like(t) if need and d is None else d)
    return out
