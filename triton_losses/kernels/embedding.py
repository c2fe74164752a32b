"""Embedding loss kernels (cosine embedding, triplet margin), their launchers, and ``TRACED``.

Both are row losses over ``(R, D)`` operands read in place through their strides (broadcast
operands are stride-0 views). A program holds ``BLOCK_R`` rows; one pass over the row's column
blocks accumulates every reduction the loss needs (cosine: the dot product and both squared
norms; triplet: the two or three p-norms of the differences), then the per-row loss is written
(``WRITE_LOSS``) and/or the gradients of ``sum(f * row_loss)`` (``WRITE_GRAD``: ``f`` one factor
for every row, the fused gradient of 'mean' / 'sum', or one per row). A row that fits one block
(``ONE_BLOCK``) is loaded once and its tiles reused for the gradient; longer rows are read again.

Formulas (torch's ``aten/src/ATen/native/Loss.cpp`` / ``Distance.cpp``), fp32 (fp64 for fp64 data):

    cosine:   cos = sum(a b) / sqrt((sum(a a) + 1e-12) (sum(b b) + 1e-12))
              loss = 1 - cos (y == 1), max(cos - margin, 0) (y == -1), 0 otherwise
    triplet:  d(u, v) = ||u - v + eps||_p,   loss = max(margin + d(a, p) - d_neg, 0),
              d_neg = d(a, n), or min(d(a, n), d(p, n)) with ``swap`` (ties split the gradient)

Gradients follow torch's autograd rules: ``clamp_min`` passes the gradient where its input is
``>= 0``; the norm's gradient is torch's (``v / d`` for p = 2, ``sign(v)`` for p = 1, shared among
the maxima for p = inf, ``sign(v) (|v| / d)**(p - 1)`` otherwise; 0 where ``d`` is 0).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import embedding as _reference
from ._common import (
    launch_config,
    on_device,
    row_block,
    scale_,
    tl_acc,
    traced_scale_,
)
from ._elementwise import joined, split_float

__all__ = ["COSINE_EPS", "FUSES_GRAD", "TRACED", "cosine_bwd", "cosine_fwd", "scale_", "triplet_bwd", "triplet_fwd"]

FUSES_GRAD = True
COSINE_EPS = _reference.COSINE_EPS
_COSINE_EPS = tl.constexpr(COSINE_EPS)  # in the data's dtype: fp32(1e-12), and exactly that value in fp64

# The norm of the triplet kernel: NORM=1, NORM=2, NORM=0 (p = inf) and NORM=3 (any other p > 0).
_NORM_INF, _NORM_ANY = 0, 3


def _acc(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _empty(like: Tensor) -> Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


@triton.jit
def _tile(ptr, rows, cols, s_r, s_c, mask, ACC: tl.constexpr):
    """A ``(BLOCK_R, BLOCK_C)`` tile of a strided ``(R, D)`` operand, as ACC (0 outside ``mask``)."""
    return tl.load(ptr + rows[:, None] * s_r + cols[None, :] * s_c, mask=mask, other=0.0).to(ACC)


@triton.jit
def _clamp_min0(v):
    """``max(v, 0)`` that keeps NaN, as ``torch.clamp_min``."""
    return tl.where(v < 0, 0.0, v)


# ---- cosine_embedding_loss -------------------------------------------------------------------


@triton.jit
def _cosine_grads(a, b, dcos, denom, cos, m1, m2, ga_ptr, gb_ptr, goff, mask):
    """Store ``dcos * dcos/da`` and ``dcos * dcos/db`` for one tile of rows."""
    inv = (dcos / denom)[:, None]
    ga = b * inv - a * (dcos * cos / m1)[:, None]
    gb = a * inv - b * (dcos * cos / m2)[:, None]
    tl.store(ga_ptr + goff, ga.to(ga_ptr.dtype.element_ty), mask=mask)
    tl.store(gb_ptr + goff, gb.to(gb_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cosine_kernel(
    a_ptr, s_ar, s_ac,  # x1 (R, D)
    b_ptr, s_br, s_bc,  # x2 (R, D)
    y_ptr, s_y,  # targets (R,), any real dtype (never unsigned)
    f_ptr, s_f,  # gradient factor: per row (s_f = 1) or one shared value (s_f = 0)
    loss_ptr,  # (R,) row losses (WRITE_LOSS)
    ga_ptr, gb_ptr,  # (R, D) contiguous gradients (WRITE_GRAD)
    R, D, margin_hi, margin_lo,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, ONE_BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per-row cosine embedding loss of ``BLOCK_R`` rows, and optionally its gradients."""
    rows, rmask = row_block(R, BLOCK_R)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    mask = rmask[:, None] & (cols < D)[None, :]
    a = _tile(a_ptr, rows, cols, s_ar, s_ac, mask, ACC)
    b = _tile(b_ptr, rows, cols, s_br, s_bc, mask, ACC)
    dot, m1, m2 = tl.sum(a * b, 1), tl.sum(a * a, 1), tl.sum(b * b, 1)
    if not ONE_BLOCK:  # (ONE_BLOCK: D <= BLOCK_C, no loop compiled at all)
        for c0 in range(BLOCK_C, D, BLOCK_C):
            cc = c0 + cols
            mk = rmask[:, None] & (cc < D)[None, :]
            a2 = _tile(a_ptr, rows, cc, s_ar, s_ac, mk, ACC)
            b2 = _tile(b_ptr, rows, cc, s_br, s_bc, mk, ACC)
            dot, m1, m2 = dot + tl.sum(a2 * b2, 1), m1 + tl.sum(a2 * a2, 1), m2 + tl.sum(b2 * b2, 1)
    m1 += _COSINE_EPS
    m2 += _COSINE_EPS
    denom = tl.sqrt(m1 * m2)
    cos = dot / denom
    y = tl.load(y_ptr + rows * s_y, mask=rmask, other=0)
    pos, neg = y == 1, y == -1
    margin = joined(margin_hi, margin_lo, ACC)
    if WRITE_LOSS:
        loss = tl.where(pos, 1.0 - cos, tl.where(neg, _clamp_min0(cos - margin), 0.0))
        tl.store(loss_ptr + rows, loss, mask=rmask)
    if WRITE_GRAD:
        f = tl.load(f_ptr + rows * s_f, mask=rmask, other=0.0).to(ACC)
        dcos = tl.where(pos, -f, tl.where(neg & (cos - margin >= 0), f, 0.0))
        goff = rows[:, None] * D + cols[None, :]
        if ONE_BLOCK:
            _cosine_grads(a, b, dcos, denom, cos, m1, m2, ga_ptr, gb_ptr, goff, mask)
        else:
            for c0 in range(0, D, BLOCK_C):
                cc = c0 + cols
                mk = rmask[:, None] & (cc < D)[None, :]
                a2 = _tile(a_ptr, rows, cc, s_ar, s_ac, mk, ACC)
                b2 = _tile(b_ptr, rows, cc, s_br, s_bc, mk, ACC)
                _cosine_grads(a2, b2, dcos, denom, cos, m1, m2, ga_ptr, gb_ptr, goff + c0, mk)


def _targets(y: Tensor) -> Tensor:
    """Targets as a signed dtype the kernel can compare with -1 (bool / unsigned widened: ``(R,)`` copy)."""
    return y.to(torch.int16) if y.dtype in (torch.bool, torch.uint8) else y


def _cosine_launch(x1, x2, y, margin: float, f, loss, g1, g2) -> None:
    R, D = x1.shape
    if R == 0:
        return
    contig = (x1.stride(1) == 1 and x2.stride(1) == 1) or R == 1
    block_r, block_c, warps = launch_config(D, max(x1.element_size(), x2.element_size()), contig)
    y = _targets(y)
    with on_device(x1):
        _cosine_kernel[(triton.cdiv(R, block_r),)](
            x1, x1.stride(0), x1.stride(1), x2, x2.stride(0), x2.stride(1), y, y.stride(0),
            f, 1 if f.numel() > 1 else 0, loss if loss is not None else f,
            g1 if g1 is not None else x1, g2 if g2 is not None else x2, R, D, *split_float(float(margin)),
            WRITE_LOSS=loss is not None, WRITE_GRAD=g1 is not None, ONE_BLOCK=block_c >= D,
            BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(_acc(x1, x2)), num_warps=warps,
        )  # fmt: skip


def cosine_fwd(x1: Tensor, x2: Tensor, y: Tensor, margin: float, coef: Tensor, fuse: bool):
    """Per-row cosine embedding loss (see ``reference.embedding.cosine_fwd``): ``(loss, g1, g2)``."""
    loss = torch.empty(x1.shape[0], dtype=_acc(x1, x2), device=x1.device)
    g1, g2 = (_empty(x1), _empty(x2)) if fuse else (None, None)
    _cosine_launch(x1, x2, y, margin, coef.to(loss.dtype), loss, g1, g2)
    return loss, g1, g2


def cosine_bwd(x1: Tensor, x2: Tensor, y: Tensor, margin: float, gout: Tensor):
    """Gradients ``(R, D)`` of ``sum(gout * row_loss)`` w.r.t. ``x1`` and ``x2``."""
    g1, g2 = _empty(x1), _empty(x2)
    _cosine_launch(x1, x2, y, margin, gout.to(_acc(x1, x2)).contiguous(), None, g1, g2)
    return g1, g2


# ---- triplet_margin_loss ---------------------------------------------------------------------


@triton.jit
def _norm_part(v, p, NORM: tl.constexpr):
    """Per-lane contribution of ``v`` to ``||.||_p``: ``|v|**p`` summed, or ``|v|`` maxed (p = inf)."""
    av = tl.abs(v)
    if NORM == 1:
        return av
    elif NORM == 2:
        return v * v
    elif NORM == 3:
        return tl.exp2(p * tl.log2(av))
    else:
        return av


@triton.jit
def _norm_fold(s, part, NORM: tl.constexpr):
    """Fold a tile's parts into per-lane running sums (maxima for p = inf, NaN kept)."""
    if NORM == 0:
        return tl.where((part > s) | (part != part), part, s)
    else:
        return s + part


@triton.jit
def _norm_finish(s, p, NORM: tl.constexpr):
    """Per-row norm from per-lane running values ``(BLOCK_R, BLOCK_C)``."""
    if NORM == 0:
        m = tl.max(s, 1)
        nan = tl.max((s != s).to(tl.int32), 1) > 0
        return tl.where(nan, float("nan"), m)
    else:
        t = tl.sum(s, 1)
        if NORM == 1:
            return t
        elif NORM == 2:
            return tl.sqrt(t)
        else:
            return tl.exp2(tl.log2(t) / p)


@triton.jit
def _norm_grad(v, d, hits, p, NORM: tl.constexpr):
    """``d ||v||_p / dv`` for a tile ``v`` of rows with norms ``d`` (``hits``: count of maxima, p = inf)."""
    sgn = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, v))
    dc = d[:, None]
    if NORM == 1:
        return sgn
    elif NORM == 2:
        return tl.where(dc == 0, 0.0, v / dc)
    elif NORM == 0:
        av = tl.abs(v)
        return tl.where((av == dc) | (av != av), sgn / hits[:, None], 0.0)
    else:
        g = sgn * tl.exp2((p - 1.0) * tl.log2(tl.abs(v) / dc))
        return tl.where((v == 0) | (dc == 0), 0.0, g)


@triton.jit
def _hits(v, d, mask):
    """Per-row count of the lanes of ``v`` that attain the maximum ``|v|`` (or are NaN)."""
    av = tl.abs(v)
    return tl.sum(((av == d[:, None]) | (av != av)) & mask, 1).to(d.dtype)


@triton.jit
def _triplet_grads(va, vn, vs, d_ap, d_an, d_pn, h_ap, h_an, h_pn, gi, s_an, s_pn, p,
                   ga_ptr, gp_ptr, gn_ptr, goff, mask, NORM: tl.constexpr, SWAP: tl.constexpr):  # fmt: skip
    """Store the three gradients of one tile of rows (``va = a - p + eps``, ``vn = a - n + eps``, ``vs = p - n + eps``)."""
    u_ap = _norm_grad(va, d_ap, h_ap, p, NORM)
    u_an = _norm_grad(vn, d_an, h_an, p, NORM) * s_an[:, None]
    gc = gi[:, None]
    if SWAP:
        u_pn = _norm_grad(vs, d_pn, h_pn, p, NORM) * s_pn[:, None]
        gp = -(u_ap + u_pn) * gc
        gn = (u_an + u_pn) * gc
    else:
        gp = -u_ap * gc
        gn = u_an * gc
    tl.store(ga_ptr + goff, ((u_ap - u_an) * gc).to(ga_ptr.dtype.element_ty), mask=mask)
    tl.store(gp_ptr + goff, gp.to(gp_ptr.dtype.element_ty), mask=mask)
    tl.store(gn_ptr + goff, gn.to(gn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _diffs(a_ptr, s_ar, s_ac, p_ptr, s_pr, s_pc, n_ptr, s_nr, s_nc, rows, cols, mask, eps, ACC: tl.constexpr):
    """One tile's differences ``a - p + eps``, ``a - n + eps``, ``p - n + eps``."""
    a = _tile(a_ptr, rows, cols, s_ar, s_ac, mask, ACC)
    pp = _tile(p_ptr, rows, cols, s_pr, s_pc, mask, ACC)
    n = _tile(n_ptr, rows, cols, s_nr, s_nc, mask, ACC)
    return tl.where(mask, a - pp + eps, 0.0), tl.where(mask, a - n + eps, 0.0), tl.where(mask, pp - n + eps, 0.0)


@triton.jit
def _triplet_kernel(
    a_ptr, s_ar, s_ac,  # anchors (R, D)
    p_ptr, s_pr, s_pc,  # positives (R, D)
    n_ptr, s_nr, s_nc,  # negatives (R, D)
    f_ptr, s_f,  # gradient factor: per row (s_f = 1) or one shared value (s_f = 0)
    loss_ptr,  # (R,) row losses (WRITE_LOSS)
    ga_ptr, gp_ptr, gn_ptr,  # (R, D) contiguous gradients (WRITE_GRAD)
    R, D, margin_hi, margin_lo, p_hi, p_lo, eps_hi, eps_lo,
    NORM: tl.constexpr, SWAP: tl.constexpr, WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per-row triplet margin loss of ``BLOCK_R`` rows, and optionally its gradients."""
    rows, rmask = row_block(R, BLOCK_R)
    p = joined(p_hi, p_lo, ACC)
    eps = joined(eps_hi, eps_lo, ACC)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    mask = rmask[:, None] & (cols < D)[None, :]
    va, vn, vs = _diffs(a_ptr, s_ar, s_ac, p_ptr, s_pr, s_pc, n_ptr, s_nr, s_nc, rows, cols, mask, eps, ACC)
    s_ap, s_an, s_pn = _norm_part(va, p, NORM), _norm_part(vn, p, NORM), _norm_part(vs, p, NORM)
    if not ONE_BLOCK:  # (ONE_BLOCK: D <= BLOCK_C, no loop compiled at all)
        for c0 in range(BLOCK_C, D, BLOCK_C):
            mk = rmask[:, None] & (c0 + cols < D)[None, :]
            v1, v2, v3 = _diffs(a_ptr, s_ar, s_ac, p_ptr, s_pr, s_pc, n_ptr, s_nr, s_nc, rows, c0 + cols, mk, eps, ACC)
            s_ap = _norm_fold(s_ap, _norm_part(v1, p, NORM), NORM)
            s_an = _norm_fold(s_an, _norm_part(v2, p, NORM), NORM)
            if SWAP:
                s_pn = _norm_fold(s_pn, _norm_part(v3, p, NORM), NORM)
    d_ap, d_an = _norm_finish(s_ap, p, NORM), _norm_finish(s_an, p, NORM)
    d_neg, d_pn = d_an, d_an
    share_an = tl.zeros_like(d_an) + 1.0
    share_pn = tl.zeros_like(d_an)
    if SWAP:
        d_pn = _norm_finish(s_pn, p, NORM)
        d_neg = tl.where((d_an < d_pn) | (d_an != d_an), d_an, d_pn)  # torch.minimum (NaN kept)
        half = tl.where(d_an == d_pn, 0.5, 1.0)
        share_an = tl.where(d_an > d_pn, 0.0, half)
        share_pn = tl.where(d_an < d_pn, 0.0, half)
    inner = joined(margin_hi, margin_lo, ACC) + d_ap - d_neg
    if WRITE_LOSS:
        tl.store(loss_ptr + rows, _clamp_min0(inner), mask=rmask)
    if WRITE_GRAD:
        f = tl.load(f_ptr + rows * s_f, mask=rmask, other=0.0).to(ACC)
        gi = tl.where(inner >= 0, f, 0.0)
        goff = rows[:, None] * D + cols[None, :]
        if ONE_BLOCK:
            h_ap, h_an, h_pn = _hits(va, d_ap, mask), _hits(vn, d_an, mask), _hits(vs, d_pn, mask)
            _triplet_grads(va, vn, vs, d_ap, d_an, d_pn, h_ap, h_an, h_pn, gi, share_an, share_pn, p,
                           ga_ptr, gp_ptr, gn_ptr, goff, mask, NORM, SWAP)  # fmt: skip
        else:
            _triplet_grads_blocks(a_ptr, s_ar, s_ac, p_ptr, s_pr, s_pc, n_ptr, s_nr, s_nc, rows, rmask, cols,
                                  D, eps, p, d_ap, d_an, d_pn, gi, share_an, share_pn, ga_ptr, gp_ptr, gn_ptr,
                                  goff, NORM, SWAP, BLOCK_C, ACC)  # fmt: skip


@triton.jit
def _triplet_grads_blocks(
    a_ptr, s_ar, s_ac, p_ptr, s_pr, s_pc, n_ptr, s_nr, s_nc,  # the three operands (R, D)
    rows, rmask, cols, D, eps, p,  # this program's rows, one block's column offsets, options
    d_ap, d_an, d_pn, gi, share_an, share_pn,  # per-row norms, clamp gradient and min() shares
    ga_ptr, gp_ptr, gn_ptr, goff,  # gradients and the first block's offsets
    NORM: tl.constexpr, SWAP: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The gradients of rows longer than one block: re-read block by block (p = inf counts its maxima first)."""
    h_ap = tl.zeros_like(d_ap)
    h_an = tl.zeros_like(d_ap)
    h_pn = tl.zeros_like(d_ap)
    if NORM == 0:
        for c0 in range(0, D, BLOCK_C):
            mk = rmask[:, None] & (c0 + cols < D)[None, :]
            v1, v2, v3 = _diffs(a_ptr, s_ar, s_ac, p_ptr, s_pr, s_pc, n_ptr, s_nr, s_nc, rows, c0 + cols, mk, eps, ACC)
            h_ap += _hits(v1, d_ap, mk)
            h_an += _hits(v2, d_an, mk)
            h_pn += _hits(v3, d_pn, mk)
    for c0 in range(0, D, BLOCK_C):
        mk = rmask[:, None] & (c0 + cols < D)[None, :]
        v1, v2, v3 = _diffs(a_ptr, s_ar, s_ac, p_ptr, s_pr, s_pc, n_ptr, s_nr, s_nc, rows, c0 + cols, mk, eps, ACC)
        _triplet_grads(v1, v2, v3, d_ap, d_an, d_pn, h_ap, h_an, h_pn, gi, share_an, share_pn, p,
                       ga_ptr, gp_ptr, gn_ptr, goff + c0, mk, NORM, SWAP)  # fmt: skip


def norm_kind(p: float) -> int:
    """The kernel's ``NORM`` for a p-norm of order ``p`` (> 0 or inf)."""
    if p == 1.0:
        return 1
    if p == 2.0:
        return 2
    return _NORM_INF if p == float("inf") else _NORM_ANY


def triplet_config(D: int, elem_size: int, col_contiguous: bool) -> tuple[int, int, int]:
    """``launch_config`` for three operands: 8 values per thread (fp64: launch_config's 4).

    Measured with ptxas (sm_90, bf16, one 4096-column row per program, swap and gradients): the
    16-per-thread tile of ``launch_config`` needs 147 (p = inf) to 182 (any other p) registers,
    above the 128 of the launch's occupancy; the 8-per-thread tile fits. fp64 at 8 per thread
    needed 148-168 registers.
    """
    return launch_config(D, 8, col_contiguous, per_thread=8 if elem_size < 8 else None)


def _triplet_launch(a, p, n, margin, pnorm, eps, swap, f, loss, grads) -> None:
    R, D = a.shape
    if R == 0:
        return
    contig = all(t.stride(1) == 1 for t in (a, p, n)) or R == 1
    block_r, block_c, warps = triplet_config(D, max(t.element_size() for t in (a, p, n)), contig)
    ga, gp, gn = grads if grads is not None else (a, p, n)
    with on_device(a):
        _triplet_kernel[(triton.cdiv(R, block_r),)](
            a, a.stride(0), a.stride(1), p, p.stride(0), p.stride(1), n, n.stride(0), n.stride(1),
            f, 1 if f.numel() > 1 else 0, loss if loss is not None else f, ga, gp, gn, R, D,
            *split_float(float(margin)), *split_float(float(pnorm) if pnorm != float("inf") else 0.0),
            *split_float(float(eps)),
            NORM=norm_kind(pnorm), SWAP=bool(swap), WRITE_LOSS=loss is not None, WRITE_GRAD=grads is not None,
            ONE_BLOCK=block_c >= D, BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(_acc(a, p, n)), num_warps=warps,
        )  # fmt: skip


def triplet_fwd(a: Tensor, p: Tensor, n: Tensor, margin: float, pnorm: float, eps: float, swap: bool,
                coef: Tensor, fuse: bool):  # fmt: skip
    """Per-row triplet margin loss (see ``reference.embedding.triplet_fwd``): ``(loss, ga, gp, gn)``."""
    loss = torch.empty(a.shape[0], dtype=_acc(a, p, n), device=a.device)
    grads = (_empty(a), _empty(p), _empty(n)) if fuse else None
    _triplet_launch(a, p, n, margin, pnorm, eps, swap, coef.to(loss.dtype), loss, grads)
    return (loss, *(grads if fuse else (None, None, None)))


def triplet_bwd(a: Tensor, p: Tensor, n: Tensor, margin: float, pnorm: float, eps: float, swap: bool, gout: Tensor):
    """Gradients ``(R, D)`` of ``sum(gout * row_loss)`` w.r.t. ``a``, ``p`` and ``n``."""
    grads = (_empty(a), _empty(p), _empty(n))
    _triplet_launch(a, p, n, margin, pnorm, eps, swap, gout.to(_acc(a, p, n)).contiguous(), None, grads)
    return grads


# ---- TRACED: the launchers as torch.library custom ops (used while torch.compile traces) ----------


@torch.library.custom_op("triton_losses::cosine_embedding_fwd", mutates_args=())
def _cosine_fwd_op(x1: Tensor, x2: Tensor, y: Tensor, margin: float, coef: Tensor) -> Tensor:
    return cosine_fwd(x1, x2, y, margin, coef, False)[0]


@_cosine_fwd_op.register_fake
def _(x1, x2, y, margin, coef):
    return x1.new_empty(x1.shape[0], dtype=_acc(x1, x2))


@torch.library.custom_op("triton_losses::cosine_embedding_bwd", mutates_args=())
def _cosine_bwd_op(x1: Tensor, x2: Tensor, y: Tensor, margin: float, gout: Tensor) -> tuple[Tensor, Tensor]:
    return cosine_bwd(x1, x2, y, margin, gout)


@_cosine_bwd_op.register_fake
def _(x1, x2, y, margin, gout):
    return x1.new_empty(x1.shape), x2.new_empty(x2.shape)


@torch.library.custom_op("triton_losses::triplet_margin_fwd", mutates_args=())
def _triplet_fwd_op(
    a: Tensor, p: Tensor, n: Tensor, margin: float, pnorm: float, eps: float, swap: bool, coef: Tensor
) -> Tensor:
    return triplet_fwd(a, p, n, margin, pnorm, eps, swap, coef, False)[0]


@_triplet_fwd_op.register_fake
def _(a, p, n, margin, pnorm, eps, swap, coef):
    return a.new_empty(a.shape[0], dtype=_acc(a, p, n))


@torch.library.custom_op("triton_losses::triplet_margin_bwd", mutates_args=())
def _triplet_bwd_op(
    a: Tensor, p: Tensor, n: Tensor, margin: float, pnorm: float, eps: float, swap: bool, gout: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return triplet_bwd(a, p, n, margin, pnorm, eps, swap, gout)


@_triplet_bwd_op.register_fake
def _(a, p, n, margin, pnorm, eps, swap, gout):
    return a.new_empty(a.shape), p.new_empty(p.shape), n.new_empty(n.shape)


def _traced_cosine_fwd(x1, x2, y, margin: float, coef, fuse: bool):
    return _cosine_fwd_op(x1, x2, y, margin, coef), None, None


def _traced_triplet_fwd(a, p, n, margin: float, pnorm: float, eps: float, swap: bool, coef, fuse: bool):
    return _triplet_fwd_op(a, p, n, margin, pnorm, eps, swap, coef), None, None, None


# Under tracing the forward never fuses the gradients (the custom ops are functional).
TRACED = SimpleNamespace(
    COSINE_EPS=COSINE_EPS,
    FUSES_GRAD=False,
    cosine_fwd=_traced_cosine_fwd,
    cosine_bwd=_cosine_bwd_op,
    triplet_fwd=_traced_triplet_fwd,
    triplet_bwd=_triplet_bwd_op,
    scale_=traced_scale_,
)
