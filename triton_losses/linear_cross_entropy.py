"""``linear_cross_entropy``: cross-entropy of a linear layer's output without holding its logits.

``linear_cross_entropy(x, W, t)`` equals ``cross_entropy(linear(x, W, b), t)`` (classes last) in
loss and in the gradients for ``x``, ``W`` and ``b``, but the ``(N, V)`` logits only ever exist one
chunk of rows at a time (see ``_linear_ce_chunks``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _dispatch
from . import _linear_ce_chunks as chunks
from ._checks import FLOAT_DTYPES, cast, reduction_string
from .cross_entropy import _denominator, cross_entropy
from .spec import CESpec

__all__ = ["LinearCrossEntropyFunction", "linear_cross_entropy"]


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of one chunked linear cross-entropy on rows ``x`` ``(N, H)``.

    'mean' / 'sum': the forward computes the loss and, for the operands that need them, the
    gradients in the same pass over the chunks; the first backward only scales them by the upstream
    gradient (a device-side no-op for the usual 1.0). 'none' (and any second backward): the forward
    keeps each row's log-sum-exp, and the backward recomputes the chunks' logits.
    """

    @staticmethod
    def forward(ctx, x, w, b, t, weight, rows, n, options, reduction, backend, chunk, wgrad, out_dtype):
        acc = chunks.acc_dtype(x.dtype)
        V = w.shape[0]
        wsum = None if weight is None else weight.sum(dtype=acc).reshape(1)
        spec = CESpec(weight, wsum, *options)
        p = chunks.Problem(x, w, b, t, spec, rows, n, chunk, backend, wgrad)
        denom = _denominator(t, spec, V, x.shape[0], acc)
        coef = 1.0 / denom if reduction == "mean" else torch.ones(1, dtype=acc, device=x.device)
        need = tuple(ctx.needs_input_grad[:3])
        fuse = reduction != "none" and any(need)
        res = chunks.run(p, coef, need if fuse else (False, False, False), per_row=reduction == "none", save_lse=True)
        if reduction == "none":
            out = cast(res.rows_loss, out_dtype)
        elif reduction == "sum":
            out = cast(res.total, out_dtype)
        else:
            out = cast(res.total / denom[0], out_dtype)
        ctx.save_for_backward(x, w, b, t, weight, wsum, rows, res.lse, coef)
        ctx.grads = res.grads if fuse else None
        ctx.plan = (n, options, reduction, backend, chunk, wgrad)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, w, b, t, weight, wsum, rows, lse, coef = ctx.saved_tensors
        n, options, reduction, backend, chunk, wgrad = ctx.plan
        nones = (None,) * 10
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            factor = gout.reshape(1)
            for g in grads:
                if g is not None:
                    _scale_(g, factor, backend)
            return (*grads, *nones)
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return (None, None, None, *nones)
        acc = chunks.acc_dtype(x.dtype)
        g = gout.reshape(-1).to(acc)
        if reduction == "none" and rows is not None:
            g = g.index_select(0, rows)
        p = chunks.Problem(x, w, b, t, CESpec(weight, wsum, *options), rows, n, chunk, backend, wgrad)
        res = chunks.run(p, coef, need, lse=lse, gout=g.contiguous())
        return (*res.grads, *nones)


def _scale_(g: torch.Tensor, factor: torch.Tensor, backend: str) -> None:
    """``g *= factor`` in place, on the device (no sync); the Triton kernel skips ``factor == 1``."""
    if backend == "triton" and g.is_contiguous():
        _dispatch.implementation("triton", "cross_entropy").scale_(g, factor)
    else:
        g.mul_(factor.to(g.dtype))


def _composite(input, w, target, b, weight, reduction, ignore_index, label_smoothing, z_loss, softcap):
    """``cross_entropy(linear(...))`` with classes last, holding the logits (the unchunked fallback)."""
    logits = F.linear(input, w, b)
    flat = logits.dim() > 2
    if flat:
        V = logits.shape[-1]
        target = target.reshape(-1, V) if target.shape == logits.shape else target.reshape(-1)
        logits = logits.reshape(-1, V)
    if z_loss or softcap is not None:
        out = cross_entropy(logits, target, weight, None, ignore_index, None, reduction, label_smoothing,
                            z_loss=z_loss, softcap=softcap)  # fmt: skip
    else:
        out = F.cross_entropy(logits, target, weight, None, ignore_index, None, reduction, label_smoothing)
    return out.reshape(input.shape[:-1]) if flat and reduction == "none" else out


def _unsupported(input, w, target, b, weight, ignore_index, label_smoothing) -> str | None:
    """Why the chunked path cannot serve this call (torch then decides what happens), or None."""
    if input.dtype not in FLOAT_DTYPES or input.dim() == 0:
        return "this input"
    if w.dim() != 2 or w.shape[1] != input.shape[-1] or w.shape[0] == 0:
        return "this linear_weight shape"
    if w.dtype != input.dtype or (b is not None and b.dtype != input.dtype):
        return "mixed dtypes"
    devices = {input.device, w.device, target.device}
    devices |= {v.device for v in (b, weight) if v is not None}
    if len(devices) != 1:
        return "tensors on different devices"
    V = w.shape[0]
    if b is not None and tuple(b.shape) != (V,):
        return "this linear_bias shape"
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != V or weight.dtype != input.dtype:
            return "this class weight"
        if weight.requires_grad and torch.is_grad_enabled():
            return "a class weight that requires grad"
    if label_smoothing > 1.0:
        return "label_smoothing > 1"
    batch = tuple(input.shape[:-1])
    if tuple(target.shape) == (*batch, V):
        if target.dtype not in FLOAT_DTYPES or ignore_index >= 0:
            return "this probability target"
        if target.requires_grad and torch.is_grad_enabled():
            return "a probability target that requires grad"
        return None
    if tuple(target.shape) != batch or target.dtype not in (torch.int64, torch.uint8):
        return "this target"
    return None


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    fp32_weight_grad: bool | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``linear(input, linear_weight, linear_bias)``, never holding the logits.

    Computes ``cross_entropy(linear(input, W, b), target, ...)`` with the classes in the last
    dimension (as ``torch.nn.functional.linear_cross_entropy``) and its gradients for ``input``,
    ``W`` and ``b``, one chunk of rows at a time: peak working memory is one ``(chunk, V)`` buffer.
    Rows whose target is ``ignore_index`` cost no matmul work. The gradient of ``b`` is accumulated
    over the chunks in fp32 (fp64 for fp64); that of ``W`` too, unless ``fp32_weight_grad`` says otherwise.

    Args:
        input: hidden states ``(H,)``, ``(N, H)`` or ``(..., H)``, floating dtype.
        linear_weight: ``(V, H)``, ``input``'s dtype.
        target: class indices ``input.shape[:-1]`` (int64 or uint8), or class probabilities
            ``(*input.shape[:-1], V)`` (floating; no gradient flows to them).
        linear_bias: ``(V,)`` or None.
        weight: class weights ``(V,)`` in ``input``'s dtype, or None.
        reduction: ``'none'`` (loss of shape ``input.shape[:-1]``) | ``'mean'`` | ``'sum'``.
        ignore_index: index target whose positions contribute nothing.
        label_smoothing: ``eps`` in ``[0, 1]``, as in ``cross_entropy``.
        z_loss: adds ``z_loss * lse**2`` per non-ignored row, as in :func:`triton_losses.cross_entropy`.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` before the softmax.
        chunk_size: rows per chunk; None picks it from the logits-buffer budget (see
            ``_linear_ce_chunks.chunk_rows``).
        fp32_weight_grad: for a 16-bit ``W``: accumulate its gradient over the chunks in an fp32
            ``(V, H)`` buffer (True; 4 bytes per weight element of extra memory), or in ``W``'s dtype
            (False; each chunk's GEMM sums in fp32, then rounds once when adding to the running
            gradient, so one rounding per chunk). None: fp32 when that buffer fits in
            ``_linear_ce_chunks.WGRAD_FP32_BYTES`` (256 MiB), else ``W``'s dtype.

    Returns:
        The loss in ``input``'s dtype (promoted with a probability target's dtype): 0-d for
        'mean' / 'sum', ``input.shape[:-1]`` for 'none'.
    """
    reduction = reduction_string(None, None, reduction)
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if not math.isfinite(float(z_loss)):
        raise ValueError(f"z_loss must be finite, got {z_loss!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if fp32_weight_grad not in (None, True, False):
        raise ValueError(f"fp32_weight_grad must be True, False or None, got {fp32_weight_grad!r}")
    op = "linear_cross_entropy"
    why = _unsupported(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing)
    if why is not None:
        # Materialises the logits: torch raises its own error here, or the call is one the chunks
        # do not model (``auto`` returns the composite's result, ``triton`` raises).
        result = _composite(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                            label_smoothing, z_loss, softcap)  # fmt: skip
        _dispatch.backend(input, op=op, unsupported=why)
        return result
    V = linear_weight.shape[0]
    H = input.shape[-1]
    batch = input.shape[:-1]
    prob = target.dim() == input.dim()
    backend = _dispatch.backend(input, linear_weight, target, op=op)
    x = input.reshape(-1, H)
    t = target.reshape(-1, V) if prob else target.reshape(-1)
    rows, n = (None, x.shape[0]) if prob else chunks.live_rows(t, int(ignore_index), V)
    chunk = chunks.chunk_rows(n, V, input.element_size(), input.device, chunk_size)
    options = (int(ignore_index), max(float(label_smoothing), 0.0), float(z_loss),
               None if softcap is None else float(softcap), prob, False)  # fmt: skip
    out_dtype = input.dtype
    if prob:
        out_dtype = torch.promote_types(out_dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    out = LinearCrossEntropyFunction.apply(
        x, linear_weight, linear_bias, t, weight, rows, n, options, reduction, backend, chunk,
        chunks.weight_grad_dtype(linear_weight, fp32_weight_grad), out_dtype,
    )  # fmt: skip
    return out.reshape(batch) if reduction == "none" else out
