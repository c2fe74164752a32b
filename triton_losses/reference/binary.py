"""Pure-PyTorch binary cross-entropy with the kernels' interface: the CPU fallback.

Same formulas as ``kernels.binary`` (see its docstring), in fp32 (fp64 for fp64 data), over
chunks of about ``CHUNK_ELEMS`` elements so no full-size fp32 intermediate is held.

Speed on a CPU comes from the number of passes over a chunk, so each chunk is computed with
in-place / ``out=`` ops (no masks: ``torch.where`` on a random mask costs ten times an ``add``),
straight into the output when it is in the compute dtype (fp32 / fp64 data), and chunks are
small enough that the few temporaries stay in the L2 cache between passes.
"""

from __future__ import annotations

import torch

# 256 KiB of fp32 per chunk: a chunk's operands and temporaries (about four) stay in a 2 MiB L2
# cache between the passes, while each op still runs long enough (~10 us) that the per-op host
# overhead (~2 us) stays small. On the 2-core benchmark machine this was the fastest of 16K-256K
# elements for BCE and KL forward+backward: 16K ran ~1.4x slower (overhead), 256K ~10% (L2 misses).
CHUNK_ELEMS = 1 << 16
GRAD_EPS = 9.999999960041972e-13  # torch's BCE backward `static const float EPSILON = 1e-12`, as fp32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunks(shape: torch.Size):
    """Index tuples covering ``shape`` with about CHUNK_ELEMS elements each (``...`` for 0-d).

    Slices of the leading dimension; where one leading index alone holds more than CHUNK_ELEMS
    elements, each leading index with the rest of the shape chunked the same way.
    """
    if len(shape) == 0:
        yield ...  # a 0-d tensor: the whole of it
        return
    inner = shape[1:].numel()
    if len(shape) > 1 and inner > CHUNK_ELEMS:
        for i in range(shape[0]):
            for rest in chunks(shape[1:]):
                yield (i, *rest)
        return
    step = max(1, CHUNK_ELEMS // max(1, inner))
    for a0 in range(0, shape[0], step):
        yield (slice(a0, min(shape[0], a0 + step)),)


def part(t: torch.Tensor | None, idx, acc: torch.dtype) -> torch.Tensor | None:
    """Chunk ``idx`` of ``t`` in ``acc`` (a view, no copy, when ``t`` already is ``acc``)."""
    if t is None:
        return None
    return t[idx] if t.dtype == acc else t[idx].to(acc)


def direct(out: torch.Tensor | None, idx, acc: torch.dtype) -> torch.Tensor | None:
    """``out[idx]`` when results in ``acc`` can be computed straight into it, else None (compute, then copy)."""
    return out[idx] if out is not None and out.dtype == acc else None


def store(out: torch.Tensor | None, idx, value: torch.Tensor, dst: torch.Tensor | None) -> None:
    """Finish ``out[idx] = value`` unless ``value`` was computed in place (``dst``)."""
    if out is not None and dst is None:
        out[idx] = value


def negated(g: torch.Tensor, acc: torch.dtype) -> torch.Tensor | None:
    """``-g`` as a 0-d tensor when ``g`` is one value expanded ('mean' / 'sum'), else None.

    Then ``x * -g`` is one pass where ``-(x * g)`` is two (negation is exact: the same result).
    """
    return -g[(0,) * g.dim()].to(acc) if g.numel() and not any(g.stride()) else None


def elementwise_forward(x: torch.Tensor, reduce: bool, loss_into) -> torch.Tensor:
    """Chunk by chunk: partial sums (one per chunk) if ``reduce``, else the loss in ``x``'s shape and dtype.

    ``loss_into(idx, dst)`` returns the fp32 (fp64) loss of chunk ``idx``, computed into ``dst``
    when ``dst`` is not None (``out[idx]`` itself for 'none' on fp32 / fp64 data).
    """
    acc = acc_dtype(x.dtype)
    out = None if reduce else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    parts = []
    for idx in chunks(x.shape):
        dst = direct(out, idx, acc)
        loss = loss_into(idx, dst)
        if reduce:
            parts.append(loss.sum().reshape(1))
        store(out, idx, loss, dst)
    if reduce:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=acc, device=x.device)
    return out


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


def bce_fwd(x, y, w, pw, logits: bool, reduce: bool) -> torch.Tensor:
    """Partial sums (one per chunk) if ``reduce``, else the elementwise loss in ``x``'s dtype."""
    acc = acc_dtype(x.dtype)
    return elementwise_forward(
        x, reduce, lambda idx, dst: _loss(*(part(t, idx, acc) for t in (x, y, w, pw)), logits, dst)
    )


def _grads(x, y, pw, g, neg_g, logits: bool, dx, dy):
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
            d_x = torch.sub(x, y, out=dx).div_(torch.mul(one_minus_x, x).clamp_min_(GRAD_EPS)).mul_(g)
        if dy is not False:
            d_y = torch.div(x, one_minus_x, out=dy).log_().neg_().mul_(g)
    return d_x, d_y


def bce_bwd(x, y, w, pw, logits: bool, g: torch.Tensor, need_dx: bool, need_dy: bool):
    """``(dx, dy)`` of ``sum(g * loss)``; ``g`` is expanded to ``x``'s shape."""
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
        d_x, d_y = _grads(xs, ys, pws, gs, neg_g, logits, ddx, ddy)
        store(dx, idx, d_x, ddx)
        store(dy, idx, d_y, ddy)
    return dx, dy
