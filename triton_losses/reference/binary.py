"""Pure-PyTorch binary cross-entropy with the kernels' interface: the CPU fallback.

Same formulas as ``kernels.binary`` (see its docstring), in fp32 (fp64 for fp64 data), over
chunks of the leading dimension so no full-size fp32 intermediate is held.
"""

from __future__ import annotations

import torch

CHUNK_ELEMS = 1 << 18  # 1 MiB of fp32 per chunk: temporaries stay small, loop overhead stays negligible
GRAD_EPS = 9.999999960041972e-13  # torch's BCE backward `static const float EPSILON = 1e-12`, as fp32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunks(shape: torch.Size):
    """Slices of the leading dimension holding about CHUNK_ELEMS elements each (one for 0-d)."""
    if len(shape) == 0:
        yield ...  # a 0-d tensor: the whole of it
        return
    inner = max(1, shape[1:].numel())
    step = max(1, CHUNK_ELEMS // inner)
    for a0 in range(0, shape[0], step):
        yield slice(a0, min(shape[0], a0 + step))


def _part(t: torch.Tensor | None, sl: slice, acc: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t[sl].to(acc)


def _log_sigmoids(x: torch.Tensor):
    sp = torch.log1p(torch.exp(-x.abs()))
    zero = torch.zeros_like(x)
    return torch.minimum(x, zero) - sp, torch.minimum(-x, zero) - sp


def _loss(x, y, w, pw, logits: bool) -> torch.Tensor:
    if logits:
        ls_pos, _ = _log_sigmoids(x)
        lw = 1.0 if pw is None else (pw - 1.0) * y + 1.0
        loss = (1.0 - y) * x - lw * ls_pos
    else:
        loss = (y - 1.0) * torch.log1p(-x).clamp_min(-100.0) - y * torch.log(x).clamp_min(-100.0)
    return loss if w is None else loss * w


def elementwise_forward(x: torch.Tensor, reduce: bool, loss_of) -> torch.Tensor:
    """Chunk by chunk: partial sums (one per chunk) if ``reduce``, else the loss in ``x``'s shape and dtype.

    ``loss_of(sl)`` is the fp32 (fp64) loss of chunk ``sl`` of the leading dimension.
    """
    acc = acc_dtype(x.dtype)
    parts, out = [], None if reduce else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for sl in chunks(x.shape):
        loss = loss_of(sl)
        if reduce:
            parts.append(loss.sum().reshape(1))
        else:
            out[sl] = loss
    if reduce:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=acc, device=x.device)
    return out


def bce_fwd(x, y, w, pw, logits: bool, reduce: bool) -> torch.Tensor:
    """Partial sums (one per chunk) if ``reduce``, else the elementwise loss in ``x``'s dtype."""
    acc = acc_dtype(x.dtype)
    return elementwise_forward(
        x, reduce, lambda sl: _loss(x[sl].to(acc), y[sl].to(acc), _part(w, sl, acc), _part(pw, sl, acc), logits)
    )


def bce_bwd(x, y, w, pw, logits: bool, g: torch.Tensor, need_dx: bool, need_dy: bool):
    """``(dx, dy)`` of ``sum(g * loss)``; ``g`` is expanded to ``x``'s shape."""
    acc = acc_dtype(x.dtype)
    dx = torch.empty_like(x) if need_dx else None
    dy = torch.empty_like(y) if need_dy else None
    for sl in chunks(x.shape):
        xs, ys, gs = x[sl].to(acc), y[sl].to(acc), g[sl].to(acc)
        ws, pws = _part(w, sl, acc), _part(pw, sl, acc)
        if ws is not None:
            gs = gs * ws
        if logits:
            sig = torch.sigmoid(xs)
            if pws is None:
                d_x, d_y = sig - ys, -xs
            else:
                ls_pos, ls_neg = _log_sigmoids(xs)
                pt = pws * ys
                d_x, d_y = (pt + 1.0 - ys) * sig - pt, ls_neg - pws * ls_pos
        else:
            d_x = (xs - ys) / ((1.0 - xs) * xs).clamp_min(GRAD_EPS)
            d_y = -torch.log(xs / (1.0 - xs))
        if need_dx:
            dx[sl] = d_x * gs
        if need_dy:
            dy[sl] = d_y * gs
    return dx, dy
