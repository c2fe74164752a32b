"""Online-softmax cross-entropy / NLL kernels, their launchers, and ``TRACED`` (the same as custom ops).

One forward kernel and one backward kernel serve every option through ``tl.constexpr`` flags:
index or probability targets, log-probability input (NLL), class weights, label smoothing,
z-loss and softcap. The forward reads each row once (running max and sum-exp over column
blocks) and writes per-row ``loss`` and statistics ``(max, sum of exp(x - max))``; with
``WRITE_GRAD`` it then writes the row's gradient while the row is still in cache, so the backward
only has to scale it (in a persistent grid at LM row lengths, so the re-read row is still in L2:
see ``VARIANTS``). The max and the sum stay apart (the softmax is ``exp(x - max) / sum``), so
fp32 accuracy does not fall with the logits' magnitude. The denominator before the forward and the
reduced loss after it are ``_ce_reduce``'s (``ce_norm``, ``ce_finish``); ``scale_`` (the backward's
rescale of the fused gradient) is ``_common``'s.

An index target outside ``[0, C)`` (and not ``ignore_index``) trips a ``tl.device_assert`` on
CUDA, as torch's CUDA kernels do; every load uses a clamped index, so it never reads out of bounds.
"""

from __future__ import annotations

import functools
import os
import types

import torch
import triton
import triton.language as tl

from .._precision import acc_dtype
from ..options import CESpec, is_slice
from ..reference import cross_entropy as _reference
from ._ce_reduce import ce_finish, ce_norm  # noqa: F401  (the engine's reductions, as the reference's)
from ._common import (
    NEG_INF,
    aligned_split,
    assert_options,
    launch_config,
    masked_load,
    masked_store,
    on_device,
    online_lse_shifted,
    row_align,
    row_block,
    row_offsets,
    rows_of_block,
    scale_,  # noqa: F401  (the fused-gradient rescale every family shares)
    sm_count,
    tanh,
    tl_acc,
    traced_scale_,
)
from ._elementwise import joined, split_float

FUSES_GRAD = True  # ce_fwd(..., grad=buffer) writes the gradient of the reduced loss


@triton.jit
def _softcap(x, cap, mask, HAS_SOFTCAP: tl.constexpr):
    """``cap * tanh(x / cap)`` on live lanes; masked lanes stay ``-inf``."""
    if HAS_SOFTCAP:
        x = tl.where(mask, cap * tanh(x / cap), NEG_INF)
    return x


@triton.jit
def _ce_grad_pass(
    x_ptr, xoff, s_xc,  # logits rows: base offsets (BLOCK_R,), class stride
    t_ptr, toff, s_tc,  # probability targets (PROB_TARGET) rows
    w_ptr, s_w,  # class weights (C,), stride
    g_ptr, goff, s_gc,  # gradient rows to write
    dt_ptr, dtoff, s_dtc,  # target gradient rows to write (WRITE_TGRAD)
    rmask, tgt, m, inv_s, logs, a_rs, own_rs, rscale,  # per-row (BLOCK_R,) values; tgt: local class index
    C, c_off, NC, smoothing, softcap,  # local classes, the first one's global index, global classes
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_TGRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Write ``rscale * dloss/dx`` (and ``dloss/dtarget``) for a block of rows, one column block at a time.

    ``EVICT``: the L2 eviction policy of the logits' read and the gradient's stores ("" for the default;
    "evict_first" where the logits were kept in L2 by the forward's first read and are read for the last time).
    ``ALIGN > 1`` (one row, ``g`` at ``x``'s offsets): a masked head up to the first 16-byte boundary,
    unmasked aligned blocks, a masked rest (``aligned_split``).

    ``d = exp(x - m) * (a_rs * inv_s) - own_rs * onehot - (smoothing / C) * w * rscale`` (index
    targets) or ``... - w * t * rscale`` (probability targets), times the softcap's derivative;
    the smoothing divides by the global class count ``NC`` and weights are read at ``c_off + col``.
    """
    if ALIGN > 1:
        head, full, tail, rest = aligned_split(xoff, C, ALIGN, BLOCK_C)
        # the head: an ALIGN-wide masked tile of the columns before the first 16-byte boundary
        _ce_grad_block(x_ptr, xoff, s_xc, t_ptr, toff, s_tc, w_ptr, s_w, g_ptr, goff, s_gc, dt_ptr, dtoff, s_dtc,
                       0, head, rmask, tgt, m, inv_s, logs, a_rs, own_rs, rscale, c_off, NC, smoothing, softcap,
                       HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TGRAD,
                       True, ALIGN, ACC, EVICT)  # fmt: skip
        for k in range(full):  # whole aligned tiles, unmasked
            c0 = head + k * BLOCK_C
            _ce_grad_block(x_ptr, tl.multiple_of(xoff + c0, ALIGN), s_xc, t_ptr, toff + c0 * s_tc, s_tc, w_ptr, s_w,
                           g_ptr, tl.multiple_of(goff + c0, ALIGN), s_gc, dt_ptr, dtoff + c0 * s_dtc, s_dtc,
                           c0, BLOCK_C, rmask, tgt, m, inv_s, logs, a_rs, own_rs, rscale, c_off, NC, smoothing, softcap,
                           HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TGRAD,
                           False, BLOCK_C, ACC, EVICT)  # fmt: skip
        c0 = head + full * BLOCK_C  # the aligned rest, masked in whole ALIGN units (16-byte accesses still)
        _ce_grad_block(x_ptr, tl.multiple_of(xoff + c0, ALIGN), s_xc, t_ptr, toff + c0 * s_tc, s_tc, w_ptr, s_w,
                       g_ptr, tl.multiple_of(goff + c0, ALIGN), s_gc, dt_ptr, dtoff + c0 * s_dtc, s_dtc,
                       c0, tail, rmask, tgt, m, inv_s, logs, a_rs, own_rs, rscale, c_off, NC, smoothing, softcap,
                       HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TGRAD,
                       True, BLOCK_C, ACC, EVICT)  # fmt: skip
        c0 = C - rest  # the last columns, fewer than ALIGN: an ALIGN-wide masked tile
        _ce_grad_block(x_ptr, xoff + c0, s_xc, t_ptr, toff + c0 * s_tc, s_tc, w_ptr, s_w, g_ptr, goff + c0, s_gc,
                       dt_ptr, dtoff + c0 * s_dtc, s_dtc,
                       c0, rest, rmask, tgt, m, inv_s, logs, a_rs, own_rs, rscale, c_off, NC, smoothing, softcap,
                       HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TGRAD,
                       True, ALIGN, ACC, EVICT)  # fmt: skip
    else:
        for c0 in range(0, C, BLOCK_C):
            c64 = tl.cast(c0, tl.int64)  # column x stride passes 2**31 for K-dim rows (class stride d1*...*dK)
            _ce_grad_block(x_ptr, xoff + c64 * s_xc, s_xc, t_ptr, toff + c64 * s_tc, s_tc, w_ptr, s_w,
                           g_ptr, goff + c64 * s_gc, s_gc, dt_ptr, dtoff + c64 * s_dtc, s_dtc,
                           c0, C - c0, rmask, tgt, m, inv_s, logs, a_rs, own_rs, rscale, c_off, NC, smoothing, softcap,
                           HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TGRAD,
                           True, BLOCK_C, ACC, EVICT)  # fmt: skip


@triton.jit
def _ce_grad_block(
    x_ptr, xrow, s_xc, t_ptr, trow, s_tc, w_ptr, s_w, g_ptr, grow, s_gc, dt_ptr, dtrow, s_dtc,
    c0, n, rmask, tgt, m, inv_s, logs, a_rs, own_rs, rscale, c_off, NC, smoothing, softcap,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_TGRAD: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr,
):  # fmt: skip
    """Columns ``[c0, c0 + BLOCK_C)`` of ``_ce_grad_pass`` (``xrow`` ... ``dtrow``: the rows' offsets of
    column ``c0``): the first ``n`` when ``MASKED``, else every one (rows and columns in range)."""
    rel = tl.arange(0, BLOCK_C)
    cmask = rel < n
    mask = rmask[:, None] & cmask[None, :]
    rel = rel.to(tl.int64)
    cols = c0 + rel
    if LOGP_INPUT:
        d = tl.where(cols[None, :] == tgt[:, None], -own_rs[:, None], 0.0)
    else:
        x = masked_load(x_ptr + xrow[:, None] + rel[None, :] * s_xc, mask, 0.0, MASKED, EVICT)
        x = _softcap(x.to(ACC), softcap, mask if MASKED else rmask[:, None], HAS_SOFTCAP)
        d = tl.exp(x - m[:, None]) * (a_rs * inv_s)[:, None]
        if HAS_WEIGHT:
            w = masked_load(w_ptr + (c_off + cols) * s_w, cmask, 0.0, MASKED, "").to(ACC)
        if PROB_TARGET:
            t = masked_load(t_ptr + trow[:, None] + rel[None, :] * s_tc, mask, 0.0, MASKED, "")
            t = t.to(ACC)
            if HAS_SMOOTHING:
                t = t * (1.0 - smoothing) + smoothing / NC
            if HAS_WEIGHT:
                t = w[None, :] * t
            d -= t * rscale[:, None]
            if WRITE_TGRAD:
                dt = ((m[:, None] - x) + logs[:, None]) * ((1.0 - smoothing) * rscale)[:, None]  # -log p
                if HAS_WEIGHT:
                    dt = dt * w[None, :]
                masked_store(
                    dt_ptr + dtrow[:, None] + rel[None, :] * s_dtc, dt.to(dt_ptr.dtype.element_ty), mask, MASKED, ""
                )
        else:
            d -= tl.where(cols[None, :] == tgt[:, None], own_rs[:, None], 0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    d -= ((smoothing / NC) * rscale)[:, None] * w[None, :]
                else:
                    d -= ((smoothing / NC) * rscale)[:, None]
        if HAS_SOFTCAP:
            y = x / softcap
            d = d * (1.0 - y * y)
    masked_store(g_ptr + grow[:, None] + rel[None, :] * s_gc, d.to(g_ptr.dtype.element_ty), mask, MASKED, EVICT)


@triton.jit
def _ce_row_coefs(w_t, lse, rscale, wsum, C, smoothing, z_loss, S1,
                  PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr):  # fmt: skip
    """Per-row gradient coefficients ``(a_rs, own_rs)``, already scaled by ``rscale``.

    Index targets keep ``own_rs = own * rscale`` inside ``a_rs``: a NaN ``own_rs`` (a zero class
    weight times the infinite coefficient of a zero 'mean' denominator) makes the row NaN, as
    torch's log_softmax backward of its NaN ``nll`` gradient does.
    """
    if PROB_TARGET:
        a = S1
        if HAS_Z:
            a += 2.0 * z_loss * lse
        a_rs = a * rscale
        own_rs = tl.zeros_like(lse)
    else:
        own = w_t
        if HAS_SMOOTHING:
            own = (1.0 - smoothing) * w_t
        own_rs = own * rscale
        a_rs = own_rs
        if HAS_SMOOTHING:
            a_rs += (smoothing * wsum / C) * rscale
        if HAS_Z:
            a_rs += (2.0 * z_loss) * w_t * lse * rscale
    return a_rs, own_rs


@triton.jit
def _assert_targets(ignored, inb, rmask):
    """The device assert on index targets (kept by the CUDA launches' ``debug``).

    An assert is a call on the GPU, and the registers live across it go to the stack: the forward
    places it at the end of a block of rows, where the least is live (a persistent program's loop
    state only), not before the row passes.
    """
    tl.device_assert(ignored | inb | ~rmask, "cross_entropy / nll_loss: target out of bounds")


@triton.jit
def _index_targets(t_ptr, toff, w_ptr, s_w, rmask, C, ignore_index, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Index targets of a block of rows: ``(target, ignored, in_range, clamped, class_weight)``.

    The clamped index is the one loads use, so an out-of-range target never reads out of bounds;
    on CUDA it trips the device assert of :func:`_assert_targets`, which the caller places.
    """
    tgt = tl.load(t_ptr + toff, mask=rmask, other=0).to(tl.int64)
    ignored = tgt == ignore_index
    inb = (tgt >= 0) & (tgt < C)
    tsafe = tl.where(inb, tgt, 0)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + tsafe * s_w, mask=rmask & inb, other=0.0).to(ACC)
    else:
        w_t = tl.where(inb, 1.0, 1.0).to(ACC)
    return tgt, ignored, inb, tsafe, w_t


@triton.jit
def _load_scalar(ptr, HAS: tl.constexpr, ACC: tl.constexpr):
    """``*ptr`` in ``ACC``, or 1 when ``HAS`` is False (no load)."""
    if HAS:
        v = tl.load(ptr).to(ACC)
    else:
        v = tl.full([], 1.0, ACC)
    return v


@triton.jit
def _weight_sum(wsum_ptr, C, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Sum of the class weights (C without weights)."""
    if HAS_WEIGHT:
        wsum = tl.load(wsum_ptr).to(ACC)
    else:
        wsum = tl.zeros([], ACC) + C
    return wsum


@triton.jit
def _ce_fwd_stats(
    x_ptr, xoff, s_xc,  # logits rows: base offsets (BLOCK_R,), class stride
    t_ptr, toff, s_tc,  # probability targets (PROB_TARGET) rows
    w_ptr, s_w,  # class weights (C,) and their stride
    rmask, C, softcap,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """One pass over a block of rows: running max and sum-exp, and the weighted sums smoothing / probability targets
    need (``sum w (x - M)``, ``sum w t``, ``sum w t (x - M)`` relative to the row max ``M``, 0 if it is ``-inf``, so
    that the losses formed from them do not cancel terms of the logits' magnitude; see
    ``reference.cross_entropy.weighted_sum_from``), and the weights' sum ``sum w`` (with smoothing and weights).

    ``EVICT``: the L2 eviction policy of the logits' read ("" or "evict_last": kept for the gradient pass).
    ``ALIGN > 1`` (one row): a masked head, unmasked 16-byte-aligned blocks, a masked rest (``aligned_split``)."""
    m = tl.full([BLOCK_R], NEG_INF, ACC)
    s = tl.zeros([BLOCK_R], ACC)
    swx = tl.zeros([BLOCK_R], ACC)  # sum_c w_c * (x_c - M) (label smoothing)
    swt = tl.zeros([BLOCK_R], ACC)  # sum_c w_c * t_c (probability targets)
    swtx = tl.zeros([BLOCK_R], ACC)  # sum_c w_c * t_c * (x_c - M) (probability targets)
    sw = tl.zeros([BLOCK_R], ACC)  # sum_c w_c (label smoothing with weights)
    if not LOGP_INPUT:
        if ALIGN > 1:  # a masked ALIGN-wide head, whole aligned tiles unmasked, the aligned rest, the last columns
            head, full, tail, rest = aligned_split(xoff, C, ALIGN, BLOCK_C)
            m, s, swx, swt, swtx, sw = _ce_stats_block(
                m, s, swx, swt, swtx, sw, x_ptr, xoff, s_xc, t_ptr, toff, s_tc, w_ptr, s_w, 0, head, rmask, softcap,
                HAS_WEIGHT, PROB_TARGET, HAS_SMOOTHING, HAS_SOFTCAP, True, ALIGN, ACC, EVICT)  # fmt: skip
            for k in range(full):
                c0 = head + k * BLOCK_C
                m, s, swx, swt, swtx, sw = _ce_stats_block(
                    m, s, swx, swt, swtx, sw, x_ptr, tl.multiple_of(xoff + c0, ALIGN), s_xc, t_ptr, toff + c0 * s_tc,
                    s_tc, w_ptr, s_w, c0, BLOCK_C, rmask, softcap, HAS_WEIGHT, PROB_TARGET, HAS_SMOOTHING,
                    HAS_SOFTCAP, False, BLOCK_C, ACC, EVICT)  # fmt: skip
            c0 = head + full * BLOCK_C
            m, s, swx, swt, swtx, sw = _ce_stats_block(
                m, s, swx, swt, swtx, sw, x_ptr, tl.multiple_of(xoff + c0, ALIGN), s_xc, t_ptr, toff + c0 * s_tc,
                s_tc, w_ptr, s_w, c0, tail, rmask, softcap, HAS_WEIGHT, PROB_TARGET, HAS_SMOOTHING, HAS_SOFTCAP, True,
                BLOCK_C, ACC, EVICT)  # fmt: skip
            c0 = C - rest
            m, s, swx, swt, swtx, sw = _ce_stats_block(
                m, s, swx, swt, swtx, sw, x_ptr, xoff + c0, s_xc, t_ptr, toff + c0 * s_tc, s_tc, w_ptr, s_w, c0, rest,
                rmask, softcap, HAS_WEIGHT, PROB_TARGET, HAS_SMOOTHING, HAS_SOFTCAP, True, ALIGN, ACC,
                EVICT)  # fmt: skip
        else:
            for c0 in range(0, C, BLOCK_C):
                c64 = tl.cast(c0, tl.int64)  # column x stride passes 2**31 for K-dim rows
                m, s, swx, swt, swtx, sw = _ce_stats_block(
                    m, s, swx, swt, swtx, sw, x_ptr, xoff + c64 * s_xc, s_xc, t_ptr, toff + c64 * s_tc, s_tc, w_ptr,
                    s_w, c0, C - c0, rmask, softcap, HAS_WEIGHT, PROB_TARGET, HAS_SMOOTHING, HAS_SOFTCAP, True,
                    BLOCK_C, ACC, EVICT)  # fmt: skip
    return m, s, swx, swt, swtx, sw


@triton.jit
def _ce_stats_block(
    m, s, swx, swt, swtx, sw, x_ptr, xrow, s_xc, t_ptr, trow, s_tc, w_ptr, s_w, c0, n, rmask, softcap,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr,
):  # fmt: skip
    """Fold columns ``[c0, c0 + BLOCK_C)`` into ``_ce_fwd_stats``' running sums (``xrow`` / ``trow``: the rows'
    offsets of column ``c0``): the first ``n`` when ``MASKED``, else every one (rows and columns in range).

    The weighted sums are kept relative to the running shift (the max so far, 0 while it is ``-inf``):
    ``x - shift`` is the exponent's argument anyway, and a new max rebases them by ``mass * (old - new)``,
    with ``mass`` the weights (``sw``, or the ``c0`` columns) or ``swt`` seen before this tile."""
    rel = tl.arange(0, BLOCK_C)
    cmask = rel < n
    mask = rmask[:, None] & cmask[None, :]
    rel = rel.to(tl.int64)
    cols = c0 + rel
    x = masked_load(x_ptr + xrow[:, None] + rel[None, :] * s_xc, mask, NEG_INF, MASKED, EVICT)
    x = _softcap(x.to(ACC), softcap, mask if MASKED else rmask[:, None], HAS_SOFTCAP)
    m, s, old, shift, xs = online_lse_shifted(m, s, x)
    if HAS_WEIGHT:
        w = masked_load(w_ptr + cols * s_w, cmask, 0.0, MASKED, "").to(ACC)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w2 = w[None, :] + tl.zeros_like(xs)
            wx = w2 * xs
            seen = sw
            sw += tl.sum(w2, 1)
        else:
            wx = xs
            seen = c0
        if MASKED:
            wx = tl.where(mask, wx, 0.0)
        swx += seen * (old - shift) + tl.sum(wx, 1)
    if PROB_TARGET:
        t = masked_load(t_ptr + trow[:, None] + rel[None, :] * s_tc, mask, 0.0, MASKED, "").to(ACC)
        wt = w[None, :] * t if HAS_WEIGHT else t
        wtx = wt * xs
        if MASKED:
            wtx = tl.where(mask, wtx, 0.0)
        swtx += swt * (old - shift) + tl.sum(wtx, 1)
        swt += tl.sum(wt, 1)
    return m, s, swx, swt, swtx, sw


@triton.jit
def _ce_row_loss(m, logs, lse, w_t, x_t, ignored, inb, swx, swt, swtx, wsum, C, smoothing, z_loss,
                 PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                 HAS_Z: tl.constexpr):  # fmt: skip
    """Per-row loss from the row statistics (``logs = log(sum-exp)``, ``lse = m + logs``), and the target mass ``S1``.

    ``swx`` / ``swtx`` are relative to the max (0 if it is ``-inf``): ``sum w t (m - x) = top S1 - swtx``
    with ``top = m - shift``, 0 (-inf for an all ``-inf`` row)."""
    top = m - tl.where(m == NEG_INF, 0.0, m)
    S1 = swt
    if PROB_TARGET:
        S2 = swtx
        if HAS_SMOOTHING:
            S1 = (1.0 - smoothing) * swt + smoothing * wsum / C
            S2 = (1.0 - smoothing) * swtx + smoothing * swx / C
        loss = (top * S1 - S2) + logs * S1
        if HAS_Z:
            loss += z_loss * lse * lse
    else:
        if LOGP_INPUT:
            loss = -w_t * x_t
        else:
            loss = w_t * ((m - x_t) + logs)
            if HAS_SMOOTHING:
                loss = (1.0 - smoothing) * loss + smoothing / C * ((wsum * top - swx) + wsum * logs)
            if HAS_Z:
                loss += z_loss * w_t * lse * lse
        loss = tl.where(ignored, 0.0, tl.where(inb, loss, float("nan")))
    return loss, S1


@triton.jit
def _ce_fwd_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # logits (A, C, B)
    t_ptr, s_ta, s_tc, s_tb,  # targets: index (A, B) or probabilities (A, C, B)
    w_ptr, s_w, wsum_ptr,  # class weights (C,) with their stride, and their sum (1,)
    loss_ptr, stats_ptr,  # per-row loss (R,) and (max, sum-exp) (R, 2), fp32 (fp64 for fp64 logits)
    g_ptr, s_ga, s_gc, s_gb,  # fused gradient (A, C, B), written when WRITE_GRAD
    coef_ptr,  # (1,) scale of the fused gradient (1/denominator for 'mean'), read when HAS_COEF
    R, C, B, ignore_index,
    smoothing_hi, smoothing_lo, z_hi, z_lo, cap_hi, cap_lo,  # the float options as fp32 pairs (hi + lo)
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, HAS_COEF: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    PERSISTENT: tl.constexpr, EVICT_1ST: tl.constexpr, EVICT_2ND: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Per-row cross-entropy (or NLL) loss and statistics for blocks of ``BLOCK_R`` rows, optionally the gradient.

    One block per program, or (``PERSISTENT``) a grid smaller than the block count whose programs
    take blocks ``pid, pid + programs, ...`` in turn, so that the rows in flight fit the L2 cache.
    ``EVICT_1ST`` / ``EVICT_2ND``: eviction policies of the statistics pass's read and of the
    gradient pass's read and stores (see ``ce_variant``).
    """
    smoothing = joined(smoothing_hi, smoothing_lo, ACC)  # the float options in ACC (exact for fp64)
    z_loss = joined(z_hi, z_lo, ACC)
    softcap = joined(cap_hi, cap_lo, ACC)
    if PERSISTENT:
        for blk in range(tl.program_id(0), tl.cdiv(R, BLOCK_R), tl.num_programs(0)):
            _ce_fwd_block(blk, x_ptr, s_xa, s_xc, s_xb, t_ptr, s_ta, s_tc, s_tb, w_ptr, s_w, wsum_ptr,
                          loss_ptr, stats_ptr, g_ptr, s_ga, s_gc, s_gb, coef_ptr,
                          R, C, B, ignore_index, smoothing, z_loss, softcap,
                          HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP,
                          WRITE_GRAD, HAS_COEF, BLOCK_R, BLOCK_C, ACC, EVICT_1ST, EVICT_2ND, ALIGN)  # fmt: skip
    else:
        _ce_fwd_block(tl.program_id(0), x_ptr, s_xa, s_xc, s_xb, t_ptr, s_ta, s_tc, s_tb, w_ptr, s_w, wsum_ptr,
                      loss_ptr, stats_ptr, g_ptr, s_ga, s_gc, s_gb, coef_ptr,
                      R, C, B, ignore_index, smoothing, z_loss, softcap,
                      HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP,
                      WRITE_GRAD, HAS_COEF, BLOCK_R, BLOCK_C, ACC, EVICT_1ST, EVICT_2ND, ALIGN)  # fmt: skip


@triton.jit
def _ce_fwd_block(
    blk, x_ptr, s_xa, s_xc, s_xb, t_ptr, s_ta, s_tc, s_tb, w_ptr, s_w, wsum_ptr,
    loss_ptr, stats_ptr, g_ptr, s_ga, s_gc, s_gb, coef_ptr,
    R, C, B, ignore_index, smoothing, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, HAS_COEF: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    EVICT_1ST: tl.constexpr, EVICT_2ND: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Block ``blk`` of ``_ce_fwd_kernel`` (its arguments, in its order)."""
    rows, rmask = rows_of_block(blk, R, BLOCK_R)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    toff = row_offsets(rows, B, s_ta, s_tb)
    wsum = _weight_sum(wsum_ptr, C, HAS_WEIGHT, ACC)
    tgt = tl.zeros([BLOCK_R], tl.int64) - 1
    w_t = tl.zeros([BLOCK_R], ACC) + 1.0
    x_t = tl.zeros([BLOCK_R], ACC)
    ignored = rmask & False
    inb = rmask | True
    if not PROB_TARGET:
        tgt, ignored, inb, tsafe, w_t = _index_targets(t_ptr, toff, w_ptr, s_w, rmask, C, ignore_index,
                                                       HAS_WEIGHT, ACC)  # fmt: skip
        x_t = tl.load(x_ptr + xoff + tsafe * s_xc, mask=rmask & inb, other=0.0).to(ACC)
        x_t = _softcap(x_t, softcap, rmask | True, HAS_SOFTCAP)
    m, s, swx, swt, swtx, _ = _ce_fwd_stats(x_ptr, xoff, s_xc, t_ptr, toff, s_tc, w_ptr, s_w, rmask, C, softcap,
                                         HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP,
                                         BLOCK_R, BLOCK_C, ACC, EVICT_1ST, ALIGN)  # fmt: skip
    logs = tl.log(s)
    lse = m + logs
    loss, S1 = _ce_row_loss(m, logs, lse, w_t, x_t, ignored, inb, swx, swt, swtx, wsum, C, smoothing, z_loss,
                            PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_Z)  # fmt: skip
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=rmask)
    if not LOGP_INPUT:
        tl.store(stats_ptr + 2 * rows, m.to(stats_ptr.dtype.element_ty), mask=rmask)
        tl.store(stats_ptr + 2 * rows + 1, s.to(stats_ptr.dtype.element_ty), mask=rmask)

    if WRITE_GRAD:
        coef = _load_scalar(coef_ptr, HAS_COEF, ACC)
        rscale = tl.where(ignored, 0.0, tl.where(inb, coef, float("nan")))
        a_rs, own_rs = _ce_row_coefs(w_t, lse, rscale, wsum, C, smoothing, z_loss, S1,
                                     PROB_TARGET, HAS_SMOOTHING, HAS_Z)  # fmt: skip
        goff = row_offsets(rows, B, s_ga, s_gb)
        _ce_grad_pass(x_ptr, xoff, s_xc, t_ptr, toff, s_tc, w_ptr, s_w, g_ptr, goff, s_gc,
                      g_ptr, goff, s_gc, rmask, tgt, m, 1.0 / s, logs, a_rs, own_rs, rscale,
                      C, 0, C, smoothing, softcap,
                      HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP, False,
                      BLOCK_C, ACC, EVICT_2ND, ALIGN)  # fmt: skip
    if not PROB_TARGET:
        _assert_targets(ignored, inb, rmask)


@triton.jit
def _ce_bwd_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # logits (A, C, B)
    t_ptr, s_ta, s_tc, s_tb,  # targets: index (A, B) or probabilities (A, C, B)
    w_ptr, s_w, wsum_ptr,  # class weights (C,) with their stride, and their sum (1,)
    stats_ptr, s_st,  # per-row (max, sum-exp[, smoothed sum_c w_c t_c]) (R, s_st), fp32 (fp64 for fp64 logits)
    gout_ptr, s_gout,  # upstream gradient: per row (stride 1) or one scalar (stride 0)
    coef_ptr,  # (1,) extra scale (1/denominator for 'mean'), read when HAS_COEF
    g_ptr, s_ga, s_gc, s_gb,  # gradient w.r.t. the logits (A, C, B)
    dt_ptr, s_da, s_dc, s_db,  # gradient w.r.t. probability targets (A, C, B), when WRITE_TGRAD
    R, C, B, ignore_index,
    smoothing_hi, smoothing_lo, z_hi, z_lo, cap_hi, cap_lo,  # the float options as fp32 pairs (hi + lo)
    c_off, NC,  # global index of the first local class, global class count (C, 0 for a whole row)
    bounds_ptr,  # (2,) int64 [c_off, NC] on the device, read instead of the two scalars when SLICE_IN_MEMORY
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WRITE_TGRAD: tl.constexpr, HAS_COEF: tl.constexpr, GIVEN_S1: tl.constexpr, SLICE_IN_MEMORY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Gradient of the per-row loss for ``BLOCK_R`` rows from the saved statistics.

    With ``C < NC`` the rows are the classes ``[c_off, c_off + C)`` of ``NC`` (vocabulary
    parallel): targets are global indices, the statistics global, and ``GIVEN_S1`` reads the
    probability targets' global ``sum_c w_c t_c`` from column 2 of the statistics.
    """
    smoothing = joined(smoothing_hi, smoothing_lo, ACC)  # the float options in ACC (exact for fp64)
    z_loss = joined(z_hi, z_lo, ACC)
    softcap = joined(cap_hi, cap_lo, ACC)
    if SLICE_IN_MEMORY:  # the slice's bounds were computed on the device (no host read of them)
        c_off = tl.load(bounds_ptr)
        NC = tl.load(bounds_ptr + 1)
    rows, rmask = row_block(R, BLOCK_R)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    toff = row_offsets(rows, B, s_ta, s_tb)
    wsum = _weight_sum(wsum_ptr, NC, HAS_WEIGHT, ACC)
    m = tl.zeros([BLOCK_R], ACC)
    s = tl.zeros([BLOCK_R], ACC) + 1.0
    if not LOGP_INPUT:
        m = tl.load(stats_ptr + s_st * rows, mask=rmask, other=0.0).to(ACC)
        s = tl.load(stats_ptr + s_st * rows + 1, mask=rmask, other=1.0).to(ACC)
    logs = tl.log(s)
    lse = m + logs
    coef = _load_scalar(coef_ptr, HAS_COEF, ACC)
    coef = coef * tl.load(gout_ptr + rows * s_gout, mask=rmask, other=0.0).to(ACC)
    tgt = tl.zeros([BLOCK_R], tl.int64) - 1
    w_t = tl.zeros([BLOCK_R], ACC) + 1.0
    S1 = tl.zeros([BLOCK_R], ACC)
    if PROB_TARGET and GIVEN_S1:
        rscale = coef
        S1 = tl.load(stats_ptr + s_st * rows + 2, mask=rmask, other=0.0).to(ACC)
    elif PROB_TARGET:
        rscale = coef
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            mask = rmask[:, None] & cmask[None, :]
            cols64 = cols.to(tl.int64)
            t = tl.load(t_ptr + toff[:, None] + cols64[None, :] * s_tc, mask=mask, other=0.0).to(ACC)
            if HAS_WEIGHT:
                t = t * tl.load(w_ptr + cols64 * s_w, mask=cmask, other=0.0).to(ACC)[None, :]
            S1 += tl.sum(t, 1)
        if HAS_SMOOTHING:
            S1 = (1.0 - smoothing) * S1 + smoothing * wsum / C
    else:
        tgt, ignored, inb, _, w_t = _index_targets(t_ptr, toff, w_ptr, s_w, rmask, NC, ignore_index, HAS_WEIGHT, ACC)
        _assert_targets(ignored, inb, rmask)
        rscale = tl.where(ignored, 0.0, tl.where(inb, coef, float("nan")))
        tgt = tgt - c_off  # the local column of the target (outside [0, C) when another slice holds it)
    a_rs, own_rs = _ce_row_coefs(w_t, lse, rscale, wsum, NC, smoothing, z_loss, S1,
                                 PROB_TARGET, HAS_SMOOTHING, HAS_Z)  # fmt: skip
    goff = row_offsets(rows, B, s_ga, s_gb)
    dtoff = row_offsets(rows, B, s_da, s_db)
    _ce_grad_pass(x_ptr, xoff, s_xc, t_ptr, toff, s_tc, w_ptr, s_w, g_ptr, goff, s_gc,
                  dt_ptr, dtoff, s_dc, rmask, tgt, m, 1.0 / s, logs, a_rs, own_rs, rscale,
                  C, c_off, NC, smoothing, softcap,
                  HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TGRAD,
                  BLOCK_C, ACC, "", ALIGN)  # fmt: skip


@triton.jit
def _ce_partial_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # this slice's logits (A, C, B)
    t_ptr, s_ta, s_tc, s_tb,  # targets: global indices (A, B) or this slice's probabilities (A, C, B)
    w_ptr, s_w,  # the global class weights (NC,) with their stride
    out_ptr,  # per-row partial sums (R, 8), fp32 (fp64 for fp64 logits)
    R, C, B, c_off,  # rows, local classes, spatial size, global index of the first local class
    cap_hi, cap_lo,  # the softcap as an fp32 pair (hi + lo)
    bounds_ptr,  # (2,) int64 [c_off, global classes] on the device, read instead of c_off when SLICE_IN_MEMORY
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SLICE_IN_MEMORY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """One read of a slice's rows: ``(m, sum exp(x - m), x_target, sum w (x - r), sum w t, sum w t (x - r), r, sum w)``
    per row, ``r`` the slice's max (0 where it is ``-inf``): the weighted sums are taken from it.

    The target logit is 0 when the target lies outside ``[c_off, c_off + C)``; probabilities are
    the raw (unsmoothed) ones; the weight mass is written with smoothing only. See
    ``reference.cross_entropy.ce_partial``.
    """
    softcap = joined(cap_hi, cap_lo, ACC)
    if SLICE_IN_MEMORY:
        c_off = tl.load(bounds_ptr)
    rows, rmask = row_block(R, BLOCK_R)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    toff = row_offsets(rows, B, s_ta, s_tb)
    x_t = tl.zeros([BLOCK_R], ACC)
    if not PROB_TARGET:
        tloc = tl.load(t_ptr + toff, mask=rmask, other=0).to(tl.int64) - c_off
        hit = rmask & (tloc >= 0) & (tloc < C)
        x_t = tl.load(x_ptr + xoff + tl.where(hit, tloc, 0) * s_xc, mask=hit, other=0.0).to(ACC)
        x_t = tl.where(hit, _softcap(x_t, softcap, hit, HAS_SOFTCAP), 0.0)
    # the forward's statistics pass, with the weights read from the slice's first class on
    w_slice = w_ptr + tl.cast(c_off, tl.int64) * s_w
    m, s, swx, swt, swtx, sw = _ce_fwd_stats(x_ptr, xoff, s_xc, t_ptr, toff, s_tc, w_slice, s_w, rmask, C,
                                         softcap, HAS_WEIGHT, PROB_TARGET, False, HAS_SMOOTHING, HAS_SOFTCAP,
                                         BLOCK_R, BLOCK_C, ACC, "", ALIGN)  # fmt: skip
    dst = out_ptr + 8 * rows
    tl.store(dst, m.to(out_ptr.dtype.element_ty), mask=rmask)
    tl.store(dst + 1, s.to(out_ptr.dtype.element_ty), mask=rmask)
    tl.store(dst + 2, x_t.to(out_ptr.dtype.element_ty), mask=rmask)
    tl.store(dst + 3, swx.to(out_ptr.dtype.element_ty), mask=rmask)
    tl.store(dst + 4, swt.to(out_ptr.dtype.element_ty), mask=rmask)
    tl.store(dst + 5, swtx.to(out_ptr.dtype.element_ty), mask=rmask)
    tl.store(dst + 6, tl.where(m == NEG_INF, 0.0, m).to(out_ptr.dtype.element_ty), mask=rmask)
    if HAS_SMOOTHING:  # the slice's weight mass: what the sums relative to r are rebased with
        if not HAS_WEIGHT:
            sw = tl.zeros([], ACC) + C
        tl.store(dst + 7, (sw + tl.zeros([BLOCK_R], ACC)).to(out_ptr.dtype.element_ty), mask=rmask)


def _flags(spec: CESpec) -> dict:
    return dict(
        HAS_WEIGHT=spec.weight is not None,
        PROB_TARGET=spec.prob_target,
        LOGP_INPUT=spec.logp_input,
        HAS_SMOOTHING=spec.smoothing > 0.0,
        HAS_Z=spec.z_loss != 0.0,
        HAS_SOFTCAP=spec.softcap is not None,
    )


def _softcap_pair(spec: CESpec) -> dict:
    hi, lo = split_float(spec.softcap or 1.0)
    return dict(cap_hi=hi, cap_lo=lo)


def _scalars(spec: CESpec) -> dict:
    """The scalar options as kernel arguments, each float as an fp32 pair (Triton passes a float as fp32)."""
    (s_hi, s_lo), (z_hi, z_lo) = split_float(spec.smoothing), split_float(spec.z_loss)
    return dict(ignore_index=spec.ignore_index, smoothing_hi=s_hi, smoothing_lo=s_lo, z_hi=z_hi, z_lo=z_lo,
                **_softcap_pair(spec))  # fmt: skip


def _target_strides(t: torch.Tensor, prob: bool) -> dict:
    if prob:
        return dict(s_ta=t.stride(0), s_tc=t.stride(1), s_tb=t.stride(2))
    return dict(s_ta=t.stride(0), s_tc=0, s_tb=t.stride(1))


def _weight_args(spec: CESpec, x: torch.Tensor) -> dict:
    """Class weights with their stride (read in place: sliced or expanded weights are never copied)."""
    if spec.weight is None:
        return dict(w_ptr=x, s_w=0, wsum_ptr=x)
    wsum = spec.weight_sum if spec.weight_sum is not None else spec.weight  # read only with smoothing
    return dict(w_ptr=spec.weight, s_w=spec.weight.stride(0), wsum_ptr=wsum)


def ce_fwd(
    x: torch.Tensor, t: torch.Tensor, spec: CESpec, coef: torch.Tensor | None, grad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        x: logits viewed as ``(A, C, B)``.
        t: index targets ``(A, B)`` or probability targets ``(A, C, B)``.
        spec: the loss options (``weight_sum`` is read when ``weight`` is given).
        coef: ``(1,)`` scale for the fused gradient, or None for 1.
        grad: ``(A, C, B)`` buffer for the fused gradient (may be ``x`` itself), or None to skip it.

    Returns:
        ``(loss, stats)``: ``(A * B,)`` and ``(A * B, 2)`` = per-row ``(max, sum of exp(x - max))``,
        fp32 (fp64 for fp64 logits). ``stats`` is unspecified for ``logp_input`` (NLL).
    """
    A, C, B = x.shape
    R = A * B
    acc = acc_dtype(x.dtype)
    loss = torch.empty(R, device=x.device, dtype=acc)
    stats = torch.empty(R, 2, device=x.device, dtype=acc)
    if R == 0:
        return loss, stats
    block_r, block_c, warps = launch_config(C, x.element_size(), x.stride(1) == 1 or B == 1)
    g = grad if grad is not None else x
    blocks = triton.cdiv(R, block_r)
    variant = ce_variant(x, write_grad=grad is not None)
    if variant == "two_pass" and grad is not None:  # the loss-only forward, then the gradient from its statistics
        loss, stats = ce_fwd(x, t, spec, coef, None)
        scale = coef if coef is not None else torch.ones(1, device=x.device, dtype=acc)
        ce_bwd(x, t, spec, stats, scale, None, grad=grad)
        return loss, stats
    variant = "rows" if variant == "two_pass" else variant
    programs = (
        persistent_programs(x.device, blocks, block_r * C * x.element_size()) if variant == "persistent" else blocks
    )
    with on_device(x):
        _ce_fwd_kernel[(programs,)](
            x_ptr=x, s_xa=x.stride(0), s_xc=x.stride(1), s_xb=x.stride(2),
            t_ptr=t, **_target_strides(t, spec.prob_target), **_weight_args(spec, x),
            loss_ptr=loss, stats_ptr=stats,
            g_ptr=g, s_ga=g.stride(0), s_gc=g.stride(1), s_gb=g.stride(2),
            coef_ptr=coef if coef is not None else loss,
            R=R, C=C, B=B, **_scalars(spec), **_flags(spec),
            WRITE_GRAD=grad is not None, HAS_COEF=coef is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(x.dtype), **_VARIANT_FLAGS[variant],
            ALIGN=row_align(x, block_r, grad), num_warps=warps, **assert_options(x),
        )  # fmt: skip
    return loss, stats


# ---- forward variants (bench/gpu_sweep.py measures each; the table below picks one per launch) ----

VARIANT_ENV = "TRITON_LOSSES_CE_VARIANT"
VARIANTS = ("rows", "persistent", "two_pass")
# rows: one program per block of rows, default eviction. persistent: at most persistent_programs()
# programs taking blocks in turn, the statistics pass keeping the logits in L2 (evict_last) and the
# gradient pass reading them for the last time and streaming the gradient out (evict_first).
# two_pass: the loss-only forward, then the backward kernel writing the gradient from the saved
# statistics (two launches; what a recompute backward costs), the baseline the fused variants beat.
_VARIANT_FLAGS = {
    "rows": dict(PERSISTENT=False, EVICT_1ST="", EVICT_2ND=""),
    "persistent": dict(PERSISTENT=True, EVICT_1ST="evict_last", EVICT_2ND="evict_first"),
}
# Rows at least this long (bytes) take the persistent variant when the forward writes the gradient
# (the gradient pass re-reads the row: with one program per block, the ~6-8 programs resident per SM
# keep 200-270 MB of LM rows in flight, past any L2, so that second read goes to HBM). Shorter rows,
# and loss-only forwards (one read per row), keep one program per block. Not yet measured on a GPU:
# `bash bench/gpu_session.sh` sweeps every variant at V = 32000, 128256, 262144 and prints the table.
PERSISTENT_MIN_ROW_BYTES = 32 * 1024
_PROGRAMS_PER_SM = 8  # the persistent grid's ceiling: SMs x this


def ce_variant(x: torch.Tensor, write_grad: bool) -> str:
    """The forward variant for logits ``x`` ``(A, C, B)``: ``TRITON_LOSSES_CE_VARIANT`` (one of
    ``VARIANTS``) when set, else :func:`default_variant`."""
    forced = os.environ.get(VARIANT_ENV, "").strip().lower()
    if forced:
        if forced not in VARIANTS:
            raise ValueError(f"{VARIANT_ENV} must be one of {VARIANTS}, got {forced!r}")
        return forced
    return default_variant(x.shape[1], x.element_size(), x.stride(1) == 1 or x.shape[2] == 1, write_grad)


def default_variant(C: int, elem_size: int, contiguous_rows: bool, write_grad: bool) -> str:
    """``persistent`` for gradient-writing forwards over contiguous rows of at least
    ``PERSISTENT_MIN_ROW_BYTES``, else ``rows`` (also what the AOT tier compiles for each launch)."""
    long_rows = C * elem_size >= PERSISTENT_MIN_ROW_BYTES
    return "persistent" if write_grad and contiguous_rows and long_rows else "rows"


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    """The device's L2 cache in bytes (read once per device); 4 MiB off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 4 << 20
    return torch.cuda.get_device_properties(device).L2_cache_size


def persistent_programs(device: torch.device, blocks: int, block_bytes: int) -> int:
    """Programs of a persistent launch over ``blocks`` blocks of ``block_bytes``: as many as keep the
    blocks in flight within half the L2, at least one per SM, at most ``_PROGRAMS_PER_SM`` per SM."""
    sms = sm_count(device)
    fit = (_l2_bytes(device) // 2) // max(1, block_bytes)
    return max(1, min(blocks, max(sms, min(fit, sms * _PROGRAMS_PER_SM))))


def ce_bwd(
    x: torch.Tensor,
    t: torch.Tensor,
    spec: CESpec,
    stats: torch.Tensor,
    gout: torch.Tensor,
    coef: torch.Tensor | None,
    grad: torch.Tensor | None = None,
    tgrad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel: ``d(sum_r gout_r * coef * loss_r)/dx`` (and ``/dt``).

    Args:
        x, t, spec: as in :func:`ce_fwd`.
        stats: the forward's ``(A * B, 2)`` statistics.
        gout: upstream gradient ``(A * B,)`` ('none') or a one-element tensor broadcast to every row.
        coef: ``(1,)`` extra scale, or None for 1.
        grad: ``(A, C, B)`` buffer to write (may be ``x`` itself), or None to allocate one.
        tgrad: ``(A, C, B)`` buffer for the probability-target gradient, or None to skip it.

    Returns:
        ``(grad, tgrad)``.
    """
    A, C, B = x.shape
    R = A * B
    if grad is None:
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if R == 0 or C == 0:
        return grad, tgrad
    block_r, block_c, warps = launch_config(C, x.element_size(), x.stride(1) == 1 or B == 1)
    dt = tgrad if tgrad is not None else grad
    with on_device(x):
        _ce_bwd_kernel[(triton.cdiv(R, block_r),)](
            x_ptr=x, s_xa=x.stride(0), s_xc=x.stride(1), s_xb=x.stride(2),
            t_ptr=t, **_target_strides(t, spec.prob_target), **_weight_args(spec, x),
            stats_ptr=stats, s_st=stats.stride(0), gout_ptr=gout, s_gout=1 if gout.numel() == R and R > 1 else 0,
            coef_ptr=coef if coef is not None else stats,
            g_ptr=grad, s_ga=grad.stride(0), s_gc=grad.stride(1), s_gb=grad.stride(2),
            dt_ptr=dt, s_da=dt.stride(0), s_dc=dt.stride(1), s_db=dt.stride(2),
            R=R, C=C, B=B, **_scalars(spec), **_flags(spec),
            c_off=spec.class_offset, NC=spec.num_classes or C, bounds_ptr=_bounds_ptr(spec, stats),
            WRITE_TGRAD=tgrad is not None, HAS_COEF=coef is not None,
            GIVEN_S1=spec.prob_target and is_slice(spec), SLICE_IN_MEMORY=spec.bounds is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(x.dtype), ALIGN=row_align(x, block_r, grad),
            num_warps=warps, **assert_options(x),
        )  # fmt: skip
    return grad, tgrad


def _bounds_ptr(spec: CESpec, dummy: torch.Tensor) -> torch.Tensor:
    """The device bounds of a vocabulary slice, or any tensor when the slice is given as integers."""
    return spec.bounds if spec.bounds is not None else dummy


def ce_partial(x: torch.Tensor, t: torch.Tensor, spec: CESpec) -> torch.Tensor:
    """Launch the partial-sums kernel: ``(A * B, 8)`` per-row sums of a vocabulary slice.

    Args:
        x: this slice's logits ``(A, C, B)`` (classes ``[spec.class_offset, + C)``).
        t: global index targets ``(A, B)`` or this slice's probability targets ``(A, C, B)``.
        spec: the options; ``weight`` is the global ``(C,)`` tensor.

    Returns:
        fp32 (fp64 for fp64 logits) columns as ``reference.cross_entropy.ce_partial``'s.
    """
    A, C, B = x.shape
    R = A * B
    out = torch.zeros(R, _reference.PARTIAL_COLUMNS, device=x.device, dtype=acc_dtype(x.dtype))
    if R == 0:
        return out
    block_r, block_c, warps = launch_config(max(C, 1), x.element_size(), x.stride(1) == 1 or B == 1)
    w = spec.weight
    with on_device(x):
        _ce_partial_kernel[(triton.cdiv(R, block_r),)](
            x_ptr=x, s_xa=x.stride(0), s_xc=x.stride(1), s_xb=x.stride(2),
            t_ptr=t, **_target_strides(t, spec.prob_target),
            w_ptr=w if w is not None else x, s_w=w.stride(0) if w is not None else 0, out_ptr=out,
            R=R, C=C, B=B, c_off=spec.class_offset, **_softcap_pair(spec), bounds_ptr=_bounds_ptr(spec, out),
            HAS_WEIGHT=w is not None, PROB_TARGET=spec.prob_target, HAS_SMOOTHING=spec.smoothing > 0.0,
            HAS_SOFTCAP=spec.softcap is not None, SLICE_IN_MEMORY=spec.bounds is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(x.dtype), ALIGN=row_align(x, block_r), num_warps=warps,
        )  # fmt: skip
    return out


# ---- TRACED: the launchers as torch.library custom ops (used while torch.compile traces) ----------


def _op_spec(weight, wsum, ignore_index, smoothing, z_loss, softcap, prob, logp) -> CESpec:
    return CESpec(weight, wsum, ignore_index, smoothing, z_loss, softcap if softcap > 0 else None, prob, logp)


def _op_scalars(spec: CESpec) -> tuple:
    """``CESpec``'s scalar options as the custom ops take them (softcap 0.0 means none)."""
    softcap = 0.0 if spec.softcap is None else spec.softcap
    return spec.ignore_index, spec.smoothing, spec.z_loss, softcap, spec.prob_target, spec.logp_input


@torch.library.custom_op("triton_losses::ce_fwd", mutates_args=())
def ce_fwd_op(
    x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None, wsum: torch.Tensor | None,
    coef: torch.Tensor | None, ignore_index: int, smoothing: float, z_loss: float, softcap: float,
    prob: bool, logp: bool, want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(loss, stats, grad)`` of :func:`ce_fwd`; ``grad`` is empty unless ``want_grad``; ``softcap <= 0``: none."""
    spec = _op_spec(weight, wsum, ignore_index, smoothing, z_loss, softcap, prob, logp)
    grad = torch.empty(x.shape if want_grad else (0,), dtype=x.dtype, device=x.device)
    loss, stats = ce_fwd(x, t, spec, coef, grad if want_grad else None)
    return loss, stats, grad


@ce_fwd_op.register_fake
def _(x, t, weight, wsum, coef, ignore_index, smoothing, z_loss, softcap, prob, logp, want_grad):
    R = x.shape[0] * x.shape[2]
    acc = acc_dtype(x.dtype)
    return x.new_empty(R, dtype=acc), x.new_empty(R, 2, dtype=acc), x.new_empty(x.shape if want_grad else (0,))


@torch.library.custom_op("triton_losses::ce_bwd", mutates_args=())
def ce_bwd_op(
    x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None, wsum: torch.Tensor | None,
    stats: torch.Tensor, gout: torch.Tensor, coef: torch.Tensor | None, ignore_index: int, smoothing: float,
    z_loss: float, softcap: float, prob: bool, logp: bool, want_tgrad: bool, class_offset: int = 0,
    num_classes: int = 0, bounds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dlogits, dtarget)`` of :func:`ce_bwd`; ``dtarget`` is empty unless ``want_tgrad``."""
    spec = _op_spec(weight, wsum, ignore_index, smoothing, z_loss, softcap, prob, logp)
    spec = spec._replace(class_offset=class_offset, num_classes=num_classes, bounds=bounds)
    tgrad = torch.empty(t.shape if want_tgrad else (0,), dtype=t.dtype, device=t.device)
    grad, _ = ce_bwd(x, t, spec, stats, gout, coef, None, tgrad if want_tgrad else None)
    return grad, tgrad


@ce_bwd_op.register_fake
def _(x, t, weight, wsum, stats, gout, coef, ignore_index, smoothing, z_loss, softcap, prob, logp, want_tgrad,
      c0=0, nc=0, bounds=None):  # fmt: skip
    return torch.empty_like(x, memory_format=torch.contiguous_format), t.new_empty(t.shape if want_tgrad else (0,))


def _traced_ce_fwd(x, t, spec: CESpec, coef, grad=None):
    """:func:`ce_fwd` through ``triton_losses::ce_fwd`` (a given ``grad`` buffer receives a copy)."""
    loss, stats, g = ce_fwd_op(x, t, spec.weight, spec.weight_sum, coef, *_op_scalars(spec), grad is not None)
    if grad is not None:
        grad.copy_(g)
    return loss, stats


def _traced_ce_bwd(x, t, spec: CESpec, stats, gout, coef, grad=None, tgrad=None):
    """:func:`ce_bwd` through ``triton_losses::ce_bwd`` (given buffers receive copies)."""
    g, dt = ce_bwd_op(x, t, spec.weight, spec.weight_sum, stats, gout, coef, *_op_scalars(spec), tgrad is not None,
                      spec.class_offset, spec.num_classes, spec.bounds)  # fmt: skip
    if grad is not None:
        g = grad.copy_(g)
    if tgrad is not None:
        dt = tgrad.copy_(dt)
    return g, (dt if tgrad is not None else None)


@torch.library.custom_op("triton_losses::ce_partial", mutates_args=())
def ce_partial_op(
    x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None, smoothing: float, softcap: float, prob: bool,
    class_offset: int, bounds: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`ce_partial`'s ``(R, 8)`` partial sums; ``softcap <= 0``: none."""
    spec = _op_spec(weight, None, -100, smoothing, 0.0, softcap, prob, False)
    return ce_partial(x, t, spec._replace(class_offset=class_offset, bounds=bounds))


@ce_partial_op.register_fake
def _(x, t, weight, smoothing, softcap, prob, class_offset, bounds=None):
    return x.new_empty(x.shape[0] * x.shape[2], _reference.PARTIAL_COLUMNS, dtype=acc_dtype(x.dtype))


def _traced_ce_partial(x, t, spec: CESpec):
    """:func:`ce_partial` through ``triton_losses::ce_partial``."""
    softcap = 0.0 if spec.softcap is None else spec.softcap
    return ce_partial_op(x, t, spec.weight, spec.smoothing, softcap, spec.prob_target, spec.class_offset,
                         spec.bounds)  # fmt: skip


# Under tracing the per-call epilogues are plain torch ops, which the compiler fuses; the row
# kernels are opaque custom ops. The forward never fuses the gradient there (functional ops).
TRACED = types.SimpleNamespace(
    FUSES_GRAD=False,
    ce_fwd=_traced_ce_fwd,
    ce_bwd=_traced_ce_bwd,
    ce_partial=_traced_ce_partial,
    ce_norm=_reference.ce_norm,
    ce_finish=_reference.ce_finish,
    scale_=traced_scale_,
)
