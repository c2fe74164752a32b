"""Helpers shared by the row-loss families' public modules (``multi_margin``, ``embedding``).

A row-loss autograd Function gets per-row losses from its engine, the fused gradient of 'mean' /
'sum' from the same launch (scaled by :func:`fused_coef`), and with ``create_graph=True`` builds
its gradient from differentiable torch ops (:func:`torch_grads`) so that double backward works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _dispatch
from ._checks import TorchAccepted, raise_like_torch
from ._precision import acc_dtype
from ._reduce import finish_rows, row_scale


def delegate(op: str, torch_fn: Callable, args: tuple, x: torch.Tensor):
    """Hand the call to torch: its error comes back, or (backend ``auto``) its result.

    With ``TRITON_LOSSES_BACKEND=triton`` a call torch accepts raises ``NotImplementedError``
    (the kernels do not model it).
    """
    try:
        raise_like_torch(torch_fn, *args)
    except TorchAccepted as accepted:
        _dispatch.backend(x, op=op, unsupported="this combination of arguments")
        return accepted.result


def broadcast_shape(*shapes) -> tuple[int, ...] | None:
    """The broadcast of ``shapes`` (numpy's rules), or None when they do not broadcast.

    Plain Python: ``torch.broadcast_shapes`` took about 1 ms per call on the 2-core CPU (its
    symbolic-shape machinery), more than a small loss itself.
    """
    out: list[int] = []
    for shape in shapes:
        shape = tuple(shape)
        if len(shape) > len(out):
            out = [1] * (len(shape) - len(out)) + out
        for i, n in enumerate(shape, len(out) - len(shape)):
            if n != out[i]:
                if out[i] == 1:
                    out[i] = n
                elif n != 1:
                    return None
    return tuple(out)


def may_fuse() -> bool:
    """Whether a forward may compute its gradient too: grad mode on, and not while dynamo traces (a
    CUDA-graph capture fuses as the eager warm-up did, so it launches the kernels that warm-up compiled).

    Read before ``Function.apply`` (inside ``forward`` grad mode is always off, and
    ``ctx.needs_input_grad`` is True for inputs requiring grad even under ``torch.no_grad()``).
    """
    return torch.is_grad_enabled() and not _dispatch.compiling()


def fused_coef(reduction: str, R: int, acc: torch.dtype, device) -> torch.Tensor:
    """``(1,)`` scale of a fused gradient: ``1/R`` for 'mean', 1 for 'sum'."""
    return torch.full((1,), 1.0 / max(R, 1) if reduction == "mean" else 1.0, dtype=acc, device=device)


def row_count(R: int, acc: torch.dtype, device) -> torch.Tensor:
    """``(1,)`` divisor of the summed row losses for 'mean': the row count (0 rows give NaN)."""
    return torch.full((1,), float(R), dtype=acc, device=device)


def row_coef(reduction: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`fused_coef` of the ``x.shape[0]`` rows of ``x``, in the accumulation dtype of ``dtype``."""
    return fused_coef(reduction, x.shape[0], acc_dtype(dtype), x.device)


def finish(loss: torch.Tensor, reduction: str, R: int, coef: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """A Function's output from the engine's ``(R,)`` row losses: themselves ('none'), or their sum / mean.

    ``coef`` (from :func:`row_coef`) gives the accumulation dtype and device of the 'mean' divisor.
    """
    return finish_rows(loss, reduction, row_count(R, coef.dtype, coef.device), out_dtype)


def upstream(ctx, gout: torch.Tensor, coef: torch.Tensor) -> tuple:
    """``(gscale, fused)`` in a backward: the per-row gradient scale (``(R,)`` or ``(1,)``, see
    ``_reduce.row_scale``) and the forward's fused gradients, taken once (:func:`take_fused`)."""
    return row_scale(gout, ctx.reduction, coef, coef.dtype), take_fused(ctx)


def scale_fused(eng, fused, gout: torch.Tensor) -> None:
    """Multiply each fused gradient in ``fused`` (None entries skipped) in place by the upstream gradient."""
    for g in fused:
        if g is not None:
            eng.scale_(g, gout.reshape(1))


def torch_grads(rows_fn: Callable, inputs: tuple, needs: tuple, gscale: torch.Tensor) -> tuple:
    """Differentiable gradients of ``sum(gscale * rows_fn(*inputs))`` w.r.t. the inputs in ``needs``.

    Args:
        rows_fn: per-row losses ``(R,)`` from differentiable torch ops.
        inputs: its tensor arguments (the Function's saved inputs).
        needs: which inputs get a gradient.
        gscale: ``(R,)`` per-row upstream gradients, or ``(1,)`` shared by every row.

    Returns:
        One gradient (or None) per input, with a graph (``create_graph=True``).
    """
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        rows = rows_fn(*inputs)
        got = torch.autograd.grad(rows, wanted, gscale.expand(rows.shape).to(rows.dtype), create_graph=True)
    it = iter(got)
    return tuple(next(it) if need else None for need in needs)


def take_fused(ctx):
    """The fused gradients saved by the forward, once (a second backward recomputes)."""
    fused, ctx.fused = ctx.fused, None
    return fused
