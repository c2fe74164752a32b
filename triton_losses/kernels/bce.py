"""Binary cross-entropy kernels (on probabilities, and on logits), their launchers, and ``TRACED``.

One forward and one backward kernel serve both losses through ``tl.constexpr`` flags: ``LOGITS``
(``binary_cross_entropy_with_logits``), ``HAS_WEIGHT``, ``HAS_POS_WEIGHT``. They run over the
broadcast shape as tiles of at most three collapsed dimensions (see ``_elementwise``), reading
every operand in place through its strides (a broadcast ``weight`` or ``pos_weight`` is a
stride-0 view, never a copy). The forward reads each input once and writes either the loss
('none') or one fp32 partial sum per program, already divided by the reduction's denominator (so
'mean' is this launch, one sum and at most one cast); the backward reads them once more and writes
the gradients of the input and/or the target in the same pass, loading a one-value upstream
gradient ('mean' / 'sum') once per program (``G_SCALAR``).

Formulas (torch's, ``aten/src/ATen/native/Loss.cpp``), in fp32 (fp64 for fp64 data)::

    logits:  loss = w * ((1 - y) * x - lw * logsigmoid(x)),   lw = (pw - 1) * y + 1  (1 without pw)
             dx   = w * g * (lw * sigmoid(x) - pw * y)        (sigmoid(x) - y without pw)
             dy   = w * g * (logsigmoid(-x) - pw * logsigmoid(x))   (-x without pw)
    probs:   loss = w * ((y - 1) * max(log(1 - x), -100) - y * max(log(x), -100))
             dx   = w * g * (x - y) / max((1 - x) * x, eps)   (eps: torch's 1e-12 in the data dtype)
             dy   = -w * g * log(x / (1 - x))

On CUDA the probability forward runs with ``_common.assert_options`` (``debug=True`` without the
int32 overflow sanitizer) so its ``tl.device_assert`` checks that input and target lie in ``[0, 1]``,
as torch's CUDA kernel asserts.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._precision import acc_dtype
from ._common import assert_options
from ._elementwise import (
    asked,
    fake_grads,
    fake_loss,
    joined,
    launch_backward,
    launch_forward,
    load_tile,
    load_upstream,
    log1p,
    op_grads,
    op_loss,
    split_float,
    store_grads,
    store_or_divided_sum,
    tile_coords,
)

_LOG_FLOOR = tl.constexpr(-100.0)


@triton.jit
def _log_sigmoids(x):
    """``(logsigmoid(x), logsigmoid(-x), sigmoid(x))`` without overflow for any finite ``x``."""
    e = tl.exp(-tl.abs(x))
    sp = log1p(e)  # softplus(-|x|)
    zero = tl.zeros_like(x)
    ls_pos = tl.minimum(x, zero) - sp
    ls_neg = tl.minimum(-x, zero) - sp
    sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return ls_pos, ls_neg, sig


@triton.jit
def _clamped_log(v):
    """``max(log(v), -100)``; NaN stays NaN."""
    lv = tl.log(v)
    return tl.where(lv < _LOG_FLOOR, _LOG_FLOOR, lv)


@triton.jit
def _bce_fwd_kernel(
    x_ptr, xs0, xs1, xs2,  # input (logits or probabilities), collapsed (D0, D1, D2) strides
    y_ptr, ys0, ys1, ys2,  # target, same shape
    w_ptr, ws0, ws1, ws2,  # weight broadcast to the shape (stride 0 where broadcast)
    p_ptr, ps0, ps1, ps2,  # pos_weight broadcast to the shape (LOGITS only)
    out_ptr, os0, os1, os2,  # loss ('none'): the shape, in the input dtype
    part_ptr,  # (n_programs,) fp32 (fp64) partial sums, each divided by denom (REDUCE)
    R, D1, D2,  # rows (D0 * D1), the middle and the last collapsed dimension
    denom,  # the reduction's divisor: 1 ('sum') or the element count ('mean')
    LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_I32: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Elementwise BCE loss of one tile: stored ('none') or summed into this program's partial."""
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C, ROWS_I32)
    x = load_tile(x_ptr, i0, i1, cols, xs0, xs1, xs2, mask, ACC)
    y = load_tile(y_ptr, i0, i1, cols, ys0, ys1, ys2, mask, ACC)
    if LOGITS:
        ls_pos, _, _ = _log_sigmoids(x)
        if HAS_POS_WEIGHT:
            pw = load_tile(p_ptr, i0, i1, cols, ps0, ps1, ps2, mask, ACC)
            loss = (1.0 - y) * x - ((pw - 1.0) * y + 1.0) * ls_pos
        else:
            loss = (1.0 - y) * x - ls_pos
    else:
        # Active when launched with debug=True (CUDA); masked lanes hold 0.5. NaN fails, as in torch.
        tl.device_assert((x >= 0.0) & (x <= 1.0), "all elements of input should be between 0 and 1")
        tl.device_assert((y >= 0.0) & (y <= 1.0), "all elements of target should be between 0 and 1")
        loss = (y - 1.0) * _clamped_log(1.0 - x) - y * _clamped_log(x)
    if HAS_WEIGHT:
        loss = loss * load_tile(w_ptr, i0, i1, cols, ws0, ws1, ws2, mask, ACC)
    store_or_divided_sum(loss, out_ptr, i0, i1, cols, os0, os1, os2, part_ptr, mask, denom, REDUCE)


@triton.jit
def _bce_bwd_kernel(
    x_ptr, xs0, xs1, xs2,  # input (logits or probabilities), collapsed (D0, D1, D2) strides
    y_ptr, ys0, ys1, ys2,  # target, same shape
    w_ptr, ws0, ws1, ws2,  # weight broadcast to the shape
    p_ptr, ps0, ps1, ps2,  # pos_weight broadcast to the shape (LOGITS only)
    g_ptr, gs0, gs1, gs2,  # upstream gradient: the shape ('none') or one value (G_SCALAR), fp32 or the dtype
    dx_ptr, dy_ptr, os0, os1, os2,  # gradients w.r.t. input and target, one shared layout
    R, D1, D2,  # rows (D0 * D1), the middle and the last collapsed dimension
    eps_hi, eps_lo,  # floor of the probability gradient's denominator (torch's 1e-12 in the data dtype, 0 for
    # fp16) as an fp32 pair (hi + lo)
    LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, G_SCALAR: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_I32: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Gradients of one tile of ``sum(g * loss)`` w.r.t. the input and the target."""
    eps = joined(eps_hi, eps_lo, ACC)
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C, ROWS_I32)
    x = load_tile(x_ptr, i0, i1, cols, xs0, xs1, xs2, mask, ACC)
    y = load_tile(y_ptr, i0, i1, cols, ys0, ys1, ys2, mask, ACC)
    g = load_upstream(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, ACC, G_SCALAR)
    if HAS_WEIGHT:
        g = g * load_tile(w_ptr, i0, i1, cols, ws0, ws1, ws2, mask, ACC)
    if LOGITS:
        ls_pos, ls_neg, sig = _log_sigmoids(x)
        if HAS_POS_WEIGHT:
            pw = load_tile(p_ptr, i0, i1, cols, ps0, ps1, ps2, mask, ACC)
            pt = pw * y
            dx = (pt + 1.0 - y) * sig - pt
            dy = ls_neg - pw * ls_pos
        else:
            dx = sig - y
            dy = -x
    else:
        dx = (x - y) / tl.maximum((1.0 - x) * x, eps)
        dy = -tl.log(x / (1.0 - x))
    store_grads(dx * g, dy * g, dx_ptr, dy_ptr, i0, i1, cols, os0, os1, os2, mask, WRITE_DX, WRITE_DY)


def bce_fwd(x: Tensor, y: Tensor, w, pw, logits: bool, reduce: bool, denom: int) -> Tensor:
    """Launch the forward kernel.

    Args:
        x: input (logits or probabilities), any shape and strides.
        y: target of ``x``'s shape and dtype.
        w: weight expanded to ``x``'s shape (a stride-0 view), or None.
        pw: pos_weight expanded to ``x``'s shape, or None (``logits`` only).
        logits: ``x`` holds logits (``binary_cross_entropy_with_logits``).
        reduce: return per-program partial sums instead of the elementwise loss.
        denom: what each partial sum is divided by (1 for 'sum', the element count for 'mean').

    Returns:
        ``(n_programs,)`` fp32 (fp64 for fp64) partial sums if ``reduce``, else the loss of ``x``'s
        shape and dtype.
    """
    checks = {} if logits else assert_options(x)  # the in-kernel range assert, as torch's CUDA kernel
    return launch_forward(_bce_fwd_kernel, [x, y, w, pw], reduce, denom=denom, LOGITS=logits,
                          HAS_WEIGHT=w is not None, HAS_POS_WEIGHT=pw is not None, **checks)  # fmt: skip


def bce_bwd(x: Tensor, y: Tensor, w, pw, logits: bool, g: Tensor, eps: float, need_dx: bool, need_dy: bool):
    """Launch the backward kernel.

    Args:
        x, y, w, pw, logits: as in :func:`bce_fwd`.
        g: upstream gradient expanded to ``x``'s shape (a stride-0 view of one fp32 value for
            'mean' / 'sum', already divided by the element count for 'mean').
        eps: floor of the probability gradient's denominator.
        need_dx, need_dy: which gradients to compute.

    Returns:
        ``(dx, dy)`` in ``x``'s shape and dtype (None where not needed).
    """
    eps_hi, eps_lo = split_float(eps)
    return launch_backward(_bce_bwd_kernel, [x, y, w, pw, g], need_dx, need_dy, eps_hi=eps_hi, eps_lo=eps_lo,
                           LOGITS=logits, HAS_WEIGHT=w is not None, HAS_POS_WEIGHT=pw is not None,
                           G_SCALAR=g.numel() > 0 and not any(g.stride()))  # fmt: skip


# ---- TRACED: the launchers as torch.library custom ops, for torch.compile / CUDA-graph capture ----
# Functional: outputs are fresh contiguous tensors; a gradient not asked for comes back empty
# and is returned as None; a reduced forward returns its one-value sum.


@torch.library.custom_op("triton_losses::bce_fwd", mutates_args=())
def _bce_fwd_op(
    x: Tensor, y: Tensor, w: Tensor | None, pw: Tensor | None, logits: bool, reduce: bool, denom: int
) -> Tensor:
    """The elementwise loss, or its sum (each partial divided by ``denom``) as a ``(1,)`` fp32 (fp64) tensor."""
    out = bce_fwd(x, y, w, pw, logits, reduce, denom)
    return op_loss(out, reduce)


@_bce_fwd_op.register_fake
def _(x, y, w, pw, logits, reduce, denom):
    return fake_loss(x, reduce, x.dtype, acc_dtype(x.dtype))


@torch.library.custom_op("triton_losses::bce_bwd", mutates_args=())
def _bce_bwd_op(
    x: Tensor, y: Tensor, w: Tensor | None, pw: Tensor | None, logits: bool, g: Tensor, eps: float,
    need_dx: bool, need_dy: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    dx, dy = bce_bwd(x, y, w, pw, logits, g, eps, need_dx, need_dy)
    return op_grads((dx, dy), (x, y))


@_bce_bwd_op.register_fake
def _(x, y, w, pw, logits, g, eps, need_dx, need_dy):
    return fake_grads((x, y), (need_dx, need_dy))


def _traced_bce_bwd(x, y, w, pw, logits: bool, g: Tensor, eps: float, need_dx: bool, need_dy: bool):
    return asked(_bce_bwd_op(x, y, w, pw, logits, g, eps, need_dx, need_dy), (need_dx, need_dy))


TRACED = SimpleNamespace(bce_fwd=_bce_fwd_op, bce_bwd=_traced_bce_bwd)
