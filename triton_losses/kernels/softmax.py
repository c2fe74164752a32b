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
from ._common import NEG_INF, launch_config, on_device, online_lse_block, row_block, row_offsets, tl_acc


@triton.jit
def _softmax_fwd_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # input (A, C, B)
    y_ptr, s_ya, s_yc, s_yb,  # output (A, C, B)
    stats_ptr,  # per-row (max, sum of exp(x - max)) (R, 2), fp32 (fp64 for fp64)
    R, C, B,
    LOG: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """``y = log_softmax(x)`` (LOG) or ``softmax(x)`` along C for ``BLOCK_R`` rows, and their statistics."""
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
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xc, mask=mask, other=NEG_INF).to(ACC)
            m, s = online_lse_block(m, s, x)
        logs = tl.log(s)
        inv_s = 1.0 / s
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xc, mask=mask, other=NEG_INF).to(ACC)
            if LOG:
                y = (x - m[:, None]) - logs[:, None]
            else:
                y = tl.exp(x - m[:, None]) * inv_s[:, None]
            tl.store(y_ptr + yoff[:, None] + cols[None, :] * s_yc, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + 2 * rows, m.to(stats_ptr.dtype.element_ty), mask=rmask)
    tl.store(stats_ptr + 2 * rows + 1, s.to(stats_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _softmax_bwd_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # forward input (A, C, B)
    stats_ptr,  # the forward's per-row (max, sum of exp(x - max)) (R, 2)
    g_ptr, s_ga, s_gc, s_gb,  # upstream gradient (A, C, B)
    d_ptr, s_da, s_dc, s_db,  # gradient w.r.t. the input (A, C, B)
    R, C, B,
    LOG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """``dx = g - p * sum(g)`` (LOG) or ``dx = p * (g - sum(g * p))``, ``p = exp(x - m) / s``, for ``BLOCK_R`` rows."""
    rows, rmask = row_block(R, BLOCK_R)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    goff = row_offsets(rows, B, s_ga, s_gb)
    doff = row_offsets(rows, B, s_da, s_db)
    m = tl.load(stats_ptr + 2 * rows, mask=rmask, other=0.0).to(ACC)
    inv_s = 1.0 / tl.load(stats_ptr + 2 * rows + 1, mask=rmask, other=1.0).to(ACC)
    acc = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        g = tl.load(g_ptr + goff[:, None] + cols[None, :] * s_gc, mask=mask, other=0.0).to(ACC)
        if LOG:
            acc += tl.sum(g, 1)
        else:
            x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xc, mask=mask, other=0.0).to(ACC)
            p = tl.exp(x - m[:, None]) * inv_s[:, None]
            acc += tl.sum(tl.where(mask, g * p, 0.0), 1)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        g = tl.load(g_ptr + goff[:, None] + cols[None, :] * s_gc, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xc, mask=mask, other=0.0).to(ACC)
        p = tl.exp(x - m[:, None]) * inv_s[:, None]
        if LOG:
            d = g - p * acc[:, None]
        else:
            d = p * (g - acc[:, None])
        tl.store(d_ptr + doff[:, None] + cols[None, :] * s_dc, d.to(d_ptr.dtype.element_ty), mask=mask)


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
            num_warps=warps,
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
            LOG=log, BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(x.dtype), num_warps=warps,
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
