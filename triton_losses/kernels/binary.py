"""Binary cross-entropy kernels (on probabilities, and on logits) and their launchers.

One forward and one backward kernel serve both losses through ``tl.constexpr`` flags: ``LOGITS``
(``binary_cross_entropy_with_logits``), ``HAS_WEIGHT``, ``HAS_POS_WEIGHT``. They run over the
broadcast shape as tiles of at most three collapsed dimensions (see ``_elementwise``), reading
every operand in place through its strides (a broadcast ``weight`` or ``pos_weight`` is a
stride-0 view, never a copy). The forward reads each input once and writes either the loss
('none') or one fp32 partial sum per program; the backward reads them once more and writes the
gradients of the input and/or the target in the same pass.

Formulas (torch's, ``aten/src/ATen/native/Loss.cpp``), in fp32 (fp64 for fp64 data)::

    logits:  loss = w * ((1 - y) * x - lw * logsigmoid(x)),   lw = (pw - 1) * y + 1  (1 without pw)
             dx   = w * g * (lw * sigmoid(x) - pw * y)        (sigmoid(x) - y without pw)
             dy   = w * g * (logsigmoid(-x) - pw * logsigmoid(x))   (-x without pw)
    probs:   loss = w * ((y - 1) * max(log(1 - x), -100) - y * max(log(x), -100))
             dx   = w * g * (x - y) / max((1 - x) * x, eps)   (eps: 1e-12 rounded to fp32, as torch)
             dy   = -w * g * log(x / (1 - x))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._elementwise import (
    NUM_WARPS,
    launch_backward,
    launch_forward,
    load_tile,
    log1p,
    store_grads,
    store_or_sum,
    tile_coords,
)

_EPS = tl.constexpr(9.999999960041972e-13)  # torch's `static const float EPSILON = 1e-12`, as fp32
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
    part_ptr,  # (n_programs,) fp32 partial sums (REDUCE)
    R, D1, D2,
    LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Elementwise BCE loss of one tile: stored ('none') or summed into this program's partial."""
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C)
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
        loss = (y - 1.0) * _clamped_log(1.0 - x) - y * _clamped_log(x)
    if HAS_WEIGHT:
        loss = loss * load_tile(w_ptr, i0, i1, cols, ws0, ws1, ws2, mask, ACC)
    store_or_sum(loss, out_ptr, i0, i1, cols, os0, os1, os2, part_ptr, mask, REDUCE)


@triton.jit
def _bce_bwd_kernel(
    x_ptr, xs0, xs1, xs2,  # input (logits or probabilities), collapsed (D0, D1, D2) strides
    y_ptr, ys0, ys1, ys2,  # target, same shape
    w_ptr, ws0, ws1, ws2,  # weight broadcast to the shape
    p_ptr, ps0, ps1, ps2,  # pos_weight broadcast to the shape (LOGITS only)
    g_ptr, gs0, gs1, gs2,  # upstream gradient: the shape ('none') or one value (strides 0), fp32 or the dtype
    dx_ptr, dy_ptr, os0, os1, os2,  # gradients w.r.t. input and target, one shared layout
    R, D1, D2,
    LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Gradients of one tile of ``sum(g * loss)`` w.r.t. the input and the target."""
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C)
    x = load_tile(x_ptr, i0, i1, cols, xs0, xs1, xs2, mask, ACC)
    y = load_tile(y_ptr, i0, i1, cols, ys0, ys1, ys2, mask, ACC)
    g = load_tile(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, ACC)
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
        dx = (x - y) / tl.maximum((1.0 - x) * x, _EPS)
        dy = -tl.log(x / (1.0 - x))
    store_grads(dx * g, dy * g, dx_ptr, dy_ptr, i0, i1, cols, os0, os1, os2, mask, WRITE_DX, WRITE_DY)


def bce_fwd(x, y, w, pw, logits: bool, reduce: bool) -> torch.Tensor:
    """Launch the forward kernel.

    Args:
        x: input (logits or probabilities), any shape and strides.
        y: target of ``x``'s shape and dtype.
        w: weight expanded to ``x``'s shape (a stride-0 view), or None.
        pw: pos_weight expanded to ``x``'s shape, or None (``logits`` only).
        logits: ``x`` holds logits (``binary_cross_entropy_with_logits``).
        reduce: return per-program partial sums instead of the elementwise loss.

    Returns:
        ``(n_programs,)`` fp32 (fp64 for fp64) partial sums if ``reduce``, else the loss of ``x``'s
        shape and dtype.
    """
    return launch_forward(_bce_fwd_kernel, [x, y, w, pw], reduce,
                          LOGITS=logits, HAS_WEIGHT=w is not None, HAS_POS_WEIGHT=pw is not None)  # fmt: skip


def bce_bwd(x, y, w, pw, logits: bool, g: torch.Tensor, need_dx: bool, need_dy: bool):
    """Launch the backward kernel.

    Args:
        x, y, w, pw, logits: as in :func:`bce_fwd`.
        g: upstream gradient expanded to ``x``'s shape (a stride-0 view of one fp32 value for
            'mean' / 'sum', already divided by the element count for 'mean').
        need_dx, need_dy: which gradients to compute.

    Returns:
        ``(dx, dy)`` in ``x``'s shape and dtype (None where not needed).
    """
    return launch_backward(_bce_bwd_kernel, [x, y, w, pw, g], need_dx, need_dy,
                           LOGITS=logits, HAS_WEIGHT=w is not None, HAS_POS_WEIGHT=pw is not None)  # fmt: skip


def _case(kernel, ptrs: dict, constexprs: dict, num_warps: int):
    """An ``AotCase`` naming only ``kernel``'s own pointers (so distinct cases have distinct names)."""
    from ._common import AotCase

    return AotCase(kernel, {k: v for k, v in ptrs.items() if k in kernel.arg_names}, constexprs, num_warps)


def aot_cases():
    """The specialisations the launchers above produce (see ``tests/test_aot_compile.py``), as a covering set.

    Flags (which only change elementwise math): every combination at the common configuration
    (bf16, one 4096-column row per program). Layout: every reachable block shape for every
    dtype, with both forward stores and the 'none' backward (upstream gradient in the data
    dtype). The fp32 (fp64) upstream gradient of 'mean' / 'sum': for every dtype at the wide tile.
    """
    from itertools import product

    from ._common import TL_NAMES
    from ._elementwise import TILE, reachable_blocks, tile_for

    def ptrs(d: str, acc: str, g: str) -> dict:
        return dict(x_ptr=d, y_ptr=d, w_ptr=d, p_ptr=d, out_ptr=d, part_ptr=acc, g_ptr=g, dx_ptr=d, dy_ptr=d)

    for logits, weight, pos in product((False, True), repeat=3):
        if pos and not logits:
            continue
        flags = dict(LOGITS=logits, HAS_WEIGHT=weight, HAS_POS_WEIGHT=pos, BLOCK_R=1, BLOCK_C=TILE, ACC=tl.float32)
        for reduce in (False, True):
            yield _case(_bce_fwd_kernel, ptrs("bf16", "fp32", "fp32"), dict(flags, REDUCE=reduce), NUM_WARPS)
        for g, (dx, dy) in product(("fp32", "bf16"), ((True, False), (False, True), (True, True))):
            yield _case(_bce_bwd_kernel, ptrs("bf16", "fp32", g), dict(flags, WRITE_DX=dx, WRITE_DY=dy), NUM_WARPS)
    for name in TL_NAMES.values():
        acc, acc_name = (tl.float64, "fp64") if name == "fp64" else (tl.float32, "fp32")
        tile = tile_for(8 if name == "fp64" else 4)
        for block_r, block_c in reachable_blocks(tile):
            flags = dict(LOGITS=True, HAS_WEIGHT=False, HAS_POS_WEIGHT=False, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc)
            for reduce in (False, True):
                yield _case(_bce_fwd_kernel, ptrs(name, acc_name, acc_name), dict(flags, REDUCE=reduce), NUM_WARPS)
            grads = sorted({name, acc_name}) if block_c == tile else [name]
            for g in grads:
                bwd = dict(flags, WRITE_DX=True, WRITE_DY=False)
                yield _case(_bce_bwd_kernel, ptrs(name, acc_name, g), bwd, NUM_WARPS)
