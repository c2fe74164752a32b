"""The chunk loops of the fused elementwise references (regression, margin).

A family supplies ``math(a, b, c, gs, want_loss, reduce, needs, loss_dst, grad_dsts)`` for one chunk
of its three operands (in the compute dtype; ``c`` may be None) that returns ``(loss, [da, db, dc])``:
the loss of the chunk (or, with ``reduce``, its sum as a 0-d tensor), and the gradients asked for by
``needs`` multiplied by ``gs`` (a number, a 0-d tensor or a chunk of the upstream gradient). Results
are computed into ``loss_dst`` / ``grad_dsts`` where those are not None (the output's own chunk
when it is in the compute dtype). The loops below walk the broadcast shape in chunks of about
``CHUNK_ELEMS`` elements, so no full-size fp32 temporary is ever held, and the forward writes the
gradients of a reduced loss in the same pass over each chunk.
"""

from __future__ import annotations

import torch

from ._chunks import chunks, direct, part, store
from .cross_entropy import scale_ as _eager_scale_


def scale_(g: torch.Tensor, factor: torch.Tensor) -> None:
    """``g *= factor`` in place; in eager mode skipped when ``factor == 1`` (a CPU read, not a device sync).

    While tracing (``torch.compile``) the factor's value is unknown, so ``g`` is always multiplied.
    """
    if torch.compiler.is_compiling():
        g.mul_(factor.reshape(()).to(g.dtype))
    else:
        _eager_scale_(g, factor)


def acc_of(out_dtype: torch.dtype, *operands: torch.Tensor | None) -> torch.dtype:
    """fp64 when the output or an operand is fp64, else fp32 (as the kernels choose)."""
    wide = out_dtype == torch.float64 or any(t is not None and t.dtype == torch.float64 for t in operands)
    return torch.float64 if wide else torch.float32


def _scalar_view(g: torch.Tensor, acc: torch.dtype) -> torch.Tensor | None:
    """``g``'s one value as a 0-d ``acc`` tensor when every stride is 0 ('mean' / 'sum'), else None."""
    return g[(0,) * g.dim()].to(acc) if g.numel() and not any(g.stride()) else None


def forward(math, operands: list, out_dtype: torch.dtype, reduce: bool, scale: float, g, needs) -> tuple:
    """The loss ('none') or one partial sum per chunk, and with ``reduce`` the gradients of the reduced loss.

    Args:
        math: the family's chunk function (see the module docstring).
        operands: three tensors expanded to one shape, or None.
        out_dtype: the loss's dtype when not ``reduce``.
        reduce: return partial sums (fp32, fp64 with fp64 data) instead of the loss.
        scale: the gradients' factor (``1 / numel`` for 'mean'); ``g`` (one value) multiplies it.
        g: a one-element tensor, or None.
        needs: which gradients to write (``reduce`` only).

    Returns:
        ``(out, da, db, dc)`` at the shape (gradients in their operand's dtype, None where not asked).
    """
    a = operands[0]
    shape, acc = a.shape, acc_of(out_dtype, *operands)
    needs = tuple(bool(n) and reduce for n in needs)
    out = None if reduce else torch.empty(shape, dtype=out_dtype, device=a.device)
    grads = [torch.empty(shape, dtype=t.dtype, device=a.device) if n else None for t, n in zip(operands, needs)]
    gs = scale if g is None else g.reshape(()).to(acc) * scale
    parts = []
    for idx in chunks(shape):
        dsts = [direct(d, idx, acc) for d in grads]
        ldst = direct(out, idx, acc)
        loss, ds = math(*(part(t, idx, acc) for t in operands), gs, True, reduce, needs, ldst, dsts)
        if reduce:
            parts.append(loss.reshape(1))
        else:
            store(out, idx, loss, ldst)
        for d, value, dst in zip(grads, ds, dsts):
            if d is not None:
                store(d, idx, value, dst)
    if not reduce:
        return out, None, None, None
    partials = torch.cat(parts) if parts else torch.zeros(0, dtype=acc, device=a.device)
    return partials, *grads


def backward(math, operands: list, g: torch.Tensor, needs) -> tuple:
    """Gradients of ``sum(g * loss)`` at the broadcast shape (None where not asked); ``g`` expanded to it."""
    a = operands[0]
    shape, acc = a.shape, acc_of(a.dtype, *operands)
    grads = [torch.empty(shape, dtype=t.dtype, device=a.device) if n else None for t, n in zip(operands, needs)]
    if not any(needs):
        return tuple(grads)
    g0 = _scalar_view(g, acc)
    for idx in chunks(shape):
        dsts = [direct(d, idx, acc) for d in grads]
        gs = g0 if g0 is not None else part(g, idx, acc)
        _, ds = math(*(part(t, idx, acc) for t in operands), gs, False, False, needs, None, dsts)
        for d, value, dst in zip(grads, ds, dsts):
            if d is not None:
                store(d, idx, value, dst)
    return tuple(grads)
