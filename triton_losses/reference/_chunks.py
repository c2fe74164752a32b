"""The reference engines' chunking: every chunked PyTorch loss walks its tensors with these helpers.

Speed on a CPU comes from the number of passes over a chunk, so each chunk is computed with
in-place / ``out=`` ops, straight into the output when it is in the compute dtype (fp32 / fp64
data), and chunks are small enough that the few temporaries stay in the L2 cache between passes.
"""

from __future__ import annotations

import torch

from .._precision import acc_dtype

# 256 KiB of fp32 per chunk: a chunk's operands and temporaries (about four) stay in a 2 MiB L2
# cache between the passes, while each op still runs long enough (~10 us) that the per-op host
# overhead (~2 us) stays small. On the 2-core benchmark machine this was the fastest of 16K-256K
# elements for BCE and KL forward+backward: 16K ran ~1.4x slower (overhead), 256K ~10% (L2 misses).
CHUNK_ELEMS = 1 << 16


def chunks(shape: torch.Size):
    """Index tuples covering ``shape`` with about CHUNK_ELEMS elements each (``...`` for 0-d).

    Slices of the leading dimension; where one leading index alone holds more than CHUNK_ELEMS
    elements, each leading index with the rest of the shape chunked the same way.
    """
    if len(shape) == 0:
        yield ...  # a 0-d tensor: the whole of it
        return
    inner = shape[1:].numel()
    if len(shape) > 1 and inner > CHUNK_ELEMS:
        for i in range(shape[0]):
            for rest in chunks(shape[1:]):
                yield (i, *rest)
        return
    step = max(1, CHUNK_ELEMS // max(1, inner))
    for a0 in range(0, shape[0], step):
        yield (slice(a0, min(shape[0], a0 + step)),)


def row_chunks(R: int, width: int, elems: int | None = None):
    """``(r0, r1)`` bounds of row blocks of ``(R, width)`` rows, about ``elems`` (default CHUNK_ELEMS)
    elements each (1 row at least)."""
    step = max(1, (CHUNK_ELEMS if elems is None else elems) // max(1, width))
    for r0 in range(0, R, step):
        yield r0, min(R, r0 + step)


def row_factor(f: torch.Tensor, r0: int, r1: int, acc: torch.dtype) -> torch.Tensor:
    """Rows ``r0:r1`` of a per-row factor in ``acc``: ``(r1 - r0,)`` of an ``(R,)`` one, ``(1,)`` when shared."""
    f = f.to(acc).reshape(-1)
    return f[r0:r1] if f.numel() > 1 else f


def empty_if(x: torch.Tensor, want: bool, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """An uninitialised tensor of ``x``'s shape (its dtype unless ``dtype``) when ``want``, else None."""
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device) if want else None


def part(t: torch.Tensor | None, idx, acc: torch.dtype) -> torch.Tensor | None:
    """Chunk ``idx`` of ``t`` in ``acc`` (a view, no copy, when ``t`` already is ``acc``)."""
    if t is None:
        return None
    return t[idx] if t.dtype == acc else t[idx].to(acc)


def direct(out: torch.Tensor | None, idx, acc: torch.dtype) -> torch.Tensor | None:
    """``out[idx]`` when results in ``acc`` can be computed straight into it, else None (compute, then copy)."""
    return out[idx] if out is not None and out.dtype == acc else None


def store(out: torch.Tensor | None, idx, value: torch.Tensor, dst: torch.Tensor | None) -> None:
    """Finish ``out[idx] = value`` unless ``value`` was computed in place (``dst``)."""
    if out is not None and dst is None:
        out[idx] = value


def negated(g: torch.Tensor, acc: torch.dtype) -> torch.Tensor | None:
    """``-g`` as a 0-d tensor when ``g`` is one value expanded ('mean' / 'sum'), else None.

    Then ``x * -g`` is one pass where ``-(x * g)`` is two (negation is exact: the same result).
    """
    return -g[(0,) * g.dim()].to(acc) if g.numel() and not any(g.stride()) else None


def elementwise_forward(x: torch.Tensor, reduce: bool, loss_into) -> torch.Tensor:
    """Chunk by chunk: partial sums (one per chunk) if ``reduce``, else the loss in ``x``'s shape and dtype.

    ``loss_into(idx, dst)`` returns the fp32 (fp64) loss of chunk ``idx``, computed into ``dst``
    when ``dst`` is not None (``out[idx]`` itself for 'none' on fp32 / fp64 data).
    """
    acc = acc_dtype(x.dtype)
    out = None if reduce else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    parts = []
    for idx in chunks(x.shape):
        dst = direct(out, idx, acc)
        loss = loss_into(idx, dst)
        if reduce:
            parts.append(loss.sum().reshape(1))
        store(out, idx, loss, dst)
    if reduce:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=acc, device=x.device)
    return out
