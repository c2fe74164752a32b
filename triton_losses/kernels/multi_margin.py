"""Multi-class margin loss kernels (one per loss), their launchers, and ``TRACED``.

Every kernel works on ``(R, C)`` rows read in place through their strides (broadcast operands are
stride-0 views) and writes per-row losses (``WRITE_LOSS``) and/or the gradient of
``sum(f * row_loss)`` into a contiguous ``(R, C)`` buffer (``WRITE_GRAD``), ``f`` being one
factor for every row (the fused gradient of 'mean' / 'sum') or one per row (the 'none' backward).
The forward with a gradient to compute runs both in one launch, so each row is read once.

* ``multilabel_soft_margin_loss``: a program holds ``BLOCK_R`` rows, column blocks of them.
* ``multi_margin_loss``: ``x[y]`` first, then one pass over the row (loss, and the gradient of
  every column but ``y``, whose gradient, minus their sum, is written last).
* ``multilabel_margin_loss``: one row per program. The target list (entries up to the first
  negative one) is read in blocks of ``BLOCK_K`` until its end; then, per column block, the
  "is a target" mask is built by comparing the columns with the listed classes, and every
  (listed class, open column) pair adds ``max(0, 1 - x[y_k] + x[d])``. The gradient of a listed
  class needs the count over all open columns, so a second pass walks the list in blocks over
  the (cached) row; the mask of the first pass is kept as a bitmap in registers (16 bits per
  int32 word) for rows up to :data:`MLM_BITMAP_MAX` columns, and rebuilt per column block above.

Targets are clamped before any load, so nothing is read out of bounds whatever they hold; on
CUDA an out-of-range target trips a ``tl.device_assert`` (torch's CUDA kernels do not check; its
CPU kernels raise, which the public functions reproduce for CPU tensors).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._precision import acc_dtype
from ._common import (
    assert_options,
    launch_config,
    next_pow2,
    on_device,
    row_block,
    scale_,
    tl_acc,
    traced_scale_,
)
from ._elementwise import asked, joined, log1p, split_float

__all__ = [
    "FUSES_GRAD",
    "MLM_BITMAP_MAX",
    "mlm_bitmap_max",
    "mlm_config",
    "TRACED",
    "mlsm_bwd",
    "mlsm_fwd",
    "multi_margin_bwd",
    "multi_margin_fwd",
    "multilabel_margin_bwd",
    "multilabel_margin_fwd",
    "scale_",
]

FUSES_GRAD = True

# Rows up to this many classes keep the multilabel "is a target" mask as a register bitmap
# (C / 16 int32 words: 4096 words, 16 per thread of an 8-warp program, at the limit; a quarter as many
# classes for fp64 rows, see :func:`mlm_bitmap_max`).
MLM_BITMAP_MAX = 1 << 16


# ---- multilabel_soft_margin_loss ---------------------------------------------------------------


@triton.jit
def _mlsm_kernel(
    x_ptr, s_xr, s_xc,  # logits (R, C)
    t_ptr, s_tr, s_tc,  # targets (R, C), any real dtype
    w_ptr, s_wr, s_wc,  # weights viewed as (R, C) (HAS_WEIGHT)
    f_ptr, s_f,  # gradient factor: per row (s_f = 1) or one shared value (s_f = 0)
    loss_ptr,  # (R,) row losses, fp32 / fp64 (WRITE_LOSS)
    gx_ptr, gt_ptr,  # (R, C) contiguous gradients w.r.t. x and t (WRITE_GX / WRITE_GT)
    R, C,
    HAS_WEIGHT: tl.constexpr, WRITE_LOSS: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Row losses ``sum_c w_c (t_c softplus(-x_c) + (1 - t_c) softplus(x_c)) / C`` and their gradients."""
    rows, rmask = row_block(R, BLOCK_R)
    f = tl.load(f_ptr + rows * s_f, mask=rmask, other=0.0).to(ACC) / C
    total = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * s_xr + cols[None, :] * s_xc, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_ptr + rows[:, None] * s_tr + cols[None, :] * s_tc, mask=mask, other=0).to(ACC)
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(w_ptr + rows[:, None] * s_wr + cols[None, :] * s_wc, mask=mask, other=0.0).to(ACC)
        if WRITE_LOSS:
            soft = log1p(tl.exp(-tl.abs(x)))
            elem = t * (tl.maximum(-x, 0.0) + soft) + (1.0 - t) * (tl.maximum(x, 0.0) + soft)
            total += tl.where(mask, elem * w, 0.0)
        goff = rows[:, None] * C + cols[None, :]
        if WRITE_GX:
            g = (1.0 / (1.0 + tl.exp(-x)) - t) * w * f[:, None]
            tl.store(gx_ptr + goff, g.to(gx_ptr.dtype.element_ty), mask=mask)
        if WRITE_GT:
            tl.store(gt_ptr + goff, (-x * w * f[:, None]).to(gt_ptr.dtype.element_ty), mask=mask)
    if WRITE_LOSS:
        tl.store(loss_ptr + rows, tl.sum(total, 1) / C, mask=rmask)


def mlsm_config(C: int, elem_size: int, col_contiguous: bool) -> tuple[int, int, int]:
    """``launch_config`` at half the tile (logits, targets and weights held at once).

    Measured with ptxas (sm_90, one 4096-column row per program, weights and gradients): the full
    tile spills 8 bytes in fp32 and bf16; half of it does not.
    """
    return launch_config(C, elem_size, col_contiguous, per_thread={2: 8, 4: 8, 8: 2}[elem_size])


def _mlsm_launch(x, t, w, f, loss, gx, gt) -> None:
    R, C = x.shape
    if R == 0:
        return
    block_r, block_c, warps = mlsm_config(C, x.element_size(), x.stride(1) == 1 or R == 1)
    wv = w if w is not None else x
    with on_device(x):
        _mlsm_kernel[(triton.cdiv(R, block_r),)](
            x, x.stride(0), x.stride(1), t, t.stride(0), t.stride(1), wv, wv.stride(0), wv.stride(1),
            f, 1 if f.numel() > 1 else 0, loss if loss is not None else f,
            gx if gx is not None else x, gt if gt is not None else x, R, C,
            HAS_WEIGHT=w is not None, WRITE_LOSS=loss is not None, WRITE_GX=gx is not None,
            WRITE_GT=gt is not None, BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(loss_dtype(x, t, w)),
            num_warps=warps,
        )  # fmt: skip


def loss_dtype(x: Tensor, t: Tensor, w: Tensor | None) -> torch.dtype:
    """fp64 when any floating operand is fp64, else fp32 (the row losses' dtype)."""
    dts = [x.dtype, t.dtype] + ([w.dtype] if w is not None else [])
    return torch.float64 if torch.float64 in dts else torch.float32


def _empty(like: Tensor, want: bool) -> Tensor | None:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device) if want else None


def mlsm_fwd(x: Tensor, t: Tensor, w: Tensor | None, coef: Tensor, fuse_x: bool, fuse_t: bool):
    """Per-row multilabel soft-margin loss of ``(R, C)`` logits (see ``reference.multi_margin.mlsm_fwd``).

    Returns ``(loss (R,), grad_x or None, grad_t or None)``; the gradients are those of
    ``coef * sum(row losses)``.
    """
    loss = torch.empty(x.shape[0], dtype=loss_dtype(x, t, w), device=x.device)
    gx, gt = _empty(x, fuse_x), _empty(t, fuse_t)
    _mlsm_launch(x, t, w, coef.to(loss.dtype), loss, gx, gt)
    return loss, gx, gt


def mlsm_bwd(x: Tensor, t: Tensor, w: Tensor | None, gout: Tensor, need_x: bool, need_t: bool):
    """Gradients ``(R, C)`` (or None) of ``sum(gout * row_loss)``; ``gout`` ``(R,)`` or ``(1,)``."""
    gx, gt = _empty(x, need_x), _empty(t, need_t)
    if need_x or need_t:
        _mlsm_launch(x, t, w, gout.to(loss_dtype(x, t, w)).contiguous(), None, gx, gt)
    return gx, gt


# ---- multi_margin_loss -----------------------------------------------------------------------


@triton.jit
def _mm_kernel(
    x_ptr, s_xr, s_xc,  # scores (R, C)
    y_ptr, s_y,  # class indices (R,) int64
    w_ptr, s_w,  # class weights (C,) (HAS_WEIGHT)
    f_ptr, s_f,  # gradient factor: per row (s_f = 1) or one shared value (s_f = 0)
    loss_ptr,  # (R,) row losses (WRITE_LOSS)
    gx_ptr,  # (R, C) contiguous gradient (WRITE_GRAD)
    R, C, margin_hi, margin_lo,
    P: tl.constexpr, HAS_WEIGHT: tl.constexpr, WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Row losses ``w_y sum_{j != y} max(0, margin - x_y + x_j)**P / C`` and their gradients."""
    rows, rmask = row_block(R, BLOCK_R)
    y = tl.load(y_ptr + rows * s_y, mask=rmask, other=0)
    tl.device_assert((y >= 0) & (y < C), "multi_margin_loss: target out of range")
    y = tl.minimum(tl.maximum(y, 0), C - 1)
    xoff = rows * s_xr
    base = joined(margin_hi, margin_lo, ACC) - tl.load(x_ptr + xoff + y * s_xc, mask=rmask, other=0.0).to(ACC)
    wy = tl.zeros([BLOCK_R], ACC) + 1.0
    if HAS_WEIGHT:
        wy = tl.load(w_ptr + y * s_w, mask=rmask, other=0.0).to(ACC)
    scale = tl.load(f_ptr + rows * s_f, mask=rmask, other=0.0).to(ACC) * wy / C
    total = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    gsum = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xc, mask=mask, other=0.0).to(ACC)
        z = base[:, None] + x
        others = mask & (cols[None, :] != y[:, None])
        z = tl.where(others & (z > 0), z, 0.0)  # NaN scores add nothing, as torch's "z > 0" test
        if WRITE_LOSS:
            if P == 1:
                total += z
            else:
                total += z * z
        if WRITE_GRAD:
            if P == 1:
                g = tl.where(z > 0, scale[:, None], 0.0)
            else:
                g = 2.0 * z * scale[:, None]
            gsum += g
            tl.store(gx_ptr + rows[:, None] * C + cols[None, :], g.to(gx_ptr.dtype.element_ty), mask=others)
    if WRITE_LOSS:
        tl.store(loss_ptr + rows, tl.sum(total, 1) * wy / C, mask=rmask)
    if WRITE_GRAD:
        tl.store(gx_ptr + rows * C + y, (-tl.sum(gsum, 1)).to(gx_ptr.dtype.element_ty), mask=rmask)


def _mm_launch(x, y, w, p: int, margin: float, f, loss, gx) -> None:
    R, C = x.shape
    if R == 0:
        return
    block_r, block_c, warps = launch_config(C, x.element_size(), x.stride(1) == 1 or R == 1)
    wv = w if w is not None else x
    with on_device(x):
        _mm_kernel[(triton.cdiv(R, block_r),)](
            x, x.stride(0), x.stride(1), y, y.stride(0), wv, wv.stride(0) if w is not None else 0,
            f, 1 if f.numel() > 1 else 0, loss if loss is not None else f, gx if gx is not None else x,
            R, C, *split_float(float(margin)),
            P=int(p), HAS_WEIGHT=w is not None, WRITE_LOSS=loss is not None, WRITE_GRAD=gx is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(x.dtype), num_warps=warps, **assert_options(x),
        )  # fmt: skip


def multi_margin_fwd(x: Tensor, y: Tensor, w: Tensor | None, p: int, margin: float, coef: Tensor, fuse: bool):
    """Per-row multi-class margin loss of ``(R, C)`` scores; ``(loss (R,), grad or None)``."""
    loss = torch.empty(x.shape[0], dtype=acc_dtype(x.dtype), device=x.device)
    gx = _empty(x, fuse)
    _mm_launch(x, y, w, p, margin, coef.to(loss.dtype), loss, gx)
    return loss, gx


def multi_margin_bwd(x: Tensor, y: Tensor, w: Tensor | None, p: int, margin: float, gout: Tensor) -> Tensor:
    """Gradient ``(R, C)`` of ``sum(gout * row_loss)``; ``gout`` ``(R,)`` or ``(1,)``."""
    gx = _empty(x, True)
    _mm_launch(x, y, w, p, margin, gout.to(acc_dtype(x.dtype)).contiguous(), None, gx)
    return gx


# ---- multilabel_margin_loss ------------------------------------------------------------------


@triton.jit
def _list_length(y_ptr, yoff, s_yc, C, BLOCK_K: tl.constexpr):
    """Length of a row's target list: the index of its first negative entry (C if none).

    Reads the list in blocks until that entry (a list of 3 classes reads one block of it), and
    asserts on the device that every listed class is below ``C``: the only range check of the row,
    so that no assert (a call, whose live registers go to the stack) sits in the loops after it.
    """
    n = C + tl.zeros([], tl.int64)
    k0 = n * 0
    while k0 < n:
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        t = tl.load(y_ptr + yoff + ks * s_yc, mask=ks < C, other=0)
        n = tl.minimum(n, tl.min(tl.where((t < 0) & (ks < C), ks, C), 0))
        tl.device_assert((t < C) | (ks >= n), "multilabel_margin_loss: target out of range")
        k0 += BLOCK_K
    return n


@triton.jit
def _listed(y_ptr, yoff, s_yc, k0, n, C, BLOCK_K: tl.constexpr):
    """Entries ``k0 .. k0 + BLOCK_K`` of a target list: ``(class, in the list and in [0, C))``."""
    ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    t = tl.load(y_ptr + yoff + ks * s_yc, mask=ks < n, other=-1)
    ok = (ks < n) & (t >= 0) & (t < C)
    return tl.where(ok, t, 0), ok


@triton.jit
def _target_mask(y_ptr, yoff, s_yc, cols, n, C, BLOCK_K: tl.constexpr):
    """Which of ``cols`` the row's target list names, and how many times (``(BLOCK_C,)`` each)."""
    mult = cols.to(tl.int32) * 0
    for k0 in range(0, n, BLOCK_K):
        t, ok = _listed(y_ptr, yoff, s_yc, k0, n, C, BLOCK_K)
        mult += tl.sum(((cols[:, None] == t[None, :]) & ok[None, :]).to(tl.int32), 1)
    return mult > 0


@triton.jit
def _pack(is_t, BLOCK_C: tl.constexpr):
    """``(BLOCK_C,)`` booleans as ``(BLOCK_C // 16,)`` int32 words of 16 bits."""
    bits = tl.reshape(is_t.to(tl.int32), (BLOCK_C // 16, 16))
    return tl.sum(bits << tl.arange(0, 16)[None, :], 1)


@triton.jit
def _unpack(words, BLOCK_C: tl.constexpr):
    """Inverse of :func:`_pack`."""
    bits = (words[:, None] >> tl.arange(0, 16)[None, :]) & 1
    return tl.reshape(bits, (BLOCK_C,)) != 0


@triton.jit
def _mlm_kernel(
    x_ptr, s_xr, s_xc,  # scores (R, C)
    y_ptr, s_yr, s_yc,  # target lists (R, C) int64
    f_ptr, s_f,  # gradient factor: per row (s_f = 1) or one shared value (s_f = 0)
    loss_ptr,  # (R,) row losses (WRITE_LOSS)
    gx_ptr,  # (R, C) contiguous gradient (WRITE_GRAD)
    C,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, BITMAP: tl.constexpr, NB: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Row loss ``sum_{k listed} sum_{d not listed} max(0, 1 - x[y_k] + x[d]) / C`` of one row, and its gradient."""
    row = tl.program_id(0).to(tl.int64)
    xoff = row * s_xr
    yoff = row * s_yr
    goff = row * C
    n = _list_length(y_ptr, yoff, s_yc, C, BLOCK_K)
    scale = tl.load(f_ptr + row * s_f).to(ACC) / C
    total = tl.zeros([BLOCK_C], ACC)
    bitmap = tl.zeros([NB, BLOCK_C // 16], tl.int32)
    blocks = tl.arange(0, NB)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        x = tl.load(x_ptr + xoff + cols * s_xc, mask=cols < C, other=0.0).to(ACC)
        is_t = _target_mask(y_ptr, yoff, s_yc, cols, n, C, BLOCK_K)
        open_cols = (cols < C) & ~is_t
        count = tl.zeros([BLOCK_C], ACC)
        for k0 in range(0, n, BLOCK_K):
            t, ok = _listed(y_ptr, yoff, s_yc, k0, n, C, BLOCK_K)
            u = tl.load(x_ptr + xoff + t * s_xc, mask=ok, other=0.0).to(ACC)
            z = (1.0 - u)[None, :] + x[:, None]
            pos = (z > 0) & open_cols[:, None] & ok[None, :]
            total += tl.sum(tl.where(pos, z, 0.0), 1)
            count += tl.sum(pos.to(ACC), 1)
        if WRITE_GRAD:
            tl.store(gx_ptr + goff + cols, (count * scale).to(gx_ptr.dtype.element_ty), mask=open_cols)
            if BITMAP:
                bitmap = tl.where(blocks[:, None] == c0 // BLOCK_C, _pack(is_t, BLOCK_C)[None, :], bitmap)
    if WRITE_LOSS:
        tl.store(loss_ptr + row, tl.sum(total, 0) / C)
    if WRITE_GRAD:
        _mlm_listed_grads(x_ptr, xoff, s_xc, y_ptr, yoff, s_yc, gx_ptr, goff, n, C, scale, bitmap, blocks,
                          BITMAP, BLOCK_C, BLOCK_K, ACC)  # fmt: skip


@triton.jit
def _mlm_listed_grads(
    x_ptr, xoff, s_xc,  # the row's scores
    y_ptr, yoff, s_yc,  # the row's target list
    gx_ptr, goff,  # the row's gradient
    n, C, scale,  # list length, classes, gradient factor / C
    bitmap, blocks,  # "is a target" bitmap (NB, BLOCK_C // 16) and its block ids (BITMAP)
    BITMAP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Gradient of the listed classes: ``-(times listed) * #{open d: 1 - x[c] + x[d] > 0} * scale``."""
    for k0 in range(0, n, BLOCK_K):
        t, ok = _listed(y_ptr, yoff, s_yc, k0, n, C, BLOCK_K)
        u = tl.load(x_ptr + xoff + t * s_xc, mask=ok, other=0.0).to(ACC)
        times = tl.zeros([BLOCK_K], tl.int32)
        for k1 in range(0, n, BLOCK_K):
            t2, ok2 = _listed(y_ptr, yoff, s_yc, k1, n, C, BLOCK_K)
            times += tl.sum(((t[:, None] == t2[None, :]) & ok2[None, :]).to(tl.int32), 1)
        count = tl.zeros([BLOCK_K], ACC)
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            x = tl.load(x_ptr + xoff + cols * s_xc, mask=cols < C, other=0.0).to(ACC)
            if BITMAP:
                words = tl.sum(tl.where(blocks[:, None] == c0 // BLOCK_C, bitmap, 0), 0)
                is_t = _unpack(words, BLOCK_C)
            else:
                is_t = _target_mask(y_ptr, yoff, s_yc, cols, n, C, BLOCK_K)
            open_cols = (cols < C) & ~is_t
            z = (1.0 - u)[None, :] + x[:, None]
            count += tl.sum(((z > 0) & open_cols[:, None]).to(ACC), 0)
        g = -(times.to(ACC) * count) * scale
        tl.store(gx_ptr + goff + t, g.to(gx_ptr.dtype.element_ty), mask=ok)


def mlm_bitmap_max(acc_bytes: int) -> int:
    """Classes up to which the multilabel margin kernel keeps its register bitmap (a quarter for fp64 rows)."""
    return MLM_BITMAP_MAX if acc_bytes <= 4 else MLM_BITMAP_MAX // 4


def mlm_config(C: int, acc_bytes: int = 4) -> tuple[int, int, int, int]:
    """``(BLOCK_C, BLOCK_K, NB, num_warps)`` of the multilabel margin kernel for rows of ``C`` classes.

    A (BLOCK_C, BLOCK_K) comparison tile of at most 4096 pairs (16 per thread at 8 warps) in fp32,
    2048 (8 per thread) when the row accumulates in fp64, whose values take two registers each; lists
    are read 16 entries at a time, so a row with few labels does one target block per column block.
    """
    block_k = 16
    block_c = max(16, min(256 if acc_bytes <= 4 else 128, next_pow2(C)))
    nb = next_pow2(triton.cdiv(max(C, 1), block_c)) if mlm_bitmap_max(acc_bytes) >= C else 1
    warps = max(1, min(8, block_c * block_k // (512 if acc_bytes <= 4 else 256)))
    return block_c, block_k, nb, warps


def _mlm_launch(x, y, f, loss, gx) -> None:
    R, C = x.shape
    if R == 0:
        return
    acc_bytes = acc_dtype(x.dtype).itemsize
    block_c, block_k, nb, warps = mlm_config(C, acc_bytes)
    with on_device(x):
        _mlm_kernel[(R,)](
            x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), f, 1 if f.numel() > 1 else 0,
            loss if loss is not None else f, gx if gx is not None else x, C,
            WRITE_LOSS=loss is not None, WRITE_GRAD=gx is not None, BITMAP=mlm_bitmap_max(acc_bytes) >= C, NB=nb,
            BLOCK_C=block_c, BLOCK_K=block_k, ACC=tl_acc(x.dtype), num_warps=warps, **assert_options(x),
        )  # fmt: skip


def multilabel_margin_fwd(x: Tensor, y: Tensor, coef: Tensor, fuse: bool):
    """Per-row multilabel margin loss of ``(R, C)`` scores; ``(loss (R,), grad or None)``."""
    loss = torch.empty(x.shape[0], dtype=acc_dtype(x.dtype), device=x.device)
    gx = _empty(x, fuse)
    _mlm_launch(x, y, coef.to(loss.dtype), loss, gx)
    return loss, gx


def multilabel_margin_bwd(x: Tensor, y: Tensor, gout: Tensor) -> Tensor:
    """Gradient ``(R, C)`` of ``sum(gout * row_loss)``; ``gout`` ``(R,)`` or ``(1,)``."""
    gx = _empty(x, True)
    _mlm_launch(x, y, gout.to(acc_dtype(x.dtype)).contiguous(), None, gx)
    return gx


# ---- TRACED: the launchers as torch.library custom ops (used while torch.compile traces) ----------


@torch.library.custom_op("triton_losses::mlsm_fwd", mutates_args=())
def _mlsm_fwd_op(x: Tensor, t: Tensor, w: Tensor | None, coef: Tensor) -> Tensor:
    return mlsm_fwd(x, t, w, coef, False, False)[0]


@_mlsm_fwd_op.register_fake
def _(x, t, w, coef):
    return x.new_empty(x.shape[0], dtype=loss_dtype(x, t, w))


@torch.library.custom_op("triton_losses::mlsm_bwd", mutates_args=())
def _mlsm_bwd_op(
    x: Tensor, t: Tensor, w: Tensor | None, gout: Tensor, need_x: bool, need_t: bool
) -> tuple[Tensor, Tensor]:
    gx, gt = mlsm_bwd(x, t, w, gout, need_x, need_t)
    return (x.new_empty(0) if gx is None else gx), (t.new_empty(0) if gt is None else gt)


@_mlsm_bwd_op.register_fake
def _(x, t, w, gout, need_x, need_t):
    return x.new_empty(x.shape if need_x else (0,)), t.new_empty(t.shape if need_t else (0,))


@torch.library.custom_op("triton_losses::multi_margin_fwd", mutates_args=())
def _mm_fwd_op(x: Tensor, y: Tensor, w: Tensor | None, p: int, margin: float, coef: Tensor) -> Tensor:
    return multi_margin_fwd(x, y, w, p, margin, coef, False)[0]


@_mm_fwd_op.register_fake
def _(x, y, w, p, margin, coef):
    return x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype))


@torch.library.custom_op("triton_losses::multi_margin_bwd", mutates_args=())
def _mm_bwd_op(x: Tensor, y: Tensor, w: Tensor | None, p: int, margin: float, gout: Tensor) -> Tensor:
    return multi_margin_bwd(x, y, w, p, margin, gout)


@_mm_bwd_op.register_fake
def _(x, y, w, p, margin, gout):
    return x.new_empty(x.shape)


@torch.library.custom_op("triton_losses::multilabel_margin_fwd", mutates_args=())
def _mlm_fwd_op(x: Tensor, y: Tensor, coef: Tensor) -> Tensor:
    return multilabel_margin_fwd(x, y, coef, False)[0]


@_mlm_fwd_op.register_fake
def _(x, y, coef):
    return x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype))


@torch.library.custom_op("triton_losses::multilabel_margin_bwd", mutates_args=())
def _mlm_bwd_op(x: Tensor, y: Tensor, gout: Tensor) -> Tensor:
    return multilabel_margin_bwd(x, y, gout)


@_mlm_bwd_op.register_fake
def _(x, y, gout):
    return x.new_empty(x.shape)


def _traced_mlsm_fwd(x, t, w, coef, fuse_x: bool, fuse_t: bool):
    return _mlsm_fwd_op(x, t, w, coef), None, None


def _traced_mlsm_bwd(x, t, w, gout, need_x: bool, need_t: bool):
    return asked(_mlsm_bwd_op(x, t, w, gout, need_x, need_t), (need_x, need_t))


def _traced_mm_fwd(x, y, w, p: int, margin: float, coef, fuse: bool):
    return _mm_fwd_op(x, y, w, p, margin, coef), None


def _traced_mlm_fwd(x, y, coef, fuse: bool):
    return _mlm_fwd_op(x, y, coef), None


# Under tracing the forward never fuses the gradient (the custom ops are functional).
TRACED = SimpleNamespace(
    FUSES_GRAD=False,
    mlsm_fwd=_traced_mlsm_fwd,
    mlsm_bwd=_traced_mlsm_bwd,
    multi_margin_fwd=_traced_mm_fwd,
    multi_margin_bwd=_mm_bwd_op,
    multilabel_margin_fwd=_traced_mlm_fwd,
    multilabel_margin_bwd=_mlm_bwd_op,
    scale_=traced_scale_,
)
