"""Host-side pieces shared by the row-wise distillation losses (``jsd``, ``kl_div_with_logits``).

Both take two ``(*, V)`` tensors whose last dimension is the vocabulary, optional ``labels`` of
shape ``(*)`` that mask rows equal to ``ignore_index``, and one of four reductions:

* ``'none'``: the per-row loss, shape ``(*)`` (masked rows are 0);
* ``'sum'``: the sum over rows;
* ``'batchmean'``: the sum divided by the number of unmasked rows (NaN if there are none,
  like torch's ``mean`` of an empty set);
* ``'mean'``: the sum divided by (unmasked rows * V), the elementwise mean of ``kl_div``.

The denominators are computed on the device: no host sync.
"""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, cast

ROW_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def check_reduction(reduction: str) -> None:
    if reduction not in ROW_REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def validate(op: str, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None, names: tuple[str, str]):
    """Raise ``ValueError`` / ``TypeError`` (messages prefixed with ``op``) for calls this loss does not define."""
    na, nb = names
    for name, t in ((na, a), (nb, b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if a.dim() == 0 or a.shape[-1] == 0:
        raise ValueError(f"{op}: {na} must have a non-empty last (vocabulary) dimension, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{op}: {na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in FLOAT_DTYPES or b.dtype != a.dtype:
        raise TypeError(f"{op}: {na} and {nb} must share one floating dtype, got {a.dtype} and {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"{op}: {na} and {nb} must be on the same device, got {a.device} and {b.device}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise TypeError(f"{op}: labels must be an integer tensor")
        if labels.dtype == torch.bool:
            raise TypeError(f"{op}: labels must be an integer tensor, got torch.bool")
        if labels.shape != a.shape[:-1]:
            raise ValueError(
                f"{op}: labels must have shape {tuple(a.shape[:-1])} (the {na} shape without its last "
                f"dimension), got {tuple(labels.shape)}"
            )
        if labels.device != a.device:
            raise ValueError(f"{op}: labels must be on {a.device}, got {labels.device}")


def _rows_uniform(t: torch.Tensor) -> bool:
    """Whether ``t``'s leading dimensions flatten into one row dimension without a copy."""
    lead = [(n, st) for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n != 1]
    return all(lead[i][1] == lead[i + 1][1] * lead[i + 1][0] for i in range(len(lead) - 1))


def row_views(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None):
    """``(A, B, V)`` views of ``a`` and ``b`` (row ``a * B + b``) and ``(A, B)`` int64 labels.

    All rows as one ``(1, R, V)`` view when the row stride is uniform; otherwise the last two
    leading dimensions are kept apart (e.g. a shifted ``logits[:, :-1]`` slice needs no copy).
    Only a layout neither form describes is copied.
    """
    V = a.shape[-1]
    R = a.shape[:-1].numel()
    if _rows_uniform(a) and _rows_uniform(b):
        A, B = 1, R
    else:
        B = a.shape[-2]
        A = R // B if B else 0
    a3, b3 = a.reshape(A, B, V), b.reshape(A, B, V)
    lab = None if labels is None else labels.reshape(A, B).long()
    return a3, b3, lab


def denominator(labels, ignore_index: int, R: int, V: int, reduction: str, acc, device) -> torch.Tensor:
    """``(1,)`` divisor of the summed row losses, on the device."""
    if reduction in ("none", "sum"):
        return torch.ones(1, dtype=acc, device=device)
    if labels is None:
        n = torch.full((1,), float(R), dtype=acc, device=device)
    else:
        n = (labels != ignore_index).sum(dtype=acc).reshape(1)
    return n * V if reduction == "mean" else n


def finish(loss_rows: torch.Tensor, reduction: str, denom: torch.Tensor, out_dtype) -> torch.Tensor:
    """Reduce per-row losses (fp32/fp64) and cast to the output dtype."""
    if reduction == "none":
        return cast(loss_rows, out_dtype)
    total = loss_rows.sum()
    if reduction != "sum":
        total = total / denom[0]
    return cast(total, out_dtype)


def row_scale(gout: torch.Tensor, reduction: str, coef: torch.Tensor, acc) -> torch.Tensor:
    """Per-row gradient scale: ``(R,)`` for 'none', else ``(1,)`` = upstream * ``1 / denominator``."""
    if reduction == "none":
        return gout.reshape(-1).to(acc)
    return gout.to(acc).reshape(1) * coef
