"""Margin losses (soft margin, hinge embedding, margin ranking): one kernel and its launchers.

As in ``kernels.regression``: one kernel (``LOSS`` constexpr) for the 'none' forward, the reducing
forward (partial sums, plus the gradients of the reduced loss when needed, in the same pass) and
the backward, over the broadcast shape of the operands read in place through their strides.

Formulas (torch's), in fp32 (fp64 when an operand is fp64), ``g`` the upstream gradient::

    soft_margin  a = input, b = target:        softplus(-b * a)       da = -g * b * sigmoid(-b * a)
    hinge        a = input, b = target:        (b != 1 ? max(m - a, 0) : 0) + (b != -1 ? a : 0)
                 da = g * ((b != 1 and m - a >= 0 ? -1 : 0) + (b != -1 ? 1 : 0))
    ranking      a, b = inputs, c = target:    u = -c * (a - b) + m,  max(u, 0)
                 with k = (u >= 0): da = -g * k * c, db = g * k * c, dc = -g * k * (a - b)

``softplus(z) = max(z, 0) + log1p(exp(-|z|))``: finite wherever the true value is (torch's
``log1p(exp(z))`` overflows to inf, with a NaN gradient, past z ~ 88 in fp32). The target of
soft_margin and hinge gets no gradient (torch's neither). ``k`` is a 0 / 1 factor, so a NaN target
or input gives the NaN gradients torch's chain rule gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..options import MarginOptions
from ._common import scale_  # noqa: F401  (the fused-gradient rescale every family shares)
from ._elementwise import (
    fake_grads,
    fake_loss,
    fused_backward,
    fused_forward,
    fused_upstream,
    joined,
    load_tile,
    log1p,
    op_grads,
    op_loss,
    partials_dtype,
    store_fused,
    tile_coords,
    traced_fused,
)

FUSES_GRAD = True
LOSSES = {"soft_margin": 0, "hinge": 1, "ranking": 2}
_SOFT_MARGIN, _HINGE, _RANKING = (tl.constexpr(v) for v in LOSSES.values())


@triton.jit
def _margin_math(a, b, c, m, LOSS: tl.constexpr):
    """``(loss, da, db, dc)`` per lane, before the upstream gradient (``db``, ``dc``: ranking only)."""
    if LOSS == _SOFT_MARGIN:
        z = -b * a
        e = tl.exp(-tl.abs(z))
        loss = tl.where(z > 0, z, 0.0) + log1p(e)
        sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        da = -b * sig
        db = da
        dc = da
    elif LOSS == _HINGE:
        u = m - a
        loss = tl.where(b != 1.0, tl.where(u < 0, 0.0, u), 0.0) + tl.where(b != -1.0, a, 0.0)
        da = tl.where((b != 1.0) & (u >= 0), -1.0, 0.0) + tl.where(b != -1.0, 1.0, 0.0)
        db = da
        dc = da
    else:
        diff = a - b
        u = -c * diff + m
        loss = tl.where(u < 0, 0.0, u)
        k = tl.where(u >= 0, 1.0, 0.0)
        da = k * -c
        db = k * c
        dc = k * -diff
    return loss, da, db, dc


@triton.jit
def _margin_kernel(
    a_ptr, as0, as1, as2,  # input (input1 for ranking) at the broadcast shape, collapsed (D0, D1, D2) strides
    b_ptr, bs0, bs1, bs2,  # target (input2 for ranking), same shape
    c_ptr, cs0, cs1, cs2,  # ranking's target, same shape (HAS_C)
    g_ptr, gs0, gs1, gs2,  # upstream gradient (HAS_G): one value (G_SCALAR) or the shape
    scale, scale_lo,  # multiplies the upstream gradient (fp32 hi / lo parts)
    out_ptr, part_ptr,  # loss at the shape (WRITE_LOSS); (n_programs,) partial sums (REDUCE)
    da_ptr, db_ptr, dc_ptr, os0, os1, os2,  # gradients w.r.t. a, b, c, sharing one layout
    R, D1, D2,
    m, m_lo,  # the margin (hi / lo parts)
    unused, unused_lo,  # the launcher's second loss parameter (no margin loss has one)
    LOSS: tl.constexpr, HAS_C: tl.constexpr,
    WRITE_LOSS: tl.constexpr, REDUCE: tl.constexpr, WRITE_DA: tl.constexpr, WRITE_DB: tl.constexpr,
    WRITE_DC: tl.constexpr, HAS_G: tl.constexpr, G_SCALAR: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_I32: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One tile of a margin loss: its loss (stored or summed) and / or its gradients."""
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C, ROWS_I32)
    a = load_tile(a_ptr, i0, i1, cols, as0, as1, as2, mask, ACC)
    b = load_tile(b_ptr, i0, i1, cols, bs0, bs1, bs2, mask, ACC)
    c = b
    if HAS_C:
        c = load_tile(c_ptr, i0, i1, cols, cs0, cs1, cs2, mask, ACC)
    loss, da, db, dc = _margin_math(a, b, c, joined(m, m_lo, ACC), LOSS)
    g = fused_upstream(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, joined(scale, scale_lo, ACC), ACC, HAS_G, G_SCALAR)
    store_fused(loss, da * g, db * g, dc * g, out_ptr, part_ptr, da_ptr, db_ptr, dc_ptr, i0, i1, cols,
                os0, os1, os2, mask, WRITE_LOSS, REDUCE, WRITE_DA, WRITE_DB, WRITE_DC)  # fmt: skip


def margin_fwd(
    a: Tensor,
    b: Tensor,
    c: Tensor | None,
    opts: MarginOptions,
    reduce: bool,
    out_dtype: torch.dtype,
    scale: float = 1.0,
    g: Tensor | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The loss ('none') or its partial sums, and with ``reduce`` the gradients of the reduced loss.

    Args:
        a, b: input and target (ranking: the two inputs), expanded to the broadcast shape.
        c: ranking's target at that shape, or None.
        opts: the loss and its margin.
        reduce: return per-program partial sums (fp32, fp64 when an operand is fp64) instead of the loss.
        out_dtype: dtype of the loss when not ``reduce``.
        scale: the reduced loss's factor (``1 / numel`` for 'mean', 1 for 'sum'); the gradients carry it.
        g: a one-element tensor the gradients are also multiplied by, or None.
        needs: which gradients (w.r.t. a, b, c) to write, with ``reduce`` only.

    Returns:
        ``(out, da, db, dc)``: the partial sums or the loss at the shape; the gradients at the shape
        in their operand's dtype (None where not asked).
    """
    flags = dict(LOSS=LOSSES[opts.loss], HAS_C=c is not None)
    return fused_forward(_margin_kernel, [a, b, c], out_dtype, reduce, scale, g, needs, (opts.margin, 0.0), **flags)


def margin_bwd(
    a: Tensor, b: Tensor, c: Tensor | None, opts: MarginOptions, g: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(da, db, dc)`` of ``sum(g * loss)`` at the broadcast shape (None where not asked).

    ``g`` is the upstream gradient expanded to the shape; the rest as in :func:`margin_fwd`.
    """
    flags = dict(LOSS=LOSSES[opts.loss], HAS_C=c is not None)
    return fused_backward(_margin_kernel, [a, b, c], g, needs, (opts.margin, 0.0), **flags)


# ---- the same launchers as torch.library custom ops, for traced calls ------------------------


@torch.library.custom_op("triton_losses::margin_fwd", mutates_args=())
def _margin_fwd_op(
    a: Tensor, b: Tensor, c: Tensor | None, loss: str, margin: float, reduce: bool, out_dtype: torch.dtype
) -> Tensor:
    """:func:`margin_fwd` without fused gradients: the loss, or its sum as ``(1,)`` when ``reduce``."""
    out = margin_fwd(a, b, c, MarginOptions(loss, margin), reduce, out_dtype)[0]
    return op_loss(out, reduce)


@_margin_fwd_op.register_fake
def _(a, b, c, loss, margin, reduce, out_dtype):
    return fake_loss(a, reduce, out_dtype, partials_dtype(out_dtype, a, b, c))


@torch.library.custom_op("triton_losses::margin_bwd", mutates_args=())
def _margin_bwd_op(
    a: Tensor, b: Tensor, c: Tensor | None, loss: str, margin: float, g: Tensor, need_a: bool, need_b: bool,
    need_c: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`margin_bwd`; a gradient not asked for comes back empty."""
    grads = margin_bwd(a, b, c, MarginOptions(loss, margin), g, (need_a, need_b, need_c))
    return op_grads(grads, (a, b, c if c is not None else a))


@_margin_bwd_op.register_fake
def _(a, b, c, loss, margin, g, need_a, need_b, need_c):
    return fake_grads((a, b, c if c is not None else a), (need_a, need_b, need_c), a.shape)


TRACED = traced_fused("margin", _margin_fwd_op, _margin_bwd_op)
