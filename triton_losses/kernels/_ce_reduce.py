"""Cross-entropy's per-call reductions: the denominator before the row kernel and the reduced loss after it.

``_ce_norm_kernel`` (one program) writes ``[sum of the class weights, 'mean' denominator, gradient
coefficient]``; ``_ce_finish_kernel`` (one program) sums the per-row losses (divided by the denominator
for 'mean') and casts to the output dtype. Over many rows (above ``SPLIT_STEPS`` steps of one program)
each starts with a first stage of up to ``SPLIT_PROGRAMS`` programs (``_ce_split_sum_kernel``), whose
partials the single program then sums: one more launch, the same bits every call. No host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._precision import acc_dtype
from ..options import CESpec
from ._common import on_device, row_offsets, tl_acc


@triton.jit
def _target_weight_sum(t_ptr, s_ta, s_tb, w_ptr, s_w, lo, n, R, C, B, ignore_index,
                       HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Summed class weights (count without weights) of the non-ignored index targets of rows ``[lo, lo + n)``
    (those below ``R``); an out-of-range target reads a clamped class."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], ACC)
    for r0 in range(0, n, BLOCK):
        rows = lo + r0 + offs
        rmask = rows < R
        tgt = tl.load(t_ptr + row_offsets(rows, B, s_ta, s_tb), mask=rmask, other=0).to(tl.int64)
        valid = rmask & (tgt != ignore_index)
        if HAS_WEIGHT:
            tsafe = tl.minimum(tl.maximum(tgt, 0), C - 1)
            acc += tl.load(w_ptr + tsafe * s_w, mask=valid, other=0.0).to(ACC)
        else:
            acc += tl.where(valid, 1.0, 0.0).to(ACC)
    return tl.sum(acc, 0)


@triton.jit
def _row_sum(x_ptr, lo, n, R, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """``sum(x[lo : min(lo + n, R)])`` in ``ACC``."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], ACC)
    for r0 in range(0, n, BLOCK):
        rows = lo + r0 + offs
        acc += tl.load(x_ptr + rows, mask=rows < R, other=0.0).to(ACC)
    return tl.sum(acc, 0)


@triton.jit
def _ce_split_sum_kernel(
    t_ptr, s_ta, s_tb,  # index targets (A, B) (TARGETS)
    w_ptr, s_w,  # class weights (C,) with their stride (TARGETS and HAS_WEIGHT)
    x_ptr,  # per-row values (R,) to sum (not TARGETS)
    part_ptr,  # (programs,) ACC: this program's sum
    R, C, B, ignore_index, rows_per,  # rows_per: rows of one program, a multiple of BLOCK
    TARGETS: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The first stage of a reduction over many rows: program ``p`` sums rows ``[p * rows_per, + rows_per)``,
    of the targets' class weights (TARGETS: the 'mean' denominator) or of ``x``. A fixed grid and order,
    so the result is deterministic; the single-program kernels then sum the partials."""
    lo = tl.program_id(0).to(tl.int64) * rows_per
    if TARGETS:
        total = _target_weight_sum(t_ptr, s_ta, s_tb, w_ptr, s_w, lo, rows_per, R, C, B, ignore_index,
                                   HAS_WEIGHT, BLOCK, ACC)  # fmt: skip
    else:
        total = _row_sum(x_ptr, lo, rows_per, R, BLOCK, ACC)
    tl.store(part_ptr + tl.program_id(0), total)


_PART_BLOCK = tl.constexpr(1024)  # SPLIT_PROGRAMS partials: one step


@triton.jit
def _ce_norm_kernel(
    t_ptr, s_ta, s_tb,  # index targets (A, B)
    w_ptr, s_w,  # class weights (C,) with their stride
    out_ptr,  # (3,) fp32 (fp64): [weight sum, 'mean' denominator, gradient coefficient]
    part_ptr, P,  # the denominator's P partial sums (_ce_split_sum_kernel), read instead of the targets (PARTIALS)
    R, C, B, ignore_index,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, MEAN: tl.constexpr, PARTIALS: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One program: the class-weight sum, the 'mean' denominator and ``1 / denominator`` (MEAN) or 1.

    ``_PART_BLOCK``: the tile over the partials (a ``BLOCK``-wide fp64 one made sm_80's ptxas spill the
    weight sum across that loop)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    if HAS_WEIGHT:
        for c0 in range(0, C, BLOCK):
            cols = c0 + offs
            acc += tl.load(w_ptr + cols.to(tl.int64) * s_w, mask=cols < C, other=0.0).to(ACC)
        wsum = tl.sum(acc, 0)
    else:
        wsum = tl.zeros([], ACC) + C
    if PROB_TARGET:
        denom = tl.zeros([], ACC) + R
    elif PARTIALS:
        denom = _row_sum(part_ptr, 0, P, P, _PART_BLOCK, ACC)
    else:
        denom = _target_weight_sum(t_ptr, s_ta, s_tb, w_ptr, s_w, 0, R, R, C, B, ignore_index,
                                   HAS_WEIGHT, BLOCK, ACC)  # fmt: skip
    coef = tl.full([], 1.0, ACC)
    if MEAN:
        coef = 1.0 / denom
    tl.store(out_ptr, wsum)
    tl.store(out_ptr + 1, denom)
    tl.store(out_ptr + 2, coef)


@triton.jit
def _ce_finish_kernel(
    loss_ptr,  # per-row losses (R,) fp32 (fp64)
    norm_ptr,  # (3,) from _ce_norm_kernel: the denominator is norm[1] (MEAN)
    out_ptr,  # (1,) the reduced loss in the output dtype
    R,
    MEAN: tl.constexpr, NAN_IF_ZERO: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One program: ``sum(loss)`` ('sum') or ``sum(loss) / denominator`` ('mean'), cast to the output dtype
    (``loss`` may be the partial sums of :func:`_ce_split_sum_kernel`)."""
    total = _row_sum(loss_ptr, 0, R, R, BLOCK, ACC)
    if MEAN:
        denom = tl.load(norm_ptr + 1).to(ACC)
        total = total / denom
        if NAN_IF_ZERO:
            total = tl.where(denom == 0.0, float("nan"), total)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


# The single-program reductions take thousands of rows a step with 8 warps (each step waits one memory
# latency): the denominator 2048 (a class-weight gather per target; 4096 made triton 3.6's ptxas spill),
# the final sum 4096 (R = 8192 rows, an LM batch: 4 and 2 steps, not 8 as with 1024).
_NORM_BLOCK, _NORM_WARPS = 2048, 8
# Above SPLIT_STEPS steps of one program (K-dim inputs: 8 x 512 x 512 pixels are 2M rows, 1024 steps of one
# SM's bandwidth, longer than the forward over their few classes), a first stage of at most SPLIT_PROGRAMS
# programs of at least SPLIT_STEPS steps each sums the rows, and the single program sums its partials.
SPLIT_STEPS, SPLIT_PROGRAMS = 16, 1024


def _split(R: int, block: int) -> tuple[int, int]:
    """``(programs, rows per program)`` of the first stage over ``R`` rows, or ``(0, 0)``: one program."""
    if triton.cdiv(R, block) <= SPLIT_STEPS:
        return 0, 0
    rows_per = block * max(SPLIT_STEPS, triton.cdiv(R, block * SPLIT_PROGRAMS))
    return triton.cdiv(R, rows_per), rows_per


def ce_norm(x: torch.Tensor, t: torch.Tensor, spec: CESpec, mean: bool) -> torch.Tensor:
    """``(3,)`` fp32 (fp64) ``[sum of the class weights, 'mean' denominator, gradient coefficient]``.

    One single-program launch (no host sync), after a first stage over many rows (``_split``). See
    ``reference.cross_entropy.ce_norm``.
    """
    A, C, B = x.shape
    R = A * B
    out = torch.empty(3, dtype=acc_dtype(x.dtype), device=x.device)
    w = spec.weight
    targets = dict(t_ptr=t, s_ta=t.stride(0), s_tb=t.stride(-1) if not spec.prob_target else 0,
                   w_ptr=w if w is not None else out, s_w=w.stride(0) if w is not None else 0)  # fmt: skip
    programs, rows_per = (0, 0) if spec.prob_target else _split(R, _NORM_BLOCK)
    part = out
    with on_device(x):
        if programs:
            part = torch.empty(programs, dtype=out.dtype, device=x.device)
            _ce_split_sum_kernel[(programs,)](
                **targets, x_ptr=part, part_ptr=part, R=R, C=C, B=B, ignore_index=spec.ignore_index,
                rows_per=rows_per, TARGETS=True, HAS_WEIGHT=w is not None,
                BLOCK=_NORM_BLOCK, ACC=tl_acc(x.dtype), num_warps=_NORM_WARPS,
            )  # fmt: skip
        _ce_norm_kernel[(1,)](
            **targets, out_ptr=out, part_ptr=part, P=programs, R=R, C=C, B=B, ignore_index=spec.ignore_index,
            HAS_WEIGHT=w is not None, PROB_TARGET=spec.prob_target, MEAN=mean, PARTIALS=programs > 0,
            BLOCK=_NORM_BLOCK, ACC=tl_acc(x.dtype), num_warps=_NORM_WARPS,
        )  # fmt: skip
    return out


_FINISH_BLOCK, _FINISH_WARPS = 4096, 8


def ce_finish(loss: torch.Tensor, norm: torch.Tensor, spec: CESpec, reduction: str, out_dtype) -> torch.Tensor:
    """The reduced loss in ``out_dtype`` (one single-program launch, after a first stage over many rows;
    'none' only casts).

    See ``reference.cross_entropy.ce_finish`` for the 'mean' rule with a zero denominator.
    """
    if reduction == "none":
        return loss if loss.dtype == out_dtype else loss.to(out_dtype)
    out = torch.empty((), dtype=out_dtype, device=loss.device)
    R = loss.numel()
    programs, rows_per = _split(R, _FINISH_BLOCK)
    with on_device(loss):
        if programs:
            part = torch.empty(programs, dtype=loss.dtype, device=loss.device)
            _ce_split_sum_kernel[(programs,)](
                t_ptr=part, s_ta=0, s_tb=0, w_ptr=part, s_w=0, x_ptr=loss, part_ptr=part,
                R=R, C=0, B=1, ignore_index=0, rows_per=rows_per, TARGETS=False, HAS_WEIGHT=False,
                BLOCK=_FINISH_BLOCK, ACC=tl_acc(loss.dtype), num_warps=_FINISH_WARPS,
            )  # fmt: skip
            loss, R = part, programs
        _ce_finish_kernel[(1,)](
            loss_ptr=loss, norm_ptr=norm, out_ptr=out, R=R,
            MEAN=reduction == "mean", NAN_IF_ZERO=spec.smoothing > 0.0,
            BLOCK=_FINISH_BLOCK, ACC=tl_acc(loss.dtype), num_warps=_FINISH_WARPS,
        )  # fmt: skip
    return out
