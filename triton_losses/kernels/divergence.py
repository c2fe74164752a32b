"""KL-divergence (elementwise) and generalised Jensen-Shannon (row-wise) kernels and launchers.

``kl_div`` runs over the broadcast shape of input and target as tiles of at most three collapsed
dimensions (see ``_elementwise``), reading both in place (a broadcast operand is a stride-0 view);
its forward writes the loss ('none') or one partial sum per program, its backward the gradients
of input and/or target in one pass. Formulas (torch's composite ``kl_div`` and its autograd)::

    log_target=False:  loss = xlogy(t, t) - t * x        dx = -g * t   dt = g * (log t [0 at t=0] + t / t - x)
    log_target=True:   loss = exp(t) * (t - x)           dx = -g * e^t dt = g * (t - x) * e^t + g * e^t

``jsd`` works on rows of log-probabilities ``(A, B, V)`` (row ``r = a * B + b``), one pass over
the vocabulary per row block; the loss is elementwise in the vocabulary, so the same pass can
also write both gradients (fused into the forward when the caller asks, or in the backward).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import kept_rows, launch_config, row_block, row_offsets
from ._elementwise import (
    NUM_WARPS,
    acc_dtype,
    launch_backward,
    launch_forward,
    load_tile,
    store_grads,
    store_or_sum,
    tile_coords,
)
from .cross_entropy import scale_  # noqa: F401  (the fused-gradient rescale, shared with cross-entropy)

_NEG_INF = tl.constexpr(float("-inf"))
JSD_MIXTURE = 0  # 0 < beta < 1
JSD_FORWARD_KL = 1  # beta == 0: KL(target || input)
JSD_REVERSE_KL = 2  # beta == 1: KL(input || target)
FUSES_GRAD = True


@triton.jit
def _kl_fwd_kernel(
    x_ptr, xs0, xs1, xs2,  # input (log-probabilities), collapsed (D0, D1, D2) strides
    y_ptr, ys0, ys1, ys2,  # target (probabilities, or log-probabilities with LOG_TARGET)
    out_ptr, os0, os1, os2,  # loss ('none') in the output dtype
    part_ptr,  # (n_programs,) fp32 partial sums (REDUCE)
    R, D1, D2,
    LOG_TARGET: tl.constexpr, REDUCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """Elementwise KL loss of one tile: stored ('none') or summed into this program's partial."""
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C)
    x = load_tile(x_ptr, i0, i1, cols, xs0, xs1, xs2, mask, ACC)
    y = load_tile(y_ptr, i0, i1, cols, ys0, ys1, ys2, mask, ACC)
    if LOG_TARGET:
        loss = tl.exp(y) * (y - x)
    else:
        loss = tl.where(y == 0.0, 0.0, y * tl.log(y)) - y * x
    store_or_sum(loss, out_ptr, i0, i1, cols, os0, os1, os2, part_ptr, mask, REDUCE)


@triton.jit
def _kl_bwd_kernel(
    x_ptr, xs0, xs1, xs2,  # input, collapsed (D0, D1, D2) strides
    y_ptr, ys0, ys1, ys2,  # target
    g_ptr, gs0, gs1, gs2,  # upstream gradient: the shape ('none') or one value (strides 0)
    dx_ptr, dy_ptr, os0, os1, os2,  # gradients w.r.t. input and target, one shared layout
    R, D1, D2,
    LOG_TARGET: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Gradients of one tile of ``sum(g * loss)`` w.r.t. input and target."""
    i0, i1, cols, mask = tile_coords(R, D1, D2, BLOCK_R, BLOCK_C)
    x = load_tile(x_ptr, i0, i1, cols, xs0, xs1, xs2, mask, ACC)
    y = load_tile(y_ptr, i0, i1, cols, ys0, ys1, ys2, mask, ACC)
    g = load_tile(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, ACC)
    if LOG_TARGET:
        ge = g * tl.exp(y)
        dx = -ge
        dy = ge * (y - x) + ge
    else:
        dx = -(g * y)
        dy = g * (tl.where(y == 0.0, 0.0, tl.log(y)) + y / y) - g * x
    store_grads(dx, dy, dx_ptr, dy_ptr, i0, i1, cols, os0, os1, os2, mask, WRITE_DX, WRITE_DY)


@triton.jit
def _jsd_terms(x, y, beta, log_beta, log_1mbeta, MODE: tl.constexpr):
    """Per-element ``(loss, dloss/dx, dloss/dy)`` for log-probabilities x (Q) and y (P).

    A term weighted by a probability that is exactly 0 contributes 0 (``0 * log 0 = 0``).
    """
    if MODE == 0:
        q = tl.exp(x)
        p = tl.exp(y)
        a = y + log_beta
        b = x + log_1mbeta
        m = tl.maximum(a, b)
        m = tl.where(m == _NEG_INF, 0.0, m)
        log_m = m + tl.log(tl.exp(a - m) + tl.exp(b - m))  # log(beta * P + (1 - beta) * Q)
        tp = tl.where(p == 0.0, 0.0, beta * p * (y - log_m))
        tq = tl.where(q == 0.0, 0.0, (1.0 - beta) * q * (x - log_m))
        return tp + tq, tq, tp
    elif MODE == 1:
        p = tl.exp(y)
        loss = tl.where(p == 0.0, 0.0, p * (y - x))
        return loss, -p, tl.where(p == 0.0, 0.0, loss + p)
    else:
        q = tl.exp(x)
        loss = tl.where(q == 0.0, 0.0, q * (x - y))
        return loss, tl.where(q == 0.0, 0.0, loss + q), -q


@triton.jit
def _jsd_kernel(
    x_ptr, s_xa, s_xb, s_xv,  # input log-probabilities (A, B, V)
    y_ptr, s_ya, s_yb, s_yv,  # target log-probabilities (A, B, V)
    lab_ptr, s_la, s_lb,  # labels (A, B), when HAS_LABELS
    prm_ptr,  # (3,) ACC: beta, log(beta), log(1 - beta)
    loss_ptr,  # (R,) ACC per-row loss, when WRITE_LOSS
    gs_ptr, s_gs,  # gradient scale per row: (R,) with stride 1, or one value with stride 0
    gx_ptr, gy_ptr, s_ga, s_gb, s_gv,  # gradients w.r.t. input / target (A, B, V), one shared layout
    R, B, V, ignore_index,
    MODE: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_LOSS: tl.constexpr,
    WRITE_GX: tl.constexpr, WRITE_GY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per-row generalised JSD for ``BLOCK_R`` rows, and/or its gradients scaled per row."""
    rows, rmask = row_block(R, BLOCK_R)
    keep = kept_rows(lab_ptr, rows, rmask, B, s_la, s_lb, ignore_index, HAS_LABELS)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    yoff = row_offsets(rows, B, s_ya, s_yb)
    goff = row_offsets(rows, B, s_ga, s_gb)
    beta = tl.load(prm_ptr).to(ACC)
    log_beta = tl.load(prm_ptr + 1).to(ACC)
    log_1mbeta = tl.load(prm_ptr + 2).to(ACC)
    scale = tl.zeros([BLOCK_R], ACC)
    if WRITE_GX or WRITE_GY:
        scale = tl.load(gs_ptr + rows * s_gs, mask=keep, other=0.0).to(ACC)
    total = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, V, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = rmask[:, None] & (cols < V)[None, :]
        x = tl.load(x_ptr + xoff[:, None] + cols[None, :] * s_xv, mask=mask, other=_NEG_INF).to(ACC)
        y = tl.load(y_ptr + yoff[:, None] + cols[None, :] * s_yv, mask=mask, other=_NEG_INF).to(ACC)
        loss, dx, dy = _jsd_terms(x, y, beta, log_beta, log_1mbeta, MODE)
        if WRITE_LOSS:
            total += tl.sum(tl.where(mask, loss, 0.0), 1)
        gof = goff[:, None] + cols[None, :] * s_gv
        if WRITE_GX:
            dx = tl.where(keep[:, None], dx * scale[:, None], 0.0)
            tl.store(gx_ptr + gof, dx.to(gx_ptr.dtype.element_ty), mask=mask)
        if WRITE_GY:
            dy = tl.where(keep[:, None], dy * scale[:, None], 0.0)
            tl.store(gy_ptr + gof, dy.to(gy_ptr.dtype.element_ty), mask=mask)
    if WRITE_LOSS:
        tl.store(loss_ptr + rows, tl.where(keep, total, 0.0).to(loss_ptr.dtype.element_ty), mask=rmask)


def kl_fwd(x: torch.Tensor, y: torch.Tensor, log_target: bool, reduce: bool):
    """Launch the elementwise KL forward.

    Args:
        x: input log-probabilities expanded to the broadcast shape (stride-0 views allowed).
        y: target expanded to the same shape, ``x``'s dtype.
        log_target: ``y`` holds log-probabilities.
        reduce: return per-program partial sums instead of the elementwise loss.

    Returns:
        ``(n_programs,)`` fp32 (fp64 for fp64) partial sums if ``reduce``, else the loss (``x``'s dtype).
    """
    return launch_forward(_kl_fwd_kernel, [x, y], reduce, LOG_TARGET=log_target)


def kl_bwd(x, y, log_target: bool, g: torch.Tensor, need_dx: bool, need_dy: bool):
    """Launch the elementwise KL backward: ``(dx, dy)`` at the broadcast shape (None where not needed).

    ``x``, ``y`` and ``g`` are expanded to the broadcast shape; ``g`` is a stride-0 view of one
    fp32 (fp64) value for 'mean' / 'sum' (already divided by the element count for 'mean').
    """
    return launch_backward(_kl_bwd_kernel, [x, y, g], need_dx, need_dy, LOG_TARGET=log_target)


def jsd_mode(beta: float) -> int:
    return JSD_FORWARD_KL if beta == 0.0 else (JSD_REVERSE_KL if beta == 1.0 else JSD_MIXTURE)


def launch_rows(kernel, a, b, labels, params: list, out, gs, ga, gb, ignore_index: int, **flags) -> None:
    """Launch a row kernel ``kernel(a, b, labels, prm, out, gs, s_gs, ga, gb, strides, R, B, V, ignore_index, ...)``.

    Args:
        kernel: ``_jsd_kernel`` or ``kl_logits._kd_kernel`` (the same argument layout).
        a, b: the two ``(A, B, V)`` row views.
        labels: ``(A, B)`` int64 labels, or None.
        params: the kernel's scalar parameters, passed as a small ACC tensor (fp64 for fp64 data).
        out: the per-row output buffer, or None (not written).
        gs: per-row ``(A * B,)`` or single ``(1,)`` gradient scale, or None (no gradient written).
        ga, gb: gradient buffers ``(A, B, V)`` (one shared layout), or None.
        ignore_index: the masked label value.
        flags: the kernel's own constexprs (which outputs to write, its mode).
    """
    A, B, V = a.shape
    R = A * B
    if R == 0:
        return
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    prm = torch.tensor(params, dtype=acc, device=a.device)
    block_r, block_c, warps = launch_config(V, a.element_size(), True)
    lab_args = (a, 0, 0) if labels is None else (labels, *labels.stride())
    gs_args = (prm, 0) if gs is None else (gs, 0 if gs.numel() == 1 else gs.stride(0))
    g = ga if ga is not None else (gb if gb is not None else a)
    kernel[(triton.cdiv(R, block_r),)](
        a, *a.stride(), b, *b.stride(), *lab_args, prm, prm if out is None else out, *gs_args,
        g if ga is None else ga, g if gb is None else gb, *g.stride(),
        R, B, V, ignore_index,
        HAS_LABELS=labels is not None, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc_dtype(a.dtype), num_warps=warps,
        **flags,
    )  # fmt: skip


def _jsd_launch(x, y, labels, beta: float, ignore_index: int, loss, gs, gx, gy) -> None:
    lb = math.log(beta) if beta > 0 else float("-inf")
    l1b = math.log1p(-beta) if beta < 1 else float("-inf")
    launch_rows(_jsd_kernel, x, y, labels, [beta, lb, l1b], loss, gs, gx, gy, ignore_index,
                MODE=jsd_mode(beta), WRITE_LOSS=loss is not None, WRITE_GX=gx is not None, WRITE_GY=gy is not None)  # fmt: skip


def jsd_fwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    """Per-row generalised JSD; with ``need_g*`` also the gradients of ``sum_r gscale * loss_r``.

    Args:
        x: input log-probabilities ``(A, B, V)``.
        y: target log-probabilities ``(A, B, V)``, ``x``'s dtype.
        labels: ``(A, B)`` integer labels (rows equal to ``ignore_index`` are masked), or None.
        beta: the mixture weight in ``[0, 1]``.
        ignore_index: the masked label value.
        gscale: ``(1,)`` fp32 (fp64) gradient scale (the reduction's ``1 / denominator``).
        need_gx, need_gy: write the fused gradients w.r.t. ``x`` / ``y``.

    Returns:
        ``(loss, gx, gy)``: loss ``(A * B,)`` fp32 (fp64), gradients ``(A, B, V)`` contiguous or None.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = torch.empty(x.shape[0] * x.shape[1], dtype=acc, device=x.device)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_gx else None
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_gy else None
    _jsd_launch(x, y, labels, beta, ignore_index, loss, gscale, gx, gy)
    return loss, gx, gy


def jsd_bwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    """Gradients ``(gx, gy)`` (``(A, B, V)`` or None) of ``sum_r gscale_r * loss_r``.

    ``gscale`` is ``(A * B,)`` (reduction 'none') or one value broadcast to every row.
    """
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_gx else None
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_gy else None
    if need_gx or need_gy:
        _jsd_launch(x, y, labels, beta, ignore_index, None, gscale, gx, gy)
    return gx, gy


def row_configs(itemsize: int) -> list[tuple[int, int, int]]:
    """Every ``(BLOCK_R, BLOCK_C, num_warps)`` a row launch (vocabulary contiguous) can use."""
    sizes = [c for p in range(21) for c in (1 << p, (1 << p) + 1)]
    return sorted({launch_config(c, itemsize, True) for c in sizes})


def _case(kernel, ptrs: dict, constexprs: dict, num_warps: int):
    """An ``AotCase`` naming only ``kernel``'s own pointers (so distinct cases have distinct names)."""
    from ._common import AotCase

    return AotCase(kernel, {k: v for k, v in ptrs.items() if k in kernel.arg_names}, constexprs, num_warps)


def aot_cases():
    """The specialisations the launchers above produce (see ``tests/test_aot_compile.py``), as a covering set.

    Elementwise KL: every flag combination at the common configuration (bf16, 4096-column rows);
    every block shape for every dtype with both forward stores and the 'none' backward; the
    fp32 (fp64) upstream gradient of 'mean' / 'sum' at the wide tile. JSD: every flag
    combination at the bf16 large-vocabulary configuration, then every row configuration for
    every dtype (the flags only add stores). Also the fused-gradient rescale for every dtype.
    """
    from itertools import product

    from ._common import TL_NAMES
    from ._elementwise import TILE, reachable_blocks, tile_for
    from .cross_entropy import _scale_kernel

    def kl_ptrs(d: str, acc: str, g: str) -> dict:
        return dict(x_ptr=d, y_ptr=d, out_ptr=d, part_ptr=acc, g_ptr=g, dx_ptr=d, dy_ptr=d)

    def jsd_ptrs(d: str, acc: str) -> dict:
        return dict(x_ptr=d, y_ptr=d, lab_ptr="i64", prm_ptr=acc, loss_ptr=acc, gs_ptr=acc, gx_ptr=d, gy_ptr=d)

    wide = dict(BLOCK_R=1, BLOCK_C=TILE, ACC=tl.float32)
    for log_target in (False, True):
        flags = dict(LOG_TARGET=log_target, **wide)
        for reduce in (False, True):
            yield _case(_kl_fwd_kernel, kl_ptrs("bf16", "fp32", "fp32"), dict(flags, REDUCE=reduce), NUM_WARPS)
        for g, (dx, dy) in product(("fp32", "bf16"), ((True, False), (False, True), (True, True))):
            yield _case(_kl_bwd_kernel, kl_ptrs("bf16", "fp32", g), dict(flags, WRITE_DX=dx, WRITE_DY=dy), NUM_WARPS)
    block_r, block_c, big_warps = launch_config(128256, 2, True)
    big = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl.float32)
    for mode, labels, loss, gx, gy in product((0, 1, 2), *[(False, True)] * 4):
        if not (loss or gx or gy):
            continue
        flags = dict(MODE=mode, HAS_LABELS=labels, WRITE_LOSS=loss, WRITE_GX=gx, WRITE_GY=gy, **big)
        yield _case(_jsd_kernel, jsd_ptrs("bf16", "fp32"), flags, big_warps)
    for dtype, name in TL_NAMES.items():
        acc, acc_name = (tl.float64, "fp64") if name == "fp64" else (tl.float32, "fp32")
        tile = tile_for(8 if name == "fp64" else 4)
        for block_r, block_c in reachable_blocks(tile):
            flags = dict(LOG_TARGET=False, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc)
            for reduce in (False, True):
                yield _case(_kl_fwd_kernel, kl_ptrs(name, acc_name, acc_name), dict(flags, REDUCE=reduce), NUM_WARPS)
            for g in sorted({name, acc_name}) if block_c == tile else [name]:
                bwd = dict(flags, WRITE_DX=True, WRITE_DY=False)
                yield _case(_kl_bwd_kernel, kl_ptrs(name, acc_name, g), bwd, NUM_WARPS)
        for block_r, block_c, warps in row_configs(getattr(torch, dtype).itemsize):
            flags = dict(MODE=0, HAS_LABELS=True, WRITE_LOSS=True, WRITE_GX=True, WRITE_GY=False,
                         BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc)  # fmt: skip
            yield _case(_jsd_kernel, jsd_ptrs(name, acc_name), flags, warps)
        yield _case(_scale_kernel, dict(g_ptr=name, factor_ptr=acc_name), dict(BLOCK=4096), 8)
