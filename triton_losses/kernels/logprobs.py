"""Token log-probabilities and entropy of ``softmax(logits / T)``: one online-softmax pass per row.

The forward reads each row of logits once: per-lane running max and sum of exponentials
(``_common.online_lse_update``) and, for the entropy, a running ``sum exp(z - m) * (z - m)``
relative to the same per-lane max, plus one gathered load of the token's logit. It writes per-row
fp32 (fp64 for fp64 logits) ``logp``, ``entropy``, and the row's max and sum of exponentials, kept
separate so the backward forms ``p = exp(z - max) / sum`` without rounding a log-sum-exp. The
backward reads the row once more and writes the gradient of both outputs in the same pass.

The per-token outputs receive an arbitrary upstream gradient (advantages, masks), known only in the
backward, so the gradient cannot be written by the forward as cross-entropy's fused kernel does.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._precision import acc_dtype
from ._common import (
    NEG_INF,
    aligned_tiles,
    assert_options,
    lanes_sum_exp,
    launch_config,
    masked_load,
    masked_store,
    on_device,
    online_lse_update,
    row_align,
    row_block,
    tl_acc,
)


@triton.jit
def _online_entropy_update(m, s, t, x):
    """``online_lse_update`` with ``t = sum exp(x - m) * (x - m)`` carried along (one exp per element)."""
    gt = x > m
    m_new = tl.where(gt, x, m)
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    lo = tl.where(gt, m, x)
    e = tl.exp(lo - shift)
    d = tl.where(e > 0.0, lo - m_new, 0.0)  # 0 where the smaller value carries no mass (-inf)
    t = tl.where(gt, e * (t + s * d), t + e * d)
    s = tl.where(gt, s * e + 1.0, s + e)
    return m_new, s, t


@triton.jit
def _entropy_sum(m, s, t, mr):
    """Per-row ``sum exp(z - max) * (z - max)`` from per-lane ``(m, s, t)`` tiles and the row max ``mr``."""
    shift = tl.where(mr == NEG_INF, 0.0, mr)
    d = m - shift[:, None]
    e = tl.exp(d)
    d = tl.where(e > 0.0, d, 0.0)
    return tl.sum(e * (t + s * d), 1)


@triton.jit
def _token_targets(tok_ptr, s_tok, rows, rmask, V):
    """Tokens of a block of rows: ``(token, in_range, clamped)``; loads use the clamped index (the forward
    asserts ``in_range`` once it has stored its rows: an assert is a call, and registers live across it
    would go to the stack, so it comes where the least is live)."""
    tok = tl.load(tok_ptr + rows * s_tok, mask=rmask, other=0).to(tl.int64)
    inb = (tok >= 0) & (tok < V)
    return tok, inb, tl.where(inb, tok, 0)


@triton.jit
def _fwd_tile(m, s, t, x_ptr, xrow, rel, mask, inv_t, MASKED: tl.constexpr, ENTROPY: tl.constexpr, ACC: tl.constexpr):
    """Fold the logits at ``xrow[:, None] + rel[None, :]`` (under ``mask`` when ``MASKED``) into the per-lane
    running ``(m, s, t)`` of the tile's shape."""
    z = masked_load(x_ptr + xrow[:, None] + rel[None, :], mask, NEG_INF, MASKED, "").to(ACC) * inv_t
    if ENTROPY:
        m, s, t = _online_entropy_update(m, s, t, z)
    else:
        m, s = online_lse_update(m, s, z)
    return m, s, t


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr, s_xr, s_xc,  # logits (R, V)
    tok_ptr, s_tok,  # tokens (R,) int32 / int64
    temp_ptr,  # (1,) temperature, fp32 (fp64 for fp64 logits)
    logp_ptr, ent_ptr, max_ptr, sum_ptr,  # per-row outputs (R,), fp32 (fp64); ent_ptr written if ENTROPY
    R, V,
    ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Per-row ``log softmax(x / T)[token]`` (and entropy), row max and sum of exponentials, for ``BLOCK_R`` rows.

    ``ALIGN > 1`` (one row of contiguous logits, ``_common.row_align``): the row's aligned middle streams
    as whole unmasked tiles and an aligned rest masked in 16-byte units; its first and last few columns
    (``_common.aligned_tiles``) take one small tile with running sums of its own, merged at the end.
    """
    rows, rmask = row_block(R, BLOCK_R)
    xoff = rows * s_xr
    inv_t = 1.0 / tl.load(temp_ptr).to(ACC)
    _, inb, tsafe = _token_targets(tok_ptr, s_tok, rows, rmask, V)
    z_t = tl.load(x_ptr + xoff + tsafe * s_xc, mask=rmask & inb, other=0.0).to(ACC) * inv_t
    m = tl.full([BLOCK_R, BLOCK_C], NEG_INF, ACC)
    s = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    t = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    me = tl.full([BLOCK_R, 2 * ALIGN], NEG_INF, ACC)
    se = tl.zeros([BLOCK_R, 2 * ALIGN], ACC)
    te = tl.zeros([BLOCK_R, 2 * ALIGN], ACC)
    if ALIGN > 1:
        head, full, rel, tail_mask, ecols, emask = aligned_tiles(xoff, V, rmask, ALIGN, BLOCK_C)
        for k in range(full):
            m, s, t = _fwd_tile(m, s, t, x_ptr, tl.multiple_of(xoff + head + k * BLOCK_C, ALIGN), rel, rmask[:, None],
                                inv_t, False, ENTROPY, ACC)  # fmt: skip
        m, s, t = _fwd_tile(m, s, t, x_ptr, tl.multiple_of(xoff + head + full * BLOCK_C, ALIGN), rel, tail_mask,
                            inv_t, True, ENTROPY, ACC)  # fmt: skip
        me, se, te = _fwd_tile(me, se, te, x_ptr, xoff, ecols, emask, inv_t, True, ENTROPY, ACC)
    else:
        for c0 in range(0, V, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < V)[None, :]
            m, s, t = _fwd_tile(m, s, t, x_ptr, xoff, cols * s_xc, mask, inv_t, True, ENTROPY, ACC)
    mr = tl.maximum(tl.max(m, 1), tl.max(me, 1))
    sr = lanes_sum_exp(m, s, mr) + lanes_sum_exp(me, se, mr)
    log_s = tl.log(sr)
    logp = tl.where(inb, (z_t - mr) - log_s, float("nan"))
    tl.store(logp_ptr + rows, logp.to(logp_ptr.dtype.element_ty), mask=rmask)
    tl.store(max_ptr + rows, mr.to(max_ptr.dtype.element_ty), mask=rmask)
    tl.store(sum_ptr + rows, sr.to(sum_ptr.dtype.element_ty), mask=rmask)
    if ENTROPY:
        ent = log_s - (_entropy_sum(m, s, t, mr) + _entropy_sum(me, se, te, mr)) / sr
        tl.store(ent_ptr + rows, ent.to(ent_ptr.dtype.element_ty), mask=rmask)
    tl.device_assert(inb | ~rmask, "token_logprobs: token index out of range")  # NaN was stored for it


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr, s_xr, s_xc,  # logits (R, V)
    tok_ptr, s_tok,  # tokens (R,) int32 / int64
    temp_ptr,  # (1,) temperature, fp32 (fp64 for fp64 logits)
    max_ptr, sum_ptr, ent_ptr,  # saved per-row max, sum of exponentials, entropy (R,)
    glp_ptr, gent_ptr,  # upstream gradients of logp and entropy (R,), read if HAS_GLP / HAS_GENT
    g_ptr, s_gr, s_gc,  # gradient w.r.t. the logits (R, V); may be the logits themselves
    R, V,
    HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """``d/dx`` of ``sum_r glp_r * logp_r + gent_r * entropy_r`` for ``BLOCK_R`` rows, one pass over each row
    (``ALIGN > 1``: split as in the forward, the gradient at the logits' offsets)."""
    rows, rmask = row_block(R, BLOCK_R)
    xoff = rows * s_xr
    goff = rows * s_gr
    inv_t = 1.0 / tl.load(temp_ptr).to(ACC)
    tok, inb, _ = _token_targets(tok_ptr, s_tok, rows, rmask, V)
    mr = tl.load(max_ptr + rows, mask=rmask, other=0.0).to(ACC)
    sr = tl.load(sum_ptr + rows, mask=rmask, other=1.0).to(ACC)
    log_s = tl.log(sr)
    inv_s = 1.0 / sr
    glp = tl.zeros([BLOCK_R], ACC)
    gent = tl.zeros([BLOCK_R], ACC)
    ent = tl.zeros([BLOCK_R], ACC)
    if HAS_GLP:
        glp = tl.load(glp_ptr + rows, mask=rmask, other=0.0).to(ACC)
    if HAS_GENT:
        gent = tl.load(gent_ptr + rows, mask=rmask, other=0.0).to(ACC)
        ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0).to(ACC)
    rscale = tl.where(inb, inv_t, float("nan"))
    if ALIGN > 1:  # as in the forward: the aligned middle unmasked, its rest in 16-byte units, one tile of edges
        head, full, rel, tail_mask, ecols, emask = aligned_tiles(xoff, V, rmask, ALIGN, BLOCK_C)
        for k in range(full):
            c0 = head + k * BLOCK_C
            _bwd_tile(x_ptr, tl.multiple_of(xoff + c0, ALIGN), g_ptr, tl.multiple_of(goff + c0, ALIGN), rel, c0 + rel,
                      rmask[:, None], tok, mr, log_s, inv_s, inv_t, glp, gent, ent, rscale, rel, False, HAS_GLP,
                      HAS_GENT, ACC)  # fmt: skip
        c0 = head + full * BLOCK_C
        _bwd_tile(x_ptr, tl.multiple_of(xoff + c0, ALIGN), g_ptr, tl.multiple_of(goff + c0, ALIGN), rel, c0 + rel,
                  tail_mask, tok, mr, log_s, inv_s, inv_t, glp, gent, ent, rscale, rel, True, HAS_GLP, HAS_GENT,
                  ACC)  # fmt: skip
        _bwd_tile(x_ptr, xoff, g_ptr, goff, ecols, ecols, emask, tok, mr, log_s, inv_s, inv_t, glp, gent, ent, rscale,
                  ecols, True, HAS_GLP, HAS_GENT, ACC)  # fmt: skip
    else:
        for c0 in range(0, V, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = rmask[:, None] & (cols < V)[None, :]
            _bwd_tile(x_ptr, xoff, g_ptr, goff, cols * s_xc, cols, mask, tok, mr, log_s, inv_s, inv_t, glp, gent, ent,
                      rscale, cols * s_gc, True, HAS_GLP, HAS_GENT, ACC)  # fmt: skip


@triton.jit
def _bwd_tile(
    x_ptr, xrow, g_ptr, grow, rel, cols, mask, tok, mr, log_s, inv_s, inv_t, glp, gent, ent, rscale,
    grel, MASKED: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The gradient at the logits ``xrow[:, None] + rel[None, :]`` (columns ``cols``), stored at ``grow[:, None]
    + grel[None, :]``; under ``mask`` when ``MASKED``."""
    z = masked_load(x_ptr + xrow[:, None] + rel[None, :], mask, 0.0, MASKED, "").to(ACC) * inv_t
    lz = z - mr[:, None]
    p = tl.exp(lz) * inv_s[:, None]
    d = tl.zeros(z.shape, ACC)
    if HAS_GLP:
        d = tl.where(cols[None, :] == tok[:, None], glp[:, None], 0.0) - glp[:, None] * p
    if HAS_GENT:
        h = p * (lz - log_s[:, None] + ent[:, None])
        d -= gent[:, None] * tl.where(p > 0.0, h, 0.0)
    masked_store(
        g_ptr + grow[:, None] + grel[None, :], (d * rscale[:, None]).to(g_ptr.dtype.element_ty), mask, MASKED, ""
    )


def _config(x: Tensor) -> tuple[int, int, int]:
    R, V = x.shape
    return launch_config(V, x.element_size(), x.stride(1) == 1 or R <= 1)


def _temperature(x: Tensor, temperature: float) -> Tensor:
    return torch.full((1,), temperature, dtype=acc_dtype(x.dtype), device=x.device)


def logprobs_fwd(x: Tensor, tokens: Tensor, temperature: float, entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernel.

    Args:
        x: logits ``(R, V)``, any strides, floating dtype.
        tokens: ``(R,)`` int32 / int64 token indices.
        temperature: ``T > 0``; the softmax is of ``x / T``.
        entropy: also compute the entropy of each row.

    Returns:
        ``(logp, ent, row_max, row_sum)``: ``(R,)`` each, fp32 (fp64 for fp64 logits), ``ent`` ``(0,)``
        unless ``entropy``; ``row_max`` / ``row_sum`` are ``max(x / T)`` and ``sum exp(x / T - max)``.
        An out-of-range token gives a NaN ``logp`` (and a device-side assert on CUDA).
    """
    R, V = x.shape
    acc = acc_dtype(x.dtype)
    logp, row_max, row_sum = (torch.empty(R, dtype=acc, device=x.device) for _ in range(3))
    ent = torch.empty(R if entropy else 0, dtype=acc, device=x.device)
    if R == 0:
        return logp, ent, row_max, row_sum
    block_r, block_c, warps = _config(x)
    with on_device(x):
        _logprobs_fwd_kernel[(triton.cdiv(R, block_r),)](
            x, x.stride(0), x.stride(1), tokens, tokens.stride(0), _temperature(x, temperature),
            logp, ent if entropy else logp, row_max, row_sum, R, V,
            ENTROPY=entropy, BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(x.dtype), ALIGN=row_align(x[:, :, None], block_r),
            num_warps=warps, **assert_options(x),
        )  # fmt: skip
    return logp, ent, row_max, row_sum


def logprobs_bwd(
    x: Tensor,
    tokens: Tensor,
    row_max: Tensor,
    row_sum: Tensor,
    ent: Tensor,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    temperature: float,
    grad: Tensor | None = None,
) -> Tensor:
    """Launch the backward kernel: the gradient w.r.t. the logits of ``sum(g_logp * logp + g_ent * ent)``.

    Args:
        x: logits ``(R, V)``.
        tokens: ``(R,)`` token indices.
        row_max, row_sum: ``(R,)`` from :func:`logprobs_fwd`.
        ent: ``(R,)`` entropy from :func:`logprobs_fwd` (read only when ``g_ent`` is given).
        g_logp, g_ent: ``(R,)`` upstream gradients, or None for none.
        temperature: the forward's ``T``.
        grad: ``(R, V)`` destination (may be ``x`` itself: each element is read before it is written),
            or None for a new tensor in ``x``'s dtype.

    Returns:
        The gradient ``(R, V)`` in ``x``'s dtype (``grad`` when given).
    """
    R, V = x.shape
    if grad is None:
        grad = torch.empty((R, V), dtype=x.dtype, device=x.device)
    if R == 0 or V == 0:
        return grad
    block_r, block_c, warps = _config(x)
    with on_device(x):
        _logprobs_bwd_kernel[(triton.cdiv(R, block_r),)](
            x, x.stride(0), x.stride(1), tokens, tokens.stride(0), _temperature(x, temperature),
            row_max, row_sum, ent if g_ent is not None else row_max,
            g_logp if g_logp is not None else row_max, g_ent if g_ent is not None else row_max,
            grad, grad.stride(0), grad.stride(1), R, V,
            HAS_GLP=g_logp is not None, HAS_GENT=g_ent is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc(x.dtype), ALIGN=row_align(x[:, :, None], block_r, grad[:, :, None]),
            num_warps=warps, **assert_options(x),
        )  # fmt: skip
    return grad


# ---- the same launchers as torch.library custom ops, for traced calls ------------------------


@torch.library.custom_op("triton_losses::logprobs_fwd", mutates_args=())
def _logprobs_fwd_op(
    x: Tensor, tokens: Tensor, temperature: float, entropy: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`logprobs_fwd` as a functional op."""
    return logprobs_fwd(x, tokens, temperature, entropy)


@_logprobs_fwd_op.register_fake
def _(x, tokens, temperature, entropy):
    R = x.shape[0]
    acc = acc_dtype(x.dtype)
    rows = [x.new_empty(R, dtype=acc) for _ in range(3)]
    return rows[0], x.new_empty(R if entropy else 0, dtype=acc), rows[1], rows[2]


@torch.library.custom_op("triton_losses::logprobs_bwd", mutates_args=())
def _logprobs_bwd_op(
    x: Tensor,
    tokens: Tensor,
    row_max: Tensor,
    row_sum: Tensor,
    ent: Tensor,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    temperature: float,
) -> Tensor:
    """:func:`logprobs_bwd` as a functional op (always a new gradient tensor)."""
    return logprobs_bwd(x, tokens, row_max, row_sum, ent, g_logp, g_ent, temperature)


@_logprobs_bwd_op.register_fake
def _(x, tokens, row_max, row_sum, ent, g_logp, g_ent, temperature):
    return x.new_empty(x.shape)


def _traced_bwd(x, tokens, row_max, row_sum, ent, g_logp, g_ent, temperature, grad=None):
    """:func:`logprobs_bwd` through the custom op; a given ``grad`` receives a copy."""
    out = _logprobs_bwd_op(x, tokens, row_max, row_sum, ent, g_logp, g_ent, temperature)
    return out if grad is None else grad.copy_(out)


TRACED = SimpleNamespace(logprobs_fwd=_logprobs_fwd_op, logprobs_bwd=_traced_bwd)
