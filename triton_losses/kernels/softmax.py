"""Row-wise softmax / log-softmax kernels (forward and backward), their launchers, and ``TRACED``.

Forward: the row's maximum ``m`` and ``s = sum(exp(x - m))`` (an online pass over column blocks,
or one read for a row that fits one block), then ``(x - m) - log(s)`` or ``exp(x - m) / s``;
``(m, s)`` are saved per row in fp32 (fp64 for fp64). Backward: from the input and those
statistics, not from the rounded output: ``p = exp(x - m) / s`` in fp32, one pass for the row's
reduction (``sum(g)`` or ``sum(g * p)``), one pass writing the gradient. Keeping ``m`` and ``s``
apart (never one rounded log-sum-exp) keeps fp32 accuracy at any logit magnitude.
"""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl

from .._precision import acc_dtype
from ._common import (
    NEG_INF,
    aligned_tiles,
    launch_config,
    masked_load,
    masked_store,
    on_device,
    online_lse_block,
    row_align,
    row_block,
    row_offsets,
    tl_acc,
)


@triton.jit
def _stats_tile(m, s, x_ptr, xrow, rel, mask, MASKED: tl.constexpr, ACC: tl.constexpr):
    """Fold the inputs at ``xrow[:, None] + rel[None, :]`` (under ``mask`` when ``MASKED``) into the rows' running
    ``(max, sum of exp(x - max))``."""
    x = masked_load(x_ptr + xrow[:, None] + rel[None, :], mask, NEG_INF, MASKED, "").to(ACC)
    return online_lse_block(m, s, x)


@triton.jit
def _out_tile(x_ptr, xrow, xrel, y_ptr, yrow, yrel, mask, m, logs, inv_s,
              LOG: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """``log_softmax`` (LOG) or ``softmax`` of one tile from the rows' statistics, stored at ``yrow`` + ``yrel``."""
    x = masked_load(x_ptr + xrow[:, None] + xrel[None, :], mask, NEG_INF, MASKED, "").to(ACC)
    if LOG:
        y = (x - m[:, None]) - logs[:, None]
    else:
        y = tl.exp(x - m[:, None]) * inv_s[:, None]
    masked_store(y_ptr + yrow[:, None] + yrel[None, :], y.to(y_ptr.dtype.element_ty), mask, MASKED, "")


@triton.jit
def _softmax_fwd_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # input (A, C, B)
    y_ptr, s_ya, s_yc, s_yb,  # output (A, C, B)
    stats_ptr,  # per-row (max, sum of exp(x - max)) (R, 2), fp32 (fp64 for fp64)
    R, C, B,
    LOG: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """``y = log_softmax(x)`` (LOG) or ``softmax(x)`` along C for ``BLOCK_R`` rows, and their statistics.

    ``ALIGN > 1`` (one row of contiguous elements, ``y`` at ``x``'s offsets; ``_common.row_align``): both
    passes stream the row's aligned middle as whole unmasked tiles and an aligned rest masked in 16-byte
    units, and its first and last few columns as one small tile (``aligned_tiles``).
    """
    rows, rmask = row_block(R, BLOCK_R)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    yoff = row_offsets(rows, B, s_ya, s_yb)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_C).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xc, mask=mask, other=NEG_INF).to(ACC)
        m = tl.max(x, 1)
        shift = tl.where(m == NEG_INF, 0.0, m)
        e = tl.exp(x - shift[:, None])
        s = tl.sum(e, 1)
        if LOG:
            y = (x - m[:, None]) - tl.log(s)[:, None]
        else:
            y = e * (1.0 / s)[:, None]
        tl.store(y_ptr + yoff[:, None] + cols[None, :] * s_yc, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK_R], NEG_INF, ACC)
        s = tl.zeros([BLOCK_R], ACC)
        if ALIGN > 1:
            head, full, rel, tmask, ecols, emask = aligned_tiles(xoff, C, rmask, ALIGN, BLOCK_C)
            m, s = _stats_tile(m, s, x_ptr, xoff, ecols, emask, True, ACC)
            for k in range(full):
                m, s = _stats_tile(m, s, x_ptr, tl.multiple_of(xoff + head + k * BLOCK_C, ALIGN), rel, rmask[:, None],
                                   False, ACC)  # fmt: skip
            c0 = head + full * BLOCK_C
            m, s = _stats_tile(m, s, x_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, tmask, True, ACC)
            logs = tl.log(s)
            inv_s = 1.0 / s
            _out_tile(x_ptr, xoff, ecols, y_ptr, yoff, ecols, emask, m, logs, inv_s, LOG, True, ACC)
            for k in range(full):
                c0 = head + k * BLOCK_C
                _out_tile(x_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, y_ptr, tl.multiple_of(yoff + c0, ALIGN), rel,
                          rmask[:, None], m, logs, inv_s, LOG, False, ACC)  # fmt: skip
            c0 = head + full * BLOCK_C
            _out_tile(x_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, y_ptr, tl.multiple_of(yoff + c0, ALIGN), rel,
                      tmask, m, logs, inv_s, LOG, True, ACC)  # fmt: skip
        else:
            for c0 in range(0, C, BLOCK_C):
                cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
                mask = rmask[:, None] & (cols < C)[None, :]
                m, s = _stats_tile(m, s, x_ptr, xoff, cols * s_xc, mask, True, ACC)
            logs = tl.log(s)
            inv_s = 1.0 / s
            for c0 in range(0, C, BLOCK_C):
                cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
                mask = rmask[:, None] & (cols < C)[None, :]
                _out_tile(x_ptr, xoff, cols * s_xc, y_ptr, yoff, cols * s_yc, mask, m, logs, inv_s, LOG, True, ACC)
    tl.store(stats_ptr + 2 * rows, m.to(stats_ptr.dtype.element_ty), mask=rmask)
    tl.store(stats_ptr + 2 * rows + 1, s.to(stats_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _sum_tile(acc, x_ptr, xrow, xrel, g_ptr, grow, grel, mask, m, inv_s,
              LOG: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Add one tile's ``sum(g)`` (LOG) or ``sum(g * p)`` to the rows' ``acc``."""
    g = masked_load(g_ptr + grow[:, None] + grel[None, :], mask, 0.0, MASKED, "").to(ACC)
    if LOG:
        acc += tl.sum(g, 1)
    else:
        x = masked_load(x_ptr + xrow[:, None] + xrel[None, :], mask, 0.0, MASKED, "").to(ACC)
        gp = g * (tl.exp(x - m[:, None]) * inv_s[:, None])
        if MASKED:
            gp = tl.where(mask, gp, 0.0)
        acc += tl.sum(gp, 1)
    return acc


@triton.jit
def _grad_tile(x_ptr, xrow, xrel, g_ptr, grow, grel, d_ptr, drow, drel, mask, m, inv_s, acc,
               LOG: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """One tile of the input gradient, stored at ``drow`` + ``drel``."""
    g = masked_load(g_ptr + grow[:, None] + grel[None, :], mask, 0.0, MASKED, "").to(ACC)
    x = masked_load(x_ptr + xrow[:, None] + xrel[None, :], mask, 0.0, MASKED, "").to(ACC)
    p = tl.exp(x - m[:, None]) * inv_s[:, None]
    if LOG:
        d = g - p * acc[:, None]
    else:
        d = p * (g - acc[:, None])
    masked_store(d_ptr + drow[:, None] + drel[None, :], d.to(d_ptr.dtype.element_ty), mask, MASKED, "")


@triton.jit
def _softmax_bwd_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # forward input (A, C, B)
    stats_ptr,  # the forward's per-row (max, sum of exp(x - max)) (R, 2)
    g_ptr, s_ga, s_gc, s_gb,  # upstream gradient (A, C, B)
    d_ptr, s_da, s_dc, s_db,  # gradient w.r.t. the input (A, C, B)
    R, C, B,
    LOG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """``dx = g - p * sum(g)`` (LOG) or ``dx = p * (g - sum(g * p))``, ``p = exp(x - m) / s``, for ``BLOCK_R`` rows
    (``ALIGN > 1``: ``g`` and ``dx`` at ``x``'s offsets, both passes split as in the forward)."""
    rows, rmask = row_block(R, BLOCK_R)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    goff = row_offsets(rows, B, s_ga, s_gb)
    doff = row_offsets(rows, B, s_da, s_db)
    m = tl.load(stats_ptr + 2 * rows, mask=rmask, other=0.0).to(ACC)
    inv_s = 1.0 / tl.load(stats_ptr + 2 * rows + 1, mask=rmask, other=1.0).to(ACC)
    acc = tl.zeros([BLOCK_R], ACC)
    if ALIGN > 1:
        head, full, rel, tmask, ecols, emask = aligned_tiles(xoff, C, rmask, ALIGN, BLOCK_C)
        acc = _sum_tile(acc, x_ptr, xoff, ecols, g_ptr, goff, ecols, emask, m, inv_s, LOG, True, ACC)
        for k in range(full):
            c0 = head + k * BLOCK_C
            acc = _sum_tile(acc, x_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, g_ptr, tl.multiple_of(goff + c0, ALIGN),
                            rel, rmask[:, None], m, inv_s, LOG, False, ACC)  # fmt: skip
        c0 = head + full * BLOCK_C
        acc = _sum_tile(acc, x_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, g_ptr, tl.multiple_of(goff + c0, ALIGN),
                        rel, tmask, m, inv_s, LOG, True, ACC)  # fmt: skip
        _grad_tile(x_ptr, xoff, ecols, g_ptr, goff, ecols, d_ptr, doff, ecols, emask, m, inv_s, acc, LOG, True, ACC)
        for k in range(full):
            c0 = head + k * BLOCK_C
            _grad_tile(x_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, g_ptr, tl.multiple_of(goff + c0, ALIGN), rel,
                       d_ptr, tl.multiple_of(doff + c0, ALIGN), rel, rmask[:, None], m, inv_s, acc, LOG, False, ACC)  # fmt: skip
        c0 = head + full * BLOCK_C
        _grad_tile(x_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, g_ptr, tl.multiple_of(goff + c0, ALIGN), rel,
                   d_ptr, tl.multiple_of(doff + c0, ALIGN), rel, tmask, m, inv_s, acc, LOG, True, ACC)  # fmt: skip
    else:
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            acc = _sum_tile(acc, x_ptr, xoff, cols * s_xc, g_ptr, goff, cols * s_gc, mask, m, inv_s, LOG, True, ACC)
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            _grad_tile(x_ptr, xoff, cols * s_xc, g_ptr, goff, cols * s_gc, d_ptr, doff, cols * s_dc, mask, m, inv_s,
                       acc, LOG, True, ACC)  # fmt: skip


def _strides(v: torch.Tensor, prefix: str) -> dict:
    return {f"s_{prefix}a": v.stride(0), f"s_{prefix}c": v.stride(1), f"s_{prefix}b": v.stride(2)}


def softmax_fwd(x: torch.Tensor, log: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax`` / ``softmax`` of ``x`` ``(A, C, B)`` along C.

    Returns:
        ``(y, stats)``: ``y`` ``(A, C, B)`` contiguous in ``x``'s dtype; ``stats`` ``(A * B, 2)``
        per-row ``(max, sum of exp(x - max))`` in fp32 (fp64 for fp64), for :func:`softmax_bwd`.
    """
    A, C, B = x.shape
    R = A * B
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    stats = torch.empty(R, 2, dtype=acc_dtype(x.dtype), device=x.device)
    if R == 0 or C == 0:
        return y, stats
    block_r, block_c, warps = launch_config(C, x.element_size(), x.stride(1) == 1 or B == 1)
    with on_device(x):
        _softmax_fwd_kernel[(triton.cdiv(R, block_r),)](
            x_ptr=x, **_strides(x, "x"), y_ptr=y, **_strides(y, "y"), stats_ptr=stats, R=R, C=C, B=B,
            LOG=log, ONE_BLOCK=block_c >= C, BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(x.dtype),
            ALIGN=1 if block_c >= C else row_align(x, block_r, y), num_warps=warps,
        )  # fmt: skip
    return y, stats


def softmax_bwd(x: torch.Tensor, stats: torch.Tensor, g: torch.Tensor, log: bool) -> torch.Tensor:
    """Input gradient ``(A, C, B)`` of ``log_softmax`` / ``softmax`` from the forward's input ``x``,
    its ``stats`` ``(A * B, 2)`` and the upstream gradient ``g`` ``(A, C, B)`` (any strides)."""
    A, C, B = x.shape
    R = A * B
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if R == 0 or C == 0:
        return dx
    block_r, block_c, warps = launch_config(C, x.element_size(), x.stride(1) == 1 or B == 1)
    with on_device(x):
        _softmax_bwd_kernel[(triton.cdiv(R, block_r),)](
            x_ptr=x, **_strides(x, "x"), stats_ptr=stats, g_ptr=g, **_strides(g, "g"),
            d_ptr=dx, **_strides(dx, "d"), R=R, C=C, B=B,
            LOG=log, BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(x.dtype), ALIGN=row_align(x, block_r, g, dx),
            num_warps=warps,
        )  # fmt: skip
    return dx


# ---- TRACED: the launchers as torch.library custom ops (used while torch.compile traces) ----------


@torch.library.custom_op("triton_losses::softmax_fwd", mutates_args=())
def softmax_fwd_op(x: torch.Tensor, log: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, stats)`` of :func:`softmax_fwd`."""
    return softmax_fwd(x, log)


@softmax_fwd_op.register_fake
def _(x, log):
    R = x.shape[0] * x.shape[2]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(R, 2, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("triton_losses::softmax_bwd", mutates_args=())
def softmax_bwd_op(x: torch.Tensor, stats: torch.Tensor, g: torch.Tensor, log: bool) -> torch.Tensor:
    """Input gradient of :func:`softmax_bwd`."""
    return softmax_bwd(x, stats, g, log)


@softmax_bwd_op.register_fake
def _(x, stats, g, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


TRACED = types.SimpleNamespace(softmax_fwd=softmax_fwd_op, softmax_bwd=softmax_bwd_op)
