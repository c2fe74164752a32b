"""Elementwise KL-divergence kernels, their launchers, and ``TRACED``.

``kl_div`` runs over the broadcast shape of input and target as tiles of at most three collapsed
dimensions (see ``_elementwise``), reading both in place (a broadcast operand is a stride-0 view);
its forward writes the loss ('none') or one partial sum per program, already divided by the
reduction's denominator, and its backward the gradients of input and/or target in one pass (a
one-value upstream gradient loaded once per program: ``G_SCALAR``). Formulas (torch's composite
``kl_div`` and its autograd)::

    log_target=False:  loss = xlogy(t, t) - t * x        dx = -g * t   dt = g * (log t [0 at t=0] + t / t - x)
    log_target=True:   loss = exp(t) * (t - x)           dx = -g * e^t dt = g * (t - x) * e^t + g * e^t
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._precision import acc_dtype
from ._elementwise import (
    asked,
    fake_grads,
    fake_loss,
    launch_backward,
    launch_forward,
    load_tile,
    load_upstream,
    op_grads,
    op_loss,
    store_grads,
    store_or_divided_sum,
    tile_coords,
)


@triton.jit
def _kl_fwd_kernel(
    x_ptr, xs0, xs1, xs2,  # input (log-probabilities), collapsed (D0, D1, D2) strides
    y_ptr, ys0, ys1, ys2,  # target (probabilities, or log-probabilities with LOG_TARGET)
    out_ptr, os0, os1, os2,  # loss ('none') in the output dtype
    part_ptr,  # (n_programs,) fp32 (fp64) partial sums, each divided by denom (REDUCE)
    R, D1, D2,  # rows (D0 * D1), the middle and the last collapsed dimension
    denom,  # the reduction's divisor: 1 ('sum'), the element count ('mean') or the batch size ('batchmean')
    LOG_TARGET: tl.constexpr, REDUCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_I32: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """Elementwise KL loss of one tile: stored ('none') or summed into this program's partial."""
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C, ROWS_I32)
    x = load_tile(x_ptr, i0, i1, cols, xs0, xs1, xs2, mask, ACC)
    y = load_tile(y_ptr, i0, i1, cols, ys0, ys1, ys2, mask, ACC)
    if LOG_TARGET:
        loss = tl.exp(y) * (y - x)
    else:
        loss = tl.where(y == 0.0, 0.0, y * tl.log(y)) - y * x
    store_or_divided_sum(loss, out_ptr, i0, i1, cols, os0, os1, os2, part_ptr, mask, denom, REDUCE)


@triton.jit
def _kl_bwd_kernel(
    x_ptr, xs0, xs1, xs2,  # input, collapsed (D0, D1, D2) strides
    y_ptr, ys0, ys1, ys2,  # target
    g_ptr, gs0, gs1, gs2,  # upstream gradient: the shape ('none') or one value (G_SCALAR)
    dx_ptr, dy_ptr, os0, os1, os2,  # gradients w.r.t. input and target, one shared layout
    R, D1, D2,  # rows (D0 * D1), the middle and the last collapsed dimension
    LOG_TARGET: tl.constexpr, G_SCALAR: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_I32: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Gradients of one tile of ``sum(g * loss)`` w.r.t. input and target."""
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C, ROWS_I32)
    x = load_tile(x_ptr, i0, i1, cols, xs0, xs1, xs2, mask, ACC)
    y = load_tile(y_ptr, i0, i1, cols, ys0, ys1, ys2, mask, ACC)
    g = load_upstream(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, ACC, G_SCALAR)
    if LOG_TARGET:
        ge = g * tl.exp(y)
        dx = -ge
        dy = ge * (y - x) + ge
    else:
        dx = -(g * y)
        dy = g * (tl.where(y == 0.0, 0.0, tl.log(y)) + y / y) - g * x
    store_grads(dx, dy, dx_ptr, dy_ptr, i0, i1, cols, os0, os1, os2, mask, WRITE_DX, WRITE_DY)


def kl_fwd(x: Tensor, y: Tensor, log_target: bool, reduce: bool, denom: int) -> Tensor:
    """Launch the elementwise KL forward.

    Args:
        x: input log-probabilities expanded to the broadcast shape (stride-0 views allowed).
        y: target expanded to the same shape, ``x``'s dtype.
        log_target: ``y`` holds log-probabilities.
        reduce: return per-program partial sums instead of the elementwise loss.
        denom: what each partial sum is divided by.

    Returns:
        ``(n_programs,)`` fp32 (fp64 for fp64) partial sums if ``reduce``, else the loss (``x``'s dtype).
    """
    return launch_forward(_kl_fwd_kernel, [x, y], reduce, denom=denom, LOG_TARGET=log_target)


def kl_bwd(x: Tensor, y: Tensor, log_target: bool, g: Tensor, need_dx: bool, need_dy: bool):
    """Launch the elementwise KL backward: ``(dx, dy)`` at the broadcast shape (None where not needed).

    ``x``, ``y`` and ``g`` are expanded to the broadcast shape; ``g`` is a stride-0 view of one
    fp32 (fp64) value for 'mean' / 'sum' (already divided by the element count for 'mean').
    """
    g_scalar = g.numel() > 0 and not any(g.stride())
    return launch_backward(_kl_bwd_kernel, [x, y, g], need_dx, need_dy, LOG_TARGET=log_target, G_SCALAR=g_scalar)


# ---- TRACED: the launchers as torch.library custom ops, for torch.compile / CUDA-graph capture ----


@torch.library.custom_op("triton_losses::kl_fwd", mutates_args=())
def _kl_fwd_op(x: Tensor, y: Tensor, log_target: bool, reduce: bool, denom: int) -> Tensor:
    """The elementwise KL at the broadcast shape, or its sum as ``(1,)`` fp32 (fp64) when ``reduce``."""
    out = kl_fwd(x, y, log_target, reduce, denom)
    return op_loss(out, reduce)


@_kl_fwd_op.register_fake
def _(x, y, log_target, reduce, denom):
    return fake_loss(x, reduce, x.dtype, acc_dtype(x.dtype))


@torch.library.custom_op("triton_losses::kl_bwd", mutates_args=())
def _kl_bwd_op(
    x: Tensor, y: Tensor, log_target: bool, g: Tensor, need_dx: bool, need_dy: bool
) -> tuple[Tensor, Tensor]:
    dx, dy = kl_bwd(x, y, log_target, g, need_dx, need_dy)
    return op_grads((dx, dy), (x, y))


@_kl_bwd_op.register_fake
def _(x, y, log_target, g, need_dx, need_dy):
    return fake_grads((x, y), (need_dx, need_dy), x.shape)


def _traced_kl_bwd(x, y, log_target: bool, g: Tensor, need_dx: bool, need_dy: bool):
    return asked(_kl_bwd_op(x, y, log_target, g, need_dx, need_dy), (need_dx, need_dy))


TRACED = SimpleNamespace(kl_fwd=_kl_fwd_op, kl_bwd=_traced_kl_bwd)
