"""Distillation kernels (generalised JSD; KL from two rows of logits), their launchers, and ``TRACED``.

Both work on ``(A, B, V)`` row views (row ``r = a * B + b``) with optional ``(A, B)`` labels whose
``ignore_index`` rows are masked, one program per block of rows, column blocks over the vocabulary.
A masked row's loss and gradients are 0 whatever it holds, so it is never read: the plain loop masks
its loads off, and a row taking the aligned split (below) branches once on its label, storing only
zeros in the gradients (a prompt masked out of a distillation batch costs only those stores).
Scalars (``beta``, ``1 / temperature``) go in as kernel arguments, each as an fp32 pair
``hi + lo`` so that fp64 data keeps ~48 bits of them: nothing is copied to the device per call.

``jsd``: the loss is elementwise in the vocabulary, so one pass per row block computes the row
loss and can also write both gradients (fused into the forward when the caller asks, or in the
backward). With ``Q = exp(x)``, ``P = exp(y)``, ``M = beta P + (1 - beta) Q``, per element::

    beta * P * (y - log M) + (1 - beta) * Q * (x - log M)    d/dx = (1 - beta) Q (x - log M), d/dy = beta P (y - log M)

(``beta = 0``: ``P (y - x)``; ``beta = 1``: ``Q (x - y)``; a term whose probability is 0 is 0).

``kl_div_with_logits``: per row, with ``s = student / T`` and ``t = teacher / T``, ``p = softmax(t)``,
``q = softmax(s)``::

    loss = sum_v p_v * (log p_v - log q_v) = E_p[t - s] - lse(t) + lse(s)

One online pass over the vocabulary keeps, for each of the two rows, the running maximum ``m``
and sum of exponentials ``z = sum_v exp(x_v - m)``, plus ``D = sum_v exp(t_v - m_t) * ((t_v - m_t)
- (s_v - m_s))``, rebased whenever a maximum grows; no log-probability row is ever written. Then
``loss = D / z_t - log z_t + log z_s`` (the maxima cancel), and the gradient pass computes
``log q = (s - m_s) - log z_s`` as torch's ``log_softmax`` does. The maxima are those of the raw
logits, whose differences are taken before the ``1 / T`` scaling, so neither a large common offset
nor a huge negative logit anywhere in the row costs precision. Gradients::

    d loss / d student = (q - p) / T
    d loss / d teacher = p * (log p - log q - loss) / T

The same kernel writes them in a second pass, right after the statistics (fused into the
forward) or from saved statistics (backward, ``STATS_KNOWN``).

Rows that do not start 16-byte aligned (an odd vocabulary such as 50257), one per program, with
both inputs and the gradients at the same offsets, take ``ALIGN > 1`` (``_common.row_align``): each
pass streams the row's aligned middle as whole unmasked tiles, an aligned rest masked in 16-byte
units, and its first and last few columns as one small tile, so the loads and stores stay 128 bits
wide.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._precision import acc_dtype
from ._common import (
    NEG_INF,
    aligned_tiles,
    kept_rows,
    launch_config,
    masked_load,
    masked_store,
    on_device,
    row_align,
    row_block,
    row_offsets,
    scale_,  # noqa: F401  (the fused-gradient rescale every family shares)
    tl_acc,
    traced_scale_,
)
from ._elementwise import asked, joined, split_float

JSD_MIXTURE = 0  # 0 < beta < 1
JSD_FORWARD_KL = 1  # beta == 0: KL(target || input)
JSD_REVERSE_KL = 2  # beta == 1: KL(input || target)
FUSES_GRAD = True  # jsd_fwd / kd_fwd(..., need_g*) write the gradients of the reduced loss


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
        m = tl.where(m == NEG_INF, 0.0, m)
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
def _jsd_tile(total, a_ptr, xrow, xrel, b_ptr, yrow, yrel, ga_ptr, gb_ptr, grow, grel, lmask, mask, keep, scale,
              beta, log_beta, log_1mbeta, MODE: tl.constexpr, WRITE_LOSS: tl.constexpr, WRITE_GA: tl.constexpr,
              WRITE_GB: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """One tile of the JSD pass: its loss added to the rows' ``total``, its gradients (scaled) stored. Loads
    under ``lmask`` (the kept rows' part of ``mask``), stores under ``mask``, both only when ``MASKED``."""
    x = masked_load(a_ptr + xrow[:, None] + xrel[None, :], lmask, NEG_INF, MASKED, "").to(ACC)
    y = masked_load(b_ptr + yrow[:, None] + yrel[None, :], lmask, NEG_INF, MASKED, "").to(ACC)
    loss, dx, dy = _jsd_terms(x, y, beta, log_beta, log_1mbeta, MODE)
    if WRITE_LOSS:
        if MASKED:
            loss = tl.where(mask, loss, 0.0)
        total += tl.sum(loss, 1)
    gof = grow[:, None] + grel[None, :]
    if WRITE_GA:
        dx = tl.where(keep[:, None], dx * scale[:, None], 0.0)
        masked_store(ga_ptr + gof, dx.to(ga_ptr.dtype.element_ty), mask, MASKED, "")
    if WRITE_GB:
        dy = tl.where(keep[:, None], dy * scale[:, None], 0.0)
        masked_store(gb_ptr + gof, dy.to(gb_ptr.dtype.element_ty), mask, MASKED, "")
    return total


@triton.jit
def _zero_tile(ga_ptr, gb_ptr, off, mask, MASKED: tl.constexpr, WRITE_GA: tl.constexpr, WRITE_GB: tl.constexpr):
    """Zeros at ``off`` (under ``mask`` when ``MASKED``) in the gradients asked for."""
    if WRITE_GA:
        masked_store(ga_ptr + off, tl.zeros(off.shape, ga_ptr.dtype.element_ty), mask, MASKED, "")
    if WRITE_GB:
        masked_store(gb_ptr + off, tl.zeros(off.shape, gb_ptr.dtype.element_ty), mask, MASKED, "")


@triton.jit
def _row_kept(keep):
    """Whether a one-row program's row is kept (a scalar: the program branches on it as a whole)."""
    return tl.sum(keep.to(tl.int32), 0) > 0


@triton.jit
def _zero_row(ga_ptr, gb_ptr, off, head, full, rel, tmask, ecols, emask, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
              WRITE_GA: tl.constexpr, WRITE_GB: tl.constexpr):  # fmt: skip
    """Zeros in the gradients asked for over one row the labels drop, split as ``aligned_tiles`` splits it (its
    loss and gradients are 0 whatever it holds: it is never read)."""
    _zero_tile(ga_ptr, gb_ptr, off[:, None] + ecols[None, :], emask, True, WRITE_GA, WRITE_GB)
    for k in range(full):
        _zero_tile(ga_ptr, gb_ptr, tl.multiple_of(off + head + k * BLOCK_C, ALIGN)[:, None] + rel[None, :], tmask,
                   False, WRITE_GA, WRITE_GB)  # fmt: skip
    rest = tl.multiple_of(off + head + full * BLOCK_C, ALIGN)[:, None] + rel[None, :]  # the aligned rest
    _zero_tile(ga_ptr, gb_ptr, rest, tmask, True, WRITE_GA, WRITE_GB)


@triton.jit
def _jsd_row_split(total, a_ptr, b_ptr, ga_ptr, gb_ptr, xoff, head, full, rel, tmask, ecols, emask, rmask, keep,
                   scale, beta, log_beta, log_1mbeta, MODE: tl.constexpr, WRITE_LOSS: tl.constexpr,
                   WRITE_GA: tl.constexpr, WRITE_GB: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                   ALIGN: tl.constexpr):  # fmt: skip
    """The JSD pass over one row split by ``aligned_tiles`` (every tensor at ``xoff``)."""
    total = _jsd_tile(total, a_ptr, xoff, ecols, b_ptr, xoff, ecols, ga_ptr, gb_ptr, xoff, ecols, emask, emask, keep,
                      scale, beta, log_beta, log_1mbeta, MODE, WRITE_LOSS, WRITE_GA, WRITE_GB, True, ACC)  # fmt: skip
    for k in range(full):
        c0 = head + k * BLOCK_C
        total = _jsd_tile(total, a_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, b_ptr, tl.multiple_of(xoff + c0, ALIGN),
                          rel, ga_ptr, gb_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, rmask[:, None], rmask[:, None],
                          keep, scale, beta, log_beta, log_1mbeta, MODE, WRITE_LOSS, WRITE_GA, WRITE_GB, False,
                          ACC)  # fmt: skip
    c0 = head + full * BLOCK_C
    total = _jsd_tile(total, a_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, b_ptr, tl.multiple_of(xoff + c0, ALIGN),
                      rel, ga_ptr, gb_ptr, tl.multiple_of(xoff + c0, ALIGN), rel, tmask, tmask, keep, scale, beta,
                      log_beta, log_1mbeta, MODE, WRITE_LOSS, WRITE_GA, WRITE_GB, True, ACC)  # fmt: skip
    return total


@triton.jit
def _jsd_kernel(
    a_ptr, s_aa, s_ab, s_av,  # input log-probabilities x (A, B, V)
    b_ptr, s_ba, s_bb, s_bv,  # target log-probabilities y (A, B, V)
    lab_ptr, s_la, s_lb,  # labels (A, B), when HAS_LABELS
    out_ptr,  # (R,) ACC per-row loss, when WRITE_LOSS
    gs_ptr, s_gs,  # gradient scale per row: (R,) with stride s_gs, or one value with stride 0
    ga_ptr, gb_ptr, s_ga, s_gb, s_gv,  # gradients w.r.t. input / target (A, B, V), one shared layout
    R, B, V, ignore_index,  # rows, the second row dimension, the vocabulary, the masked label
    beta_hi, beta_lo,  # beta as an fp32 pair (hi + lo)
    MODE: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_LOSS: tl.constexpr,
    WRITE_GA: tl.constexpr, WRITE_GB: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Per-row generalised JSD for ``BLOCK_R`` rows, and/or its gradients scaled per row.

    ``ALIGN > 1`` (one row; both inputs and the gradients share strides, ``_common.row_align``): the
    row's aligned middle as whole unmasked tiles, an aligned rest masked in 16-byte units, and its
    first and last few columns as one small tile (``aligned_tiles``).
    """
    rows, rmask = row_block(R, BLOCK_R)
    keep = kept_rows(lab_ptr, rows, rmask, B, s_la, s_lb, ignore_index, HAS_LABELS)
    xoff = row_offsets(rows, B, s_aa, s_ab)
    yoff = row_offsets(rows, B, s_ba, s_bb)
    goff = row_offsets(rows, B, s_ga, s_gb)
    beta = joined(beta_hi, beta_lo, ACC)
    log_beta = tl.log(beta)  # used by MODE 0 only, where 0 < beta < 1
    log_1mbeta = tl.log(1.0 - beta)
    scale = tl.zeros([BLOCK_R], ACC)
    if WRITE_GA or WRITE_GB:
        scale = tl.load(gs_ptr + rows * s_gs, mask=keep, other=0.0).to(ACC)
    total = tl.zeros([BLOCK_R], ACC)
    if ALIGN > 1:  # both inputs and the gradients at the same offsets (row_align): xoff for all
        head, full, rel, tmask, ecols, emask = aligned_tiles(xoff, V, rmask, ALIGN, BLOCK_C)
        if HAS_LABELS:
            if _row_kept(keep):
                total = _jsd_row_split(total, a_ptr, b_ptr, ga_ptr, gb_ptr, xoff, head, full, rel, tmask, ecols, emask,
                                       rmask, keep, scale, beta, log_beta, log_1mbeta, MODE, WRITE_LOSS, WRITE_GA,
                                       WRITE_GB, BLOCK_C, ACC, ALIGN)  # fmt: skip
            elif WRITE_GA or WRITE_GB:
                _zero_row(ga_ptr, gb_ptr, xoff, head, full, rel, tmask, ecols, emask, BLOCK_C, ALIGN, WRITE_GA,
                          WRITE_GB)  # fmt: skip
        else:
            total = _jsd_row_split(total, a_ptr, b_ptr, ga_ptr, gb_ptr, xoff, head, full, rel, tmask, ecols, emask,
                                   rmask, keep, scale, beta, log_beta, log_1mbeta, MODE, WRITE_LOSS, WRITE_GA, WRITE_GB,
                                   BLOCK_C, ACC, ALIGN)  # fmt: skip
    else:
        for c0 in range(0, V, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < V)[None, :]
            lmask = keep[:, None] & (cols < V)[None, :]  # keep: in range and not dropped
            total = _jsd_tile(total, a_ptr, xoff, cols * s_av, b_ptr, yoff, cols * s_bv, ga_ptr, gb_ptr, goff,
                              cols * s_gv, lmask, mask, keep, scale, beta, log_beta, log_1mbeta, MODE, WRITE_LOSS,
                              WRITE_GA, WRITE_GB, True, ACC)  # fmt: skip
    if WRITE_LOSS:
        tl.store(out_ptr + rows, tl.where(keep, total, 0.0).to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _kd_stats_tile(m_s, m_t, c_s, c_t, z_s, z_t, d, s_ptr, srow, srel, t_ptr, trow, trel, lmask, inv_t,
                   MASKED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Fold one tile of both rows into the running maxima ``m``, shifts ``c``, sums ``z`` and ``D``."""
    # Raw logits, shifted by the raw maxima before the 1 / T scaling: near the maximum the
    # difference is exact, so a large common offset costs nothing (scaling first would not).
    s = masked_load(s_ptr + srow[:, None] + srel[None, :], lmask, NEG_INF, MASKED, "").to(ACC)
    t = masked_load(t_ptr + trow[:, None] + trel[None, :], lmask, NEG_INF, MASKED, "").to(ACC)
    new_s = tl.maximum(m_s, tl.max(s, 1))
    new_t = tl.maximum(m_t, tl.max(t, 1))
    n_s = tl.where(new_s == NEG_INF, 0.0, new_s)
    n_t = tl.where(new_t == NEG_INF, 0.0, new_t)
    alpha_t = tl.exp((m_t - n_t) * inv_t)
    # Rebase D's terms to the new shifts (each moves by the change of c_s minus that of c_t).
    d = tl.where(z_t == 0.0, 0.0, alpha_t * (d + z_t * ((n_s - c_s) - (n_t - c_t)) * inv_t))
    z_s = z_s * tl.exp((m_s - n_s) * inv_t) + tl.sum(tl.exp((s - n_s[:, None]) * inv_t), 1)
    e = tl.exp((t - n_t[:, None]) * inv_t)
    z_t = z_t * alpha_t + tl.sum(e, 1)
    d += tl.sum(tl.where(e == 0.0, 0.0, e * ((t - n_t[:, None]) - (s - n_s[:, None])) * inv_t), 1)
    return new_s, new_t, n_s, n_t, z_s, z_t, d


@triton.jit
def _kd_stats_split(m_s, m_t, c_s, c_t, z_s, z_t, d, s_ptr, t_ptr, soff, head, full, rel, tmask, ecols, emask, keep,
                    inv_t, BLOCK_C: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """The statistics pass over one row split by ``aligned_tiles`` (student and teacher at ``soff``)."""
    m_s, m_t, c_s, c_t, z_s, z_t, d = _kd_stats_tile(m_s, m_t, c_s, c_t, z_s, z_t, d, s_ptr, soff, ecols, t_ptr, soff,
                                                     ecols, emask, inv_t, True, ACC)  # fmt: skip
    for k in range(full):
        c0 = head + k * BLOCK_C
        m_s, m_t, c_s, c_t, z_s, z_t, d = _kd_stats_tile(m_s, m_t, c_s, c_t, z_s, z_t, d, s_ptr,
                                                         tl.multiple_of(soff + c0, ALIGN), rel, t_ptr,
                                                         tl.multiple_of(soff + c0, ALIGN), rel, keep[:, None], inv_t,
                                                         False, ACC)  # fmt: skip
    c0 = head + full * BLOCK_C
    m_s, m_t, c_s, c_t, z_s, z_t, d = _kd_stats_tile(m_s, m_t, c_s, c_t, z_s, z_t, d, s_ptr,
                                                     tl.multiple_of(soff + c0, ALIGN), rel, t_ptr,
                                                     tl.multiple_of(soff + c0, ALIGN), rel, tmask, inv_t, True,
                                                     ACC)  # fmt: skip
    return m_s, m_t, c_s, c_t, z_s, z_t, d


@triton.jit
def _kd_stats(s_ptr, soff, s_sv, t_ptr, toff, s_tv, keep, V, inv_t, HAS_LABELS: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """One online pass over the rows ``keep`` holds (in range, not dropped; the others are not read, their
    statistics unspecified): ``(loss, c_s, log z_s, c_t, log z_t)`` per row (BLOCK_R,)."""
    m_s = tl.full([BLOCK_R], NEG_INF, ACC)
    m_t = tl.full([BLOCK_R], NEG_INF, ACC)
    c_s = tl.zeros([BLOCK_R], ACC)  # the shifts in use: the raw maxima, 0 while they are -inf
    c_t = tl.zeros([BLOCK_R], ACC)
    z_s = tl.zeros([BLOCK_R], ACC)
    z_t = tl.zeros([BLOCK_R], ACC)
    d = tl.zeros([BLOCK_R], ACC)  # sum_v exp((t_v - c_t) / T) * ((t_v - c_t) - (s_v - c_s)) / T
    if ALIGN > 1:  # student and teacher rows at the same offsets (row_align): soff for both
        head, full, rel, tmask, ecols, emask = aligned_tiles(soff, V, keep, ALIGN, BLOCK_C)
        if HAS_LABELS:
            if _row_kept(keep):
                m_s, m_t, c_s, c_t, z_s, z_t, d = _kd_stats_split(m_s, m_t, c_s, c_t, z_s, z_t, d, s_ptr, t_ptr, soff,
                                                                  head, full, rel, tmask, ecols, emask, keep, inv_t,
                                                                  BLOCK_C, ACC, ALIGN)  # fmt: skip
        else:
            m_s, m_t, c_s, c_t, z_s, z_t, d = _kd_stats_split(m_s, m_t, c_s, c_t, z_s, z_t, d, s_ptr, t_ptr, soff,
                                                              head, full, rel, tmask, ecols, emask, keep, inv_t,
                                                              BLOCK_C, ACC, ALIGN)  # fmt: skip
    else:
        for c0 in range(0, V, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            lmask = keep[:, None] & (cols < V)[None, :]
            m_s, m_t, c_s, c_t, z_s, z_t, d = _kd_stats_tile(m_s, m_t, c_s, c_t, z_s, z_t, d, s_ptr, soff,
                                                             cols * s_sv, t_ptr, toff, cols * s_tv, lmask, inv_t, True,
                                                             ACC)  # fmt: skip
    lz_s = tl.log(z_s)
    lz_t = tl.log(z_t)
    return d / z_t - lz_t + lz_s, c_s, lz_s, c_t, lz_t


@triton.jit
def _kd_grad_tile(a_ptr, srow, srel, b_ptr, trow, trel, ga_ptr, gb_ptr, grow, grel, lmask, mask, keep, scale,
                  loss, c_s, lz_s, c_t, lz_t, inv_t, WRITE_GA: tl.constexpr, WRITE_GB: tl.constexpr,
                  MASKED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """One tile of the student / teacher gradients from the rows' statistics (``scale`` includes ``1 / T``); loads
    under ``lmask``, stores under ``mask`` (when ``MASKED``)."""
    s = masked_load(a_ptr + srow[:, None] + srel[None, :], lmask, 0.0, MASKED, "").to(ACC)
    t = masked_load(b_ptr + trow[:, None] + trel[None, :], lmask, 0.0, MASKED, "").to(ACC)
    log_q = (s - c_s[:, None]) * inv_t - lz_s[:, None]
    log_p = (t - c_t[:, None]) * inv_t - lz_t[:, None]
    p = tl.exp(log_p)
    gof = grow[:, None] + grel[None, :]
    if WRITE_GA:
        g = tl.where(keep[:, None], (tl.exp(log_q) - p) * scale[:, None], 0.0)
        masked_store(ga_ptr + gof, g.to(ga_ptr.dtype.element_ty), mask, MASKED, "")
    if WRITE_GB:
        g = tl.where(p == 0.0, 0.0, p * (log_p - log_q - loss[:, None]))
        g = tl.where(keep[:, None], g * scale[:, None], 0.0)
        masked_store(gb_ptr + gof, g.to(gb_ptr.dtype.element_ty), mask, MASKED, "")


@triton.jit
def _kd_grad_split(a_ptr, b_ptr, ga_ptr, gb_ptr, goff, head, full, rel, tmask, ecols, emask, rmask, keep, scale, loss,
                   c_s, lz_s, c_t, lz_t, inv_t, WRITE_GA: tl.constexpr, WRITE_GB: tl.constexpr, BLOCK_C: tl.constexpr,
                   ACC: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """The gradient pass over one row split by ``aligned_tiles`` (inputs and gradients at ``goff``)."""
    _kd_grad_tile(a_ptr, goff, ecols, b_ptr, goff, ecols, ga_ptr, gb_ptr, goff, ecols, emask, emask, keep, scale, loss,
                  c_s, lz_s, c_t, lz_t, inv_t, WRITE_GA, WRITE_GB, True, ACC)  # fmt: skip
    for k in range(full):
        c0 = head + k * BLOCK_C
        _kd_grad_tile(a_ptr, tl.multiple_of(goff + c0, ALIGN), rel, b_ptr, tl.multiple_of(goff + c0, ALIGN), rel,
                      ga_ptr, gb_ptr, tl.multiple_of(goff + c0, ALIGN), rel, rmask[:, None], rmask[:, None], keep,
                      scale, loss, c_s, lz_s, c_t, lz_t, inv_t, WRITE_GA, WRITE_GB, False, ACC)  # fmt: skip
    c0 = head + full * BLOCK_C
    _kd_grad_tile(a_ptr, tl.multiple_of(goff + c0, ALIGN), rel, b_ptr, tl.multiple_of(goff + c0, ALIGN), rel, ga_ptr,
                  gb_ptr, tl.multiple_of(goff + c0, ALIGN), rel, tmask, tmask, keep, scale, loss, c_s, lz_s, c_t, lz_t,
                  inv_t, WRITE_GA, WRITE_GB, True, ACC)  # fmt: skip


@triton.jit
def _kd_kernel(
    a_ptr, s_aa, s_ab, s_av,  # student logits (A, B, V)
    b_ptr, s_ba, s_bb, s_bv,  # teacher logits (A, B, V)
    lab_ptr, s_la, s_lb,  # labels (A, B), when HAS_LABELS
    out_ptr,  # (5, R) ACC statistics: per-row loss, then the raw max c and log sum exp((x - c) / T) of student, teacher
    gs_ptr, s_gs,  # gradient scale per row: (R,) with stride s_gs, or one value with stride 0
    ga_ptr, gb_ptr, s_ga, s_gb, s_gv,  # gradients w.r.t. student / teacher logits (A, B, V)
    R, B, V, ignore_index,  # rows, the second row dimension, the vocabulary, the masked label
    it_hi, it_lo,  # 1 / temperature as an fp32 pair (hi + lo)
    HAS_LABELS: tl.constexpr, STATS_KNOWN: tl.constexpr, WRITE_GA: tl.constexpr, WRITE_GB: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Per-row KL(softmax(t / T) || softmax(s / T)) for ``BLOCK_R`` rows and/or its gradients (``ALIGN > 1``:
    both passes split as in ``_jsd_kernel``)."""
    rows, rmask = row_block(R, BLOCK_R)
    keep = kept_rows(lab_ptr, rows, rmask, B, s_la, s_lb, ignore_index, HAS_LABELS)
    soff = row_offsets(rows, B, s_aa, s_ab)
    toff = row_offsets(rows, B, s_ba, s_bb)
    inv_t = joined(it_hi, it_lo, ACC)
    # the statistics' five rows of R: offsets summed in int64 (rows), never k * R in int32 (R > 2**29)
    o1 = rows + R
    o2 = o1 + R
    o3 = o2 + R
    o4 = o3 + R
    if STATS_KNOWN:
        loss = tl.load(out_ptr + rows, mask=rmask, other=0.0).to(ACC)
        c_s = tl.load(out_ptr + o1, mask=rmask, other=0.0).to(ACC)
        lz_s = tl.load(out_ptr + o2, mask=rmask, other=0.0).to(ACC)
        c_t = tl.load(out_ptr + o3, mask=rmask, other=0.0).to(ACC)
        lz_t = tl.load(out_ptr + o4, mask=rmask, other=0.0).to(ACC)
    else:
        loss, c_s, lz_s, c_t, lz_t = _kd_stats(a_ptr, soff, s_av, b_ptr, toff, s_bv, keep, V, inv_t, HAS_LABELS,
                                               BLOCK_R, BLOCK_C, ACC, ALIGN)  # fmt: skip
        tl.store(out_ptr + rows, tl.where(keep, loss, 0.0), mask=rmask)
        tl.store(out_ptr + o1, c_s, mask=rmask)
        tl.store(out_ptr + o2, lz_s, mask=rmask)
        tl.store(out_ptr + o3, c_t, mask=rmask)
        tl.store(out_ptr + o4, lz_t, mask=rmask)
    if WRITE_GA or WRITE_GB:
        scale = tl.load(gs_ptr + rows * s_gs, mask=keep, other=0.0).to(ACC) * inv_t
        goff = row_offsets(rows, B, s_ga, s_gb)
        if ALIGN > 1:  # the inputs at the gradients' offsets (row_align); the split recomputed, not kept live
            head, full, rel, tmask, ecols, emask = aligned_tiles(goff, V, rmask, ALIGN, BLOCK_C)
            if HAS_LABELS:
                if _row_kept(keep):
                    _kd_grad_split(a_ptr, b_ptr, ga_ptr, gb_ptr, goff, head, full, rel, tmask, ecols, emask, rmask,
                                   keep, scale, loss, c_s, lz_s, c_t, lz_t, inv_t, WRITE_GA, WRITE_GB, BLOCK_C, ACC,
                                   ALIGN)  # fmt: skip
                else:
                    _zero_row(ga_ptr, gb_ptr, goff, head, full, rel, tmask, ecols, emask, BLOCK_C, ALIGN, WRITE_GA,
                              WRITE_GB)  # fmt: skip
            else:
                _kd_grad_split(a_ptr, b_ptr, ga_ptr, gb_ptr, goff, head, full, rel, tmask, ecols, emask, rmask, keep,
                               scale, loss, c_s, lz_s, c_t, lz_t, inv_t, WRITE_GA, WRITE_GB, BLOCK_C, ACC,
                               ALIGN)  # fmt: skip
        else:
            for c0 in range(0, V, BLOCK_C):
                cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
                mask = rmask[:, None] & (cols < V)[None, :]
                lmask = keep[:, None] & (cols < V)[None, :]
                _kd_grad_tile(a_ptr, soff, cols * s_av, b_ptr, toff, cols * s_bv, ga_ptr, gb_ptr, goff, cols * s_gv,
                              lmask, mask, keep, scale, loss, c_s, lz_s, c_t, lz_t, inv_t, WRITE_GA, WRITE_GB, True,
                              ACC)  # fmt: skip


def launch_rows(kernel, a: Tensor, b: Tensor, labels, out, gs, ga, gb, ignore_index: int, **flags) -> None:
    """Launch a row kernel (``_jsd_kernel`` or ``_kd_kernel``: the same argument layout).

    Args:
        kernel: the row kernel.
        a, b: the two ``(A, B, V)`` row views.
        labels: ``(A, B)`` int64 labels, or None.
        out: the per-row output buffer (``(R,)`` loss or ``(5, R)`` statistics, contiguous).
        gs: per-row ``(A * B,)`` or single ``(1,)`` gradient scale, or None (no gradient written).
        ga, gb: gradient buffers ``(A, B, V)`` (one shared layout), or None.
        ignore_index: the masked label value.
        flags: the kernel's scalar pair and constexprs (which outputs to write, its mode).
    """
    A, B, V = a.shape
    R = A * B
    if R == 0:
        return
    block_r, block_c, warps = launch_config(V, a.element_size(), True)
    g = ga if ga is not None else (gb if gb is not None else a)
    rows = lambda t: None if t is None else t.transpose(1, 2)  # (A, V, B): row_align's (A, C, B)
    align = row_align(rows(a), block_r, rows(b), rows(ga), rows(gb))
    with on_device(a):
        kernel[(triton.cdiv(R, block_r),)](
            a_ptr=a, s_aa=a.stride(0), s_ab=a.stride(1), s_av=a.stride(2),
            b_ptr=b, s_ba=b.stride(0), s_bb=b.stride(1), s_bv=b.stride(2),
            lab_ptr=a if labels is None else labels,
            s_la=0 if labels is None else labels.stride(0), s_lb=0 if labels is None else labels.stride(1),
            out_ptr=out,
            gs_ptr=out if gs is None else gs, s_gs=0 if gs is None or gs.numel() == 1 else gs.stride(0),
            ga_ptr=g if ga is None else ga, gb_ptr=g if gb is None else gb,
            s_ga=g.stride(0), s_gb=g.stride(1), s_gv=g.stride(2),
            R=R, B=B, V=V, ignore_index=ignore_index,
            HAS_LABELS=labels is not None, WRITE_GA=ga is not None, WRITE_GB=gb is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(a.dtype), ALIGN=align, num_warps=warps, **flags,
        )  # fmt: skip


def jsd_mode(beta: float) -> int:
    return JSD_FORWARD_KL if beta == 0.0 else (JSD_REVERSE_KL if beta == 1.0 else JSD_MIXTURE)


def _grad_buffers(x: Tensor, y: Tensor, need_x: bool, need_y: bool):
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_y else None
    return gx, gy


def _jsd_launch(x, y, labels, beta: float, ignore_index: int, loss, gs, gx, gy) -> None:
    hi, lo = split_float(beta)
    launch_rows(_jsd_kernel, x, y, labels, loss if loss is not None else x, gs, gx, gy, ignore_index,
                beta_hi=hi, beta_lo=lo, MODE=jsd_mode(beta), WRITE_LOSS=loss is not None)  # fmt: skip


def jsd_fwd(x: Tensor, y: Tensor, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
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
    gx, gy = _grad_buffers(x, y, need_gx, need_gy)
    _jsd_launch(x, y, labels, beta, ignore_index, loss, gscale if gx is not None or gy is not None else None, gx, gy)
    return loss, gx, gy


def jsd_bwd(x: Tensor, y: Tensor, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    """Gradients ``(gx, gy)`` (``(A, B, V)`` or None) of ``sum_r gscale_r * loss_r``.

    ``gscale`` is ``(A * B,)`` (reduction 'none') or one value broadcast to every row.
    """
    gx, gy = _grad_buffers(x, y, need_gx, need_gy)
    if need_gx or need_gy:
        _jsd_launch(x, y, labels, beta, ignore_index, None, gscale, gx, gy)
    return gx, gy


def _kd_launch(s, t, labels, inv_temp: float, ignore_index: int, stats, stats_known: bool, gs, ds, dt) -> None:
    hi, lo = split_float(inv_temp)
    launch_rows(_kd_kernel, s, t, labels, stats, gs, ds, dt, ignore_index,
                it_hi=hi, it_lo=lo, STATS_KNOWN=stats_known)  # fmt: skip


def kd_fwd(s: Tensor, t: Tensor, labels, inv_temp: float, ignore_index: int, gscale, need_ds: bool, need_dt: bool):
    """Per-row loss and softmax statistics; with ``need_d*`` also the fused gradients.

    Args:
        s: student logits ``(A, B, V)``.
        t: teacher logits ``(A, B, V)``, ``s``'s dtype.
        labels: ``(A, B)`` int64 labels (rows equal to ``ignore_index`` are masked), or None.
        inv_temp: ``1 / temperature``.
        ignore_index: the masked label value.
        gscale: ``(1,)`` fp32 (fp64) gradient scale (the reduction's ``1 / denominator``).
        need_ds, need_dt: write the gradients of ``sum_r gscale * loss_r`` w.r.t. ``s`` / ``t``.

    Returns:
        ``(stats, ds, dt)``: stats ``(5, A * B)`` fp32 (fp64) = (loss, then the max and the
        log-sum-exp minus the max of the student row / T, then of the teacher row / T), masked rows'
        loss 0; gradients ``(A, B, V)`` contiguous, or None.
    """
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    stats = torch.empty(5, s.shape[0] * s.shape[1], dtype=acc, device=s.device)
    ds, dt = _grad_buffers(s, t, need_ds, need_dt)
    gs = gscale if ds is not None or dt is not None else None
    _kd_launch(s, t, labels, inv_temp, ignore_index, stats, False, gs, ds, dt)
    return stats, ds, dt


def kd_bwd(s: Tensor, t: Tensor, labels, inv_temp: float, ignore_index: int, stats, gscale, need_ds: bool,
           need_dt: bool):  # fmt: skip
    """Gradients ``(ds, dt)`` of ``sum_r gscale_r * loss_r`` from saved ``stats``.

    ``gscale`` is ``(A * B,)`` fp32 (fp64) (reduction 'none') or one value broadcast to every row.
    """
    ds, dt = _grad_buffers(s, t, need_ds, need_dt)
    if need_ds or need_dt:
        _kd_launch(s, t, labels, inv_temp, ignore_index, stats.contiguous(), True, gscale, ds, dt)
    return ds, dt


# ---- TRACED: the launchers as torch.library custom ops, for torch.compile / CUDA-graph capture ----
# Functional (fresh outputs; a gradient not asked for comes back empty and is returned as None).
# Gradients are never fused into a traced forward (FUSES_GRAD is False there).


def _grads_out(ga, gb, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return (a.new_empty(0) if ga is None else ga), (b.new_empty(0) if gb is None else gb)


@torch.library.custom_op("triton_losses::jsd_fwd", mutates_args=())
def _jsd_fwd_op(x: Tensor, y: Tensor, labels: Tensor | None, beta: float, ignore_index: int) -> Tensor:
    """Per-row generalised JSD ``(A * B,)`` fp32 (fp64) of ``(A, B, V)`` log-probabilities."""
    return jsd_fwd(x, y, labels, beta, ignore_index, None, False, False)[0]


@_jsd_fwd_op.register_fake
def _(x, y, labels, beta, ignore_index):
    return x.new_empty(x.shape[0] * x.shape[1], dtype=acc_dtype(x.dtype))


@torch.library.custom_op("triton_losses::jsd_bwd", mutates_args=())
def _jsd_bwd_op(
    x: Tensor, y: Tensor, labels: Tensor | None, beta: float, ignore_index: int, gscale: Tensor, need_gx: bool,
    need_gy: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _grads_out(*jsd_bwd(x, y, labels, beta, ignore_index, gscale, need_gx, need_gy), x, y)


@_jsd_bwd_op.register_fake
def _(x, y, labels, beta, ignore_index, gscale, need_gx, need_gy):
    return x.new_empty(x.shape if need_gx else (0,)), y.new_empty(y.shape if need_gy else (0,))


@torch.library.custom_op("triton_losses::kd_fwd", mutates_args=())
def _kd_fwd_op(s: Tensor, t: Tensor, labels: Tensor | None, inv_temp: float, ignore_index: int) -> Tensor:
    """Per-row statistics ``(5, A * B)`` fp32 (fp64): loss, then max and log-sum-exp-minus-max of each row."""
    return kd_fwd(s, t, labels, inv_temp, ignore_index, None, False, False)[0]


@_kd_fwd_op.register_fake
def _(s, t, labels, inv_temp, ignore_index):
    return s.new_empty(5, s.shape[0] * s.shape[1], dtype=acc_dtype(s.dtype))


@torch.library.custom_op("triton_losses::kd_bwd", mutates_args=())
def _kd_bwd_op(
    s: Tensor, t: Tensor, labels: Tensor | None, inv_temp: float, ignore_index: int, stats: Tensor, gscale: Tensor,
    need_ds: bool, need_dt: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _grads_out(*kd_bwd(s, t, labels, inv_temp, ignore_index, stats, gscale, need_ds, need_dt), s, t)


@_kd_bwd_op.register_fake
def _(s, t, labels, inv_temp, ignore_index, stats, gscale, need_ds, need_dt):
    return s.new_empty(s.shape if need_ds else (0,)), t.new_empty(t.shape if need_dt else (0,))


def _traced_jsd_fwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    assert not (need_gx or need_gy), "traced calls do not fuse gradients into the forward"
    return _jsd_fwd_op(x, y, labels, beta, ignore_index), None, None


def _traced_jsd_bwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    return asked(_jsd_bwd_op(x, y, labels, beta, ignore_index, gscale, need_gx, need_gy), (need_gx, need_gy))


def _traced_kd_fwd(s, t, labels, inv_temp: float, ignore_index: int, gscale, need_ds: bool, need_dt: bool):
    assert not (need_ds or need_dt), "traced calls do not fuse gradients into the forward"
    return _kd_fwd_op(s, t, labels, inv_temp, ignore_index), None, None


def _traced_kd_bwd(s, t, labels, inv_temp: float, ignore_index: int, stats, gscale, need_ds: bool, need_dt: bool):
    return asked(_kd_bwd_op(s, t, labels, inv_temp, ignore_index, stats, gscale, need_ds, need_dt), (need_ds, need_dt))


TRACED = SimpleNamespace(
    FUSES_GRAD=False,
    jsd_fwd=_traced_jsd_fwd,
    jsd_bwd=_traced_jsd_bwd,
    kd_fwd=_traced_kd_fwd,
    kd_bwd=_traced_kd_bwd,
    scale_=traced_scale_,
)
