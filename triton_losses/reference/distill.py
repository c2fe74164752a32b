"""Pure-PyTorch distillation losses (``jsd``, ``kl_div_with_logits``) with the kernels' interface.

The CPU fallback of ``kernels.distill``: the same formulas (see its docstring), in fp32 (fp64 for
fp64 data), over blocks of rows of the ``(A, B, V)`` views, so no full-size fp32 intermediate is
held. As the kernels do, the forwards also write the gradients of the reduced loss when asked
(``FUSES_GRAD``): the JSD's terms are its gradient, and the distillation KL's gradients need the
same softmaxes, so the backward then only rescales them (``scale_``).

Row losses without masks. A term weighted by a probability that is exactly 0 is 0; the kernels
use ``torch.where`` for that, which on a CPU costs ten times an ``add``. Row blocks are first
computed without masks (PLAIN tier): where a row's loss comes out finite every term is finite,
so such a term is already 0 * finite = 0 and the result is exact. Rows that are not finite (a
-inf log-probability, NaN, overflow) are recomputed, block by block, with NaN terms set to 0
(ZEROED: exact when, also, no input is NaN / +inf, checked through finite row sums), and any
still not finite with the masks (MASKED), which is also what ``torch.compile`` traces. The
checks cost one host read per call (more only when a row needs another tier).

Distillation KL: each row is shifted by its maximum (0 if that is not finite) before the division
by ``T``, so a large common offset costs no precision and ``exp`` cannot overflow. With ``z`` the
shifted rows, ``e = exp(z)``, ``Z = sum(e)`` and ``lse = log Z``, the passes over a block are kept
few by leaving the normalisations to per-row factors::

    loss = sum(e_t * (z_t - z_s)) / Z_t + lse_s - lse_t
    d/dz_s = (q - p) = (e_s - e_t * Z_s / Z_t) / Z_s
    d/dz_t = p * (log p - log q - loss) = (z_t - z_s - (loss - lse_s + lse_t)) * e_t / Z_t
"""

from __future__ import annotations

import math

import torch

from .._precision import acc_dtype
from . import _chunks
from ._chunks import direct, part, store
from .cross_entropy import scale_  # noqa: F401  (the fused-gradient rescale, shared with cross-entropy)

FUSES_GRAD = True  # jsd_fwd / kd_fwd(..., need_g*) write the gradients of the reduced loss
JSD_MIXTURE, JSD_FORWARD_KL, JSD_REVERSE_KL = 0, 1, 2
PLAIN, ZEROED, MASKED = 0, 1, 2  # how a row block is computed (see the module doc and run_row_blocks)
# Row blocks of 512 KiB of fp32: a block's three or four temporaries still fit the 2 MiB L2, and
# the per-block host-side work (a dozen small ops) is amortised over twice CHUNK_ELEMS.
ROW_BLOCK_ELEMS = 2 * _chunks.CHUNK_ELEMS


def _tracing() -> bool:
    """Dynamo tracing or CUDA-graph capture: no host reads, so every block takes the MASKED tier."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def row_blocks(A: int, B: int, V: int):
    """``(a_slice, b_slice)`` blocks of rows of an ``(A, B, V)`` view, about ROW_BLOCK_ELEMS elements each."""
    rows = max(1, ROW_BLOCK_ELEMS // max(1, V))
    if rows >= B:
        step = rows // max(1, B)
        for a0 in range(0, A, step):
            yield slice(a0, min(A, a0 + step)), slice(None)
    else:
        for a in range(A):
            for b0 in range(0, B, rows):
                yield slice(a, a + 1), slice(b0, min(B, b0 + rows))


def run_row_blocks(A: int, B: int, V: int, acc: torch.dtype, device, block) -> None:
    """Run ``block(blk, tier, check)`` on every row block, then redo each block that has a row whose ``check``
    is not finite with the next tier (PLAIN, then ZEROED, then MASKED); under ``torch.compile`` MASKED only.

    ``block`` writes ``check[blk]``, the per-row values whose finiteness makes its (non-MASKED) tier exact.
    """
    check = torch.empty(A, B, dtype=acc, device=device)
    todo = list(row_blocks(A, B, V))
    for tier in (MASKED,) if _tracing() else (PLAIN, ZEROED, MASKED):
        for blk in todo:
            block(blk, tier, check)
        if tier == MASKED:
            return
        bad = ~torch.isfinite(check)
        if not bool(bad.any()):  # the one host read of a call whose rows are all finite
            return
        todo = [blk for blk in todo if bool(bad[blk].any())]


def jsd_mode(beta: float) -> int:
    return JSD_FORWARD_KL if beta == 0.0 else (JSD_REVERSE_KL if beta == 1.0 else JSD_MIXTURE)


def zero_where(cond: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    return v if cond is None else torch.where(cond, torch.zeros_like(v), v)


def nan_to_zero_(t: torch.Tensor) -> torch.Tensor:
    """NaN -> 0 in place, infinities kept: the ``0 * inf`` / ``0 * NaN`` of a zero probability (ZEROED tier)."""
    return t.nan_to_num_(0.0, math.inf, -math.inf)


def _jsd_masked(x: torch.Tensor, y: torch.Tensor, beta: float, mode: int, keep):
    """MASKED tier: ``(row loss, None, (dloss/dx, 1), (dloss/dy, 1))`` by the kernel's formulas, 0 on dropped rows."""
    if mode == JSD_MIXTURE:
        q, p = torch.exp(x), torch.exp(y)
        log_m = torch.logaddexp(y + math.log(beta), x + math.log1p(-beta))
        tp = zero_where(p == 0, beta * p * (y - log_m))
        tq = zero_where(q == 0, (1.0 - beta) * q * (x - log_m))
        loss, d_x, d_y = tp + tq, tq, tp
    elif mode == JSD_FORWARD_KL:
        p = torch.exp(y)
        loss = zero_where(p == 0, p * (y - x))
        d_x, d_y = -p, zero_where(p == 0, loss + p)
    else:
        q = torch.exp(x)
        loss = zero_where(q == 0, q * (x - y))
        d_x, d_y = zero_where(q == 0, loss + q), -q
    drop = None if keep is None else ~keep[..., None]
    return loss.sum(-1), None, (zero_where(drop, d_x), 1.0), (zero_where(drop, d_y), 1.0)


def _jsd_terms(x: torch.Tensor, y: torch.Tensor, beta: float, mode: int, tier: int, keep, need_dy: bool):
    """``(row loss, check, (dx, fx), (dy, fy))`` of one block: ``fx * dx`` is dloss/dx (likewise y).

    PLAIN: no masks; exact where the loss is finite (then every term is, so a zero probability's
    term is 0 * finite = 0). ZEROED: NaN terms (a zero probability times an infinite log ratio)
    set to 0; exact where, also, the probabilities' row sums are finite (no NaN / +inf input).
    """
    if tier == MASKED:
        return _jsd_masked(x, y, beta, mode, keep)
    zeroed = nan_to_zero_ if tier == ZEROED else (lambda t: t)
    if mode == JSD_MIXTURE:
        q, p = torch.exp(x), torch.exp(y)
        log_m = torch.lerp(q, p, beta).log_()  # log(beta * P + (1 - beta) * Q)
        tq = zeroed(torch.sub(x, log_m).mul_(q))
        tp = zeroed(torch.sub(y, log_m, out=log_m).mul_(p))
        loss = tq.sum(-1).mul_(1.0 - beta).add_(tp.sum(-1), alpha=beta)
        check = loss if tier == PLAIN else loss + q.sum(-1) + p.sum(-1)
        return loss, check, (tq, 1.0 - beta), (tp, beta)
    # One KL: KL(P || Q) (beta = 0: a = y, b = x) or KL(Q || P) (beta = 1: a = x, b = y), with
    # terms e^a * (a - b), d/da = term + e^a and d/db = -e^a.
    a, b = (y, x) if mode == JSD_FORWARD_KL else (x, y)
    pa = torch.exp(a)
    t = zeroed(torch.sub(a, b).mul_(pa))
    loss = t.sum(-1)
    check = loss
    if tier == ZEROED:
        check = (loss + pa.sum(-1)).masked_fill_(b.sum(-1).isnan(), math.nan)
    da = (t.add_(pa) if mode == JSD_REVERSE_KL or need_dy else None, 1.0)
    db = (pa, -1.0)
    return (loss, check, db, da) if mode == JSD_FORWARD_KL else (loss, check, da, db)


def row_scale(gscale: torch.Tensor, A: int, B: int, acc: torch.dtype, keep) -> torch.Tensor:
    """The ``(A * B,)`` or ``(1,)`` gradient scale as ``(A, B)`` in ``acc``, 0 on the rows ``keep`` drops.

    A select, not a product: the scale is inf when no row is kept ('batchmean' of nothing).
    """
    scale = gscale.to(acc).reshape(-1)
    scale = (scale.expand(A * B) if scale.numel() == 1 else scale).reshape(A, B)
    return scale if keep is None else torch.where(keep, scale, 0.0)


def kept(labels, ignore_index: int):
    """``(A, B)`` bool of the rows that count, or None when every row does."""
    return None if labels is None else labels != ignore_index


def write_grad(out: torch.Tensor | None, blk, d: torch.Tensor, coef) -> None:
    """``out[blk] = d * coef`` (``coef`` per row), computed straight into ``out`` when it is in ``d``'s dtype."""
    if out is not None:
        dst = direct(out, blk, d.dtype)
        store(out, blk, torch.mul(d, coef[..., None], out=dst), dst)


def _jsd_rows(x, y, labels, beta: float, ignore_index: int, loss, gscale, gx, gy) -> None:
    """Per-row loss into ``loss`` ``(A, B)`` and ``gscale_r * dloss_r`` into ``gx`` / ``gy``, each if not None."""
    A, B, V = x.shape
    acc = acc_dtype(x.dtype)
    mode = jsd_mode(beta)
    keep = kept(labels, ignore_index)
    scale = None if gx is None and gy is None else row_scale(gscale, A, B, acc, keep)

    def block(blk, tier: int, check: torch.Tensor) -> None:
        row_loss, chk, (d_x, fx), (d_y, fy) = _jsd_terms(
            part(x, blk, acc), part(y, blk, acc), beta, mode, tier, None if keep is None else keep[blk], gy is not None
        )
        if chk is not None:
            check[blk] = chk
        if loss is not None:
            loss[blk] = row_loss
        if scale is not None:
            write_grad(gx, blk, d_x, scale[blk] * fx)
            write_grad(gy, blk, d_y, scale[blk] * fy)

    run_row_blocks(A, B, V, acc, x.device, block)
    if loss is not None and keep is not None:
        loss.masked_fill_(~keep, 0.0)


def jsd_fwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    """Per-row loss ``(A * B,)`` fp32 (fp64); with ``need_g*`` also the gradients of ``sum_r gscale * loss_r``."""
    loss = torch.empty(x.shape[:2], dtype=acc_dtype(x.dtype), device=x.device)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_gx else None
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_gy else None
    _jsd_rows(x, y, labels, beta, ignore_index, loss, gscale, gx, gy)
    return loss.reshape(-1), gx, gy


def jsd_bwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    """Gradients ``(gx, gy)`` of ``sum_r gscale_r * loss_r``; ``gscale`` is ``(A * B,)`` or ``(1,)``."""
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_gx else None
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_gy else None
    if need_gx or need_gy:
        _jsd_rows(x, y, labels, beta, ignore_index, None, gscale, gx, gy)
    return gx, gy


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

    PLAIN / ZEROED as in ``_jsd_terms``; here a finite loss also means finite
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
