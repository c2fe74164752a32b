"""Pure-PyTorch softmax / log-softmax with the kernels' interface: the CPU fallback.

The same formulas as ``kernels.softmax``, in fp32 (fp64 for fp64 input), over chunks of rows:
the forward writes ``(x - m) - log(s)`` or ``exp(x - m) / s`` and keeps the per-row statistics
``(m, s)`` (``m`` the row maximum, ``s = sum(exp(x - m))``); the backward recomputes
``p = exp(x - m) / s`` in fp32 from the input and those statistics, never from the rounded output.
"""

from __future__ import annotations

import torch

from .._precision import acc_dtype
from ._chunks import CHUNK_ELEMS


def _chunks(A: int, C: int, B: int):
    step = max(1, CHUNK_ELEMS // max(1, C * B))
    for a0 in range(0, A, step):
        yield a0, min(A, a0 + step)


def softmax_fwd(x: torch.Tensor, log: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax`` / ``softmax`` of ``x`` ``(A, C, B)`` along C.

    Returns:
        ``(y, stats)``: ``y`` ``(A, C, B)`` contiguous in ``x``'s dtype; ``stats`` ``(A * B, 2)``
        per-row ``(max, sum of exp(x - max))`` in fp32 (fp64 for fp64), for :func:`softmax_bwd`.
    """
    A, C, B = x.shape
    acc = acc_dtype(x.dtype)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    stats = torch.empty(A, B, 2, dtype=acc, device=x.device)
    if A * B == 0 or C == 0:
        return y, stats.view(-1, 2)
    for a0, a1 in _chunks(A, C, B):
        xs = x[a0:a1].to(acc)
        m = xs.amax(1)
        shift = m.masked_fill(m == float("-inf"), 0.0)
        d = xs - shift[:, None]
        e = d.exp()
        s = e.sum(1)
        # log: (x - m) - log(s); an all -inf row (shift 0, s 0) is -inf - -inf = NaN, as torch's
        y[a0:a1] = d.sub_(s.log()[:, None]) if log else e.mul_(s.reciprocal()[:, None])
        stats[a0:a1, :, 0] = m
        stats[a0:a1, :, 1] = s
    return y, stats.view(-1, 2)


def softmax_bwd(x: torch.Tensor, stats: torch.Tensor, g: torch.Tensor, log: bool) -> torch.Tensor:
    """Input gradient ``(A, C, B)`` of ``log_softmax`` / ``softmax`` from the forward's input ``x``,
    its ``stats`` ``(A * B, 2)`` and the upstream gradient ``g`` ``(A, C, B)``."""
    A, C, B = x.shape
    acc = acc_dtype(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if A * B == 0 or C == 0:
        return dx
    st = stats.view(A, B, 2)
    for a0, a1 in _chunks(A, C, B):
        m, s = st[a0:a1, :, 0].to(acc), st[a0:a1, :, 1].to(acc)
        p = torch.sub(x[a0:a1].to(acc), m[:, None]).exp_().mul_(s.reciprocal()[:, None])
        gs = g[a0:a1].to(acc)
        dx[a0:a1] = gs - p.mul_(gs.sum(1, keepdim=True)) if log else p.mul_(gs - (gs * p).sum(1, keepdim=True))
    return dx
