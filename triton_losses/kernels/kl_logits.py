"""Distillation KL straight from two rows of logits, with both softmaxes computed inside the kernel.

Per row, with ``s = student / T`` and ``t = teacher / T``, ``p = softmax(t)``, ``q = softmax(s)``::

    loss = sum_v p_v * (log p_v - log q_v) = E_p[t - s] - lse(t) + lse(s)

One online pass over the vocabulary keeps, for each of the two rows, the running maximum ``m``
and sum of exponentials ``z = sum_v exp(x_v - m)``, plus ``D = sum_v exp(t_v - m_t) * ((t_v - m_t)
- (s_v - m_s))``, rebased whenever a maximum grows; no log-probability row is ever written. Then
``loss = D / z_t - log z_t + log z_s`` (the maxima cancel), and the gradient pass computes
``log q = (s - m_s) - log z_s`` as torch's ``log_softmax`` does. The maxima are those of the raw
logits, whose differences are taken before the ``1 / T`` scaling, so neither a large common offset
nor a huge negative logit anywhere in the row costs precision. Gradients::

    d loss / d student = (q - p) / T
    d loss / d teacher = p * (log p - log q - loss) / T

The same kernel writes them in a second pass, right after the statistics (fused into the
forward) or from saved statistics (backward, ``STATS_KNOWN``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import kept_rows, launch_config, row_block, row_offsets
from .cross_entropy import scale_  # noqa: F401  (the fused-gradient rescale, shared with cross-entropy)
from .divergence import launch_rows, row_configs

_NEG_INF = tl.constexpr(float("-inf"))
FUSES_GRAD = True


@triton.jit
def _kd_kernel(
    s_ptr, s_sa, s_sb, s_sv,  # student logits (A, B, V)
    t_ptr, s_ta, s_tb, s_tv,  # teacher logits (A, B, V)
    lab_ptr, s_la, s_lb,  # labels (A, B), when HAS_LABELS
    prm_ptr,  # (1,) ACC: 1 / temperature
    stat_ptr,  # (5, R) ACC: per-row loss, then the raw max c and log sum exp((x - c) / T) of student, teacher
    gs_ptr, s_gs,  # gradient scale per row: (R,) with stride 1, or one value with stride 0
    ds_ptr, dt_ptr, s_ga, s_gb, s_gv,  # gradients w.r.t. student / teacher logits (A, B, V)
    R, B, V, ignore_index,
    HAS_LABELS: tl.constexpr, STATS_KNOWN: tl.constexpr, WRITE_DS: tl.constexpr, WRITE_DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per-row KL(softmax(t / T) || softmax(s / T)) for ``BLOCK_R`` rows and/or its gradients."""
    rows, rmask = row_block(R, BLOCK_R)
    keep = kept_rows(lab_ptr, rows, rmask, B, s_la, s_lb, ignore_index, HAS_LABELS)
    soff = row_offsets(rows, B, s_sa, s_sb)
    toff = row_offsets(rows, B, s_ta, s_tb)
    inv_t = tl.load(prm_ptr).to(ACC)
    if STATS_KNOWN:
        loss = tl.load(stat_ptr + rows, mask=rmask, other=0.0).to(ACC)
        c_s = tl.load(stat_ptr + R + rows, mask=rmask, other=0.0).to(ACC)
        lz_s = tl.load(stat_ptr + 2 * R + rows, mask=rmask, other=0.0).to(ACC)
        c_t = tl.load(stat_ptr + 3 * R + rows, mask=rmask, other=0.0).to(ACC)
        lz_t = tl.load(stat_ptr + 4 * R + rows, mask=rmask, other=0.0).to(ACC)
    else:
        m_s = tl.full([BLOCK_R], _NEG_INF, ACC)
        m_t = tl.full([BLOCK_R], _NEG_INF, ACC)
        c_s = tl.zeros([BLOCK_R], ACC)  # the shifts in use: the raw maxima, 0 while they are -inf
        c_t = tl.zeros([BLOCK_R], ACC)
        z_s = tl.zeros([BLOCK_R], ACC)
        z_t = tl.zeros([BLOCK_R], ACC)
        d = tl.zeros([BLOCK_R], ACC)  # sum_v exp((t_v - c_t) / T) * ((t_v - c_t) - (s_v - c_s)) / T
        for c0 in range(0, V, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < V)[None, :]
            # Raw logits, shifted by the raw maxima before the 1 / T scaling: near the maximum the
            # difference is exact, so a large common offset costs nothing (scaling first would not).
            s = tl.load(s_ptr + soff[:, None] + cols[None, :] * s_sv, mask=mask, other=_NEG_INF).to(ACC)
            t = tl.load(t_ptr + toff[:, None] + cols[None, :] * s_tv, mask=mask, other=_NEG_INF).to(ACC)
            new_s = tl.maximum(m_s, tl.max(s, 1))
            new_t = tl.maximum(m_t, tl.max(t, 1))
            n_s = tl.where(new_s == _NEG_INF, 0.0, new_s)
            n_t = tl.where(new_t == _NEG_INF, 0.0, new_t)
            alpha_t = tl.exp((m_t - n_t) * inv_t)
            # Rebase D's terms to the new shifts (each moves by the change of c_s minus that of c_t).
            d = tl.where(z_t == 0.0, 0.0, alpha_t * (d + z_t * ((n_s - c_s) - (n_t - c_t)) * inv_t))
            z_s = z_s * tl.exp((m_s - n_s) * inv_t) + tl.sum(tl.exp((s - n_s[:, None]) * inv_t), 1)
            e = tl.exp((t - n_t[:, None]) * inv_t)
            z_t = z_t * alpha_t + tl.sum(e, 1)
            d += tl.sum(tl.where(e == 0.0, 0.0, e * ((t - n_t[:, None]) - (s - n_s[:, None])) * inv_t), 1)
            m_s, m_t, c_s, c_t = new_s, new_t, n_s, n_t
        lz_s = tl.log(z_s)
        lz_t = tl.log(z_t)
        loss = d / z_t - lz_t + lz_s
        tl.store(stat_ptr + rows, tl.where(keep, loss, 0.0), mask=rmask)
        tl.store(stat_ptr + R + rows, c_s, mask=rmask)
        tl.store(stat_ptr + 2 * R + rows, lz_s, mask=rmask)
        tl.store(stat_ptr + 3 * R + rows, c_t, mask=rmask)
        tl.store(stat_ptr + 4 * R + rows, lz_t, mask=rmask)
    if WRITE_DS or WRITE_DT:
        scale = tl.load(gs_ptr + rows * s_gs, mask=keep, other=0.0).to(ACC) * inv_t
        goff = row_offsets(rows, B, s_ga, s_gb)
        for c0 in range(0, V, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < V)[None, :]
            s = tl.load(s_ptr + soff[:, None] + cols[None, :] * s_sv, mask=mask, other=0.0).to(ACC)
            t = tl.load(t_ptr + toff[:, None] + cols[None, :] * s_tv, mask=mask, other=0.0).to(ACC)
            log_q = (s - c_s[:, None]) * inv_t - lz_s[:, None]
            log_p = (t - c_t[:, None]) * inv_t - lz_t[:, None]
            p = tl.exp(log_p)
            gof = goff[:, None] + cols[None, :] * s_gv
            if WRITE_DS:
                g = tl.where(keep[:, None], (tl.exp(log_q) - p) * scale[:, None], 0.0)
                tl.store(ds_ptr + gof, g.to(ds_ptr.dtype.element_ty), mask=mask)
            if WRITE_DT:
                g = tl.where(p == 0.0, 0.0, p * (log_p - log_q - loss[:, None]))
                g = tl.where(keep[:, None], g * scale[:, None], 0.0)
                tl.store(dt_ptr + gof, g.to(dt_ptr.dtype.element_ty), mask=mask)


def _launch(s, t, labels, inv_temp, ignore_index: int, stats, stats_known: bool, gs, ds, dt) -> None:
    launch_rows(_kd_kernel, s, t, labels, [inv_temp], stats, gs, ds, dt, ignore_index,
                STATS_KNOWN=stats_known, WRITE_DS=ds is not None, WRITE_DT=dt is not None)  # fmt: skip


def kd_fwd(s, t, labels, inv_temp: float, ignore_index: int, gscale, need_ds: bool, need_dt: bool):
    """Per-row loss and softmax statistics; with ``need_d*`` also the fused gradients.

    Args:
        s: student logits ``(A, B, V)``.
        t: teacher logits ``(A, B, V)``, ``s``'s dtype.
        labels: ``(A, B)`` int64 labels (rows equal to ``ignore_index`` are masked), or None.
        inv_temp: ``1 / temperature``.
        ignore_index: the masked label value.
        gscale: ``(1,)`` fp32 (fp64) gradient scale (the reduction's ``1 / denominator``).
        need_ds, need_dt: write the gradients of ``sum_r gscale * loss_r`` w.r.t. ``s`` / ``t``.

    Returns:
        ``(stats, ds, dt)``: stats ``(5, A * B)`` fp32 (fp64) = (loss, then the max and the
        log-sum-exp minus the max of the student row / T, then of the teacher row / T), masked rows'
        loss 0; gradients ``(A, B, V)`` contiguous, or None.
    """
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    stats = torch.empty(5, s.shape[0] * s.shape[1], dtype=acc, device=s.device)
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_ds else None
    dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_dt else None
    _launch(s, t, labels, inv_temp, ignore_index, stats, False, gscale, ds, dt)
    return stats, ds, dt


def kd_bwd(s, t, labels, inv_temp: float, ignore_index: int, stats, gscale, need_ds: bool, need_dt: bool):
    """Gradients ``(ds, dt)`` of ``sum_r gscale_r * loss_r`` from saved ``stats``.

    ``gscale`` is ``(A * B,)`` fp32 (fp64) (reduction 'none') or one value broadcast to every row.
    """
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_ds else None
    dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_dt else None
    if need_ds or need_dt:
        _launch(s, t, labels, inv_temp, ignore_index, stats, True, gscale, ds, dt)
    return ds, dt


def _case(kernel, ptrs: dict, constexprs: dict, num_warps: int):
    """An ``AotCase`` naming only ``kernel``'s own pointers (so distinct cases have distinct names)."""
    from ._common import AotCase

    return AotCase(kernel, {k: v for k, v in ptrs.items() if k in kernel.arg_names}, constexprs, num_warps)


def aot_cases():
    """Every specialisation the launchers above can produce (see ``tests/test_aot_compile.py``).

    All flag combinations at the bf16 large-vocabulary configuration, then every row
    configuration for every dtype (the flags only add stores or skip the statistics pass).
    """
    from itertools import product

    from ._common import TL_NAMES

    def ptrs(d: str, acc: str) -> dict:
        return dict(s_ptr=d, t_ptr=d, lab_ptr="i64", prm_ptr=acc, stat_ptr=acc, gs_ptr=acc, ds_ptr=d, dt_ptr=d)

    block_r, block_c, warps = launch_config(128256, 2, True)
    big = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl.float32)
    for labels, known, ds, dt in product(*[(False, True)] * 4):
        if known and not (ds or dt):
            continue
        flags = dict(HAS_LABELS=labels, STATS_KNOWN=known, WRITE_DS=ds, WRITE_DT=dt, **big)
        yield _case(_kd_kernel, ptrs("bf16", "fp32"), flags, warps)
    for dtype, name in TL_NAMES.items():
        acc, acc_name = (tl.float64, "fp64") if name == "fp64" else (tl.float32, "fp32")
        for block_r, block_c, warps in row_configs(getattr(torch, dtype).itemsize):
            flags = dict(HAS_LABELS=True, STATS_KNOWN=False, WRITE_DS=True, WRITE_DT=False,
                         BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc)  # fmt: skip
            yield _case(_kd_kernel, ptrs(name, acc_name), flags, warps)
