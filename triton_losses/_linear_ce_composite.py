"""``linear_cross_entropy`` in plain differentiable torch ops, holding the logits.

Used where the chunked engine does not serve a call: calls it does not model (torch's own function
then decides, and raises torch's errors), and double backward (``create_graph=True``), whose
gradients must themselves be differentiable. It mirrors torch 2.13's reference path of
``F.linear_cross_entropy`` (its checks, with torch's messages), accepts any batch shape
``(..., H)`` for a 2-D weight, and adds ``z_loss`` and ``softcap`` as ``triton_losses.cross_entropy``
defines them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn import _reduction

from ._precision import acc_dtype
from ._reduce import row_scale

# torch >= 2.13: its own function, to which calls without our extras are handed.
TORCH_LINEAR_CE = getattr(F, "linear_cross_entropy", None)


def torch_checks(input, linear_weight, target, linear_bias, ignore_index) -> None:
    """torch 2.13 ``F.linear_cross_entropy``'s own checks and messages (before any cross-entropy check).

    One extension: a 2-D weight takes any batch shape ``(..., H)`` (torch's accepts ``(H,)`` and ``(N, H)``).
    """
    out_features = tuple(linear_weight.shape[1:-1])
    if input.dim() < 1 or (input.dim() > 2 and (out_features or linear_weight.dim() < 2)):
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    num_classes = linear_weight.shape[0]
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {input.shape[-1]}), got unbatched input with shape {tuple(input.shape)}"
        )
    if target.shape == (*input.shape[:-1], num_classes, *out_features) and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")


def cross_entropy(logits, target, weight, reduction, ignore_index: int, smoothing, z_loss, softcap):
    """``F.cross_entropy`` of ``logits`` (classes in dim 1, or 0 if 1-D) plus ``z_loss`` and ``softcap``.

    ``softcap``: the logits become ``softcap * tanh(logits / softcap)`` first. ``z_loss``: each
    non-ignored position adds ``z_loss * w[target] * lse**2`` (index targets) or ``z_loss * lse**2``
    (probability targets), reduced with the loss's own denominator.
    """
    _reduction.get_enum(reduction)  # torch's ValueError, raised where F.cross_entropy raises it
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    kw = dict(ignore_index=ignore_index, label_smoothing=smoothing)
    if not z_loss:
        return F.cross_entropy(logits, target, weight, reduction=reduction, **kw)
    loss = F.cross_entropy(logits, target, weight, reduction="none", **kw)
    lse = torch.logsumexp(logits.to(acc_dtype(logits.dtype)), 0 if logits.dim() == 1 else 1)
    if target.shape == logits.shape:
        z, denom = z_loss * lse * lse, loss.numel()
    else:
        t = target.long()
        valid = t != ignore_index
        C = logits.shape[0 if logits.dim() == 1 else 1]
        w_t = torch.ones_like(lse) if weight is None else weight.to(lse.dtype)[t.clamp(0, C - 1)]
        w_t = torch.where(valid, w_t, torch.zeros_like(w_t))
        z, denom = z_loss * w_t * lse * lse, w_t.sum()
    loss = loss + z.to(loss.dtype)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / denom


def linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                         label_smoothing, z_loss, softcap):  # fmt: skip
    """``cross_entropy(linear(input, W, b), target)`` after torch's checks (see :func:`torch_checks`)."""
    torch_checks(input, linear_weight, target, linear_bias, ignore_index)
    ignore_index = -100 if ignore_index is None else ignore_index
    C, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    V = math.prod(out_features, start=C)
    b = None if linear_bias is None else linear_bias.reshape(V)
    logits = F.linear(input, linear_weight.reshape(V, linear_weight.shape[-1]), b)
    batch = input.shape[:-1]
    args = (weight, reduction, ignore_index, label_smoothing, z_loss, softcap)
    if len(batch) <= 1:
        return cross_entropy(logits.reshape(*batch, C, *out_features), target, *args)
    prob = target.shape == logits.shape
    flat = cross_entropy(logits.reshape(-1, C), target.reshape(-1, C) if prob else target.reshape(-1), *args)
    return flat.reshape(batch) if reduction == "none" else flat


def differentiable_grads(x, w, b, t, weight, plan, reduction: str, coef, gout, need):
    """Gradients for ``(x, w, b)`` of the chunks' loss, as differentiable functions of them and ``gout``.

    Shapes as the chunk engine sees them: ``x`` ``(N, H)``, ``w`` ``(C * D, H)``, ``b`` ``(C * D,)``,
    ``t`` ``(N, D)`` or ``(N, C, D)``; ``gout`` ``(N * D,)`` ('none') or one value; ``coef`` the
    'mean' scale. The logits are materialised (double backward is the rare, explicit case).
    """
    logits = F.linear(x, w, b).view(x.shape[0], plan.classes, -1)
    rows = cross_entropy(logits, t, weight, "none", plan.ignore_index, plan.smoothing, plan.z_loss, plan.softcap)
    total = (rows.reshape(-1) * row_scale(gout, reduction, coef, acc_dtype(x.dtype))).sum()
    wanted = [v for v, n in zip((x, w, b), need) if n]
    grads = iter(torch.autograd.grad(total, wanted, create_graph=True))
    return tuple(next(grads) if n else None for n in need)
