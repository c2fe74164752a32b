"""CTC loss kernels: log-space alpha / beta recursions over the extended label states, and gradient rows.

Sequence ``b`` with targets ``l_1..l_L`` has ``2L + 1`` extended states: state ``s`` holds the blank
when ``s`` is even and ``l_{(s+1)/2}`` when odd. One program per sequence runs the recursion over
time with every state in one register vector (neighbours come from ``tl.gather``, no memory round
trip), so the recursion is deterministic and needs no synchronisation between programs.

Gradient (torch's CPU / CUDA formula, which treats the input as a log-softmax output)::

    grad[t, b, c] = (exp(lp[t, b, c]) - sum_{s: class(s) = c} exp(alpha_t(s) + beta_t(s) - lp[t, b, c] + nll_b)) * g_b

for ``t < input_length_b`` and 0 beyond (and 0 for the whole sequence under ``zero_infinity`` when its
loss is infinite). The beta kernel forms the terms ``q_t(s)`` in the linear domain (each is a
fraction of the path mass in [0, 1]) and sums them per class in a fixed order: the blank's by one
reduction over the states, the labels' by a segmented scan over the target positions sorted by class
(a stable sort, made once per call), so repeated labels are summed without any scatter or atomic.
The gradient kernel writes each ``(t, b)`` row densely (``exp(lp) * g``), then, after a barrier, the
at most ``L + 1`` classes the row's sums touch, each exactly once. Gradients are therefore bitwise
reproducible.

Lengths and target values are clamped before any address is formed, so nothing is read or written
out of bounds whatever they hold; on CUDA an out-of-range target is a ``tl.device_assert``.
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
    assert_options,
    next_pow2,
    on_device,
    scale_,
    tl_acc,
)

__all__ = ["FUSES_GRAD", "TRACED", "ctc_bwd", "ctc_fwd", "max_target_length", "scale_"]

FUSES_GRAD = True  # ctc_fwd(..., fuse=True) returns the gradient of the reduced loss with the loss

# The state vector of one sequence lives in one program's registers, about a dozen values per
# state: 4096 states (targets up to 2047 labels) at 16 warps hold 8 states per thread within the
# 128 registers a 512-thread program may use (sm_80 / sm_90 cubins, tests/aot_cases/ctc.py); 16384
# states spilled 1.3-2 KB at 8 warps; fp64 (two registers a value) spilled 72 bytes at 4096 states,
# so it stops at 2048 states. Longer targets are served by the reference (``auto``) or refused with
# NotImplementedError (``TRITON_LOSSES_BACKEND=triton``).
MAX_TARGET_LENGTH = 2047
_MAX_TARGET_LENGTH_FP64 = 1023


def max_target_length(dtype: torch.dtype) -> int:
    """The longest target (labels) the kernels take for log-probabilities of ``dtype``."""
    return _MAX_TARGET_LENGTH_FP64 if dtype == torch.float64 else MAX_TARGET_LENGTH


# Gradient rows: a tile of BLOCK_C classes, 8 values per thread at 8 warps (4 for fp64): 4096-class
# fp32 tiles needed 150-170 registers, above the 128 of two resident 8-warp programs per SM.
_ROW_TILE = {2: 2048, 4: 2048, 8: 1024}
_INF = tl.constexpr(float("inf"))


@triton.jit
def _states(t_ptr, off_ptr, n_tgt, b, tlen, C, blank, BLOCK_S: tl.constexpr):
    """Per extended state ``s`` (BLOCK_S,): its class, whether it exists, and whether ``s - 2 -> s`` is allowed."""
    s = tl.arange(0, BLOCK_S)
    off = tl.load(off_ptr + b)
    valid = s < 2 * tlen + 1
    is_lab = valid & (s % 2 == 1)
    j = (s - 1) // 2
    idx = tl.minimum(tl.maximum(off + j, 0), n_tgt - 1)
    lab = tl.load(t_ptr + idx, mask=is_lab, other=blank)
    prev = tl.load(t_ptr + tl.maximum(idx - 1, 0), mask=is_lab & (s >= 3), other=blank)
    tl.device_assert(~is_lab | ((lab >= 0) & (lab < C)), "ctc_loss: target out of range")
    lab = tl.minimum(tl.maximum(lab, 0), C - 1)
    prev = tl.minimum(tl.maximum(prev, 0), C - 1)
    cls = tl.where(is_lab, lab, blank).to(tl.int64)
    skip = is_lab & (s >= 3) & (lab != prev)
    return s, cls, valid, skip


@triton.jit
def _lengths(il_ptr, tl_ptr, b, T, L):
    """Input and target length of sequence ``b``, clamped to ``[0, T]`` and ``[0, L]``."""
    il = tl.minimum(tl.maximum(tl.load(il_ptr + b), 0), T)
    tlen = tl.minimum(tl.maximum(tl.load(tl_ptr + b), 0), L)
    return il, tlen


@triton.jit
def _lse3(a1, a2, a3):
    """``log(exp(a1) + exp(a2) + exp(a3))`` elementwise, shifted by the max (all ``-inf`` gives ``-inf``)."""
    m = tl.maximum(tl.maximum(a1, a2), a3)
    m = tl.where(m == NEG_INF, 0.0, m)
    return tl.log(tl.exp(a1 - m) + tl.exp(a2 - m) + tl.exp(a3 - m)) + m


@triton.jit
def _seg_add(av, af, bv, bf):
    """Combine of a segmented sum scan: a segment start (``bf``) restarts the sum."""
    return tl.where(bf != 0, bv, av + bv), af | bf


@triton.jit
def _ctc_alpha_kernel(
    lp_ptr, s_lt, s_ln, s_lc,  # log-probabilities (T, N, C), strides
    t_ptr, off_ptr, n_tgt,  # targets int64 (n_tgt >= 1,) flat; (N,) start of each sequence's targets
    il_ptr, tl_ptr,  # input / target lengths (N,) int64
    alpha_ptr, nll_ptr,  # alpha (N, T, W) and loss (N,), ACC
    T, C, L, blank,  # L: target length bound, W = 2L + 1
    BLOCK_S: tl.constexpr,  # power of two >= W
    ACC: tl.constexpr,  # fp32, or fp64 for fp64 input
):  # fmt: skip
    """Forward recursion of one sequence: alpha over time for every state, and ``nll = -log p``."""
    b = tl.program_id(0).to(tl.int64)
    W = 2 * L + 1
    il, tlen = _lengths(il_ptr, tl_ptr, b, T, L)
    s, cls, valid, skip = _states(t_ptr, off_ptr, n_tgt, b, tlen, C, blank, BLOCK_S)
    lp_row = lp_ptr + b * s_ln + cls * s_lc
    a_row = alpha_ptr + b * T * W + s
    # (scalar conditions enter masks as bounds: the interpreter mishandles vector & scalar)
    first = valid & (s < tl.minimum(2 * il, 2))
    alpha = tl.load(lp_row, mask=first, other=float("-inf")).to(ACC)
    tl.store(a_row, alpha, mask=s < tl.where(il > 0, W, 0))
    for t in range(1, il):
        a2 = tl.where(s >= 1, tl.gather(alpha, tl.maximum(s - 1, 0), 0), NEG_INF)
        a3 = tl.where(skip, tl.gather(alpha, tl.maximum(s - 2, 0), 0), NEG_INF)
        x = tl.load(lp_row + t * s_lt, mask=valid, other=float("-inf")).to(ACC)
        alpha = tl.where(valid, _lse3(alpha, a2, a3) + x, NEG_INF)
        tl.store(a_row + t * W, alpha, mask=s < W)
    l1 = tl.sum(tl.where(s == 2 * tlen, alpha, 0.0), 0)
    l2 = tl.sum(tl.where(s == 2 * tlen - 1, alpha, 0.0), 0)
    l2 = tl.where(tlen > 0, l2, NEG_INF)
    m = tl.maximum(l1, l2)
    m = tl.where(m == NEG_INF, 0.0, m)
    ll = tl.log(tl.exp(l1 - m) + tl.exp(l2 - m)) + m
    ll = tl.where(il > 0, ll, tl.where(tlen == 0, 0.0, NEG_INF))
    tl.store(nll_ptr + b, -ll)


@triton.jit
def _ctc_beta_kernel(
    lp_ptr, s_lt, s_ln, s_lc,  # log-probabilities (T, N, C), strides
    t_ptr, off_ptr, n_tgt,  # targets int64 (n_tgt >= 1,) flat; (N,) start of each sequence's targets
    il_ptr, tl_ptr,  # input / target lengths (N,) int64
    alpha_ptr, nll_ptr,  # alpha (N, T, W) and loss (N,) from the alpha kernel, ACC
    perm_ptr, srt_ptr,  # (N, L) int64: target positions sorted by class (stable), and their classes
    q_ptr,  # (N, T, L + 1) ACC out: per (b, t) the blank's sum, then per sorted position its class's sum
    T, C, L, blank,
    BLOCK_S: tl.constexpr,  # power of two >= 2L + 1
    BLOCK_L: tl.constexpr,  # power of two >= L
    ACC: tl.constexpr,
):  # fmt: skip
    """Backward recursion of one sequence, and each time step's per-class sums of path fractions."""
    b = tl.program_id(0).to(tl.int64)
    W = 2 * L + 1
    il, tlen = _lengths(il_ptr, tl_ptr, b, T, L)
    s, cls, valid, skip = _states(t_ptr, off_ptr, n_tgt, b, tlen, C, blank, BLOCK_S)
    nxt2 = tl.minimum(s + 2, BLOCK_S - 1)
    skip_next = (tl.gather(skip.to(tl.int32), nxt2, 0) != 0) & (s + 2 < BLOCK_S)
    last = valid & ((s == 2 * tlen) | (s == 2 * tlen - 1))
    nll = tl.load(nll_ptr + b)
    # torch's CPU kernel sets (not adds) the last label's term at t = il - 1, so a last target equal
    # to the blank drops the final blank state's term there; mirrored for equal gradients.
    quirk = (tlen > 0) & (tl.sum(tl.where(s == 2 * tlen - 1, cls, 0), 0) == blank)
    # Sorted target positions: segments of equal class, their starts and ends.
    j = tl.arange(0, BLOCK_L)
    jv = j < tlen
    perm = tl.minimum(tl.maximum(tl.load(perm_ptr + b * L + j, mask=jv, other=0), 0), BLOCK_S // 2 - 1)
    key = tl.load(srt_ptr + b * L + j, mask=jv, other=-1)
    key_prev = tl.load(srt_ptr + b * L + tl.maximum(j - 1, 0), mask=jv & (j > 0), other=-1)
    key_next = tl.load(srt_ptr + b * L + j + 1, mask=j + 1 < tlen, other=-1)
    start = ((j == 0) | (key != key_prev)).to(tl.int32)
    end = jv & (key != key_next) & (key != blank)
    lp_row = lp_ptr + b * s_ln + cls * s_lc
    a_row = alpha_ptr + b * T * W + s
    q_row = q_ptr + b * T * (L + 1)
    beta = tl.full([BLOCK_S], float("-inf"), ACC)
    for i in range(0, il):
        t = il - 1 - i
        x = tl.load(lp_row + t * s_lt, mask=valid, other=float("-inf")).to(ACC)
        b2 = tl.where(s + 1 < BLOCK_S, tl.gather(beta, tl.minimum(s + 1, BLOCK_S - 1), 0), NEG_INF)
        b3 = tl.where(skip_next, tl.gather(beta, nxt2, 0), NEG_INF)
        rec = _lse3(beta, b2, b3) + x
        beta = tl.where(valid, tl.where(i == 0, tl.where(last, x, NEG_INF), rec), NEG_INF)
        a = tl.load(a_row + t * W, mask=valid, other=float("-inf"))
        q = tl.where(valid, tl.exp(a + beta - x + nll), 0.0)
        q = tl.where(s == tl.where(quirk & (i == 0), 2 * tlen, -1), 0.0, q)
        q_blank = tl.sum(tl.where(cls == blank, q, 0.0), 0)
        qs = tl.where(jv, tl.gather(q, 2 * perm + 1, 0), 0.0)
        tot, _ = tl.associative_scan((qs, start), 0, _seg_add)
        tl.store(q_row + t * (L + 1), q_blank)
        tl.store(q_row + t * (L + 1) + 1 + j, tl.where(end, tot, -1.0), mask=jv)


@triton.jit
def _ctc_grad_kernel(
    lp_ptr, s_lt, s_ln, s_lc,  # log-probabilities (T, N, C), strides
    g_ptr,  # gradient (T, N, C), contiguous, lp's dtype
    q_ptr, srt_ptr,  # (N, T, L + 1) per-class sums from the beta kernel; (N, L) sorted classes
    il_ptr, tl_ptr, nll_ptr, gs_ptr,  # lengths (N,) int64; loss (N,) and upstream scale (N,), ACC
    T, N, C, L, blank,
    ZERO_INF: tl.constexpr,  # zero the gradient of sequences with an infinite loss
    BLOCK_C: tl.constexpr,  # class tile
    BLOCK_Q: tl.constexpr,  # power of two >= L + 1
    ACC: tl.constexpr,
):  # fmt: skip
    """One ``(t, b)`` row of torch's CTC gradient: ``(exp(lp) - sum of path fractions) * g``, 0 past the input."""
    r = tl.program_id(0).to(tl.int64)
    t = r // N
    b = r - t * N
    il, tlen = _lengths(il_ptr, tl_ptr, b, T, L)
    nll = tl.load(nll_ptr + b)
    gs = tl.load(gs_ptr + b)
    live = t < il
    if ZERO_INF:
        live = live & (nll != _INF)
    # exp(-inf + nll - lp) of torch's formula: 0, or NaN when nll is NaN / +inf or lp is -inf.
    deg = tl.where((nll != nll) | (nll == _INF), float("nan"), 0.0)
    lp_row = lp_ptr + t * s_lt + b * s_ln
    g_row = g_ptr + r * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cm = c < C
        x = tl.load(lp_row + c * s_lc, mask=c < tl.where(live, C, 0), other=0.0).to(ACC)
        v = (tl.exp(x) - tl.where(x == NEG_INF, float("nan"), deg)) * gs
        tl.store(g_row + c, tl.where(live, v, 0.0).to(g_ptr.dtype.element_ty), mask=cm)
    tl.debug_barrier()  # the dense stores above land before the per-class stores below
    k = tl.arange(0, BLOCK_Q)
    km = k < tl.where(live, tlen + 1, 0)
    key = tl.load(srt_ptr + b * L + tl.maximum(k - 1, 0), mask=km & (k > 0), other=blank)
    key = tl.where(k == 0, blank, tl.minimum(tl.maximum(key, 0), C - 1))
    qv = tl.load(q_ptr + (b * T + t) * (L + 1) + k, mask=km, other=-1.0)
    w = km & ~(qv < 0.0)
    x = tl.load(lp_row + key * s_lc, mask=w, other=0.0).to(ACC)
    v = (tl.exp(x) - qv - tl.where(x == NEG_INF, float("nan"), deg)) * gs
    tl.store(g_row + key, v.to(g_ptr.dtype.element_ty), mask=w)


# ---- launchers -----------------------------------------------------------------------------------


def _recursion_warps(block_s: int) -> int:
    """Warps of a recursion program: 4 states per thread up to 16 warps (a program is latency-bound)."""
    return max(1, min(16, block_s // 128))


def _grad_warps(block_c: int, L: int) -> int:
    """Warps of a gradient-row program: 8 for wide class tiles or long targets (1024+ per-class sums), else 4."""
    return 8 if block_c >= 1024 or L + 1 > 512 else 4


def _sorted_targets(targets: Tensor, off: Tensor, tl_: Tensor, C: int, L: int) -> tuple[Tensor, Tensor]:
    """``(perm, srt)`` ``(N, L)``: each sequence's target positions sorted by class (stable), and their classes.

    Positions past a sequence's length sort last (key ``C``); classes are clamped to ``[0, C)`` as
    the kernels clamp them. A stable sort on the device: deterministic, no host sync.
    """
    n = targets.numel()
    j = torch.arange(L, device=off.device)
    if n:
        keys = targets.reshape(-1)[(off[:, None] + j).clamp_(0, n - 1)].clamp_(0, C - 1)
    else:
        keys = torch.zeros((off.shape[0], L), dtype=torch.int64, device=off.device)
    keys = torch.where(j < tl_[:, None], keys, torch.full_like(keys, C))
    srt, perm = torch.sort(keys, dim=1, stable=True)
    return perm, srt


def _nonempty(t: Tensor) -> Tensor:
    """``t``, or a one-element int64 stand-in when it is empty (its loads are all masked)."""
    return t if t.numel() else torch.zeros(1, dtype=torch.int64, device=t.device)


def ctc_fwd(
    lp: Tensor, targets: Tensor, off: Tensor, il: Tensor, tl_: Tensor, blank: int, max_len: int,
    zero_infinity: bool, gscale: Tensor | None, fuse: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """Loss per sequence, the saved alpha, and with ``fuse`` the gradient (scaled per sequence by ``gscale``).

    Args:
        lp: log-probabilities ``(T, N, C)``, any strides, floating.
        targets: int64 targets, contiguous: padded ``(N, S)`` or concatenated ``(sum(target_lengths),)``.
        off: ``(N,)`` int64 index in ``targets.reshape(-1)`` of each sequence's first target.
        il, tl_: ``(N,)`` int64 input and target lengths.
        blank: the blank class, in ``[0, C)``.
        max_len: a bound on the target lengths (``L``); alpha has ``2L + 1`` states.
        zero_infinity: zero the gradient of infinite losses (``fuse`` only).
        gscale: ``(N,)`` ACC upstream scale of each sequence's loss (``fuse`` only).
        fuse: also compute the gradient.

    Returns:
        ``nll`` ``(N,)`` ACC, ``alpha`` ``(N, T, 2L + 1)`` ACC, and the gradient ``(T, N, C)`` in ``lp``'s
        dtype (contiguous) or None.
    """
    if max_len > max_target_length(lp.dtype):
        raise ValueError(f"ctc kernels: target length bound {max_len} > {max_target_length(lp.dtype)}")
    T, N, C = lp.shape
    acc = acc_dtype(lp.dtype)
    W = 2 * max_len + 1
    nll = torch.empty(N, dtype=acc, device=lp.device)
    alpha = torch.empty((N, T, W), dtype=acc, device=lp.device)
    block_s = max(16, next_pow2(W))
    if N:
        with on_device(lp):
            _ctc_alpha_kernel[(N,)](
                lp, *lp.stride(), _nonempty(targets), off, max(1, targets.numel()), il, tl_, alpha, nll,
                T, C, max_len, blank, BLOCK_S=block_s, ACC=tl_acc(lp.dtype), num_warps=_recursion_warps(block_s),
                **assert_options(lp),
            )  # fmt: skip
    grad = _gradient(lp, targets, off, il, tl_, blank, max_len, zero_infinity, nll, alpha, gscale) if fuse else None
    return nll, alpha, grad


def ctc_bwd(
    lp: Tensor, targets: Tensor, off: Tensor, il: Tensor, tl_: Tensor, blank: int, max_len: int,
    zero_infinity: bool, nll: Tensor, alpha: Tensor, gscale: Tensor,
) -> Tensor:  # fmt: skip
    """torch's CTC gradient ``(T, N, C)`` in ``lp``'s dtype from the forward's ``nll`` and ``alpha``.

    Arguments as :func:`ctc_fwd`; ``gscale`` ``(N,)`` is the upstream gradient of each sequence's loss.
    """
    return _gradient(lp, targets, off, il, tl_, blank, max_len, zero_infinity, nll, alpha, gscale)


def _gradient(lp, targets, off, il, tl_, blank, max_len, zero_infinity, nll, alpha, gscale) -> Tensor:
    """Beta recursion with per-class sums, then the gradient rows."""
    T, N, C = lp.shape
    acc = acc_dtype(lp.dtype)
    grad = torch.empty((T, N, C), dtype=lp.dtype, device=lp.device)
    if grad.numel() == 0:
        return grad
    L = max_len
    perm, srt = _sorted_targets(targets, off, tl_, C, L)
    perm, srt = _nonempty(perm), _nonempty(srt)
    q = torch.empty((N, T, L + 1), dtype=acc, device=lp.device)
    block_s = max(16, next_pow2(2 * L + 1))
    gscale = gscale.to(acc).reshape(N).contiguous()
    with on_device(lp):
        _ctc_beta_kernel[(N,)](
            lp, *lp.stride(), _nonempty(targets), off, max(1, targets.numel()), il, tl_, alpha, nll, perm, srt, q,
            T, C, L, blank, BLOCK_S=block_s, BLOCK_L=max(16, next_pow2(L)), ACC=tl_acc(lp.dtype),
            num_warps=_recursion_warps(block_s), **assert_options(lp),
        )  # fmt: skip
        block_c = min(_ROW_TILE[lp.element_size()], max(128, next_pow2(C)))
        _ctc_grad_kernel[(T * N,)](
            lp, *lp.stride(), grad, q, srt, il, tl_, nll, gscale, T, N, C, L, blank,
            ZERO_INF=bool(zero_infinity), BLOCK_C=block_c, BLOCK_Q=max(16, next_pow2(L + 1)),
            ACC=tl_acc(lp.dtype), num_warps=_grad_warps(block_c, L),
        )  # fmt: skip
    return grad


# ---- the same launchers as torch.library custom ops, for traced calls ------------------------------


@torch.library.custom_op("triton_losses::ctc_fwd", mutates_args=())
def _ctc_fwd_op(
    lp: Tensor, targets: Tensor, off: Tensor, il: Tensor, tl_: Tensor, blank: int, max_len: int
) -> tuple[Tensor, Tensor]:
    """:func:`ctc_fwd` without the fused gradient, as a functional op: ``(nll, alpha)``."""
    nll, alpha, _ = ctc_fwd(lp, targets, off, il, tl_, blank, max_len, False, None, False)
    return nll, alpha


@_ctc_fwd_op.register_fake
def _(lp, targets, off, il, tl_, blank, max_len):
    T, N, _ = lp.shape
    acc = acc_dtype(lp.dtype)
    return lp.new_empty(N, dtype=acc), lp.new_empty((N, T, 2 * max_len + 1), dtype=acc)


@torch.library.custom_op("triton_losses::ctc_bwd", mutates_args=())
def _ctc_bwd_op(
    lp: Tensor, targets: Tensor, off: Tensor, il: Tensor, tl_: Tensor, blank: int, max_len: int,
    zero_infinity: bool, nll: Tensor, alpha: Tensor, gscale: Tensor,
) -> Tensor:  # fmt: skip
    """:func:`ctc_bwd` as a functional op (a new gradient tensor)."""
    return ctc_bwd(lp, targets, off, il, tl_, blank, max_len, zero_infinity, nll, alpha, gscale)


@_ctc_bwd_op.register_fake
def _(lp, targets, off, il, tl_, blank, max_len, zero_infinity, nll, alpha, gscale):
    return torch.empty(lp.shape, dtype=lp.dtype, device=lp.device)


def _traced_fwd(lp, targets, off, il, tl_, blank, max_len, zero_infinity, gscale, fuse):
    """:func:`ctc_fwd` through the custom op (``FUSES_GRAD`` is False there: ``fuse`` is never set)."""
    if fuse:
        raise ValueError("the traced CTC engine does not fuse the gradient into the forward")
    nll, alpha = _ctc_fwd_op(lp, targets, off, il, tl_, blank, max_len)
    return nll, alpha, None


TRACED = SimpleNamespace(
    FUSES_GRAD=False, max_target_length=max_target_length, ctc_fwd=_traced_fwd, ctc_bwd=_ctc_bwd_op, scale_=scale_
)
