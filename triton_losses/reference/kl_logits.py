"""Pure-PyTorch distillation KL from logits, with the kernels' interface: the CPU fallback.

Computes what ``kernels.kl_logits`` computes (see its docstring) with softmaxes over blocks of
rows in fp32 (fp64 for fp64 logits), so no full-size log-probability tensor is held. As the
kernel does, the forward also writes the gradients of the reduced loss when asked
(``FUSES_GRAD``): they need the same softmaxes, so the backward then only rescales them.

Each row is shifted by its maximum (0 if that is not finite) before the division by ``T``, so a
large common offset costs no precision and ``exp`` cannot overflow. With ``z`` the shifted rows,
``e = exp(z)``, ``Z = sum(e)`` and ``lse = log Z``, the passes over a block are kept few by
leaving the normalisations to per-row factors:

    loss = sum(e_t * (z_t - z_s)) / Z_t + lse_s - lse_t
    d/dz_s = (q - p) = (e_s - e_t * Z_s / Z_t) / Z_s
    d/dz_t = p * (log p - log q - loss) = (z_t - z_s - (loss - lse_s + lse_t)) * e_t / Z_t

A zero teacher probability contributes 0: the blocks run through ``divergence.run_row_blocks``'
tiers (no masks where a row's loss is finite, then NaN terms set to 0, then ``torch.where``).
"""

from __future__ import annotations

import torch

from .binary import acc_dtype
from .cross_entropy import scale_  # noqa: F401  (the fused-gradient rescale, shared with cross-entropy)
from .divergence import MASKED, ZEROED, kept, nan_to_zero_, row_scale, run_row_blocks, write_grad, zero_where

FUSES_GRAD = True  # kd_fwd(..., need_ds / need_dt) writes the gradients of the reduced loss


def _shifted(x: torch.Tensor, inv_temp: float, acc) -> torch.Tensor:
    """``(x - rowmax) * inv_temp`` in ``acc`` (a row whose max is not finite is shifted by 0)."""
    shift = x.amax(-1, keepdim=True).to(acc).nan_to_num_(0.0, 0.0, 0.0)
    z = torch.sub(x, shift)  # in acc: a lower-precision x is promoted within the op
    return z.mul_(inv_temp) if inv_temp != 1.0 else z


def _kd_masked(zs, zt, keep, need_ds: bool, need_dt: bool):
    """MASKED tier: ``(loss, lse_s, lse_t, (ds, 1), (dt, 1))`` by the kernel's formulas, 0 on dropped rows."""
    lse_s, lse_t = torch.logsumexp(zs, -1, keepdim=True), torch.logsumexp(zt, -1, keepdim=True)
    log_q, log_p = zs - lse_s, zt - lse_t
    p = torch.exp(log_p)
    loss = zero_where(p == 0, p * (log_p - log_q)).sum(-1)
    drop = None if keep is None else ~keep[..., None]
    ds = zero_where(drop, torch.exp(log_q) - p) if need_ds else None
    if need_dt:
        dt = zero_where(p == 0, p * (log_p - log_q - loss[..., None]))
        dt = zero_where(drop, dt)
    return loss, lse_s[..., 0], lse_t[..., 0], (ds, 1.0), (dt if need_dt else None, 1.0)


def _kd_terms(s, t, inv_temp: float, acc, tier: int, keep, need_ds: bool, need_dt: bool):
    """``(loss, lse_s, lse_t, (ds, fs), (dt, ft))`` of one block: ``fs * ds`` is dloss/d(s / T) (likewise t).

    PLAIN / ZEROED as in ``divergence._jsd_terms``; here a finite loss also means finite
    log-sum-exps (no NaN / +inf logit, not all -inf), which is what ZEROED needs.
    """
    zs, zt = _shifted(s, inv_temp, acc), _shifted(t, inv_temp, acc)
    if tier == MASKED:
        return _kd_masked(zs, zt, keep, need_ds, need_dt)
    d = torch.sub(zt, zs)  # log p - log q - lse_s + lse_t
    e_s, e_t = zs.exp_(), zt.exp_()
    z_s, z_t = e_s.sum(-1), e_t.sum(-1)
    lse_s, lse_t = torch.log(z_s), torch.log(z_t)
    zeroed = nan_to_zero_ if tier == ZEROED else (lambda v: v)
    terms = zeroed(torch.mul(d, e_t))  # Z_t * p * (log p - log q - lse_s + lse_t)
    loss_shifted = terms.sum(-1).div_(z_t)  # loss - lse_s + lse_t
    ds = e_s.addcmul_(e_t, (z_s / z_t)[..., None], value=-1.0) if need_ds else None
    # Subtract before multiplying, as the kernel does: d and loss may be close (a large KL).
    dt = zeroed(d.sub_(loss_shifted[..., None]).mul_(e_t)) if need_dt else None
    return loss_shifted + (lse_s - lse_t), lse_s, lse_t, (ds, 1.0 / z_s), (dt, 1.0 / z_t)


def _kd_rows(s, t, labels, inv_temp: float, ignore_index: int, stats, gscale, ds, dt) -> None:
    """Fill ``stats`` ``(3, A, B)`` and write ``gscale_r * dloss_r`` into ``ds`` / ``dt`` (each if not None)."""
    A, B, V = s.shape
    acc = acc_dtype(s.dtype)
    keep = kept(labels, ignore_index)
    scale = None if ds is None and dt is None else row_scale(gscale, A, B, acc, keep) * inv_temp

    def block(blk, tier: int, check: torch.Tensor) -> None:
        kb = None if keep is None else keep[blk]
        loss, lse_s, lse_t, (d_s, fs), (d_t, ft) = _kd_terms(
            s[blk], t[blk], inv_temp, acc, tier, kb, ds is not None, dt is not None
        )
        check[blk] = loss
        if stats is not None:
            stats[0][blk], stats[1][blk], stats[2][blk] = loss, lse_s, lse_t
        if scale is not None:
            write_grad(ds, blk, d_s, scale[blk] * fs)
            write_grad(dt, blk, d_t, scale[blk] * ft)

    run_row_blocks(A, B, V, acc, s.device, block)
    if stats is not None and keep is not None:
        stats[0].masked_fill_(~keep, 0.0)


def kd_fwd(s, t, labels, inv_temp: float, ignore_index: int, gscale, need_ds: bool, need_dt: bool):
    """``(stats, ds, dt)``: stats ``(3, A * B)`` = (loss, lse of the max-shifted rows / T); gradients if asked."""
    stats = torch.empty(3, *s.shape[:2], dtype=acc_dtype(s.dtype), device=s.device)
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_ds else None
    dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_dt else None
    _kd_rows(s, t, labels, inv_temp, ignore_index, stats, gscale, ds, dt)
    return stats.reshape(3, -1), ds, dt


def kd_bwd(s, t, labels, inv_temp: float, ignore_index: int, stats, gscale, need_ds: bool, need_dt: bool):
    """Gradients ``(ds, dt)`` of ``sum_r gscale_r * loss_r``; ``gscale`` is ``(A * B,)`` or ``(1,)``.

    ``stats`` is not read: the rows are recomputed exactly as the forward computes them (a
    log-sum-exp is one sum per row), so a recomputed gradient is bitwise the fused one.
    """
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_ds else None
    dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_dt else None
    if need_ds or need_dt:
        _kd_rows(s, t, labels, inv_temp, ignore_index, None, gscale, ds, dt)
    return ds, dt
