"""Pure-PyTorch elementwise KL divergence with the kernels' interface: the CPU fallback.

Same formulas as ``kernels.kl_div`` (see its docstring), in fp32 (fp64 for fp64 data), over
chunks of about ``_chunks.CHUNK_ELEMS`` elements of the broadcast shape, so no full-size fp32
intermediate is held.
"""

from __future__ import annotations

import torch

from .._precision import acc_dtype
from ._chunks import chunks, direct, elementwise_forward, negated, part, store

# Below the log of the smallest positive fp64 (-745): log(0) = -inf raised to it makes 0 * log(0) = 0.
_LOG_ZERO = -1000.0


def kl_fwd(x: torch.Tensor, y: torch.Tensor, log_target: bool, reduce: bool, denom: int) -> torch.Tensor:
    """The elementwise loss (``x``, ``y`` expanded to one shape), or (``reduce``) partial sums / ``denom``."""
    acc = acc_dtype(x.dtype)

    def loss_into(idx, dst):
        xs, ys = x[idx].to(acc), y[idx].to(acc)
        if log_target:  # exp(y) * (y - x)
            return torch.sub(ys, xs, out=dst).mul_(torch.exp(ys))
        # xlogy(y, y) - y * x, with xlogy as y * max(log(y), _LOG_ZERO): xlogy is not vectorised on a
        # CPU (ten times a log). The floor changes only log(0) = -inf, so 0 * log(0) = 0 as in xlogy;
        # a negative or NaN target still gives NaN, and the products are torch's, so are inf / NaN
        # (not addcmul_, whose FMA differs where y * x overflows).
        return torch.log(ys, out=dst).clamp_min_(_LOG_ZERO).mul_(ys).sub_(torch.mul(ys, xs))

    out = elementwise_forward(x, reduce, loss_into)
    return out.div_(denom) if reduce and denom != 1 else out


def kl_bwd(x, y, log_target: bool, g: torch.Tensor, need_dx: bool, need_dy: bool):
    """``(dx, dy)`` of ``sum(g * loss)`` at the broadcast shape (None where not needed)."""
    acc = acc_dtype(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dy = torch.empty(x.shape, dtype=y.dtype, device=x.device) if need_dy else None
    neg_g = negated(g, acc)
    for idx in chunks(x.shape):
        xs, ys, gs = part(x, idx, acc), part(y, idx, acc), part(g, idx, acc)
        ddx, ddy = direct(dx, idx, acc), direct(dy, idx, acc)
        d_x = d_y = None
        if log_target:  # dx = -g * e^y, dy = g * e^y * (y - x) + g * e^y
            ge = torch.exp(ys).mul_(gs)
            d_x = torch.neg(ge, out=ddx) if need_dx else None
            d_y = torch.sub(ys, xs, out=ddy).mul_(ge).add_(ge) if need_dy else None
        else:  # dx = -(g * y), dy = g * (log y + y / y) - g * x (NaN at y = 0, as torch's)
            if need_dx:
                d_x = torch.mul(ys, neg_g, out=ddx) if neg_g is not None else torch.mul(gs, ys, out=ddx).neg_()
            if need_dy:
                d_y = torch.log(ys, out=ddy).addcdiv_(ys, ys).mul_(gs).sub_(torch.mul(gs, xs))
        store(dx, idx, d_x, ddx)
        store(dy, idx, d_y, ddy)
    return dx, dy
