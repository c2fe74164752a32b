"""Online-softmax cross-entropy / NLL kernels and their launchers.

One forward kernel and one backward kernel serve every option through ``tl.constexpr`` flags:
index or probability targets, log-probability input (NLL), class weights, label smoothing,
z-loss and softcap. The forward reads each row once (running max and sum-exp over column
blocks) and writes per-row ``loss`` and ``lse``; with ``WRITE_GRAD`` it then writes the row's
gradient while the row is still in cache, so the backward only has to scale it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import CESpec
from ._common import launch_config, row_block, row_offsets, tanh

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _softcap(x, cap, mask, HAS_SOFTCAP: tl.constexpr):
    """``cap * tanh(x / cap)`` on live lanes; masked lanes stay ``-inf``."""
    if HAS_SOFTCAP:
        x = tl.where(mask, cap * tanh(x / cap), _NEG_INF)
    return x


@triton.jit
def _ce_grad_pass(
    x_ptr, xoff, s_xc,  # logits rows: base offsets (BLOCK_R,), class stride
    t_ptr, toff, s_tc,  # probability targets (PROB_TARGET) rows
    w_ptr,  # class weights (C,)
    g_ptr, goff, s_gc,  # gradient rows to write
    dt_ptr, dtoff, s_dtc,  # target gradient rows to write (WRITE_TGRAD)
    rmask, tgt, lse, a_coef, own, rscale,  # per-row (BLOCK_R,) values
    C, smoothing, softcap,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_TGRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Write ``rscale * dloss/dx`` (and ``dloss/dtarget``) for a block of rows, one column block at a time."""
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        cols64 = cols.to(tl.int64)
        if LOGP_INPUT:
            d = tl.where(cols64[None, :] == tgt[:, None], -own[:, None], 0.0)
        else:
            x = tl.load(x_ptr + xoff[:, None] + cols64[None, :] * s_xc, mask=mask, other=0.0).to(ACC)
            x = _softcap(x, softcap, mask, HAS_SOFTCAP)
            d = tl.exp(x - lse[:, None]) * a_coef[:, None]
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols64, mask=cmask, other=0.0).to(ACC)
            if PROB_TARGET:
                t = tl.load(t_ptr + toff[:, None] + cols64[None, :] * s_tc, mask=mask, other=0.0)
                t = t.to(ACC)
                if HAS_SMOOTHING:
                    t = t * (1.0 - smoothing) + smoothing / C
                if HAS_WEIGHT:
                    d -= w[None, :] * t
                else:
                    d -= t
                if WRITE_TGRAD:
                    dt = (lse[:, None] - x) * (1.0 - smoothing) * rscale[:, None]
                    if HAS_WEIGHT:
                        dt = dt * w[None, :]
                    dst = dt_ptr + dtoff[:, None] + cols64[None, :] * s_dtc
                    tl.store(dst, dt.to(dt_ptr.dtype.element_ty), mask=mask)
            else:
                d -= tl.where(cols64[None, :] == tgt[:, None], own[:, None], 0.0)
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        d -= (smoothing / C) * w[None, :]
                    else:
                        d -= smoothing / C
            if HAS_SOFTCAP:
                y = x / softcap
                d = d * (1.0 - y * y)
        d = d * rscale[:, None]
        tl.store(g_ptr + goff[:, None] + cols64[None, :] * s_gc, d.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_row_coefs(tgt, lse, w_t, wsum, C, smoothing, z_loss,
                  PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr,
                  S1):  # fmt: skip
    """Per-row gradient coefficients: ``d = p * a_coef - own * onehot - (smoothing terms)``."""
    if PROB_TARGET:
        a_coef = S1
        own = tl.zeros_like(lse)
    else:
        own = w_t
        if HAS_SMOOTHING:
            own = (1.0 - smoothing) * w_t
            a_coef = own + smoothing * wsum / C
        else:
            a_coef = w_t
    if HAS_Z:
        if PROB_TARGET:
            a_coef += 2.0 * z_loss * lse
        else:
            a_coef += 2.0 * z_loss * w_t * lse
    return a_coef, own


@triton.jit
def _weight_sum(wsum_ptr, C, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Sum of the class weights (C without weights)."""
    if HAS_WEIGHT:
        wsum = tl.load(wsum_ptr).to(ACC)
    else:
        wsum = C * 1.0
    return wsum


@triton.jit
def _index_targets(t_ptr, toff, w_ptr, rmask, C, ignore_index, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Index targets of a block of rows: ``(target, ignored, in_range, clamped, class_weight)``.

    The clamped index is the one loads use, so an out-of-range target never reads out of bounds.
    """
    tgt = tl.load(t_ptr + toff, mask=rmask, other=0).to(tl.int64)
    ignored = tgt == ignore_index
    inb = (tgt >= 0) & (tgt < C)
    tsafe = tl.where(inb, tgt, 0)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + tsafe, mask=rmask & inb, other=0.0).to(ACC)
    else:
        w_t = tl.where(inb, 1.0, 1.0).to(ACC)
    return tgt, ignored, inb, tsafe, w_t


@triton.jit
def _ce_fwd_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # logits (A, C, B)
    t_ptr, s_ta, s_tc, s_tb,  # targets: index (A, B) or probabilities (A, C, B)
    w_ptr, wsum_ptr,  # class weights (C,) and their sum (1,)
    loss_ptr, lse_ptr,  # per-row outputs (R,) fp32 (fp64 for fp64 logits)
    g_ptr, s_ga, s_gc, s_gb,  # fused gradient (A, C, B), written when WRITE_GRAD
    coef_ptr,  # (1,) fp32 scale of the fused gradient (1/denominator for 'mean', 1 for 'sum')
    R, C, B, ignore_index, smoothing, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per-row cross-entropy (or NLL) loss and log-sum-exp for ``BLOCK_R`` rows, optionally the gradient."""
    rows, rmask = row_block(R, BLOCK_R)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    toff = row_offsets(rows, B, s_ta, s_tb)
    wsum = _weight_sum(wsum_ptr, C, HAS_WEIGHT, ACC)
    tgt = tl.zeros([BLOCK_R], tl.int64) - 1
    w_t = tl.zeros([BLOCK_R], ACC) + 1.0
    x_t = tl.zeros([BLOCK_R], ACC)
    ignored = rmask & False
    inb = rmask | True
    if not PROB_TARGET:
        tgt, ignored, inb, tsafe, w_t = _index_targets(t_ptr, toff, w_ptr, rmask, C, ignore_index, HAS_WEIGHT, ACC)
        x_t = tl.load(x_ptr + xoff + tsafe * s_xc, mask=rmask & inb, other=0.0).to(ACC)
        x_t = _softcap(x_t, softcap, rmask | True, HAS_SOFTCAP)
    m = tl.full([BLOCK_R], _NEG_INF, ACC)
    s = tl.zeros([BLOCK_R], ACC)
    swx = tl.zeros([BLOCK_R], ACC)  # sum_c w_c * x_c (label smoothing)
    swt = tl.zeros([BLOCK_R], ACC)  # sum_c w_c * t_c (probability targets)
    swtx = tl.zeros([BLOCK_R], ACC)  # sum_c w_c * t_c * x_c (probability targets)
    if not LOGP_INPUT:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            mask = rmask[:, None] & cmask[None, :]
            cols64 = cols.to(tl.int64)
            x = tl.load(x_ptr + xoff[:, None] + cols64[None, :] * s_xc, mask=mask, other=_NEG_INF)
            x = _softcap(x.to(ACC), softcap, mask, HAS_SOFTCAP)
            m_new = tl.maximum(m, tl.max(x, 1))
            shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
            m = m_new
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols64, mask=cmask, other=0.0).to(ACC)[None, :]
            else:
                w = 1.0
            if HAS_SMOOTHING:
                swx += tl.sum(tl.where(mask, w * x, 0.0), 1)
            if PROB_TARGET:
                t = tl.load(t_ptr + toff[:, None] + cols64[None, :] * s_tc, mask=mask, other=0.0)
                wt = w * t.to(ACC)
                swt += tl.sum(wt, 1)
                swtx += tl.sum(tl.where(mask, wt * x, 0.0), 1)
        lse = m + tl.log(s)
    else:
        lse = tl.zeros([BLOCK_R], ACC)

    S1 = swt
    if PROB_TARGET:
        S2 = swtx
        if HAS_SMOOTHING:
            S1 = (1.0 - smoothing) * swt + smoothing * wsum / C
            S2 = (1.0 - smoothing) * swtx + smoothing * swx / C
        loss = lse * S1 - S2
        if HAS_Z:
            loss += z_loss * lse * lse
    else:
        if LOGP_INPUT:
            loss = -w_t * x_t
        else:
            loss = w_t * (lse - x_t)
            if HAS_SMOOTHING:
                loss = (1.0 - smoothing) * loss + smoothing / C * (wsum * lse - swx)
            if HAS_Z:
                loss += z_loss * w_t * lse * lse
        loss = tl.where(ignored, 0.0, tl.where(inb, loss, float("nan")))
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=rmask)
    tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=rmask)

    if WRITE_GRAD:
        coef = tl.load(coef_ptr).to(ACC)
        rscale = tl.where(ignored, 0.0, tl.where(inb, coef, float("nan")))
        a_coef, own = _ce_row_coefs(tgt, lse, w_t, wsum, C, smoothing, z_loss,
                                    PROB_TARGET, HAS_SMOOTHING, HAS_Z, S1)  # fmt: skip
        goff = row_offsets(rows, B, s_ga, s_gb)
        _ce_grad_pass(x_ptr, xoff, s_xc, t_ptr, toff, s_tc, w_ptr, g_ptr, goff, s_gc,
                      g_ptr, goff, s_gc, rmask, tgt, lse, a_coef, own, rscale, C, smoothing, softcap,
                      HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP, False,
                      BLOCK_C, ACC)  # fmt: skip


@triton.jit
def _ce_bwd_kernel(
    x_ptr, s_xa, s_xc, s_xb,  # logits (A, C, B)
    t_ptr, s_ta, s_tc, s_tb,  # targets: index (A, B) or probabilities (A, C, B)
    w_ptr, wsum_ptr,  # class weights (C,) and their sum (1,)
    lse_ptr,  # saved per-row log-sum-exp (R,) fp32 (fp64 for fp64 logits)
    gout_ptr, s_gout,  # upstream gradient: per row (stride 1) or one scalar (stride 0)
    coef_ptr,  # (1,) fp32 extra scale (1/denominator for 'mean')
    g_ptr, s_ga, s_gc, s_gb,  # gradient w.r.t. the logits (A, C, B)
    dt_ptr, s_da, s_dc, s_db,  # gradient w.r.t. probability targets (A, C, B), when WRITE_TGRAD
    R, C, B, ignore_index, smoothing, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, LOGP_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WRITE_TGRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Gradient of the per-row loss for ``BLOCK_R`` rows from the saved log-sum-exp."""
    rows, rmask = row_block(R, BLOCK_R)
    xoff = row_offsets(rows, B, s_xa, s_xb)
    toff = row_offsets(rows, B, s_ta, s_tb)
    wsum = _weight_sum(wsum_ptr, C, HAS_WEIGHT, ACC)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(ACC)
    coef = tl.load(coef_ptr).to(ACC) * tl.load(gout_ptr + rows * s_gout, mask=rmask, other=0.0).to(ACC)
    tgt = tl.zeros([BLOCK_R], tl.int64) - 1
    w_t = tl.zeros([BLOCK_R], ACC) + 1.0
    S1 = tl.zeros([BLOCK_R], ACC)
    if PROB_TARGET:
        rscale = coef
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            mask = rmask[:, None] & cmask[None, :]
            cols64 = cols.to(tl.int64)
            t = tl.load(t_ptr + toff[:, None] + cols64[None, :] * s_tc, mask=mask, other=0.0).to(ACC)
            if HAS_WEIGHT:
                t = t * tl.load(w_ptr + cols64, mask=cmask, other=0.0).to(ACC)[None, :]
            S1 += tl.sum(t, 1)
        if HAS_SMOOTHING:
            S1 = (1.0 - smoothing) * S1 + smoothing * wsum / C
    else:
        tgt, ignored, inb, _, w_t = _index_targets(t_ptr, toff, w_ptr, rmask, C, ignore_index, HAS_WEIGHT, ACC)
        rscale = tl.where(ignored, 0.0, tl.where(inb, coef, float("nan")))
    a_coef, own = _ce_row_coefs(tgt, lse, w_t, wsum, C, smoothing, z_loss,
                                PROB_TARGET, HAS_SMOOTHING, HAS_Z, S1)  # fmt: skip
    goff = row_offsets(rows, B, s_ga, s_gb)
    dtoff = row_offsets(rows, B, s_da, s_db)
    _ce_grad_pass(x_ptr, xoff, s_xc, t_ptr, toff, s_tc, w_ptr, g_ptr, goff, s_gc,
                  dt_ptr, dtoff, s_dc, rmask, tgt, lse, a_coef, own, rscale, C, smoothing, softcap,
                  HAS_WEIGHT, PROB_TARGET, LOGP_INPUT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TGRAD,
                  BLOCK_C, ACC)  # fmt: skip


@triton.jit
def _scale_kernel(g_ptr, factor_ptr, n, BLOCK: tl.constexpr):
    """``g *= factor`` in place over ``n`` contiguous elements; returns at once when factor == 1."""
    f = tl.load(factor_ptr)
    if f != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        tl.store(g_ptr + offs, (g.to(f.dtype) * f).to(g_ptr.dtype.element_ty), mask=mask)


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _flags(spec: CESpec) -> dict:
    return dict(
        HAS_WEIGHT=spec.weight is not None,
        PROB_TARGET=spec.prob_target,
        LOGP_INPUT=spec.logp_input,
        HAS_SMOOTHING=spec.smoothing > 0.0,
        HAS_Z=spec.z_loss != 0.0,
        HAS_SOFTCAP=spec.softcap is not None,
    )


def _target_strides(t: torch.Tensor, prob: bool) -> tuple[int, int, int]:
    if prob:
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), 0, t.stride(1)


def _weight_args(spec: CESpec, x: torch.Tensor):
    if spec.weight is None:
        return x, x
    return spec.weight, spec.weight_sum


def ce_fwd(x: torch.Tensor, t: torch.Tensor, spec: CESpec, coef: torch.Tensor, grad: torch.Tensor | None):
    """Launch the forward kernel.

    Args:
        x: logits viewed as ``(A, C, B)``.
        t: index targets ``(A, B)`` or probability targets ``(A, C, B)``.
        spec: the loss options.
        coef: ``(1,)`` fp32 scale for the fused gradient.
        grad: ``(A, C, B)`` buffer for the fused gradient, or None to skip it.

    Returns:
        ``(loss, lse)``, each ``(A * B,)`` fp32 (fp64 for fp64 logits).
    """
    A, C, B = x.shape
    R = A * B
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = torch.empty(R, device=x.device, dtype=acc)
    lse = torch.empty(R, device=x.device, dtype=acc)
    if R == 0:
        return loss, lse
    block_r, block_c, warps = launch_config(C, x.element_size(), x.stride(1) == 1 or B == 1)
    w, wsum = _weight_args(spec, x)
    g = grad if grad is not None else x
    _ce_fwd_kernel[(triton.cdiv(R, block_r),)](
        x, x.stride(0), x.stride(1), x.stride(2),
        t, *_target_strides(t, spec.prob_target),
        w, wsum, loss, lse,
        g, g.stride(0), g.stride(1), g.stride(2), coef,
        R, C, B, spec.ignore_index, spec.smoothing, spec.z_loss, spec.softcap or 1.0,
        WRITE_GRAD=grad is not None, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc_dtype(x.dtype),
        num_warps=warps, **_flags(spec),
    )  # fmt: skip
    return loss, lse


def ce_bwd(
    x: torch.Tensor,
    t: torch.Tensor,
    spec: CESpec,
    lse: torch.Tensor,
    gout: torch.Tensor,
    coef: torch.Tensor,
    grad: torch.Tensor,
    tgrad: torch.Tensor | None,
) -> None:
    """Launch the backward kernel: ``grad`` (and ``tgrad``) ``(A, C, B)`` are written in place.

    ``gout`` is ``(A * B,)`` (reduction 'none') or a one-element tensor broadcast to every row.
    """
    A, C, B = x.shape
    R = A * B
    if R == 0 or C == 0:
        return
    block_r, block_c, warps = launch_config(C, x.element_size(), x.stride(1) == 1 or B == 1)
    w, wsum = _weight_args(spec, x)
    dt = tgrad if tgrad is not None else grad
    _ce_bwd_kernel[(triton.cdiv(R, block_r),)](
        x, x.stride(0), x.stride(1), x.stride(2),
        t, *_target_strides(t, spec.prob_target),
        w, wsum, lse, gout, 1 if gout.numel() == R and R > 1 else 0, coef,
        grad, grad.stride(0), grad.stride(1), grad.stride(2),
        dt, dt.stride(0), dt.stride(1), dt.stride(2),
        R, C, B, spec.ignore_index, spec.smoothing, spec.z_loss, spec.softcap or 1.0,
        WRITE_TGRAD=tgrad is not None, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc_dtype(x.dtype),
        num_warps=warps, **_flags(spec),
    )  # fmt: skip


_SCALE_BLOCK = 4096


def scale_(g: torch.Tensor, factor: torch.Tensor) -> None:
    """``g *= factor`` in place for a dense ``g``; a device-side no-op when ``factor == 1``."""
    factor = factor.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
    n = g.numel()
    if n:
        _scale_kernel[(triton.cdiv(n, _SCALE_BLOCK),)](g, factor, n, BLOCK=_SCALE_BLOCK, num_warps=8)


def aot_cases():
    """Every specialisation the launchers above can produce (see ``tests/test_aot_compile.py``).

    All flag combinations at the most common configuration (bf16 logits, rows of an LM vocabulary
    in column blocks), then every reachable block configuration of every dtype with the plain flags.
    """
    from itertools import product

    from ._common import TL_NAMES, AotCase, launch_config, reachable_configs

    def ptrs(x: str, t: str):
        return dict(x_ptr=x, t_ptr=t, w_ptr="fp32", wsum_ptr="fp32", loss_ptr="fp32", lse_ptr="fp32",
                    g_ptr=x, coef_ptr="fp32", gout_ptr="fp32", dt_ptr=t)  # fmt: skip

    floats = ("smoothing", "z_loss", "softcap")
    block_r, block_c, lm_warps = launch_config(128256, 2, True)
    tile = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl.float32)
    for prob, logp, weight, smooth, z, cap in product((False, True), repeat=6):
        if logp and (prob or smooth or z or cap):
            continue
        flags = dict(HAS_WEIGHT=weight, PROB_TARGET=prob, LOGP_INPUT=logp,
                     HAS_SMOOTHING=smooth, HAS_Z=z, HAS_SOFTCAP=cap, **tile)  # fmt: skip
        p = ptrs("bf16", "bf16" if prob else "i64")
        for write in (False, True) if not logp else (False,):
            yield AotCase(_ce_fwd_kernel, p, dict(flags, WRITE_GRAD=write), lm_warps, floats)
        for tgrad in (False, True) if prob else (False,):
            yield AotCase(_ce_bwd_kernel, p, dict(flags, WRITE_TGRAD=tgrad), lm_warps, floats)
    plain = dict(HAS_WEIGHT=False, PROB_TARGET=False, LOGP_INPUT=False,
                 HAS_SMOOTHING=False, HAS_Z=False, HAS_SOFTCAP=False)  # fmt: skip
    for dtype, name in TL_NAMES.items():
        acc = tl.float64 if name == "fp64" else tl.float32
        p = ptrs(name, "i64")
        p.update(loss_ptr="fp64", lse_ptr="fp64") if name == "fp64" else None
        for block_r, block_c, warps in sorted({c[:3] for c in reachable_configs(getattr(torch, dtype).itemsize)}):
            flags = dict(plain, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc)
            yield AotCase(_ce_fwd_kernel, p, dict(flags, WRITE_GRAD=True), warps, floats)
            yield AotCase(_ce_bwd_kernel, p, dict(flags, WRITE_TGRAD=False), warps, floats)
    for dtype in ("bf16", "fp32"):
        yield AotCase(_scale_kernel, dict(g_ptr=dtype, factor_ptr="fp32"), dict(BLOCK=_SCALE_BLOCK), 8)
