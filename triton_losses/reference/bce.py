"""Pure-PyTorch binary cross-entropy with the kernels' interface: the CPU fallback.

Same formulas as ``kernels.bce`` (see its docstring), in fp32 (fp64 for fp64 data), over chunks
of about ``_chunks.CHUNK_ELEMS`` elements so no full-size fp32 intermediate is held.

Speed on a CPU comes from the number of passes over a chunk, so each chunk is computed with
in-place / ``out=`` ops (no masks: ``torch.where`` on a random mask costs ten times an ``add``),
straight into the output when it is in the compute dtype (fp32 / fp64 data), and chunks are
small enough that the few temporaries stay in the L2 cache between passes.
"""

from __future__ import annotations

import torch

from .._precision import acc_dtype
from ._chunks import chunks, direct, elementwise_forward, negated, part, store


def _log1p_exp_neg_abs(x: torch.Tensor, out=None) -> torch.Tensor:
    """``log1p(exp(-|x|))`` (softplus(-|x|)), in four in-place passes."""
    return torch.abs(x, out=out).neg_().exp_().log1p_()


def _neg_log_sigmoid(x: torch.Tensor, out=None) -> torch.Tensor:
    """``-logsigmoid(x) = log1p(exp(-|x|)) - min(x, 0)``: finite for any finite ``x``."""
    return _log1p_exp_neg_abs(x, out).sub_(torch.clamp(x, max=0.0))


def _loss(x, y, w, pw, logits: bool, out=None) -> torch.Tensor:
    if logits:  # (1 - y) * x - lw * logsigmoid(x), lw = (pw - 1) * y + 1
        loss = _neg_log_sigmoid(x, out)
        if pw is not None:
            loss.mul_(torch.sub(pw, 1.0).mul_(y).add_(1.0))
        # Not addcmul_: it fuses into one FMA, which differs from torch where (1 - y) * x overflows.
        loss.add_(torch.rsub(y, 1.0).mul_(x))
    else:  # (y - 1) * max(log(1 - x), -100) - y * max(log(x), -100)
        loss = torch.neg(x, out=out).log1p_().clamp_min_(-100.0).mul_(torch.sub(y, 1.0))
        loss.addcmul_(y, torch.log(x).clamp_min_(-100.0), value=-1.0)  # x, y in [0, 1]: no overflow
    return loss if w is None else loss.mul_(w)


def bce_fwd(x, y, w, pw, logits: bool, reduce: bool, denom: int) -> torch.Tensor:
    """The elementwise loss in ``x``'s dtype, or (``reduce``) partial sums divided by ``denom``.

    Args:
        x: input (logits or probabilities), any shape and strides.
        y: target of ``x``'s shape and dtype.
        w: weight expanded to ``x``'s shape, or None.
        pw: pos_weight expanded to ``x``'s shape, or None (``logits`` only).
        logits: ``x`` holds logits.
        reduce: return partial sums (one per chunk, fp32 / fp64) instead of the elementwise loss.
        denom: what each partial sum is divided by (1 for 'sum', the element count for 'mean').
    """
    acc = acc_dtype(x.dtype)
    out = elementwise_forward(
        x, reduce, lambda idx, dst: _loss(*(part(t, idx, acc) for t in (x, y, w, pw)), logits, dst)
    )
    return out.div_(denom) if reduce and denom != 1 else out


def _grads(x, y, pw, g, neg_g, logits: bool, eps: float, dx, dy):
    """``(dloss/dx * g, dloss/dy * g)`` of one chunk, computed into ``dx`` / ``dy`` when given; False: not wanted.

    ``neg_g``: ``-g`` as a 0-d tensor (see ``negated``), or None.
    """
    d_x = d_y = None
    if logits and pw is None:
        if dx is not False:
            d_x = torch.sigmoid(x, out=dx).sub_(y).mul_(g)
        if dy is not False:
            d_y = torch.mul(x, neg_g, out=dy) if neg_g is not None else torch.mul(x, g, out=dy).neg_()
    elif logits:  # dx = (pt + 1 - y) * sigmoid(x) - pt, pt = pw * y; dy = logsigmoid(-x) - pw * logsigmoid(x)
        if dx is not False:
            pt = torch.mul(pw, y)
            d_x = torch.sigmoid(x, out=dx).mul_(torch.add(pt, 1.0).sub_(y)).sub_(pt).mul_(g)
        if dy is not False:
            sp = _log1p_exp_neg_abs(x)
            ls_pos = torch.clamp(x, max=0.0).sub_(sp)
            ls_neg = torch.clamp(x, min=0.0).neg_().sub_(sp)
            d_y = torch.sub(ls_neg, ls_pos.mul_(pw), out=dy).mul_(g)
    else:  # dx = (x - y) / max((1 - x) * x, eps); dy = -log(x / (1 - x))
        one_minus_x = torch.rsub(x, 1.0)
        if dx is not False:
            d_x = torch.sub(x, y, out=dx).div_(torch.mul(one_minus_x, x).clamp_min_(eps)).mul_(g)
        if dy is not False:
            d_y = torch.div(x, one_minus_x, out=dy).log_().neg_().mul_(g)
    return d_x, d_y


def bce_bwd(x, y, w, pw, logits: bool, g: torch.Tensor, eps: float, need_dx: bool, need_dy: bool):
    """``(dx, dy)`` of ``sum(g * loss)`` in ``x``'s shape and dtype (None where not needed).

    ``g`` is the upstream gradient expanded to ``x``'s shape; ``eps`` the floor of the
    probability-input gradient's denominator (``binary_cross_entropy`` only).
    """
    acc = acc_dtype(x.dtype)
    dx = torch.empty_like(x) if need_dx else None
    dy = torch.empty_like(y) if need_dy else None
    neg_g = negated(g, acc) if w is None else None
    for idx in chunks(x.shape):
        xs, ys, gs, ws, pws = (part(t, idx, acc) for t in (x, y, g, w, pw))
        if ws is not None:
            gs = gs * ws
        ddx = direct(dx, idx, acc) if need_dx else False
        ddy = direct(dy, idx, acc) if need_dy else False
        d_x, d_y = _grads(xs, ys, pws, gs, neg_g, logits, eps, ddx, ddy)
        store(dx, idx, d_x, ddx)
        store(dy, idx, d_y, ddy)
    return dx, dy
