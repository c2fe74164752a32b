"""Reductions and their denominators, in one place for every family.

Engines return per-element losses or fp32 (fp64) partial sums, or per-row losses; the public
modules finish the reduction here. Denominators are computed on the device, so nothing syncs.

* Elementwise losses: ``'mean'`` divides by the element count (0 elements give NaN, as torch).
* Index-target losses (cross-entropy, NLL): ``'mean'`` divides by the summed class weights of the
  non-ignored targets (their count without weights); probability targets divide by the row count.
* Row losses with a ``batchmean`` (distillation): ``'batchmean'`` divides by the unmasked row
  count, ``'mean'`` by that count times the row length.
"""

from __future__ import annotations

import torch

from ._precision import acc_dtype

ROW_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, but ``t`` itself when it already has that dtype.

    Autograd Functions build their outputs with this: under ``torch.compile``, torch 2.11's dynamo
    gives an output made by a no-op ``.to()`` of another traced value a zero upstream gradient
    (seen on the CPU with torch 2.11.0; torch 2.13 is not affected).
    """
    return t if t.dtype == dtype else t.to(dtype)


def check_row_reduction(reduction: str) -> None:
    """``ValueError`` with torch's wording for a reduction outside :data:`ROW_REDUCTIONS`."""
    if reduction not in ROW_REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


# ---- elementwise losses ---------------------------------------------------------------------


def finish_elementwise(partials: torch.Tensor, reduction: str, numel: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum an engine's partial sums; ``'mean'`` divides by ``numel`` (0 elements give NaN, as torch)."""
    total = partials.sum()
    if reduction == "mean":
        total = total / numel
    return cast(total, out_dtype)


def elementwise_upstream(gout: torch.Tensor, reduction: str, numel: int, shape: torch.Size) -> torch.Tensor:
    """The upstream gradient of every element, as a view expanded to ``shape``.

    For ``'mean'`` / ``'sum'`` a stride-0 view of one fp32 (fp64) value: no input-sized tensor of
    ones is ever made.
    """
    if reduction == "none":
        return gout.expand(shape)
    g = gout.to(acc_dtype(gout.dtype))
    if reduction == "mean":
        g = g / numel
    return g.reshape(()).expand(shape)


# ---- index-target losses (cross-entropy, NLL) ------------------------------------------------


def target_weight_sum(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, C: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(1,)`` summed class weights of the non-ignored index targets (their count without weights)."""
    tl = target.reshape(-1).long()
    valid = tl != ignore_index
    if weight is None:
        return valid.sum(dtype=dtype).reshape(1)
    w = weight.to(dtype)[tl.clamp(0, max(C - 1, 0))] if C else torch.zeros_like(tl, dtype=dtype)
    return torch.where(valid, w, torch.zeros_like(w)).sum().reshape(1)


# ---- row losses with labels (distillation) ---------------------------------------------------


def row_denominator(labels, ignore_index: int, R: int, V: int, reduction: str, acc, device) -> torch.Tensor:
    """``(1,)`` divisor of summed row losses: 1, the unmasked row count, or that count times ``V``."""
    if reduction in ("none", "sum"):
        return torch.ones(1, dtype=acc, device=device)
    if labels is None:
        n = torch.full((1,), float(R), dtype=acc, device=device)
    else:
        n = (labels != ignore_index).sum(dtype=acc).reshape(1)
    return n * V if reduction == "mean" else n


def finish_rows(loss_rows: torch.Tensor, reduction: str, denom: torch.Tensor, out_dtype) -> torch.Tensor:
    """Reduce per-row losses (fp32 / fp64): ``'none'`` returns them, else their sum over ``denom``."""
    if reduction == "none":
        return cast(loss_rows, out_dtype)
    total = loss_rows.sum()
    if reduction != "sum":
        total = total / denom[0]
    return cast(total, out_dtype)


def row_scale(gout: torch.Tensor, reduction: str, coef: torch.Tensor, acc) -> torch.Tensor:
    """Per-row gradient scale: ``(R,)`` for ``'none'``, else ``(1,)`` = upstream * ``coef``."""
    if reduction == "none":
        return gout.reshape(-1).to(acc)
    return gout.to(acc).reshape(1) * coef
