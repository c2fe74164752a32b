"""The embedding losses in plain PyTorch: the CPU fallback of ``kernels/embedding.py``.

``cosine_embedding_loss`` and ``triplet_margin_loss`` on ``(R, D)`` row views (broadcast operands
are expanded views, stride 0): per-row losses in fp32 (fp64 for fp64 data), and with ``fuse`` the
gradients of the reduced loss (scaled by ``coef``) in the same pass over each chunk of rows.
``gout`` / ``coef`` are ``(R,)`` per-row factors or ``(1,)`` factors shared by every row.
"""

from __future__ import annotations

import math

import torch

from .._precision import acc_dtype
from ._chunks import direct, empty_if, row_chunks, row_factor, store
from .cross_entropy import scale_

__all__ = ["COSINE_EPS", "FUSES_GRAD", "cosine_bwd", "cosine_fwd", "scale_", "triplet_bwd", "triplet_fwd"]

FUSES_GRAD = True

# torch's EPSILON in cosine_embedding_loss, added to each squared norm before the square root: a C++
# ``float`` 1e-12 (Loss.cpp), so fp64 data meets 1e-12 rounded to fp32, 9.999999960041972e-13.
COSINE_EPS = 9.999999960041972e-13


# ---- cosine_embedding_loss -------------------------------------------------------------------


def _cosine_stats(x1, x2, acc):
    """Per-row ``(cos, denom, m1, m2)`` (squared norms plus torch's EPSILON): one pass over the rows."""
    R, D = x1.shape
    dot, m1, m2 = (torch.empty(R, dtype=acc, device=x1.device) for _ in range(3))
    for r0, r1 in row_chunks(R, D):
        a, b = x1[r0:r1].to(acc), x2[r0:r1].to(acc)
        # linalg.vecdot: no chunk-sized temporary, and 6x faster than einsum here (65 x 1000 fp32: 14 vs 85 us)
        torch.linalg.vecdot(a, b, out=dot[r0:r1])
        torch.linalg.vecdot(a, a, out=m1[r0:r1])
        torch.linalg.vecdot(b, b, out=m2[r0:r1])
    m1.add_(COSINE_EPS)
    m2.add_(COSINE_EPS)
    denom = (m1 * m2).sqrt_()
    return dot.div_(denom), denom, m1, m2


def _cosine_loss(cos, y, margin: float):
    zero = torch.zeros((), dtype=cos.dtype, device=cos.device)
    return torch.where(y == 1, 1.0 - cos, zero) + torch.where(y == -1, (cos - margin).clamp_min_(0.0), zero)


def _cosine_grads(x1, x2, y, margin: float, stats, scale, acc):
    """``scale * dloss/dx1`` and ``scale * dloss/dx2`` ``(R, D)``, two fused ops per gradient and chunk."""
    cos, denom, m1, m2 = stats
    # d loss / d cos: -1 for target 1; 1 for target -1 where cos - margin >= 0 (clamp_min's rule)
    dcos = torch.where(y == 1, -1.0, torch.where((y == -1) & (cos - margin >= 0), 1.0, 0.0)).to(acc) * scale
    inv = (dcos / denom)[:, None]
    c1, c2 = (dcos * cos / m1)[:, None], (dcos * cos / m2)[:, None]
    g1, g2 = empty_if(x1, True), empty_if(x2, True)
    R, D = x1.shape
    for r0, r1 in row_chunks(R, D):
        a, b = x1[r0:r1].to(acc), x2[r0:r1].to(acc)
        for g, u, v, c in ((g1, b, a, c1), (g2, a, b, c2)):
            dst = direct(g, slice(r0, r1), acc)
            val = torch.mul(u, inv[r0:r1], out=dst).addcmul_(v, c[r0:r1], value=-1.0)
            store(g, slice(r0, r1), val, dst)
    return g1, g2


def cosine_fwd(x1, x2, y, margin: float, coef, fuse: bool):
    """Per-row cosine embedding loss.

    Args:
        x1: ``(R, D)`` embeddings.
        x2: ``(R, D)`` embeddings.
        y: ``(R,)`` targets (1: similar, -1: dissimilar, anything else: no loss), any dtype.
        margin: the margin of the dissimilar term.
        coef: ``(1,)`` scale of the fused gradients (``1/R`` for 'mean', 1 for 'sum').
        fuse: also return the gradients w.r.t. ``x1`` and ``x2``.

    Returns:
        ``(loss (R,), grad_x1 or None, grad_x2 or None)``.
    """
    acc = acc_dtype(torch.promote_types(x1.dtype, x2.dtype))
    stats = _cosine_stats(x1, x2, acc)
    loss = _cosine_loss(stats[0], y, margin)
    if not fuse:
        return loss, None, None
    return (loss, *_cosine_grads(x1, x2, y, margin, stats, row_factor(coef, 0, x1.shape[0], acc), acc))


def cosine_bwd(x1, x2, y, margin: float, gout):
    """Gradients ``(R, D)`` of ``sum(gout * row_loss)`` w.r.t. ``x1`` and ``x2``."""
    acc = acc_dtype(torch.promote_types(x1.dtype, x2.dtype))
    stats = _cosine_stats(x1, x2, acc)
    return _cosine_grads(x1, x2, y, margin, stats, row_factor(gout, 0, x1.shape[0], acc), acc)


# ---- triplet_margin_loss ---------------------------------------------------------------------


def _norm_grad(v: torch.Tensor, d: torch.Tensor, p: float) -> torch.Tensor:
    """``d ||v||_p / dv`` for rows ``v`` ``(rows, D)`` with norms ``d`` ``(rows,)``, as torch's norm backward."""
    dc = d[:, None]
    if p == 2.0:
        return (v / dc).masked_fill_(dc == 0, 0.0)
    if p == 1.0:
        return v.sign()
    if math.isinf(p):
        av = v.abs()
        hit = (av == dc) | av.isnan()
        return v.sign().mul_(hit).div_(hit.sum(1, keepdim=True))
    g = v.sign().mul_((v.abs() / dc).pow_(p - 1.0))
    return g.masked_fill_((v == 0) | (dc == 0), 0.0)


def _diffs(a, p, n, r0, r1, eps: float, swap: bool, acc):
    """Rows ``r0:r1`` of ``a - p + eps``, ``a - n + eps`` and (``swap``) ``p - n + eps``, in ``acc``."""
    ar, pr, nr = a[r0:r1].to(acc), p[r0:r1].to(acc), n[r0:r1].to(acc)
    return (ar - pr).add_(eps), (ar - nr).add_(eps), (pr - nr).add_(eps) if swap else None


def _triplet_norms(a, p, n, pnorm: float, eps: float, swap: bool, acc):
    """Per-row ``(d(a, p), d(a, n), d(p, n) or None)``: one pass over the rows."""
    R, D = a.shape
    d = [torch.empty(R, dtype=acc, device=a.device) for _ in range(3 if swap else 2)]
    for r0, r1 in row_chunks(R, D):
        for v, out in zip(_diffs(a, p, n, r0, r1, eps, swap, acc), d):
            torch.linalg.vector_norm(v, ord=pnorm, dim=1, out=out[r0:r1])
    return (*d, None) if not swap else tuple(d)


def _triplet_coefs(norms, margin: float, swap: bool, scale, acc):
    """Per-row ``(loss, gi, share of d(a, n), share of d(p, n))`` from the three norms."""
    d_ap, d_an, d_pn = norms
    d_neg = torch.minimum(d_an, d_pn) if swap else d_an
    inner = d_ap.add(margin).sub_(d_neg)
    gi = None if scale is None else (inner >= 0).to(acc).mul_(scale)  # clamp_min: gradient where inner >= 0
    s_an, s_pn = None, None
    if swap and scale is not None:  # torch.minimum's rule: ties split the gradient in half
        half = torch.where(d_an == d_pn, 0.5, 1.0).to(acc)
        s_an, s_pn = half.masked_fill(d_an > d_pn, 0.0), half.masked_fill_(d_an < d_pn, 0.0)
    return inner.clamp_min_(0.0), gi, s_an, s_pn


def _triplet_grads(a, p, n, pnorm: float, eps: float, swap: bool, norms, gi, s_an, s_pn, acc):
    """The three gradients ``(R, D)``; p = 2 as two fused ops per gradient and chunk."""
    R, D = a.shape
    grads = (empty_if(a, True), empty_if(p, True), empty_if(n, True))
    d_ap, d_an, d_pn = norms
    w_an = gi if s_an is None else gi * s_an
    w_pn = None if s_pn is None else gi * s_pn
    for r0, r1 in row_chunks(R, D):
        rows = slice(r0, r1)
        v_ap, v_an, v_pn = _diffs(a, p, n, r0, r1, eps, swap, acc)
        u_ap = _norm_grad(v_ap, d_ap[rows], pnorm).mul_(gi[rows, None])
        u_an = _norm_grad(v_an, d_an[rows], pnorm).mul_(w_an[rows, None])
        u_pn = None if v_pn is None else _norm_grad(v_pn, d_pn[rows], pnorm).mul_(w_pn[rows, None])
        grads[0][rows] = u_ap - u_an
        grads[1][rows] = u_ap.neg_() if u_pn is None else u_ap.add_(u_pn).neg_()
        grads[2][rows] = u_an if u_pn is None else u_an.add_(u_pn)
    return grads


def _triplet_acc(a, p, n) -> torch.dtype:
    return acc_dtype(torch.promote_types(torch.promote_types(a.dtype, p.dtype), n.dtype))


def triplet_fwd(a, p, n, margin: float, pnorm: float, eps: float, swap: bool, coef, fuse: bool):
    """Per-row triplet margin loss ``max(margin + d(a, p) - d(a, n), 0)``, ``d(x, y) = ||x - y + eps||_pnorm``.

    Args:
        a: anchors ``(R, D)``.
        p: positives ``(R, D)``.
        n: negatives ``(R, D)``.
        margin: the margin (> 0).
        pnorm: the norm's order (> 0, ``inf`` allowed).
        eps: added to every difference before the norm, as ``pairwise_distance`` does.
        swap: use ``min(d(a, n), d(p, n))`` as the negative distance.
        coef: ``(1,)`` scale of the fused gradients.
        fuse: also return the gradients w.r.t. ``a``, ``p`` and ``n``.

    Returns:
        ``(loss (R,), grad_a, grad_p, grad_n)``, the gradients None unless ``fuse``.
    """
    acc = _triplet_acc(a, p, n)
    norms = _triplet_norms(a, p, n, pnorm, eps, swap, acc)
    scale = row_factor(coef, 0, a.shape[0], acc) if fuse else None
    loss, gi, s_an, s_pn = _triplet_coefs(norms, margin, swap, scale, acc)
    if not fuse:
        return loss, None, None, None
    return (loss, *_triplet_grads(a, p, n, pnorm, eps, swap, norms, gi, s_an, s_pn, acc))


def triplet_bwd(a, p, n, margin: float, pnorm: float, eps: float, swap: bool, gout):
    """Gradients ``(R, D)`` of ``sum(gout * row_loss)`` w.r.t. ``a``, ``p`` and ``n``."""
    acc = _triplet_acc(a, p, n)
    norms = _triplet_norms(a, p, n, pnorm, eps, swap, acc)
    _, gi, s_an, s_pn = _triplet_coefs(norms, margin, swap, row_factor(gout, 0, a.shape[0], acc), acc)
    return _triplet_grads(a, p, n, pnorm, eps, swap, norms, gi, s_an, s_pn, acc)
