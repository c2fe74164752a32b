"""``cross_entropy`` and ``nll_loss``: validation, the autograd Function, and the reduction."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _dispatch
from ._checks import (
    FLOAT_DTYPES,
    TorchAccepted,
    as_3d,
    cast,
    check_target_range,
    compiling,
    raise_like_torch,
    reduction_string,
)
from .spec import CESpec

__all__ = ["CrossEntropyFunction", "cross_entropy", "nll_loss"]


def _denominator(t: torch.Tensor, spec: CESpec, C: int, R: int, dtype: torch.dtype) -> torch.Tensor:
    """The 'mean' divisor on the device: summed class weights of non-ignored targets (or N)."""
    if spec.prob_target:
        return torch.full((1,), float(R), dtype=dtype, device=t.device)
    tl = t.reshape(-1).long()
    valid = tl != spec.ignore_index
    if spec.weight is None:
        return valid.sum(dtype=dtype).reshape(1)
    w = spec.weight.to(dtype)[tl.clamp(0, max(C - 1, 0))] if C else torch.zeros_like(tl, dtype=dtype)
    return torch.where(valid, w, torch.zeros_like(w)).sum().reshape(1)


def _op_options(options: tuple) -> tuple:
    """``CESpec`` options as the custom ops take them (softcap 0.0 means none)."""
    ignore_index, smoothing, z_loss, softcap, prob, logp = options
    return ignore_index, smoothing, z_loss, 0.0 if softcap is None else softcap, prob, logp


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of one cross-entropy / NLL call on ``(A, C, B)`` logits.

    The forward returns the reduced loss ('mean', 'sum': 0-d; 'none': ``(A * B,)``). When the
    kernels can, the forward also writes the gradient of the reduced loss (fused), and the
    backward only scales it by the upstream gradient; otherwise the backward recomputes the
    softmax from the saved log-sum-exp.
    """

    @staticmethod
    def forward(ctx, x, t, weight, options, backend, reduction, inplace, out_dtype):
        impl = _dispatch.implementation(backend, "cross_entropy")
        A, C, B = x.shape
        R = A * B
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        wsum = None if weight is None else weight.sum(dtype=acc).reshape(1)
        spec = CESpec(weight, wsum, *options)
        denom = _denominator(t, spec, C, R, acc)
        coef = 1.0 / denom if reduction == "mean" else torch.ones(1, dtype=acc, device=x.device)
        fused = (
            getattr(impl, "FUSES_GRAD", True)
            and ctx.needs_input_grad[0]
            and not ctx.needs_input_grad[1]
            and reduction != "none"
            and not inplace
            and not spec.logp_input
            and not compiling()
        )
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device) if fused else None
        if backend == "triton" and compiling():
            ops = _dispatch.implementation("triton", "ops")
            loss_rows, lse = ops.ce_fwd_op(x, t, weight, wsum, coef, *_op_options(options))
        else:
            loss_rows, lse = impl.ce_fwd(x, t, spec, coef, grad)
        if reduction == "none":
            out = cast(loss_rows, out_dtype)
        elif reduction == "sum":
            out = cast(loss_rows.sum(), out_dtype)
        else:
            out = cast(loss_rows.sum() / denom[0], out_dtype)
        ctx.save_for_backward(x, t, weight, wsum, lse, coef)
        ctx.grad_buf = grad
        ctx.options, ctx.backend, ctx.inplace = options, backend, inplace
        ctx.backwards_done = 0
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, t, weight, wsum, lse, coef = ctx.saved_tensors
        impl = _dispatch.implementation(ctx.backend, "cross_entropy")
        first = ctx.backwards_done == 0
        ctx.backwards_done += 1
        if ctx.grad_buf is not None and first:
            grad, ctx.grad_buf = ctx.grad_buf, None
            impl.scale_(grad, gout.reshape(1))
            return grad, None, None, None, None, None, None, None
        if ctx.inplace and not first:
            raise RuntimeError(
                "cross_entropy(inplace_backward=True) overwrote the logits with their gradient in the "
                "first backward; it cannot be backpropagated through twice"
            )
        if ctx.backend == "triton" and compiling():
            ops = _dispatch.implementation("triton", "ops")
            want_tgrad = ctx.needs_input_grad[1]
            grad, tgrad = ops.ce_bwd_op(
                x, t, weight, wsum, lse, gout.contiguous(), coef, *_op_options(ctx.options), want_tgrad
            )
            return grad, tgrad if want_tgrad else None, None, None, None, None, None, None
        spec = CESpec(weight, wsum, *ctx.options)
        inplace = ctx.inplace and ctx.needs_input_grad[0] and not compiling()
        grad = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        tgrad = torch.empty(t.shape, dtype=t.dtype, device=t.device) if ctx.needs_input_grad[1] else None
        impl.ce_bwd(x, t, spec, lse, gout.contiguous(), coef, grad, tgrad)
        return grad if ctx.needs_input_grad[0] else None, tgrad, None, None, None, None, None, None


def _ce_unsupported(input, target, weight, ignore_index, label_smoothing, nll: bool) -> bool:
    """True when the call is not one this module models (torch decides what then happens)."""
    if input.dtype not in FLOAT_DTYPES or input.dim() == 0:
        return True
    if target.device != input.device or (weight is not None and weight.device != input.device):
        return True
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return True
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if weight is not None and (weight.dim() != 1 or weight.numel() != C):
        return True
    if label_smoothing > 1.0:
        return True
    if not nll and target.shape == input.shape:
        return not target.dtype.is_floating_point or ignore_index >= 0 or target.dtype not in FLOAT_DTYPES
    if target.dtype not in (torch.int64, torch.uint8):
        return True
    if weight is not None and weight.dtype != input.dtype:
        return True
    if input.dim() == 1:
        return target.dim() != 0
    return tuple(target.shape) != (input.shape[0], *input.shape[2:])


def _run(op, torch_fn, torch_args, input, target, weight, reduction, options, inplace, unsupported):
    """Validate, dispatch and run one CE-family call; shared by ``cross_entropy`` and ``nll_loss``."""
    prob = options[4]
    if unsupported:
        try:
            raise_like_torch(torch_fn, *torch_args)
        except TorchAccepted as accepted:
            _dispatch.backend(input, op=op, unsupported="this combination of arguments")
            return accepted.result
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if not prob:
        check_target_range(target, C, options[0])
    backend = _dispatch.backend(input, target, weight, op=op)
    x = as_3d(input, 1 if input.dim() >= 2 else 0)
    if prob:
        t = as_3d(target, 1 if target.dim() >= 2 else 0)
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    else:
        t = target.reshape(x.shape[0], x.shape[2])
        out_dtype = input.dtype
    out = CrossEntropyFunction.apply(x, t, weight, options, backend, reduction, inplace, out_dtype)
    if reduction == "none":
        out = out.reshape(input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ())
    return out


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``, any floating dtype.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64 or uint8), or class
            probabilities of ``input``'s shape (floating).
        weight: class weights ``(C,)``, or None.
        size_average: deprecated, mapped as torch maps it.
        ignore_index: index target whose positions contribute nothing (index targets only).
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (shape of the target's batch/spatial dims) | ``'mean'`` | ``'sum'``.
        label_smoothing: ``eps`` in ``[0, 1]``: mixes the target with the uniform distribution.
        z_loss: adds ``z_loss * lse**2`` per non-ignored position (weighted like its NLL term)
            inside the same reduction; ``lse`` is the logits' log-sum-exp.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` before the softmax.
        inplace_backward: let the backward write the gradient into ``input``'s memory (saves one
            logits-sized buffer; ``input`` holds the gradient afterwards).

    Returns:
        The loss in the input's dtype (promoted with a probability target's dtype): 0-d for
        'mean' / 'sum', ``(N, d1, ..., dk)`` for 'none'.
    """
    reduction = reduction_string(size_average, reduce, reduction)
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if not math.isfinite(float(z_loss)):
        raise ValueError(f"z_loss must be finite, got {z_loss!r}")
    unsupported = _ce_unsupported(input, target, weight, ignore_index, label_smoothing, nll=False)
    torch_args = (input, target, weight, None, ignore_index, None, reduction, label_smoothing)
    prob = not unsupported and target.shape == input.shape
    options = (
        int(ignore_index),
        max(float(label_smoothing), 0.0),
        float(z_loss),
        None if softcap is None else float(softcap),
        prob,
        False,
    )
    return _run(
        "cross_entropy", F.cross_entropy, torch_args, input, target, weight, reduction, options,
        inplace_backward, unsupported,
    )  # fmt: skip


def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of log-probabilities, as ``torch.nn.functional.nll_loss``.

    Args:
        input: log-probabilities ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64 or uint8).
        weight: class weights ``(C,)``, or None.
        size_average: deprecated, mapped as torch maps it.
        ignore_index: target value whose positions contribute nothing.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in the input's dtype: 0-d, or ``(N, d1, ..., dk)`` for 'none'.
    """
    reduction = reduction_string(size_average, reduce, reduction)
    unsupported = _ce_unsupported(input, target, weight, ignore_index, 0.0, nll=True)
    torch_args = (input, target, weight, None, ignore_index, None, reduction)
    options = (int(ignore_index), 0.0, 0.0, None, False, True)
    return _run("nll_loss", F.nll_loss, torch_args, input, target, weight, reduction, options, False, unsupported)
