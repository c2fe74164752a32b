"""Row-wise softmax / log-softmax kernels (forward and backward) and their launchers.

Forward: an online pass for the row's log-sum-exp, then a pass writing ``x - lse`` or
``exp(x - lse)``; rows that fit one column block are read once. Backward: one pass for the row's
reduction (``sum(g)`` or ``sum(g * y)``), one pass writing the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch_config, row_block, row_offsets

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _softmax_fwd_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # input (A, C, B)
    y_ptr, s_ya, s_yc, s_yb,  # output (A, C, B)
    R, C, B,
    LOG: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """``y = log_softmax(x)`` (LOG) or ``softmax(x)`` along C for ``BLOCK_R`` rows."""
    rows, rmask = row_block(R, BLOCK_R)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    yoff = row_offsets(rows, B, s_ya, s_yb)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_C).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xc, mask=mask, other=_NEG_INF).to(ACC)
        m = tl.max(x, 1)
        shift = tl.where(m == _NEG_INF, 0.0, m)
        lse = shift + tl.log(tl.sum(tl.exp(x - shift[:, None]), 1))
        lse = tl.where(m == _NEG_INF, _NEG_INF, lse)
        y = x - lse[:, None]
        if not LOG:
            y = tl.exp(y)
        tl.store(y_ptr + yoff[:, None] + cols[None, :] * s_yc, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK_R], _NEG_INF, ACC)
        s = tl.zeros([BLOCK_R], ACC)
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xc, mask=mask, other=_NEG_INF).to(ACC)
            m_new = tl.maximum(m, tl.max(x, 1))
            shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
            m = m_new
        lse = m + tl.log(s)
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xc, mask=mask, other=_NEG_INF).to(ACC)
            y = x - lse[:, None]
            if not LOG:
                y = tl.exp(y)
            tl.store(y_ptr + yoff[:, None] + cols[None, :] * s_yc, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    y_ptr, s_ya, s_yc, s_yb,  # forward output (A, C, B)
    g_ptr, s_ga, s_gc, s_gb,  # upstream gradient (A, C, B)
    d_ptr, s_da, s_dc, s_db,  # gradient w.r.t. the input (A, C, B)
    R, C, B,
    LOG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """``dx = g - exp(y) * sum(g)`` (LOG) or ``dx = y * (g - sum(g * y))`` for ``BLOCK_R`` rows."""
    rows, rmask = row_block(R, BLOCK_R)
    yoff = row_offsets(rows, B, s_ya, s_yb)
    goff = row_offsets(rows, B, s_ga, s_gb)
    doff = row_offsets(rows, B, s_da, s_db)
    acc = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        g = tl.load(g_ptr + goff[:, None] + cols[None, :] * s_gc, mask=mask, other=0.0).to(ACC)
        if LOG:
            acc += tl.sum(g, 1)
        else:
            y = tl.load(y_ptr + yoff[:, None] + cols[None, :] * s_yc, mask=mask, other=0.0).to(ACC)
            acc += tl.sum(g * y, 1)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        g = tl.load(g_ptr + goff[:, None] + cols[None, :] * s_gc, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + yoff[:, None] + cols[None, :] * s_yc, mask=mask, other=0.0).to(ACC)
        if LOG:
            d = g - tl.exp(y) * acc[:, None]
        else:
            d = y * (g - acc[:, None])
        tl.store(d_ptr + doff[:, None] + cols[None, :] * s_dc, d.to(d_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strides(v: torch.Tensor) -> tuple[int, int, int]:
    return v.stride(0), v.stride(1), v.stride(2)


def softmax_fwd(x: torch.Tensor, y: torch.Tensor, log: bool) -> None:
    """Write ``log_softmax`` / ``softmax`` of ``x`` ``(A, C, B)`` along C into ``y`` ``(A, C, B)``."""
    A, C, B = x.shape
    R = A * B
    if R == 0 or C == 0:
        return
    block_r, block_c, warps = launch_config(C, x.element_size(), x.stride(1) == 1 or B == 1)
    _softmax_fwd_kernel[(triton.cdiv(R, block_r),)](
        x, *_strides(x), y, *_strides(y), R, C, B,
        LOG=log, ONE_BLOCK=block_c >= C, BLOCK_R=block_r, BLOCK_C=block_c, ACC=_acc(x.dtype),
        num_warps=warps,
    )  # fmt: skip


def softmax_bwd(y: torch.Tensor, g: torch.Tensor, dx: torch.Tensor, log: bool) -> None:
    """Write the input gradient of ``log_softmax`` / ``softmax`` into ``dx``; all ``(A, C, B)``."""
    A, C, B = y.shape
    R = A * B
    if R == 0 or C == 0:
        return
    block_r, block_c, warps = launch_config(C, y.element_size(), y.stride(1) == 1 or B == 1)
    _softmax_bwd_kernel[(triton.cdiv(R, block_r),)](
        y, *_strides(y), g, *_strides(g), dx, *_strides(dx), R, C, B,
        LOG=log, BLOCK_R=block_r, BLOCK_C=block_c, ACC=_acc(y.dtype),
        num_warps=warps,
    )  # fmt: skip


def aot_cases():
    """Every specialisation the launchers above can produce (see ``tests/test_aot_compile.py``)."""
    from ._common import TL_NAMES, AotCase, reachable_configs

    for dtype, name in TL_NAMES.items():
        acc = tl.float64 if name == "fp64" else tl.float32
        ptrs = {"x_ptr": name, "y_ptr": name, "g_ptr": name, "d_ptr": name}
        configs = sorted(reachable_configs(getattr(torch, dtype).itemsize))
        for log in (True, False):
            for block_r, block_c, warps, one in configs:
                flags = dict(LOG=log, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc)
                yield AotCase(_softmax_fwd_kernel, ptrs, dict(flags, ONE_BLOCK=one), warps)
            for block_r, block_c, warps in sorted({c[:3] for c in configs}):
                flags = dict(LOG=log, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc)
                yield AotCase(_softmax_bwd_kernel, ptrs, flags, warps)
