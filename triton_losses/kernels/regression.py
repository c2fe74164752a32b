"""Regression losses (L1, MSE, smooth L1, Huber, Poisson NLL, Gaussian NLL): one kernel and its launchers.

One kernel serves every loss (``LOSS`` constexpr) and every pass: the 'none' forward (the loss at
the broadcast shape), the reducing forward (one fp32 partial sum per program), which also writes
the gradients of the reduced loss when they are needed (each operand read once, each gradient
written once: the backward then only rescales them, see :func:`scale_`), and the backward from an
upstream gradient. Operands are read in place through their strides over the broadcast shape
(see ``_elementwise``): a broadcast target, weight or variance is a stride-0 view, never a copy.

A negative gaussian variance trips a ``tl.device_assert`` on CUDA (the forward launches with
``debug=True`` then); CPU tensors get torch's ``ValueError`` from the public function.

Formulas (torch's, ``d = x - y``), in fp32 (fp64 when an operand is fp64), ``g`` the upstream gradient::

    l1         |d|                                  dx = g * sign(d)       (0 at d = 0 and NaN)
    mse        d**2                                 dx = 2 * g * d
    smooth_l1  |d| < b ? 0.5 * d**2 / b : |d| - 0.5 * b     dx = g * (d < -b ? -1 : d > b ? 1 : d / b)
    huber      |d| < t ? 0.5 * d**2 : t * (|d| - 0.5 * t)    dx = g * (d < -t ? -t : d > t ? t : d)
    (dy = -dx for these four; with a weight ``w`` the loss and both gradients are multiplied by it)
    poisson    log_input: exp(x) - y * x      dx = exp(x) - y       dy = -x
               else:      x - y * log(x + e)  dx = 1 - y / (x + e)  dy = -log(x + e)
               full: + (y * log(y) - y + 0.5 * log(2 pi y)) where y > 1, and dy + log(y) + 0.5 / y there
               (where y <= 1 the term is 0 and dy gets 0 * (log(y) + 0.5 / y): NaN for y <= 0, as torch)
    gaussian   v' = max(v, e):  0.5 * (log(v') + d**2 / v') [+ 0.5 * log(2 pi)]
               dx = d / v'   dy = -d / v'   dv = 0.5 * (1 / v' - d**2 / v'**2)  (the clamp passes the gradient)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..options import RegressionOptions
from ._common import (
    assert_options,
    scale_,  # noqa: F401  (the fused-gradient rescale every family shares)
)
from ._elementwise import (
    fake_grads,
    fake_loss,
    fused_backward,
    fused_forward,
    fused_upstream,
    joined,
    load_tile,
    op_grads,
    op_loss,
    partials_dtype,
    store_fused,
    tile_coords,
    traced_fused,
)

FUSES_GRAD = True
LOSSES = {"l1": 0, "mse": 1, "smooth_l1": 2, "huber": 3, "poisson": 4, "gaussian": 5}
_L1, _MSE, _SMOOTH_L1, _HUBER, _POISSON, _GAUSSIAN = (tl.constexpr(v) for v in LOSSES.values())


@triton.jit
def _sign(d):
    """``sign(d)``: -1, 0 or 1; 0 for NaN (torch's CPU ``sign``)."""
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)


@triton.jit
def _clip(d, t):
    """``d`` clipped to ``[-t, t]``; NaN stays NaN."""
    return tl.where(d < -t, -t, tl.where(d > t, t, d))


@triton.jit
def _poisson(x, y, eps, LOG_INPUT: tl.constexpr, FULL: tl.constexpr):
    """``(loss, dloss/dx, dloss/dy)`` of the Poisson NLL."""
    if LOG_INPUT:
        ex = tl.exp(x)
        loss = ex - y * x
        dx = ex - y
        dy = -x
    else:
        xe = x + eps
        lx = tl.log(xe)
        loss = x - y * lx
        dx = 1.0 - y / xe
        dy = -lx
    if FULL:
        ly = tl.log(y)
        small = y <= 1.0
        loss += tl.where(small, 0.0, y * ly - y + 0.5 * tl.log(6.283185307179586 * y))
        s = ly + 0.5 / y
        dy += tl.where(small, 0.0 * s, s)
    return loss, dx, dy


@triton.jit
def _gaussian(d, v, eps, FULL: tl.constexpr):
    """``(loss, dloss/dd, dloss/dv)`` of the Gaussian NLL, ``v`` clamped below at ``eps`` (NaN stays NaN)."""
    vc = tl.where(v < eps, eps, v)
    r = d / vc
    loss = 0.5 * (tl.log(vc) + d * r)
    if FULL:
        loss += 0.9189385332046727  # 0.5 * log(2 pi)
    return loss, r, 0.5 * (1.0 - d * r) / vc


@triton.jit
def _regression_math(x, y, v, p, LOSS: tl.constexpr, LOG_INPUT: tl.constexpr, FULL: tl.constexpr):
    """``(loss, dx, dy, dv)`` per lane, before the upstream gradient and any weight (``dv``: gaussian only)."""
    d = x - y
    dv = d
    if LOSS == _POISSON:
        loss, dx, dy = _poisson(x, y, p, LOG_INPUT, FULL)
    else:
        if LOSS == _L1:
            loss = tl.abs(d)
            dx = _sign(d)
        elif LOSS == _MSE:
            loss = d * d
            dx = 2.0 * d
        elif LOSS == _SMOOTH_L1:
            ad = tl.abs(d)
            loss = tl.where(ad < p, 0.5 * d * d / p, ad - 0.5 * p)
            dx = tl.where(d < -p, -1.0, tl.where(d > p, 1.0, d / p))
        elif LOSS == _HUBER:
            ad = tl.abs(d)
            loss = tl.where(ad < p, 0.5 * d * d, p * (ad - 0.5 * p))
            dx = _clip(d, p)
        else:
            loss, dx, dv = _gaussian(d, v, p, FULL)
        dy = -dx
    return loss, dx, dy, dv


@triton.jit
def _regression_kernel(
    x_ptr, xs0, xs1, xs2,  # input at the broadcast shape, collapsed (D0, D1, D2) strides
    y_ptr, ys0, ys1, ys2,  # target, same shape
    v_ptr, vs0, vs1, vs2,  # weight (l1 / mse / huber) or var (gaussian), same shape (HAS_V)
    g_ptr, gs0, gs1, gs2,  # upstream gradient (HAS_G): one value (G_SCALAR) or the shape
    scale, scale_lo,  # multiplies the upstream gradient (fp32 hi / lo parts)
    out_ptr, part_ptr,  # loss at the shape (WRITE_LOSS); (n_programs,) partial sums (REDUCE)
    da_ptr, db_ptr, dc_ptr, os0, os1, os2,  # gradients w.r.t. input, target, var, sharing one layout
    R, D1, D2,
    p, p_lo,  # beta / delta / eps (hi / lo parts)
    var, var_lo,  # gaussian's variance when it is a number (not HAS_V)
    LOSS: tl.constexpr, LOG_INPUT: tl.constexpr, FULL: tl.constexpr, HAS_V: tl.constexpr,
    WRITE_LOSS: tl.constexpr, REDUCE: tl.constexpr, WRITE_DA: tl.constexpr, WRITE_DB: tl.constexpr,
    WRITE_DC: tl.constexpr, HAS_G: tl.constexpr, G_SCALAR: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_I32: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One tile of a regression loss: its loss (stored or summed) and / or its gradients."""
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C, ROWS_I32)
    x = load_tile(x_ptr, i0, i1, cols, xs0, xs1, xs2, mask, ACC)
    y = load_tile(y_ptr, i0, i1, cols, ys0, ys1, ys2, mask, ACC)
    if HAS_V:
        v = load_tile(v_ptr, i0, i1, cols, vs0, vs1, vs2, mask, ACC)
        if LOSS == _GAUSSIAN:
            tl.device_assert(~(v < 0.0), "var has negative entry/entries")
    else:
        v = joined(var, var_lo, ACC)
    loss, dx, dy, dv = _regression_math(x, y, v, joined(p, p_lo, ACC), LOSS, LOG_INPUT, FULL)
    g = fused_upstream(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, joined(scale, scale_lo, ACC), ACC, HAS_G, G_SCALAR)
    if HAS_V and LOSS != _GAUSSIAN:  # a weight
        loss = loss * v
        g = g * v
    store_fused(loss, dx * g, dy * g, dv * g, out_ptr, part_ptr, da_ptr, db_ptr, dc_ptr, i0, i1, cols,
                os0, os1, os2, mask, WRITE_LOSS, REDUCE, WRITE_DA, WRITE_DB, WRITE_DC)  # fmt: skip


def _asserts(x: Tensor, opts: RegressionOptions, v: Tensor | None) -> dict:
    """Launch options that keep the gaussian forward's ``tl.device_assert`` on CUDA (Triton drops it unless ``debug``)."""
    return assert_options(x) if opts.loss == "gaussian" and v is not None else {}


def _flags(opts: RegressionOptions, v: Tensor | None) -> dict:
    return dict(LOSS=LOSSES[opts.loss], LOG_INPUT=opts.log_input, FULL=opts.full, HAS_V=v is not None)


def regression_fwd(
    x: Tensor,
    y: Tensor,
    v: Tensor | None,
    opts: RegressionOptions,
    reduce: bool,
    out_dtype: torch.dtype,
    scale: float = 1.0,
    g: Tensor | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The loss ('none') or its partial sums, and with ``reduce`` the gradients of the reduced loss.

    Args:
        x, y: input and target expanded to the broadcast shape (stride-0 views where broadcast).
        v: weight (l1 / mse / huber) or variance (gaussian) at that shape, or None.
        opts: the loss and its options.
        reduce: return per-program partial sums (fp32, fp64 when an operand is fp64) instead of the loss.
        out_dtype: dtype of the loss when not ``reduce``.
        scale: the reduced loss's factor (``1 / numel`` for 'mean', 1 for 'sum'); the gradients carry it.
        g: a one-element tensor the gradients are also multiplied by (``1 / sum(weight)``), or None.
        needs: which gradients (w.r.t. x, y, v) to write, with ``reduce`` only.

    Returns:
        ``(out, dx, dy, dv)``: the partial sums or the loss at the shape; the gradients at the shape
        in their operand's dtype (None where not asked).
    """
    params = (opts.p, opts.var)
    flags = dict(**_flags(opts, v), **_asserts(x, opts, v))
    return fused_forward(_regression_kernel, [x, y, v], out_dtype, reduce, scale, g, needs, params, **flags)


def regression_bwd(
    x: Tensor, y: Tensor, v: Tensor | None, opts: RegressionOptions, g: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dy, dv)`` of ``sum(g * loss)`` at the broadcast shape (None where not asked).

    ``g`` is the upstream gradient expanded to the shape (a stride-0 view of one value for a
    reduced loss, already including its ``1 / numel``); the rest as in :func:`regression_fwd`.
    """
    return fused_backward(_regression_kernel, [x, y, v], g, needs, (opts.p, opts.var), **_flags(opts, v))


# ---- the same launchers as torch.library custom ops, for traced calls ------------------------


@torch.library.custom_op("triton_losses::regression_fwd", mutates_args=())
def _regression_fwd_op(
    x: Tensor, y: Tensor, v: Tensor | None, loss: str, p: float, var: float, full: bool, log_input: bool,
    reduce: bool, out_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """:func:`regression_fwd` without fused gradients: the loss, or its sum as ``(1,)`` when ``reduce``."""
    out = regression_fwd(x, y, v, RegressionOptions(loss, p, var, full, log_input), reduce, out_dtype)[0]
    return op_loss(out, reduce)


@_regression_fwd_op.register_fake
def _(x, y, v, loss, p, var, full, log_input, reduce, out_dtype):
    return fake_loss(x, reduce, out_dtype, partials_dtype(out_dtype, x, y, v))


@torch.library.custom_op("triton_losses::regression_bwd", mutates_args=())
def _regression_bwd_op(
    x: Tensor, y: Tensor, v: Tensor | None, loss: str, p: float, var: float, full: bool, log_input: bool,
    g: Tensor, need_x: bool, need_y: bool, need_v: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`regression_bwd`; a gradient not asked for comes back empty."""
    opts = RegressionOptions(loss, p, var, full, log_input)
    grads = regression_bwd(x, y, v, opts, g, (need_x, need_y, need_v))
    return op_grads(grads, (x, y, v if v is not None else x))


@_regression_bwd_op.register_fake
def _(x, y, v, loss, p, var, full, log_input, g, need_x, need_y, need_v):
    return fake_grads((x, y, v if v is not None else x), (need_x, need_y, need_v), x.shape)


TRACED = traced_fused("regression", _regression_fwd_op, _regression_bwd_op)
