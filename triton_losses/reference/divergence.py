"""Pure-PyTorch KL divergence and generalised JSD with the kernels' interface: the CPU fallback.

Same formulas as ``kernels.divergence`` (see its docstring), in fp32 (fp64 for fp64 data). The
elementwise KL works over chunks (see ``binary``); the row-wise JSD over blocks of rows of the
``(A, B, V)`` view, so no full-size fp32 intermediate is held. As the kernels do, the JSD forward
also writes the gradients of the reduced loss when asked (``FUSES_GRAD``): its terms are the
gradient, so the backward then only rescales them.

Row losses without masks. A term weighted by a probability that is exactly 0 is 0; the kernels
use ``torch.where`` for that, which on a CPU costs ten times an ``add``. Row blocks are first
computed without masks (PLAIN tier): where a row's loss comes out finite every term is finite,
so such a term is already 0 * finite = 0 and the result is exact. Rows that are not finite (a
-inf log-probability, NaN, overflow) are recomputed, block by block, with NaN terms set to 0
(ZEROED: exact when, also, no input is NaN / +inf, checked through finite row sums), and any
still not finite with the masks (MASKED), which is also what ``torch.compile`` traces. The
checks cost one host read per call (more only when a row needs another tier).
"""

from __future__ import annotations

import math

import torch

from .._checks import compiling
from .binary import CHUNK_ELEMS, acc_dtype, chunks, direct, elementwise_forward, negated, part, store
from .cross_entropy import scale_  # noqa: F401  (the fused-gradient rescale, shared with cross-entropy)

FUSES_GRAD = True  # jsd_fwd(..., need_gx / need_gy) writes the gradients of the reduced loss
JSD_MIXTURE, JSD_FORWARD_KL, JSD_REVERSE_KL = 0, 1, 2
PLAIN, ZEROED, MASKED = 0, 1, 2  # how a row block is computed (see the module doc and run_row_blocks)
# Row blocks of 512 KiB of fp32: a block's three or four temporaries still fit the 2 MiB L2, and
# the per-block host-side work (a dozen small ops) is amortised over twice CHUNK_ELEMS.
ROW_BLOCK_ELEMS = 2 * CHUNK_ELEMS
# Below the log of the smallest positive fp64 (-745): log(0) = -inf raised to it makes 0 * log(0) = 0.
_LOG_ZERO = -1000.0


def kl_fwd(x: torch.Tensor, y: torch.Tensor, log_target: bool, reduce: bool):
    """Partial sums (one per chunk) if ``reduce``, else the elementwise loss (``x``, ``y`` expanded)."""
    acc = acc_dtype(x.dtype)

    def loss_into(idx, dst):
        xs, ys = x[idx].to(acc), y[idx].to(acc)
        if log_target:  # exp(y) * (y - x)
            return torch.sub(ys, xs, out=dst).mul_(torch.exp(ys))
        # xlogy(y, y) - y * x, with xlogy as y * max(log(y), _LOG_ZERO): xlogy is not vectorised on a
        # CPU (ten times a log). The floor changes only log(0) = -inf, so 0 * log(0) = 0 as in xlogy;
        # a negative or NaN target still gives NaN, and the products are torch's, so are inf / NaN
        # (not addcmul_, whose FMA differs where y * x overflows).
        return torch.log(ys, out=dst).clamp_min_(_LOG_ZERO).mul_(ys).sub_(torch.mul(ys, xs))

    return elementwise_forward(x, reduce, loss_into)


def kl_bwd(x, y, log_target: bool, g: torch.Tensor, need_dx: bool, need_dy: bool):
    """``(dx, dy)`` of ``sum(g * loss)`` at the broadcast shape (None where not needed)."""
    acc = acc_dtype(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dy = torch.empty(x.shape, dtype=y.dtype, device=x.device) if need_dy else None
    neg_g = negated(g, acc)
    for idx in chunks(x.shape):
        xs, ys, gs = part(x, idx, acc), part(y, idx, acc), part(g, idx, acc)
        ddx, ddy = direct(dx, idx, acc), direct(dy, idx, acc)
        d_x = d_y = None
        if log_target:  # dx = -g * e^y, dy = g * e^y * (y - x) + g * e^y
            ge = torch.exp(ys).mul_(gs)
            d_x = torch.neg(ge, out=ddx) if need_dx else None
            d_y = torch.sub(ys, xs, out=ddy).mul_(ge).add_(ge) if need_dy else None
        else:  # dx = -(g * y), dy = g * (log y + y / y) - g * x (NaN at y = 0, as torch's)
            if need_dx:
                d_x = torch.mul(ys, neg_g, out=ddx) if neg_g is not None else torch.mul(gs, ys, out=ddx).neg_()
            if need_dy:
                d_y = torch.log(ys, out=ddy).addcdiv_(ys, ys).mul_(gs).sub_(torch.mul(gs, xs))
        store(dx, idx, d_x, ddx)
        store(dy, idx, d_y, ddy)
    return dx, dy


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
    for tier in (MASKED,) if compiling() else (PLAIN, ZEROED, MASKED):
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
