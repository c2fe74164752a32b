"""Pure-PyTorch KL divergence and generalised JSD with the kernels' interface: the CPU fallback.

Same formulas as ``kernels.divergence`` (see its docstring), in fp32 (fp64 for fp64 data). The
elementwise KL works over chunks of the leading dimension; the row-wise JSD over blocks of rows
of the ``(A, B, V)`` view, so no full-size fp32 intermediate is held.
"""

from __future__ import annotations

import math

import torch

from .binary import CHUNK_ELEMS, acc_dtype, chunks, elementwise_forward

FUSES_GRAD = False  # the forward never writes gradients; the backward recomputes them
JSD_MIXTURE, JSD_FORWARD_KL, JSD_REVERSE_KL = 0, 1, 2


def kl_fwd(x: torch.Tensor, y: torch.Tensor, log_target: bool, reduce: bool):
    """Partial sums (one per chunk) if ``reduce``, else the elementwise loss (``x``, ``y`` expanded)."""
    acc = acc_dtype(x.dtype)

    def loss_of(sl):
        xs, ys = x[sl].to(acc), y[sl].to(acc)
        return torch.exp(ys) * (ys - xs) if log_target else torch.xlogy(ys, ys) - ys * xs

    return elementwise_forward(x, reduce, loss_of)


def kl_bwd(x, y, log_target: bool, g: torch.Tensor, need_dx: bool, need_dy: bool):
    """``(dx, dy)`` of ``sum(g * loss)`` at the broadcast shape (None where not needed)."""
    acc = acc_dtype(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dy = torch.empty(x.shape, dtype=y.dtype, device=x.device) if need_dy else None
    for sl in chunks(x.shape):
        xs, ys, gs = x[sl].to(acc), y[sl].to(acc), g[sl].to(acc)
        if log_target:
            ge = gs * torch.exp(ys)
            d_x, d_y = -ge, ge * (ys - xs) + ge
        else:
            log_y = torch.where(ys == 0, torch.zeros_like(ys), torch.log(ys))
            d_x, d_y = -(gs * ys), gs * (log_y + ys / ys) - gs * xs
        if need_dx:
            dx[sl] = d_x
        if need_dy:
            dy[sl] = d_y
    return dx, dy


def row_blocks(A: int, B: int, V: int):
    """``(a_slice, b_slice)`` blocks of rows of an ``(A, B, V)`` view, about CHUNK_ELEMS elements each."""
    rows = max(1, CHUNK_ELEMS // max(1, V))
    if rows >= B:
        step = rows // max(1, B)
        for a0 in range(0, A, step):
            yield slice(a0, min(A, a0 + step)), slice(None)
    else:
        for a in range(A):
            for b0 in range(0, B, rows):
                yield slice(a, a + 1), slice(b0, min(B, b0 + rows))


def jsd_mode(beta: float) -> int:
    return JSD_FORWARD_KL if beta == 0.0 else (JSD_REVERSE_KL if beta == 1.0 else JSD_MIXTURE)


def _zero_where(cond: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, torch.zeros_like(v), v)


def jsd_terms(x: torch.Tensor, y: torch.Tensor, beta: float):
    """Per-element ``(loss, dloss/dx, dloss/dy)``; a term weighted by a zero probability is 0."""
    mode = jsd_mode(beta)
    if mode == JSD_MIXTURE:
        q, p = torch.exp(x), torch.exp(y)
        log_m = torch.logaddexp(y + math.log(beta), x + math.log1p(-beta))
        tp = _zero_where(p == 0, beta * p * (y - log_m))
        tq = _zero_where(q == 0, (1.0 - beta) * q * (x - log_m))
        return tp + tq, tq, tp
    if mode == JSD_FORWARD_KL:
        p = torch.exp(y)
        loss = _zero_where(p == 0, p * (y - x))
        return loss, -p, _zero_where(p == 0, loss + p)
    q = torch.exp(x)
    loss = _zero_where(q == 0, q * (x - y))
    return loss, _zero_where(q == 0, loss + q), -q


def keep_rows(labels, ignore_index: int, a_sl, b_sl, shape, device) -> torch.Tensor:
    if labels is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return (labels[a_sl, b_sl] != ignore_index).reshape(shape)


def jsd_fwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    """Per-row loss ``(A * B,)`` fp32 (fp64); the reference never fuses gradients (``(loss, None, None)``)."""
    assert not (need_gx or need_gy), "the reference path does not fuse gradients into the forward"
    A, B, V = x.shape
    acc = acc_dtype(x.dtype)
    loss = torch.empty(A, B, dtype=acc, device=x.device)
    for a_sl, b_sl in row_blocks(A, B, V):
        xs, ys = x[a_sl, b_sl].to(acc), y[a_sl, b_sl].to(acc)
        drop = ~keep_rows(labels, ignore_index, a_sl, b_sl, xs.shape[:2], x.device)
        loss[a_sl, b_sl] = _zero_where(drop, jsd_terms(xs, ys, beta)[0].sum(-1))
    return loss.reshape(-1), None, None


def jsd_bwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    """Gradients ``(gx, gy)`` of ``sum_r gscale_r * loss_r``; ``gscale`` is ``(A * B,)`` or ``(1,)``."""
    A, B, V = x.shape
    acc = acc_dtype(x.dtype)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_gx else None
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_gy else None
    scale = gscale.to(acc).reshape(-1)
    scale = scale.expand(A * B) if scale.numel() == 1 else scale
    scale = scale.reshape(A, B)
    for a_sl, b_sl in row_blocks(A, B, V):
        xs, ys = x[a_sl, b_sl].to(acc), y[a_sl, b_sl].to(acc)
        _, d_x, d_y = jsd_terms(xs, ys, beta)
        drop = ~keep_rows(labels, ignore_index, a_sl, b_sl, xs.shape[:2], x.device)[..., None]
        s = scale[a_sl, b_sl][..., None]
        if need_gx:
            gx[a_sl, b_sl] = _zero_where(drop, d_x * s)
        if need_gy:
            gy[a_sl, b_sl] = _zero_where(drop, d_y * s)
    return gx, gy
