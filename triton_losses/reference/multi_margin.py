"""The multi-class margin losses in plain PyTorch: the CPU fallback of ``kernels/multi_margin.py``.

Every launcher works on ``(R, C)`` row views (class dimension last) and returns per-row losses
(already divided by ``C``, as torch divides them) in fp32 (fp64 for fp64 data). Rows are walked in
chunks of about :data:`~triton_losses.reference._chunks.CHUNK_ELEMS` elements, each computed with
in-place ops so no ``(R, C)`` fp32 temporary is held; with ``fuse`` the forward writes the
gradient of the reduced loss (scaled by ``coef``) in the same pass over the chunk.

``gout`` / ``coef`` are ``(R,)`` per-row factors or ``(1,)`` factors shared by every row.
"""

from __future__ import annotations

import functools

import torch

from .._precision import acc_dtype
from ._chunks import empty_if, row_chunks, row_factor
from .cross_entropy import scale_

__all__ = [
    "FUSES_GRAD",
    "mlsm_bwd",
    "mlsm_fwd",
    "multi_margin_bwd",
    "multi_margin_fwd",
    "multilabel_margin_bwd",
    "multilabel_margin_fwd",
    "scale_",
]

FUSES_GRAD = True

# multilabel_margin holds (rows, targets, C) comparison tiles: at most this many elements at once.
_PAIR_ELEMS = 1 << 18


def _torch_rows(x: torch.Tensor) -> bool:
    """Whether torch's own CPU kernel gives the per-row losses (fp32 / fp64 CPU data, nothing fused).

    torch's CPU kernels for the two margin losses are scalar loops accumulating in fp64 (exact to
    the output's rounding) and need no temporaries; for the forward alone they beat the chunked
    ops below (2-core CPU, 1 thread: multi_margin about 2x, multilabel_margin about 2x). With the
    gradient fused the chunked pass is the faster one (torch's forward + backward read twice).
    Not while torch.compile traces: AOT autograd replaces the op by torch's decomposition, whose
    multilabel_margin_loss counts the target entries after the -1 too (torch 2.13).
    """
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()


def _factor(f: torch.Tensor, r0: int, r1: int, acc: torch.dtype) -> torch.Tensor:
    """Rows ``r0:r1`` of a per-row factor as a ``(rows, 1)`` column (a ``(1, 1)`` one when shared)."""
    return row_factor(f, r0, r1, acc).reshape(-1, 1)


def _rows_fwd(x: torch.Tensor, coef: torch.Tensor, fuse: bool, chunk):
    """Per-row losses ``(R,)`` of ``(R, C)`` scores and, with ``fuse``, ``coef *`` their gradient ``(R, C)``.

    ``chunk(r0, r1, acc, scale, gx, want_loss)`` returns the losses of rows ``r0:r1`` and, given a
    ``scale`` column, writes their gradient times it into ``gx``.
    """
    R, C = x.shape
    acc = acc_dtype(x.dtype)
    gx = empty_if(x, fuse)
    loss = torch.empty(R, dtype=acc, device=x.device)
    for r0, r1 in row_chunks(R, C):
        scale = _factor(coef, r0, r1, acc) if fuse else None
        loss[r0:r1] = chunk(r0, r1, acc, scale, gx, True)
    return loss, gx


def _rows_bwd(x: torch.Tensor, gout: torch.Tensor, chunk) -> torch.Tensor:
    """Gradient ``(R, C)`` of ``sum(gout * row_loss)`` w.r.t. ``x``, by the ``chunk`` of :func:`_rows_fwd`."""
    R, C = x.shape
    acc = acc_dtype(x.dtype)
    gx = empty_if(x, True)
    for r0, r1 in row_chunks(R, C):
        chunk(r0, r1, acc, _factor(gout, r0, r1, acc), gx, False)
    return gx


# ---- multilabel_soft_margin_loss ---------------------------------------------------------------


def _mlsm_acc(x, t, w) -> torch.dtype:
    dt = torch.promote_types(x.dtype, t.dtype)
    return acc_dtype(dt if w is None else torch.promote_types(dt, w.dtype))


def _mlsm_chunk(x, t, w, r0, r1, acc, scale, gx, gt, want_loss: bool):
    """Row losses of rows ``r0:r1`` and (with ``scale``) their gradients written into ``gx`` / ``gt``."""
    xs = x[r0:r1].to(acc, copy=True)
    ts = t[r0:r1].to(acc)
    C = x.shape[1]
    loss = None
    if want_loss:
        soft = xs.abs().neg_().exp_().log1p_()  # log(1 + exp(-|x|))
        sp_pos = torch.relu(xs).add_(soft)  # -logsigmoid(x)
        sp_neg = torch.relu(-xs).add_(soft)  # -logsigmoid(-x)
        elem = sp_neg.mul_(ts).add_(sp_pos.mul_(1.0 - ts))
        if w is not None:
            elem.mul_(w[r0:r1].to(acc))
        loss = elem.sum(1).div_(C)
    if scale is not None:
        s = scale / C
        ws = s if w is None else w[r0:r1].to(acc) * s
        if gx is not None:
            gx[r0:r1] = torch.sigmoid(xs).sub_(ts).mul_(ws)
        if gt is not None:
            gt[r0:r1] = xs.mul_(ws).neg_()
    return loss


def mlsm_fwd(x, t, w, coef, fuse_x: bool, fuse_t: bool):
    """Per-row multilabel soft-margin loss of ``(R, C)`` logits.

    Args:
        x: logits ``(R, C)``.
        t: targets ``(R, C)`` (any strides, broadcast views included; any real dtype).
        w: class weights viewed as ``(R, C)``, or None.
        coef: ``(1,)`` scale of the fused gradients (``1/R`` for 'mean', 1 for 'sum').
        fuse_x: also return ``coef * d(sum of row losses)/dx`` ``(R, C)`` in ``x``'s dtype.
        fuse_t: also return the gradient w.r.t. ``t`` ``(R, C)`` in ``t``'s dtype.

    Returns:
        ``(loss (R,), grad_x or None, grad_t or None)``; the loss in fp32 (fp64 for fp64 data).
    """
    R, C = x.shape
    acc = _mlsm_acc(x, t, w)
    gx, gt = empty_if(x, fuse_x), empty_if(t, fuse_t)
    loss = torch.empty(R, dtype=acc, device=x.device)
    for r0, r1 in row_chunks(R, C):
        scale = _factor(coef, r0, r1, acc) if fuse_x or fuse_t else None
        loss[r0:r1] = _mlsm_chunk(x, t, w, r0, r1, acc, scale, gx, gt, True)
    return loss, gx, gt


def mlsm_bwd(x, t, w, gout, need_x: bool, need_t: bool):
    """Gradients of ``sum(gout * row_loss)`` w.r.t. ``x`` and ``t`` (``(R, C)`` each, or None)."""
    R, C = x.shape
    acc = _mlsm_acc(x, t, w)
    gx, gt = empty_if(x, need_x), empty_if(t, need_t)
    for r0, r1 in row_chunks(R, C):
        _mlsm_chunk(x, t, w, r0, r1, acc, _factor(gout, r0, r1, acc), gx, gt, False)
    return gx, gt


# ---- multi_margin_loss -----------------------------------------------------------------------


def _mm_chunk(x, y, w, p: int, margin: float, r0, r1, acc, scale, gx, want_loss: bool):
    """Row losses of rows ``r0:r1`` (``sum_j w[y] max(0, margin - x[y] + x[j])**p / C``, j != y)."""
    xs = x[r0:r1].to(acc, copy=True)
    ys = y[r0:r1].reshape(-1, 1)
    C = x.shape[1]
    z = xs.sub_(xs.gather(1, ys).sub_(margin))  # margin - x[y] + x[j]
    keep = z > 0
    keep.scatter_(1, ys, False)
    z.masked_fill_(keep.logical_not(), 0.0)  # NaN scores add nothing, as in torch's loop (z > 0 fails)
    wy = None if w is None else w.to(acc)[ys]  # (rows, 1)
    loss = None
    if want_loss:
        loss = (z.square() if p == 2 else z).sum(1)
        if wy is not None:
            loss.mul_(wy.reshape(-1))
        loss.div_(C)
    if scale is not None:
        s = scale / C if wy is None else wy * (scale / C)
        g = z.mul_(2.0 * s) if p == 2 else keep.to(acc).mul_(s)
        g.scatter_(1, ys, -g.sum(1, keepdim=True))
        gx[r0:r1] = g
    return loss


def multi_margin_fwd(x, y, w, p: int, margin: float, coef, fuse: bool):
    """Per-row multi-class margin loss of ``(R, C)`` scores.

    Args:
        x: scores ``(R, C)``.
        y: class indices ``(R,)`` int64, each in ``[0, C)`` (checked by the caller).
        w: class weights ``(C,)``, or None.
        p: 1 or 2.
        margin: the margin.
        coef: ``(1,)`` scale of the fused gradient.
        fuse: also return ``coef * d(sum of row losses)/dx`` ``(R, C)``.

    Returns:
        ``(loss (R,), grad or None)``.
    """
    if not fuse and _torch_rows(x):
        return torch._C._nn.multi_margin_loss(x, y, p, margin, w, 0), None  # reduction 'none'
    return _rows_fwd(x, coef, fuse, functools.partial(_mm_chunk, x, y, w, p, margin))


def multi_margin_bwd(x, y, w, p: int, margin: float, gout):
    """Gradient ``(R, C)`` of ``sum(gout * row_loss)`` w.r.t. ``x``."""
    return _rows_bwd(x, gout, functools.partial(_mm_chunk, x, y, w, p, margin))


# ---- multilabel_margin_loss ------------------------------------------------------------------


def _list_lengths(y: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` length of each row's target list: the index of its first negative entry (or C)."""
    R, C = y.shape
    if C == 0:
        return torch.zeros(R, dtype=torch.long, device=y.device)
    ended = y < 0
    return torch.where(ended.any(1), ended.to(torch.uint8).argmax(1), C)  # argmax: the first maximum


def _mlm_chunk(x, y, r0, r1, acc, scale, gx, want_loss: bool):
    """Row losses of rows ``r0:r1``: ``sum_k sum_{d not a target} max(0, 1 - x[y_k] + x[d]) / C``."""
    xs = x[r0:r1].to(acc)
    rows, C = xs.shape
    n = _list_lengths(y[r0:r1])
    # the longest list of the chunk (a host read; every entry while torch.compile traces)
    L = C if torch.compiler.is_compiling() else (int(n.max()) if rows else 0)
    tk = y[r0:r1, :L]
    valid = torch.arange(L, device=x.device) < n[:, None]
    tsafe = torch.where(valid, tk, C)
    is_t = torch.zeros(rows, C + 1, dtype=torch.bool, device=x.device).scatter_(1, tsafe, True)[:, :C]
    open_cols = ~is_t
    u = torch.cat([xs, xs.new_zeros(rows, 1)], 1).gather(1, tsafe).neg_().add_(1.0)  # 1 - x[y_k]
    loss = xs.new_zeros(rows)
    cnt_cols = xs.new_zeros(rows, C) if scale is not None else None
    cnt_tgts = xs.new_zeros(rows, L) if scale is not None else None
    kb = max(1, _PAIR_ELEMS // max(1, rows * C))
    for k0 in range(0, L, kb):
        k1 = min(L, k0 + kb)
        z = u[:, k0:k1, None] + xs[:, None, :]  # (rows, kb, C)
        pos = (z > 0).logical_and_(open_cols[:, None, :]).logical_and_(valid[:, k0:k1, None])
        if want_loss:
            loss.add_(z.masked_fill_(pos.logical_not(), 0.0).sum((1, 2)))
        if scale is not None:
            pf = pos.to(acc)
            cnt_cols.add_(pf.sum(1))
            cnt_tgts[:, k0:k1] = pf.sum(2)
    if scale is not None:
        g = torch.cat([cnt_cols, cnt_cols.new_zeros(rows, 1)], 1)
        g.scatter_add_(1, tsafe, cnt_tgts.neg_())
        gx[r0:r1] = g[:, :C].mul_(scale / C)
    return loss.div_(C) if want_loss else None


def multilabel_margin_fwd(x, y, coef, fuse: bool):
    """Per-row multilabel margin loss of ``(R, C)`` scores.

    Args:
        x: scores ``(R, C)``.
        y: ``(R, C)`` int64 target lists: class indices ended by the first negative entry
            (entries in ``[-1, C)``, checked by the caller).
        coef: ``(1,)`` scale of the fused gradient.
        fuse: also return ``coef * d(sum of row losses)/dx`` ``(R, C)``.

    Returns:
        ``(loss (R,), grad or None)``.
    """
    if not fuse and _torch_rows(x):
        return torch._C._nn.multilabel_margin_loss(x, y, 0), None  # reduction 'none'
    return _rows_fwd(x, coef, fuse, functools.partial(_mlm_chunk, x, y))


def multilabel_margin_bwd(x, y, gout):
    """Gradient ``(R, C)`` of ``sum(gout * row_loss)`` w.r.t. ``x``."""
    return _rows_bwd(x, gout, functools.partial(_mlm_chunk, x, y))
