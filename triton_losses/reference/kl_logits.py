"""Pure-PyTorch distillation KL from logits, with the kernels' interface: the CPU fallback.

Computes what ``kernels.kl_logits`` computes (see its docstring) with ``log_softmax`` over blocks
of rows in fp32 (fp64 for fp64 logits), so no full-size log-probability tensor is held.
"""

from __future__ import annotations

import torch

from .binary import acc_dtype
from .divergence import keep_rows, row_blocks

FUSES_GRAD = False  # the forward never writes gradients; the backward recomputes them


def shifted(x: torch.Tensor, inv_temp: float, acc) -> torch.Tensor:
    """``(x - x[..., :1]) * inv_temp`` in ``acc`` (a non-finite first logit shifts by 0), as the kernel does."""
    x = x.to(acc)
    ref = x[..., :1]
    ref = torch.where(ref.isfinite(), ref, torch.zeros_like(ref))
    return (x - ref) * inv_temp


def kd_fwd(s, t, labels, inv_temp: float, ignore_index: int, gscale, need_ds: bool, need_dt: bool):
    """``(stats, None, None)``: stats ``(3, A * B)`` = (loss, lse of the shifted rows / T); never fused."""
    assert not (need_ds or need_dt), "the reference path does not fuse gradients into the forward"
    A, B, V = s.shape
    acc = acc_dtype(s.dtype)
    stats = torch.empty(3, A, B, dtype=acc, device=s.device)
    for a_sl, b_sl in row_blocks(A, B, V):
        xs, xt = shifted(s[a_sl, b_sl], inv_temp, acc), shifted(t[a_sl, b_sl], inv_temp, acc)
        lse_s, lse_t = torch.logsumexp(xs, -1), torch.logsumexp(xt, -1)
        log_q, log_p = xs - lse_s[..., None], xt - lse_t[..., None]
        p = torch.exp(log_p)
        terms = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))
        keep = keep_rows(labels, ignore_index, a_sl, b_sl, xs.shape[:2], s.device)
        stats[0, a_sl, b_sl] = torch.where(keep, terms.sum(-1), torch.zeros_like(lse_s))
        stats[1, a_sl, b_sl] = lse_s
        stats[2, a_sl, b_sl] = lse_t
    return stats.reshape(3, -1), None, None


def kd_bwd(s, t, labels, inv_temp: float, ignore_index: int, stats, gscale, need_ds: bool, need_dt: bool):
    """Gradients ``(ds, dt)`` of ``sum_r gscale_r * loss_r``; ``gscale`` is ``(A * B,)`` or ``(1,)``."""
    A, B, V = s.shape
    acc = acc_dtype(s.dtype)
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_ds else None
    dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_dt else None
    st = stats.reshape(3, A, B)
    scale = gscale.to(acc).reshape(-1)
    scale = (scale.expand(A * B) if scale.numel() == 1 else scale).reshape(A, B) * inv_temp
    for a_sl, b_sl in row_blocks(A, B, V):
        xs, xt = shifted(s[a_sl, b_sl], inv_temp, acc), shifted(t[a_sl, b_sl], inv_temp, acc)
        log_q, log_p = xs - st[1, a_sl, b_sl][..., None], xt - st[2, a_sl, b_sl][..., None]
        p = torch.exp(log_p)
        drop = ~keep_rows(labels, ignore_index, a_sl, b_sl, xs.shape[:2], s.device)[..., None]
        sc = scale[a_sl, b_sl][..., None]
        if need_ds:
            g = (torch.exp(log_q) - p) * sc
            ds[a_sl, b_sl] = torch.where(drop, torch.zeros_like(g), g)
        if need_dt:
            g = p * (log_p - log_q - st[0, a_sl, b_sl][..., None])
            g = torch.where(p == 0, torch.zeros_like(g), g) * sc
            dt[a_sl, b_sl] = torch.where(drop, torch.zeros_like(g), g)
    return ds, dt
