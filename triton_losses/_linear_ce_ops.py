"""How ``linear_cross_entropy``'s chunked engine runs: directly in eager mode, as custom ops while tracing.

The chunk loop (``_linear_ce_chunks.run``) writes each chunk's gradient into a reused buffer and
launches the cross-entropy engine on raw pointers, which dynamo cannot trace ("does not know how to
trace method ``data_ptr``"). While tracing (``_dispatch.tracing()``: ``torch.compile``, and CUDA-graph
capture, where the ops simply run) the same loop therefore runs inside two ``torch.library`` custom
ops, ``triton_losses::linear_ce_fwd`` and ``linear_ce_bwd``:
functional (they return fresh tensors and mutate nothing), with fake implementations that give the
output shapes, so dynamo keeps each call as one opaque node. Inside them the loop runs as in eager
mode; nothing is compacted there (the caller passes ``rows=None`` while tracing), so the outputs'
shapes never depend on the data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch
from . import _linear_ce_chunks as chunks
from ._precision import acc_dtype
from .options import CESpec

_OP = "linear_cross_entropy"


def _engine(*tensors: Tensor):
    """The cross-entropy engine for a chunk loop run inside the custom ops (resolved when they run, never
    while dynamo traces: the kernels module itself, as in eager mode, or the reference)."""
    return _dispatch.engine("cross_entropy", *tensors, op=_OP)


def _problem(x, w, b, t, weight, ignore_index, smoothing, z_loss, softcap, prob, classes, chunk, wgrad):
    """The ``Problem`` of the custom ops' arguments (every row computed; ``softcap <= 0`` is none)."""
    wsum = None if weight is None else weight.sum(dtype=acc_dtype(x.dtype)).reshape(1)
    spec = CESpec(weight, wsum, ignore_index, smoothing, z_loss, softcap if softcap > 0 else None, prob, False)
    return chunks.Problem(x, w, b, t, spec, classes, None, x.shape[0], chunk, wgrad)


def _op_args(p: chunks.Problem) -> tuple:
    """The custom ops' leading arguments for ``p`` (which must compute every row)."""
    assert p.rows is None, "rows are never compacted while tracing"
    s = p.spec
    softcap = 0.0 if s.softcap is None else float(s.softcap)
    return (p.x, p.w, p.b, p.t, s.weight, s.ignore_index, s.smoothing, s.z_loss, softcap, s.prob_target,
            p.classes, p.chunk, p.wgrad)  # fmt: skip


def _or_empty(v: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if v is None else v


def _grad_shapes(x, w, need):
    """``(shape, dtype)`` of the gradients of ``x``, ``w`` and the bias (``(0,)`` where not needed)."""
    shapes = (tuple(x.shape), tuple(w.shape), (w.shape[0],))
    return [(shape if n else (0,), x.dtype) for shape, n in zip(shapes, need)]


@torch.library.custom_op("triton_losses::linear_ce_fwd", mutates_args=())
def linear_ce_fwd(
    x: Tensor, w: Tensor, b: Tensor | None, t: Tensor, weight: Tensor | None,
    ignore_index: int, smoothing: float, z_loss: float, softcap: float, prob: bool,
    classes: int, chunk: int, wgrad: torch.dtype, coef: Tensor, need: list[bool], per_row: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(total, rows_loss, stats, grad_input, grad_weight, grad_bias)`` of ``run``; absent ones are ``(0,)``."""
    p = _problem(x, w, b, t, weight, ignore_index, smoothing, z_loss, softcap, prob, classes, chunk, wgrad)
    res = chunks.run(_engine(x, w, t), p, coef, tuple(need), per_row=per_row)
    return (res.total, _or_empty(res.rows_loss, res.stats), res.stats, *(_or_empty(g, x) for g in res.grads))


@linear_ce_fwd.register_fake
def _(x, w, b, t, weight, ignore_index, smoothing, z_loss, softcap, prob, classes, chunk, wgrad, coef, need, per_row):
    acc = acc_dtype(x.dtype)
    positions = x.shape[0] * (w.shape[0] // classes)
    grads = (x.new_empty(shape, dtype=dtype) for shape, dtype in _grad_shapes(x, w, need))
    rows = x.new_empty(positions if per_row else 0, dtype=acc)
    return x.new_empty((), dtype=acc), rows, x.new_empty(positions, 2, dtype=acc), *grads


@torch.library.custom_op("triton_losses::linear_ce_bwd", mutates_args=())
def linear_ce_bwd(
    x: Tensor, w: Tensor, b: Tensor | None, t: Tensor, weight: Tensor | None,
    ignore_index: int, smoothing: float, z_loss: float, softcap: float, prob: bool,
    classes: int, chunk: int, wgrad: torch.dtype, coef: Tensor, need: list[bool], stats: Tensor, gout: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(grad_input, grad_weight, grad_bias)`` recomputed from the forward's ``stats``; absent ones are ``(0,)``."""
    p = _problem(x, w, b, t, weight, ignore_index, smoothing, z_loss, softcap, prob, classes, chunk, wgrad)
    res = chunks.run(_engine(x, w, t), p, coef, tuple(need), stats=stats, gout=gout)
    return tuple(_or_empty(g, x) for g in res.grads)


@linear_ce_bwd.register_fake
def _(
    x, w, b, t, weight, ignore_index, smoothing, z_loss, softcap, prob, classes, chunk, wgrad, coef, need, stats, gout
):
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in _grad_shapes(x, w, need))


def _grads(outs, need) -> chunks.Grads:
    return chunks.Grads(*(g if n else None for g, n in zip(outs, need)))


def forward(eng, p: chunks.Problem, coef: Tensor, need: tuple[bool, bool, bool], per_row: bool) -> chunks.Result:
    """The forward pass of ``_linear_ce_chunks.run`` with cross-entropy engine ``eng`` (see there)."""
    if not _dispatch.tracing():
        return chunks.run(eng, p, coef, need, per_row=per_row)
    total, rows_loss, stats, *grads = linear_ce_fwd(*_op_args(p), coef, list(need), per_row)
    return chunks.Result(total, rows_loss if per_row else None, stats, _grads(grads, need))


def backward(eng, p: chunks.Problem, coef: Tensor, need, stats: Tensor, gout: Tensor) -> chunks.Grads:
    """The backward pass of ``_linear_ce_chunks.run``: gradients from the forward's ``stats`` and ``gout``."""
    if not _dispatch.tracing():
        return chunks.run(eng, p, coef, need, stats=stats, gout=gout).grads
    return _grads(linear_ce_bwd(*_op_args(p), coef, list(need), stats, gout), need)


def scale(eng, grads: chunks.Grads, gout: Tensor) -> tuple[Tensor | None, ...]:
    """The forward's fused gradients times the upstream ``gout`` (one value).

    Eager: in place (the engine's ``scale_`` is a device-side no-op for the usual 1.0), so the caller
    must not use them again. While tracing: new tensors, the saved ones untouched (a traced graph
    can be backpropagated through again without recomputing them).
    """
    factor = gout.reshape(1)
    if _dispatch.tracing():
        return tuple(None if g is None else g * factor.to(g.dtype) for g in grads)
    for g in grads:
        if g is not None:
            eng.scale_(g, factor)
    return tuple(grads)
